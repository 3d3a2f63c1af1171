"""Training: the fit loop with its callbacks, time and memory measurements, and the classifier recipe.

>>> from cellkit import datasets, training
>>> train, val, test = (datasets.load_pbc28(s) for s in ("train", "val", "test"))
>>> run = training.train_classifier("cellnet", train, val, test, crop=200)   # the default recipe
>>> run.test_report["accuracy"], run.fit.seconds, run.fit.peak_rss_mb, run.throughput
>>> run.save("models/cellnet.keras")

What is here
------------
:class:`FitConfig`          a classifier's training recipe: optimizer, schedule, label smoothing, augmentation, epochs
:func:`fit`                 ``model.fit`` on uint8 images with early stopping on the validation split (best weights
                            restored), a progress bar or one line per epoch, optional class weights, wall time and
                            peak memory
:func:`fit_arrays`          the same on precomputed arrays (features, cached network outputs), softmax or sigmoid
:func:`timed_fit`           any ``model.fit``, timed, with its memory sampled (:class:`MemorySampler`)
:class:`Progress`           the per-epoch progress callback; :class:`TimeBudget` a wall-time budget
:func:`rate_schedule`       a constant rate, or one warm-up epoch then cosine decay
:func:`choose_tta`          test-time augmentation chosen on the validation split
:func:`throughput`          inference images per second
:func:`train_classifier`    all of it for one registered model: what ``cellkit train classifier`` runs

Experiments that belong to one notebook live in :mod:`cellkit.study` (05), :mod:`cellkit.transfer` (06) and
:mod:`cellkit.unet` (07, 08); they train with the functions here.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import classifiers, metrics, runtime, transforms
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, ImageSet

keras = runtime.keras_module()


# --------------------------------------------------------------------------------------------------------
# Batches and measurements
# --------------------------------------------------------------------------------------------------------


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
        x = transforms.augment_batch(self.images[rows], self.rng, self.augment) if self.augment != "none" \
            else self.images[rows]
        batch = (classifiers.preprocess(x, self.preprocessing), self.onehot[rows])
        return batch if self.sample_weights is None else (*batch, self.sample_weights[rows])

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = self.rng.permutation(len(self.images))


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
    classifiers.predict_proba(model, images[:batch_size], preprocessing, tta, batch_size)  # warm-up (tracing)
    done, started = 0, time.perf_counter()
    while True:
        classifiers.predict_proba(model, images, preprocessing, tta, batch_size)
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
    :data:`cellkit.classifiers.CELLNET_FIT` for the small CNN's.

    Attributes
    ----------
    epochs : maximum number of epochs.
    batch_size : images per step.
    optimizer : ``adam`` or ``adamw`` (decoupled weight decay ``weight_decay``) or ``sgd`` (momentum 0.9).
    learning_rate : peak learning rate.
    schedule : ``constant`` or ``cosine`` (one warm-up epoch, then cosine decay to 0 over ``epochs``).
    weight_decay : AdamW's decoupled weight decay (ignored by ``adam``).
    label_smoothing : of the categorical cross-entropy (0: none).
    augment : see :func:`cellkit.transforms.augment_batch` (:data:`cellkit.transforms.AUGMENTATIONS`).
    patience : epochs without a better ``monitor`` before stopping; the best epoch's weights are kept.
    monitor : what early stopping watches: ``val_accuracy`` (higher is better) or ``val_loss`` (lower is better;
        stopping once the validation loss has stopped falling for ``patience`` epochs: it has flattened).
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
    monitor: str = "val_accuracy"
    class_weight: str | None = None
    tta: str = "none"

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use adam, adamw or sgd")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown schedule {self.schedule!r}; use constant or cosine")
        if self.augment not in transforms.AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; use {', '.join(transforms.AUGMENTATIONS)}")
        if self.tta not in (*classifiers.TTA_VIEWS, "auto"):
            raise ValueError(f"unknown test-time augmentation {self.tta!r}; "
                             f"use {', '.join(classifiers.TTA_VIEWS)}, auto")
        if self.monitor not in ("val_accuracy", "val_loss"):
            raise ValueError(f"monitor must be val_accuracy or val_loss, got {self.monitor!r}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")

    @classmethod
    def for_model(cls, name: str, **overrides: Any) -> FitConfig:
        """The registered default recipe of model ``name`` with ``overrides`` (None values ignored)."""
        base = dict(classifiers.spec(name).fit)
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
    epoch_end_seconds: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def seconds_to_reach(self, target: float, metric: str = "val_accuracy") -> float | None:
        """Wall seconds from the start of training to the end of the first epoch whose ``metric`` reached
        ``target`` (validation included), or None if no epoch did or the epoch times were not kept."""
        values = self.history.get(metric, [])
        reached = next((i for i, value in enumerate(values) if value >= target), None)
        return None if reached is None or reached >= len(self.epoch_end_seconds) else self.epoch_end_seconds[reached]


@dataclass
class TimedFit:
    """What :func:`timed_fit` measured: the Keras history as plain floats (without the learning rate), wall and
    process CPU seconds of ``model.fit``, and the process's peak RSS and its increase over the fit, in MB."""

    history: dict[str, list[float]]
    seconds: float
    cpu_seconds: float
    peak_mb: float
    increase_mb: float
    epoch_end_seconds: list[float] = field(default_factory=list)


class _EpochClock(keras.callbacks.Callback):
    """Wall seconds from ``started`` (a ``time.perf_counter()`` reading) to the end of each epoch (validation
    included), in ``ends``."""

    def __init__(self, started: float) -> None:
        super().__init__()
        self.started, self.ends = started, []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter() - self.started)


def timed_fit(model: Any, data: Any, **fit_args: Any) -> TimedFit:
    """``model.fit(data, verbose=0, **fit_args)``, timed (in all and at the end of each epoch) and with its memory
    sampled; a ``keras.utils.PyDataset`` is fitted one epoch at a time from arrays (:func:`fit_epoch_by_epoch`)."""
    with MemorySampler() as memory:
        started, cpu_started = time.perf_counter(), time.process_time()
        clock = _EpochClock(started)
        fit_args["callbacks"] = [*fit_args.get("callbacks", ()), clock]
        if isinstance(data, keras.utils.PyDataset):
            history = fit_epoch_by_epoch(model, data, **fit_args)
        else:
            history = model.fit(data, verbose=0, **fit_args).history
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    hist = {k: [float(v) for v in values] for k, values in history.items() if k != "learning_rate"}
    return TimedFit(hist, seconds, cpu_seconds, memory.peak_mb, memory.increase_mb, clock.ends)


def epoch_arrays(batches: Any) -> tuple[tuple[np.ndarray, ...], int]:
    """The batches of one epoch of a ``keras.utils.PyDataset``: (the parts (inputs, targets[, weights]), each
    concatenated along the first axis; the size of the first batch). Calls the dataset's ``on_epoch_end``."""
    parts = [batches[index] for index in range(len(batches))]
    batches.on_epoch_end()
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True)), len(parts[0][0])


class _WithinOneTraining(keras.callbacks.Callback):
    """Passes the epoch hooks and ``on_train_batch_end`` on to ``callback``, but not the beginning and end of
    training, which :func:`fit_epoch_by_epoch` calls once: with one ``model.fit`` per epoch, early stopping must
    not forget its best epoch at each fit. (The callbacks used here, early stopping, :class:`TimeBudget` and
    :class:`Progress`, need no other hook.)"""

    def __init__(self, callback: Any) -> None:
        super().__init__()
        self.callback = callback

    def set_model(self, model):
        super().set_model(model)
        self.callback.set_model(model)

    def on_epoch_begin(self, epoch, logs=None):
        self.callback.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.callback.on_epoch_end(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.callback.on_train_batch_end(batch, logs)


def fit_epoch_by_epoch(model: Any, batches: Any, epochs: int = 1, callbacks: Sequence[Any] = (),
                       **fit_args: Any) -> dict[str, list[float]]:
    """Train on a ``keras.utils.PyDataset`` with one ``model.fit`` per epoch on that epoch's batches as arrays
    (:func:`epoch_arrays`): the same batches in the same order, and the optimizer and its learning-rate schedule
    carry on from fit to fit. Returns the history of all epochs.

    Why: given a Python dataset, Keras' TensorFlow backend pulls every batch through a Python generator inside
    ``tf.data``, which on a 2-core CPU doubled the time of a U-Net step (1.26 s against 0.64 s from arrays, with
    about 1.4 GB of page faults per step). The next epoch's batches are drawn on a worker thread while the model
    trains on this epoch's (one thread draws them all, in order, so the batches are those of drawing them in
    turn): drawing a default U-Net epoch's crops took a third of its time when it waited for them. The price is
    memory for two epochs' arrays: for a default U-Net epoch, 0.3 GB of inputs and targets each, which Keras
    copies once more.
    """
    callbacks = list(callbacks)
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    within = [_WithinOneTraining(callback) for callback in callbacks]
    history: dict[str, list[float]] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="next-epoch") as drawer:
        upcoming = drawer.submit(epoch_arrays, batches)
        for epoch in range(epochs):
            (x, y, *weights), batch_size = upcoming.result()
            if epoch + 1 < epochs:
                upcoming = drawer.submit(epoch_arrays, batches)
            done = model.fit(x, y, sample_weight=weights[0] if weights else None, batch_size=batch_size,
                             shuffle=False, initial_epoch=epoch, epochs=epoch + 1, callbacks=within, verbose=0,
                             **fit_args)
            for key, values in done.history.items():
                history.setdefault(key, []).extend(values)
            if model.stop_training:
                upcoming.cancel()  # not started yet, or drawn for nothing: the training is over
                break
    for callback in callbacks:
        callback.on_train_end()
    return history


class Progress(keras.callbacks.Callback):
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


def rate_schedule(rate: float, schedule: str, epochs: int, steps_per_epoch: int) -> Any:
    """The learning rate of an optimizer: ``rate`` itself (``constant``), or for ``cosine`` a warm-up from a tenth
    of ``rate`` to ``rate`` over the first epoch (at most a tenth of training), then cosine decay to 0."""
    if schedule == "constant":
        return rate
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; use constant or cosine")
    warmup = min(steps_per_epoch, max(1, epochs * steps_per_epoch // 10))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=rate / 10, decay_steps=max(1, epochs * steps_per_epoch - warmup),
        warmup_target=rate, warmup_steps=warmup)


def compile_model(model: Any, config: FitConfig, steps_per_epoch: int) -> Any:
    """Compile ``model`` with the optimizer, schedule and loss of ``config``; returns it."""
    rate = rate_schedule(config.learning_rate, config.schedule, config.epochs, steps_per_epoch)
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

    Early stopping watches ``config.monitor`` (the validation accuracy or loss) with ``config.patience``; the
    weights of the best epoch are restored at the end (so the model returned is the one chosen on the validation
    split). In a model with batch norm it starts watching only after :func:`batch_norm_warmup_epochs`: until the
    running statistics have forgotten their initial values, validation scores the initialisation, not the model.
    ``progress`` is ``bar`` (a progress bar per epoch and a line per epoch), ``epoch`` (a line per epoch) or
    ``none``.
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
    val_x = classifiers.preprocess(val_images, preprocessing)
    val_y = np.eye(n_classes, dtype=np.float32)[np.asarray(val_labels)]
    compile_model(model, config, len(batches))
    warmup = batch_norm_warmup_epochs(model, len(batches))
    mode = "min" if config.monitor == "val_loss" else "max"
    stopper = keras.callbacks.EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience,
                                            restore_best_weights=True, start_from_epoch=warmup)
    callbacks = [stopper] if max_seconds is None else [stopper, TimeBudget(max_seconds)]
    if progress != "none":
        callbacks.append(Progress(config.epochs, len(batches), progress == "bar", name or model.name))
    run = timed_fit(model, batches, validation_data=(val_x, val_y), epochs=config.epochs, callbacks=callbacks,
                    validation_batch_size=256)
    hist, seconds, cpu_seconds = run.history, run.seconds, run.cpu_seconds
    epochs_run = len(hist.get("loss", []))
    val_acc = hist.get("val_accuracy", [float("nan")])
    if epochs_run > warmup:  # the epoch whose weights early stopping restored
        watched = np.asarray(hist.get(config.monitor, val_acc)[warmup:], dtype=float)
        best = warmup + int(np.nanargmin(watched) if mode == "min" else np.nanargmax(watched))
    else:  # training ended within the warm-up: the last weights are kept
        best = max(epochs_run - 1, 0)
    return FitResult(
        history=hist, seconds=seconds, epochs_run=epochs_run, best_epoch=best + 1,
        best_val_accuracy=float(val_acc[best]), peak_rss_mb=run.peak_mb, rss_increase_mb=run.increase_mb,
        precision=runtime.compute_precision(model), seconds_per_epoch=seconds / max(epochs_run, 1),
        stopped_early=epochs_run < config.epochs, cpu_seconds=cpu_seconds, early_stopping_from_epoch=warmup + 1,
        epoch_end_seconds=run.epoch_end_seconds,
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
        proba = classifiers.predict_proba(model, images, preprocessing, name)
        scores[name] = float(np.mean(proba.argmax(axis=1) == np.asarray(labels)))
    best = max(candidates, key=lambda c: (round(scores[c], 6), -len(classifiers.TTA_VIEWS[c])))
    return best, scores


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
        callbacks.append(Progress(epochs, int(np.ceil(len(x) / batch_size)), progress == "bar", name or model.name))
    keras.utils.set_random_seed(seed)
    run = timed_fit(model, x, y=target(y), sample_weight=sample_weight, validation_data=(val_x, target(val_y)),
                    epochs=epochs, batch_size=batch_size, callbacks=callbacks, shuffle=True)
    hist, seconds, cpu_seconds = run.history, run.seconds, run.cpu_seconds
    watched = np.asarray(hist[monitor])
    best = int(np.nanargmin(watched) if binary else np.nanargmax(watched))
    return FitResult(history=hist, seconds=seconds, epochs_run=len(watched), best_epoch=best + 1,
                     best_val_accuracy=float(hist["val_accuracy"][best]), peak_rss_mb=run.peak_mb,
                     rss_increase_mb=run.increase_mb, precision=runtime.compute_precision(model),
                     seconds_per_epoch=seconds / max(len(watched), 1), stopped_early=len(watched) < epochs,
                     cpu_seconds=cpu_seconds, epoch_end_seconds=run.epoch_end_seconds)


#: Runs of at most this many steps train eagerly: tracing a U-Net's training step into a graph costs 10-25 s of
#: CPU, more than a few eager steps (about 1 s each for a narrow U-Net); longer runs are traced (much faster steps).
EAGER_MAX_STEPS = 24


def scope_name(name: str, default: str = "model") -> str:
    """``name`` as a valid TensorFlow scope (and Keras model) name: runs of other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-") or default


# --------------------------------------------------------------------------------------------------------
# One registered classifier, end to end
# --------------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """A trained registered model with everything measured about it (see :func:`train_classifier`).

    ``throughput`` is inference images per second with the model's test-time augmentation (8 views for
    ``dihedral``), ``throughput_single_view`` without it.
    """

    trained: classifiers.TrainedModel
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
        return classifiers.save(self.trained.model, self.trained.info, path, extra=self.record())


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
    :func:`cellkit.classifiers.prepare_images` does; ``crop`` is recorded for ``classify``. ``config`` (default: the
    model's registered recipe, updated with ``overrides`` such as ``epochs=5``) says how to train.
    ``precision``: ``auto``, ``bfloat16`` or ``float32`` (:func:`cellkit.runtime.set_precision`). Inference throughput
    is timed for ``throughput_seconds`` on up to 512 validation images (``measure_throughput=False``: not at all).
    """
    entry = classifiers.spec(model_name)
    size = entry.input_size if input_size is None else int(input_size)
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None}) if config else \
        FitConfig.for_model(model_name, **overrides)
    if train.class_names != val.class_names or (test is not None and test.class_names != train.class_names):
        raise DataError("the training, validation and test sets name different classes")
    n_classes = len(train.class_names)
    x_train, x_val = at_size(train.images, size, crop), at_size(val.images, size, crop)
    keras.utils.set_random_seed(seed)
    with runtime.dtype_policy(precision):
        model = classifiers.build(model_name, n_classes, size)
        result = fit(model, x_train, train.labels, x_val, val.labels, config, entry.preprocessing, seed, progress,
                     name=model_name)
    if config.tta == "auto":
        tta, tta_scores = choose_tta(model, x_val, val.labels, entry.preprocessing)
    else:
        tta, tta_scores = config.tta, {}
    info = classifiers.ModelInfo(model=model_name, class_names=list(train.class_names), input_size=size,
                            preprocessing=entry.preprocessing, crop=crop, tta=tta, trained_on=train.source)
    trained = classifiers.TrainedModel(model, info)
    val_report = evaluate(trained, x_val, val.labels)
    test_report = evaluate(trained, at_size(test.images, size, crop), test.labels) if test is not None else None
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
    return metrics.proba_report(data.labels, proba, data.class_names), proba


def at_size(images: np.ndarray, size: int, crop: int | None) -> np.ndarray:
    """uint8 RGB images (n, size, size, 3): as they are when they already are, else
    :func:`cellkit.classifiers.prepare_images` (centre crop ``crop``, bicubic resize)."""
    if images.ndim == 4 and images.shape[1:] == (size, size, 3) and images.dtype == np.uint8:
        return images
    return classifiers.prepare_images(images, size, crop)


def evaluate(trained: classifiers.TrainedModel, images: np.ndarray, labels: np.ndarray, tta: str | None = None
             ) -> dict[str, Any]:
    """:func:`cellkit.metrics.classification_report` of ``trained`` on uint8 images at its input size."""
    report = metrics.proba_report(labels, trained.predict_proba(images, tta), trained.class_names)
    report["tta"] = tta or trained.info.tta
    return report
