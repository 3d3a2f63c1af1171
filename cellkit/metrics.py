"""Metrics: classification reports and segmentation metrics (pixel, object-level, CTC SEG, matching at IoU).

Classification
    :func:`classification_report` (a JSON-ready dict) and :func:`per_class_table` (a DataFrame of it).

Segmentation, one image or pooled over a data set (``*_dataset``: counts are summed over the images, then the
ratios are taken, so that large images with many objects weigh more than near-empty ones):

==============================  ===================================================================
:func:`pixel_metrics`           foreground pixels (label > 0): accuracy, precision, recall, Dice, IoU
:func:`object_metrics`          report 003's object counts: connected components that touch or not
:func:`seg_score`               the Cell Tracking Challenge SEG measure
:func:`match_instances`         one-to-one matching at an IoU threshold: F1, AP (DSB/StarDist), PQ
:func:`count_errors`            predicted vs true counts per image: mean absolute and relative error
:func:`label_agreement`         one row comparing label sets: pixel Dice, F1 at IoU 0.5, count errors
:func:`segmentation_scores`     every score above for a set of label images, JSON-ready, per image too
:func:`scores_by_group`         the headline scores within each group of images (e.g. size groups)
:func:`evaluate_label_folders`  folders of label images matched by file stem (``cellkit evaluate segmentation``)
==============================  ===================================================================

Intervals (95 % by default, a bootstrap over the units a score is computed from; :class:`Interval`)
    :func:`bootstrap_interval` for any score of per-unit arrays, and for the scores the course reports:
    :func:`accuracy_interval` and :func:`macro_f1_interval` (units: test images), :func:`matching_interval` (F1 or
    AP at IoU 0.5 pooled over images), :func:`seg_interval` (SEG pooled over the nuclei of the images; the
    images are resampled, since nuclei of one image are not independent) and :func:`pixel_dice_interval` (pixels
    pooled over images); :func:`agreement_intervals` gives the last three at once. :func:`paired_difference`
    compares two models scored on the same units (images or folds): the difference with its interval
    (:func:`segmentation_difference`, :func:`agreement_differences` for label images), and
    :meth:`Interval.verdict` says whether it is resolved; :func:`interval_table` shows intervals as a table.

Conventions shared by every segmentation function:

- ``pred`` and ``gt`` have the same shape (2-D or 3-D). Label images are integer arrays, 0 is background and
  every other value one object; ids need be neither consecutive nor in any order. Only
  :func:`pixel_metrics` and :func:`object_metrics` also take binary masks (bool, or floats that are all 0 or 1).
- A ratio whose denominator is 0 is 1.0 when prediction and ground truth are both empty (nothing to get
  wrong) and 0.0 otherwise; SEG of an image without reference objects is NaN (it is a mean over them).
- All overlaps come from one contingency table per image pair (``np.bincount``), never from per-object loops:
  every metric of a 520x696 image with 100 nuclei takes a few milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage, stats
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from cellkit.datasets import DataError, read_image
from cellkit.datasets.loaders import IMAGE_SUFFIXES

#: IoU thresholds of :func:`match_dataset`: 0.5, 0.55, ..., 0.9.
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))


# --------------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------------


def classification_report(
    y_true: Sequence, y_pred: Sequence, class_names: Sequence[str], y_score: np.ndarray | None = None
) -> dict:
    """Accuracy, macro and weighted F1, per-class scores, confusion matrix and (optionally) ROC AUC.

    ``y_true`` and ``y_pred`` (n,) hold class indices into ``class_names`` (0..k-1) or the names themselves.
    ``y_score`` (n, k), when given, holds per-class scores (e.g. softmax probabilities), column c for class c.

    Returns plain Python types (``json.dump`` ready)::

        n, accuracy, macro_f1, weighted_f1, class_names,
        per_class: {name: {precision, recall, f1, support[, auc]}},
        confusion_matrix: k lists of k counts, row = true class, column = predicted class,
        with y_score also: auc_ovr, auc_classes, auc_skipped[, auc_note]

    ``macro_f1`` averages over the classes that occur in ``y_true`` or ``y_pred`` (as scikit-learn does), so a
    class absent from both does not count as a zero. ``auc_ovr`` is the macro one-vs-rest ROC AUC: the mean of
    the per-class AUCs of "class c vs the rest". A class with no positive (or no negative) sample in ``y_true``
    has no ROC curve; it is skipped (its AUC is None), named in ``auc_skipped`` and ``auc_note`` says so.
    """
    names = [str(c) for c in class_names]
    yt = _encode_classes(y_true, names, "y_true")
    yp = _encode_classes(y_pred, names, "y_pred")
    if len(yt) != len(yp):
        raise ValueError(f"y_true and y_pred differ in length: {len(yt)} vs {len(yp)}")
    if len(yt) == 0:
        raise ValueError("y_true is empty")
    labels = np.arange(len(names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    occurring = np.union1d(yt, yp)
    report = {
        "n": len(yt),
        "accuracy": float(np.mean(yt == yp)),
        "macro_f1": float(f1[occurring].mean()),
        "weighted_f1": float(np.average(f1, weights=support)),
        "class_names": names,
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, support, strict=True)
        },
        "confusion_matrix": skm.confusion_matrix(yt, yp, labels=labels).tolist(),
    }
    if y_score is not None:
        report.update(_auc_ovr(yt, y_score, names, report["per_class"]))
    return report


def proba_report(y_true: Sequence, proba: np.ndarray, class_names: Sequence[str]) -> dict:
    """:func:`classification_report` of class probabilities ``proba`` (n, k): the most probable class is the
    prediction, and the probabilities give the ROC AUC."""
    proba = np.asarray(proba)
    return classification_report(np.asarray(y_true), proba.argmax(axis=1), class_names, proba)


def per_class_table(report: dict) -> pd.DataFrame:
    """The ``per_class`` part of a :func:`classification_report` as a DataFrame, one row per class."""
    table = pd.DataFrame.from_dict(report["per_class"], orient="index")
    table.index.name = "class"
    return table


def _encode_classes(y: Sequence, names: list[str], what: str) -> np.ndarray:
    """Class indices (n,) from indices or names; ValueError on anything outside ``names``."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.integer):
        if y.size and (y.min() < 0 or y.max() >= len(names)):
            raise ValueError(f"{what} holds class indices outside 0..{len(names) - 1}")
        return y.astype(np.intp)
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({str(v) for v in y.tolist()} - index.keys())
    if unknown:
        raise ValueError(f"{what} holds classes not in class_names: {unknown[:5]}")
    return np.array([index[str(v)] for v in y.tolist()], dtype=np.intp)


def _auc_ovr(yt: np.ndarray, y_score: np.ndarray, names: list[str], per_class: dict) -> dict:
    """Per-class one-vs-rest ROC AUC (written into ``per_class``) and their macro mean over defined classes."""
    score = np.asarray(y_score, dtype=float)
    if score.shape != (len(yt), len(names)):
        raise ValueError(f"y_score must have shape (n, k) = {(len(yt), len(names))}, got {score.shape}")
    used, skipped = [], []
    for c, name in enumerate(names):
        positive = yt == c
        if positive.all() or not positive.any():  # ROC needs both positives and negatives
            per_class[name]["auc"] = None
            skipped.append(name)
            continue
        per_class[name]["auc"] = float(skm.roc_auc_score(positive, score[:, c]))
        used.append(name)
    out = {
        "auc_ovr": float(np.mean([per_class[n]["auc"] for n in used])) if used else None,
        "auc_classes": used,
        "auc_skipped": skipped,
    }
    if skipped:
        out["auc_note"] = (
            f"macro one-vs-rest AUC over {len(used)} of {len(names)} classes; skipped (absent from y_true or "
            f"the only class in it): {', '.join(skipped)}"
        )
    return out


def multilabel_auc(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str]) -> dict:
    """ROC AUC of each label (columns of ``y_true`` (n, L) 0/1 and ``y_score`` (n, L)) and their macro mean.

    Returns ``{"per_label": {name: auc or None}, "macro": mean over defined labels}``; a label whose column is
    all 0 or all 1 has no ROC curve (None).
    """
    yt, score = np.asarray(y_true), np.asarray(y_score, dtype=float)
    if yt.shape != score.shape or yt.ndim != 2 or yt.shape[1] != len(label_names):
        raise ValueError(f"y_true and y_score must both be (n, {len(label_names)}), got {yt.shape} and {score.shape}")
    per_label = {}
    for j, name in enumerate(label_names):
        column = yt[:, j].astype(bool)
        per_label[str(name)] = float(skm.roc_auc_score(column, score[:, j])) if 0 < column.sum() < len(column) \
            else None
    defined = [v for v in per_label.values() if v is not None]
    return {"per_label": per_label, "macro": float(np.mean(defined)) if defined else None}


def confusion_distances(matrix: Sequence[Sequence[int]]) -> np.ndarray:
    """Class distances (k, k) from a confusion matrix (rows true, columns predicted): 1 minus the mean of the two
    confusion rates, d(i, j) = 1 - (P[i, j] + P[j, i]) / 2 with P the row-normalised matrix; 0 on the diagonal.

    Classes the model confuses often are close, so single linkage on these distances (report 004's dendrogram)
    merges the most confused pair first.
    """
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {counts.shape}")
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    distances = 1 - (rates + rates.T) / 2
    np.fill_diagonal(distances, 0.0)
    return distances


def confused_pairs(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> pd.Series:
    """Errors between each pair of classes in either direction, from a confusion matrix (rows true, columns
    predicted): ``matrix[i, j] + matrix[j, i]`` for every pair i < j, as an int Series indexed by (class i,
    class j), most confused pair first (ties in class order). Correct predictions (the diagonal) do not count."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.ndim != 2 or counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"a confusion matrix of {len(class_names)} classes must be square of that size, "
                         f"got shape {counts.shape}")
    i, j = np.triu_indices(len(class_names), k=1)
    pairs = pd.Series(counts[i, j] + counts[j, i],
                      index=pd.MultiIndex.from_arrays([np.asarray(class_names)[i], np.asarray(class_names)[j]]))
    return pairs.sort_values(ascending=False, kind="stable")


# --------------------------------------------------------------------------------------------------------
# Segmentation: input checks and the contingency table every metric starts from
# --------------------------------------------------------------------------------------------------------


def _check_shapes(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim < 2:
        raise ValueError(f"pred and gt must be images (2-D or 3-D), got shape {pred.shape}")
    return pred, gt


def _as_labels(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` itself if it is a valid label image (non-negative integers), else ValueError."""
    if x.dtype == bool or not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{what} must be an integer label image, got dtype {x.dtype}")
    if x.size and x.min() < 0:
        raise ValueError(f"{what} has negative labels")
    return x


def _as_mask(x: np.ndarray, what: str) -> np.ndarray:
    """Foreground mask of a label image, boolean mask, or float mask whose values are all 0 or 1."""
    if x.dtype == bool:
        return x
    if np.issubdtype(x.dtype, np.integer):
        return x > 0
    if np.issubdtype(x.dtype, np.floating):
        # a probability map passed by mistake would otherwise become all foreground
        if not ((x == 0) | (x == 1)).all():
            raise ValueError(f"{what} is a float array with values other than 0 and 1; threshold it first")
        return x > 0
    raise ValueError(f"{what} must be a label image or a binary mask, got dtype {x.dtype}")


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids mapped to 1..n in increasing order (0 stays background); returns (intp array, n).

    A lookup table indexed by id does it in O(pixels) when ids are not huge; np.unique (a sort) otherwise.
    """
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 65536:
        present = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        lut = np.zeros(top + 1, dtype=np.intp)
        lut[present] = np.arange(1, int(present.sum()) + 1)
        return lut[labels], int(present.sum())
    ids, inverse = np.unique(flat, return_inverse=True)
    has_background = ids[0] == 0
    inverse = inverse.astype(np.intp) + (0 if has_background else 1)
    return inverse.reshape(labels.shape), len(ids) - int(has_background)


def _contingency(pred_labels: np.ndarray, gt_labels: np.ndarray) -> np.ndarray:
    """Overlap counts C (n_gt + 1, n_pred + 1): C[i, j] = pixels of the i-th gt and j-th predicted object.

    Objects are numbered in increasing order of id; row 0 and column 0 are background, so row sums are gt
    areas and column sums predicted areas. One np.bincount over ``gt * (n_pred + 1) + pred``; ids are
    relabelled to 1..n first only when the table over raw ids would be large, else its empty rows and
    columns are dropped afterwards (cheaper than relabelling).
    """
    size = max(gt_labels.size, 1 << 16)
    top_gt = int(gt_labels.max()) if gt_labels.size else 0
    top_pred = int(pred_labels.max()) if pred_labels.size else 0
    if (top_gt + 1) * (top_pred + 1) > size:
        gt_labels, top_gt = _relabel(gt_labels)
        pred_labels, top_pred = _relabel(pred_labels)
    gt_flat, pred_flat = gt_labels.ravel(), pred_labels.ravel()
    # count only pixels inside some object (often a small part of the image); background-background is the rest
    fg = (gt_flat > 0) | (pred_flat > 0)
    key = gt_flat[fg].astype(np.intp) * (top_pred + 1) + pred_flat[fg]
    counts = np.bincount(key, minlength=(top_gt + 1) * (top_pred + 1))
    counts[0] = gt_flat.size - key.size
    counts = counts.reshape(top_gt + 1, top_pred + 1)
    rows, cols = counts.any(axis=1), counts.any(axis=0)
    rows[0] = cols[0] = True
    return counts[np.ix_(rows, cols)]


def _iou_matrix(counts: np.ndarray) -> np.ndarray:
    """IoU (n_gt, n_pred) of every gt object with every predicted object, from a contingency table."""
    inter = counts[1:, 1:]
    gt_area = counts[1:, :].sum(axis=1)
    pred_area = counts[:, 1:].sum(axis=0)
    return inter / (gt_area[:, None] + pred_area[None, :] - inter)


def _ratio(num: float, den: float, both_empty: bool) -> float:
    """num / den; for den == 0: 1.0 if prediction and ground truth are both empty, else 0.0."""
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def _per_image(fn: Callable, preds: Sequence, gts: Sequence) -> list:
    """[fn(pred, gt) for each image pair]; a ValueError names the image it came from."""
    if len(preds) != len(gts):
        raise ValueError(f"preds and gts differ in length: {len(preds)} vs {len(gts)}")
    if len(preds) == 0:
        raise ValueError("no images given")
    out = []
    for i, (pred, gt) in enumerate(zip(preds, gts, strict=True)):
        try:
            out.append(fn(pred, gt))
        except ValueError as error:
            raise ValueError(f"image {i}: {error}") from None
    return out


def _sum_counts(rows: list[dict], keys: Sequence[str]) -> dict:
    return {k: sum(row[k] for row in rows) for k in keys}


# --------------------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------------------

_PIXEL_COUNTS = ("tp", "fp", "fn", "tn")


def pixel_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """Pixel-level scores of the foreground (label > 0) of one image.

    ``pred`` and ``gt``: label images or binary masks of the same shape. With TP, FP, FN, TN counted in
    pixels: accuracy = (TP + TN) / all, precision = TP / (TP + FP), recall = TP / (TP + FN),
    Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN). Both empty: every score is 1.0; an empty
    prediction of a non-empty truth has precision 0.0 (and recall, Dice, IoU 0.0). Returns the scores and
    the four counts.
    """
    return _pixel_scores(_pixel_counts(pred, gt))


def pixel_metrics_dataset(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> dict:
    """:func:`pixel_metrics` pooled over images: pixel counts summed over all pairs, then the ratios."""
    return _pixel_scores(_sum_counts(_per_image(_pixel_counts, preds, gts), _PIXEL_COUNTS))


def _pixel_counts(pred: np.ndarray, gt: np.ndarray) -> dict:
    pred, gt = _check_shapes(pred, gt)
    p, g = _as_mask(pred, "pred"), _as_mask(gt, "gt")
    tp = int(np.count_nonzero(p & g))
    n_pred, n_gt = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    return {"tp": tp, "fp": n_pred - tp, "fn": n_gt - tp, "tn": p.size - n_pred - n_gt + tp}


def _pixel_scores(c: dict) -> dict:
    tp, fp, fn, tn = (c[k] for k in _PIXEL_COUNTS)
    empty = tp + fp + fn == 0
    return {
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        **c,
    }


# --------------------------------------------------------------------------------------------------------
# Object level (report 003, section 5.4.2)
# --------------------------------------------------------------------------------------------------------

_OBJECT_COUNTS = ("tp", "fp", "fn", "n_pred", "n_gt", "gt_detected")


def object_metrics(pred: np.ndarray, gt: np.ndarray, components: bool = True, connectivity: int | None = None) -> dict:
    """Object-level precision, recall, Dice and IoU as report 003 defines them (its section 5.4.2).

    Objects are the connected components of the binary prediction and of the binary ground truth
    (``components=True``, the report's rule: touching nuclei of ``gt`` merge into one object), or the
    objects of two integer label images as given (``components=False``). A predicted object is a false
    positive (FP) if it shares no pixel with any ground-truth object, a true positive (TP) otherwise; a
    ground-truth object that shares no pixel with any predicted object is a false negative (FN). The
    report counts only FP and FN objects; like its manual evaluation (TP = object count - FP), TP counts
    predicted objects. Then precision = TP / (TP + FP), recall = TP / (TP + FN),
    Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP + FN).

    One predicted object covering three nuclei counts once, so ``recall`` can fall below the fraction of
    ground-truth objects found, which is returned as ``gt_recall`` (= gt_detected / n_gt).

    ``pred``, ``gt``: label images or binary masks (bool, or floats all 0 or 1) with ``components=True``;
    integer label images with ``components=False``. ``connectivity``: neighbours joined into one component,
    1 = faces only (4 in 2-D) up to ``ndim`` (8 in 2-D), the default (report 003 does not say which it used).
    Empty cases follow the module rule (both empty: 1.0).
    """
    return _object_scores(_object_counts(pred, gt, components, connectivity))


def object_metrics_dataset(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], components: bool = True, connectivity: int | None = None
) -> dict:
    """:func:`object_metrics` pooled over images: object counts summed over all pairs, then the ratios."""
    rows = _per_image(lambda p, g: _object_counts(p, g, components, connectivity), preds, gts)
    return _object_scores(_sum_counts(rows, _OBJECT_COUNTS))


def _components(x: np.ndarray, what: str, connectivity: int | None) -> np.ndarray:
    structure = ndimage.generate_binary_structure(x.ndim, connectivity or x.ndim)
    return ndimage.label(_as_mask(x, what), structure=structure)[0]


def _object_counts(pred: np.ndarray, gt: np.ndarray, components: bool, connectivity: int | None) -> dict:
    pred, gt = _check_shapes(pred, gt)
    if components:
        pred, gt = _components(pred, "pred", connectivity), _components(gt, "gt", connectivity)
    else:
        pred, gt = _as_labels(pred, "pred (components=False)"), _as_labels(gt, "gt (components=False)")
    touching = _contingency(pred, gt)[1:, 1:] > 0
    n_gt, n_pred = touching.shape
    tp = int(touching.any(axis=0).sum())
    detected = int(touching.any(axis=1).sum())
    return {"tp": tp, "fp": n_pred - tp, "fn": n_gt - detected, "n_pred": n_pred, "n_gt": n_gt, "gt_detected": detected}


def _object_scores(c: dict) -> dict:
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    empty = c["n_pred"] + c["n_gt"] == 0
    return {
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "gt_recall": _ratio(c["gt_detected"], c["n_gt"], empty),
        **c,
    }


# --------------------------------------------------------------------------------------------------------
# Cell Tracking Challenge SEG
# --------------------------------------------------------------------------------------------------------


def seg_score(pred_labels: np.ndarray, gt_labels: np.ndarray) -> float:
    """The Cell Tracking Challenge SEG measure of one image (Maska et al. 2014; Ulman et al. 2017).

    A reference (ground-truth) object R matches a segmented object S when |R ∩ S| > 0.5 |R| (strictly more
    than half of R), so each R matches at most one S. Its score is the Jaccard index J = |R ∩ S| / |R ∪ S|,
    and 0 when nothing matches. SEG is the mean of J over all reference objects, in [0, 1]. False positives
    (segments matching no R) cost nothing, by the measure's definition. NaN when ``gt_labels`` has no object.

    ``pred_labels``, ``gt_labels``: integer label images of the same shape. The challenge counts pixels at
    the image edge as background; that cropping is the caller's job.
    """
    j = _seg_jaccards(pred_labels, gt_labels)
    return float(j.mean()) if j.size else float("nan")


def seg_dataset(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> dict:
    """SEG over a data set as the challenge computes it: the mean J over all reference objects of all images.

    This is not the mean of per-image SEG values (an image with 3 nuclei would weigh as much as one with
    300). Returns ``seg``, ``n_reference`` (objects in all of ``gts``), ``per_image`` (SEG of each image,
    NaN where it has no reference object) and ``n_reference_per_image``.
    """
    per_image = _per_image(_seg_jaccards, preds, gts)
    pooled = np.concatenate(per_image)
    return {
        "seg": float(pooled.mean()) if pooled.size else float("nan"),
        "n_reference": int(pooled.size),
        "per_image": [float(j.mean()) if j.size else float("nan") for j in per_image],
        "n_reference_per_image": [int(j.size) for j in per_image],
    }


def _seg_jaccards(pred_labels: np.ndarray, gt_labels: np.ndarray) -> np.ndarray:
    """J of every reference object (n_gt,), 0 where no segment covers more than half of it."""
    pred, gt = _check_shapes(pred_labels, gt_labels)
    counts = _contingency(_as_labels(pred, "pred_labels"), _as_labels(gt, "gt_labels"))
    inter = counts[1:, 1:]
    n_gt, n_pred = inter.shape
    if n_pred == 0:
        return np.zeros(n_gt)
    gt_area = counts[1:, :].sum(axis=1)
    pred_area = counts[:, 1:].sum(axis=0)
    # the segment with the largest overlap is the only candidate: any match covers more than half of R
    best = inter.argmax(axis=1)
    overlap = inter[np.arange(n_gt), best]
    jaccard = overlap / (gt_area + pred_area[best] - overlap)
    return np.where(2 * overlap > gt_area, jaccard, 0.0)


# --------------------------------------------------------------------------------------------------------
# Instance matching at an IoU threshold (DSB 2018, StarDist)
# --------------------------------------------------------------------------------------------------------

_MATCH_COUNTS = ("tp", "fp", "fn", "n_pred", "n_gt", "sum_iou")


def match_instances(pred_labels: np.ndarray, gt_labels: np.ndarray, thresh: float = 0.5) -> dict:
    """Match predicted to ground-truth objects one-to-one at an IoU threshold, and score the matching.

    The matching is the one of StarDist's ``matching`` (Schmidt et al. 2018): an optimal assignment
    (Hungarian, scipy's linear_sum_assignment) that maximises the number of pairs with IoU >= ``thresh``,
    the sum of their IoUs breaking ties. For ``thresh`` > 0.5 at most one pair per object can reach the
    threshold, so the matching is then simply all such pairs. Matched pairs are true positives (TP),
    unmatched predictions false positives (FP), unmatched ground-truth objects false negatives (FN).
    TP, FP and FN equal StarDist's at every threshold; below 0.5 the matched IoU sum (hence PQ) can be
    slightly higher, because StarDist's tie-break also counts assigned pairs that miss the threshold.

    Returns ``thresh``, ``tp``, ``fp``, ``fn``, ``n_pred``, ``n_gt``, ``sum_iou`` and

    - ``precision`` = TP / (TP + FP), ``recall`` = TP / (TP + FN), ``f1`` = 2 TP / (2 TP + FP + FN);
    - ``ap`` = TP / (TP + FP + FN): what the 2018 Data Science Bowl (Caicedo et al. 2019) and StarDist call
      "average precision" at this threshold (StarDist's ``accuracy``);
    - ``pq``, panoptic quality (Kirillov et al. 2019) = sum of matched IoUs / (TP + FP/2 + FN/2);
    - ``mean_iou``, the mean IoU of the matched pairs (PQ's "segmentation quality"; PQ = mean_iou * f1).

    ``pred_labels``, ``gt_labels``: integer label images of the same shape. Empty cases follow the module
    rule (both empty: 1.0; no match at all: 0.0).
    """
    return _match_scores(_match_counts(_instance_ious(pred_labels, gt_labels), thresh), thresh)


def match_dataset(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], thresholds: Sequence[float] = IOU_THRESHOLDS
) -> dict:
    """:func:`match_instances` pooled over a data set at several IoU thresholds.

    At each threshold TP, FP, FN and the matched IoUs are summed over all images before the ratios are taken
    (not a mean of per-image scores). The IoU tables are computed once per image and reused for every
    threshold. Returns ``by_threshold`` ({threshold: the dict of :func:`match_instances`}), ``table`` (the
    same as a list of rows, ``pandas.DataFrame(result["table"])``) and ``n_images``.
    """
    ious = _per_image(_instance_ious, preds, gts)
    by_threshold = {}
    for thresh in thresholds:
        counts = _sum_counts([_match_counts(iou, thresh) for iou in ious], _MATCH_COUNTS)
        by_threshold[float(thresh)] = _match_scores(counts, thresh)
    return {"by_threshold": by_threshold, "table": list(by_threshold.values()), "n_images": len(ious)}


def _instance_ious(pred_labels: np.ndarray, gt_labels: np.ndarray) -> np.ndarray:
    pred, gt = _check_shapes(pred_labels, gt_labels)
    return _iou_matrix(_contingency(_as_labels(pred, "pred_labels"), _as_labels(gt, "gt_labels")))


def _match_counts(iou: np.ndarray, thresh: float) -> dict:
    """TP, FP, FN and the sum of matched IoUs of the optimal matching at ``thresh`` of an IoU table."""
    n_gt, n_pred = iou.shape
    candidate = iou >= thresh
    rows, cols = candidate.any(axis=1), candidate.any(axis=0)
    tp, sum_iou = 0, 0.0
    if thresh > 0.5:
        # IoU > 0.5 with two disjoint objects is impossible, so the candidate pairs are the matching
        tp, sum_iou = int(candidate.sum()), float(iou[candidate].sum())
    elif rows.any():
        # only objects with a candidate pair can be matched; the rest would only enlarge the assignment
        sub_iou, sub_ok = iou[np.ix_(rows, cols)], candidate[np.ix_(rows, cols)]
        # one per pair reached, plus an IoU bonus that sums to < 1: more matches always win, IoU breaks ties
        cost = -(sub_ok + sub_ok * sub_iou / (2 * min(sub_ok.shape)))
        r, c = linear_sum_assignment(cost)
        ok = sub_ok[r, c]
        tp, sum_iou = int(ok.sum()), float(sub_iou[r, c][ok].sum())
    return {"tp": tp, "fp": n_pred - tp, "fn": n_gt - tp, "n_pred": n_pred, "n_gt": n_gt, "sum_iou": sum_iou}


def _match_scores(c: dict, thresh: float) -> dict:
    tp, fp, fn, sum_iou = c["tp"], c["fp"], c["fn"], c["sum_iou"]
    empty = c["n_pred"] + c["n_gt"] == 0
    return {
        "thresh": float(thresh),
        "precision": _ratio(tp, tp + fp, empty),
        "recall": _ratio(tp, tp + fn, empty),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "ap": _ratio(tp, tp + fp + fn, empty),
        "pq": _ratio(sum_iou, tp + fp / 2 + fn / 2, empty),
        "mean_iou": _ratio(sum_iou, tp, empty),
        **c,
    }


# --------------------------------------------------------------------------------------------------------
# Counts and label agreement (report 003)
# --------------------------------------------------------------------------------------------------------


def count_errors(predicted: Sequence[float], true: Sequence[float]) -> dict:
    """Errors of per-image counts: ``mae`` mean |predicted - true| (nuclei), ``relative_error`` mean
    |predicted - true| / max(true, 1), ``bias`` mean (predicted - true) (negative: undercounting), ``n`` images.
    Empty input gives NaN errors."""
    p, t = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
    if p.shape != t.shape or p.ndim != 1:
        raise ValueError(f"need two 1-D sequences of the same length, got shapes {p.shape} and {t.shape}")
    if not p.size:
        return {"mae": float("nan"), "relative_error": float("nan"), "bias": float("nan"), "n": 0}
    diff = p - t
    return {"mae": float(np.abs(diff).mean()), "relative_error": float((np.abs(diff) / np.maximum(t, 1)).mean()),
            "bias": float(diff.mean()), "n": int(p.size)}


def label_agreement(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], thresh: float = 0.5) -> dict:
    """How far label images ``preds`` are from reference label images ``gts``, pooled over the pairs, as one flat
    row: ``pixel_dice``, ``pixel_precision``, ``pixel_recall`` (foreground pixels); ``object_f1``,
    ``object_precision``, ``object_recall``, ``ap`` (one-to-one matching at IoU ``thresh``); ``object_dice``
    (report 003's touching rule, :func:`object_metrics`); ``count_mae``, ``count_relative_error``,
    ``count_bias`` (objects per image, :func:`count_errors`); ``n_images``, ``n_pred``, ``n_gt``."""
    pixel = pixel_metrics_dataset(preds, gts)
    matched = match_dataset(preds, gts, thresholds=(thresh,))["by_threshold"][float(thresh)]
    counts = count_errors([_relabel(_as_labels(p, "pred"))[1] for p in preds],
                          [_relabel(_as_labels(g, "gt"))[1] for g in gts])
    return {
        "pixel_dice": pixel["dice"], "pixel_precision": pixel["precision"], "pixel_recall": pixel["recall"],
        "object_f1": matched["f1"], "object_precision": matched["precision"], "object_recall": matched["recall"],
        "ap": matched["ap"], "object_dice": object_metrics_dataset(preds, gts)["dice"],
        "count_mae": counts["mae"], "count_relative_error": counts["relative_error"], "count_bias": counts["bias"],
        "n_images": len(preds), "n_pred": matched["n_pred"], "n_gt": matched["n_gt"],
    }


# --------------------------------------------------------------------------------------------------------
# Sets of label images and label folders (what ``cellkit evaluate segmentation`` scores)
# --------------------------------------------------------------------------------------------------------


def read_label_folder(path: str | Path, what: str = "labels") -> dict[str, np.ndarray]:
    """Instance label images of folder ``path`` by file stem (``labels/`` or ``masks/`` inside it is used when
    present, e.g. a dataset folder). Each must be a single-channel integer image (0 background, one id per
    object) in a lossless format; a one-line DataError names the first file that is not."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of {what}")
    folder = next((folder / n for n in ("labels", "masks") if (folder / n).is_dir()), folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.stem.endswith("_overlay"))
    if not files:
        raise DataError(f"{folder}: no label images found ({', '.join(IMAGE_SUFFIXES)})")
    out = {}
    for file in files:
        if file.suffix.lower() in (".jpg", ".jpeg"):
            raise DataError(f"{file}: label images must be lossless (PNG or TIFF); JPEG compression changes ids")
        label = read_image(file)
        if label.ndim != 2:
            raise DataError(f"{file}: not an instance mask: it has {label.shape[-1]} channels, expected one "
                            "channel of integer ids")
        if not np.issubdtype(label.dtype, np.integer):
            raise DataError(f"{file}: not an instance mask: pixel type {label.dtype}, expected integer ids")
        if label.size and label.min() < 0:
            raise DataError(f"{file}: not an instance mask: negative ids")
        values = np.unique(label)
        if label.dtype == np.uint8 and set(values.tolist()) == {0, 255} and ndimage.label(label > 0)[1] > 1:
            raise DataError(f"{file}: a binary mask (0 and 255), not an instance mask; give each object its own id")
        if file.stem in out:
            raise DataError(f"{folder}: two label files with the stem {file.stem!r}")
        out[file.stem] = label
    return out


def evaluate_label_folders(pred_dir: str | Path, gt_dir: str | Path, on_warning: Callable[[str], None] | None = None,
                           skip_missing: bool = False) -> dict[str, Any]:
    """Score predicted instance images against reference ones, matched by file stem.

    Returns (JSON-ready) ``n_images``, ``precision``, ``recall``, ``f1``, ``ap``, ``pq``, ``mean_iou`` at IoU 0.5
    (:func:`match_dataset`), ``seg`` (:func:`seg_dataset`), ``iou_sweep`` (the same scores at IoU 0.5 ... 0.9),
    ``pixel`` and ``object`` (report 003's pixel- and object-level scores), ``per_image``, and ``n_missing`` with
    ``missing`` (what was done with them).

    A reference image without a prediction counts as an empty prediction, every nucleus in it missed (leaving it
    out would raise the scores of a method that fails on hard images); ``skip_missing`` leaves such images out
    instead. Predictions without a reference are left out. Both are reported through ``on_warning``. No stem in
    common, or a size mismatch, is a one-line DataError.
    """
    preds, gts = read_label_folder(pred_dir, "predicted labels"), read_label_folder(gt_dir, "reference labels")
    common = sorted(set(preds) & set(gts))
    if not common:
        raise DataError(f"no file stem is both in {pred_dir} and in {gt_dir}; name predictions like the reference "
                        f"files (e.g. {next(iter(gts))}.png)")
    missing, extra = sorted(set(gts) - set(preds)), sorted(set(preds) - set(gts))
    if extra and on_warning is not None:
        on_warning(f"{len(extra)} prediction file(s) without a reference left out, e.g. {extra[0]!r}")
    if missing and on_warning is not None:
        done = "left out (--skip-missing)" if skip_missing else "counted as empty predictions, every nucleus missed"
        on_warning(f"{len(missing)} reference file(s) without a prediction {done}, e.g. {missing[0]!r}")
    for stem in common:
        if preds[stem].shape != gts[stem].shape:
            raise DataError(f"{stem}: the prediction is {preds[stem].shape} but the reference is "
                            f"{gts[stem].shape}; they must have the same size")
    scored = common if skip_missing else sorted(gts)
    p = [preds[s] if s in preds else np.zeros_like(gts[s]) for s in scored]
    report = segmentation_scores(p, [gts[s] for s in scored], ids=scored)
    report["n_missing"] = len(missing)
    report["missing"] = "left out" if skip_missing else "counted as empty predictions"
    return report


def segmentation_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                        ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Every segmentation score of label images ``preds`` against ``gts`` (pooled over images), JSON-ready:
    the matching scores at IoU 0.5 at the top level, ``seg``, ``iou_sweep``, ``pixel``, ``object`` and
    ``per_image`` (id, n_gt, n_pred, tp, fp, fn, f1, ap, seg and n_reference of each image: what
    :func:`segmentation_intervals` resamples)."""
    matched = match_dataset(preds, gts)
    seg = seg_dataset(preds, gts)
    at50 = matched["by_threshold"][0.5]
    ids = list(ids) if ids is not None else [str(i) for i in range(len(preds))]
    per_image = []
    for name, pred, gt, image_seg, n_reference in zip(ids, preds, gts, seg["per_image"],
                                                      seg["n_reference_per_image"], strict=True):
        one = match_instances(pred, gt, 0.5)
        per_image.append({"id": name, "n_gt": one["n_gt"], "n_pred": one["n_pred"], "tp": one["tp"],
                          "fp": one["fp"], "fn": one["fn"], "f1": one["f1"], "ap": one["ap"], "seg": image_seg,
                          "n_reference": n_reference})
    return {
        "n_images": len(preds),
        **{k: at50[k] for k in ("precision", "recall", "f1", "ap", "pq", "mean_iou", "tp", "fp", "fn", "n_gt",
                                "n_pred")},
        "seg": seg["seg"],
        "n_reference": seg["n_reference"],
        "iou_sweep": [{k: row[k] for k in ("thresh", "precision", "recall", "f1", "ap", "pq")}
                      for row in matched["table"]],
        "pixel": {k: v for k, v in pixel_metrics_dataset(preds, gts).items()},
        "object": {k: v for k, v in object_metrics_dataset(preds, gts).items()},
        "per_image": per_image,
    }


def scores_by_group(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], groups: Sequence[str]) -> list[dict]:
    """F1, AP and PQ at IoU 0.5 and SEG pooled within each group of images (e.g. DSB size groups), one row per
    group in order of first appearance, plus one ``all`` row."""
    rows = []
    groups = list(groups)
    for group in [*dict.fromkeys(groups), "all"]:
        index = [i for i, g in enumerate(groups) if group in ("all", g)]
        s = segmentation_scores([preds[i] for i in index], [gts[i] for i in index])
        rows.append({"group": group, "images": len(index), "nuclei": s["n_gt"], "f1": s["f1"], "ap": s["ap"],
                     "pq": s["pq"], "seg": s["seg"], "precision": s["precision"], "recall": s["recall"]})
    return rows


# --------------------------------------------------------------------------------------------------------
# Intervals: a bootstrap over test images (or folds), and paired differences between two models
# --------------------------------------------------------------------------------------------------------

#: Resamples of every bootstrap: the 2.5 % and 97.5 % quantiles of 2,000 resamples move by about 0.1 % of the
#: interval's width from one seed to another.
N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A score with its confidence interval: ``estimate`` (on all units), ``low`` and ``high`` (the bootstrap
    percentile interval at ``confidence``), the number of units resampled (images, folds) and of resamples."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_units: int
    n_resamples: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def verdict(self, names: tuple[str, str] = ("the first", "the second")) -> str:
        """For a difference first - second: which one is better, or ``not resolved`` when the interval holds 0."""
        if self.low > 0:
            return f"{names[0]} is better"
        if self.high < 0:
            return f"{names[1]} is better"
        return "not resolved (the interval includes 0)"

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def bootstrap_interval(samples: Sequence[np.ndarray], statistic: Callable[..., float], confidence: float = 0.95,
                       n_resamples: int = N_RESAMPLES, seed: int = 0) -> Interval:
    """The bootstrap percentile interval of ``statistic(*samples)``.

    ``samples`` are arrays with one entry per unit along their first axis (e.g. per-image counts); the units are
    resampled with replacement, the same units for every array (a paired resample), ``n_resamples`` times with
    ``seed`` (``scipy.stats.bootstrap``). ``statistic`` takes the arrays and returns one number. Percentile rather
    than BCa: it stays defined when every resample gives the same value (a model compared with itself).
    """
    arrays = [np.asarray(sample) for sample in samples]
    n = len(arrays[0])
    if n < 2 or any(len(a) != n for a in arrays):
        raise ValueError(f"need two or more units, the same number in every sample; got {[len(a) for a in arrays]}")
    index = np.arange(n)
    result = stats.bootstrap((index,), lambda i: statistic(*(a[i] for a in arrays)), vectorized=False,
                             n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                             rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(float(statistic(*arrays)), float(low), float(high), confidence, n, n_resamples)


def paired_difference(samples_a: Sequence[np.ndarray], samples_b: Sequence[np.ndarray],
                      statistic: Callable[..., float], confidence: float = 0.95, n_resamples: int = N_RESAMPLES,
                      seed: int = 0) -> Interval:
    """``statistic(*samples_a) - statistic(*samples_b)`` with its bootstrap interval, for two models scored on the
    same units (the same test images, or the same folds): each resample draws the same units for both, so the
    interval reflects how the two differ, not how hard the units are."""
    k = len(samples_a)
    return bootstrap_interval([*samples_a, *samples_b], lambda *s: statistic(*s[:k]) - statistic(*s[k:]),
                              confidence, n_resamples, seed)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def accuracy_interval(y_true: Sequence, y_pred: Sequence, **options) -> Interval:
    """Accuracy over test images with its bootstrap interval (``options``: of :func:`bootstrap_interval`)."""
    return bootstrap_interval([np.asarray(y_true) == np.asarray(y_pred)], _mean, **options)


def macro_f1_interval(y_true: Sequence, y_pred: Sequence, n_classes: int, **options) -> Interval:
    """Macro-F1 (over the classes present, as :func:`classification_report`) of class indices ``y_true`` and
    ``y_pred`` (n,), in 0..n_classes-1, with its bootstrap interval over test images."""
    return bootstrap_interval([np.asarray(y_true), np.asarray(y_pred)],
                              lambda t, p: macro_f1_score(t, p, n_classes), **options)


def macro_f1_score(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Macro-F1 of class indices ``y_pred`` against ``y_true`` (n,), in 0..n_classes-1, over the classes that occur
    in either (as :func:`classification_report`). From the confusion matrix by bincount: the same number as
    scikit-learn's, about 20 times faster, which matters when a bootstrap calls it thousands of times."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    matrix = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    counted = matrix.sum(axis=0) + matrix.sum(axis=1)  # 2 TP + FP + FN of each class
    present = counted > 0
    return float(np.mean(2 * np.diag(matrix)[present] / counted[present]))


def matching_counts(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], thresh: float = 0.5) -> np.ndarray:
    """Per-image TP, FP and FN of :func:`match_instances` at IoU ``thresh``, int64 (n_images, 3): the units of
    :func:`matching_interval`."""
    rows = [_match_counts(iou, thresh) for iou in _per_image(_instance_ious, preds, gts)]
    return np.array([[row["tp"], row["fp"], row["fn"]] for row in rows], dtype=np.int64)


def pooled_matching_score(counts: np.ndarray, score: str = "f1") -> float:
    """F1 = 2 TP / (2 TP + FP + FN) or AP = TP / (TP + FP + FN) of per-image counts (n, 3) summed over the images
    (as :func:`match_dataset` pools them); 1.0 when there is nothing to find and nothing was found."""
    tp, fp, fn = np.asarray(counts).sum(axis=0)
    if score not in ("f1", "ap"):
        raise ValueError(f"score must be f1 or ap, got {score!r}")
    num, den = (2 * tp, 2 * tp + fp + fn) if score == "f1" else (tp, tp + fp + fn)
    return float(num / den) if den else 1.0


def matching_interval(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], score: str = "f1", thresh: float = 0.5,
                      **options) -> Interval:
    """F1 or AP at IoU ``thresh`` pooled over images, with its bootstrap interval over the images."""
    return bootstrap_interval([matching_counts(preds, gts, thresh)], lambda c: pooled_matching_score(c, score),
                              **options)


def seg_sums(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image (sum of the reference nuclei's SEG Jaccards, number of reference nuclei), float64 (n_images, 2):
    the units of :func:`seg_interval`."""
    return np.array([[j.sum(), j.size] for j in _per_image(_seg_jaccards, preds, gts)], dtype=np.float64)


def pooled_seg(sums: np.ndarray) -> float:
    """SEG pooled over the nuclei of all images (:func:`seg_dataset`) from per-image sums (n, 2)."""
    total, nuclei = np.asarray(sums).sum(axis=0)
    return float(total / nuclei) if nuclei else float("nan")


def seg_interval(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], **options) -> Interval:
    """SEG pooled over the nuclei of the images, with its bootstrap interval over the images."""
    return bootstrap_interval([seg_sums(preds, gts)], pooled_seg, **options)


def pixel_counts(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image foreground pixels TP, FP, FN of :func:`pixel_metrics`, int64 (n_images, 3): the units of
    :func:`pixel_dice_interval`."""
    rows = _per_image(_pixel_counts, preds, gts)
    return np.array([[row["tp"], row["fp"], row["fn"]] for row in rows], dtype=np.int64)


def pooled_pixel_dice(counts: np.ndarray) -> float:
    """Pixel Dice 2 TP / (2 TP + FP + FN) of per-image pixel counts (n, 3) summed over the images (as
    :func:`pixel_metrics_dataset` pools them); 1.0 when both are empty everywhere."""
    tp, fp, fn = np.asarray(counts).sum(axis=0)
    return _ratio(2 * tp, 2 * tp + fp + fn, tp + fp + fn == 0)


def pixel_dice_interval(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], **options) -> Interval:
    """Pixel Dice of the foreground pooled over the images, with its bootstrap interval over the images."""
    return bootstrap_interval([pixel_counts(preds, gts)], pooled_pixel_dice, **options)


def report_intervals(report: dict, **options) -> dict[str, Interval]:
    """Accuracy and macro-F1 of a :func:`classification_report` with their bootstrap intervals over its images.

    The confusion matrix holds every (true, predicted) pair of the report, and pairs are all that a bootstrap over
    images resamples, so the report alone is enough: no predictions need to be kept.
    """
    matrix = np.asarray(report["confusion_matrix"])
    true_class, predicted = np.nonzero(matrix)
    counts = matrix[true_class, predicted]
    y_true, y_pred = np.repeat(true_class, counts), np.repeat(predicted, counts)
    return {"accuracy": accuracy_interval(y_true, y_pred, **options),
            "macro_f1": macro_f1_interval(y_true, y_pred, len(matrix), **options)}


def _per_image_units(scores: dict) -> dict[str, np.ndarray]:
    """The units a bootstrap resamples, from the ``per_image`` rows of :func:`segmentation_scores`: TP, FP, FN
    (n_images, 3) for F1 and AP, and the sum of SEG Jaccards with the number of reference nuclei (n_images, 2)."""
    rows = scores["per_image"]
    counts = np.array([[row["tp"], row["fp"], row["fn"]] for row in rows], dtype=np.int64)
    sums = np.array([[row["seg"] * row["n_reference"] if row["n_reference"] else 0.0, row["n_reference"]]
                     for row in rows], dtype=np.float64)
    return {"f1": counts, "ap": counts, "seg": sums}


def _pooled(score: str) -> Callable[[np.ndarray], float]:
    return pooled_seg if score == "seg" else (lambda counts: pooled_matching_score(counts, score))


def segmentation_intervals(scores: dict, **options) -> dict[str, Interval]:
    """F1 and AP at IoU 0.5 and SEG of :func:`segmentation_scores` with their bootstrap intervals over its images,
    resampled from its ``per_image`` rows (no label image needs to be kept)."""
    units = _per_image_units(scores)
    return {score: bootstrap_interval([units[score]], _pooled(score), **options) for score in ("f1", "ap", "seg")}


def scores_difference(scores_a: dict, scores_b: dict, score: str = "seg", **options) -> Interval:
    """``score`` (``f1``, ``ap`` or ``seg``) of :func:`segmentation_scores` ``scores_a`` minus that of ``scores_b``,
    two methods scored on the same images in the same order, with its paired bootstrap interval over the images."""
    ids_a = [row["id"] for row in scores_a["per_image"]]
    if ids_a != [row["id"] for row in scores_b["per_image"]]:
        raise ValueError("the two scores are not of the same images in the same order")
    return paired_difference([_per_image_units(scores_a)[score]], [_per_image_units(scores_b)[score]],
                             _pooled(score), **options)


def pooled_over_runs(runs: Sequence[dict]) -> dict[str, Any]:
    """Several :func:`segmentation_scores` of the same images in the same order (e.g. one recipe trained with
    several seeds) as one: each image's TP, FP, FN, reference nuclei and sum of SEG Jaccards added over the runs.

    F1 and AP at IoU 0.5 and SEG are then pooled over runs and images alike, and :func:`segmentation_intervals` and
    :func:`scores_difference` accept the result: they resample images, each with all its runs' counts, so the
    interval is over images while the seeds are averaged. Returns ``n_images``, ``n_runs``, ``f1``, ``ap``, ``seg``
    and ``per_image`` (id, tp, fp, fn, n_reference, seg: the nuclei-weighted mean over the runs).
    """
    if not runs:
        raise ValueError("no runs to pool")
    ids = [row["id"] for row in runs[0]["per_image"]]
    if any([row["id"] for row in run["per_image"]] != ids for run in runs[1:]):
        raise ValueError("the runs are not scored on the same images in the same order")
    units = [_per_image_units(run) for run in runs]
    counts = sum(u["f1"] for u in units)
    sums = sum(u["seg"] for u in units)
    per_image = [{"id": name, "tp": int(tp), "fp": int(fp), "fn": int(fn), "n_reference": int(n),
                  "seg": float(total / n) if n else 0.0}
                 for name, (tp, fp, fn), (total, n) in zip(ids, counts, sums, strict=True)]
    return {"n_images": len(ids), "n_runs": len(runs), "f1": pooled_matching_score(counts, "f1"),
            "ap": pooled_matching_score(counts, "ap"), "seg": pooled_seg(sums), "per_image": per_image}


def interval_fields(intervals: dict[str, Interval], names: dict[str, str]) -> dict[str, list[float]]:
    """Headline entries ``<name>_ci: [low, high]`` for the intervals named in ``names`` (interval key -> headline
    name), as the results table reads them beside ``<name>``."""
    return {f"{headline}_ci": [intervals[key].low, intervals[key].high] for key, headline in names.items()}


#: The scores of :func:`agreement_intervals` and :func:`agreement_differences`: name -> ``score`` of
#: :func:`segmentation_difference`.
AGREEMENT_SCORES = {"pixel_dice": "pixel_dice", "object_f1": "f1", "seg": "seg"}


def agreement_intervals(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], **options) -> dict[str, Interval]:
    """Pixel Dice, object F1 at IoU 0.5 and SEG of label images ``preds`` against ``gts``, each pooled over the
    images with its bootstrap interval over the images (``options``: of :func:`bootstrap_interval`)."""
    return {"pixel_dice": pixel_dice_interval(preds, gts, **options),
            "object_f1": matching_interval(preds, gts, "f1", **options), "seg": seg_interval(preds, gts, **options)}


def agreement_differences(preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                          **options) -> dict[str, Interval]:
    """The scores of :func:`agreement_intervals` of ``preds_a`` minus those of ``preds_b``, both against the same
    reference images ``gts``, each with its paired bootstrap interval over the images."""
    return {name: segmentation_difference(preds_a, preds_b, gts, score, **options)
            for name, score in AGREEMENT_SCORES.items()}


def interval_table(rows: dict[str, dict[str, Interval]], digits: int = 3) -> pd.DataFrame:
    """A table to read: one row per entry of ``rows`` (e.g. a method), one column per score, each cell
    ``estimate [low, high]`` rounded to ``digits``."""
    def cell(interval: Interval) -> str:
        return f"{interval.estimate:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"

    return pd.DataFrame({name: {score: cell(i) for score, i in scores.items()} for name, scores in rows.items()}).T


def accuracy_difference(y_true: Sequence, pred_a: Sequence, pred_b: Sequence, **options) -> Interval:
    """Accuracy of predictions ``pred_a`` minus that of ``pred_b`` on the same test images, with its paired
    bootstrap interval."""
    y_true = np.asarray(y_true)
    return paired_difference([y_true == np.asarray(pred_a)], [y_true == np.asarray(pred_b)], _mean, **options)


def segmentation_difference(preds_a: Sequence[np.ndarray], preds_b: Sequence[np.ndarray],
                            gts: Sequence[np.ndarray], score: str = "seg", **options) -> Interval:
    """``score`` (``seg``, ``f1``/``ap`` at IoU 0.5, or ``pixel_dice``) of label images ``preds_a`` minus that of
    ``preds_b`` on the same reference images ``gts``, with its paired bootstrap interval over the images."""
    if score == "seg":
        return paired_difference([seg_sums(preds_a, gts)], [seg_sums(preds_b, gts)], pooled_seg, **options)
    if score == "pixel_dice":
        return paired_difference([pixel_counts(preds_a, gts)], [pixel_counts(preds_b, gts)], pooled_pixel_dice,
                                 **options)
    return paired_difference([matching_counts(preds_a, gts)], [matching_counts(preds_b, gts)],
                             lambda c: pooled_matching_score(c, score), **options)
