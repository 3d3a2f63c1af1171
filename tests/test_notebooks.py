"""Every numbered notebook executes in the smoke profile on real data, and records plausible numbers.

A notebook that exists but has no expected ranges fails the suite, so none can be added unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from cellkit import notebooks

EXPECTATIONS = yaml.safe_load((Path(__file__).parent / "notebook_expectations.yml").read_text()) or {}
NOTEBOOKS = notebooks.notebook_paths()
REQUIRED_FIELDS = {
    "notebook", "profile", "seed", "synthetic_data", "datasets", "splits", "parameters", "headline", "metrics",
    "figures", "wall_time_s", "peak_memory_mb", "versions", "git_commit",
}  # fmt: skip
#: Headline numbers that must carry a 95 % interval (``<name>_ci``: [low, high]) in the notebook's metrics.json.
INTERVALS = {
    "03_handcrafted_features_random_forest": ("rf_accuracy", "rf_macro_f1"),
    "04_cnn_lenet_alexnet": ("best_accuracy", "best_macro_f1", "best_minus_lenet_original"),
    "06_transfer_learning_vgg16": ("transfer_accuracy", "transfer_macro_f1", "scratch_accuracy"),
    "07_unet_segmentation": ("f1_iou50", "ap_iou50", "seg", "unet_minus_baseline_f1", "unet_minus_baseline_seg"),
}


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_expectations(path):
    assert path.stem in EXPECTATIONS, f"{path.name} has no ranges in tests/notebook_expectations.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {index} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_contract(path):
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    assert 'profile = "default"' in tagged[0].source
    overrides = notebooks.load_profiles()
    for profile in notebooks.PROFILES:
        for name in overrides[profile].get(path.stem) or {}:
            assert f"{name} =" in tagged[0].source, f"profiles.yml sets {name!r}, not in {path.name}'s parameters"


def test_profiles_name_only_existing_notebooks():
    stems = {p.stem for p in NOTEBOOKS}
    for profile, entries in notebooks.load_profiles().items():
        assert set(entries) <= stems, f"profiles.yml {profile}: unknown notebooks {set(entries) - stems}"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile_on_real_data(path, real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLKIT_FIGURES_DIR", str(tmp_path / "figures"))
    result = notebooks.run_notebook(path, "smoke", output_dir=tmp_path / "executed", progress=False, timeout=600)
    assert result.ok, f"{path.name} failed: {result.error} (executed copy: {result.output})"

    figures = tmp_path / "figures" / "smoke" / path.stem  # smoke runs keep out of figures/<notebook>/
    record = json.loads((figures / "metrics.json").read_text())
    assert REQUIRED_FIELDS <= set(record), f"metrics.json lacks {REQUIRED_FIELDS - set(record)}"
    assert record["profile"] == "smoke"
    # papermill silently keeps the defaults when it cannot parse the parameters cell: check the overrides arrived
    for name, value in notebooks.load_profiles()["smoke"].get(path.stem, {}).items():
        assert record["parameters"].get(name) == value, f"smoke override {name}={value!r} did not reach the notebook"
    assert record["synthetic_data"] is False, "the smoke run must use the real data, not the synthetic stand-in"
    assert record["figures"], "the notebook saved no figures"
    for figure in record["figures"]:
        assert (figures / figure).is_file()
    for name, (low, high) in EXPECTATIONS[path.stem].items():
        value = record["headline"].get(name)
        assert value is not None, f"headline {name!r} missing from {path.stem}'s metrics.json"
        assert low <= value <= high, f"{path.stem}: {name} = {value}, expected within [{low}, {high}]"
    for name in INTERVALS.get(path.stem, ()):
        assert f"{name}_ci" in record["headline"], f"{path.stem}: headline {name!r} has no interval"
    for name, bounds in record["headline"].items():
        if name.endswith("_ci"):
            low, high = bounds
            assert low <= record["headline"][name[:-3]] <= high, f"{path.stem}: {name} {bounds} misses its estimate"
