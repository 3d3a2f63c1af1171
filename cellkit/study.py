"""Notebook 05's study (report 000): input transformations x models, each cell cross-validated over stratified
folds with early stopping on an inner validation split, the held-out folds only scored, and the test split read
once at the end for the cells the study names, each comparison a paired difference with its 95 % interval.

>>> from cellkit import datasets, study
>>> pool, test = datasets.load_pbc28("train"), datasets.load_pbc28("test")
>>> cell = study.cross_validate(study.Cell("basic-cnn", "normalised"), pool, folds=4, config=config)
>>> table = study.study_table(cell.rows)             # held-out-fold scores, mean and spread per cell
>>> predicted = study.read_test_once([cell, ...], test)          # the one reading of the test split
>>> findings = study.claim_verdicts(predicted, test.labels)        # report 000's findings: holds / reversed / ...

:data:`STUDY_INPUTS` holds report 000's inputs (raw, normalised, augmented, Gaussian blur with its kernel scaled to
the image, Canny, Sobel, cell mask); :func:`kfold_indices` the stratified, seeded folds and :func:`inner_split`
the validation split inside a training fold. :data:`REPORT000_CLAIMS` holds the report's findings as comparisons
of two cells; :func:`claim_verdicts` tests each with :func:`cellkit.metrics.accuracy_difference` on the same test
images.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from cellkit import classifiers, metrics, runtime, transforms
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, ImageSet
from cellkit.datasets.loaders import PBC_CROP
from cellkit.training import FitConfig, at_size, fit, throughput

keras = runtime.keras_module()

#: Report 000's Gaussian blur: a 25x25 kernel on 50x50 cell images (OpenCV's sigma for it: 4.1 px).
REPORT_BLUR_KERNEL, REPORT_IMAGE_SIZE = 25, 50


def _opencv_sigma(kernel: float) -> float:
    """The sigma (pixels) OpenCV's GaussianBlur derives from a kernel side when given none."""
    return 0.3 * ((kernel - 1) / 2 - 1) + 0.8


def scaled_blur_kernel(size: int, kernel: int = REPORT_BLUR_KERNEL, reference: int = REPORT_IMAGE_SIZE) -> int:
    """The odd kernel side whose blur covers the same share of a ``size``-pixel image as a ``kernel`` kernel of a
    ``reference``-pixel one: its OpenCV sigma is the nearest to the reference sigma scaled by size / reference.
    25 at 50 px (sigma 4.1 px), 13 at 28 px (sigma 2.3 px = 4.1 x 28 / 50)."""
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    sigma = _opencv_sigma(kernel) * size / reference
    return max(1, 2 * round((sigma - 0.8) / 0.3 + 1) + 1)


def _scaled_blur(image: np.ndarray) -> np.ndarray:
    return transforms.gaussian_blur(image, ksize=scaled_blur_kernel(image.shape[0]))


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
    "gaussian_blur": StudyInput(_each(_scaled_blur), "zscore", "none",
                                "Gaussian blur, report 000's 25x25 kernel on 50x50 scaled to the image (13x13 at 28)"),
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


def inner_split(train_index: np.ndarray, labels: np.ndarray, fraction: float,
                seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A training fold's indices ``train_index`` -> (indices to fit on, inner validation indices): a stratified,
    seeded ``fraction`` of the fold for early stopping, so that the held-out fold is only ever scored."""
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"the inner validation fraction must be between 0 and 1, got {fraction}")
    train_index = np.asarray(train_index)
    fit_index, val_index = train_test_split(train_index, test_size=fraction, random_state=seed,
                                            stratify=np.asarray(labels)[train_index])
    return np.sort(fit_index), np.sort(val_index)


class Cell(NamedTuple):
    """One cell of the study: a registered model, an input of :data:`STUDY_INPUTS` and an optimizer."""

    model: str
    input: str
    optimizer: str = "adam"

    def __str__(self) -> str:
        return f"{self.model}/{self.input}" + ("" if self.optimizer == "adam" else f"/{self.optimizer}")


@dataclass
class CellRun:
    """What :func:`cross_validate` kept of one cell: a row per fold (held-out scores, curves, time, memory) and
    the weights of each fold's model, so the test split can be scored later, once (:func:`read_test_once`)."""

    cell: Cell
    rows: list[dict[str, Any]]
    weights: list[list[np.ndarray]] = field(repr=False)
    crop: int | None = PBC_CROP


def _scores(report: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Accuracy and macro precision, recall and F1 of a classification report, keys prefixed."""
    per_class = report["per_class"].values()
    return {f"{prefix}_accuracy": report["accuracy"],
            f"{prefix}_precision": float(np.mean([c["precision"] for c in per_class])),
            f"{prefix}_recall": float(np.mean([c["recall"] for c in per_class])),
            f"{prefix}_f1": report["macro_f1"]}


def cross_validate(cell: Cell, pool: ImageSet, folds: int = 4, config: FitConfig | None = None,
                   inner_fraction: float = 0.15, precision: str = "auto", seed: int = DEFAULT_SEED,
                   crop: int | None = PBC_CROP, throughput_seconds: float = 1.0, progress: str = "none",
                   fold_limit: int | None = None) -> CellRun:
    """k-fold cross-validation of ``cell`` (model, input, optimizer) on ``pool``.

    ``pool`` is split by :func:`kfold_indices`; for each fold a fresh model is trained (``config``, default: the
    model's recipe; the cell's optimizer and its input's augmentation override it) on the training folds minus
    an inner validation split (:func:`inner_split`, ``inner_fraction``), on which early stopping watches
    ``config.monitor`` and keeps the best epoch's weights; the held-out fold is only scored. ``fold_limit`` runs
    only the first folds. No test image is read here.

    Returns a :class:`CellRun`: one row per fold with model, input, optimizer, fold, sizes, ``cv_*`` accuracy and
    macro precision, recall, F1 of the held-out fold, ``history``, ``epochs_run``, ``best_epoch``,
    ``train_seconds``, ``cpu_seconds``, ``ms_per_image_epoch`` (training wall time per image and epoch),
    ``peak_rss_mb``, ``rss_increase_mb`` (memory the fit added to the process), ``params``, ``weights_mb``
    (float32 parameters), ``images_per_second`` and ``ms_per_image`` (inference, wall clock); and the weights.
    """
    source, size = study_input(cell.input), classifiers.spec(cell.model).input_size
    config = _cell_config(cell, config)
    x_pool = study_images(pool.images, cell.input, size, crop)
    rows, weights = [], []
    for fold, (train_index, held_index) in enumerate(kfold_indices(pool.labels, folds, seed)[:fold_limit]):
        fit_index, val_index = inner_split(train_index, pool.labels, inner_fraction, seed + fold)
        model, result = _train_cell(cell, config, x_pool[fit_index], pool.labels[fit_index], x_pool[val_index],
                                    pool.labels[val_index], len(pool.class_names), precision, seed + fold,
                                    progress, name=f"{cell}/fold{fold + 1}")
        report = _report(model, x_pool[held_index], pool.labels[held_index], pool.class_names, source.preprocessing)
        speed = (throughput(model, x_pool[held_index][:512], source.preprocessing, min_seconds=throughput_seconds)
                 if throughput_seconds > 0 else None)
        rows.append({
            "model": cell.model, "input": cell.input, "optimizer": cell.optimizer, "fold": fold + 1,
            "n_fit": len(fit_index), "n_inner_val": len(val_index), "n_held_out": len(held_index),
            **_scores(report, "cv"), **_fit_costs(model, result, len(fit_index)), "monitor": config.monitor,
            "images_per_second": speed, "ms_per_image": 1000 / speed if speed else None,
        })
        weights.append([np.array(w) for w in model.get_weights()])
        keras.backend.clear_session()
    return CellRun(cell, rows, weights, crop)


def train_final(cell: Cell, train: ImageSet, val: ImageSet, config: FitConfig | None = None,
                precision: str = "auto", seed: int = DEFAULT_SEED, crop: int | None = PBC_CROP,
                progress: str = "none") -> CellRun:
    """The final model of a chosen ``cell``: one model trained with the cell's recipe (as in
    :func:`cross_validate`) on all of ``train``, early stopping on ``val``. A study compares cells on a small pool;
    once it has chosen one, its final model may learn from every training image, as a cross-validated search
    refits its winner. No test image is read here; score it with :func:`read_test_once`.

    Returns a :class:`CellRun` with one row (sizes, ``history``, ``epochs_run``, ``best_epoch``, training time and
    memory as in :func:`cross_validate`, no held-out scores) and the model's weights.
    """
    size = classifiers.spec(cell.model).input_size
    config = _cell_config(cell, config)
    x_train, x_val = (study_images(part.images, cell.input, size, crop) for part in (train, val))
    model, result = _train_cell(cell, config, x_train, train.labels, x_val, val.labels, len(train.class_names),
                                precision, seed, progress, name=f"{cell}/final")
    row = {"model": cell.model, "input": cell.input, "optimizer": cell.optimizer, "n_fit": len(train),
           "n_val": len(val), **_fit_costs(model, result, len(train)), "monitor": config.monitor}
    weights = [np.array(w) for w in model.get_weights()]
    keras.backend.clear_session()
    return CellRun(cell, [row], [weights], crop)


def budget_config(cell: Cell, config: FitConfig, epoch_caps: dict[str, int] | None = None,
                  sgd_learning_rate: float | None = None) -> FitConfig:
    """The study's ``config`` for ``cell``: at most ``epoch_caps[cell.model]`` epochs when the model has a cap (a
    profile's budget), and ``sgd_learning_rate`` for a cell trained with SGD (Adam keeps the config's rate)."""
    cap = (epoch_caps or {}).get(cell.model, config.epochs)
    config = replace(config, epochs=min(config.epochs, cap))
    if cell.optimizer == "sgd" and sgd_learning_rate is not None:
        config = replace(config, learning_rate=sgd_learning_rate)
    return config


def _cell_config(cell: Cell, config: FitConfig | None) -> FitConfig:
    """``config`` (default: the model's recipe) with the cell's optimizer and its input's augmentation."""
    base = config or FitConfig.for_model(cell.model)
    return replace(base, augment=study_input(cell.input).augment, optimizer=cell.optimizer)


def _train_cell(cell: Cell, config: FitConfig, x_fit: np.ndarray, y_fit: np.ndarray, x_val: np.ndarray,
                y_val: np.ndarray, n_classes: int, precision: str, seed: int, progress: str, name: str) -> tuple:
    """A fresh model of ``cell`` trained on transformed images; returns the model (best epoch's weights) and the
    :class:`cellkit.training.FitResult`."""
    keras.utils.set_random_seed(seed)
    with runtime.dtype_policy(precision):
        model = classifiers.build(cell.model, n_classes, classifiers.spec(cell.model).input_size)
        result = fit(model, x_fit, y_fit, x_val, y_val, config, study_input(cell.input).preprocessing, seed,
                     progress, name=name)
    return model, result


def _fit_costs(model: Any, result: Any, n_fit: int) -> dict[str, Any]:
    """What one training run of :func:`_train_cell` measured: its curves, epochs, time and memory, and the model's
    size (``ms_per_image_epoch``: training wall time per image and epoch)."""
    return {"history": result.history, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early, "train_seconds": result.seconds,
            "cpu_seconds": result.cpu_seconds, "seconds_per_epoch": result.seconds_per_epoch,
            "ms_per_image_epoch": 1000 * result.seconds / max(result.epochs_run * n_fit, 1),
            "peak_rss_mb": result.peak_rss_mb, "rss_increase_mb": result.rss_increase_mb,
            "params": model.count_params(), "weights_mb": 4 * model.count_params() / 2**20,
            "precision": result.precision}


def _report(model: Any, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            preprocessing: str) -> dict[str, Any]:
    return metrics.proba_report(labels, classifiers.predict_proba(model, images, preprocessing), class_names)


def cell_probabilities(run: CellRun, images: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities (n, n_classes) of ``run``'s cell on uint8 ``images``: its input transformation, then
    the mean of its fold models' softmax outputs (one model: that model's)."""
    entry, source = classifiers.spec(run.cell.model), study_input(run.cell.input)
    x = study_images(images, run.cell.input, entry.input_size, run.crop)
    model = classifiers.build(run.cell.model, n_classes, entry.input_size)
    total = np.zeros((len(x), n_classes))
    for weights in run.weights:
        model.set_weights(weights)
        total += classifiers.predict_proba(model, x, source.preprocessing)
    keras.backend.clear_session()
    return total / len(run.weights)


def read_test_once(runs: Sequence[CellRun], test: ImageSet) -> dict[Cell, np.ndarray]:
    """The one reading of the test split: each run's predicted class per test image (n,), by
    :func:`cell_probabilities`, keyed by cell. Call it once, after every choice was made."""
    n_classes = len(test.class_names)
    return {run.cell: cell_probabilities(run, test.images, n_classes).argmax(axis=1) for run in runs}


#: The held-out-fold scores :func:`study_table` averages over folds.
STUDY_SCORES = ("cv_accuracy", "cv_precision", "cv_recall", "cv_f1")
#: The costs :func:`study_table` averages over folds.
STUDY_COSTS = ("epochs_run", "best_epoch", "train_seconds", "cpu_seconds", "ms_per_image_epoch", "peak_rss_mb",
               "rss_increase_mb", "images_per_second", "ms_per_image", "params", "weights_mb")


def study_table(rows: Sequence[dict[str, Any]], by: Sequence[str] = ("model", "input", "optimizer")) -> Any:
    """Rows of :func:`cross_validate` -> a pandas DataFrame indexed by ``by``: the mean over folds of each score
    of :data:`STUDY_SCORES` and cost of :data:`STUDY_COSTS` present, the standard deviation of the scores over
    folds (``*_sd``; 0 for one fold) and ``folds``."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    scores = [c for c in STUDY_SCORES if c in frame]
    costs = [c for c in STUDY_COSTS if c in frame]
    grouped = frame.groupby(list(by), sort=False)
    table = grouped[scores + costs].mean()
    spread = grouped[scores].std(ddof=1).fillna(0.0).add_suffix("_sd")
    return table.join(spread).assign(folds=grouped.size())


def best_cell(table: Any) -> Cell:
    """The cell of a :func:`study_table` with the highest mean held-out-fold accuracy (never a test score)."""
    return Cell(*table["cv_accuracy"].idxmax())


def scores_on_test(predicted: dict[Cell, np.ndarray], y_true: np.ndarray, n_classes: int, **options) -> list[dict]:
    """One row per cell: test accuracy and macro-F1, each with its 95 % bootstrap interval over the test images
    (:func:`cellkit.metrics.accuracy_interval`, :func:`cellkit.metrics.macro_f1_interval`)."""
    rows = []
    for cell, pred in predicted.items():
        accuracy = metrics.accuracy_interval(y_true, pred, **options)
        macro_f1 = metrics.macro_f1_interval(y_true, pred, n_classes, **options)
        rows.append({"model": cell.model, "input": cell.input, "optimizer": cell.optimizer,
                     "test_accuracy": accuracy.estimate, "test_accuracy_ci": [accuracy.low, accuracy.high],
                     "test_macro_f1": macro_f1.estimate, "test_macro_f1_ci": [macro_f1.low, macro_f1.high]})
    return rows


# --- report 000's findings, re-tested -------------------------------------------------------------------------


class Claim(NamedTuple):
    """A finding of report 000 as a comparison of two cells: ``said`` (the report's words) claims that the test
    accuracy of cell ``a`` minus that of cell ``b`` has the sign ``sign`` (+1: a is better, -1: a is worse)."""

    said: str
    a: Cell
    b: Cell
    sign: int


_CNN, _R18, _R50 = "basic-cnn", "resnet18-small", "resnet50"

#: Report 000's findings, each as a comparison of two cells of the study (ResNet-18 is the small-image one).
REPORT000_CLAIMS: tuple[Claim, ...] = (
    Claim("normalisation helps (basic CNN: precision doubled)", Cell(_CNN, "normalised"), Cell(_CNN, "raw"), +1),
    Claim("normalisation helps (ResNet-18)", Cell(_R18, "normalised"), Cell(_R18, "raw"), +1),
    Claim("augmentation: +0.9% accuracy (basic CNN)", Cell(_CNN, "augmented"), Cell(_CNN, "normalised"), +1),
    Claim("Gaussian blur hurts the basic CNN (-0.5 to -0.7%)", Cell(_CNN, "gaussian_blur"), Cell(_CNN, "normalised"),
          -1),
    Claim("Canny hurts the basic CNN (-0.5 to -0.7%)", Cell(_CNN, "canny"), Cell(_CNN, "normalised"), -1),
    Claim("Sobel hurts the basic CNN (-0.5 to -0.7%)", Cell(_CNN, "sobel"), Cell(_CNN, "normalised"), -1),
    Claim("cell mask hurts the basic CNN (-0.5 to -0.7%)", Cell(_CNN, "cell_mask"), Cell(_CNN, "normalised"), -1),
    Claim("Gaussian blur helps ResNet-18 (+6.4%)", Cell(_R18, "gaussian_blur"), Cell(_R18, "normalised"), +1),
    Claim("Sobel helps ResNet-18 (+4.3%)", Cell(_R18, "sobel"), Cell(_R18, "normalised"), +1),
    Claim("cell mask helps ResNet-18 (+3.3%)", Cell(_R18, "cell_mask"), Cell(_R18, "normalised"), +1),
    Claim("blur helps ResNet-18 most (+6.4% vs Sobel's +4.3%)", Cell(_R18, "gaussian_blur"), Cell(_R18, "sobel"),
          +1),
    Claim("Gaussian blur helps ResNet-50 (+5.16%)", Cell(_R50, "gaussian_blur"), Cell(_R50, "normalised"), +1),
    Claim("ResNet-18 beats the basic CNN (17% vs 15%)", Cell(_R18, "normalised"), Cell(_CNN, "normalised"), +1),
    Claim("ResNet-18 beats ResNet-50 (17% vs 14.5%)", Cell(_R18, "normalised"), Cell(_R50, "normalised"), +1),
    Claim("ViT beats ResNet-18 by about 4%", Cell("vit", "normalised"), Cell(_R18, "normalised"), +1),
    Claim("Adam over SGD (basic CNN)", Cell(_CNN, "normalised"), Cell(_CNN, "normalised", "sgd"), +1),
    Claim("Adam over SGD (ResNet-18)", Cell(_R18, "normalised"), Cell(_R18, "normalised", "sgd"), +1),
)

#: The verdicts :func:`claim_verdict` gives.
VERDICTS = ("holds", "reversed", "not resolved at this budget", "not run in this profile")


def claim_verdict(difference: metrics.Interval | None, sign: int) -> str:
    """Whether a claimed sign holds, from the interval of the difference a - b: "holds" when the whole interval
    has the claimed sign, "reversed" when it has the opposite sign, "not resolved at this budget" when it
    includes 0, "not run in this profile" when there is no difference (a cell was not run)."""
    if difference is None:
        return "not run in this profile"
    if difference.low <= 0 <= difference.high:
        return "not resolved at this budget"
    return "holds" if sign * difference.low > 0 else "reversed"


def claim_verdicts(predicted: dict[Cell, np.ndarray], y_true: np.ndarray, claims: Sequence[Claim] = REPORT000_CLAIMS,
                   unflattened: Collection[Cell] = (), **options) -> list[dict[str, Any]]:
    """One row per claim: ``report 000 said``, ``comparison``, ``here (points)`` (test accuracy of a minus b in
    percentage points, 2 decimals), ``95% interval (points)`` (its paired bootstrap interval over the same test
    images, :func:`cellkit.metrics.accuracy_difference`), ``verdict`` (:func:`claim_verdict`) and ``why`` (empty,
    or what kept the verdict at "not resolved at this budget" although the interval excludes 0).

    ``predicted`` maps cells to their predicted classes on the test images ``y_true`` (:func:`read_test_once`).
    A claim on a cell in ``unflattened`` (:func:`unflattened_cells`: a run reached its epoch limit before its
    validation loss flattened) is "not resolved at this budget" whatever its interval: that cell was compared
    before it had finished learning. Rows are JSON-ready; None where a cell was not run. ``options`` go to the
    bootstrap (seed, resamples).
    """
    rows = []
    for claim in claims:
        difference = None
        if claim.a in predicted and claim.b in predicted:
            difference = metrics.accuracy_difference(y_true, predicted[claim.a], predicted[claim.b], **options)
        verdict, why = claim_verdict(difference, claim.sign), ""
        early = [str(cell) for cell in dict.fromkeys((claim.a, claim.b)) if cell in unflattened]
        if difference is not None and early:
            why = f"{' and '.join(early)} reached the epoch limit before the validation loss flattened"
            verdict = "not resolved at this budget"
        rows.append({"report 000 said": claim.said, "comparison": f"{claim.a} - {claim.b}",
                     "here (points)": None if difference is None else round(100 * difference.estimate, 2),
                     "95% interval (points)": None if difference is None else
                     [round(100 * difference.low, 2), round(100 * difference.high, 2)],
                     "verdict": verdict, "why": why})
    return rows


def unflattened_cells(runs: Sequence[CellRun]) -> list[Cell]:
    """The cells of ``runs`` with a fold whose training reached its epoch limit instead of stopping because the
    monitored validation loss had stopped falling (``stopped_early`` false)."""
    return [run.cell for run in runs if not all(row["stopped_early"] for row in run.rows)]


def cells_of(claims: Sequence[Claim]) -> list[Cell]:
    """The cells ``claims`` compare, each once, in order of first mention."""
    return list(dict.fromkeys(cell for claim in claims for cell in (claim.a, claim.b)))
