"""Tests of cellkit.metrics on hand-made label images whose answers are known, and on one real DSB label file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from skimage.segmentation import find_boundaries
from sklearn import metrics as skm

from cellkit import metrics, synthetic

SHAPE = (40, 60)
DSB_ID = "212b858a66f0d23768b8e3e1357704fc2f4cf4bbe7eed8cd59b5d01031d553e6"  # 520x696, 100 nuclei


def boxes(*rects: tuple[int, int, int, int], shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Label image with object i + 1 filling rows r0:r1, columns c0:c1 of rects[i] = (r0, r1, c0, c1)."""
    labels = np.zeros(shape, dtype=np.uint16)
    for i, (r0, r1, c0, c1) in enumerate(rects):
        labels[r0:r1, c0:c1] = i + 1
    return labels


def three_nuclei() -> np.ndarray:
    return boxes((2, 12, 2, 12), (2, 12, 20, 30), (20, 35, 40, 55))


# ---------------------------------------------------------------- perfect and empty predictions


def test_perfect_prediction_scores_one_everywhere():
    gt = three_nuclei()
    assert all(metrics.pixel_metrics(gt, gt)[k] == 1.0 for k in ("accuracy", "precision", "recall", "dice", "iou"))
    obj = metrics.object_metrics(gt, gt)
    assert (obj["precision"], obj["recall"], obj["dice"], obj["iou"]) == (1.0, 1.0, 1.0, 1.0)
    assert metrics.seg_score(gt, gt) == 1.0
    match = metrics.match_instances(gt, gt, thresh=0.9)
    assert (match["tp"], match["fp"], match["fn"]) == (3, 0, 0)
    assert all(match[k] == 1.0 for k in ("precision", "recall", "f1", "ap", "pq", "mean_iou"))
    sweep = metrics.match_dataset([gt, gt], [gt, gt])
    assert all(row["ap"] == 1.0 and row["tp"] == 6 for row in sweep["table"])


def test_empty_prediction_scores_zero():
    gt, empty = three_nuclei(), np.zeros(SHAPE, dtype=np.uint16)
    pixel = metrics.pixel_metrics(empty, gt)
    assert (pixel["precision"], pixel["recall"], pixel["dice"], pixel["iou"]) == (0.0, 0.0, 0.0, 0.0)
    assert pixel["accuracy"] == 1 - np.count_nonzero(gt) / gt.size
    obj = metrics.object_metrics(empty, gt)
    assert (obj["tp"], obj["fp"], obj["fn"], obj["recall"]) == (0, 0, 3, 0.0)
    assert metrics.seg_score(empty, gt) == 0.0
    match = metrics.match_instances(empty, gt)
    assert (match["tp"], match["fn"], match["ap"], match["pq"]) == (0, 3, 0.0, 0.0)


def test_both_empty_is_perfect_but_seg_is_undefined():
    empty = np.zeros(SHAPE, dtype=np.int32)
    assert metrics.pixel_metrics(empty, empty)["dice"] == 1.0
    assert metrics.pixel_metrics(empty, empty)["iou"] == 1.0
    assert metrics.object_metrics(empty, empty)["dice"] == 1.0
    assert metrics.match_instances(empty, empty)["ap"] == 1.0
    assert math.isnan(metrics.seg_score(empty, empty))
    # a prediction where there is nothing to find: no hit, so precision is 0
    assert metrics.match_instances(three_nuclei(), empty)["precision"] == 0.0


# ---------------------------------------------------------------- known IoU, SEG's strict half rule


def test_shifted_square_has_iou_one_third():
    gt = boxes((0, 10, 0, 10))
    pred = boxes((0, 10, 5, 15))  # overlaps 10x5 = 50 px, union 150 px
    assert metrics.pixel_metrics(pred, gt)["iou"] == pytest.approx(1 / 3)
    assert metrics.pixel_metrics(pred, gt)["dice"] == pytest.approx(0.5)
    assert metrics.match_instances(pred, gt, thresh=0.3)["mean_iou"] == pytest.approx(1 / 3)
    assert metrics.match_instances(pred, gt, thresh=0.3)["tp"] == 1
    assert metrics.match_instances(pred, gt, thresh=0.34)["tp"] == 0


def test_seg_needs_strictly_more_than_half_of_the_reference():
    gt = boxes((0, 10, 0, 10))  # |R| = 100
    half = boxes((0, 10, 5, 15))  # covers exactly 50 pixels of R
    assert metrics.seg_score(half, gt) == 0.0
    one_more = half.copy()
    one_more[0, 4] = 1  # 51 pixels of R; |S| = 101, |R u S| = 150
    assert metrics.seg_score(one_more, gt) == pytest.approx(51 / 150)


# ---------------------------------------------------------------- merges and splits


def test_merged_prediction_covering_two_nuclei():
    gt = boxes((0, 10, 0, 10), (0, 10, 11, 21))  # two 100-px nuclei one column apart
    merged = boxes((0, 10, 0, 21))  # one 210-px segment over both
    # SEG: both references are more than half covered by the same segment, J = 100 / 210 each
    assert metrics.seg_score(merged, gt) == pytest.approx(100 / 210)
    # matching is one-to-one: at most one true positive
    match = metrics.match_instances(merged, gt, thresh=0.3)
    assert (match["tp"], match["fp"], match["fn"]) == (1, 0, 1)
    assert metrics.match_instances(merged, gt, thresh=0.5)["tp"] == 0
    # report 003's object counts: one predicted object touching ground truth, no object missed
    obj = metrics.object_metrics(merged, gt)
    assert (obj["tp"], obj["fp"], obj["fn"], obj["gt_detected"]) == (1, 0, 0, 2)


def test_split_prediction():
    gt = boxes((0, 10, 0, 20))  # one 200-px nucleus
    split = boxes((0, 10, 0, 11), (0, 10, 11, 20))  # 110 px and 90 px, touching
    assert metrics.seg_score(split, gt) == pytest.approx(110 / 200)
    match = metrics.match_instances(split, gt, thresh=0.5)
    assert (match["tp"], match["fp"], match["fn"], match["precision"], match["ap"]) == (1, 1, 0, 0.5, 0.5)
    even = boxes((0, 10, 0, 10), (0, 10, 10, 20))  # halves: neither covers more than half
    assert metrics.seg_score(even, gt) == 0.0
    # connected components join the touching halves again; as label images they stay two objects
    assert metrics.object_metrics(split, gt)["n_pred"] == 1
    labelled = metrics.object_metrics(split, gt, components=False)
    assert (labelled["tp"], labelled["fp"], labelled["fn"], labelled["n_pred"]) == (2, 0, 0, 2)


def test_object_metrics_follow_report_003():
    gt = boxes((0, 10, 0, 10), (20, 30, 0, 10), (20, 30, 30, 40))
    pred = boxes((2, 8, 5, 15), (0, 5, 40, 50), (22, 28, 32, 38))  # hit, false positive, hit; one nucleus missed
    obj = metrics.object_metrics(pred, gt)
    assert (obj["tp"], obj["fp"], obj["fn"]) == (2, 1, 1)
    assert obj["precision"] == pytest.approx(2 / 3)
    assert obj["recall"] == pytest.approx(2 / 3)
    assert obj["dice"] == pytest.approx(4 / 6)
    assert obj["iou"] == pytest.approx(2 / 4)
    # binary masks (bool, or float 0/1) are accepted and give the same counts
    assert metrics.object_metrics(pred > 0, (gt > 0).astype(float)) == obj


def test_connectivity_decides_whether_diagonal_pixels_join():
    gt = np.zeros((4, 4), dtype=np.uint8)
    gt[0, 0] = gt[1, 1] = 1
    assert metrics.object_metrics(gt, gt)["n_gt"] == 1
    assert metrics.object_metrics(gt, gt, connectivity=1)["n_gt"] == 2


# ---------------------------------------------------------------- matching: optimal assignment, sweep, PQ


def test_matching_maximises_the_number_of_matches_below_half():
    a_b = np.zeros((1, 20), dtype=np.int32)
    a_b[0, :10], a_b[0, 10:] = 1, 2  # A = [0, 10), B = [10, 20)
    x_y = np.zeros((1, 20), dtype=np.int32)
    x_y[0, 4:14], x_y[0, :4] = 1, 2  # X: IoU 6/14 with A, 4/16 with B; Y: IoU 4/10 with A
    # greedy by IoU would pair X with A and leave two objects unmatched; the optimum pairs X-B and Y-A
    match = metrics.match_instances(x_y, a_b, thresh=0.25)
    assert (match["tp"], match["fp"], match["fn"]) == (2, 0, 0)
    assert match["sum_iou"] == pytest.approx(0.25 + 0.4)


def test_panoptic_quality_on_a_known_case():
    gt = boxes((0, 10, 0, 10), (20, 30, 20, 30))
    pred = boxes((0, 10, 0, 8), (0, 10, 40, 50))  # IoU 0.8 with the first nucleus; one FP, one FN
    match = metrics.match_instances(pred, gt, thresh=0.5)
    assert (match["tp"], match["fp"], match["fn"]) == (1, 1, 1)
    assert match["pq"] == pytest.approx(0.8 / (1 + 0.5 + 0.5))
    assert match["pq"] == pytest.approx(match["mean_iou"] * match["f1"])
    assert match["ap"] == pytest.approx(1 / 3)


def eroded(labels: np.ndarray) -> np.ndarray:
    """Every object shrunk by its one-pixel inner boundary."""
    out = labels.copy()
    out[find_boundaries(labels, mode="inner")] = 0
    return out


def test_iou_sweep_never_gains_true_positives():
    gt = boxes((2, 12, 2, 12), (2, 14, 20, 32), (20, 34, 2, 16), (20, 36, 30, 46))
    pred = eroded(gt)  # IoUs 64/100, 100/144, 144/196, 196/256
    sweep = metrics.match_dataset([pred, gt], [gt, gt])
    tps = [row["tp"] for row in sweep["table"]]
    assert [row["thresh"] for row in sweep["table"]] == list(metrics.IOU_THRESHOLDS)
    assert all(a >= b for a, b in zip(tps, tps[1:], strict=False))
    assert tps[0] == 8 and tps[-1] == 4
    assert sweep["by_threshold"][0.7]["tp"] == 4 + 2


# ---------------------------------------------------------------- pooling over a data set


def test_pooled_seg_is_the_mean_over_all_reference_objects():
    one = boxes((0, 10, 0, 10))
    three = boxes((0, 10, 0, 10), (20, 30, 0, 10), (20, 30, 30, 40))
    result = metrics.seg_dataset([one, np.zeros(SHAPE, dtype=np.uint16)], [one, three])
    assert result["per_image"] == [1.0, 0.0]
    assert result["n_reference"] == 4 and result["n_reference_per_image"] == [1, 3]
    assert result["seg"] == pytest.approx(1 / 4)  # not the mean of the per-image values, 1/2
    match = metrics.match_dataset([one, np.zeros(SHAPE, dtype=np.uint16)], [one, three], thresholds=(0.5,))
    assert match["by_threshold"][0.5]["recall"] == pytest.approx(1 / 4)


def test_pooled_pixel_metrics_sum_counts_first():
    small, big = boxes((0, 2, 0, 2)), boxes((0, 10, 0, 10))
    pooled = metrics.pixel_metrics_dataset([small, np.zeros(SHAPE, dtype=np.uint16)], [small, big])
    assert pooled["dice"] == pytest.approx(2 * 4 / (2 * 4 + 100))  # mean of per-image Dice would be 0.5
    assert (pooled["tp"], pooled["fn"]) == (4, 100)


# ---------------------------------------------------------------- label ids need not be consecutive


@pytest.mark.parametrize("dtype, ids", [(np.uint16, [65000, 7, 300]), (np.int64, [10**12, 3, 2**40])])
def test_non_consecutive_permuted_ids_give_the_same_result(dtype, ids):
    gt = three_nuclei()
    pred = boxes((3, 12, 2, 12), (2, 12, 22, 30), (0, 5, 40, 50))
    renamed = np.zeros(SHAPE, dtype=dtype)
    for old, new in enumerate(ids, start=1):
        renamed[pred == old] = new
    assert metrics.seg_score(renamed, gt) == metrics.seg_score(pred, gt)
    assert metrics.match_instances(renamed, gt, 0.5) == pytest.approx(metrics.match_instances(pred, gt, 0.5))
    assert metrics.object_metrics(renamed, gt, components=False) == metrics.object_metrics(pred, gt, components=False)
    assert metrics.seg_score(gt, renamed) == metrics.seg_score(gt, pred)


# ---------------------------------------------------------------- input validation


def test_bad_inputs_raise_one_line_value_errors():
    gt = three_nuclei()
    cases = [
        (metrics.seg_score, gt[:, :-1], gt, "shapes differ"),
        (metrics.seg_score, gt.astype(float), gt, "integer label image"),
        (metrics.match_instances, gt > 0, gt, "integer label image"),
        (metrics.seg_score, gt.astype(np.int32) - 1, gt, "negative"),
        (metrics.pixel_metrics, gt / gt.max(), gt, "threshold it first"),
        (metrics.object_metrics, np.full(SHAPE, 0.7), gt, "threshold it first"),
    ]
    for fn, pred, truth, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            fn(pred, truth)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="image 1: pred and gt shapes differ"):
        metrics.seg_dataset([gt, gt], [gt, gt[:-1]])
    with pytest.raises(ValueError, match="differ in length"):
        metrics.match_dataset([gt], [gt, gt])
    with pytest.raises(ValueError, match="components=False"):
        metrics.object_metrics(gt > 0, gt, components=False)


# ---------------------------------------------------------------- classification


Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1]
Y_PRED = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]
NAMES = ["neutrophil", "eosinophil", "basophil"]


def test_classification_report_agrees_with_sklearn():
    report = metrics.classification_report(Y_TRUE, Y_PRED, NAMES)
    assert report["n"] == 10
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(Y_TRUE, Y_PRED))
    assert report["macro_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="macro"))
    assert report["weighted_f1"] == pytest.approx(skm.f1_score(Y_TRUE, Y_PRED, average="weighted"))
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    f1 = skm.f1_score(Y_TRUE, Y_PRED, average=None)
    for name, expected in zip(NAMES, f1, strict=True):
        assert report["per_class"][name]["f1"] == pytest.approx(expected)
    assert [report["per_class"][n]["support"] for n in NAMES] == [3, 3, 4]
    json.dumps(report)  # plain Python types only
    table = metrics.per_class_table(report)
    assert list(table.index) == NAMES and table.loc["basophil", "recall"] == pytest.approx(3 / 4)
    # the same report from class names instead of indices
    by_name = metrics.classification_report([NAMES[i] for i in Y_TRUE], [NAMES[i] for i in Y_PRED], NAMES)
    assert by_name == report


def test_auc_matches_sklearn_and_skips_a_missing_class():
    rng = np.random.default_rng(0)
    score = rng.dirichlet(np.ones(3), size=len(Y_TRUE))
    full = metrics.classification_report(Y_TRUE, Y_PRED, NAMES, y_score=score)
    assert full["auc_ovr"] == pytest.approx(skm.roc_auc_score(Y_TRUE, score, multi_class="ovr", average="macro"))
    assert full["auc_skipped"] == [] and "auc_note" not in full

    y_true = [0, 0, 1, 1, 0, 1]  # no basophil in the truth
    y_pred = [0, 2, 1, 1, 0, 0]
    score = rng.dirichlet(np.ones(3), size=len(y_true))
    report = metrics.classification_report(y_true, y_pred, NAMES, y_score=score)
    assert report["auc_skipped"] == ["basophil"] and "basophil" in report["auc_note"]
    assert report["per_class"]["basophil"]["auc"] is None
    per_class = [skm.roc_auc_score(np.equal(y_true, c), score[:, c]) for c in (0, 1)]
    assert report["auc_ovr"] == pytest.approx(np.mean(per_class))
    json.dumps(report)


def test_classification_report_rejects_unknown_classes():
    with pytest.raises(ValueError, match="outside 0..2"):
        metrics.classification_report([0, 3], [0, 1], NAMES)
    with pytest.raises(ValueError, match="not in class_names"):
        metrics.classification_report(["neutrophil", "monocyte"], ["neutrophil", "neutrophil"], NAMES)
    with pytest.raises(ValueError, match="y_score must have shape"):
        metrics.classification_report(Y_TRUE, Y_PRED, NAMES, y_score=np.ones((10, 2)))


# ---------------------------------------------------------------- real data


def test_real_dsb_labels(real_data):
    gt = np.asarray(Image.open(real_data["dsb2018"] / "labels" / f"{DSB_ID}.png"))
    assert gt.dtype == np.uint16 and gt.shape == (520, 696)
    assert metrics.seg_score(gt, gt) == 1.0
    assert metrics.match_instances(gt, gt, thresh=0.9)["ap"] == 1.0
    assert metrics.pixel_metrics(gt, gt)["dice"] == 1.0
    shrunk = eroded(gt)
    seg = metrics.seg_dataset([shrunk], [gt])
    assert 0.6 < seg["seg"] < 0.95
    assert seg["n_reference"] == len(np.unique(gt)) - 1
    json.dumps(metrics.match_dataset([shrunk], [gt]))


def test_count_errors_known_answer():
    out = metrics.count_errors([10, 12, 0], [10, 8, 2])
    assert out == {"mae": pytest.approx(2.0), "relative_error": pytest.approx((0 + 0.5 + 1.0) / 3),
                   "bias": pytest.approx(2 / 3), "n": 3}
    assert np.isnan(metrics.count_errors([], [])["mae"])
    with pytest.raises(ValueError):
        metrics.count_errors([1, 2], [1])


def test_label_agreement_perfect_and_half():
    gt = np.zeros((20, 20), np.int32)
    gt[2:6, 2:6], gt[10:14, 10:14] = 1, 2
    perfect = metrics.label_agreement([gt], [gt])
    assert perfect["pixel_dice"] == 1.0 and perfect["object_f1"] == 1.0 and perfect["count_mae"] == 0.0
    half = np.where(gt == 2, 0, gt)  # one of the two nuclei missed
    out = metrics.label_agreement([half, gt], [gt, gt])
    assert out["object_recall"] == pytest.approx(3 / 4) and out["object_precision"] == 1.0
    assert out["count_mae"] == pytest.approx(0.5) and out["count_bias"] == pytest.approx(-0.5)
    assert out["pixel_dice"] == pytest.approx(2 * 48 / (2 * 48 + 16)) and out["n_gt"] == 4


def test_label_folders_count_a_missing_prediction_as_an_empty_one(tmp_path):
    import cv2

    gt = np.zeros((32, 32), np.uint16)
    gt[2:10, 2:10], gt[20:28, 20:28] = 1, 2
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for stem in ("a", "b"):
        cv2.imwrite(str(tmp_path / "gt" / f"{stem}.png"), gt)
    cv2.imwrite(str(tmp_path / "pred" / "a.png"), gt)  # a perfect prediction for a, none for b
    warnings = []
    counted = metrics.evaluate_label_folders(tmp_path / "pred", tmp_path / "gt", on_warning=warnings.append)
    assert counted["n_images"] == 2 and counted["n_missing"] == 1 and counted["missing"].startswith("counted")
    assert counted["recall"] == pytest.approx(0.5) and counted["f1"] == pytest.approx(2 / 3)
    assert any("1 reference file(s) without a prediction counted as empty" in w for w in warnings)
    skipped = metrics.evaluate_label_folders(tmp_path / "pred", tmp_path / "gt", skip_missing=True)
    assert skipped["n_images"] == 1 and skipped["f1"] == 1.0 and skipped["missing"] == "left out"


# --- intervals ----------------------------------------------------------------------------------------------------


def _wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_the_accuracy_interval_agrees_with_the_wilson_interval():
    y_true = np.zeros(400, int)
    y_pred = np.where(np.arange(400) < 340, 0, 1)  # 85 % correct
    interval = metrics.accuracy_interval(y_true, y_pred)
    low, high = _wilson(340, 400)
    assert interval.estimate == 0.85 and interval.n_units == 400
    assert interval.low == pytest.approx(low, abs=0.01) and interval.high == pytest.approx(high, abs=0.01)
    assert metrics.accuracy_interval(y_true, y_pred, seed=0) == interval  # seeded


def test_a_model_compared_with_itself_differs_by_zero_inside_its_interval():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 300)
    y_pred = np.where(rng.random(300) < 0.8, y_true, rng.integers(0, 4, 300))
    same = metrics.accuracy_difference(y_true, y_pred, y_pred)
    assert same.estimate == 0 and same.contains(0) and same.verdict().startswith("not resolved")


def test_a_planted_difference_is_found_and_a_small_one_is_not_resolved():
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 3, 500)
    good = np.where(rng.random(500) < 0.9, y_true, (y_true + 1) % 3)
    worse = np.where(rng.random(500) < 0.75, y_true, (y_true + 1) % 3)
    found = metrics.accuracy_difference(y_true, good, worse)
    assert found.low > 0 and found.contains(np.mean(good == y_true) - np.mean(worse == y_true))
    assert found.verdict(("good", "worse")) == "good is better"
    assert metrics.accuracy_difference(y_true, worse, good).verdict(("worse", "good")) == "good is better"
    tiny = metrics.accuracy_difference(y_true[:60], good[:60], np.where(np.arange(60) == 0, -1, good[:60]))
    assert tiny.contains(0)  # one image of 60 cannot be told apart


def test_segmentation_intervals_pool_over_images_and_compare_pairs():
    gts = [synthetic.nuclei_field(shape=(96, 96), n_nuclei=12, seed=s).labels for s in range(8)]
    perfect = [g.copy() for g in gts]
    half = [np.where(g % 2 == 0, g, 0) for g in gts]  # every other nucleus missed
    f1 = metrics.matching_interval(half, gts)
    assert f1.estimate == pytest.approx(metrics.match_dataset(half, gts)["by_threshold"][0.5]["f1"])
    assert f1.low <= f1.estimate <= f1.high < 1
    seg = metrics.seg_interval(half, gts)
    assert seg.estimate == pytest.approx(metrics.seg_dataset(half, gts)["seg"]) and seg.n_units == 8
    assert metrics.seg_interval(perfect, gts).low == 1.0
    better = metrics.segmentation_difference(perfect, half, gts, "seg")
    assert better.low > 0.3 and better.verdict(("perfect", "half")) == "perfect is better"
    assert metrics.segmentation_difference(half, half, gts, "f1").contains(0)


def test_pixel_dice_interval_pools_pixels_and_compares_pairs():
    gts = [synthetic.nuclei_field(shape=(96, 96), n_nuclei=12, seed=s).labels for s in range(8)]
    half = [np.where(g % 2 == 0, g, 0) for g in gts]  # every other nucleus missed: about half the pixels
    dice = metrics.pixel_dice_interval(half, gts)
    assert dice.estimate == pytest.approx(metrics.pixel_metrics_dataset(half, gts)["dice"])
    assert 0.4 < dice.low <= dice.estimate <= dice.high < 0.8 and dice.n_units == 8
    assert metrics.pixel_dice_interval(gts, gts).low == 1.0
    empty = [np.zeros_like(g) for g in gts]
    assert metrics.pooled_pixel_dice(metrics.pixel_counts(empty, empty)) == 1.0  # nothing to find, nothing found
    better = metrics.segmentation_difference(gts, half, gts, "pixel_dice")
    assert better.estimate == pytest.approx(1 - dice.estimate) and better.low > 0
    assert metrics.segmentation_difference(half, half, gts, "pixel_dice").contains(0)


def test_agreement_intervals_and_differences_hold_their_three_scores():
    gts = [synthetic.nuclei_field(shape=(96, 96), n_nuclei=12, seed=s).labels for s in range(6)]
    half = [np.where(g % 2 == 0, g, 0) for g in gts]
    scores = metrics.agreement_intervals(half, gts)
    assert set(scores) == {"pixel_dice", "object_f1", "seg"}
    assert scores["object_f1"].estimate == pytest.approx(metrics.label_agreement(half, gts)["object_f1"])
    assert scores["pixel_dice"].estimate == pytest.approx(metrics.label_agreement(half, gts)["pixel_dice"])
    assert scores["seg"].estimate == pytest.approx(metrics.seg_dataset(half, gts)["seg"])
    differences = metrics.agreement_differences(gts, half, gts)
    for name, interval in differences.items():
        assert interval.estimate == pytest.approx(1 - scores[name].estimate), name
        assert interval.low > 0, name


def test_interval_table_writes_each_interval_in_its_cell():
    a = metrics.Interval(0.81234, 0.75, 0.86, 0.95, 40, 2000)
    table = metrics.interval_table({"labels": {"f1": a}, "net": {"f1": a, "seg": a}}, digits=2)
    assert table.loc["labels", "f1"] == "0.81 [0.75, 0.86]" and list(table.columns) == ["f1", "seg"]
    assert table.loc["labels"].isna()["seg"]


def test_a_report_alone_gives_the_intervals_of_its_predictions():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 4, 240)
    y_pred = np.where(rng.random(240) < 0.8, y_true, rng.integers(0, 4, 240))
    report = metrics.classification_report(y_true, y_pred, ["a", "b", "c", "d"])
    from_report = metrics.report_intervals(report)
    assert from_report["accuracy"].estimate == pytest.approx(report["accuracy"])
    assert from_report["macro_f1"].estimate == pytest.approx(report["macro_f1"])
    # the same pairs in another order: the same interval as from the predictions themselves
    assert from_report["accuracy"].low == pytest.approx(metrics.accuracy_interval(y_true, y_pred).low, abs=0.02)
    assert from_report["macro_f1"].high == pytest.approx(
        metrics.macro_f1_interval(y_true, y_pred, 4).high, abs=0.02)
    fields = metrics.interval_fields(from_report, {"accuracy": "best_accuracy"})
    assert fields == {"best_accuracy_ci": [from_report["accuracy"].low, from_report["accuracy"].high]}


def test_segmentation_scores_carry_what_their_intervals_need():
    gts = [synthetic.nuclei_field(shape=(96, 96), n_nuclei=12, seed=s).labels for s in range(6)]
    half = [np.where(g % 2 == 0, g, 0) for g in gts]
    half[0] = np.zeros_like(half[0])  # an image where nothing was found
    scores = metrics.segmentation_scores(half, gts)
    intervals = metrics.segmentation_intervals(scores)
    for key in ("f1", "ap", "seg"):
        assert intervals[key].estimate == pytest.approx(scores[key]), key
        assert intervals[key].low <= scores[key] <= intervals[key].high
    assert intervals["seg"].low == pytest.approx(metrics.seg_interval(half, gts).low)
    assert intervals["f1"].high == pytest.approx(metrics.matching_interval(half, gts).high)


def test_two_methods_scored_on_the_same_images_are_compared_in_pairs():
    gts = [synthetic.nuclei_field(shape=(96, 96), n_nuclei=12, seed=s).labels for s in range(6)]
    half = metrics.segmentation_scores([np.where(g % 2 == 0, g, 0) for g in gts], gts)
    perfect = metrics.segmentation_scores([g.copy() for g in gts], gts)
    found = metrics.scores_difference(perfect, half, "f1")
    assert found.estimate == pytest.approx(perfect["f1"] - half["f1"]) and found.low > 0
    assert metrics.scores_difference(half, half, "seg").contains(0)
    with pytest.raises(ValueError, match="same images"):
        metrics.scores_difference(perfect, metrics.segmentation_scores(gts[:5], gts[:5]), "seg")


def test_the_macro_f1_of_the_interval_is_scikit_learns():
    rng = np.random.default_rng(4)
    y_true = rng.choice([0, 1, 2, 4], 300)  # class 3 never occurs
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.choice([0, 1, 2, 4, 5], 300))
    expected = metrics.classification_report(y_true, y_pred, list("abcdef"))["macro_f1"]
    assert metrics.macro_f1_interval(y_true, y_pred, 6).estimate == pytest.approx(expected, abs=1e-12)


def test_confused_pairs_adds_both_directions_and_ranks_the_pairs():
    matrix = [[5, 2, 0],
              [3, 7, 1],
              [0, 1, 9]]
    pairs = metrics.confused_pairs(matrix, ["a", "b", "c"])
    assert list(pairs.index) == [("a", "b"), ("b", "c"), ("a", "c")]
    assert list(pairs) == [5, 2, 0]


def test_confused_pairs_rejects_a_matrix_of_the_wrong_size():
    with pytest.raises(ValueError, match="square"):
        metrics.confused_pairs([[1, 0], [0, 1]], ["a", "b", "c"])
