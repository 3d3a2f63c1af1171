"""Training classifiers: the fit loop with its callbacks, precision and threads, augmentation, and measurements.

>>> from cellkit import datasets, training
>>> train, val, test = (datasets.load_pbc28(s) for s in ("train", "val", "test"))
>>> run = training.train_classifier("cellnet", train, val, test, crop=200)   # the default recipe
>>> run.test_report["accuracy"], run.fit.seconds, run.fit.peak_rss_mb, run.throughput
>>> run.save("models/cellnet.keras")

What is here
------------
:class:`FitConfig`          a training recipe: optimizer, schedule, label smoothing, augmentation, epochs, patience
:func:`fit`                 ``model.fit`` with early stopping on the validation split (best weights restored), a
                            progress bar or one line per epoch, optional class weights, wall time and peak memory
:func:`augment_batch`       flips, 90-degree rotations and small shifts of uint8 batches (numpy, seeded)
:func:`set_precision`       ``mixed_bfloat16`` where the CPU has bfloat16 instructions, float32 otherwise
:func:`choose_tta`          test-time augmentation chosen on the validation split
:func:`throughput`          inference images per second
:func:`train_classifier`    all of it for one registered model: what ``cellkit train classifier`` runs

Report 000's study (notebook 05): :data:`STUDY_INPUTS` (raw, normalised, augmented, Gaussian blur, Canny, Sobel,
cell mask), :func:`kfold_indices` (stratified, seeded), :func:`cross_validate` (one model x input over k folds, with
time, memory and throughput per fold) and :func:`study_table` (mean and spread over folds).

VGG16 transfer section (report 004): :func:`cache_target` (frozen blocks computed once), :func:`transfer_run` (head,
then fine-tuning block 5, on the cache), :func:`scratch_run` (the same network from random weights, optionally within
a time budget), :func:`pretrain_source` (an offline source task), :func:`imbalanced_subset` and
:func:`minority_copies` (class imbalance), :func:`multilabel_scores` (binary relevance or one multi-output head).

U-Net section (reports 002, 003): :class:`UNetConfig` (a recipe; its defaults are ``cellkit train unet``'s model),
:class:`CropBatches` (fresh augmented random crops every step), :func:`fit_unet`, :func:`tune_postprocessing`
(thresholds chosen on validation), :func:`segmentation_throughput` (Mpx/s), :func:`train_unet` (all of it) and
:func:`load_segmentation_data`.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import metrics, models, transforms
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, ImageSet
from cellkit.datasets.loaders import PBC_CROP

keras = models.keras_module()

PRECISIONS = ("auto", "bfloat16", "float32")
AUGMENTATIONS = ("none", "flips", "dihedral", "dihedral_shift", "flip_rotate50")


# --------------------------------------------------------------------------------------------------------
# Machine: bfloat16 support, threads
# --------------------------------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX-512 BF16 or AMX-BF16; Linux ``/proc/cpuinfo``)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def set_precision(precision: str = "auto") -> str:
    """Set Keras' global dtype policy for models built from now on; returns ``"bfloat16"`` or ``"float32"``.

    ``auto`` picks ``mixed_bfloat16`` (bfloat16 compute, float32 weights; about twice as fast on CPUs with
    AVX-512 BF16/AMX) when :func:`cpu_has_bf16`, float32 otherwise. Output layers stay float32 (the builders
    set ``dtype="float32"`` on the softmax), and saved models are float32 either way.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    use_bf16 = precision == "bfloat16" or (precision == "auto" and cpu_has_bf16())
    keras.config.set_dtype_policy("mixed_bfloat16" if use_bf16 else "float32")
    return "bfloat16" if use_bf16 else "float32"


def current_precision() -> str:
    return "bfloat16" if "bfloat16" in keras.config.dtype_policy().name else "float32"


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads inside TensorFlow ops (default: the CPUs this process may use) and one op at a time.

    Has an effect only before TensorFlow runs its first op; returns the number of threads.
    """
    import tensorflow as tf

    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised: keep what it has
        pass
    return n


# --------------------------------------------------------------------------------------------------------
# Augmentation (numpy, Keras-independent)
# --------------------------------------------------------------------------------------------------------


def augment_batch(images: np.ndarray, rng: np.random.Generator, mode: str = "dihedral_shift",
                  max_shift: int = 2) -> np.ndarray:
    """A randomly augmented copy of a batch of images (n, h, w[, c]) of any dtype; exact, no interpolation.

    ``mode``:

    - ``none``: unchanged;
    - ``flips``: each image mirrored left-right and/or top-bottom with probability 1/2 each;
    - ``dihedral``: each image gets one of the 8 symmetries of the square (4 rotations by 90 degrees, each
      with or without a mirror), uniformly; a cell on a slide has no "up", so these leave the class unchanged;
    - ``dihedral_shift``: dihedral, then a shift by up to ``max_shift`` pixels in x and y with reflected borders;
    - ``flip_rotate50``: report 000's random flips and rotation by -50..50 degrees, corners black
      (:data:`cellkit.transforms.RECIPES` ``report000``; bilinear, so not exact).

    Needs square images for the rotations. Draws from ``rng`` only.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {mode!r}; use {', '.join(AUGMENTATIONS)}")
    images = np.asarray(images)
    if mode == "none" or not len(images):
        return images.copy()
    if mode == "flip_rotate50":
        return transforms.augment_batch(images, rng, transforms.RECIPES["report000"])
    n = len(images)
    out = np.empty_like(images)
    if mode == "flips":
        choice = rng.integers(0, 4, n)  # bit 0: left-right, bit 1: top-bottom
        for c in range(4):
            index = np.flatnonzero(choice == c)
            part = images[index]
            if c & 1:
                part = part[:, :, ::-1]
            if c & 2:
                part = part[:, ::-1]
            out[index] = part
        return out
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"rotations by 90 degrees need square images, got {images.shape[1]}x{images.shape[2]}")
    choice = rng.integers(0, 8, n)
    for c in range(8):
        index = np.flatnonzero(choice == c)
        out[index] = models.view(images[index], c // 2, bool(c % 2))
    if mode == "dihedral_shift" and max_shift > 0:
        out = _shift(out, rng.integers(-max_shift, max_shift + 1, (n, 2)), max_shift)
    return out


def _shift(images: np.ndarray, shifts: np.ndarray, pad: int) -> np.ndarray:
    """Each image moved by (dy, dx) pixels, borders reflected (a crop of the reflect-padded image)."""
    widths = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (images.ndim - 3)
    padded = np.pad(images, widths, mode="reflect")
    h, w = images.shape[1:3]
    out = np.empty_like(images)
    for (dy, dx) in np.unique(shifts, axis=0):
        index = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
        out[index] = padded[index, pad - dy : pad - dy + h, pad - dx : pad - dx + w]
    return out


class ImageBatches(keras.utils.PyDataset):
    """Batches of (scaled images, one-hot labels[, sample weights]) for ``model.fit``, reshuffled and freshly
    augmented every epoch from uint8 images held in memory."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, n_classes: int, batch_size: int,
                 preprocessing: str, augment: str = "none", rng: np.random.Generator | None = None,
                 shuffle: bool = True, sample_weights: np.ndarray | None = None) -> None:
        super().__init__()
        self.images, self.labels = images, np.asarray(labels)
        self.onehot = np.eye(n_classes, dtype=np.float32)[self.labels]
        self.batch_size, self.preprocessing, self.augment = batch_size, preprocessing, augment
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.shuffle, self.sample_weights = shuffle, sample_weights
        self.order = self.rng.permutation(len(images)) if shuffle else np.arange(len(images))

    def __len__(self) -> int:
        return int(np.ceil(len(self.images) / self.batch_size))

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = augment_batch(self.images[rows], self.rng, self.augment) if self.augment != "none" else self.images[rows]
        batch = (models.preprocess(x, self.preprocessing), self.onehot[rows])
        return batch if self.sample_weights is None else (*batch, self.sample_weights[rows])

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.images))


# --------------------------------------------------------------------------------------------------------
# Measurements: memory, throughput
# --------------------------------------------------------------------------------------------------------


class MemorySampler:
    """Peak resident memory (RSS) of this process while the ``with`` block runs, sampled in a thread.

    >>> with MemorySampler() as memory:
    ...     model.fit(...)
    >>> memory.peak_mb, memory.increase_mb   # highest RSS seen; and that minus the RSS at the start
    """

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss_mb(self) -> float:
        return self._process.memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self) -> MemorySampler:
        self.start_mb = self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())

    @property
    def increase_mb(self) -> float:
        return self.peak_mb - self.start_mb


def throughput(model: Any, images: np.ndarray, preprocessing: str = "pm1", tta: str = "none",
               batch_size: int = 256, min_seconds: float = 2.0) -> float:
    """Inference images per second of ``model`` on uint8 ``images`` (scaling and TTA views included), after
    one warm-up pass; passes repeat until ``min_seconds`` have elapsed. Wall-clock on this machine, so other
    processes on the CPU lower it."""
    images = np.asarray(images)
    if not len(images):
        raise ValueError("no images to time")
    models.predict_proba(model, images[:batch_size], preprocessing, tta, batch_size)  # warm-up (tracing)
    done, started = 0, time.perf_counter()
    while True:
        models.predict_proba(model, images, preprocessing, tta, batch_size)
        done += len(images)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


# --------------------------------------------------------------------------------------------------------
# The fit loop
# --------------------------------------------------------------------------------------------------------


@dataclass
class FitConfig:
    """A training recipe. The defaults are report 001's (Adam 1e-3, nothing else); see
    :data:`cellkit.models.CELLNET_FIT` for the small CNN's.

    Attributes
    ----------
    epochs : maximum number of epochs.
    batch_size : images per step.
    optimizer : ``adam`` or ``adamw`` (decoupled weight decay ``weight_decay``) or ``sgd`` (momentum 0.9).
    learning_rate : peak learning rate.
    schedule : ``constant`` or ``cosine`` (one warm-up epoch, then cosine decay to 0 over ``epochs``).
    weight_decay : AdamW's decoupled weight decay (ignored by ``adam``).
    label_smoothing : of the categorical cross-entropy (0: none).
    augment : see :func:`augment_batch`.
    patience : epochs without a better validation accuracy before stopping; the best epoch's weights are kept.
    class_weight : ``balanced`` weighs each image by n / (k * n_class), so every class counts the same; None.
    tta : test-time augmentation: ``none``, ``flips``, ``dihedral`` or ``auto`` (chosen on the validation split).
    """

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    augment: str = "none"
    patience: int = 5
    class_weight: str | None = None
    tta: str = "none"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use adam, adamw or sgd")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; use constant or cosine")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; use {', '.join(AUGMENTATIONS)}")
        if self.tta not in (*models.TTA_VIEWS, "auto"):
            raise ValueError(f"unknown test-time augmentation {self.tta!r}; use {', '.join(models.TTA_VIEWS)}, auto")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> FitConfig:
        """The registered default recipe of model ``name`` with ``overrides`` (None values ignored)."""
        base = dict(models.spec(name).fit)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)


@dataclass
class FitResult:
    """What :func:`fit` measured. ``history`` maps loss/accuracy/val_loss/val_accuracy to per-epoch lists.

    ``seconds`` is wall-clock time, ``cpu_seconds`` the CPU time of the process (all threads) over the same span:
    on a machine shared with other jobs the wall time grows while the CPU time does not, so ``cpu_seconds``
    divided by the number of cores estimates the wall time on an idle machine.
    """

    history: dict[str, list[float]]
    seconds: float
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    peak_rss_mb: float
    rss_increase_mb: float
    precision: str
    seconds_per_epoch: float = 0.0
    stopped_early: bool = False
    cpu_seconds: float = 0.0
    early_stopping_from_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TimedFit:
    """What :func:`timed_fit` measured: the Keras history as plain floats (without the learning rate), wall and
    process CPU seconds of ``model.fit``, and the process's peak RSS and its increase over the fit, in MB."""

    history: dict[str, list[float]]
    seconds: float
    cpu_seconds: float
    peak_mb: float
    increase_mb: float


def timed_fit(model: Any, data: Any, **fit_args: Any) -> TimedFit:
    """``model.fit(data, verbose=0, **fit_args)``, timed and with its memory sampled."""
    with MemorySampler() as memory:
        started, cpu_started = time.perf_counter(), time.process_time()
        history = model.fit(data, verbose=0, **fit_args)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    hist = {k: [float(v) for v in values] for k, values in history.history.items() if k != "learning_rate"}
    return TimedFit(hist, seconds, cpu_seconds, memory.peak_mb, memory.increase_mb)


class _Progress(keras.callbacks.Callback):
    """A tqdm bar over the steps of each epoch (``bar``), and one summary line per epoch either way, with the
    logged quantities ``reported`` (Keras log names) under short labels."""

    LABELS = {"accuracy": "acc", "val_accuracy": "val_acc"}

    def __init__(self, epochs: int, steps: int, bar: bool, name: str, stream=None,
                 reported: Sequence[str] = ("loss", "accuracy", "val_loss", "val_accuracy")) -> None:
        super().__init__()
        self.epochs, self.steps, self.bar, self.name = epochs, steps, bar, name
        self.stream = stream or sys.stdout
        self.reported = tuple(reported)
        self._tqdm = None
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()
        if self.bar:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(total=self.steps, desc=f"{self.name} epoch {epoch + 1}/{self.epochs}", unit="step",
                              leave=False, file=sys.stderr, dynamic_ncols=True)

    def on_train_batch_end(self, batch, logs=None):
        if self._tqdm is not None:
            self._tqdm.update(1)
            if logs and batch % 10 == 0:
                self._tqdm.set_postfix({self.LABELS.get(key, key): f"{logs.get(key, 0):.3f}"
                                        for key in self.reported if not key.startswith("val_")})

    def on_epoch_end(self, epoch, logs=None):
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        logs = logs or {}
        values = "  ".join(f"{self.LABELS.get(key, key)} {logs.get(key, float('nan')):.4f}" for key in self.reported)
        seconds = time.perf_counter() - self._started
        print(f"{self.name} epoch {epoch + 1:>3}/{self.epochs}: {values}  ({seconds:.1f} s)", file=self.stream,
              flush=True)


def compile_model(model: Any, config: FitConfig, steps_per_epoch: int) -> Any:
    """Compile ``model`` with the optimizer, schedule and loss of ``config``; returns it."""
    rate: Any = config.learning_rate
    if config.schedule == "cosine":
        warmup = min(steps_per_epoch, max(1, config.epochs * steps_per_epoch // 10))
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.learning_rate / 10, decay_steps=max(1, config.epochs * steps_per_epoch
                                                                             - warmup),
            warmup_target=config.learning_rate, warmup_steps=warmup,
        )
    if config.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(rate, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(rate, momentum=0.9, nesterov=True)
    else:
        optimizer = keras.optimizers.Adam(rate)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def fit(model: Any, train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
        val_labels: np.ndarray, config: FitConfig, preprocessing: str = "pm1", seed: int = DEFAULT_SEED,
        progress: str = "epoch", name: str = "", max_seconds: float | None = None) -> FitResult:
    """Train ``model`` on uint8 images (n, h, w, 3) with ``config``; returns what was measured.

    Early stopping watches the validation accuracy with ``config.patience``; the weights of the best epoch are
    restored at the end (so the model returned is the one chosen on the validation split). In a model with batch
    norm it starts watching only after :func:`batch_norm_warmup_epochs`: until the running statistics have
    forgotten their initial values, validation scores the initialisation, not the model. ``progress`` is
    ``bar`` (a progress bar per epoch and a line per epoch), ``epoch`` (a line per epoch) or ``none``.
    ``max_seconds`` (optional): no new epoch starts once training has taken that long (a time budget).
    Wall time and the peak resident memory of the process are measured around ``model.fit``.
    """
    n_classes = int(model.output_shape[-1])
    _check_labels(train_labels, n_classes, "training")
    _check_labels(val_labels, n_classes, "validation")
    rng = np.random.default_rng(seed)
    weights = balanced_weights(train_labels, n_classes) if config.class_weight == "balanced" else None
    batches = ImageBatches(train_images, train_labels, n_classes, config.batch_size, preprocessing, config.augment,
                           rng, shuffle=True, sample_weights=weights)
    val_x = models.preprocess(val_images, preprocessing)
    val_y = np.eye(n_classes, dtype=np.float32)[np.asarray(val_labels)]
    compile_model(model, config, len(batches))
    warmup = batch_norm_warmup_epochs(model, len(batches))
    stopper = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.patience,
                                            restore_best_weights=True, start_from_epoch=warmup)
    callbacks = [stopper] if max_seconds is None else [stopper, TimeBudget(max_seconds)]
    if progress != "none":
        callbacks.append(_Progress(config.epochs, len(batches), progress == "bar", name or model.name))
    run = timed_fit(model, batches, validation_data=(val_x, val_y), epochs=config.epochs, callbacks=callbacks,
                    validation_batch_size=256)
    hist, seconds, cpu_seconds = run.history, run.seconds, run.cpu_seconds
    epochs_run = len(hist.get("loss", []))
    val_acc = hist.get("val_accuracy", [float("nan")])
    if epochs_run > warmup:  # the epoch whose weights early stopping restored
        best = warmup + int(np.nanargmax(val_acc[warmup:]))
    else:  # training ended within the warm-up: the last weights are kept
        best = max(epochs_run - 1, 0)
    return FitResult(
        history=hist, seconds=seconds, epochs_run=epochs_run, best_epoch=best + 1,
        best_val_accuracy=float(val_acc[best]), peak_rss_mb=run.peak_mb, rss_increase_mb=run.increase_mb,
        precision=current_precision(), seconds_per_epoch=seconds / max(epochs_run, 1),
        stopped_early=epochs_run < config.epochs, cpu_seconds=cpu_seconds, early_stopping_from_epoch=warmup + 1,
    )


class TimeBudget(keras.callbacks.Callback):
    """Stops training at the end of the first epoch that ends ``seconds`` or more after training began."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self._started = float(seconds), 0.0

    def on_train_begin(self, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if time.perf_counter() - self._started >= self.seconds:
            self.model.stop_training = True


def batch_norm_warmup_epochs(model: Any, steps_per_epoch: int, forgotten: float = 0.05) -> int:
    """Epochs until every batch-norm layer's running mean and variance keep less than ``forgotten`` of their
    initial values (0 and 1): ``momentum ** steps < forgotten``. 0 for a model without batch norm.

    Keras' default momentum 0.99 needs 299 steps: 4 epochs of PBC-28 at batch 64, 7 of the 1,411 PBC-48 training
    images at batch 32. Before that, inference-mode predictions (and so validation accuracy) can be near chance
    while training accuracy is high.
    """
    momenta = [float(layer.momentum) for layer in _all_layers(model) if type(layer).__name__ == "BatchNormalization"]
    if not momenta:
        return 0
    steps = max(np.log(forgotten) / np.log(m) for m in momenta if 0 < m < 1) if any(0 < m < 1 for m in momenta) else 0
    return int(np.ceil(steps / max(steps_per_epoch, 1)))


def _all_layers(model: Any) -> list[Any]:
    layers = []
    for layer in model.layers:
        layers.append(layer)
        if hasattr(layer, "layers"):
            layers.extend(_all_layers(layer))
    return layers


def balanced_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-image weights n / (k * n_class): every class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    per_class = np.zeros(n_classes)
    per_class[present] = len(labels) / (present.sum() * counts[present])
    return per_class[labels].astype(np.float32)


def _check_labels(labels: np.ndarray, n_classes: int, what: str) -> None:
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{what} labels hold class id {int(labels.max())} outside 0..{n_classes - 1}")


def choose_tta(model: Any, images: np.ndarray, labels: np.ndarray, preprocessing: str = "pm1",
               candidates: Sequence[str] = ("none", "flips", "dihedral")) -> tuple[str, dict[str, float]]:
    """The test-time augmentation with the best accuracy on (validation) ``images``; ties go to fewer views.

    Returns (name, {name: accuracy}).
    """
    scores = {}
    for name in candidates:
        proba = models.predict_proba(model, images, preprocessing, name)
        scores[name] = float(np.mean(proba.argmax(axis=1) == np.asarray(labels)))
    best = max(candidates, key=lambda c: (round(scores[c], 6), -len(models.TTA_VIEWS[c])))
    return best, scores


# --------------------------------------------------------------------------------------------------------
# One registered model, end to end
# --------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """A trained registered model with everything measured about it (see :func:`train_classifier`).

    ``throughput`` is inference images per second with the model's test-time augmentation (8 views for
    ``dihedral``), ``throughput_single_view`` without it.
    """

    trained: models.TrainedModel
    config: FitConfig
    fit: FitResult
    val_report: dict[str, Any]
    test_report: dict[str, Any] | None
    tta_scores: dict[str, float]
    throughput: float
    n_params: int
    data: dict[str, Any] = field(default_factory=dict)
    throughput_single_view: float = float("nan")

    @property
    def name(self) -> str:
        return self.trained.info.model

    def summary(self) -> dict[str, Any]:
        """A flat dict of the key numbers (one row of a results table)."""
        test = self.test_report or {}
        return {
            "model": self.name,
            "input_size": self.trained.info.input_size,
            "params": self.n_params,
            "precision": self.fit.precision,
            "epochs_run": self.fit.epochs_run,
            "best_epoch": self.fit.best_epoch,
            "train_seconds": round(self.fit.seconds, 1),
            "train_cpu_seconds": round(self.fit.cpu_seconds, 1),
            "seconds_per_epoch": round(self.fit.seconds_per_epoch, 2),
            "peak_rss_mb": round(self.fit.peak_rss_mb, 1),
            "rss_increase_mb": round(self.fit.rss_increase_mb, 1),
            "tta": self.trained.info.tta,
            "val_accuracy": self.val_report["accuracy"],
            "test_accuracy": test.get("accuracy"),
            "test_macro_f1": test.get("macro_f1"),
            "test_auc_ovr": test.get("auc_ovr"),
            "images_per_second": round(self.throughput, 1),
            "images_per_second_single_view": round(self.throughput_single_view, 1),
        }

    def record(self) -> dict[str, Any]:
        """Everything, JSON-ready: what ``cellkit train classifier`` writes beside the model."""
        return {
            "summary": self.summary(),
            "fit_config": asdict(self.config),
            "fit": self.fit.to_dict(),
            "tta_val_accuracy": self.tta_scores,
            "data": self.data,
            "validation": self.val_report,
            "test": self.test_report,
            "versions": {"keras": keras.__version__, "numpy": np.__version__},
        }

    def save(self, path: str | Path) -> Path:
        """Save the model (float32 ``.keras`` with its metadata) and :meth:`record` as ``NAME.json`` beside it."""
        return models.save(self.trained.model, self.trained.info, path, extra=self.record())


def train_classifier(
    model_name: str,
    train: ImageSet,
    val: ImageSet,
    test: ImageSet | None = None,
    input_size: int | None = None,
    crop: int | None = None,
    config: FitConfig | None = None,
    precision: str = "auto",
    seed: int = DEFAULT_SEED,
    progress: str = "epoch",
    measure_throughput: bool = True,
    throughput_seconds: float = 2.0,
    **overrides: Any,
) -> TrainingRun:
    """Build registered model ``model_name``, train it on ``train`` with early stopping on ``val``, choose its
    test-time augmentation on ``val``, and score it on ``val`` and (if given) ``test``.

    Images of another size are brought to ``input_size`` (default: the model's) with ``crop`` as
    :func:`cellkit.models.prepare_images` does; ``crop`` is recorded for ``classify``. ``config`` (default: the
    model's registered recipe, updated with ``overrides`` such as ``epochs=5``) says how to train.
    ``precision``: ``auto``, ``bfloat16`` or ``float32`` (see :func:`set_precision`). Inference throughput is
    timed for ``throughput_seconds`` on up to 512 validation images (``measure_throughput=False``: not at all).
    """
    entry = models.spec(model_name)
    size = entry.input_size if input_size is None else int(input_size)
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None}) if config else \
        FitConfig.for_model(model_name, **overrides)
    if train.class_names != val.class_names or (test is not None and test.class_names != train.class_names):
        raise DataError("the training, validation and test sets name different classes")
    n_classes = len(train.class_names)
    x_train, x_val = _at_size(train.images, size, crop), _at_size(val.images, size, crop)
    keras.utils.set_random_seed(seed)
    set_precision(precision)
    try:
        model = models.build(model_name, n_classes, size)
        result = fit(model, x_train, train.labels, x_val, val.labels, config, entry.preprocessing, seed, progress,
                     name=model_name)
    finally:
        keras.config.set_dtype_policy("float32")
    if config.tta == "auto":
        tta, tta_scores = choose_tta(model, x_val, val.labels, entry.preprocessing)
    else:
        tta, tta_scores = config.tta, {}
    info = models.ModelInfo(model=model_name, class_names=list(train.class_names), input_size=size,
                            preprocessing=entry.preprocessing, crop=crop, tta=tta, trained_on=train.source)
    trained = models.TrainedModel(model, info)
    val_report = evaluate(trained, x_val, val.labels)
    test_report = evaluate(trained, _at_size(test.images, size, crop), test.labels) if test is not None else None
    speed = speed_single = float("nan")
    if measure_throughput:
        speed = throughput(model, x_val[:512], entry.preprocessing, tta, min_seconds=throughput_seconds)
        speed_single = speed if tta == "none" else \
            throughput(model, x_val[:512], entry.preprocessing, "none", min_seconds=throughput_seconds)
    data = {"source": train.source, "n_train": len(train), "n_val": len(val), "n_test": len(test) if test else 0,
            "class_names": list(train.class_names), "input_size": size, "crop": crop}
    return TrainingRun(trained, config, result, val_report, test_report, tta_scores, speed, model.count_params(),
                       data, speed_single)


def ensemble_report(runs: Sequence[TrainingRun], data: ImageSet) -> tuple[dict[str, Any], np.ndarray]:
    """Classification report of the averaged probabilities of several trained models on ``data``, and the
    averaged probabilities (n, k). Each model sees the images prepared for it, with its own test-time views."""
    proba = np.mean([r.trained.predict_proba(r.trained.prepare(data.images)) for r in runs], axis=0)
    report = metrics.classification_report(data.labels, proba.argmax(axis=1), data.class_names, proba)
    return report, proba


# --------------------------------------------------------------------------------------------------------
# Report 000's study: input transformations x models, k-fold cross-validation
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyInput:
    """One input of report 000's study: an image transformation of uint8 RGB batches (n, h, w, 3) -> the same
    shape and dtype (None: the images as they are), the model input scaling (a key of
    :data:`cellkit.models.PREPROCESSING`) and the training augmentation (see :func:`augment_batch`)."""

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
    """uint8 RGB ``images`` brought to ``size`` x ``size`` (:func:`cellkit.models.prepare_images`), then
    transformed as input ``name`` prescribes (at the model's size, so edges stay one pixel wide)."""
    entry = study_input(name)
    x = _at_size(images, size, crop)
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
    entry, source = models.spec(model_name), study_input(input_name)
    size = entry.input_size
    config = replace(config or FitConfig.for_model(model_name), augment=source.augment)
    x_pool = study_images(pool.images, input_name, size, crop)
    x_test = study_images(test.images, input_name, size, crop) if test is not None else None
    n_classes = len(pool.class_names)
    rows = []
    for fold, (train_index, held_index) in enumerate(kfold_indices(pool.labels, folds, seed)[:fold_limit]):
        keras.utils.set_random_seed(seed + fold)
        set_precision(precision)
        try:
            model = models.build(model_name, n_classes, size)
            result = fit(model, x_pool[train_index], pool.labels[train_index], x_pool[held_index],
                         pool.labels[held_index], config, source.preprocessing, seed + fold, progress,
                         name=f"{model_name}/{input_name}/fold{fold + 1}")
        finally:
            keras.config.set_dtype_policy("float32")
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
    proba = models.predict_proba(model, images, preprocessing)
    return metrics.classification_report(np.asarray(labels), proba.argmax(axis=1), class_names, proba)


def _at_size(images: np.ndarray, size: int, crop: int | None) -> np.ndarray:
    if images.ndim == 4 and images.shape[1:] == (size, size, 3) and images.dtype == np.uint8:
        return images
    return models.prepare_images(images, size, crop)


def evaluate(trained: models.TrainedModel, images: np.ndarray, labels: np.ndarray, tta: str | None = None
             ) -> dict[str, Any]:
    """:func:`cellkit.metrics.classification_report` of ``trained`` on uint8 images at its input size."""
    proba = trained.predict_proba(images, tta)
    report = metrics.classification_report(np.asarray(labels), proba.argmax(axis=1), trained.class_names, proba)
    report["tta"] = tta or trained.info.tta
    return report


# --------------------------------------------------------------------------------------------------------
# Data for the command line: a registered dataset, an npz or a folder of class subfolders
# --------------------------------------------------------------------------------------------------------

#: Registered datasets ``cellkit train classifier --data`` accepts by name, and the crop that made them.
NAMED_DATA = {"pbc28": 200, "pbc_jpg": 200}


@dataclass
class LabelledData:
    """Training data resolved from ``--data``: the three parts, the crop rule, and where it came from."""

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    crop: int | None
    source: str
    split: str


def _default_crop(data: str, crop: int | None) -> int | None:
    """``crop`` if given; else the PBC recipe's 200 for the registered PBC data (by name or location)."""
    from cellkit import datasets

    if crop is not None:
        return crop if crop > 0 else None
    if data in NAMED_DATA:
        return NAMED_DATA[data]
    path = Path(data).resolve()
    for name in NAMED_DATA:
        folder = datasets.locate(name)
        if folder is not None and (path == folder.resolve() or path.parent == folder.resolve()):
            return NAMED_DATA[name]
    return None


def load_training_data(data: str, size: int, crop: int | None = None, seed: int = DEFAULT_SEED
                       ) -> LabelledData:
    """Resolve ``data`` into train/validation/test parts of uint8 RGB images.

    ``data`` is ``pbc28`` (its own 70/10/20 split), ``pbc_jpg`` (the original JPEGs, split as PBC-28), a
    MedMNIST-style npz (``train_``/``val_``/``test_`` arrays; without ``val_`` a tenth of train is held out), a
    plain npz with ``images`` and ``labels``, or a folder of class subfolders (optionally with ``labels.csv``).
    Data without splits are split 70/10/20, stratified and seeded. Folders are read at ``size`` with ``crop``.
    ``crop`` None means the PBC recipe's 200 for the PBC data and the largest centred square otherwise.
    """
    from cellkit import datasets

    crop = _default_crop(data, crop)
    if data == "pbc28":
        parts = [datasets.load_pbc28(s) for s in ("train", "val", "test")]
        return LabelledData(*parts, crop=crop, source="pbc28", split="the npz's train/val/test")
    if data == "pbc_jpg":
        parts = pbc_jpg_parts(datasets.load_pbc_jpg(size=size, crop=crop or PBC_CROP))
        return LabelledData(*parts, crop=crop, source="pbc_jpg", split="PBC-28's split, by file name")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{data}: no such file or folder, and not a dataset name (pbc28, pbc_jpg)")
    if path.is_dir():
        whole = datasets.load_class_folder(path, size=size, crop=crop)
    elif path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
        if "train_images" in keys:
            train = datasets.load_npz(path, split="train")
            test = datasets.load_npz(path, split="test") if "test_images" in keys else None
            if "val_images" in keys:
                val = datasets.load_npz(path, split="val")
                return LabelledData(train, val, test, crop, str(path), "the npz's own splits")
            index = _stratified_index(train.labels, (0.9, 0.1), seed)
            return LabelledData(train.subset(index[0]), train.subset(index[1]), test, crop, str(path),
                                f"the npz's train split, 90/10 stratified (seed {seed}), and its test split")
        whole = datasets.load_npz(path)
    else:
        raise DataError(f"{path}: expected a .npz file or a folder of class subfolders")
    if len(whole) < 10 * len(whole.class_names):
        raise DataError(f"{path}: {len(whole)} images for {len(whole.class_names)} classes is too few to split "
                        "into train/validation/test; give at least 10 per class")
    index = _stratified_index(whole.labels, (0.7, 0.1, 0.2), seed)
    return LabelledData(*(whole.subset(i) for i in index), crop=crop, source=str(path),
                        split=f"70/10/20 stratified, seed {seed}")


def pbc_jpg_parts(whole: ImageSet) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Train/validation/test parts of PBC JPEGs (``load_pbc_jpg``) as PBC-28 is split: each original goes to the
    part its 28x28 copy is in (matched by file name), so no cell is trained on at one size and tested at another.

    Originals without a 28x28 copy (none in the project's data) go to the training part.
    """
    from cellkit import datasets

    part_of = {Path(f).name: part for part in ("train", "val", "test") for f in datasets.load_pbc28(part).files}
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for f in whole.files:
        split[part_of.get(Path(f).name, "train")].append(f)
    train, val, test = _parts_by_id(whole, split)
    return train, val, test


def per_class(data: ImageSet, n: int | None, seed: int = DEFAULT_SEED) -> ImageSet:
    """At most ``n`` images of each class, chosen with ``seed``, in their original order (None: all)."""
    if n is None:
        return data
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(data.labels == c))[:n] for c in range(len(data.class_names))]
    return data.subset(np.sort(np.concatenate(keep)))


def _parts_by_id(whole: ImageSet, split: dict[str, list[str]]) -> list[ImageSet]:
    position = {f: i for i, f in enumerate(whole.files)}
    return [whole.subset(sorted(position[f] for f in split[part])) for part in ("train", "val", "test")]


def _stratified_index(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Positions of each part, stratified by label: every class is shuffled and cut by ``fractions``."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    edges = np.cumsum(fractions)[:-1]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.maximum(1, np.round(edges * len(members)).astype(int))
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def load_evaluation_data(data: str, info: models.ModelInfo, split: str = "test") -> ImageSet:
    """Labelled images from ``data`` for a model with ``info``, labels renumbered to the model's classes.

    ``data``: ``pbc28`` (its ``split``), ``pbc_jpg`` (its ``split`` part, as PBC-28's), a MedMNIST-style npz
    (``split``), a plain npz, or a folder of class subfolders. Class names found in the data are matched to the
    model's by name; bare class ids must lie within the model's classes. A label outside them is a DataError.
    """
    from cellkit import datasets

    if data == "pbc28":
        found = datasets.load_pbc28(split)
    elif data == "pbc_jpg":
        parts = load_training_data("pbc_jpg", info.input_size, info.crop)
        return {"train": parts.train, "val": parts.val, "test": parts.test}[split]
    else:
        path = Path(data)
        if path.is_dir():
            found = datasets.load_class_folder(path, size=info.input_size, crop=info.crop)
        elif path.suffix.lower() == ".npz" or path.is_file():
            found = datasets.load_npz(path, split=_npz_split(path, split), class_names=info.class_names)
        else:
            raise DataError(f"{data}: no such file or folder, and not a dataset name (pbc28, pbc_jpg)")
    return align_classes(found, info.class_names)


def _npz_split(path: Path, split: str) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return None if "images" in archive.files else split
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from None


def align_classes(data: ImageSet, class_names: Sequence[str]) -> ImageSet:
    """``data`` with labels renumbered to positions in ``class_names``, matching names (case-insensitive).

    Data whose names are the generic ``class_0``, ``class_1`` ... keep their ids (which must be < k).
    """
    names = list(class_names)
    generic = [f"class_{i}" for i in range(len(data.class_names))]
    if data.class_names == generic or data.class_names == names:
        if len(data.labels) and data.labels.max() >= len(names):
            raise DataError(f"{data.source}: label {int(data.labels.max())} is outside the model's {len(names)} "
                            f"classes (0..{len(names) - 1})")
        return ImageSet(data.images, data.labels, names, data.files, data.source)
    lookup = {n.lower(): i for i, n in enumerate(names)}
    used = {data.class_names[i] for i in np.unique(data.labels)}
    unknown = sorted(n for n in used if n.lower() not in lookup)
    if unknown:
        raise DataError(f"{data.source}: class {unknown[0]!r} is not one of the model's classes "
                        f"({', '.join(names)})")
    mapping = np.array([lookup.get(n.lower(), -1) for n in data.class_names])
    return ImageSet(data.images, mapping[data.labels], names, data.files, data.source)


# --------------------------------------------------------------------------------------------------------
# VGG16 transfer learning (report 004): class imbalance, phases on cached features, multi-label heads
# --------------------------------------------------------------------------------------------------------
#
# VGG16 at 96x96 costs about 3 GFLOP per image and pass, so on a CPU nothing runs the frozen blocks twice:
# the outputs of blocks 1-4 (:data:`cellkit.models.VGG16_CUT`) are computed once per image (:func:`cache_target`),
# the head is trained on block 5's outputs (phase 1), and fine-tuning trains block 5 and the head on the cached
# block-4 outputs (phase 2). Training from scratch has no such shortcut: every step runs the whole network.

#: How a classifier meets class imbalance: report 004 augmented the under-represented classes only, after the
#: split, and weighted the classes in its multi-label models.
IMBALANCE_VARIANTS = ("none", "class_weights", "augment", "augment+class_weights")


def scope_name(name: str, default: str = "model") -> str:
    """``name`` as a valid TensorFlow scope (and Keras model) name: runs of other characters become ``_``."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-") or default


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
    return augment_batch(images[index], rng, "dihedral"), labels[index]


def outputs_of(model: Any, images: np.ndarray, preprocessing: str | None = "caffe", batch_size: int = 32
               ) -> np.ndarray:
    """``model``'s float32 outputs for uint8 ``images`` (scaled with ``preprocessing``) or for float arrays
    (``preprocessing=None``), in batches so that only one batch is scaled at a time."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        x = models.preprocess(x, preprocessing) if preprocessing else x
        out.append(np.asarray(model(x, training=False)).astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, *model.output_shape[1:]), np.float32)


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
                 cut: str = models.VGG16_CUT, batch_size: int = 32) -> TargetCache:
    """Run the frozen VGG16 ``base`` once over the target's training images, their :func:`minority_copies`,
    and the validation and test images (uint8, the base's input size), keeping the outputs at ``cut`` and at
    the top. Timed, with the peak memory of the process."""
    lower, upper = models.split_vgg16(base, cut)
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


def fit_arrays(model: Any, x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, epochs: int,
               learning_rate: float, batch_size: int = 32, patience: int = 8, sample_weight: np.ndarray | None = None,
               seed: int = DEFAULT_SEED, progress: str = "none", name: str = "") -> FitResult:
    """Train ``model`` on precomputed arrays with Adam at ``learning_rate``; early stopping keeps the best epoch.

    ``y`` holds class indices (n,) for a softmax model (categorical cross-entropy, best = highest validation
    accuracy) or 0/1 targets (n, L) for a sigmoid model (binary cross-entropy, best = lowest validation loss).
    """
    binary = np.asarray(y).ndim == 2
    n_out = int(model.output_shape[-1])
    target = (lambda t: np.asarray(t, np.float32)) if binary else (lambda t: np.eye(n_out, dtype=np.float32)[t])
    steps = epochs * int(np.ceil(len(x) / batch_size))
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="binary_crossentropy" if binary else "categorical_crossentropy", metrics=["accuracy"],
                  run_eagerly=steps <= EAGER_MAX_STEPS)  # a few steps run faster than tracing the graph
    monitor, mode = ("val_loss", "min") if binary else ("val_accuracy", "max")
    callbacks = [keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience,
                                               restore_best_weights=True)]
    if progress != "none":
        callbacks.append(_Progress(epochs, int(np.ceil(len(x) / batch_size)), progress == "bar", name or model.name))
    keras.utils.set_random_seed(seed)
    run = timed_fit(model, x, y=target(y), sample_weight=sample_weight, validation_data=(val_x, target(val_y)),
                    epochs=epochs, batch_size=batch_size, callbacks=callbacks, shuffle=True)
    hist, seconds, cpu_seconds = run.history, run.seconds, run.cpu_seconds
    watched = np.asarray(hist[monitor])
    best = int(np.nanargmin(watched) if binary else np.nanargmax(watched))
    return FitResult(history=hist, seconds=seconds, epochs_run=len(watched), best_epoch=best + 1,
                     best_val_accuracy=float(hist["val_accuracy"][best]), peak_rss_mb=run.peak_mb,
                     rss_increase_mb=run.increase_mb, precision=current_precision(),
                     seconds_per_epoch=seconds / max(len(watched), 1), stopped_early=len(watched) < epochs,
                     cpu_seconds=cpu_seconds)


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
        reports.append((metrics.classification_report(y, proba.argmax(axis=1), class_names, proba), proba))
    return reports[0][0], reports[1][0], reports[1][1]


def transfer_run(base: Any, cache: TargetCache, class_names: Sequence[str], variant: str = "none",
                 head_epochs: int = 40, head_lr: float = 1e-3, finetune_epochs: int = 10, finetune_lr: float = 1e-5,
                 batch_size: int = 32, patience: int = 8, seed: int = DEFAULT_SEED, progress: str = "none",
                 name: str = "transfer", cut: str = models.VGG16_CUT) -> ClassifierRun:
    """Report 004's transfer on cached outputs of ``base``: phase 1 trains the head on the frozen base's top
    outputs; phase 2 (``finetune_epochs`` > 0) trains block 5 and the head together at the low ``finetune_lr``
    on the cached block-4 outputs. ``base`` itself is left unchanged (block 5 is fine-tuned in a copy).

    The returned ``model`` maps block-4 outputs to probabilities; ``seconds`` holds ``cache`` (the share of
    computing the cache for the images used), ``head`` and ``finetune``.
    """
    n, name = len(class_names), scope_name(name, "transfer")
    x, y, weights = cache.arrays(variant, n, "top")
    head = models.build_transfer_head(x.shape[1:], n)
    fits = {"head": fit_arrays(head, x, y, cache.top["val"], cache.labels["val"], head_epochs, head_lr, batch_size,
                               patience, weights, seed, progress, f"{name} head")}
    _, upper_frozen = models.split_vgg16(base, cut)
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
    model = models.build_vgg16_classifier(n, x.shape[1], weights=None)
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
    x, xv = _at_size(source.images, size, None), _at_size(source_val.images, size, None)
    keras.utils.set_random_seed(seed)
    model = models.build_vgg16_classifier(len(source.class_names), size, weights=None)
    config = FitConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, patience=epochs,
                       augment="dihedral")
    result = fit(model, x, source.labels, xv, source_val.labels, config, "caffe", seed, progress, "source",
                 max_seconds)
    proba = outputs_of(model, xv, "caffe")
    report = metrics.classification_report(source_val.labels, proba.argmax(axis=1), source.class_names, proba)
    return model.get_layer("vgg16"), result, report


def base_with_weights(input_size: int, weights_from: Any) -> Any:
    """A VGG16 base for ``input_size`` holding the weights of another VGG16 base (of any input size)."""
    base = models.build_vgg16_base(input_size, None)
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
        head = models.build_transfer_head(x.shape[1:], targets.shape[1], "sigmoid", name="multi")
        fit_arrays(head, x, targets, val_x, val_targets, epochs, learning_rate, batch_size, patience, None, seed)
        return outputs_of(head, test_x, None), time.perf_counter() - started
    if mode != "binary_relevance":
        raise ValueError(f"unknown mode {mode!r}; use binary_relevance or multi_output")
    weights = label_weights(targets) if weighted else None
    columns = []
    for j in range(targets.shape[1]):
        head = models.build_transfer_head(x.shape[1:], 1, "sigmoid", name=f"label{j}")
        fit_arrays(head, x, targets[:, j : j + 1], val_x, val_targets[:, j : j + 1], epochs, learning_rate,
                   batch_size, patience, None if weights is None else weights[:, j], seed)
        columns.append(outputs_of(head, test_x, None)[:, 0])
    return np.stack(columns, axis=1), time.perf_counter() - started


# --------------------------------------------------------------------------------------------------------
# U-Net training and evaluation (reports 002 and 003)
# --------------------------------------------------------------------------------------------------------
#
# >>> from cellkit import datasets, training
# >>> split = datasets.dsb2018_split()
# >>> train, val, test = (datasets.load_dsb2018(split[p]) for p in ("train", "val", "test"))
# >>> run = training.train_unet(train, val, test)              # UNetConfig() is the default model
# >>> run.test_scores["f1"], run.test_scores["seg"], run.throughput["mpx_per_s"]
# >>> run.save("models/unet.keras")

#: Augmentations a U-Net recipe can name: "none", or a recipe of :data:`cellkit.transforms.RECIPES`, optionally
#: with "+rot90" (random quarter turns on top: nuclei have no "up").
UNET_AUGMENTATIONS = ("none", "report002", "report003", "report002+rot90", "report003+rot90")

#: How a training crop picks its image (:attr:`UNetConfig.crop_sampling`).
CROP_SAMPLINGS = ("image", "nuclei")


@dataclass
class UNetConfig:
    """A U-Net training recipe. The defaults make the default model of ``cellkit train unet`` and notebook 07:
    report 002's 3-class U-Net with its input enhancement and augmentation, at a width a 2-core CPU trains in
    minutes (see the README for the measured time and scores).

    Attributes
    ----------
    n_classes : 1 (sigmoid + binary focal loss, report 003) or 3 (softmax + weighted cross-entropy, report 002).
    channels : input channels of :func:`cellkit.segmentation.input_stack` (report 002: original, inverse, canny;
        ``local`` adds :func:`cellkit.segmentation.local_contrast`, cut from the whole image for each crop).
    base_filters, depth, dropout, batch_norm : the architecture (:func:`cellkit.models.build_unet`; report 003:
        64 filters, depth 4, dropout 0.05, batch norm).
    crop : side in pixels of the square training crops (report 002: 128 best, 256).
    batch_size : crops per step (report 002: 8 best; report 003: 4).
    steps_per_epoch, epochs : training length; every step draws fresh random crops.
    learning_rate : Adam's (peak) rate (reports: 2e-4).
    schedule : ``constant`` or ``cosine`` (one warm-up epoch from a tenth of the rate, then cosine decay to 0).
    augmentation : one of :data:`UNET_AUGMENTATIONS`, applied to each crop and its labels.
    foreground_fraction : share of crops placed on a random nucleus pixel (the rest uniformly).
    crop_sampling : how each crop picks its training image: ``image`` (uniformly) or ``nuclei`` (in proportion
        to the image's number of nuclei, :func:`cellkit.segmentation.nuclei_weights`: a few large, crowded
        images, such as DSB's tissue sections, then get the share of crops their share of nuclei asks for).
    class_weights : weights of background, cell, edge in the 3-class loss (1, 1, 1: unweighted).
    edge_width : width in pixels of the edge class (:func:`cellkit.segmentation.three_class_target`).
    focal_gamma, focal_alpha : the 1-class loss (report 003: 2 and 0.5).
    patience : epochs without a lower validation loss before stopping (0: train all epochs); the weights of the
        epoch with the lowest validation loss are kept either way.
    val_crops, val_crop_size : the fixed validation crops the validation loss is computed on.
    tile, overlap : tiled prediction of whole images (:func:`cellkit.segmentation.predict_tiled`), after the zoom.
    nucleus_diameter : median nucleus diameter in px to train and predict at: each training image is zoomed so
        that the median diameter of its reference nuclei becomes this, each image to predict by its estimated
        diameter (:meth:`cellkit.models.TrainedUNet.scale`); DSB's nuclei range from 8 to 94 px, too wide a
        range for one network with a 128 px crop. None: images are used at their own scale.
    """

    n_classes: int = 3
    channels: tuple[str, ...] = ("original", "inverse", "canny")
    base_filters: int = 16
    depth: int = 4
    dropout: float = 0.05
    batch_norm: bool = True
    crop: int = 128
    batch_size: int = 8
    steps_per_epoch: int = 100
    epochs: int = 40
    learning_rate: float = 2e-3
    schedule: str = "cosine"
    augmentation: str = "report002+rot90"
    foreground_fraction: float = 0.5
    crop_sampling: str = "nuclei"
    class_weights: tuple[float, ...] = (1.0, 1.0, 3.0)
    edge_width: int = 1
    focal_gamma: float = 2.0
    focal_alpha: float = 0.5
    patience: int = 0
    val_crops: int = 32
    val_crop_size: int = 256
    tile: int = 512
    overlap: int = 32
    nucleus_diameter: float | None = 24.0

    def __post_init__(self) -> None:
        from cellkit import segmentation

        self.channels = tuple(self.channels)
        self.class_weights = tuple(float(w) for w in self.class_weights)
        if self.n_classes not in (1, 3):
            raise ValueError(f"n_classes must be 1 (foreground) or 3 (background, cell, edge), got {self.n_classes}")
        unknown = [c for c in self.channels if c not in segmentation.INPUT_CHANNELS]
        if unknown or not self.channels:
            raise ValueError(f"channels must be a non-empty selection of {segmentation.INPUT_CHANNELS}, "
                             f"got {self.channels}")
        if self.augmentation not in UNET_AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augmentation!r}; use {', '.join(UNET_AUGMENTATIONS)}")
        if self.crop_sampling not in CROP_SAMPLINGS:
            raise ValueError(f"unknown crop_sampling {self.crop_sampling!r}; use {' or '.join(CROP_SAMPLINGS)}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; use constant or cosine")
        multiple = models.unet_multiple(self.depth)
        for name in ("crop", "val_crop_size", "tile"):
            if getattr(self, name) < multiple or getattr(self, name) % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} (2 ** depth), got "
                                 f"{getattr(self, name)}")
        if self.n_classes == 3 and len(self.class_weights) != 3:
            raise ValueError(f"class_weights needs 3 values (background, cell, edge), got {self.class_weights}")
        if self.nucleus_diameter is not None and not self.nucleus_diameter > 0:
            raise ValueError(f"nucleus_diameter must be > 0 px or None, got {self.nucleus_diameter}")
        if min(self.epochs, self.steps_per_epoch, self.batch_size, self.val_crops) < 1:
            raise ValueError("epochs, steps_per_epoch, batch_size and val_crops must be at least 1")

    @property
    def crops_seen(self) -> int:
        return self.epochs * self.steps_per_epoch * self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Report 003's recipe, as stated (section 5.3.1): 1 sigmoid output, binary focal loss, 64 base filters, Adam
#: 2e-4, batch 4, rotation/shift/shear/flip augmentation with reflected fill. Its early stopping (patience 250 of
#: up to 3000 epochs on a GPU) is not affordable on a CPU; give ``epochs``.
REPORT003_UNET = {"n_classes": 1, "channels": ("original",), "base_filters": 64, "learning_rate": 2e-4,
                  "schedule": "constant", "batch_size": 4, "augmentation": "report003"}
#: Report 002's recipe: 3 classes, weighted cross-entropy, original/inverse/Canny input, stretch + crop 128 + flips
#: + noise, batch 8, Adam 2e-4 (its width and edge weight are not stated).
REPORT002_UNET = {"n_classes": 3, "channels": ("original", "inverse", "canny"), "learning_rate": 2e-4,
                  "schedule": "constant", "batch_size": 8, "crop": 128, "augmentation": "report002"}


def _augmentation(name: str) -> tuple[Any, bool]:
    """(geometric :class:`~cellkit.transforms.Augmentation` without noise or None, quarter turns?) and the
    noise sigma is read from the recipe separately."""
    from cellkit import transforms

    base, _, extra = name.partition("+")
    if base == "none":
        return None, False
    return transforms.RECIPES[base], extra == "rot90"


def stack_from_normalised(grey: np.ndarray, channels: Sequence[str], canny_thresholds: tuple[float, float] = (10, 200),
                          noise: np.ndarray | None = None, local: np.ndarray | None = None) -> np.ndarray:
    """The :func:`cellkit.segmentation.input_stack` channels of an image already normalised to [0, 1] (a crop
    of a whole-image normalisation, so crops keep the scaling of the image they come from). ``noise`` (same
    shape) is added to the original channel after Canny edges are taken, so the inverse gets it too and the
    Canny channel does not (report 002). ``local``: the same crop of the whole image's
    :func:`cellkit.segmentation.local_contrast` (a crop's own would differ within about 2 sigma of its border);
    needed when ``channels`` has ``local``. Returns (H, W, C) float32."""
    from cellkit import transforms

    original = np.asarray(grey, dtype=np.float32)
    made: dict[str, np.ndarray] = {}
    if "canny" in channels:
        made["canny"] = (transforms.canny(transforms.as_uint8(original), *canny_thresholds) > 0).astype(np.float32)
    if "local" in channels:
        if local is None:
            raise ValueError("the local channel must be cut from the whole image's local contrast; pass local=")
        made["local"] = np.asarray(local, dtype=np.float32)
    if noise is not None:
        original = np.clip(original + noise, 0.0, 1.0)
    made["original"] = original
    if "inverse" in channels:
        made["inverse"] = np.float32(1) - original
    return np.stack([made[c] for c in channels], axis=-1).astype(np.float32, copy=False)


def with_local_contrast(images: Sequence[np.ndarray], channels: Sequence[str]) -> list[np.ndarray]:
    """Whole normalised images (H, W) as they are, or, when ``channels`` has ``local``, as (H, W, 2): the image
    and its :func:`cellkit.segmentation.local_contrast`, so that crops cut both at once."""
    from cellkit import segmentation

    if "local" not in channels:
        return list(images)
    return [np.stack([image, segmentation.local_contrast(image)], axis=-1) for image in images]


def _split_local(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(grey, local or None) of a crop of :func:`with_local_contrast`'s images."""
    return (crop[..., 0], crop[..., 1]) if crop.ndim == 3 else (crop, None)


def unet_targets(labels: np.ndarray, n_classes: int, edge_width: int = 1) -> np.ndarray:
    """Training targets of instance label crops (n, h, w): (n, h, w, 1) nucleus masks for 1 output, one-hot
    (n, h, w, 3) background/cell/edge for 3 (edges from the instance ids, so touching nuclei are separated)."""
    from cellkit import segmentation

    if n_classes == 1:
        return (np.asarray(labels) > 0).astype(np.float32)[..., None]
    eye = np.eye(3, dtype=np.float32)
    return np.stack([eye[segmentation.three_class_target(label, edge_width)] for label in labels])


class CropBatches(keras.utils.PyDataset):
    """Fresh random training crops every step: (input stacks (B, crop, crop, C), targets (B, crop, crop, K)).

    ``images`` are whole images already normalised to [0, 1] (per image, as at prediction time); crops and their
    labels are augmented together, then the input channels and the targets are made from them.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], config: UNetConfig,
                 rng: np.random.Generator, canny_thresholds: tuple[float, float] = (10, 200)) -> None:
        from cellkit import segmentation

        super().__init__()
        self.images = with_local_contrast(images, config.channels)
        self.labels, self.config, self.rng = list(labels), config, rng
        self.canny_thresholds = canny_thresholds
        recipe, self.rot90 = _augmentation(config.augmentation)
        self.image_weights = segmentation.nuclei_weights(self.labels) if config.crop_sampling == "nuclei" else None
        self.noise_sigma = recipe.noise_sigma if recipe is not None else 0.0
        self.recipe = None if recipe is None else replace(recipe, noise_sigma=0.0, noise_channels=None)

    def __len__(self) -> int:
        return self.config.steps_per_epoch

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        from cellkit import segmentation

        c = self.config
        crops, labels = segmentation.random_crops(self.images, self.labels, c.batch_size, c.crop, self.rng,
                                                  c.foreground_fraction, self.recipe, self.image_weights)
        if self.rot90:
            turns = self.rng.integers(0, 4, len(crops))
            crops = np.stack([np.rot90(x, k) for x, k in zip(crops, turns, strict=True)])
            labels = np.stack([np.rot90(y, k) for y, k in zip(labels, turns, strict=True)])
        greys, locals_ = zip(*(_split_local(crop) for crop in crops), strict=True)
        noise = (self.rng.standard_normal((len(crops), *greys[0].shape), dtype=np.float32)
                 * np.float32(self.noise_sigma) if self.noise_sigma > 0 else [None] * len(crops))
        x = np.stack([stack_from_normalised(grey, c.channels, self.canny_thresholds, n, local)
                      for grey, n, local in zip(greys, noise, locals_, strict=True)])
        return x, unet_targets(labels, c.n_classes, c.edge_width)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batch()


def normalised_images(data: Any, low: float = 1.0, high: float = 99.8) -> list[np.ndarray]:
    """Each image of a :class:`~cellkit.datasets.SegmentationSet` as grey float32 in [0, 1] (per-image
    percentile normalisation, as :func:`cellkit.segmentation.input_stack` does)."""
    from cellkit import segmentation

    return [segmentation.input_stack(image, ("original",), low, high)[..., 0] for image in data.images]


def zoomed_images(data: Any, nucleus_diameter: float | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images, labels) of a SegmentationSet for training: each image zoomed so that the median diameter of its
    reference nuclei becomes ``nucleus_diameter`` px (:func:`cellkit.segmentation.scale_factor`; None: as they
    are), then normalised to [0, 1] as :func:`normalised_images` does (after the zoom, as at prediction time)."""
    from cellkit import segmentation

    images, labels = [], []
    for image, label in zip(data.images, data.labels, strict=True):
        factor = segmentation.scale_factor(segmentation.median_diameter(label), nucleus_diameter)
        images.append(segmentation.input_stack(segmentation.zoom(image, factor), ("original",))[..., 0])
        labels.append(segmentation.zoom(label, factor, labels=True))
    return images, labels


def validation_crops(data: Any, config: UNetConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation crops (inputs, targets): ``config.val_crops`` crops of ``config.val_crop_size`` px of
    the zoomed images (:func:`zoomed_images`), half of them on nuclei, drawn once with ``seed``, without
    augmentation."""
    from cellkit import segmentation

    images, labels = zoomed_images(data, config.nucleus_diameter)
    crops, labels = segmentation.random_crops(with_local_contrast(images, config.channels), labels, config.val_crops,
                                              config.val_crop_size, np.random.default_rng(seed), 0.5, None)
    pairs = [_split_local(crop) for crop in crops]
    x = np.stack([stack_from_normalised(grey, config.channels, local=local) for grey, local in pairs])
    return x, unet_targets(labels, config.n_classes, config.edge_width)


#: Runs of at most this many steps train eagerly: tracing a U-Net's training step into a graph costs 10-25 s of
#: CPU, more than a few eager steps (about 1 s each for a narrow U-Net); longer runs are traced (much faster steps).
EAGER_MAX_STEPS = 24


def compile_unet(model: Any, config: UNetConfig, run_eagerly: bool = False) -> Any:
    """Compile with Adam (constant or cosine rate) and the loss of ``config.n_classes``; returns the model."""
    rate: Any = config.learning_rate
    if config.schedule == "cosine":
        warmup = min(config.steps_per_epoch, max(1, config.epochs * config.steps_per_epoch // 10))
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.learning_rate / 10,
            decay_steps=max(1, config.epochs * config.steps_per_epoch - warmup),
            warmup_target=config.learning_rate, warmup_steps=warmup)
    loss = (models.binary_focal_loss(config.focal_gamma, config.focal_alpha) if config.n_classes == 1
            else models.weighted_categorical_crossentropy(config.class_weights))
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=loss, run_eagerly=run_eagerly)
    return model


@dataclass
class UNetFit:
    """What :func:`fit_unet` measured. ``seconds`` is wall time of ``model.fit``; ``cpu_seconds`` the process
    CPU time over it (divided by the cores, an estimate of the wall time on an idle machine)."""

    history: dict[str, list[float]]
    seconds: float
    cpu_seconds: float
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    peak_rss_mb: float
    rss_increase_mb: float
    precision: str
    crops_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_unet(train: Any, val: Any, config: UNetConfig | None = None, seed: int = DEFAULT_SEED,
             precision: str = "auto", progress: str = "epoch", name: str = "unet") -> tuple[Any, UNetFit]:
    """Build a U-Net for ``config`` and train it on random crops of ``train`` (a SegmentationSet), with the
    validation loss on fixed crops of ``val``; returns (the Keras model, with the weights of the epoch with the
    lowest validation loss, and what was measured). ``precision``: ``auto`` (mixed bfloat16 where the CPU has
    bfloat16 instructions), ``bfloat16`` or ``float32``. ``progress``: ``bar``, ``epoch`` or ``none``."""
    config = config or UNetConfig()
    if not len(train) or not len(val):
        raise DataError("U-Net training needs at least one training and one validation image")
    name = scope_name(name, "unet")
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    used = set_precision(precision)
    try:
        model = models.build_unet(len(config.channels), config.n_classes, config.base_filters, config.depth,
                                  config.dropout, config.batch_norm, name=name)
    finally:
        keras.config.set_dtype_policy("float32")
    compile_unet(model, config, run_eagerly=config.epochs * config.steps_per_epoch <= EAGER_MAX_STEPS)
    batches = CropBatches(*zoomed_images(train, config.nucleus_diameter), config, rng)
    val_x, val_y = validation_crops(val, config, seed + 1)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=config.patience or config.epochs,
                                            restore_best_weights=True)
    callbacks: list[Any] = [stopper]
    if progress != "none":
        callbacks.append(_Progress(config.epochs, len(batches), progress == "bar", name,
                                   reported=("loss", "val_loss")))
    run = timed_fit(model, batches, validation_data=(val_x, val_y), epochs=config.epochs, callbacks=callbacks,
                    validation_batch_size=8)
    hist, seconds, cpu_seconds = run.history, run.seconds, run.cpu_seconds
    epochs_run = len(hist.get("loss", []))
    val_loss = hist.get("val_loss", [float("nan")])
    best = int(np.nanargmin(val_loss)) if epochs_run else 0
    fit = UNetFit(history=hist, seconds=seconds, cpu_seconds=cpu_seconds, epochs_run=epochs_run, best_epoch=best + 1,
                  best_val_loss=float(val_loss[best]), peak_rss_mb=run.peak_mb, rss_increase_mb=run.increase_mb,
                  precision=used, crops_per_second=epochs_run * config.steps_per_epoch * config.batch_size / seconds)
    return model, fit


def unet_info(config: UNetConfig, postprocess: dict[str, Any] | None = None, trained_on: str = "") -> Any:
    """The :class:`cellkit.models.UNetInfo` of a model trained with ``config``."""
    return models.UNetInfo(n_classes=config.n_classes, channels=list(config.channels),
                           base_filters=config.base_filters, depth=config.depth, dropout=config.dropout,
                           batch_norm=config.batch_norm, edge_width=config.edge_width,
                           postprocess=dict(postprocess or {}), tile=config.tile, overlap=config.overlap,
                           trained_on=trained_on, nucleus_diameter=config.nucleus_diameter)


# --- from probabilities to scores ----------------------------------------------------------------------------

#: Post-processing tried by :func:`tune_postprocessing`, one parameter at a time (coordinate search).
POSTPROCESS_GRID: dict[int, dict[str, list[Any]]] = {
    3: {"seed_threshold": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "foreground_threshold": [0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        "min_size": [5, 10, 15, 25, 40]},
    1: {"threshold": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "split_touching": [False, True], "h": [0.5, 1.0, 2.0],
        "min_size": [5, 10, 15, 25, 40]},
}
#: The starting point of the search (the functions' defaults).
POSTPROCESS_START: dict[int, dict[str, Any]] = {
    3: {"seed_threshold": 0.5, "foreground_threshold": 0.5, "min_size": 15},
    1: {"threshold": 0.5, "split_touching": False, "min_size": 15},
}


def predict_probabilities(trained: Any, images: Sequence[np.ndarray], tile: int | None | str = "auto"
                          ) -> list[np.ndarray]:
    """Probabilities (H, W, K) of each image (any sizes)."""
    return [trained.probabilities(image, tile) for image in images]


def instances_from(probs: Sequence[np.ndarray], postprocess: dict[str, Any]) -> list[np.ndarray]:
    """Instance labels of each probability map with ``postprocess`` (see
    :func:`cellkit.segmentation.probs_to_instances`; ``h`` only applies with ``split_touching``)."""
    from cellkit import segmentation

    params = dict(postprocess)
    if not params.get("split_touching", False):
        params.pop("h", None)
    return [segmentation.probs_to_instances(p, **params) for p in probs]


def _objective(scores: dict[str, Any]) -> float:
    return (scores["f1"] + scores["seg"]) / 2


def tune_postprocessing(probs: Sequence[np.ndarray], gts: Sequence[np.ndarray], n_classes: int,
                        grid: dict[str, list[Any]] | None = None, rounds: int = 2) -> tuple[dict[str, Any], list[dict]]:
    """Choose post-processing parameters on (validation) probabilities: a coordinate search over ``grid``
    (default :data:`POSTPROCESS_GRID`), ``rounds`` passes, maximising the mean of F1 at IoU 0.5 and SEG (both
    pooled over the images). Returns (the best parameters, one row per setting tried with its scores)."""
    import json

    grid = grid or POSTPROCESS_GRID[n_classes]
    best = dict(POSTPROCESS_START[n_classes])
    tried: dict[str, dict[str, Any]] = {}

    def score(params: dict[str, Any]) -> float:
        key = json.dumps(params, sort_keys=True)
        if key not in tried:
            labels = instances_from(probs, params)
            s = {**metrics.match_dataset(labels, gts, thresholds=(0.5,))["by_threshold"][0.5],
                 "seg": metrics.seg_dataset(labels, gts)["seg"]}
            tried[key] = {**params, "f1": s["f1"], "ap": s["ap"], "seg": s["seg"], "objective": _objective(s)}
        return tried[key]["objective"]

    best_score = score(best)
    for _ in range(rounds):
        changed = False
        for name, values in grid.items():
            if name == "h" and not best.get("split_touching", False):
                continue
            for value in values:
                candidate = {**best, name: value}
                if name == "split_touching" and value and "h" not in candidate:
                    candidate["h"] = grid.get("h", [0.5])[0]
                if (s := score(candidate)) > best_score + 1e-9:
                    best, best_score, changed = candidate, s, True
        if not changed:
            break
    if not best.get("split_touching", False):
        best.pop("h", None)
    return best, list(tried.values())


def segmentation_throughput(trained: Any, images: Sequence[np.ndarray], min_seconds: float = 5.0) -> dict[str, float]:
    """Megapixels per second (of the original images) of the whole pipeline as ``cellkit segment`` runs it
    (:meth:`~cellkit.models.TrainedUNet.segment_many`: diameter estimate, zoom, input stack, tiled network and
    instances, the steps around the network overlapped with it), and of the tiled network alone on inputs prepared
    beforehand. Steady state: every image is prepared and predicted once, untimed, which traces the network for every
    input shape the images need (a one-off cost per new shape, which a long run over many images amortises); then the
    images are cycled until each measurement has taken ``min_seconds / 2`` (and at least 3 images). Wall-clock on this
    machine: other processes on the CPU lower it."""
    if not len(images):
        raise ValueError("no images to time")
    stacks = [trained.prepare(image) for image in images]  # kept: the network alone is timed on them below
    for stack in stacks:  # warm-up, so that short timings do not measure tracing
        trained.predict_stack(stack)
    enough = min(len(images), 3)

    done_px, started = 0, time.perf_counter()
    steps = trained.segment_many(itertools.cycle(images))
    for whole_images, (labels, _) in enumerate(steps, start=1):
        done_px += labels.size  # labels have the original image's (H, W)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds / 2 and whole_images >= enough:
            break
    steps.close()  # lets the worker threads finish the image or two still in flight
    network_px, network_s = 0, 0.0
    for i, (image, stack) in enumerate(itertools.cycle(zip(images, stacks, strict=True)), start=1):
        t0 = time.perf_counter()
        trained.predict_stack(stack)
        network_s += time.perf_counter() - t0
        network_px += image.shape[0] * image.shape[1]
        if network_s >= min_seconds / 2 and i >= enough:
            break
    return {"mpx_per_s": done_px / elapsed / 1e6, "network_mpx_per_s": network_px / network_s / 1e6,
            "images": whole_images, "seconds": elapsed}


@dataclass
class UNetRun:
    """A trained U-Net with everything measured about it (see :func:`train_unet`)."""

    trained: Any
    config: UNetConfig
    fit: UNetFit
    postprocess_table: list[dict[str, Any]]
    val_scores: dict[str, Any]
    test_scores: dict[str, Any] | None
    throughput: dict[str, float]
    n_params: int
    data: dict[str, Any] = field(default_factory=dict)
    test_labels: list[np.ndarray] | None = None
    test_probs: list[np.ndarray] | None = None

    def summary(self) -> dict[str, Any]:
        """A flat dict of the key numbers (one row of a results table)."""
        import json

        test = self.test_scores or {}
        return {
            "classes": self.config.n_classes, "channels": "+".join(self.config.channels),
            "augmentation": self.config.augmentation, "base_filters": self.config.base_filters,
            "params": self.n_params, "precision": self.fit.precision, "crops_seen": self.config.crops_seen,
            "epochs_run": self.fit.epochs_run, "best_epoch": self.fit.best_epoch,
            "train_minutes": round(self.fit.seconds / 60, 2), "train_cpu_minutes": round(self.fit.cpu_seconds / 60, 2),
            "peak_rss_mb": round(self.fit.peak_rss_mb, 1),
            "val_f1": self.val_scores["f1"], "val_seg": self.val_scores["seg"],
            "test_f1": test.get("f1"), "test_ap": test.get("ap"), "test_seg": test.get("seg"),
            "test_pq": test.get("pq"), "mpx_per_s": self.throughput.get("mpx_per_s"),
            "postprocess": json.dumps(self.trained.info.postprocess, sort_keys=True),
        }

    def record(self) -> dict[str, Any]:
        """Everything, JSON-ready (per-image rows dropped): what ``cellkit train unet`` writes beside the model."""
        def strip(scores):
            return None if scores is None else {k: v for k, v in scores.items() if k != "per_image"}

        return {"summary": self.summary(), "unet_config": self.config.to_dict(), "fit": self.fit.to_dict(),
                "postprocess_search": self.postprocess_table, "validation": strip(self.val_scores),
                "test": strip(self.test_scores), "throughput": self.throughput, "data": self.data,
                "versions": {"keras": keras.__version__, "numpy": np.__version__}}

    def save(self, path: str | Path) -> Path:
        """Save the model (float32 ``.keras`` with its metadata) and :meth:`record` as ``NAME.json`` beside it."""
        return models.save_unet(self.trained.model, self.trained.info, path, extra=self.record())


def train_unet(train: Any, val: Any, test: Any | None = None, config: UNetConfig | None = None,
               precision: str = "auto", seed: int = DEFAULT_SEED, progress: str = "epoch", name: str = "unet",
               tune: bool = True, measure_throughput: bool = True, throughput_seconds: float = 5.0,
               inference_precision: str = "float32", keep_test_predictions: bool = False,
               **overrides: Any) -> UNetRun:
    """Train a U-Net (:func:`fit_unet`), choose its post-processing on ``val`` (:func:`tune_postprocessing`),
    score it on ``val`` and (if given) ``test`` with every segmentation metric
    (:func:`cellkit.models.segmentation_scores`) and time its inference (:func:`segmentation_throughput`, on
    the validation images). ``config`` (default :class:`UNetConfig`) is updated with ``overrides`` such as
    ``epochs=5``. ``inference_precision``: precision of the scored and timed predictions (the saved model is
    float32 either way). With ``keep_test_predictions`` the test label images are kept on the run (as uint16).

    Runs of at most :data:`EAGER_MAX_STEPS` steps (tests, the notebooks' smoke profile) train and predict eagerly
    and search the post-processing in one pass: there, tracing graphs would cost more than the work itself.
    """
    config = replace(config or UNetConfig(), **{k: v for k, v in overrides.items() if v is not None})
    small = config.epochs * config.steps_per_epoch <= EAGER_MAX_STEPS
    model, fit = fit_unet(train, val, config, seed, precision, progress, name)
    info = unet_info(config, trained_on=getattr(train, "source", ""))
    trained = models.TrainedUNet(models.unet_in_precision(model, info, inference_precision), info, eager=small)
    val_probs = predict_probabilities(trained, val.images)
    if tune:
        info.postprocess, table = tune_postprocessing(val_probs, val.labels, config.n_classes, rounds=1 if small else 2)
    else:
        info.postprocess, table = dict(POSTPROCESS_START[config.n_classes]), []
    val_scores = models.segmentation_scores(instances_from(val_probs, info.postprocess), val.labels, val.ids)
    test_scores = test_labels = test_probs = None
    if test is not None:
        test_probs = predict_probabilities(trained, test.images)
        test_labels = instances_from(test_probs, info.postprocess)
        test_scores = models.segmentation_scores(test_labels, test.labels, test.ids)
    speed = segmentation_throughput(trained, val.images, throughput_seconds) if measure_throughput else {}
    data = {"source": getattr(train, "source", ""), "n_train": len(train), "n_val": len(val),
            "n_test": len(test) if test is not None else 0}
    test_probs = None  # large (float32, K channels per pixel); predict again when needed
    if not keep_test_predictions:
        test_labels = None
    elif test_labels is not None:
        test_labels = [label.astype(np.uint16) if label.max() < 2**16 else label for label in test_labels]
    return UNetRun(trained, config, fit, table, val_scores, test_scores, speed, int(model.count_params()), data,
                   test_labels, test_probs)


#: ``cellkit train unet --profile``: overrides of :class:`UNetConfig` (``default`` is the config's defaults).
UNET_PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "full": {"base_filters": 32, "epochs": 60},
}


def scores_by_group(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], groups: Sequence[str]) -> list[dict]:
    """F1, AP and PQ at IoU 0.5 and SEG pooled within each group of images (e.g. DSB size groups), one row per
    group in order of first appearance, plus one ``all`` row."""
    rows = []
    groups = list(groups)
    for group in [*dict.fromkeys(groups), "all"]:
        index = [i for i, g in enumerate(groups) if group in ("all", g)]
        s = models.segmentation_scores([preds[i] for i in index], [gts[i] for i in index])
        rows.append({"group": group, "images": len(index), "nuclei": s["n_gt"], "f1": s["f1"], "ap": s["ap"],
                     "pq": s["pq"], "seg": s["seg"], "precision": s["precision"], "recall": s["recall"]})
    return rows


@dataclass
class SegmentationData:
    """Training data resolved from ``cellkit train unet --data``: the three parts and how they were made."""

    train: Any
    val: Any
    test: Any
    source: str
    split: str


def load_segmentation_data(data: str, seed: int = DEFAULT_SEED) -> SegmentationData:
    """Images with instance masks for U-Net training, split into train/validation/test.

    ``data`` is ``dsb2018`` (or its folder: the split kept on file, 70/10/20 stratified on image size) or any
    folder with ``images/`` and ``labels/`` (or ``masks/``) of files matched by stem, split 70/10/20 (stratified
    on image size, seeded; at least one validation and one test image). Bad files are one-line DataErrors.
    """
    from cellkit import datasets

    dsb = datasets.locate("dsb2018")
    if data == "dsb2018" or (dsb is not None and Path(data).exists() and Path(data).resolve() == dsb.resolve()):
        split = datasets.dsb2018_split(seed)
        parts = [datasets.load_dsb2018(split[p]) for p in ("train", "val", "test")]
        return SegmentationData(*parts, source="dsb2018", split=f"70/10/20 stratified on size group, seed {seed}, "
                                f"{datasets.split_file('dsb2018', seed).name}")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{data}: no such folder, and not a dataset name (dsb2018)")
    whole = datasets.load_instance_folder(path)
    n = len(whole)
    if n < 3:
        raise DataError(f"{path}: {n} image(s) is too few to split into train/validation/test; give at least 3")
    groups = [f"{image.shape[0]}x{image.shape[1]}" for image in whole.images]
    if n >= 10:
        split = datasets.stratified_split(whole.ids, groups, seed=seed)
        how = f"70/10/20 stratified on image size, seed {seed}"
    else:
        order = [whole.ids[i] for i in np.random.default_rng(seed).permutation(n)]
        n_test, n_val = max(1, round(0.2 * n)), max(1, round(0.1 * n))
        split = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
        how = f"{n - n_test - n_val}/{n_val}/{n_test} images, seeded ({seed})"
    whole.groups = groups
    parts = [whole.select(sorted(split[p])) for p in ("train", "val", "test")]
    return SegmentationData(*parts, source=str(path), split=how)


def evaluate_saved_unet(path: str | Path, val: Any, test: Any | None = None, keep_test_predictions: bool = False
                        ) -> UNetRun:
    """A :class:`UNetRun` for a U-Net saved by :meth:`UNetRun.save` (e.g. by ``cellkit train unet``): scored on
    ``val`` and ``test`` with its recorded post-processing; its training record is read from the JSON beside it
    (timings are NaN when that file is missing)."""
    import json

    trained = models.load_unet(path)
    side = models.sidecar_path(path)
    record = json.loads(side.read_text()) if side.is_file() else {}
    known = {k: v for k, v in record.get("unet_config", {}).items() if k in UNetConfig.__dataclass_fields__}
    if known:
        known.setdefault("crop_sampling", "image")  # records older than crop_sampling: crops picked images uniformly
    config = UNetConfig(**known) if known else UNetConfig(n_classes=trained.info.n_classes,
                                                          channels=tuple(trained.info.channels),
                                                          base_filters=trained.info.base_filters)
    nan = float("nan")
    fit = UNetFit(**record["fit"]) if "fit" in record else UNetFit({}, nan, nan, 0, 0, nan, nan, nan, "unknown", nan)
    val_labels = [labels for labels, _ in trained.segment_many(val.images)]
    val_scores = models.segmentation_scores(val_labels, val.labels, val.ids)
    test_scores = test_labels = None
    if test is not None:
        test_labels = [labels for labels, _ in trained.segment_many(test.images)]
        test_scores = models.segmentation_scores(test_labels, test.labels, test.ids)
    data = {"source": f"loaded from {Path(path).name}", **record.get("data", {})}
    return UNetRun(trained, config, fit, record.get("postprocess_search", []), val_scores, test_scores, {},
                   int(trained.model.count_params()), data, test_labels if keep_test_predictions else None)
