"""cellkit.study: the folds and inner split, the scaled blur, and the verdicts on report 000's claims from paired
differences on the same test images, on hand-made predictions whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from cellkit import classifiers, datasets, metrics, study, training
from cellkit.study import Cell

CNN = Cell("basic-cnn", "normalised")
RAW = Cell("basic-cnn", "raw")


def _predictions(y_true: np.ndarray, correct: int, rng: np.random.Generator) -> np.ndarray:
    """Predictions right on exactly ``correct`` of the images (chosen at random), wrong on the others."""
    pred = (y_true + 1) % 8
    right = rng.choice(len(y_true), correct, replace=False)
    pred[right] = y_true[right]
    return pred


@pytest.fixture(scope="module")
def planted():
    """2,000 test images; normalised right on 1,900 (0.95), raw on 1,500 (0.75), blur on the same images as
    normalised but 10 more (0.955, a 0.5-point difference)."""
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 8, 2000)
    normalised = _predictions(y_true, 1900, rng)
    blur = normalised.copy()
    wrong = np.flatnonzero(normalised != y_true)[:10]
    blur[wrong] = y_true[wrong]
    return y_true, {CNN: normalised, RAW: _predictions(y_true, 1500, rng), Cell("basic-cnn", "gaussian_blur"): blur}


def _rows(planted, claims):
    y_true, predicted = planted
    return study.claim_verdicts(predicted, y_true, claims)


def test_a_planted_difference_of_the_claimed_sign_holds(planted):
    row = _rows(planted, [study.Claim("normalisation helps", CNN, RAW, +1)])[0]
    assert row["comparison"] == "basic-cnn/normalised - basic-cnn/raw"
    assert row["here (points)"] == 20.0
    low, high = row["95% interval (points)"]
    assert 15 < low < 20 < high < 25
    assert row["verdict"] == "holds"


def test_the_opposite_sign_is_reversed(planted):
    row = _rows(planted, [study.Claim("raw helps", RAW, CNN, +1)])[0]
    assert (row["here (points)"], row["verdict"]) == (-20.0, "reversed")


def test_a_model_compared_with_itself_is_not_resolved(planted):
    row = _rows(planted, [study.Claim("same", CNN, CNN, +1)])[0]
    assert row["here (points)"] == 0.0 and row["95% interval (points)"] == [0.0, 0.0]
    assert row["verdict"] == "not resolved at this budget"


def test_a_consistent_small_difference_is_resolved_by_pairing(planted):
    # blur is right wherever normalised is, plus 10 images: every resample keeps the sign, so +0.5 points holds,
    # though the two accuracies' own intervals (about +-1 point each) overlap
    row = _rows(planted, [study.Claim("blur helps", Cell("basic-cnn", "gaussian_blur"), CNN, +1)])[0]
    assert row["here (points)"] == 0.5 and row["95% interval (points)"][0] > 0
    assert row["verdict"] == "holds"


def test_a_cell_not_run_says_so(planted):
    row = _rows(planted, [study.Claim("canny", Cell("basic-cnn", "canny"), CNN, -1)])[0]
    assert row["here (points)"] is None and row["95% interval (points)"] is None
    assert row["verdict"] == "not run in this profile"


def test_claim_verdict_on_its_boundaries():
    def interval(low, high):
        return metrics.Interval((low + high) / 2, low, high, 0.95, 100, 10)

    assert study.claim_verdict(interval(0.0, 0.02), +1) == "not resolved at this budget"  # 0 inside
    assert study.claim_verdict(interval(0.001, 0.02), +1) == "holds"
    assert study.claim_verdict(interval(0.001, 0.02), -1) == "reversed"
    assert study.claim_verdict(interval(-0.02, -0.001), -1) == "holds"
    assert study.claim_verdict(None, +1) == "not run in this profile"


def test_report_claims_name_models_and_inputs_of_the_study():
    assert len(study.REPORT000_CLAIMS) == 17
    for claim in study.REPORT000_CLAIMS:
        for cell in (claim.a, claim.b):
            assert cell.input in study.STUDY_INPUTS and cell.optimizer in ("adam", "sgd")
            classifiers.spec(cell.model)  # raises for an unknown model
        assert claim.sign in (+1, -1)
    cells = study.cells_of(study.REPORT000_CLAIMS)
    assert len(cells) == len(set(cells)) and Cell("basic-cnn", "normalised", "sgd") in cells


def test_scaled_blur_kernel_keeps_report_000s_share_of_the_cell():
    assert study.scaled_blur_kernel(50) == 25  # the report's own size
    assert study.scaled_blur_kernel(28) == 13  # OpenCV's sigma 2.3 px = 4.1 px x 28 / 50
    assert study.scaled_blur_kernel(100) == 53  # sigma 8.2 px
    assert all(study.scaled_blur_kernel(size) % 2 == 1 for size in range(1, 200))
    with pytest.raises(ValueError, match="positive"):
        study.scaled_blur_kernel(0)


def test_inner_split_is_a_stratified_part_of_the_training_fold_only():
    labels = np.repeat(np.arange(4), 40)
    (train, held), *_ = study.kfold_indices(labels, 4, seed=1)
    fit_index, val_index = study.inner_split(train, labels, 0.25, seed=1)
    assert set(fit_index) | set(val_index) == set(train) and not set(fit_index) & set(val_index)
    assert not (set(fit_index) | set(val_index)) & set(held)  # the held-out fold is never used in training
    assert np.bincount(labels[val_index]).tolist() == [7, 8, 7, 8] or np.ptp(np.bincount(labels[val_index])) <= 1
    with pytest.raises(ValueError, match="between 0 and 1"):
        study.inner_split(train, labels, 1.0)


def test_kfold_holds_out_every_index_once():
    labels = np.repeat(np.arange(3), 10)
    held = np.concatenate([h for _, h in study.kfold_indices(labels, 5, seed=0)])
    assert sorted(held.tolist()) == list(range(30))
    with pytest.raises(datasets.DataError, match="at least 12 images"):
        study.kfold_indices(labels, 12)


def test_best_cell_is_chosen_on_held_out_folds_not_the_test():
    rows = [{"model": "basic-cnn", "input": name, "optimizer": "adam", "fold": fold, "cv_accuracy": accuracy}
            for name, accuracies in (("raw", (0.5, 0.6)), ("sobel", (0.9, 0.8))) for fold, accuracy in
            enumerate(accuracies, 1)]
    table = study.study_table(rows)
    assert study.best_cell(table) == Cell("basic-cnn", "sobel")
    assert table.loc[("basic-cnn", "sobel", "adam"), "folds"] == 2
    assert table.loc[("basic-cnn", "raw", "adam"), "cv_accuracy_sd"] == pytest.approx(0.0707, abs=1e-4)


def test_scores_on_test_carry_intervals_around_the_estimate(planted):
    y_true, predicted = planted
    rows = study.scores_on_test(predicted, y_true, 8, n_resamples=500)
    first = rows[0]
    assert first["test_accuracy"] == pytest.approx(0.95)
    low, high = first["test_accuracy_ci"]
    assert low < 0.95 < high and high - low < 0.03
    assert first["test_macro_f1_ci"][0] <= first["test_macro_f1"] <= first["test_macro_f1_ci"][1]


def test_a_cell_trains_on_the_inner_split_and_its_fold_models_predict_later():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 12)
    images = rng.integers(0, 60, (24, 8, 8, 3)).astype(np.uint8)
    images[labels == 1] += 120  # bright class 1: learnable in a few epochs
    pool = datasets.ImageSet(images, labels, ["dark", "bright"])
    config = training.FitConfig(epochs=2, batch_size=8, patience=1, monitor="val_loss")
    run = study.cross_validate(Cell("basic-cnn", "normalised"), pool, folds=2, config=config, precision="float32",
                               crop=None, throughput_seconds=0, fold_limit=1)
    (row,) = run.rows
    assert (row["n_fit"] + row["n_inner_val"], row["n_held_out"]) == (12, 12) and row["monitor"] == "val_loss"
    assert len(run.weights) == 1 and row["epochs_run"] <= 2 and row["images_per_second"] is None
    predicted = study.read_test_once([run], pool)
    assert predicted[run.cell].shape == (24,) and set(predicted[run.cell]) <= {0, 1}


def test_the_final_model_of_a_cell_learns_from_every_training_image():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2), 20)
    images = rng.integers(0, 60, (40, 8, 8, 3)).astype(np.uint8)
    images[labels == 1] += 120  # bright class 1: learnable in a few epochs
    train = datasets.ImageSet(images[::2].copy(), labels[::2].copy(), ["dark", "bright"])
    val = datasets.ImageSet(images[1::2].copy(), labels[1::2].copy(), ["dark", "bright"])
    config = training.FitConfig(epochs=8, batch_size=4, patience=8, monitor="val_loss")
    final = study.train_final(Cell("basic-cnn", "raw"), train, val, config, precision="float32", seed=0, crop=None)
    (row,) = final.rows
    assert (row["n_fit"], row["n_val"], row["epochs_run"], len(final.weights)) == (20, 20, 8, 1)
    assert len(row["history"]["val_loss"]) == 8 and "cv_accuracy" not in row
    predicted = study.read_test_once([final], val)[final.cell]
    assert np.mean(predicted == val.labels) >= 0.9  # the classes differ by 120 grey levels


def test_budget_config_caps_a_models_epochs_and_sets_sgds_rate():
    config = training.FitConfig(epochs=60, batch_size=64, patience=5, monitor="val_loss")
    resnet50 = study.budget_config(Cell("resnet50", "normalised"), config, {"resnet50": 2}, 0.01)
    sgd = study.budget_config(Cell("basic-cnn", "normalised", "sgd"), config, {"resnet50": 2}, 0.01)
    assert (resnet50.epochs, resnet50.learning_rate) == (2, config.learning_rate)
    assert (sgd.epochs, sgd.learning_rate) == (60, 0.01)
    assert study.budget_config(CNN, config) == config


def test_a_cell_that_had_not_flattened_leaves_its_claims_unresolved(planted):
    y_true, predicted = planted
    claim = study.Claim("normalisation helps", CNN, RAW, +1)
    row = study.claim_verdicts(predicted, y_true, [claim], unflattened=[RAW])[0]
    assert row["here (points)"] == 20.0 and row["95% interval (points)"][0] > 0  # the interval alone says "holds"
    assert row["verdict"] == "not resolved at this budget"
    assert row["why"] == "basic-cnn/raw reached the epoch limit before the validation loss flattened"
    assert study.claim_verdicts(predicted, y_true, [claim])[0]["why"] == ""


def test_unflattened_cells_are_those_with_a_fold_that_ran_out_of_epochs():
    def run(cell, *stopped):
        return study.CellRun(cell, [{"stopped_early": flag} for flag in stopped], [])

    runs = [run(CNN, True, True), run(RAW, True, False), run(Cell("vit", "normalised"), False)]
    assert study.unflattened_cells(runs) == [RAW, Cell("vit", "normalised")]
