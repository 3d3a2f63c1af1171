"""cellkit.study's verdicts on report 000's claims, on hand-made tables whose answers are known."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cellkit import classifiers, study


def _table(accuracies: dict[tuple[str, str], list[float]]):
    """A :func:`study.study_table` of hand-made folds: (model, input) -> held-out accuracy of each fold."""
    rows = [{"model": model, "input": input_name, "fold": fold + 1, "cv_accuracy": accuracy}
            for (model, input_name), folds in accuracies.items() for fold, accuracy in enumerate(folds)]
    return study.study_table(rows)


def _claim(said, a, b, sign):
    return study.Claim(said, *a, *b, sign)


def _by_claim(rows):
    return {row["report 000 said"]: row for row in rows}


NORMALISED = ("basic-cnn", "normalised")


@pytest.fixture(scope="module")
def two_folds():
    # every cell: fold sd 0.0141; differences from normalised (mean 0.61): raw -0.20, blur +0.10, sobel +0.01
    return _table({NORMALISED: [0.60, 0.62], ("basic-cnn", "raw"): [0.40, 0.42],
                   ("basic-cnn", "gaussian_blur"): [0.70, 0.72], ("basic-cnn", "sobel"): [0.61, 0.63]})


def test_a_difference_of_the_claimed_sign_larger_than_the_spread_holds(two_folds):
    row = study.claim_verdicts(two_folds, [_claim("normalisation helps", NORMALISED, ("basic-cnn", "raw"), +1)])[0]
    assert row == {"report 000 said": "normalisation helps", "comparison": "basic-cnn/normalised - basic-cnn/raw",
                   "here (points)": 20.0, "fold sd (points)": 1.4, "verdict": "holds"}


def test_the_opposite_sign_beyond_the_spread_does_not_hold(two_folds):
    rows = study.claim_verdicts(two_folds, [_claim("blur hurts", ("basic-cnn", "gaussian_blur"), NORMALISED, -1)])
    assert (rows[0]["here (points)"], rows[0]["verdict"]) == (10.0, "does not hold")


def test_a_difference_within_the_spread_is_unclear_whatever_its_sign(two_folds):
    for sign in (+1, -1):
        row = study.claim_verdicts(two_folds, [_claim("sobel", ("basic-cnn", "sobel"), NORMALISED, sign)])[0]
        assert (row["here (points)"], row["verdict"]) == (1.0, "unclear (within the fold spread)")


def test_a_cell_not_in_the_table_was_not_run(two_folds):
    row = study.claim_verdicts(two_folds, [_claim("canny", ("basic-cnn", "canny"), NORMALISED, -1)])[0]
    assert row["here (points)"] is None and row["fold sd (points)"] is None  # None: not measured (JSON null)
    assert row["verdict"] == "not run in this profile"


def test_one_fold_has_no_spread_so_every_difference_is_unclear():
    table = _table({NORMALISED: [0.9], ("basic-cnn", "raw"): [0.1]})
    row = study.claim_verdicts(table, [_claim("normalisation helps", NORMALISED, ("basic-cnn", "raw"), +1)])[0]
    assert (row["here (points)"], row["fold sd (points)"]) == (80.0, 0.0)
    assert row["verdict"] == "unclear (one fold, no spread)"


def test_the_fewer_folds_of_the_two_cells_decide():
    table = _table({NORMALISED: [0.9, 0.9], ("basic-cnn", "raw"): [0.1]})
    assert study.accuracy_gap(table, NORMALISED, ("basic-cnn", "raw")) == (pytest.approx(0.8), 0.0, 1)


def test_claim_verdict_rule_on_its_boundaries():
    assert study.claim_verdict(0.02, 0.02, 2, +1) == "unclear (within the fold spread)"  # must exceed the spread
    assert study.claim_verdict(0.021, 0.02, 2, +1) == "holds"
    assert study.claim_verdict(0.021, 0.02, 2, -1) == "does not hold"
    assert study.claim_verdict(None, None, 0, +1) == "not run in this profile"


def test_sgd_against_adam_rows_follow_the_claims():
    optimisers = pd.DataFrame([
        {"model": "basic-cnn", "optimizer": "adam", "val accuracy change per epoch": 0.02},
        {"model": "basic-cnn", "optimizer": "sgd", "val accuracy change per epoch": 0.05},
        {"model": "resnet18", "optimizer": "adam", "val accuracy change per epoch": 0.04},
        {"model": "resnet18", "optimizer": "sgd", "val accuracy change per epoch": 0.01},
        {"model": "vit", "optimizer": "adam", "val accuracy change per epoch": float("nan")},
        {"model": "vit", "optimizer": "sgd", "val accuracy change per epoch": float("nan")},
    ])
    rows = _by_claim(study.claim_verdicts(_table({NORMALISED: [0.5]}), [], optimisers))
    cnn, resnet, vit = (rows[f"SGD fluctuates more than Adam ({m})"] for m in ("basic-cnn", "resnet18", "vit"))
    assert (cnn["here (points)"], cnn["fold sd (points)"], cnn["verdict"]) == (3.0, None, "holds")
    assert (resnet["here (points)"], resnet["verdict"]) == (-3.0, "does not hold")
    assert math.isnan(vit["here (points)"]) and vit["verdict"] == "unclear (one epoch)"  # one epoch: no change


def test_no_optimiser_comparison_adds_no_rows(two_folds):
    assert study.claim_verdicts(two_folds, [], None) == []
    assert study.claim_verdicts(two_folds, [], pd.DataFrame()) == []
    assert study.fluctuation_verdicts(None) == []


def test_report_claims_name_models_and_inputs_of_the_study():
    assert len(study.REPORT000_CLAIMS) == 12
    for claim in study.REPORT000_CLAIMS:
        assert claim.input_a in study.STUDY_INPUTS and claim.input_b in study.STUDY_INPUTS
        classifiers.spec(claim.model_a), classifiers.spec(claim.model_b)  # raises for an unknown model
        assert claim.sign in (+1, -1)


def test_the_full_report_table_has_one_row_per_claim_in_order(two_folds):
    rows = study.claim_verdicts(two_folds)
    assert [r["report 000 said"] for r in rows] == [c.said for c in study.REPORT000_CLAIMS]
    verdicts = {r["report 000 said"]: r["verdict"] for r in rows}
    assert verdicts["normalisation helps (basic CNN: precision doubled)"] == "holds"
    assert verdicts["Gaussian blur hurts the basic CNN (-0.5 to -0.7%)"] == "does not hold"
    assert verdicts["Sobel hurts the basic CNN (-0.5 to -0.7%)"] == "unclear (within the fold spread)"
    assert verdicts["ViT beats ResNet-18 by about 4%"] == "not run in this profile"
