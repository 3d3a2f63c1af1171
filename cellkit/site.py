"""The course website: the executed notebooks of one profile, the results table, the data and licence page, and the
command line and app pages, rendered by Sphinx with myst-nb into static HTML that needs no server and no network.

>>> build_site("default", Path("site"))   # after make run; opens as site/index.html

Nothing is executed while building: the pages show the outputs the run left in ``notebooks/executed/<profile>/``.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from cellkit import config, outputs, results

#: A file every built site holds, so that a rebuild replaces only a folder that this module wrote.
SITE_MARK = ".cellkit-site"
#: README sections that become pages of their own: (page, README heading, extra Markdown file to append).
README_PAGES = (
    ("data", "Data and licences", None),
    ("command_line", "The command line", "docs/command_line.md"),
    ("app", "The app", "docs/app.md"),
)
SPHINX_CONF = '''project = "cellkit"
extensions = ["myst_nb"]
nb_execution_mode = "off"  # the pages show what the run computed; building executes nothing
myst_heading_anchors = 3
html_theme = "alabaster"
html_title = "cellkit: the course"
html_theme_options = {"page_width": "1200px", "body_max_width": "none"}
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]
'''


class SiteError(ValueError):
    """The site cannot be built from what is there (missing executed notebooks, an output folder not ours)."""


def executed_notebooks(profile: str) -> list[Path]:
    """The executed copies of every numbered notebook for ``profile``, in course order; a :class:`SiteError` names
    the ones that have not run."""
    folder = config.executed_dir(profile)
    wanted = config.notebook_paths()
    missing = [p.stem for p in wanted if not (folder / p.name).is_file()]
    if missing:
        raise SiteError(f"{len(missing)} notebook(s) have no executed copy in {folder} ({', '.join(missing)}); "
                        f"run them first: make run PROFILE={profile}")
    return [folder / p.name for p in wanted]


def build_site(profile: str, out: Path, executed: list[Path] | None = None, overwrite_site: bool = True,
               progress: Callable[[str], None] | None = print) -> Path:
    """Render the site of ``profile`` into ``out`` and return ``out / "index.html"``.

    ``executed`` are the executed notebooks (default: :func:`executed_notebooks`). ``out`` is replaced only when
    it does not exist, is empty, or holds a site this function built (it has :data:`SITE_MARK`).
    """
    executed = executed_notebooks(profile) if executed is None else executed
    _check_out(out)
    with tempfile.TemporaryDirectory(prefix="cellkit-site-") as work:
        source = Path(work) / "source"
        _write_sources(source, profile, executed)
        html = Path(work) / "html"
        if progress:
            progress(f"rendering {len(executed)} notebooks and {len(README_PAGES) + 2} pages with Sphinx")
        _sphinx(source, html)
        (html / SITE_MARK).write_text(f"built by cellkit from the {profile} profile\n")
        _replace_folder(out, html)
    return out / "index.html"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / SITE_MARK).is_file())):
        raise outputs.OutputError(f"{out}: exists and is not a site built by cellkit; choose another --out or "
                                  "remove it yourself")


def _replace_folder(out: Path, built: Path) -> None:
    """Move ``built`` to ``out``: the old site is renamed aside first and removed only once the new one is there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = outputs.temporary_name(out)
    shutil.copytree(built, staged)
    old = outputs.temporary_name(out) if out.exists() else None
    if old:
        out.rename(old)
    staged.rename(out)
    if old:
        shutil.rmtree(old)


def _sphinx(source: Path, html: Path) -> None:
    """Run ``sphinx-build -b html``; a failure raises with Sphinx's last message."""
    from sphinx.cmd.build import build_main

    log = io.StringIO()
    with redirect_stdout(log), redirect_stderr(log):
        status = build_main(["-b", "html", "-q", str(source), str(html)])
    if status != 0:
        last = [line for line in log.getvalue().splitlines() if line.strip()][-1:] or ["no message"]
        raise RuntimeError(f"Sphinx could not build the site: {last[0]}")


# --- the pages -------------------------------------------------------------------------------------------------


def _write_sources(source: Path, profile: str, executed: list[Path]) -> None:
    source.mkdir(parents=True)
    (source / "conf.py").write_text(SPHINX_CONF)
    for notebook in executed:
        shutil.copy2(notebook, source / notebook.name)
    further = []
    for page in sorted((config.PROJECT_ROOT / "docs").glob("*.md")):
        shutil.copy2(page, source / page.name)
        further.append(page.stem)
    readme = (config.PROJECT_ROOT / "README.md").read_text()
    for name, heading, extra in README_PAGES:
        text = _section(readme, heading)
        if extra:
            text += "\n\n" + _demote((config.PROJECT_ROOT / extra).read_text())
        (source / f"{name}.md").write_text(text)
    _copy_local_images(readme, source)
    (source / "results.md").write_text(
        "# Results\n\nEach row comes from the committed record of the notebook's default run "
        "(`results/default/`), with its 95 % interval where the notebook records one.\n\n"
        + results.results_table() + "\n")
    pages = ["results", *(name for name, _, _ in README_PAGES)]
    (source / "index.md").write_text(_index(readme, profile, [n.stem for n in executed], pages,
                                            [name for name in further if name not in pages]))


def _index(readme: str, profile: str, notebook_pages: list[str], pages: list[str], further: list[str]) -> str:
    title, _, rest = readme.partition("\n")
    intro = rest.split("\n## ", 1)[0].strip()
    return (f"{title}\n\n{intro}\n\nThese pages show the notebooks as the **{profile}** profile ran them, with "
            "their outputs; run them yourself with `make run`.\n\n" + _toctree("Notebooks", notebook_pages)
            + _toctree("Results, data and tools", pages) + _toctree("Further reading", further))


def _toctree(caption: str, names: list[str]) -> str:
    return "\n".join(["```{toctree}", ":maxdepth: 1", f":caption: {caption}", "", *names, "```", "", ""])


def _section(markdown: str, heading: str) -> str:
    """The ``## heading`` section of the README (to the next ``## ``) as a page with a ``#`` title, its links to
    notebooks and docs pointing at their pages on the site."""
    start = markdown.index(f"\n## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    body = markdown[start + 1: end if end > 0 else None]
    return "#" + body[2:].replace("](notebooks/", "](").replace("](docs/", "](").rstrip() + "\n"


def _demote(markdown: str) -> str:
    """Headings one level down (outside code blocks), so that an appended file becomes a section of its page."""
    lines, in_code = [], False
    for line in markdown.splitlines():
        in_code ^= line.startswith("```")
        lines.append("#" + line if line.startswith("#") and not in_code else line)
    return "\n".join(lines)


def _copy_local_images(markdown: str, source: Path) -> None:
    """Copy the project files that ``markdown`` shows as images (``![...](path)``) to the same paths in ``source``."""
    import re

    for path in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", markdown):
        local = config.PROJECT_ROOT / path
        if local.is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, source / path)
