"""Committed results: the record each default or full notebook run leaves in ``results/<profile>/``, the check that
every record still describes the tree, and the README results table built from the records.

A record is the run's ``metrics.json`` (small JSON, no images) plus what ties it to the code it ran:

- ``git_commit``: the commit, ``-dirty`` when tracked files other than ``results/`` had changes;
- ``notebook_sha256``: the notebook's cells (types and sources; outputs and metadata do not count);
- ``code``: the sha256 of every ``cellkit`` source file the kernel had imported when the notebook finished;
- ``run``: the notebook's wall time and the CPU time of its kernel, in seconds.

:func:`check` fails a record from a dirty tree, on simulated data, or whose notebook or code differs from the tree
now, and a README table that differs from the one the records give.

>>> problems = check("default")   # [] when every record is current
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from cellkit import config, outputs

#: The profile whose records the README table shows.
TABLE_PROFILE = "default"


def results_dir(profile: str = TABLE_PROFILE) -> Path:
    """Where the records of ``profile`` live: ``results/<profile>/`` (``$CELLKIT_RESULTS_DIR/<profile>``)."""
    override = os.environ.get("CELLKIT_RESULTS_DIR", "").strip()
    root = Path(override).expanduser().resolve() if override else config.PROJECT_ROOT / "results"
    return root / profile


def record_path(notebook: str, profile: str = TABLE_PROFILE) -> Path:
    """``results/<profile>/<notebook>.json``."""
    return results_dir(profile) / f"{notebook}.json"


# --- fingerprints --------------------------------------------------------------------------------------------


def notebook_sha256(path: str | Path) -> str:
    """The sha256 of a notebook's cell types and sources: executing, stripping or re-saving it keeps the value,
    editing any cell changes it."""
    cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    content = [[cell["cell_type"], "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]]
               for cell in cells]
    return hashlib.sha256(json.dumps(content).encode("utf-8")).hexdigest()


def code_fingerprints(modules: dict[str, Any] | None = None) -> dict[str, str]:
    """``{path relative to the project: sha256}`` of every imported ``cellkit`` module's source file, that is
    the library code a run actually used (``modules`` defaults to ``sys.modules``)."""
    modules = sys.modules if modules is None else modules
    prints = {}
    for name, module in list(modules.items()):
        source = getattr(module, "__file__", None)
        if (name == "cellkit" or name.startswith("cellkit.")) and source and source.endswith(".py"):
            path = Path(source).resolve()
            prints[_relative(path)] = outputs.sha256_file(path)
    return dict(sorted(prints.items()))


def _shown(path: Path) -> str:
    """``path`` relative to the project when it is inside it, for messages."""
    return path.relative_to(config.PROJECT_ROOT).as_posix() if path.is_relative_to(config.PROJECT_ROOT) else str(path)


def _relative(path: Path) -> str:
    try:
        return path.relative_to(config.PROJECT_ROOT).as_posix()
    except ValueError:  # an installed package: name it from the package folder
        return (Path("cellkit") / path.relative_to(config.PACKAGE_DIR)).as_posix()


# --- writing and reading records -----------------------------------------------------------------------------


def write_record(metrics_json: str | Path, notebook: str | Path, profile: str, wall_s: float,
                 cpu_s: float | None) -> Path:
    """Write the record of one finished run of ``notebook`` (its ``.ipynb`` path) from the ``metrics.json`` it
    wrote, with the notebook's fingerprint and its wall and kernel CPU time (seconds); returns the record's path."""
    notebook = Path(notebook)
    record = without_machine_paths(json.loads(Path(metrics_json).read_text()))
    record["notebook_sha256"] = notebook_sha256(notebook)
    record["run"] = {"wall_time_s": round(wall_s, 1), "cpu_time_s": None if cpu_s is None else round(cpu_s, 1)}
    path = record_path(notebook.stem, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    return outputs.write_text(path, config.to_json(record) + "\n")


def machine_folders() -> list[tuple[str, str]]:
    """``(folder of this machine, the name a record gives it)``, most specific first: the data folder as
    ``$CELLKIT_DATA_DIR``, the project as ``.``, the home folder as ``~``."""
    data_dir = config.env_path("CELLKIT_DATA_DIR")
    folders = [] if data_dir is None else [(str(data_dir), "$CELLKIT_DATA_DIR")]
    folders += [(str(config.PROJECT_ROOT), "."), (str(Path.home()), "~")]
    return sorted(folders, key=lambda folder: -len(folder[0]))


def without_machine_paths(value: Any, folders: Sequence[tuple[str, str]] | None = None) -> Any:
    """``value`` (a record's JSON) with every string's machine folders named as :func:`machine_folders` does, so
    that a committed record reads the same on every machine (``/home/ann/data/pbc_blood_28`` becomes
    ``$CELLKIT_DATA_DIR/pbc_blood_28``)."""
    folders = machine_folders() if folders is None else folders
    if isinstance(value, dict):
        return {key: without_machine_paths(item, folders) for key, item in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(item, folders) for item in value]
    if isinstance(value, str):
        for folder, name in folders:
            value = value.replace(folder + os.sep, name + "/")
            if value == folder:
                value = name
    return value


def read_record(notebook: str, profile: str = TABLE_PROFILE) -> dict[str, Any] | None:
    """The committed record of ``notebook`` (a stem like ``01_eda``) in ``profile``, or None."""
    path = record_path(notebook, profile)
    return json.loads(path.read_text()) if path.is_file() else None


# --- the check ---------------------------------------------------------------------------------------------


def record_problems(record: dict[str, Any], notebook: str | Path) -> list[str]:
    """Why ``record`` no longer describes ``notebook`` (its ``.ipynb`` path) and the code in the tree, one
    sentence each; [] when it does."""
    notebook = Path(notebook)
    name = notebook.stem
    problems = []
    commit = str(record.get("git_commit", "unknown"))
    if commit.endswith("-dirty") or commit == "unknown":
        problems.append(f"{name}: recorded from a tree with uncommitted changes ({commit}); rerun it on a clean commit")
    if record.get("synthetic_data"):
        problems.append(f"{name}: recorded on the simulated stand-in, not the real data")
    if record.get("notebook_sha256") != notebook_sha256(notebook):
        problems.append(f"{name}: the notebook changed after its record (commit {commit}); rerun it")
    code = record.get("code")
    if not code:
        problems.append(f"{name}: the record does not say which cellkit code it ran; rerun it")
    for relative, digest in sorted((code or {}).items()):
        current = config.PROJECT_ROOT / relative
        if not current.is_file() or outputs.sha256_file(current) != digest:
            problems.append(f"{name}: {relative} changed after its record (commit {commit}); rerun it")
    return problems


def check(profile: str = TABLE_PROFILE, notebooks: Sequence[Path] | None = None,
          readme: Path | None = None) -> list[str]:
    """Every problem with the committed records of ``profile``: a notebook without a record, a record that no
    longer describes the tree (:func:`record_problems`), and, for the table's profile, a README table that is not
    the one the records give. [] means the committed results are those of the code in the tree."""
    notebooks = config.notebook_paths() if notebooks is None else notebooks
    problems = []
    for notebook in notebooks:
        record = read_record(notebook.stem, profile)
        if record is None:
            problems.append(f"{notebook.stem}: no record in {_shown(results_dir(profile))}; "
                            f"run it (make run ONLY={notebook.stem[:2]})")
        else:
            problems.extend(record_problems(record, notebook))
    if profile == TABLE_PROFILE:
        readme = readme or config.PROJECT_ROOT / "README.md"
        for name in stale_blocks(readme):
            problems.append(f"{readme.name}: the {name.replace('-', ' ')} is not the one the records give; "
                            "run cellkit report --write")
    return problems


# --- the README table ----------------------------------------------------------------------------------------


def results_table() -> str:
    """The README results table (Markdown) from ``notebooks/results.yml`` and the committed default records. A
    headline number with its 95 % interval recorded beside it (``<name>_ci``) is shown as ``value [low, high]``; a
    row marked ``profile: full`` (a study the default profile does not run) says so while no default record has it."""
    rows = yaml.safe_load((config.notebooks_dir() / "results.yml").read_text()) or []
    lines = ["| notebook | quantity | this repository | profile, data, commit, time | source report |",
             "|---|---|---|---|---|"]
    for row in rows:
        record = read_record(row["notebook"])
        value = record["headline"].get(row["headline"]) if record else None
        missing = "full profile only" if row.get("profile") == "full" else "not recorded yet"
        measured, provenance = (missing, "-") if value is None else (_measured(record, row["headline"]),
                                                                     _provenance(record))
        lines.append(f"| {row['notebook']} | {row['quantity']} | {measured} | {provenance} | {row['source']} |")
    return "\n".join(lines)


def _measured(record: dict[str, Any], name: str) -> str:
    value = record["headline"][name]
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    interval = record["headline"].get(f"{name}_ci")
    return text + (f" [{interval[0]:.4g}, {interval[1]:.4g}]" if interval is not None else "")


def _provenance(record: dict[str, Any]) -> str:
    data = "SYNTHETIC" if record["synthetic_data"] else ", ".join(
        sorted({d["name"] for d in record["datasets"].values()}))
    wall = (record.get("run") or {}).get("wall_time_s")
    minutes = f", {wall / 60:.1f} min" if wall is not None else ""
    return f"{record['profile']}, {data}, {record['git_commit']}{minutes}"


def times_table() -> str:
    """Each notebook's wall time and the CPU time of its kernel in the committed default and full records (Markdown),
    so that the README's times are those of the runs behind its numbers."""
    lines = ["| notebook | default: wall (CPU) | full: wall (CPU) |", "|---|---|---|"]
    for notebook in config.notebook_paths():
        cells = [_run_time(read_record(notebook.stem, profile)) for profile in ("default", "full")]
        lines.append(f"| {notebook.stem} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def _run_time(record: dict[str, Any] | None) -> str:
    run = (record or {}).get("run") or {}
    if run.get("wall_time_s") is None:
        return "not recorded yet"
    cpu = f" ({run['cpu_time_s'] / 60:.1f} CPU-min)" if run.get("cpu_time_s") is not None else ""
    return f"{run['wall_time_s'] / 60:.1f} min{cpu}"


#: The README's generated blocks: marker name -> the function that writes the block.
README_BLOCKS = {"results-table": results_table, "times-table": times_table}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _block_in(text: str, name: str) -> str | None:
    begin, end = _markers(name)
    start, stop = text.find(begin), text.find(end)
    return text[start + len(begin): stop].strip() if 0 <= start < stop else None


def stale_blocks(readme: Path) -> list[str]:
    """The README's generated blocks (:data:`README_BLOCKS`) whose content is not what the records give."""
    text = readme.read_text()
    return [name for name, make in README_BLOCKS.items() if _block_in(text, name) != make().strip()]


def write_results_table(readme: Path | None = None) -> Path:
    """Replace the README's generated blocks (the results table and the times table) with what the records give."""
    readme = readme or config.PROJECT_ROOT / "README.md"
    text = readme.read_text()
    for name, make in README_BLOCKS.items():
        begin, end = _markers(name)
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"{readme}: no {begin} ... {end} markers to write the table between")
        text = text[: start + len(begin)] + "\n" + make() + "\n" + text[stop:]
    outputs.write_text(readme, text)
    return readme
