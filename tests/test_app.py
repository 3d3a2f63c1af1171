"""The interactive app: upload checks and recorded results without a browser, then the app itself driven in a
real browser (Playwright on Debian's Chromium, ``make browser`` installs it) with tiny models trained here on
real data. Screenshots and the measured response times go to figures/app/ (git-ignored)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellkit import app as cellkit_app
from cellkit import cli, config, datasets
from cellkit.datasets import DataError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
NOT_AN_IMAGE = b"hello, this is a text file renamed .png\n"


@pytest.fixture(scope="module")
def pbc_jpeg(real_data) -> Path:
    """One real PBC original (360x363 RGB JPEG) of a known class."""
    table = pd.read_csv(real_data["pbc_jpg"] / "labels.csv")
    return real_data["pbc_jpg"] / table["path"].iloc[0]


@pytest.fixture(scope="module")
def dsb_png(real_data) -> Path:
    """One real DSB 2018 fluorescence image (256x256 PNG)."""
    manifest = datasets.load_dsb2018_manifest()
    image_id = manifest.loc[manifest["size_group"] == "256x256", "image_id"].iloc[-1]
    return real_data["dsb2018"] / "images" / f"{image_id}.png"


# --- uploads, without a browser ------------------------------------------------------------------------


def test_a_real_jpeg_decodes_as_stored(pbc_jpeg):
    image = cellkit_app.read_upload(pbc_jpeg.read_bytes())
    assert image.shape == (363, 360, 3) and image.dtype == np.uint8
    assert np.array_equal(image, datasets.read_image(pbc_jpeg))  # the same pixels as reading the file


def test_a_16_bit_tiff_decodes_from_memory(dsb_png):
    grey = np.asarray(Image.open(dsb_png).convert("L")).astype(np.uint16) * 257
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, grey)
    image = cellkit_app.read_upload(buffer.getvalue())
    assert image.dtype == np.uint16 and np.array_equal(image, grey)


@pytest.mark.parametrize(("data", "limits", "message"), [
    (NOT_AN_IMAGE, {}, "not a PNG, JPEG or TIFF image (checked by its content, not its name)"),
    (b"", {}, "the file is empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, {}, "cannot read the PNG header"),
    (b"\xff\xd8\xff" + b"\x00" * 2**20, {"max_bytes": 2**20}, "the file is 1.0 MiB; the limit is 1 MiB"),
])
def test_bad_uploads_give_one_line(data, limits, message):
    with pytest.raises(DataError) as error:
        cellkit_app.read_upload(data, **limits)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_pixel_limit_is_read_from_the_header(dsb_png):
    with pytest.raises(DataError, match=r"256 x 256 pixels \(0.1 Mpx\); the limit is 0 Mpx"):
        cellkit_app.read_upload(dsb_png.read_bytes(), max_pixels=256 * 255)
    assert cellkit_app.read_upload(dsb_png.read_bytes(), max_pixels=256 * 256).shape[:2] == (256, 256)


def test_a_truncated_png_is_a_decode_error(dsb_png):
    data = dsb_png.read_bytes()
    with pytest.raises(DataError, match="not a readable image"):
        cellkit_app.read_upload(data[: len(data) // 2])


def test_take_upload_reads_into_memory_and_deletes_the_copy(tmp_path):
    copy = tmp_path / "0.png"
    copy.write_bytes(b"abc")
    assert cellkit_app.take_upload({"datapath": str(copy), "name": "x.png"}) == b"abc"
    assert not copy.exists()
    copy.write_bytes(b"x" * 2000)
    with pytest.raises(DataError, match="limit"):
        cellkit_app.take_upload({"datapath": str(copy), "name": "x.png"}, max_bytes=1000)
    assert not copy.exists()


def test_the_upload_limit_refuses_large_bodies_before_the_app():
    reached, sent = [], []

    async def inner(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    limited = cellkit_app.UploadLimit(inner, max_bytes=100)
    scope = {"type": "http", "method": "POST", "path": "/session/x/upload/y", "headers": [(b"content-length", b"101")]}
    asyncio.run(limited(scope, receive, send))
    assert sent[0]["status"] == 413 and not reached
    asyncio.run(limited({**scope, "headers": [(b"content-length", b"100")]}, receive, send))
    assert reached == ["/session/x/upload/y"]


# --- transformations, models and recorded results ------------------------------------------------------


def test_input_transformations_known_answers():
    two_level = np.zeros((28, 28, 3), np.uint8)
    two_level[:, 14:] = 100
    normalised = cellkit_app.INPUT_TRANSFORMS["normalisation"](two_level)
    assert set(np.unique(normalised)) == {0, 255}  # z-score, then its own min and max -> the full range
    assert not cellkit_app.INPUT_TRANSFORMS["Canny 10/200"](np.full((28, 28, 3), 90, np.uint8)).any()
    sobel = cellkit_app.INPUT_TRANSFORMS["Sobel"](two_level)
    assert sobel[5, 13, 0] == 100 and sobel[5, 5, 0] == 0  # a step of 100 gives 100 beside it (report 000)
    blurred = cellkit_app.INPUT_TRANSFORMS["Gaussian blur 25x25"](two_level)
    assert 0 < blurred[5, 13, 0] < 100 and blurred.shape == two_level.shape
    assert list(cellkit_app.INPUT_TRANSFORMS) == ["none", "normalisation", "Gaussian blur 25x25", "Canny 10/200",
                                                  "Sobel"]


def _report(accuracy: float, f1: dict[str, float]) -> dict:
    return {"n": 10, "accuracy": accuracy, "macro_f1": float(np.mean(list(f1.values()))), "class_names": list(f1),
            "per_class": {c: {"precision": v, "recall": v, "f1": v, "support": 5} for c, v in f1.items()},
            "confusion_matrix": [[5, 0], [0, 5]]}


def test_results_are_found_in_metrics_files_with_their_provenance(tmp_path):
    run = tmp_path / "figures" / "05_transformations_vs_models"
    run.mkdir(parents=True)
    record = {"profile": "default", "synthetic_data": False, "datasets": {"pbc28:test": {"name": "pbc28"}},
              "metrics": {"models": {"cnn": {"test": _report(0.9, {"a": 0.8, "b": 1.0}), "history": {"loss": [1, 0.5]}},
                                     "vit": {"test": _report(0.8, {"a": 0.7, "b": 0.9})}},
                          "best_test": _report(0.9, {"a": 0.8, "b": 1.0})}}
    (run / "metrics.json").write_text(json.dumps(record))
    (tmp_path / "models").mkdir()
    results = cellkit_app.classifier_results(tmp_path / "figures", tmp_path / "models")
    assert [r.name for r in results] == ["05_transformations_vs_models: models/cnn",
                                         "05_transformations_vs_models: models/vit"]
    assert results[0].row()["accuracy"] == 0.9 and results[0].profile == "default" and results[0].data == "pbc28"
    assert results[0].history == {"loss": [1, 0.5]}
    assert cellkit_app.default_pair(results) == (results[0].name, results[1].name)  # best CNN vs the ViT
    table = cellkit_app.per_class_f1(results)
    assert table.loc["a"].tolist() == [0.8, 0.7]
    record["synthetic_data"] = True
    (run / "metrics.json").write_text(json.dumps(record))
    assert cellkit_app.classifier_results(tmp_path / "figures", tmp_path / "models")[0].data == "SYNTHETIC stand-in"


def test_without_models_the_page_says_how_to_make_them(tmp_path):
    entries, problems = cellkit_app.find_models(tmp_path)
    assert entries == [] and problems == []
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    entries, problems = cellkit_app.find_models(tmp_path)
    assert entries == [] and problems == ["junk.keras: " + f"{tmp_path / 'junk.keras'}: not a .keras model file "
                                          "(not a zip archive)"]
    html = str(cellkit_app.build_ui(tmp_path)(None))
    assert "No classifier found" in html and "No U-Net found" in html and "make models" in html


class _Inputs(dict):
    """What the app reads from Shiny's inputs: ``"id" in input`` and ``input.id()``."""

    def __getattr__(self, name):
        return lambda: self[name]


def test_unsupported_images_and_missing_models_become_messages(tmp_path):
    from cellkit import classifiers

    stack = np.zeros((5, 32, 32), np.uint8)  # a 5-channel image no classifier takes
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.moveaxis(stack, 0, -1), photometric="minisblack", planarconfig="contig")
    image = cellkit_app.read_upload(buffer.getvalue())
    assert image.shape == (32, 32, 5)

    def prepare(model, picture):
        return classifiers.prepare_images([picture], 28, None)

    entry = cellkit_app.ModelEntry(tmp_path / "m.keras", "classifier", None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cellkit_app, "find_models", lambda folder: ([entry], []))
        patch.setattr(cellkit_app, "load_model", lambda chosen: object())
        message = cellkit_app._with_model(_Inputs(cls_model=str(entry.path)), "cls_model", image, tmp_path, prepare)
        assert message == "cannot use this image with the classifier: expected a grey or RGB image, got an array " \
                          "of shape (32, 32, 5)"
        gone = cellkit_app._with_model(_Inputs(cls_model="other.keras"), "cls_model", image, tmp_path, prepare)
        assert gone == "the model other.keras is gone; reload the page"
    missing = cellkit_app._with_model(_Inputs(), "seg_model", image, tmp_path, prepare)
    assert missing.startswith(f"no U-Net found in {tmp_path}: make them with `make models`")
    assert cellkit_app._with_model(_Inputs(), "cls_model", "a message", tmp_path, prepare) == "a message"


def test_cli_app_refuses_a_missing_models_folder(tmp_path, capsys):
    assert cli.main(["app", "--models", str(tmp_path / "nowhere")]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().endswith("no such folder of models")


# --- the app in a browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(real_data, tmp_path_factory) -> Path:
    """A LeNet trained for one epoch on 20 real PBC-28 images per class, and a 4-filter U-Net trained for 6 steps on
    6 real DSB images: enough to exercise every path of the app in seconds (their predictions are not good)."""
    from cellkit import training, unet

    folder = tmp_path_factory.mktemp("app_models")
    train = datasets.per_class(datasets.load_pbc28("train"), 20)
    val = datasets.per_class(datasets.load_pbc28("val"), 5)
    run = training.train_classifier("lenet", train, val, crop=datasets.loaders.PBC_CROP, epochs=1, progress="none",
                                    measure_throughput=False)
    run.save(folder / "lenet.keras")
    manifest = datasets.load_dsb2018_manifest()
    ids = manifest.loc[manifest["size_group"] == "256x256", "image_id"].iloc[:8].tolist()
    segmenter = unet.train_unet(datasets.load_dsb2018(ids[:6]), datasets.load_dsb2018(ids[6:]),
                                config=unet.UNetConfig(epochs=2, steps_per_epoch=3, base_filters=4, crop=64,
                                                       batch_size=4, val_crops=4, val_crop_size=64),
                                progress="none", tune=False, measure_throughput=False)
    segmenter.save(folder / "unet.keras")
    return folder


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_models, tmp_path_factory):
    """``cellkit app`` on a free loopback port with the tiny models (and no recorded notebook results)."""
    port = _free_port()
    env = {**os.environ, "CELLKIT_FIGURES_DIR": str(tmp_path_factory.mktemp("no_figures"))}
    log = tmp_path_factory.mktemp("app_log") / "server.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "cellkit.cli", "app", "--port", str(port), "--models",
                                   str(tiny_models)], stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


@pytest.fixture(scope="module")
def page(app_url):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 950})
        page.set_default_timeout(60_000)
        page.goto(app_url)
        yield page
        browser.close()


SHOTS = config.figures_dir("app")
TIMINGS: dict[str, float] = {}


def _record_timing(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 3)
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
    print(f"{name}: {seconds:.2f} s")


@pytest.mark.slow
def test_performance_tab_shows_the_models_recorded_scores(page, tiny_models):
    record = json.loads((tiny_models / "lenet.json").read_text())
    page.wait_for_selector("#perf_table table")
    table = page.inner_text("#perf_table")
    assert "lenet.keras (lenet)" in table and "validation" in table and "cellkit train classifier" in table
    assert f"{record['validation']['accuracy']:.4f}".rstrip("0") in table
    page.wait_for_selector("#perf_confusion img")
    assert "unet.keras" in page.inner_text("body")
    page.screenshot(path=str(SHOTS / "performance.png"), full_page=True)


@pytest.mark.slow
def test_classify_a_real_pbc_jpeg(page, pbc_jpeg, tiny_models):
    page.get_by_role("tab", name="Classify").click()
    started = time.perf_counter()
    page.set_input_files("#cls_file", str(pbc_jpeg))
    shown = page.wait_for_selector("#cls-class").inner_text()
    _record_timing("classify_first_upload_s", time.perf_counter() - started)  # includes loading the model
    classes = json.loads((tiny_models / "lenet.json").read_text())["model_info"]["class_names"]
    assert shown.startswith("Predicted class: ") and shown.removeprefix("Predicted class: ") in classes
    page.wait_for_selector("#cls_bars img")
    started = time.perf_counter()
    page.select_option("#cls_transform", "Sobel")
    page.wait_for_selector("#cls_status :text('transformation: Sobel')")
    _record_timing("classify_change_transformation_s", time.perf_counter() - started)
    page.wait_for_selector("#cls_input img")
    page.screenshot(path=str(SHOTS / "classify.png"), full_page=True)


@pytest.mark.slow
def test_a_text_file_renamed_png_gives_the_message(page):
    page.get_by_role("tab", name="Classify").click()
    page.set_input_files("#cls_file", files=[{"name": "cells.png", "mimeType": "image/png", "buffer": NOT_AN_IMAGE}])
    message = page.wait_for_selector("#cls-error").inner_text()
    assert message == "Error: cells.png: not a PNG, JPEG or TIFF image (checked by its content, not its name)"
    page.screenshot(path=str(SHOTS / "error.png"), full_page=True)


@pytest.mark.slow
def test_segment_a_real_dsb_image_and_download_the_mask(page, dsb_png):
    page.get_by_role("tab", name="Segment").click()
    started = time.perf_counter()
    page.set_input_files("#seg_file", str(dsb_png))
    count_text = page.wait_for_selector("#seg-count").inner_text()
    _record_timing("segment_first_upload_s", time.perf_counter() - started)
    count = int(count_text.split()[0])
    assert count_text == f"{count} nuclei"
    with page.expect_download() as download:
        page.click("#seg_labels")
    labels = np.asarray(Image.open(download.value.path()))
    assert labels.shape == (256, 256) and labels.dtype == np.uint16
    assert len(np.unique(labels[labels > 0])) == count  # the count shown is the mask's number of nuclei
    page.wait_for_selector("#seg_overlay img")
    page.screenshot(path=str(SHOTS / "segment.png"), full_page=True)
