"""Notebook 06's experiments (report 004, section 2): VGG16 transfer learning, class imbalance, multi-label heads.

Report 004 put two dense ReLU layers, dropout and a softmax on an ImageNet VGG16 base. The base here is
``keras.applications.VGG16(include_top=False)``; its ImageNet weights are used only when the file is on disk
(Keras' cache or a path the user gives): nothing is downloaded behind the user's back, and a missing file is
a one-line error, never a silent switch to other weights.

VGG16 at 96x96 costs about 3 GFLOP per image and pass, so on a CPU nothing runs the frozen blocks twice:
the outputs of blocks 1-4 (:data:`VGG16_CUT`) are computed once per image (:func:`cache_target`), the head is
trained on block 5's outputs (phase 1), and fine-tuning trains block 5 and the head on the cached block-4
outputs (phase 2). Training from scratch has no such shortcut: every step runs the whole network.

==============================================  =================================================================
:func:`build_vgg16_base`, :func:`vgg16_weights`  the base and its weights (ImageNet from disk, or a file)
:func:`build_transfer_head`                      report 004's head; :func:`split_vgg16`, :func:`build_vgg16_classifier`
:func:`cache_target`, :func:`transfer_run`       the frozen blocks once, then head and fine-tuning on the cache
:func:`scratch_run`, :func:`pretrain_source`     the same network from random weights; an offline source task
:func:`imbalanced_subset`, :func:`minority_copies`  class imbalance and report 004's remedy
:func:`multilabel_scores`                        binary relevance or one multi-output head
==============================================  =================================================================
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import metrics, runtime, transforms
from cellkit.classifiers import outputs_of
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, ImageSet
from cellkit.training import FitConfig, FitResult, MemorySampler, at_size, balanced_weights, fit, fit_arrays, scope_name

keras = runtime.keras_module()


# --------------------------------------------------------------------------------------------------------
# VGG16: base, weights, head
# --------------------------------------------------------------------------------------------------------

#: The ImageNet weights of the VGG16 base without its top, as Keras publishes them (the md5 Keras checks).
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_NOTOP_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/vgg16/{VGG16_NOTOP_FILE}"
VGG16_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
#: Environment variable naming a weights file for the VGG16 base (overrides Keras' cache).
VGG16_WEIGHTS_ENV = "CELLKIT_VGG16_WEIGHTS"
#: The layer after which the base is cut for fine-tuning: block 5 (three 3x3 convolutions with 512 filters and a
#: max-pool) is the part that is fine-tuned; blocks 1-4 stay frozen and their outputs are computed once.
VGG16_CUT = "block4_pool"
#: Units of the report's two dense ReLU layers, and its dropout.
TRANSFER_HEAD_UNITS = (256, 128)
TRANSFER_HEAD_DROPOUT = 0.5


def keras_weights_cache() -> Path:
    """Where Keras keeps downloaded application weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def md5sum(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_imagenet_weights(path: str | Path | None = None) -> Path | None:
    """The VGG16 ImageNet weights file (no top) to use, or None when there is none on this machine.

    Looked for in order: ``path``; the file named by ``$CELLKIT_VGG16_WEIGHTS``; :data:`VGG16_NOTOP_FILE` in
    :func:`keras_weights_cache`. A ``path`` or variable that names a missing file is a :class:`DataError`
    (the user asked for it), not a silent None.
    """
    for given, what in ((path, "weights path"), (os.environ.get(VGG16_WEIGHTS_ENV), f"${VGG16_WEIGHTS_ENV}")):
        if given:
            if not Path(given).is_file():
                raise DataError(f"{what} {given}: no such file (the VGG16 ImageNet weights, {VGG16_NOTOP_FILE})")
            return Path(given)
    cached = keras_weights_cache() / VGG16_NOTOP_FILE
    return cached if cached.is_file() else None


def vgg16_weights(weights: str | Path | None) -> tuple[Path | None, dict[str, Any]]:
    """Resolve ``weights`` for :func:`build_vgg16_base` into (file or None, a record of what was used).

    ``None``: random initialisation. ``"imagenet"``: the ImageNet file from :func:`find_imagenet_weights`; if it
    is not on disk, a :class:`DataError` saying where to put it. A path: that file (``.h5`` as Keras publishes it,
    or ``.weights.h5``). The record holds ``weights`` (``none``, ``imagenet`` or ``file``), the file and its md5,
    and ``official`` (True when the md5 is Keras' for the ImageNet file).
    """
    if weights is None or weights == "none":
        return None, {"weights": "none", "file": None, "md5": None, "official": False}
    if weights == "imagenet":
        found = find_imagenet_weights()
        if found is None:
            raise DataError(f"VGG16 ImageNet weights not found: put {VGG16_NOTOP_FILE} (md5 {VGG16_NOTOP_MD5}, from "
                            f"{VGG16_NOTOP_URL}) in {keras_weights_cache()} or name it with ${VGG16_WEIGHTS_ENV}")
    else:
        found = find_imagenet_weights(weights)
    digest = md5sum(found)
    return found, {"weights": "imagenet" if weights == "imagenet" else "file", "file": str(found), "md5": digest,
                   "official": digest == VGG16_NOTOP_MD5}


def build_vgg16_base(input_size: int = 96, weights: str | Path | None = None) -> keras.Model:
    """``keras.applications.VGG16(include_top=False)`` for ``input_size`` x ``input_size`` x 3 inputs scaled with
    ``caffe`` (:data:`cellkit.classifiers.PREPROCESSING`); output (input_size // 32, input_size // 32, 512).
    ``weights`` as in
    :func:`vgg16_weights` (None: random). Input sides below 32 are a ValueError (five 2x2 max-pools)."""
    if input_size < 32:
        raise ValueError(f"VGG16 needs inputs of at least 32x32 pixels, got {input_size}x{input_size}")
    path, _ = vgg16_weights(weights)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    if path is not None:
        try:
            base.load_weights(str(path))
        except (ValueError, OSError, KeyError) as error:
            raise DataError(f"{path}: not VGG16 (no top) weights: {str(error).splitlines()[0]}") from None
    return base


def build_transfer_head(feature_shape: Sequence[int], n_outputs: int, activation: str = "softmax",
                        units: Sequence[int] = TRANSFER_HEAD_UNITS, dropout: float = TRANSFER_HEAD_DROPOUT,
                        name: str = "head") -> keras.Model:
    """Report 004's head on VGG16 features (h, w, 512): global average pooling, two dense ReLU layers
    (``units``), dropout, then ``n_outputs`` units with ``activation`` (``softmax`` for classes, ``sigmoid`` for
    independent labels). A 1-D ``feature_shape`` (pooled features) skips the pooling. Output float32."""
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"activation must be softmax or sigmoid, got {activation!r}")
    layers = keras.layers
    inputs = keras.Input(tuple(feature_shape))
    x = layers.GlobalAveragePooling2D(name=f"{name}_gap")(inputs) if len(feature_shape) == 3 else inputs
    for i, width in enumerate(units, start=1):
        x = layers.Dense(width, activation="relu", name=f"{name}_dense{i}")(x)
    x = layers.Dropout(dropout, name=f"{name}_dropout")(x)
    outputs = layers.Dense(n_outputs, activation=activation, dtype="float32", name=f"{name}_output")(x)
    return keras.Model(inputs, outputs, name=name)


def split_vgg16(base: keras.Model, cut: str = VGG16_CUT) -> tuple[keras.Model, keras.Model]:
    """(lower, upper): ``base`` cut after layer ``cut``; ``upper(lower(x)) == base(x)``, and both share the
    base's layers (weights trained in ``upper`` are the base's). Used to compute the frozen lower part once."""
    names = [layer.name for layer in base.layers]
    if cut not in names:
        raise ValueError(f"no layer {cut!r} in {base.name}; layers: {', '.join(names)}")
    lower = keras.Model(base.input, base.get_layer(cut).output, name=f"{base.name}_to_{cut}")
    inputs = keras.Input(tuple(base.get_layer(cut).output.shape[1:]))
    x = inputs
    for layer in base.layers[names.index(cut) + 1:]:
        x = layer(x)
    return lower, keras.Model(inputs, x, name=f"{base.name}_after_{cut}")


def build_vgg16_classifier(n_classes: int, input_size: int = 96, weights: str | Path | None = None,
                           base: keras.Model | None = None, head: keras.Model | None = None) -> keras.Model:
    """VGG16 base + :func:`build_transfer_head` as one model on ``caffe``-scaled images: report 004's network.

    ``base`` and ``head`` (already built, e.g. trained in phases) are reused as they are, so the whole model
    predicts with their weights; otherwise they are built (``weights`` as in :func:`vgg16_weights`)."""
    base = base if base is not None else build_vgg16_base(input_size, weights)
    head = head if head is not None else build_transfer_head(base.output_shape[1:], n_classes)
    inputs = keras.Input(tuple(base.input_shape[1:]))
    return keras.Model(inputs, head(base(inputs)), name="vgg16_transfer")


# --------------------------------------------------------------------------------------------------------
# Experiments on cached features
# --------------------------------------------------------------------------------------------------------

#: How a classifier meets class imbalance: report 004 augmented the under-represented classes only, after the
#: split, and weighted the classes in its multi-label models.
IMBALANCE_VARIANTS = ("none", "class_weights", "augment", "augment+class_weights")


def imbalanced_subset(data: ImageSet, shares: Sequence[float], largest: int, seed: int = DEFAULT_SEED) -> ImageSet:
    """A subset whose class counts follow ``shares`` (one per class, any scale): the class with the largest
    share keeps ``largest`` images, class c about ``largest * shares[c] / max(shares)`` (at least 1), drawn
    with ``seed``. Used to give a balanced set a realistic imbalance (e.g. PBC-28's class frequencies)."""
    shares = np.asarray(shares, dtype=float)
    if len(shares) != len(data.class_names) or shares.min() <= 0:
        raise ValueError(f"need one positive share per class ({len(data.class_names)}), got {shares.tolist()}")
    wanted = np.maximum(1, np.round(largest * shares / shares.max())).astype(int)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(data.labels == c))[:n] for c, n in enumerate(wanted)]
    return data.subset(np.sort(np.concatenate(keep)))


def minority_copies(images: np.ndarray, labels: np.ndarray, n_classes: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Augmented copies for the under-represented classes only (report 004): every class with fewer images than
    the largest gets randomly chosen members, each in a random one of the 8 symmetries of the square, until it
    has as many. Returns (copies (m, h, w, c), their labels (m,)); m = 0 for a balanced set."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=n_classes)
    picks = [rng.choice(np.flatnonzero(labels == c), counts.max() - counts[c])
             for c in range(n_classes) if 0 < counts[c] < counts.max()]
    index = np.concatenate(picks) if picks else np.zeros(0, np.int64)
    return transforms.augment_batch(images[index], rng, "dihedral"), labels[index]


@dataclass
class TargetCache:
    """The frozen part's outputs for the target images, computed once (:func:`cache_target`).

    ``lower[part]``: outputs of VGG16 blocks 1-4 (n, s/16, s/16, 512); ``top[part]``: of the frozen block 5 on
    top (n, s/32, s/32, 512); parts ``train``, ``extra`` (the :func:`minority_copies` of the training images, kept
    in ``extra_images``), ``val``, ``test``. ``seconds`` and ``peak_mb``: wall time and the process's peak memory
    of computing them all.
    """

    lower: dict[str, np.ndarray]
    top: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    seconds: float
    peak_mb: float
    extra_images: np.ndarray | None = None

    def arrays(self, variant: str, n_classes: int, what: str = "top") -> tuple[np.ndarray, np.ndarray, Any]:
        """(x, labels, sample weights or None) of the training part for imbalance ``variant``."""
        if variant not in IMBALANCE_VARIANTS:
            raise ValueError(f"unknown imbalance variant {variant!r}; use {', '.join(IMBALANCE_VARIANTS)}")
        source = self.lower if what == "lower" else self.top
        x, y = source["train"], self.labels["train"]
        if variant.startswith("augment"):
            x, y = np.concatenate([x, source["extra"]]), np.concatenate([y, self.labels["extra"]])
        weights = balanced_weights(y, n_classes) if variant.endswith("class_weights") else None
        return x, y, weights


def cache_target(base: Any, train: ImageSet, val: ImageSet, test: ImageSet, seed: int = DEFAULT_SEED,
                 cut: str = VGG16_CUT, batch_size: int = 32) -> TargetCache:
    """Run the frozen VGG16 ``base`` once over the target's training images, their :func:`minority_copies`,
    and the validation and test images (uint8, the base's input size), keeping the outputs at ``cut`` and at
    the top. Timed, with the peak memory of the process."""
    lower, upper = split_vgg16(base, cut)
    extra, extra_labels = minority_copies(train.images, train.labels, len(train.class_names),
                                          np.random.default_rng(seed))
    parts = {"train": train.images, "extra": extra, "val": val.images, "test": test.images}
    with MemorySampler() as memory:
        started = time.perf_counter()
        low = {k: outputs_of(lower, v, "caffe", batch_size) for k, v in parts.items()}
        top = {k: outputs_of(upper, v, None, batch_size) for k, v in low.items()}
        seconds = time.perf_counter() - started
    labels = {"train": train.labels, "extra": extra_labels, "val": val.labels, "test": test.labels}
    return TargetCache(low, top, labels, seconds, memory.peak_mb, extra)


@dataclass
class ClassifierRun:
    """One trained VGG16 classifier of the transfer study: its phases' fits and times, and its scores.

    ``model`` maps what it was trained on (cached block-4 outputs for a transfer run, images for a scratch
    run) to class probabilities; ``top`` (transfer runs) is its block 5, fine-tuned or not, which maps block-4
    outputs to the features the head reads; ``seconds`` holds the wall time of each phase on the target task.
    """

    name: str
    model: Any
    fits: dict[str, FitResult]
    seconds: dict[str, float]
    val_report: dict[str, Any]
    test_report: dict[str, Any]
    test_proba: np.ndarray
    top: Any = None

    @property
    def target_seconds(self) -> float:
        """Wall time spent on the target task (caching included for transfer runs)."""
        return float(sum(self.seconds.values()))

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.name, "val_accuracy": self.val_report["accuracy"],
            "test_accuracy": self.test_report["accuracy"], "test_macro_f1": self.test_report["macro_f1"],
            "test_auc_ovr": self.test_report.get("auc_ovr"),
            "epochs": {phase: fit.epochs_run for phase, fit in self.fits.items()},
            "seconds": {phase: round(s, 1) for phase, s in self.seconds.items()},
            "target_seconds": round(self.target_seconds, 1),
            "peak_rss_mb": round(max(fit.peak_rss_mb for fit in self.fits.values()), 1),
        }


def _val_test_reports(model: Any, x_val: np.ndarray, y_val: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
            class_names: Sequence[str], preprocessing: str | None) -> tuple[dict, dict, np.ndarray]:
    reports = []
    for x, y in ((x_val, y_val), (x_test, y_test)):
        proba = outputs_of(model, x, preprocessing)
        reports.append((metrics.proba_report(y, proba, class_names), proba))
    return reports[0][0], reports[1][0], reports[1][1]


def transfer_run(base: Any, cache: TargetCache, class_names: Sequence[str], variant: str = "none",
                 head_epochs: int = 40, head_lr: float = 1e-3, finetune_epochs: int = 10, finetune_lr: float = 1e-5,
                 batch_size: int = 32, patience: int = 8, seed: int = DEFAULT_SEED, progress: str = "none",
                 name: str = "transfer", cut: str = VGG16_CUT) -> ClassifierRun:
    """Report 004's transfer on cached outputs of ``base``: phase 1 trains the head on the frozen base's top
    outputs; phase 2 (``finetune_epochs`` > 0) trains block 5 and the head together at the low ``finetune_lr``
    on the cached block-4 outputs. ``base`` itself is left unchanged (block 5 is fine-tuned in a copy).

    The returned ``model`` maps block-4 outputs to probabilities; ``seconds`` holds ``cache`` (the share of
    computing the cache for the images used), ``head`` and ``finetune``.
    """
    n, name = len(class_names), scope_name(name, "transfer")
    x, y, weights = cache.arrays(variant, n, "top")
    head = build_transfer_head(x.shape[1:], n)
    fits = {"head": fit_arrays(head, x, y, cache.top["val"], cache.labels["val"], head_epochs, head_lr, batch_size,
                               patience, weights, seed, progress, f"{name} head")}
    _, upper_frozen = split_vgg16(base, cut)
    upper = keras.models.clone_model(upper_frozen)
    upper.set_weights(upper_frozen.get_weights())
    inputs = keras.Input(tuple(cache.lower["train"].shape[1:]))
    model = keras.Model(inputs, head(upper(inputs)), name=name)
    if finetune_epochs:
        xl, yl, wl = cache.arrays(variant, n, "lower")
        fits["finetune"] = fit_arrays(model, xl, yl, cache.lower["val"], cache.labels["val"], finetune_epochs,
                                      finetune_lr, batch_size, patience, wl, seed, progress, f"{name} fine-tune")
    used = len(x) + len(cache.labels["val"])
    total = sum(len(v) for k, v in cache.labels.items() if k != "test")
    seconds = {"cache": cache.seconds * used / max(total, 1), **{k: f.seconds for k, f in fits.items()}}
    val_report, test_report, proba = _val_test_reports(model, cache.lower["val"], cache.labels["val"],
                                                       cache.lower["test"], cache.labels["test"], class_names, None)
    return ClassifierRun(name, model, fits, seconds, val_report, test_report, proba, upper)


def scratch_run(train: ImageSet, val: ImageSet, test: ImageSet, variant: str = "none", epochs: int = 10,
                learning_rate: float = 1e-4, batch_size: int = 32, max_seconds: float | None = None,
                extra: tuple[np.ndarray, np.ndarray] | None = None, seed: int = DEFAULT_SEED,
                progress: str = "epoch", name: str = "scratch") -> ClassifierRun:
    """The same network (VGG16 + report 004's head) trained from random weights on the target images (uint8 at
    the input size), with the imbalance ``variant`` (``extra``: the :func:`minority_copies` to add for the
    ``augment`` variants), Adam at ``learning_rate``; ``max_seconds`` caps the wall time (an equal budget)."""
    n, name = len(train.class_names), scope_name(name, "scratch")
    x, y = train.images, train.labels
    if variant.startswith("augment") and extra is not None:
        x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
    keras.utils.set_random_seed(seed)
    model = build_vgg16_classifier(n, x.shape[1], weights=None)
    config = FitConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, patience=epochs,
                       class_weight="balanced" if variant.endswith("class_weights") else None)
    result = fit(model, x, y, val.images, val.labels, config, "caffe", seed, progress, name, max_seconds)
    val_report, test_report, proba = _val_test_reports(model, val.images, val.labels, test.images, test.labels,
                                                       train.class_names, "caffe")
    return ClassifierRun(name, model, {"scratch": result}, {"scratch": result.seconds}, val_report, test_report,
                         proba)


def pretrain_source(source: ImageSet, source_val: ImageSet, size: int = 32, epochs: int = 3,
                    learning_rate: float = 1e-4, batch_size: int = 64, max_seconds: float | None = None,
                    seed: int = DEFAULT_SEED, progress: str = "epoch") -> tuple[Any, FitResult, dict[str, Any]]:
    """Pretrain a VGG16 base offline on a source task: classify ``source`` (resized to ``size``, no crop) with
    the report's head, random initialisation, Adam, dihedral augmentation. Returns (the trained base, its fit,
    the source validation report). Its weights fit any input size (the base is fully convolutional)."""
    x, xv = at_size(source.images, size, None), at_size(source_val.images, size, None)
    keras.utils.set_random_seed(seed)
    model = build_vgg16_classifier(len(source.class_names), size, weights=None)
    config = FitConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, patience=epochs,
                       augment="dihedral")
    result = fit(model, x, source.labels, xv, source_val.labels, config, "caffe", seed, progress, "source",
                 max_seconds)
    proba = outputs_of(model, xv, "caffe")
    report = metrics.proba_report(source_val.labels, proba, source.class_names)
    return model.get_layer("vgg16"), result, report


def base_with_weights(input_size: int, weights_from: Any) -> Any:
    """A VGG16 base for ``input_size`` holding the weights of another VGG16 base (of any input size)."""
    base = build_vgg16_base(input_size, None)
    base.set_weights(weights_from.get_weights())
    return base


# --- multi-label heads ------------------------------------------------------------------------------------


def label_weights(targets: np.ndarray) -> np.ndarray:
    """Per-sample weights (n, L) that balance positives and negatives of each label: n / (2 n_pos) for a positive,
    n / (2 n_neg) for a negative (1 where a label has no positives or no negatives)."""
    targets = np.asarray(targets, dtype=bool)
    n = len(targets)
    pos = targets.sum(axis=0)
    neg = n - pos
    w_pos = np.where(pos > 0, n / (2 * np.maximum(pos, 1)), 1.0)
    w_neg = np.where(neg > 0, n / (2 * np.maximum(neg, 1)), 1.0)
    both = (pos > 0) & (neg > 0)
    return np.where(targets, np.where(both, w_pos, 1.0), np.where(both, w_neg, 1.0)).astype(np.float32)


def multilabel_scores(x: np.ndarray, targets: np.ndarray, val_x: np.ndarray, val_targets: np.ndarray,
                      test_x: np.ndarray, mode: str = "binary_relevance", weighted: bool = False, epochs: int = 40,
                      learning_rate: float = 1e-3, batch_size: int = 32, patience: int = 8, seed: int = DEFAULT_SEED
                      ) -> tuple[np.ndarray, float]:
    """Train multi-label heads on features ``x`` with 0/1 ``targets`` (n, L); returns (test scores (m, L), seconds).

    ``binary_relevance`` (report 004): one head with one sigmoid per label, each trained alone, with per-label
    class weights when ``weighted`` (:func:`label_weights`). ``multi_output``: one head with L sigmoids trained
    on all labels at once (unweighted).
    """
    targets, val_targets = np.asarray(targets, np.float32), np.asarray(val_targets, np.float32)
    started = time.perf_counter()
    if mode == "multi_output":
        head = build_transfer_head(x.shape[1:], targets.shape[1], "sigmoid", name="multi")
        fit_arrays(head, x, targets, val_x, val_targets, epochs, learning_rate, batch_size, patience, None, seed)
        return outputs_of(head, test_x, None), time.perf_counter() - started
    if mode != "binary_relevance":
        raise ValueError(f"unknown mode {mode!r}; use binary_relevance or multi_output")
    weights = label_weights(targets) if weighted else None
    columns = []
    for j in range(targets.shape[1]):
        head = build_transfer_head(x.shape[1:], 1, "sigmoid", name=f"label{j}")
        fit_arrays(head, x, targets[:, j : j + 1], val_x, val_targets[:, j : j + 1], epochs, learning_rate,
                   batch_size, patience, None if weights is None else weights[:, j], seed)
        columns.append(outputs_of(head, test_x, None)[:, 0])
    return np.stack(columns, axis=1), time.perf_counter() - started
