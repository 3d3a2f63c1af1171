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
    "05_transformations_vs_models": ("best_accuracy", "best_macro_f1", "basic_cnn_accuracy",
                                     "normalisation_gain_basic_cnn", "adam_minus_sgd_basic_cnn"),
    "06_transfer_learning_vgg16": ("transfer_accuracy", "transfer_macro_f1", "scratch_cnn_accuracy",
                                   "transfer_minus_scratch_accuracy", "label_curve_transfer_f1_10",
                                   "label_curve_scratch_f1_10", "label_curve_transfer_f1_100",
                                   "label_curve_scratch_f1_100", "label_curve_gain_f1_10",
                                   "label_curve_gain_f1_100", "imbalance_none_f1_imbalanced",
                                   "imbalance_none_f1_balanced"),
    "07_unet_segmentation": ("f1_iou50", "ap_iou50", "seg", "unet_minus_baseline_f1", "unet_minus_baseline_seg"),
    "08_automatic_labels": ("autolabel_object_f1", "autolabel_pixel_dice", "labels_trained_unet_f1",
                            "labels_trained_unet_f1_unfiltered", "unet_minus_labels_f1", "sim_unet_minus_labels_f1"),
    "09_clustering": ("subtype_ari", "subtype_nmi", "subtype_ari_ig", "subtype_ari_neutrophil", "class_ari",
                      "subtype_minus_size_ari", "dsb_atypical_enrichment"),
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


#: Notebooks whose exercises are still to be written (issue 27); the test below fails when one of them gets its
#: exercises, so that it leaves this set.
WITHOUT_EXERCISES_YET: set[str] = set()


def exercises(notebook) -> list[tuple[object, object]]:
    """The (task, solution) cell pairs after a notebook's ``## Exercises`` heading."""
    start = next((i for i, c in enumerate(notebook.cells)
                  if c.cell_type == "markdown" and c.source.startswith("## Exercises")), None)
    if start is None:
        return []
    cells = notebook.cells[start + 1:]
    return [(task, cells[i + 1] if i + 1 < len(cells) else None) for i, task in enumerate(cells)
            if task.cell_type == "markdown" and task.source.startswith("### Exercise")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_ends_with_exercises_whose_solutions_stay_hidden(path):
    """3 to 5 exercises, each a task followed by one solution cell that runs with the notebook (so the smoke run
    tests it) and stays folded in JupyterLab and on the course website until opened."""
    pairs = exercises(nbformat.read(path, as_version=4))
    if path.stem in WITHOUT_EXERCISES_YET:
        assert not pairs, f"{path.name} has exercises now: remove it from WITHOUT_EXERCISES_YET"
        return
    assert 3 <= len(pairs) <= 5, f"{path.name}: {len(pairs)} exercises after '## Exercises', expected 3 to 5"
    for number, (task, solution) in enumerate(pairs, start=1):
        assert task.source.startswith(f"### Exercise {number}"), f"{path.name}: exercise {number} is misnumbered"
        assert solution is not None and solution.cell_type == "code", f"{path.name}: exercise {number} has no solution"
        assert {"solution", "hide-cell"} <= set(solution.metadata.get("tags", [])), \
            f"{path.name}: exercise {number}'s solution needs the tags 'solution' and 'hide-cell'"
        folded = solution.metadata.get("jupyter", {})
        assert folded.get("source_hidden") and folded.get("outputs_hidden"), \
            f"{path.name}: exercise {number}'s solution must be folded (jupyter.source_hidden, outputs_hidden)"


def test_profiles_name_only_existing_notebooks():
    stems = {p.stem for p in NOTEBOOKS}
    for profile, entries in notebooks.load_profiles().items():
        assert set(entries) <= stems, f"profiles.yml {profile}: unknown notebooks {set(entries) - stems}"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile_on_real_data(path, real_data, smoke_executed, tmp_path, monkeypatch):
    monkeypatch.setenv("CELLKIT_FIGURES_DIR", str(tmp_path / "figures"))
    result = notebooks.run_notebook(path, "smoke", output_dir=smoke_executed, progress=False, timeout=600)
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
