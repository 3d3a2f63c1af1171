"""Notebook 05's study (report 000): input transformations x models, each model cross-validated over stratified
folds, with time, memory and throughput per fold.

>>> from cellkit import datasets, study
>>> pool, test = datasets.load_pbc28("train"), datasets.load_pbc28("test")
>>> rows = study.cross_validate("basic-cnn", "normalised", pool, test, folds=4, epochs=5)
>>> table = study.study_table(rows)                  # mean and spread over folds per model x input

:data:`STUDY_INPUTS` holds report 000's inputs with its parameters (raw, normalised, augmented, Gaussian blur,
Canny, Sobel, cell mask); :func:`kfold_indices` the stratified, seeded folds. :data:`REPORT000_CLAIMS` holds the
report's findings as comparisons of two cells of the grid, and :func:`claim_verdicts` says which of them hold here
(a difference beyond one standard deviation over folds):

>>> findings = pd.DataFrame(study.claim_verdicts(table, study.REPORT000_CLAIMS, optimisers))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np

from cellkit import classifiers, metrics, runtime, transforms
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, ImageSet
from cellkit.datasets.loaders import PBC_CROP
from cellkit.training import FitConfig, at_size, fit, throughput

keras = runtime.keras_module()


@dataclass(frozen=True)
class StudyInput:
    """One input of report 000's study: an image transformation of uint8 RGB batches (n, h, w, 3) -> the same
    shape and dtype (None: the images as they are), the model input scaling (a key of
    :data:`cellkit.classifiers.PREPROCESSING`) and the training augmentation
    (:func:`cellkit.transforms.augment_batch`)."""

    transform: Any
    preprocessing: str
    augment: str
    description: str


def _each(fn: Any) -> Any:
    """A per-image transform applied to a batch; a grey (h, w) result is copied to three channels."""
    def batch(images: np.ndarray) -> np.ndarray:
        out = np.stack([fn(image) for image in images]) if len(images) else images.copy()
        return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 3 else out
    return batch


#: Report 000's inputs with its parameters. All but ``raw`` are normalised per image (the report's first finding
#: was that normalisation helps everywhere, so the other transformations build on it).
STUDY_INPUTS: dict[str, StudyInput] = {
    "raw": StudyInput(None, "raw", "none", "pixel values 0..255, not normalised"),
    "normalised": StudyInput(None, "zscore", "none", "per-image standardisation (mean 0, sd 1)"),
    "augmented": StudyInput(None, "zscore", "flip_rotate50", "normalised + random flips and rotation -50..50 deg"),
    "gaussian_blur": StudyInput(_each(transforms.gaussian_blur), "zscore", "none", "Gaussian blur, 25x25 kernel"),
    "canny": StudyInput(_each(transforms.canny), "zscore", "none", "Canny edges, thresholds 10 and 200"),
    "sobel": StudyInput(_each(transforms.sobel), "zscore", "none", "Sobel gradient magnitude per channel"),
    "cell_mask": StudyInput(transforms.cell_mask_input, "zscore", "none", "only the central cell (mask)"),
}


def study_input(name: str) -> StudyInput:
    """The :data:`STUDY_INPUTS` entry ``name``; a one-line ValueError naming the known inputs otherwise."""
    try:
        return STUDY_INPUTS[name]
    except KeyError:
        raise ValueError(f"unknown input {name!r}; choose one of: {', '.join(STUDY_INPUTS)}") from None


def study_images(images: np.ndarray, name: str, size: int, crop: int | None = PBC_CROP) -> np.ndarray:
    """uint8 RGB ``images`` brought to ``size`` x ``size`` (:func:`cellkit.classifiers.prepare_images`), then
    transformed as input ``name`` prescribes (at the model's size, so edges stay one pixel wide)."""
    entry = study_input(name)
    x = at_size(images, size, crop)
    return entry.transform(x) if entry.transform is not None else x


def kfold_indices(labels: np.ndarray, folds: int, seed: int = DEFAULT_SEED) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled, seeded k-fold split: ``folds`` pairs of (training indices, held-out indices);
    every index is held out exactly once and each class is spread over the folds as evenly as possible."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"k-fold cross-validation needs at least 2 folds, got {folds}")
    smallest = int(np.bincount(labels).min()) if len(labels) else 0
    if smallest < folds:
        raise DataError(f"{folds}-fold cross-validation needs at least {folds} images of each class; "
                        f"the smallest class has {smallest}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(train, held) for train, held in splitter.split(np.zeros(len(labels)), labels)]


def _scores(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Accuracy and macro precision, recall and F1 of a classification report, keys prefixed."""
    per_class = report["per_class"].values()
    return {f"{prefix}_accuracy": report["accuracy"],
            f"{prefix}_precision": float(np.mean([c["precision"] for c in per_class])),
            f"{prefix}_recall": float(np.mean([c["recall"] for c in per_class])),
            f"{prefix}_f1": report["macro_f1"]}


def cross_validate(model_name: str, input_name: str, pool: ImageSet, test: ImageSet | None = None, folds: int = 4,
                   config: FitConfig | None = None, precision: str = "auto", seed: int = DEFAULT_SEED,
                   crop: int | None = PBC_CROP, throughput_seconds: float = 1.0, progress: str = "none",
                   fold_limit: int | None = None) -> list[dict[str, Any]]:
    """k-fold cross-validation of registered model ``model_name`` on input ``input_name`` (:data:`STUDY_INPUTS`).

    ``pool`` is split by :func:`kfold_indices`; each fold trains a fresh model (``config``, default: the model's
    recipe, with the input's augmentation) on the other folds, with the held-out fold as validation split (early
    stopping watches it), and scores it on the held-out fold and, if given, on ``test`` (never used for any
    choice). ``fold_limit`` runs only the first folds (e.g. an optimiser comparison on one fold).

    Returns one row per fold: model, input, fold, ``cv_*`` and ``test_*`` accuracy and macro precision, recall,
    F1, ``test_f1_per_class`` ({class: F1}), ``history``, ``train_seconds``, ``cpu_seconds``,
    ``seconds_per_epoch``, ``ms_per_image_epoch`` (training time per image and epoch), ``peak_rss_mb`` (process
    peak while fitting), ``rss_increase_mb``, ``params`` and ``images_per_second`` (inference, wall clock).
    """
    entry, source = classifiers.spec(model_name), study_input(input_name)
    size = entry.input_size
    config = replace(config or FitConfig.for_model(model_name), augment=source.augment)
    x_pool = study_images(pool.images, input_name, size, crop)
    x_test = study_images(test.images, input_name, size, crop) if test is not None else None
    n_classes = len(pool.class_names)
    rows = []
    for fold, (train_index, held_index) in enumerate(kfold_indices(pool.labels, folds, seed)[:fold_limit]):
        keras.utils.set_random_seed(seed + fold)
        with runtime.dtype_policy(precision):
            model = classifiers.build(model_name, n_classes, size)
            result = fit(model, x_pool[train_index], pool.labels[train_index], x_pool[held_index],
                         pool.labels[held_index], config, source.preprocessing, seed + fold, progress,
                         name=f"{model_name}/{input_name}/fold{fold + 1}")
        row = {"model": model_name, "input": input_name, "fold": fold + 1, "optimizer": config.optimizer,
               "n_train": len(train_index), "n_held_out": len(held_index)}
        row.update(_scores(_report(model, x_pool[held_index], pool.labels[held_index], pool.class_names,
                                   source.preprocessing), "cv"))
        if x_test is not None:
            report = _report(model, x_test, test.labels, test.class_names, source.preprocessing)
            row.update(_scores(report, "test"))
            row["test_f1_per_class"] = {name: c["f1"] for name, c in report["per_class"].items()}
        row.update({
            "history": result.history, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "train_seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
            "seconds_per_epoch": result.seconds_per_epoch,
            "ms_per_image_epoch": 1000 * result.seconds / max(result.epochs_run * len(train_index), 1),
            "peak_rss_mb": result.peak_rss_mb, "rss_increase_mb": result.rss_increase_mb,
            "params": model.count_params(), "precision": result.precision,
            "images_per_second": throughput(model, x_pool[held_index][:512], source.preprocessing,
                                            min_seconds=throughput_seconds) if throughput_seconds > 0 else None,
        })
        rows.append(row)
        keras.backend.clear_session()
    return rows


#: The scores :func:`study_table` averages over folds.
STUDY_SCORES = ("cv_accuracy", "cv_precision", "cv_recall", "cv_f1", "test_accuracy", "test_precision",
                "test_recall", "test_f1")


def study_table(rows: Sequence[dict[str, Any]], by: Sequence[str] = ("model", "input")) -> Any:
    """Rows of :func:`cross_validate` -> a pandas DataFrame indexed by ``by``: the mean over folds of each score
    of :data:`STUDY_SCORES` present, its standard deviation over folds (``*_sd``; 0 for one fold), ``folds``,
    and the mean ``train_seconds``, ``ms_per_image_epoch``, ``peak_rss_mb``, ``rss_increase_mb``,
    ``images_per_second`` and ``params``."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    scores = [c for c in STUDY_SCORES if c in frame]
    costs = [c for c in ("train_seconds", "ms_per_image_epoch", "peak_rss_mb", "rss_increase_mb",
                         "images_per_second", "params") if c in frame]
    grouped = frame.groupby(list(by), sort=False)
    table = grouped[scores + costs].mean()
    spread = grouped[scores].std(ddof=1).fillna(0.0).add_suffix("_sd")
    return table.join(spread).assign(folds=grouped.size())


def _report(model: Any, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            preprocessing: str) -> dict[str, Any]:
    return metrics.proba_report(labels, classifiers.predict_proba(model, images, preprocessing), class_names)


# --- report 000's findings, re-tested -------------------------------------------------------------------------


class Claim(NamedTuple):
    """A finding of report 000 as a comparison of two cells of the grid: ``said`` (the report's words) claims that
    the held-out accuracy of (``model_a``, ``input_a``) minus that of (``model_b``, ``input_b``) has the sign
    ``sign`` (+1: a is better, -1: a is worse)."""

    said: str
    model_a: str
    input_a: str
    model_b: str
    input_b: str
    sign: int


#: Report 000's findings that one grid of :func:`cross_validate` runs can re-test.
REPORT000_CLAIMS: tuple[Claim, ...] = (
    Claim("normalisation helps (basic CNN: precision doubled)", "basic-cnn", "normalised", "basic-cnn", "raw", +1),
    Claim("augmentation: +0.9% accuracy (basic CNN)", "basic-cnn", "augmented", "basic-cnn", "normalised", +1),
    Claim("Gaussian blur hurts the basic CNN (-0.5 to -0.7%)", "basic-cnn", "gaussian_blur", "basic-cnn", "normalised",
          -1),
    Claim("Canny hurts the basic CNN (-0.5 to -0.7%)", "basic-cnn", "canny", "basic-cnn", "normalised", -1),
    Claim("Sobel hurts the basic CNN (-0.5 to -0.7%)", "basic-cnn", "sobel", "basic-cnn", "normalised", -1),
    Claim("Gaussian blur helps ResNet-18 (+6.4%)", "resnet18", "gaussian_blur", "resnet18", "normalised", +1),
    Claim("Sobel helps ResNet-18 (+4.3%)", "resnet18", "sobel", "resnet18", "normalised", +1),
    Claim("cell mask helps ResNet-18 (+3.3%)", "resnet18", "cell_mask", "resnet18", "normalised", +1),
    Claim("Gaussian blur helps ResNet-50 (+5.16%)", "resnet50", "gaussian_blur", "resnet50", "normalised", +1),
    Claim("ResNet-18 beats the basic CNN (17% vs 15%)", "resnet18", "normalised", "basic-cnn", "normalised", +1),
    Claim("ResNet-18 beats ResNet-50 (17% vs 14.5%)", "resnet18", "normalised", "resnet50", "normalised", +1),
    Claim("ViT beats ResNet-18 by about 4%", "vit", "normalised", "resnet18", "normalised", +1),
)


def accuracy_gap(table: Any, a: tuple[str, str], b: tuple[str, str]) -> tuple[float | None, float | None, int]:
    """(mean held-out accuracy of cell ``a`` minus cell ``b``, the larger of their fold standard deviations, the
    fewer of their folds) in a :func:`study_table` indexed by (model, input); (None, None, 0) when a cell is
    missing (not run)."""
    if a not in table.index or b not in table.index:
        return None, None, 0
    first, second = table.loc[a], table.loc[b]
    return (float(first["cv_accuracy"] - second["cv_accuracy"]),
            float(max(first["cv_accuracy_sd"], second["cv_accuracy_sd"])), int(min(first["folds"], second["folds"])))


def claim_verdict(difference: float | None, sd: float | None, folds: int, sign: int) -> str:
    """Whether a claimed sign holds: "holds" when ``sign * difference`` exceeds the fold spread ``sd``, "does not
    hold" when ``-sign * difference`` does, "unclear ..." within the spread or with fewer than 2 folds (no
    spread), "not run in this profile" when ``difference`` is None."""
    if difference is None:
        return "not run in this profile"
    if folds < 2:
        return "unclear (one fold, no spread)"
    if sign * difference > sd:
        return "holds"
    if -sign * difference > sd:
        return "does not hold"
    return "unclear (within the fold spread)"


def claim_verdicts(table: Any, claims: Sequence[Claim] = REPORT000_CLAIMS, optimisers: Any = None
                   ) -> list[dict[str, Any]]:
    """One row per claim: ``report 000 said``, ``comparison``, ``here (points)`` (the difference of mean held-out
    accuracies, percentage points, 1 decimal), ``fold sd (points)`` (the larger fold standard deviation of the two
    cells, the margin a difference must exceed) and ``verdict`` (:func:`claim_verdict`); then, with
    ``optimisers``, the rows of :func:`fluctuation_verdicts`.

    ``table`` is a :func:`study_table` indexed by (model, input). Rows are JSON-ready, as notebook 05 records them:
    None where nothing was measured (a cell not run, no spread), NaN where a measurement is undefined;
    ``pandas.DataFrame(rows)`` shows them as a table.
    """
    rows = []
    for claim in claims:
        difference, sd, folds = accuracy_gap(table, (claim.model_a, claim.input_a), (claim.model_b, claim.input_b))
        rows.append({"report 000 said": claim.said,
                     "comparison": f"{claim.model_a}/{claim.input_a} - {claim.model_b}/{claim.input_b}",
                     "here (points)": None if difference is None else round(100 * difference, 1),
                     "fold sd (points)": None if sd is None else round(100 * sd, 1),
                     "verdict": claim_verdict(difference, sd, folds, claim.sign)})
    return rows + fluctuation_verdicts(optimisers)


def fluctuation_verdicts(optimisers: Any) -> list[dict[str, Any]]:
    """Report 000's "SGD fluctuates more than Adam", one row per model (the columns of :func:`claim_verdicts`).

    ``optimisers`` is a DataFrame with ``model``, ``optimizer`` (``adam``, ``sgd``) and ``val accuracy change per
    epoch`` (the mean absolute change of the validation accuracy from one epoch to the next, NaN after one epoch),
    or None. The verdict is the sign of sgd - adam ("unclear (one epoch)" when it is NaN): one run each, no spread.
    """
    if optimisers is None or not len(optimisers):
        return []
    change = optimisers.pivot(index="model", columns="optimizer", values="val accuracy change per epoch")
    rows = []
    for model_name, row in change.iterrows():
        more = row["sgd"] - row["adam"]
        rows.append({"report 000 said": f"SGD fluctuates more than Adam ({model_name})",
                     "comparison": "mean |change| of validation accuracy per epoch, sgd - adam",
                     "here (points)": round(100 * more, 1), "fold sd (points)": None,
                     "verdict": "unclear (one epoch)" if np.isnan(more) else
                     "holds" if row["sgd"] > row["adam"] else "does not hold"})
    return rows
