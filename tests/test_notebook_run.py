"""The record a notebook writes, and the loud synthetic fallback when real data is missing."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from cellkit import notebooks


@pytest.fixture
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLKIT_FIGURES_DIR", str(tmp_path / "figures"))
    return tmp_path / "figures"


def test_metrics_json_records_what_was_used_and_measured(real_data, figures):
    run = notebooks.NotebookRun("99_demo", profile="smoke", seed=3, parameters={"n": 5})
    data = run.load("pbc28", split="val")
    run.record_split("pbc28", {"val": len(data)})
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    run.save_fig(fig, "line", close=True)
    path = run.finish(metrics={"mean": np.float32(0.5)}, headline={"accuracy": np.float64(0.75)})

    record = json.loads(path.read_text())
    assert path == figures / "smoke" / "99_demo" / "metrics.json"
    assert record["profile"] == "smoke" and record["seed"] == 3 and record["parameters"] == {"n": 5}
    assert record["datasets"]["pbc28:val"]["synthetic"] is False and record["datasets"]["pbc28:val"]["n"] == 1710
    assert record["synthetic_data"] is False
    assert record["headline"] == {"accuracy": 0.75} and record["metrics"] == {"mean": 0.5}
    assert record["figures"] == ["line.png"] and (figures / "smoke" / "99_demo" / "line.png").is_file()
    assert record["wall_time_s"] >= 0 and record["peak_memory_mb"] > 10
    assert record["versions"]["numpy"] == np.__version__
    assert record["git_commit"]
    assert "cellkit/notebooks.py" in record["code"] and "cellkit/datasets/loaders.py" in record["code"]


def test_missing_data_falls_back_loudly_and_stamps_figures(no_real_data, figures, capsys):
    run = notebooks.NotebookRun("99_demo", profile="smoke")
    with pytest.warns(UserWarning, match="synthetic stand-in"):
        data = run.load("pbc28", split="train")
    assert data.is_synthetic and data.images.shape[1:] == (28, 28, 3) and len(data.class_names) == 8
    assert "USING SYNTHETIC STAND-IN DATA" in capsys.readouterr().err

    fig, ax = plt.subplots()
    ax.imshow(data.images[0])
    run.save_fig(fig, "example", close=True)
    assert any(t.get_text().startswith("SYNTHETIC") for t in fig.texts)
    record = json.loads(run.finish(metrics={}, headline={}).read_text())
    assert record["synthetic_data"] is True and "cellkit data fetch pbc" in record["datasets"]["pbc28:train"]["reason"]


def test_segmentation_stand_in_has_exact_masks(no_real_data, figures):
    run = notebooks.NotebookRun("99_demo", profile="smoke")
    with pytest.warns(UserWarning):
        data = run.load("dsb2018")
    assert data.is_synthetic and len(data) > 0
    assert data.labels[0].dtype == np.uint16 and data.labels[0].max() > 0


def test_no_fallback_when_synthetic_is_not_allowed(no_real_data, figures):
    run = notebooks.NotebookRun("99_demo", allow_synthetic=False)
    with pytest.raises(notebooks.DatasetNotFound):
        run.load("dsb2018")


def test_profile_parameters_include_the_profile_and_its_overrides():
    params = notebooks.profile_parameters("01_eda", "smoke")
    assert params["profile"] == "smoke"
    with pytest.raises(ValueError, match="unknown profile"):
        notebooks.profile_parameters("01_eda", "huge")


def test_strip_outputs_removes_outputs(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    cell.execution_count = 1
    notebook.cells.append(cell)
    path = tmp_path / "n.ipynb"
    nbformat.write(notebook, path)
    assert notebooks.strip_outputs(path) is True
    stripped = nbformat.read(path, as_version=4).cells[0]
    assert stripped.outputs == [] and stripped.execution_count is None
    assert notebooks.strip_outputs(path) is False


def test_a_run_reports_whether_its_record_used_the_stand_in(no_real_data, figures):
    import time

    started = time.time() - 1
    assert notebooks.recorded_synthetic("99_demo", "smoke", started) is None  # nothing written yet
    run = notebooks.NotebookRun("99_demo", profile="smoke")
    with pytest.warns(UserWarning):
        run.load("pbc28", split="train")
    run.finish(metrics={}, headline={})
    assert notebooks.recorded_synthetic("99_demo", "smoke", started) is True
    assert notebooks.recorded_synthetic("99_demo", "smoke", time.time() + 60) is None  # an older record


def test_the_summary_marks_notebooks_that_ran_on_the_stand_in(monkeypatch, tmp_path, capsys):
    from cellkit import cli

    ran = {"01_eda": True, "03_handcrafted_features_random_forest": False}
    monkeypatch.setattr(notebooks, "run_notebook", lambda path, profile, **options: notebooks.NotebookResult(
        path.stem, profile, 1.0, tmp_path / path.name, None, ran[path.stem]))
    assert cli.main(["run-notebooks", "--profile", "smoke", "--only", "01", "03", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "01_eda" in out and "SIMULATED stand-in" in out and out.count("  real") == 1
    assert err.startswith("WARNING: 1 notebook(s) ran on the simulated stand-in") and "01_eda" in err
