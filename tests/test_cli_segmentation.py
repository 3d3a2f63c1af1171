"""`cellkit train unet`, `cellkit segment` and `cellkit evaluate segmentation` on real DSB 2018 files.

One tiny U-Net (4 filters) is trained for a few steps on a small folder of real DSB images through the command
line; the other commands use it. Bad input must end in one line (a per-file warning for `segment`), never a
traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

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
    assert report["n_images"] == 4 and [row["thresh"] for row in report["iou_sweep"]][:2] == [0.5, 0.55]
    assert "4 reference file(s) without a counterpart" in captured.err  # the 8 labels vs 4 predictions
    # the reference against itself is perfect
    assert cli.main(["evaluate", "segmentation", "--pred", str(workspace["data"] / "labels"), "--gt",
                     str(workspace["data"] / "labels"), "--json", str(tmp_path / "self.json")]) == 0
    self_report = json.loads((tmp_path / "self.json").read_text())
    assert self_report["f1"] == 1.0 and self_report["seg"] == 1.0


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
