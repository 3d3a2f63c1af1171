"""`cellkit train unet`, `cellkit segment` and `cellkit evaluate segmentation` on real DSB 2018 files.

One tiny U-Net (4 filters) is trained for a few steps on a small folder of real DSB images through the command
line; the other commands use it. Bad input must end in one line (a per-file warning for `segment`), never a
traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellkit import cli, datasets


def assert_one_line_error(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("error:"), err
    for word in words:
        assert word in err, err


def listing(folder):
    return sorted((p.relative_to(folder), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def workspace(real_data, tmp_path_factory):
    """A folder of 8 real 256x256 DSB images with their labels, and a U-Net trained on it by the command line."""
    root = tmp_path_factory.mktemp("cli_segmentation")
    dsb = datasets.require("dsb2018")
    manifest = datasets.load_dsb2018_manifest()
    ids = manifest.loc[manifest["size_group"] == "256x256", "image_id"].iloc[:8].tolist()
    for sub in ("images", "labels"):
        (root / "nuclei" / sub).mkdir(parents=True)
        for image_id in ids:
            shutil.copy(dsb / sub / f"{image_id}.png", root / "nuclei" / sub / f"{image_id}.png")
    model = root / "models" / "unet.keras"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # in this process: TensorFlow loads once for the whole module
        status = cli.main(["train", "unet", "--data", str(root / "nuclei"), "--epochs", "2", "--steps-per-epoch", "3",
                           "--base-filters", "4", "--crop", "64", "--batch-size", "4", "--out", str(model),
                           "--quiet"])
    assert status == 0, stdout.getvalue()
    return {"root": root, "data": root / "nuclei", "ids": ids, "model": model, "train_stdout": stdout.getvalue()}


@pytest.fixture(scope="module")
def my_images(workspace):
    """Real DSB images as a user might have them: PNG, a 16-bit TIFF, an RGB PNG, a JPEG, a larger mosaic."""
    folder = workspace["root"] / "my_images"
    (folder / "sub").mkdir(parents=True)
    src = workspace["data"] / "images"
    ids = workspace["ids"]
    shutil.copy(src / f"{ids[0]}.png", folder / "plain.png")
    grey = np.asarray(Image.open(src / f"{ids[0]}.png").convert("L"))
    tifffile.imwrite(folder / "grey16.tif", grey.astype(np.uint16) * 257)  # the same image in 16 bits
    other = np.asarray(Image.open(src / f"{ids[1]}.png").convert("L"))
    Image.fromarray(np.dstack([other] * 3)).save(folder / "sub" / "rgb.png")
    Image.fromarray(grey).save(folder / "photo.jpg", quality=95)
    mosaic = np.block([[grey, grey[:, :100]], [grey[:90], grey[:90, :100]]])  # 346 x 356: tiled
    Image.fromarray(mosaic).save(folder / "mosaic.png")
    return folder


def segment(*args: str) -> int:
    return cli.main(["segment", *args, "--quiet"])


def test_train_unet_writes_the_model_and_its_record(workspace):
    assert workspace["model"].is_file()
    record = json.loads(workspace["model"].with_suffix(".json").read_text())
    info = record["model_info"]
    assert info["kind"] == "unet" and info["n_classes"] == 3 and info["channels"] == ["original", "inverse", "canny"]
    assert info["postprocess"] and info["base_filters"] == 4
    assert record["summary"]["epochs_run"] == 2 and record["summary"]["train_minutes"] > 0
    assert record["data"]["n_train"] + record["data"]["n_val"] + record["data"]["n_test"] == 8
    assert {"f1", "ap", "seg", "pq", "iou_sweep", "pixel", "object"} <= set(record["test"])
    assert "test: F1" in workspace["train_stdout"]


def test_segment_real_files_of_any_format(workspace, my_images, tmp_path, capsys):
    before = listing(my_images)
    out = tmp_path / "masks"
    assert segment("--model", str(workspace["model"]), "--input", str(my_images), "--out", str(out),
                   "--overlay") == 0
    assert listing(my_images) == before  # nothing written into the input folder
    for rel, shape in (("plain.png", (256, 256)), ("grey16.png", (256, 256)), ("sub/rgb.png", (256, 256)),
                       ("photo.png", (256, 256)), ("mosaic.png", (346, 356))):
        labels = cv2.imread(str(out / rel), cv2.IMREAD_UNCHANGED)
        assert labels is not None and labels.dtype == np.uint16 and labels.shape == shape, rel
        assert (out / rel).with_name((out / rel).stem + "_overlay.png").is_file()
    counts = pd.read_csv(out / "counts.csv")
    assert list(counts.columns) == ["file", "n_nuclei", "mean_area_px"]
    assert sorted(counts["file"]) == sorted(["grey16.tif", "mosaic.png", "photo.jpg", "plain.png", "sub/rgb.png"])
    assert (counts["n_nuclei"] >= 0).all()
    # the same image as 8-bit PNG and as 16-bit TIFF gives the same nuclei (per-image normalisation); after the zoom
    # to the model's nucleus size the two normalised images differ by float rounding (~1e-7), enough to flip a Canny
    # edge pixel and so move a few outline pixels
    from_16bit = cv2.imread(str(out / "grey16.png"), cv2.IMREAD_UNCHANGED)
    from_8bit = cv2.imread(str(out / "plain.png"), cv2.IMREAD_UNCHANGED)
    assert np.mean((from_16bit > 0) != (from_8bit > 0)) < 0.005
    n_nuclei = counts.set_index("file")["n_nuclei"]
    assert abs(n_nuclei["grey16.tif"] - n_nuclei["plain.png"]) <= 1
    assert "error" not in capsys.readouterr().err


def test_segment_one_file_and_count_matches_labels(workspace, my_images, tmp_path):
    out = tmp_path / "one"
    assert segment("--model", str(workspace["model"]), "--input", str(my_images / "plain.png"), "--out",
                   str(out)) == 0
    labels = cv2.imread(str(out / "plain.png"), cv2.IMREAD_UNCHANGED)
    counts = pd.read_csv(out / "counts.csv")
    assert counts["file"].tolist() == ["plain.png"]
    assert counts["n_nuclei"].iloc[0] == len(np.unique(labels[labels > 0]))
    flipped = tmp_path / "flips"
    assert segment("--model", str(workspace["model"]), "--input", str(my_images / "plain.png"), "--out",
                   str(flipped), "--flips") == 0
    assert cv2.imread(str(flipped / "plain.png"), cv2.IMREAD_UNCHANGED).shape == labels.shape


def test_segment_skips_an_unreadable_file_with_a_warning(workspace, my_images, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(my_images / "plain.png", folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG this is not an image")
    out = tmp_path / "mixed_out"
    assert segment("--model", str(workspace["model"]), "--input", str(folder), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: skipped") and "broken.png" in lines[0]
    assert lines[1].startswith("error: 1 of 2 files")
    assert (out / "good.png").is_file() and pd.read_csv(out / "counts.csv")["file"].tolist() == ["good.png"]


def test_segment_refuses_to_write_into_the_input_folder(workspace, my_images, capsys):
    assert segment("--model", str(workspace["model"]), "--input", str(my_images), "--out",
                   str(my_images / "masks")) == 2
    assert_one_line_error(capsys.readouterr().err, "refusing")
    assert segment("--model", str(workspace["model"]), "--input", str(my_images / "plain.png"), "--out",
                   str(my_images)) == 2
    assert_one_line_error(capsys.readouterr().err, "refusing")
    assert not (my_images / "masks").exists()


def test_segment_an_empty_folder_or_a_missing_model_is_one_line(workspace, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert segment("--model", str(workspace["model"]), "--input", str(tmp_path / "empty"), "--out",
                   str(tmp_path / "o")) == 2
    assert_one_line_error(capsys.readouterr().err, "no images")
    assert segment("--model", str(tmp_path / "none.keras"), "--input", str(workspace["data"] / "images"), "--out",
                   str(tmp_path / "o")) == 2
    assert_one_line_error(capsys.readouterr().err, "no such model file")


def test_segment_whole_image_too_large_without_tiling_is_a_warning(workspace, tmp_path, capsys):
    folder = tmp_path / "huge"
    folder.mkdir()
    Image.fromarray(np.zeros((2100, 2100), np.uint8)).save(folder / "huge.png")
    assert segment("--model", str(workspace["model"]), "--input", str(folder), "--out", str(tmp_path / "o"),
                   "--tile", "0") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "too large" in err and "tile" in err


def test_evaluate_segmentation_writes_every_score(workspace, my_images, tmp_path, capsys):
    out = tmp_path / "pred"
    images = tmp_path / "in"
    images.mkdir()
    for image_id in workspace["ids"][:4]:
        shutil.copy(workspace["data"] / "images" / f"{image_id}.png", images)
    assert segment("--model", str(workspace["model"]), "--input", str(images), "--out", str(out), "--overlay") == 0
    report_path = tmp_path / "scores.json"
    assert cli.main(["evaluate", "segmentation", "--pred", str(out), "--gt", str(workspace["data"]), "--json",
                     str(report_path)]) == 0
    captured = capsys.readouterr()
    assert "SEG" in captured.out
    report = json.loads(report_path.read_text())
    assert {"precision", "recall", "f1", "ap", "pq", "seg", "iou_sweep", "pixel", "object", "per_image"} <= set(report)
    assert [row["thresh"] for row in report["iou_sweep"]][:2] == [0.5, 0.55]
    # the 8 labels vs 4 predictions: the 4 without a prediction count as empty ones, every nucleus missed
    assert report["n_images"] == 8 and report["n_missing"] == 4 and report["missing"] == "counted as empty predictions"
    assert "4 reference file(s) without a prediction counted as empty" in captured.err
    assert "4 without a prediction counted as empty predictions" in captured.out
    assert cli.main(["evaluate", "segmentation", "--pred", str(out), "--gt", str(workspace["data"]), "--json",
                     str(report_path), "--skip-missing"]) == 2  # the report exists: not replaced without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["evaluate", "segmentation", "--pred", str(out), "--gt", str(workspace["data"]), "--json",
                     str(report_path), "--skip-missing", "--overwrite"]) == 0
    skipped = json.loads(report_path.read_text())
    assert skipped["n_images"] == 4 and skipped["n_missing"] == 4 and skipped["missing"] == "left out"
    assert skipped["recall"] >= report["recall"] and "left out (--skip-missing)" in capsys.readouterr().err
    # the reference against itself is perfect
    assert cli.main(["evaluate", "segmentation", "--pred", str(workspace["data"] / "labels"), "--gt",
                     str(workspace["data"] / "labels"), "--json", str(tmp_path / "self.json")]) == 0
    self_report = json.loads((tmp_path / "self.json").read_text())
    assert self_report["f1"] == 1.0 and self_report["seg"] == 1.0


def counts_match_labels(out):
    """counts.csv lists exactly the label images in ``out``, each with its number of nuclei."""
    counts = pd.read_csv(out / "counts.csv")
    labels = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if not p.stem.endswith("_overlay"))
    assert sorted(str(Path(f).with_suffix(".png")) for f in counts["file"]) == labels
    for file, n in zip(counts["file"], counts["n_nuclei"], strict=True):
        image = cv2.imread(str(out / Path(file).with_suffix(".png")), cv2.IMREAD_UNCHANGED)
        assert len(np.unique(image[image > 0])) == n, file
    return counts


def test_segment_rerun_skips_what_is_done_and_redoes_what_changed(workspace, my_images, tmp_path, capsys):
    images = tmp_path / "in"
    shutil.copytree(my_images, images)
    out = tmp_path / "masks"
    command = ["--model", str(workspace["model"]), "--input", str(images), "--out", str(out), "--overlay"]
    assert segment(*command) == 0
    manifest = json.loads((out / "cellkit-run.json").read_text())
    assert manifest["finished"] and manifest["n_done"] == 5 and manifest["options"]["overlay"] is True
    assert len(manifest["model_sha256"]) == 64 and manifest["input"] == str(images.resolve())
    entries = [json.loads(line) for line in (out / "cellkit-run.jsonl").read_text().splitlines()]
    assert {e["input"] for e in entries} == {"grey16.tif", "mosaic.png", "photo.jpg", "plain.png", "sub/rgb.png"}
    assert {"size", "mtime_ns", "output", "overlay", "n_nuclei", "mean_area_px", "height", "width"} <= set(entries[0])
    first = counts_match_labels(out)
    capsys.readouterr()
    assert segment(*command) == 0  # the same command again: nothing to do
    assert "segmented 0 of 5 images (5 done before, skipped)" in capsys.readouterr().out
    os.utime(images / "photo.jpg")  # the input changed: redone
    (out / "sub" / "rgb.png").unlink()  # an output removed: redone
    assert segment(*command) == 0
    assert "segmented 2 of 5 images (3 done before, skipped)" in capsys.readouterr().out
    pd.testing.assert_frame_equal(counts_match_labels(out), first)


def test_segment_resume_takes_model_input_and_options_from_the_run(workspace, my_images, tmp_path, capsys):
    out = tmp_path / "masks"
    assert segment("--model", str(workspace["model"]), "--input", str(my_images), "--out", str(out), "--flips",
                   "--tile", "128") == 0
    (out / "plain.png").unlink()
    capsys.readouterr()
    assert segment("--resume", "--out", str(out)) == 0
    assert "segmented 1 of 5 images (4 done before, skipped)" in capsys.readouterr().out
    assert json.loads((out / "cellkit-run.json").read_text())["options"]["tile"] == 128
    assert segment("--resume", "--out", str(out), "--tile", "256") == 2  # an option that contradicts the run
    assert_one_line_error(capsys.readouterr().err, "another run", "tile 128 there, 256 now")


def test_segment_refuses_a_foreign_folder_and_overwrite_deletes_nothing(workspace, tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for image_id in workspace["ids"][:2]:
        shutil.copy(workspace["data"] / "images" / f"{image_id}.png", images)
    shutil.copy(workspace["data"] / "labels" / f"{workspace['ids'][0]}.png", masks)  # a reference mask ...
    (masks / "notes.txt").write_text("mine")  # ... and a file of the user's
    before = listing(masks)
    assert segment("--model", str(workspace["model"]), "--input", str(images), "--out", str(masks)) == 2
    assert_one_line_error(capsys.readouterr().err, "not written by cellkit", "--overwrite")
    assert listing(masks) == before
    assert segment("--model", str(workspace["model"]), "--input", str(images), "--out", str(masks),
                   "--overwrite") == 0
    assert (masks / "notes.txt").read_text() == "mine"
    assert {p.name for p in masks.iterdir()} == {"notes.txt", "cellkit-run.json", "cellkit-run.jsonl", "counts.csv",
                                                  *(f"{i}.png" for i in workspace["ids"][:2])}


def test_segment_refuses_two_inputs_with_one_output_name(workspace, my_images, tmp_path, capsys):
    images = tmp_path / "in"
    shutil.copytree(my_images, images)
    shutil.copy(images / "grey16.tif", images / "plain.tif")
    assert segment("--model", str(workspace["model"]), "--input", str(images), "--out", str(tmp_path / "o")) == 2
    assert_one_line_error(capsys.readouterr().err, "plain.png", "plain.tif", "would both write")
    assert not (tmp_path / "o").exists()


def test_segment_interrupted_by_ctrl_c_is_marked_unfinished_and_resumes(workspace, tmp_path, capsys):
    """A real SIGINT to a real `cellkit segment` in a fresh interpreter, once a few images are done."""
    images = tmp_path / "many"
    images.mkdir()
    for n in range(40):
        image_id = workspace["ids"][n % len(workspace["ids"])]
        shutil.copy(workspace["data"] / "images" / f"{image_id}.png", images / f"{n:02d}.png")
    out = tmp_path / "masks"
    command = ["--model", str(workspace["model"]), "--input", str(images), "--out", str(out), "--overlay"]
    # a suite started in the background (`make test &`) inherits SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal would
    process = subprocess.Popen([sys.executable, "-m", "cellkit.cli", "segment", *command, "--quiet"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        entries = out / "cellkit-run.jsonl"
        if entries.is_file() and entries.read_text().count("\n") >= 3:
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().startswith("interrupted:") and err.count("\n") == 1, err
    assert "cellkit segment --resume --out" in err
    manifest = json.loads((out / "cellkit-run.json").read_text())
    assert manifest["finished"] is False and manifest["status"] == "interrupted"
    done = len(counts_match_labels(out))
    assert 3 <= done < 40 and manifest["n_done"] == done
    assert not list(out.glob(".*cellkit-tmp*"))  # no half-written file left
    capsys.readouterr()
    assert segment(*command) == 0  # the same command resumes
    assert f"segmented {40 - done} of 40 images ({done} done before, skipped)" in capsys.readouterr().out
    assert len(counts_match_labels(out)) == 40
    assert json.loads((out / "cellkit-run.json").read_text())["finished"] is True


def test_segment_stops_in_one_line_when_an_output_cannot_be_written(workspace, my_images, tmp_path, capsys):
    out = tmp_path / "masks"
    command = ["--model", str(workspace["model"]), "--input", str(my_images), "--out", str(out)]
    assert segment(*command) == 0
    shutil.rmtree(out / "sub")
    (out / "sub").write_text("a file where the subfolder goes")  # sub/rgb.png is redone and cannot be written
    capsys.readouterr()
    assert segment(*command) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot write", "4 of 5 images done are kept",
                          "cellkit segment --resume --out")
    manifest = json.loads((out / "cellkit-run.json").read_text())
    assert manifest["finished"] is False and manifest["status"].startswith("failed") and manifest["n_done"] == 4
    assert sorted(counts_match_labels(out)["file"]) == ["grey16.tif", "mosaic.png", "photo.jpg", "plain.png"]


def test_segment_files_from_python_keeps_the_same_rules(workspace, my_images, tmp_path):
    from cellkit import inference, outputs, unet

    trained = unet.load_unet(workspace["model"])
    files = inference.image_files(my_images)
    out = tmp_path / "masks"
    rows = inference.segment_files(trained, files, out, root=my_images, progress=False)
    assert len(rows) == 5 and json.loads((out / "cellkit-run.json").read_text())["finished"]
    again = inference.segment_files(trained, files, out, root=my_images, progress=False)  # all skipped
    assert sorted(r["labels"] for r in again) == sorted(r["labels"] for r in rows)
    trained.flips = True
    with pytest.raises(outputs.OutputError, match="flips False there, True now"):
        inference.segment_files(trained, files, out, root=my_images, progress=False)
    assert len(inference.segment_files(trained, files, out, root=my_images, progress=False, overwrite=True)) == 5
    (tmp_path / "other").mkdir()
    shutil.copy(my_images / "sub" / "rgb.png", tmp_path / "other" / "rgb.png")
    with pytest.raises(outputs.OutputError, match="would both write"):  # without a root both are rgb.png
        inference.segment_files(trained, [*files, tmp_path / "other" / "rgb.png"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def _labels_folder(tmp_path, name, array, suffix=".png"):
    folder = tmp_path / name
    folder.mkdir()
    if suffix == ".tif":
        tifffile.imwrite(folder / f"x{suffix}", array)
    else:
        Image.fromarray(array).save(folder / f"x{suffix}")
    return folder


@pytest.mark.parametrize("case", ["size", "float", "rgb", "binary", "jpeg", "no_common"])
def test_evaluate_bad_labels_are_one_line(tmp_path, capsys, case):
    rng = np.random.default_rng(0)
    good = np.zeros((40, 50), np.uint16)
    good[5:15, 5:15], good[20:30, 30:45] = 1, 2
    gt = _labels_folder(tmp_path, "gt", good)
    pred = {
        "size": lambda: _labels_folder(tmp_path, "pred", good[:30]),
        "float": lambda: _labels_folder(tmp_path, "pred", rng.random((40, 50)).astype(np.float32), ".tif"),
        "rgb": lambda: _labels_folder(tmp_path, "pred", np.zeros((40, 50, 3), np.uint8)),
        "binary": lambda: _labels_folder(tmp_path, "pred", (good > 0).astype(np.uint8) * 255),
        "jpeg": lambda: _labels_folder(tmp_path, "pred", (good * 50).astype(np.uint8), ".jpg"),
        "no_common": lambda: _renamed(_labels_folder(tmp_path, "pred", good)),
    }[case]()
    assert cli.main(["evaluate", "segmentation", "--pred", str(pred), "--gt", str(gt)]) == 2
    words = {"size": ["same size"], "float": ["not an instance mask"], "rgb": ["channels"], "binary": ["binary mask"],
             "jpeg": ["lossless"], "no_common": ["no file stem"]}[case]
    assert_one_line_error(capsys.readouterr().err, *words)


def _renamed(folder):
    (folder / "x.png").rename(folder / "y.png")
    return folder


def test_train_unet_bad_data_is_one_line(workspace, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(workspace["data"], bad)
    first = workspace["ids"][0]
    label = np.asarray(Image.open(bad / "labels" / f"{first}.png"))
    Image.fromarray(label[:200]).save(bad / "labels" / f"{first}.png")  # labels smaller than the image
    assert cli.main(["train", "unet", "--data", str(bad), "--epochs", "1", "--out", str(tmp_path / "m.keras")]) == 2
    assert_one_line_error(capsys.readouterr().err, "must match")
    tifffile.imwrite(bad / "labels" / f"{first}.tif", label.astype(np.float32))
    (bad / "labels" / f"{first}.png").unlink()
    assert cli.main(["train", "unet", "--data", str(bad), "--epochs", "1", "--out", str(tmp_path / "m.keras")]) == 2
    assert_one_line_error(capsys.readouterr().err, "integer")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    assert cli.main(["train", "unet", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m.keras")]) == 2
    assert_one_line_error(capsys.readouterr().err, "no images")
    assert cli.main(["train", "unet", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.keras")]) == 2
    assert_one_line_error(capsys.readouterr().err, "no such folder")
    assert not (tmp_path / "m.keras").exists()


def test_train_unet_refuses_to_write_into_its_data(workspace, capsys):
    assert cli.main(["train", "unet", "--data", str(workspace["data"]), "--out",
                     str(workspace["data"] / "m.keras")]) == 2
    assert_one_line_error(capsys.readouterr().err, "refusing")


@pytest.mark.parametrize("args", [["train", "unet"], ["segment"], ["evaluate", "segmentation"]])
def test_help_has_an_example(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--help"])
    assert exit_info.value.code == 0
    assert "example:" in capsys.readouterr().out
