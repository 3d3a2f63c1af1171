"""Notebook 06's experiments (report 004, section 2): does knowledge from another domain help when target labels
are few?

Report 004 moved ImageNet features (photographs) to HEp-2 cells. The offline counterpart here is a source that
differs from the target in the same way: a small CNN pretrained **without labels** (SimCLR, Chen et al. 2020) on
crops of DSB 2018 fluorescence nuclei (grey, bright on dark), then moved to stained blood cells (PBC, colour,
dark on light) at the same input size. ImageNet VGG16 weights are still used when their file is on disk (Keras'
cache or a path the user gives): nothing is downloaded behind the user's back, and a missing file that was asked
for is a one-line error, never a silent switch to other weights.

=====================================================  ================================================================
:func:`nucleus_crops`                                  the unlabelled source: DSB nuclei cut out at the target's size
:func:`contrastive_views`, :func:`nt_xent`             SimCLR's two augmented views and its loss
:func:`pretrain_contrastive`                           the encoder (``cellnet``'s convolutions) pretrained on them
:func:`encoder_of`, :func:`with_encoder_weights`       the encoder of a ``cellnet``; moved into a new classifier
:func:`embed`, :func:`linear_probe`                    frozen features and a logistic regression chosen on validation
:func:`cnn_run`                                        ``cellnet`` trained on the target, from random or source weights
:func:`label_fraction`, :func:`epochs_for_fraction`    nested, stratified label subsets for the label curve
:func:`imbalanced_indices`, :func:`minority_copies`    class imbalance and report 004's remedy
:func:`build_vgg16_base`, :func:`vgg16_weights`        VGG16 and its weights (ImageNet from disk, or a file)
:func:`scratch_run`                                    VGG16 + report 004's head from random weights, on a time budget
:func:`multilabel_scores`                              binary relevance or one multi-output head
:func:`seed_runs`                                      fine-tuned and scratch ``cellnet`` with several seeds
:func:`seed_interval`, :func:`seed_difference`         scores averaged over seeds, intervals over test images
:func:`imagenet_choice`                                what the notebook's ``imagenet_weights`` setting resolves to
=====================================================  ================================================================
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cellkit import classifiers, metrics, runtime, segmentation, transforms
from cellkit.classifiers import outputs_of
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, ImageSet, SegmentationSet
from cellkit.training import FitConfig, FitResult, MemorySampler, fit, fit_arrays, scope_name

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


def imagenet_choice(setting: str | Path | None) -> dict[str, Any]:
    """Resolve notebook 06's ``imagenet_weights`` setting into the record of :func:`vgg16_weights` (``weights`` is
    ``none`` when not used, and then ``reason`` says why).

    ``None``: never used. ``"auto"``: the ImageNet file when :func:`find_imagenet_weights` finds one, otherwise not
    used (the reason names the file and where to put it). A path: that file, and a missing file is a
    :class:`DataError` (the user asked for it), never a silent switch.
    """
    if setting is None:
        return {"weights": "none", "file": None, "md5": None, "official": False,
                "reason": "imagenet_weights is None in this profile"}
    try:
        return vgg16_weights("imagenet" if setting == "auto" else setting)[1]
    except DataError as error:
        if setting != "auto":
            raise
        return {"weights": "none", "file": None, "md5": None, "official": False, "reason": str(error)}


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
# The source: unlabelled DSB nuclei, and SimCLR on them
# --------------------------------------------------------------------------------------------------------

#: Pixels of surroundings kept around each nucleus's bounding box (a PBC cell, too, sits in some background).
SOURCE_MARGIN = 6
#: SimCLR's views here: a random square of 60-100 % of the side, resized back; one of the 8 symmetries of the
#: square; intensities inverted with probability 1/2 (bright-on-dark nuclei and dark-on-light cells then look
#: alike to the encoder); a random gain in [0.6, 1.4] and offset in [-0.15, 0.15] per channel (colour from grey).
VIEW_MIN_SIDE = 0.6
VIEW_INVERT = 0.5
VIEW_GAIN = (0.6, 1.4)
VIEW_OFFSET = 0.15
#: Units of SimCLR's projection head (two dense layers on the encoder's pooled features), and its temperature.
PROJECTION_UNITS = (128, 64)
TEMPERATURE = 0.2


def cellnet_preprocessing() -> str:
    """How ``cellnet`` scales its uint8 inputs (its registered preprocessing, ``pm1``)."""
    return classifiers.spec("cellnet").preprocessing


def nucleus_crops(dsb: SegmentationSet, size: int, max_crops: int | None = None, margin: int = SOURCE_MARGIN,
                  seed: int = DEFAULT_SEED) -> ImageSet:
    """Unlabelled source images: every DSB nucleus with ``margin`` px of its surroundings (neighbours kept), padded
    to a square and resized to ``size`` x ``size`` by :func:`cellkit.segmentation.crops_from_dataset` (report 004's
    size and dark-crop rules), as uint8 grey copied to 3 channels (n, size, size, 3). At most ``max_crops``, drawn
    with ``seed``. One class, ``nucleus`` (no label is used); ``files`` name image and object: ``<id>#<label>``."""
    crops = segmentation.crops_from_dataset(dsb.images, dsb.labels, size, margin=margin, mask_outside=False)
    if len(crops.ids) == 0:
        raise DataError("no nucleus crops: the DSB images hold no objects")
    keep = np.arange(len(crops.ids))
    if max_crops is not None and max_crops < len(keep):
        keep = np.sort(np.random.default_rng(seed).choice(keep, max_crops, replace=False))
    images = np.round(crops.crops[keep] * 255).astype(np.uint8)
    files = [f"{dsb.ids[crops.image_index[i]]}#{crops.ids[i]}" for i in keep]
    return ImageSet(images, np.zeros(len(keep), np.int64), ["nucleus"], files=files,
                    source=f"{dsb.source or 'dsb2018'} nucleus crops")


def contrastive_views(images: np.ndarray, rng: np.random.Generator, min_side: float = VIEW_MIN_SIDE,
                      invert: float = VIEW_INVERT, gain: tuple[float, float] = VIEW_GAIN,
                      offset: float = VIEW_OFFSET) -> np.ndarray:
    """One random view of each uint8 image (n, s, s, 3) for SimCLR (:data:`VIEW_MIN_SIDE` and the constants after
    it): crop and resize, a symmetry of the square, inversion, per-channel gain and offset. uint8 (n, s, s, 3)."""
    n, size = len(images), images.shape[1]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        side = int(round(size * rng.uniform(min_side, 1.0)))
        top, left = rng.integers(0, size - side + 1, 2)
        out[i] = cv2.resize(image[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_LINEAR)
    x = transforms.augment_batch(out, rng, "dihedral").astype(np.float32) / 255
    flip = rng.random(n) < invert
    x[flip] = 1 - x[flip]
    x = x * rng.uniform(*gain, (n, 1, 1, 3)) + rng.uniform(-offset, offset, (n, 1, 1, 3))
    return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def nt_xent(z1: Any, z2: Any, temperature: float = TEMPERATURE) -> Any:
    """SimCLR's loss (NT-Xent) for embeddings ``z1``, ``z2`` (n, d) of two views of the same n images: each of the
    2n embeddings must pick its partner among the other 2n - 1 by cosine similarity / ``temperature``
    (cross-entropy over them); the mean over the 2n. A scalar tensor (NumPy arrays accepted)."""
    ops = keras.ops
    z = ops.concatenate([ops.convert_to_tensor(z1, "float32"), ops.convert_to_tensor(z2, "float32")], axis=0)
    z = z / ops.sqrt(ops.sum(z * z, axis=1, keepdims=True) + 1e-12)
    n2 = ops.shape(z)[0]
    logits = ops.matmul(z, ops.transpose(z)) / temperature - 1e9 * ops.eye(n2)
    n = n2 // 2
    partner = ops.concatenate([ops.arange(n, n2), ops.arange(0, n)], axis=0)
    return ops.mean(keras.losses.sparse_categorical_crossentropy(partner, logits, from_logits=True))


def encoder_of(model: Any) -> Any:
    """The encoder of a ``cellnet`` (:func:`cellkit.classifiers.build_cellnet`): its layers up to the global
    average pooling, images -> features (n, last width). Shares the model's layers."""
    return keras.Model(model.input, model.get_layer("gap").output, name=f"{model.name}_encoder")


def with_encoder_weights(model: Any, source: Any) -> Any:
    """``model`` (a ``cellnet``) with the weights of ``source``'s encoder (another ``cellnet`` of the same widths,
    e.g. :attr:`Pretrained.model`) copied layer by layer (same names); its dropout and softmax stay as they were."""
    for layer in encoder_of(source).layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    return model


@dataclass
class Pretrained:
    """A ``cellnet`` whose encoder :func:`pretrain_contrastive` trained (its softmax layer is untrained, unused),
    the mean NT-Xent loss of each epoch, wall time (s), the process's peak memory (MiB), the images seen and the
    process's CPU time (s, all threads)."""

    model: Any
    losses: list[float]
    seconds: float
    peak_mb: float
    n_images: int
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"losses": [round(v, 4) for v in self.losses], "epochs": len(self.losses),
                "seconds": round(self.seconds, 1), "peak_mb": round(self.peak_mb, 1), "n_images": self.n_images,
                "cpu_seconds": round(self.cpu_seconds, 1)}


def pretrain_contrastive(images: np.ndarray, widths: Sequence[int] = classifiers.CELLNET_WIDTHS, epochs: int = 10,
                         batch_size: int = 128, learning_rate: float = 1e-3, temperature: float = TEMPERATURE,
                         max_seconds: float | None = None, seed: int = DEFAULT_SEED, progress: str = "epoch"
                         ) -> Pretrained:
    """SimCLR without labels: a ``cellnet`` encoder (``widths``) and a projection head (:data:`PROJECTION_UNITS`)
    learn to match two :func:`contrastive_views` of each uint8 image (n, s, s, 3) under :func:`nt_xent`, Adam at
    ``learning_rate``, ``batch_size`` images (2 x as many views) per step, the last partial batch dropped. The
    encoder then reads images of the same size s. No new epoch starts after ``max_seconds``. ``progress``:
    ``epoch`` (a line per epoch) or ``none``."""
    import tensorflow as tf

    size, batch = images.shape[1], min(batch_size, len(images))
    if batch < 2:
        raise ValueError(f"SimCLR needs at least 2 images per batch, got {len(images)} images")
    keras.utils.set_random_seed(seed)
    model = classifiers.build_cellnet((size, size, 3), 2, widths)
    encoder = encoder_of(model)
    layers = keras.layers
    head = keras.Sequential([keras.Input((encoder.output_shape[-1],)),
                             layers.Dense(PROJECTION_UNITS[0], activation="relu"), layers.Dense(PROJECTION_UNITS[1])],
                            name="projection")
    variables = encoder.trainable_variables + head.trainable_variables
    optimizer = keras.optimizers.Adam(learning_rate)
    optimizer.build(variables)

    @tf.function
    def step(a: Any, b: Any) -> Any:
        with tf.GradientTape() as tape:
            z1, z2 = tf.split(head(encoder(tf.concat([a, b], 0), training=True), training=True), 2)
            loss = nt_xent(z1, z2, temperature)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    rng, scale, steps, losses = np.random.default_rng(seed), cellnet_preprocessing(), len(images) // batch, []
    with MemorySampler() as memory:
        started, cpu_started = time.perf_counter(), time.process_time()
        for epoch in range(epochs):
            order = rng.permutation(len(images))
            step_losses = [float(step(*(classifiers.preprocess(contrastive_views(images[index], rng), scale)
                                        for _ in range(2))))
                           for index in (order[k * batch : (k + 1) * batch] for k in range(steps))]
            losses.append(float(np.mean(step_losses)))
            elapsed = time.perf_counter() - started
            if progress != "none":
                print(f"SimCLR epoch {epoch + 1}/{epochs}: NT-Xent loss {losses[-1]:.4f} ({elapsed:.0f} s)", flush=True)
            if max_seconds is not None and elapsed >= max_seconds:
                break
    return Pretrained(model, losses, time.perf_counter() - started, memory.peak_mb, len(images),
                      time.process_time() - cpu_started)


# --------------------------------------------------------------------------------------------------------
# Using a source on the target: frozen features, fine-tuning, training from scratch
# --------------------------------------------------------------------------------------------------------

#: Inverse regularisation strengths tried by :func:`linear_probe`; one is chosen on the validation split.
PROBE_C = (0.01, 0.1, 1.0, 10.0)


def embed(model: Any, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Features (n, last width) of uint8 images (n, s, s, 3) from the frozen encoder of ``cellnet`` ``model``."""
    return outputs_of(encoder_of(model), images, cellnet_preprocessing(), batch_size)


def vgg16_features(images: np.ndarray, weights: str | Path | None) -> np.ndarray:
    """Globally average-pooled outputs (n, 512) of a VGG16 base with ``weights`` (as :func:`vgg16_weights`) for
    uint8 images (n, s, s, 3), s >= 32, scaled with ``caffe`` as the ImageNet weights expect."""
    base = build_vgg16_base(images.shape[1], weights)
    pooled = keras.Sequential([keras.Input(base.input_shape[1:]), base, keras.layers.GlobalAveragePooling2D()])
    return outputs_of(pooled, images, "caffe")


@dataclass
class Probe:
    """A linear probe: standardised features, then a logistic regression with inverse regularisation ``c``
    (chosen on the validation split: ``val_accuracy`` maps each C tried to its validation accuracy)."""

    model: Any
    c: float
    val_accuracy: dict[float, float]

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(features)


def linear_probe(x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, cs: Sequence[float] = PROBE_C,
                 class_weight: str | None = None) -> Probe:
    """A logistic regression on frozen features ``x`` (n, d) with class indices ``y``, one per C in ``cs``; the
    one with the highest validation accuracy (ties: the smaller C, the stronger regularisation) is returned.
    ``class_weight``: None or ``balanced``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fitted, scores = {}, {}
    for c in cs:
        fitted[c] = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight=class_weight))
        fitted[c].fit(x, y)
        scores[c] = float(np.mean(fitted[c].predict(val_x) == np.asarray(val_y)))
    best = max(cs, key=lambda c: (scores[c], -c))
    return Probe(fitted[best], best, scores)


#: How a classifier meets class imbalance: report 004 augmented the under-represented classes only, after the
#: split, and weighted the classes in its multi-label models.
IMBALANCE_VARIANTS = ("none", "class_weights", "augment", "augment+class_weights")


def imbalanced_indices(labels: np.ndarray, shares: Sequence[float], largest: int, seed: int = DEFAULT_SEED
                       ) -> np.ndarray:
    """Sorted positions of a subset of ``labels`` whose class counts follow ``shares`` (one per class, any scale):
    the class with the largest share keeps ``largest``, class c about ``largest * shares[c] / max(shares)`` (at
    least 1; all its members if it has fewer), drawn with ``seed``."""
    shares = np.asarray(shares, dtype=float)
    if shares.ndim != 1 or len(shares) == 0 or shares.min() <= 0:
        raise ValueError(f"need one positive share per class, got {shares.tolist()}")
    wanted = np.maximum(1, np.round(largest * shares / shares.max())).astype(int)
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(np.asarray(labels) == c))[:n] for c, n in enumerate(wanted)]
    return np.sort(np.concatenate(keep))


def imbalanced_subset(data: ImageSet, shares: Sequence[float], largest: int, seed: int = DEFAULT_SEED) -> ImageSet:
    """:func:`imbalanced_indices` of an ImageSet (``shares``: one per class). Used to give a balanced set a
    realistic imbalance (e.g. PBC-28's class frequencies)."""
    if len(shares) != len(data.class_names):
        raise ValueError(f"need one share per class ({len(data.class_names)}), got {len(shares)}")
    return data.subset(imbalanced_indices(data.labels, shares, largest, seed))


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


def label_fraction(labels: np.ndarray, fraction: float, n_classes: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Sorted positions of a stratified ``fraction`` (0 < fraction <= 1) of ``labels``: of each class, the first
    ceil(fraction * n_c) (at least 1) in one random order fixed by ``seed``, so that a smaller fraction's subset
    lies inside every larger one's (the label curve adds labels, it does not redraw them)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(n_classes):
        members = rng.permutation(np.flatnonzero(np.asarray(labels) == c))
        keep.append(members[: max(1, math.ceil(fraction * len(members)))] if len(members) else members)
    return np.sort(np.concatenate(keep))


def epochs_for_fraction(epochs: int, fraction: float) -> int:
    """Epochs for a run on ``fraction`` of the labels: ceil(epochs / sqrt(fraction)). A small set gets more epochs,
    so it is not judged after a handful of steps, but fewer than the 1 / fraction that would equalise the steps
    (which would make each small run cost as much as the full one)."""
    if not 0 < fraction <= 1 or epochs < 1:
        raise ValueError(f"need epochs >= 1 and 0 < fraction <= 1, got {epochs}, {fraction}")
    return math.ceil(epochs / math.sqrt(fraction) - 1e-9)


@dataclass
class ClassifierRun:
    """One trained classifier of the study: its fits and their wall time (s), its validation and test reports
    (:func:`cellkit.metrics.proba_report`) and its test probabilities (n_test, n_classes)."""

    name: str
    model: Any
    fits: dict[str, FitResult]
    val_report: dict[str, Any]
    test_report: dict[str, Any]
    test_proba: np.ndarray

    @property
    def seconds(self) -> float:
        """Wall time spent training on the target task."""
        return float(sum(fit.seconds for fit in self.fits.values()))

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the process (all threads) spent training on the target task."""
        return float(sum(fit.cpu_seconds for fit in self.fits.values()))

    def summary(self) -> dict[str, Any]:
        return {
            "run": self.name, "val_accuracy": self.val_report["accuracy"],
            "test_accuracy": self.test_report["accuracy"], "test_macro_f1": self.test_report["macro_f1"],
            "epochs": {phase: fit.epochs_run for phase, fit in self.fits.items()}, "seconds": round(self.seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 1),
            "peak_rss_mb": round(max(fit.peak_rss_mb for fit in self.fits.values()), 1),
        }


def _reports(model: Any, val: ImageSet, test: ImageSet, preprocessing: str) -> tuple[dict, dict, np.ndarray]:
    """(validation report, test report, test probabilities) of ``model`` on uint8 images."""
    val_report = metrics.proba_report(val.labels, outputs_of(model, val.images, preprocessing), val.class_names)
    proba = outputs_of(model, test.images, preprocessing)
    return val_report, metrics.proba_report(test.labels, proba, test.class_names), proba


def cnn_run(train: ImageSet, val: ImageSet, test: ImageSet, epochs: int = 20,
            widths: Sequence[int] = classifiers.CELLNET_WIDTHS, source: Any = None, variant: str = "none",
            seed: int = DEFAULT_SEED, progress: str = "none", name: str = "cellnet") -> ClassifierRun:
    """``cellnet`` (notebook 04's small CNN, ``widths``) trained on the target images (uint8, any size >= 8) with
    its recipe (:data:`cellkit.classifiers.CELLNET_FIT`, at most ``epochs``, early stopping on validation
    accuracy). ``source``: a ``cellnet`` whose encoder weights it starts from (fine-tuning; None: random weights,
    from scratch). ``variant`` (:data:`IMBALANCE_VARIANTS`): ``class_weights`` weighs each class equally in the
    loss; ``augment`` adds :func:`minority_copies` of the training images (drawn with ``seed``)."""
    if variant not in IMBALANCE_VARIANTS:
        raise ValueError(f"unknown imbalance variant {variant!r}; use {', '.join(IMBALANCE_VARIANTS)}")
    n, x, y = len(train.class_names), train.images, train.labels
    if variant.startswith("augment"):
        extra, extra_labels = minority_copies(x, y, n, np.random.default_rng(seed))
        x, y = np.concatenate([x, extra]), np.concatenate([y, extra_labels])
    keras.utils.set_random_seed(seed)
    model = classifiers.build_cellnet(x.shape[1:], n, widths)
    if source is not None:
        with_encoder_weights(model, source)
    config = FitConfig.for_model("cellnet", epochs=epochs,
                                 class_weight="balanced" if variant.endswith("class_weights") else None)
    result = fit(model, x, y, val.images, val.labels, config, cellnet_preprocessing(), seed, progress,
                 scope_name(name, "cellnet"))
    return ClassifierRun(name, model, {"train": result}, *_reports(model, val, test, cellnet_preprocessing()))


def scratch_run(train: ImageSet, val: ImageSet, test: ImageSet, epochs: int = 10, learning_rate: float = 1e-4,
                batch_size: int = 32, max_seconds: float | None = None, seed: int = DEFAULT_SEED,
                progress: str = "epoch", name: str = "vgg16 scratch") -> ClassifierRun:
    """VGG16 + report 004's head (:func:`build_vgg16_classifier`) from random weights, trained end to end on the
    target images (uint8, side >= 32) with Adam at ``learning_rate``; no new epoch starts after ``max_seconds``
    (an equal time budget; at least one epoch runs)."""
    keras.utils.set_random_seed(seed)
    model = build_vgg16_classifier(len(train.class_names), train.images.shape[1], weights=None)
    config = FitConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, patience=epochs)
    result = fit(model, train.images, train.labels, val.images, val.labels, config, "caffe", seed, progress,
                 scope_name(name, "scratch"), max_seconds)
    return ClassifierRun(name, model, {"train": result}, *_reports(model, val, test, "caffe"))


# --- repeated seeds ----------------------------------------------------------------------------------------

#: The two runs of the headline comparison, as :func:`seed_runs` names them.
FINE_TUNED, SCRATCH = "fine-tuned from source", "cellnet from scratch"


def seed_runs(train: ImageSet, val: ImageSet, test: ImageSet, seeds: Sequence[int], epochs: int,
              widths: Sequence[int], source: Any, fraction: float = 1.0) -> dict[str, list[ClassifierRun]]:
    """The headline comparison repeated: for each seed of ``seeds``, ``cellnet`` fine-tuned from ``source``'s
    encoder (:data:`FINE_TUNED`) and from random weights (:data:`SCRATCH`), both with that seed, on the same
    :func:`label_fraction` of ``train`` (drawn with that seed, so each seed sees another subset of the labels),
    for :func:`epochs_for_fraction` epochs. Returns {name: one :class:`ClassifierRun` per seed, in order}."""
    runs: dict[str, list[ClassifierRun]] = {FINE_TUNED: [], SCRATCH: []}
    n_epochs = epochs_for_fraction(epochs, fraction)
    for seed in seeds:
        part = train if fraction == 1 else train.subset(label_fraction(train.labels, fraction,
                                                                       len(train.class_names), seed))
        for name, start in ((FINE_TUNED, source), (SCRATCH, None)):
            runs[name].append(cnn_run(part, val, test, n_epochs, widths, source=start, seed=seed,
                                      name=f"{name} {fraction:g} seed {seed}"))
    return runs


def class_score(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, score: str = "accuracy") -> float:
    """``accuracy`` or ``macro_f1`` of class indices ``y_pred`` against ``y_true`` (n,), in 0..n_classes-1.
    Macro-F1 is :func:`cellkit.metrics.macro_f1_score`."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if score == "accuracy":
        return float(np.mean(y_true == y_pred))
    if score != "macro_f1":
        raise ValueError(f"score must be accuracy or macro_f1, got {score!r}")
    return metrics.macro_f1_score(y_true, y_pred, n_classes)


def _seed_mean(n_classes: int, score: str) -> Any:
    """The statistic of :func:`seed_interval`: (y_true (n,), predictions (n, n_seeds)) -> mean score over seeds."""
    def statistic(y_true: np.ndarray, predictions: np.ndarray) -> float:
        return float(np.mean([class_score(y_true, p, n_classes, score) for p in predictions.T]))

    return statistic


def _by_image(predictions: Sequence[np.ndarray]) -> np.ndarray:
    """One run's class indices (n,) per seed -> (n, n_seeds): test images first, as a bootstrap resamples them."""
    stacked = np.stack([np.asarray(p) for p in predictions], axis=1)
    if stacked.ndim != 2:
        raise ValueError(f"need one (n,) array of class indices per seed, got shape {stacked.shape}")
    return stacked


def seed_interval(y_true: np.ndarray, predictions: Sequence[np.ndarray], n_classes: int, score: str = "accuracy",
                  **options) -> metrics.Interval:
    """``score`` (:func:`class_score`) averaged over seeds, each seed's class indices (n,) in ``predictions``, with
    its bootstrap interval over the test images: a resample draws images and scores every seed on them, so the
    interval is over images while the seeds are averaged (``options``: as
    :func:`cellkit.metrics.bootstrap_interval`)."""
    return metrics.bootstrap_interval([np.asarray(y_true), _by_image(predictions)], _seed_mean(n_classes, score),
                                      **options)


def seed_difference(y_true: np.ndarray, predictions_a: Sequence[np.ndarray], predictions_b: Sequence[np.ndarray],
                    n_classes: int, score: str = "accuracy", **options) -> metrics.Interval:
    """:func:`seed_interval` of runs ``a`` minus that of runs ``b``, both scored on the same test images (each a
    list of class indices (n,), one per seed), with its paired bootstrap interval over the images: the seeds are
    averaged, the images resampled, the same images for both."""
    y_true = np.asarray(y_true)
    return metrics.paired_difference([y_true, _by_image(predictions_a)], [y_true, _by_image(predictions_b)],
                                     _seed_mean(n_classes, score), **options)


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
