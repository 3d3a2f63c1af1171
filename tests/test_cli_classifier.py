"""`cellkit train classifier`, `cellkit evaluate classifier` and `cellkit classify` on real PBC files.

One model is trained for one epoch on a small plain npz written from real PBC-28 images; the other commands use
it, `classify` in a fresh interpreter as a user runs it. Bad input must end in one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellkit import cli, datasets


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellkit.cli", *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))


def assert_one_line_error(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("error:"), err
    for word in words:
        assert word in err, err


@pytest.fixture(scope="module")
def workspace(real_data, tmp_path_factory):
    """A tiny npz of real PBC-28 images (20 per class) and a model trained on it for one epoch."""
    root = tmp_path_factory.mktemp("cli_classifier")
    data = datasets.load_pbc28("train")
    rng = np.random.default_rng(0)
    index = np.sort(np.concatenate([rng.permutation(np.flatnonzero(data.labels == c))[:20] for c in range(8)]))
    npz = root / "cells.npz"
    np.savez(npz, images=data.images[index], labels=data.labels[index], class_names=np.array(data.class_names))
    model = root / "models" / "lenet.keras"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # in this process: TensorFlow loads once for the whole module
        status = cli.main(["train", "classifier", "--model", "lenet", "--data", str(npz), "--epochs", "1",
                           "--crop", "200", "--out", str(model), "--quiet"])
    assert status == 0, stdout.getvalue()
    return {"root": root, "npz": npz, "model": model, "train_stdout": stdout.getvalue(),
            "class_names": list(data.class_names)}


@pytest.fixture(scope="module")
def pbc_files(workspace):
    """Real PBC JPEGs, one as a 16-bit grey TIFF and one as an RGBA PNG, and a corrupt file."""
    folder = workspace["root"] / "my_cells"
    folder.mkdir()
    table = pd.read_csv(datasets.require("pbc_jpg") / "labels.csv")
    picks = table.groupby("class_name").head(1).head(3)
    for rel in picks["path"]:
        shutil.copy(datasets.require("pbc_jpg") / rel, folder / rel.split("/")[-1])
    rgb = np.asarray(Image.open(datasets.require("pbc_jpg") / picks["path"].iloc[0]).convert("RGB"))
    tifffile.imwrite(folder / "grey16.tif", (rgb.mean(axis=2) * 257).astype(np.uint16))
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)]), "RGBA").save(folder / "rgba.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    return folder


def test_train_writes_the_model_and_its_metrics(workspace):
    assert workspace["model"].is_file()
    record = json.loads(workspace["model"].with_suffix(".json").read_text())
    assert record["model_info"]["class_names"] == workspace["class_names"]
    assert record["model_info"]["crop"] == 200 and record["model_info"]["preprocessing"] == "pm1"
    assert record["summary"]["epochs_run"] == 1 and record["summary"]["train_seconds"] > 0
    assert len(record["fit"]["epoch_end_seconds"]) == 1
    assert 0 < record["fit"]["epoch_end_seconds"][0] <= record["fit"]["seconds"]
    reached = next(line for line in workspace["train_stdout"].splitlines() if line.startswith("validation accuracy"))
    assert reached.endswith("never reached") or "first reached after" in reached, reached  # 1 epoch of lenet
    assert record["data"]["n_train"] + record["data"]["n_val"] + record["data"]["n_test"] == 160
    assert {"accuracy", "macro_f1", "per_class", "auc_ovr", "confusion_matrix", "n"} <= set(record["test"])
    assert "wrote" in workspace["train_stdout"]


def test_evaluate_writes_a_json_report(workspace, capsys):
    out = workspace["root"] / "scores.json"
    assert cli.main(["evaluate", "classifier", "--model", str(workspace["model"]), "--data", str(workspace["npz"]),
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"accuracy", "macro_f1", "per_class", "auc_ovr", "confusion_matrix", "n"} <= set(report)
    assert report["n"] == 160 and set(report["per_class"]) == set(workspace["class_names"])
    assert {"precision", "recall", "f1"} <= set(report["per_class"]["basophil"])
    assert "accuracy" in capsys.readouterr().out


def test_evaluate_on_a_class_folder_of_real_jpegs(workspace, tmp_path, capsys):
    source = datasets.require("pbc_jpg")
    table = pd.read_csv(source / "labels.csv").groupby("class_name").head(2)
    for rel in table["path"]:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        shutil.copy(source / rel, tmp_path / rel)
    assert cli.main(["evaluate", "classifier", "--model", str(workspace["model"]), "--data", str(tmp_path)]) == 0
    assert "on 16 images" in capsys.readouterr().out


def test_classify_real_files_of_any_mode_skips_the_corrupt_one(workspace, pbc_files):
    csv = workspace["root"] / "predictions.csv"
    result = run_cli("classify", "--model", str(workspace["model"]), str(pbc_files), "--csv", str(csv))
    assert result.returncode == 1  # one file failed
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: skipped") and "broken.jpg" in lines[0]
    assert lines[1] == "error: 1 of 6 files could not be read"
    table = pd.read_csv(csv)
    assert len(table) == 5 and {"grey16.tif", "rgba.png"} <= set(table["file"].map(lambda f: f.split("/")[-1]))
    assert set(table["class"]) <= set(workspace["class_names"])
    probabilities = table[[f"p_{c}" for c in workspace["class_names"]]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_classify_one_image(workspace, pbc_files, capsys):
    assert cli.main(["classify", "--model", str(workspace["model"]), str(pbc_files / "rgba.png")]) == 0
    out = capsys.readouterr().out
    assert "rgba.png" in out and any(name in out for name in workspace["class_names"])


@pytest.mark.parametrize("help_args", [["train", "classifier"], ["evaluate", "classifier"], ["classify"]])
def test_help_has_an_example(help_args, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*help_args, "--help"])
    assert info.value.code == 0 and "example" in capsys.readouterr().out


def test_unknown_model_is_one_line(capsys):
    assert cli.main(["train", "classifier", "--model", "lenet5"]) == cli.EXIT_BAD_INPUT
    assert_one_line_error(capsys.readouterr().err, "unknown model 'lenet5'", "lenet-original")


def test_image_size_too_small_for_the_model_is_one_line(capsys):
    assert cli.main(["train", "classifier", "--model", "lenet-original", "--size", "8"]) == cli.EXIT_BAD_INPUT
    assert_one_line_error(capsys.readouterr().err, "at least 14x14")


def test_folder_without_images_is_one_line(workspace, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no images here")
    assert cli.main(["classify", "--model", str(workspace["model"]), str(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert_one_line_error(capsys.readouterr().err, "no images found")


def test_label_outside_the_class_list_is_one_line(workspace, tmp_path, capsys):
    npz = tmp_path / "bad_labels.npz"
    np.savez(npz, images=np.zeros((3, 28, 28, 3), np.uint8), labels=np.array([0, 1, 9]))
    assert cli.main(["evaluate", "classifier", "--model", str(workspace["model"]), "--data", str(npz)]) == 2
    assert_one_line_error(capsys.readouterr().err, "label 9")
    folder = tmp_path / "cells"
    (folder / "macrophage").mkdir(parents=True)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(folder / "macrophage" / "m.png")
    assert cli.main(["evaluate", "classifier", "--model", str(workspace["model"]), "--data", str(folder)]) == 2
    assert_one_line_error(capsys.readouterr().err, "'macrophage' is not one of the model's classes")


def test_images_of_the_wrong_shape_are_one_line(workspace, tmp_path, capsys):
    npz = tmp_path / "four_channels.npz"
    np.savez(npz, images=np.zeros((3, 28, 28, 4), np.uint8), labels=np.array([0, 1, 2]))
    assert cli.main(["evaluate", "classifier", "--model", str(workspace["model"]), "--data", str(npz)]) == 2
    assert_one_line_error(capsys.readouterr().err, "(n, h, w, 3)")


def test_corrupt_model_file_is_one_line(tmp_path, pbc_files, capsys):
    model = tmp_path / "corrupt.keras"
    model.write_bytes(b"garbage")
    assert cli.main(["classify", "--model", str(model), str(pbc_files)]) == cli.EXIT_BAD_INPUT
    assert_one_line_error(capsys.readouterr().err, "not a .keras model file")


def test_image_size_the_vit_cannot_split_into_patches_is_one_line(capsys):
    assert cli.main(["train", "classifier", "--model", "vit", "--size", "30"]) == cli.EXIT_BAD_INPUT
    assert_one_line_error(capsys.readouterr().err, "'vit'", "multiple of 4")


def test_classify_csv_is_replaced_only_with_overwrite(workspace, pbc_files, tmp_path, capsys):
    csv = tmp_path / "p.csv"
    csv.write_text("my own table\n")
    assert cli.main(["classify", "--model", str(workspace["model"]), str(pbc_files / "rgba.png"), "--csv",
                     str(csv)]) == cli.EXIT_BAD_INPUT  # refused before the model loads
    assert_one_line_error(capsys.readouterr().err, "already exists", "--overwrite")
    assert csv.read_text() == "my own table\n"
    assert cli.main(["classify", "--model", str(workspace["model"]), str(pbc_files / "rgba.png"), "--csv", str(csv),
                     "--overwrite"]) == 0
    assert pd.read_csv(csv)["file"].tolist() == [str(pbc_files / "rgba.png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no temporary left


def test_evaluate_a_class_folder_skips_an_unreadable_image(workspace, tmp_path, capsys):
    source = datasets.require("pbc_jpg")
    table = pd.read_csv(source / "labels.csv").groupby("class_name").head(2)
    for rel in table["path"]:
        (tmp_path / "cells" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / rel, tmp_path / "cells" / rel)
    broken = tmp_path / "cells" / table["path"].iloc[0].split("/")[0] / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    out = tmp_path / "scores.json"
    assert cli.main(["evaluate", "classifier", "--model", str(workspace["model"]), "--data", str(tmp_path / "cells"),
                     "--json", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: skipped") and "broken.jpg" in lines[0], captured.err
    assert lines[1] == "error: 1 of 17 files could not be read and were left out"
    report = json.loads(out.read_text())
    assert report["n"] == 16 and report["n_unreadable"] == 1 and report["unreadable"] == [str(broken)]
    assert "on 16 images" in captured.out


def test_train_overwrite_replaces_the_model_and_its_record(workspace, pbc_files, tmp_path, capsys):
    model = tmp_path / "lenet.keras"
    shutil.copy(workspace["model"], model)
    shutil.copy(workspace["model"].with_suffix(".json"), model.with_suffix(".json"))
    old = model.read_bytes()
    command = ["train", "classifier", "--model", "lenet", "--data", str(workspace["npz"]), "--epochs", "1", "--crop",
               "200", "--out", str(model), "--quiet"]
    assert cli.main(command) == cli.EXIT_BAD_INPUT  # refused before the training
    assert_one_line_error(capsys.readouterr().err, "already exists", "--overwrite")
    assert cli.main([*command, "--overwrite"]) == 0
    assert model.read_bytes() != old
    assert json.loads(model.with_suffix(".json").read_text())["summary"]["epochs_run"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.json", "lenet.keras"]  # no temporary left
    assert cli.main(["classify", "--model", str(model), str(pbc_files / "rgba.png")]) == 0
