"""The course website: built from the smoke runs of the notebooks, opened in Chromium, every image and link checked."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

from cellkit import cli, config, notebooks, outputs, site

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu"]


@pytest.fixture(scope="module")
def built_site(smoke_executed, real_data, tmp_path_factory) -> Path:
    """The smoke profile's site, from the executed copies the notebook tests left (a notebook they did not run
    here is run now)."""
    figures = tmp_path_factory.mktemp("site-figures")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CELLKIT_FIGURES_DIR", str(figures))
        for path in notebooks.notebook_paths():
            if not (smoke_executed / path.name).is_file():
                result = notebooks.run_notebook(path, "smoke", output_dir=smoke_executed, progress=False, timeout=600)
                assert result.ok, f"{path.name} failed: {result.error}"
    executed = [smoke_executed / p.name for p in notebooks.notebook_paths()]
    out = tmp_path_factory.mktemp("site") / "site"
    index = site.build_site("smoke", out, executed=executed, progress=None)
    assert index == out / "index.html" and index.is_file()
    return out


def _local_target(page: Path, href: str) -> tuple[Path, str] | None:
    """The file and fragment an ``href`` on ``page`` points to, or None for a link that leaves the site."""
    if urlparse(href).scheme in ("http", "https", "mailto"):
        return None
    address, fragment = urldefrag(href)
    target = page if not address else (page.parent / unquote(urlparse(address).path)).resolve()
    return target, fragment


def test_every_page_shows_its_images_and_every_internal_link_resolves(built_site):
    from playwright.sync_api import sync_playwright

    pages = [built_site / "index.html"] + [built_site / f"{p.stem}.html" for p in notebooks.notebook_paths()]
    pages += [built_site / f"{name}.html" for name in ("results", "data", "command_line", "app")]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page()
            tab.route(re.compile(r"^https?://"), lambda route: route.abort())  # the site must not need the network
            for page in pages:
                assert page.is_file(), f"the site has no {page.name}"
                tab.goto(page.as_uri(), timeout=30_000)
                images = tab.eval_on_selector_all(
                    "img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])")
                broken = [src for src, loaded in images if not loaded]
                assert not broken, f"{page.name}: images that do not load: {broken[:5]}"
                links = tab.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
                for href in links:
                    target = _local_target(page, href)
                    if target is None:
                        continue
                    path, fragment = target
                    assert path.is_file(), f"{page.name}: link {href!r} leads nowhere"
                    if fragment and path.suffix == ".html":
                        assert f'id="{fragment}"' in path.read_text(), f"{page.name}: link {href!r}: no such anchor"
            notebook_page = (built_site / "04_cnn_lenet_alexnet.html").read_text()
            assert notebook_page.count("<img") >= 3, "the notebook pages should show the run's figures"
        finally:
            browser.close()


def test_the_index_lists_the_notebooks_in_course_order(built_site):
    index = (built_site / "index.html").read_text()
    positions = [index.find(f'href="{p.stem}.html"') for p in notebooks.notebook_paths()]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)
    assert "smoke" in index and 'href="results.html"' in index and 'href="data.html"' in index


def test_a_rebuild_replaces_only_a_site(built_site, smoke_executed, tmp_path):
    executed = [smoke_executed / p.name for p in notebooks.notebook_paths()][:1]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(outputs.OutputError, match="not a site built by cellkit"):
        site.build_site("smoke", mine, executed=executed, progress=None)
    assert (mine / "notes.txt").read_text() == "keep me"

    ours = tmp_path / "ours"
    site.build_site("smoke", ours, executed=executed, progress=None)
    (ours / "stale.html").write_text("from an older build")
    site.build_site("smoke", ours, executed=executed, progress=None)
    assert (ours / "index.html").is_file() and not (ours / "stale.html").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_missing_executed_notebooks_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "executed_dir", lambda profile: tmp_path / "executed" / profile)
    assert cli.main(["site", "--profile", "full", "--out", str(tmp_path / "site")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no executed copy" in err and "make run PROFILE=full" in err
