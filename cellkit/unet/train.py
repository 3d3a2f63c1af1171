"""Training a U-Net: fresh augmented random crops every step, the fit, post-processing chosen on validation,
scores and inference speed; and the same measurements for a saved model.

>>> from cellkit import datasets, unet
>>> split = datasets.dsb2018_split()
>>> train, val, test = (datasets.load_dsb2018(split[p]) for p in ("train", "val", "test"))
>>> run = unet.train_unet(train, val, test)                  # UNetConfig() is the default model
>>> run.test_scores["f1"], run.test_scores["seg"], run.throughput["mpx_per_s"]
>>> run.save("models/unet.keras")

Comparing variants of a recipe is :mod:`cellkit.unet.study`'s job.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import metrics, runtime, saving, segmentation, transforms
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, SegmentationSet
from cellkit.training import EAGER_MAX_STEPS, Progress, rate_schedule, scope_name, timed_fit
from cellkit.unet.config import UNetConfig
from cellkit.unet.network import (
    binary_focal_loss,
    build_from_config,
    unet_in_precision,
    weighted_categorical_crossentropy,
)
from cellkit.unet.trained import TrainedUNet, load_unet, read_unet_config, save_unet

keras = runtime.keras_module()


# --------------------------------------------------------------------------------------------------------
# Training data: whole images at the network's zoom, random crops, targets
# --------------------------------------------------------------------------------------------------------


def _augmentation(name: str) -> tuple[Any, bool]:
    """(geometric :class:`~cellkit.transforms.Augmentation` without noise or None, quarter turns?) and the
    noise sigma is read from the recipe separately."""
    base, _, extra = name.partition("+")
    if base == "none":
        return None, False
    return transforms.RECIPES[base], extra == "rot90"


def with_local_contrast(images: Sequence[np.ndarray], channels: Sequence[str]) -> list[np.ndarray]:
    """Whole normalised images (H, W) as they are, or, when ``channels`` has ``local``, as (H, W, 2): the image
    and its :func:`cellkit.segmentation.local_contrast`, so that crops cut both at once."""
    if "local" not in channels:
        return list(images)
    return [np.stack([image, segmentation.local_contrast(image)], axis=-1) for image in images]


def _split_local(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(grey, local or None) of a crop of :func:`with_local_contrast`'s images."""
    return (crop[..., 0], crop[..., 1]) if crop.ndim == 3 else (crop, None)


def unet_targets(labels: np.ndarray, n_classes: int, edge_width: int = 1) -> np.ndarray:
    """Training targets of instance label crops (n, h, w): (n, h, w, 1) nucleus masks for 1 output, one-hot
    (n, h, w, 3) background/cell/edge for 3 (edges from the instance ids, so touching nuclei are separated)."""
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
                 rng: np.random.Generator) -> None:
        super().__init__()
        self.images = with_local_contrast(images, config.channels)
        self.labels, self.config, self.rng = list(labels), config, rng
        recipe, self.rot90 = _augmentation(config.augmentation)
        self.image_weights = segmentation.nuclei_weights(self.labels) if config.crop_sampling == "nuclei" else None
        self.noise_sigma = recipe.noise_sigma if recipe is not None else 0.0
        self.recipe = None if recipe is None else replace(recipe, noise_sigma=0.0, noise_channels=None)

    def __len__(self) -> int:
        return self.config.steps_per_epoch

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
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
        x = np.stack([segmentation.stack_channels(grey, c.channels, c.canny_thresholds, n, local)
                      for grey, n, local in zip(greys, noise, locals_, strict=True)])
        return x, unet_targets(labels, c.n_classes, c.edge_width)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batch()


def zoomed_images(data: SegmentationSet, config: UNetConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(images, labels) of a SegmentationSet for training: each image zoomed so that the median diameter of its
    reference nuclei becomes ``config.nucleus_diameter`` px (:func:`cellkit.segmentation.scale_factor`; None: as
    they are), then normalised per image to [0, 1] with ``config.normalise`` (after the zoom, as at prediction
    time: :func:`cellkit.segmentation.percentile_normalise` of the grey image)."""
    images, labels = [], []
    for image, label in zip(data.images, data.labels, strict=True):
        factor = segmentation.scale_factor(segmentation.median_diameter(label), config.nucleus_diameter)
        zoomed = segmentation.zoom(image, factor)
        images.append(segmentation.input_stack(zoomed, ("original",), config.normalise)[..., 0])
        labels.append(segmentation.zoom(label, factor, labels=True))
    return images, labels


def validation_crops(data: SegmentationSet, config: UNetConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation crops (inputs, targets): ``config.val_crops`` crops of ``config.val_crop_size`` px of
    the zoomed images (:func:`zoomed_images`), half of them on nuclei, drawn once with ``seed``, without
    augmentation."""
    images, labels = zoomed_images(data, config)
    crops, labels = segmentation.random_crops(with_local_contrast(images, config.channels), labels, config.val_crops,
                                              config.val_crop_size, np.random.default_rng(seed), 0.5, None)
    pairs = [_split_local(crop) for crop in crops]
    x = np.stack([segmentation.stack_channels(grey, config.channels, config.canny_thresholds, local=local)
                  for grey, local in pairs])
    return x, unet_targets(labels, config.n_classes, config.edge_width)


# --------------------------------------------------------------------------------------------------------
# The fit
# --------------------------------------------------------------------------------------------------------


def compile_unet(model: Any, config: UNetConfig, run_eagerly: bool = False) -> Any:
    """Compile with Adam (:func:`cellkit.training.rate_schedule`) and the loss of ``config.n_classes``; returns the
    model."""
    rate = rate_schedule(config.learning_rate, config.schedule, config.epochs, config.steps_per_epoch)
    loss = (binary_focal_loss(config.focal_gamma, config.focal_alpha) if config.n_classes == 1
            else weighted_categorical_crossentropy(config.class_weights))
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


def fit_unet(train: SegmentationSet, val: SegmentationSet, config: UNetConfig | None = None, seed: int = DEFAULT_SEED,
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
    used = runtime.resolve_precision(precision)
    model = build_from_config(config, used, name=name)
    compile_unet(model, config, run_eagerly=config.epochs * config.steps_per_epoch <= EAGER_MAX_STEPS)
    batches = CropBatches(*zoomed_images(train, config), config, rng)
    val_x, val_y = validation_crops(val, config, seed + 1)
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=config.patience or config.epochs,
                                            restore_best_weights=True)
    callbacks: list[Any] = [stopper]
    if progress != "none":
        callbacks.append(Progress(config.epochs, len(batches), progress == "bar", name,
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
    (:meth:`~cellkit.unet.TrainedUNet.segment_many`: diameter estimate, zoom, input stack, tiled network and
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
    """A trained U-Net with everything measured about it (see :func:`train_unet`). Its configuration, with the
    post-processing chosen on validation, is ``trained.config`` (:attr:`config`)."""

    trained: TrainedUNet
    fit: UNetFit
    postprocess_table: list[dict[str, Any]]
    val_scores: dict[str, Any]
    test_scores: dict[str, Any] | None
    throughput: dict[str, float]
    n_params: int
    data: dict[str, Any] = field(default_factory=dict)
    test_labels: list[np.ndarray] | None = None

    @property
    def config(self) -> UNetConfig:
        return self.trained.config

    def summary(self) -> dict[str, Any]:
        """A flat dict of the key numbers (one row of a results table)."""
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
            "postprocess": json.dumps(self.config.postprocess, sort_keys=True),
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
        """Save the model (float32 ``.keras`` with its configuration) and :meth:`record` as ``NAME.json`` beside it."""
        return save_unet(self.trained.model, self.config, path, record=self.record())


def train_unet(train: SegmentationSet, val: SegmentationSet, test: SegmentationSet | None = None,
               config: UNetConfig | None = None, precision: str = "auto", seed: int = DEFAULT_SEED,
               progress: str = "epoch", name: str = "unet", tune: bool = True, measure_throughput: bool = True,
               throughput_seconds: float = 5.0, inference_precision: str = "float32",
               keep_test_predictions: bool = False, **overrides: Any) -> UNetRun:
    """Train a U-Net (:func:`fit_unet`), choose its post-processing on ``val`` (:func:`tune_postprocessing`),
    score it on ``val`` and (if given) ``test`` with every segmentation metric
    (:func:`cellkit.metrics.segmentation_scores`) and time its inference (:func:`segmentation_throughput`, on
    the validation images). ``config`` (default :class:`UNetConfig`) is updated with ``overrides`` such as
    ``epochs=5``. ``inference_precision``: precision of the scored and timed predictions (the saved model is
    float32 either way). With ``keep_test_predictions`` the test label images are kept on the run (as uint16).

    Runs of at most :data:`cellkit.training.EAGER_MAX_STEPS` steps (tests, the notebooks' smoke profile) train
    and predict eagerly and search the post-processing in one pass: there, tracing graphs would cost more than the
    work itself.
    """
    config = replace(config or UNetConfig(), **{k: v for k, v in overrides.items() if v is not None})
    small = config.epochs * config.steps_per_epoch <= EAGER_MAX_STEPS
    model, fit = fit_unet(train, val, config, seed, precision, progress, name)
    trained_config = replace(config, trained_on=getattr(train, "source", ""))
    trained = TrainedUNet(unet_in_precision(model, trained_config, inference_precision), trained_config, eager=small)
    val_probs = predict_probabilities(trained, val.images)
    if tune:
        chosen, table = tune_postprocessing(val_probs, val.labels, config.n_classes, rounds=1 if small else 2)
    else:
        chosen, table = dict(POSTPROCESS_START[config.n_classes]), []
    trained.config.postprocess = chosen
    val_scores = metrics.segmentation_scores(instances_from(val_probs, chosen), val.labels, val.ids)
    test_scores = test_labels = None
    if test is not None:
        test_labels = instances_from(predict_probabilities(trained, test.images), chosen)
        test_scores = metrics.segmentation_scores(test_labels, test.labels, test.ids)
    speed = segmentation_throughput(trained, val.images, throughput_seconds) if measure_throughput else {}
    data = {"source": getattr(train, "source", ""), "n_train": len(train), "n_val": len(val),
            "n_test": len(test) if test is not None else 0}
    kept = _uint16(test_labels) if keep_test_predictions and test_labels is not None else None
    return UNetRun(trained, fit, table, val_scores, test_scores, speed, int(model.count_params()), data, kept)


def _uint16(labels: list[np.ndarray]) -> list[np.ndarray]:
    """Label images as uint16 where their ids fit (a quarter of int32's memory), as they are otherwise."""
    return [label.astype(np.uint16) if label.max() < 2**16 else label for label in labels]


def evaluate_saved_unet(path: str | Path, val: SegmentationSet, test: SegmentationSet | None = None,
                        keep_test_predictions: bool = False) -> UNetRun:
    """A :class:`UNetRun` for a U-Net saved by :meth:`UNetRun.save` (e.g. by ``cellkit train unet``): scored on
    ``val`` and ``test`` with its recorded post-processing; its training record is read from the JSON beside it
    (timings are NaN when that file is missing)."""
    trained = load_unet(path)
    record = saving.read_record(path)
    nan = float("nan")
    fit = UNetFit(**record["fit"]) if "fit" in record else UNetFit({}, nan, nan, 0, 0, nan, nan, nan, "unknown", nan)
    val_labels = [labels for labels, _ in trained.segment_many(val.images)]
    val_scores = metrics.segmentation_scores(val_labels, val.labels, val.ids)
    test_scores = test_labels = None
    if test is not None:
        test_labels = [labels for labels, _ in trained.segment_many(test.images)]
        test_scores = metrics.segmentation_scores(test_labels, test.labels, test.ids)
    data = {"source": f"loaded from {Path(path).name}", **record.get("data", {})}
    return UNetRun(trained, fit, record.get("postprocess_search", []), val_scores, test_scores, {},
                   int(trained.model.count_params()), data, test_labels if keep_test_predictions else None)


def saved_or_trained(path: str | Path | None, config: UNetConfig, train: SegmentationSet, val: SegmentationSet,
                     test: SegmentationSet | None = None, shown_as: str | None = None,
                     **options: Any) -> tuple[UNetRun, str]:
    """The run of ``config``: the U-Net saved at ``path`` (e.g. by ``make models``), scored by
    :func:`evaluate_saved_unet`, when that file exists and was trained with the same recipe
    (:meth:`UNetConfig.recipe_differences` is empty); otherwise one trained here by :func:`train_unet`
    (``options``: its keyword arguments). Returns (the run, one sentence saying which and why), so that a notebook
    states where its model came from; it names the file ``shown_as`` (default: ``path`` as given), e.g. relative
    to the project."""
    shown = shown_as or str(path)
    if path is None:
        reason = "no saved model was given"
    elif not Path(path).is_file():
        reason = f"{shown} does not exist"
    else:
        changed = read_unet_config(path).recipe_differences(config)
        if not changed:
            keep = options.get("keep_test_predictions", False)
            run = evaluate_saved_unet(path, val, test, keep_test_predictions=keep)
            return run, f"evaluated {shown}, trained with this recipe (its record: {saving.sidecar_path(path).name})"
        reason = f"{shown} was trained with another recipe ({', '.join(changed)} differ)"
    run = train_unet(train, val, test, config=config, **options)
    return run, f"trained here ({reason}): {run.fit.epochs_run} epochs, {run.fit.seconds / 60:.1f} min"

