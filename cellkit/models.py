"""Classifiers: report 001's LeNets and AlexNet, this repository's small CNN, report 000's basic CNN, ResNet-18,
ResNet-50 and a small ViT, one registry, saving with metadata.

Every classifier is registered in :data:`REGISTRY` under a command-line name with a builder
``builder(input_shape, n_classes) -> keras.Model``, its default input size, the pixel scaling it expects
(:data:`PREPROCESSING`) and its default training recipe. To add one (ResNet, ViT, ...)::

    from cellkit import models

    def build_resnet18(input_shape, n_classes):
        ...  # a keras.Model taking preprocessed images of input_shape, softmax over n_classes
        return model

    models.register(models.ModelSpec("resnet18", build_resnet18, input_size=28, preprocessing="pm1",
                                     min_size=16, description="ResNet-18 for small inputs"))

Builders take images already scaled (the model has no rescaling layer); :func:`preprocess` does the
scaling with :mod:`cellkit.transforms`, and :func:`prepare_images` brings images of any size and mode to
what a model expects (RGB uint8, centre crop, bicubic resize), as the training data were made.

A trained model is saved as a native ``.keras`` file with a ``cellkit.json`` entry inside the archive (and a
copy in ``NAME.json`` beside it) holding :class:`ModelInfo`: class names, input size, scaling, crop rule and
test-time augmentation; :func:`load` reads both back with Keras' safe mode on.

Keras is imported on first use, so that ``import cellkit.models`` (e.g. to list the model names, or to
reject an unknown one) stays fast.

The VGG16 section (report 004): :func:`build_vgg16_base` (``keras.applications.VGG16`` without its top; ImageNet
weights read from disk only, see :func:`vgg16_weights`), :func:`build_transfer_head`, :func:`split_vgg16` and
:func:`build_vgg16_classifier`; its inputs are scaled with ``caffe`` (:data:`PREPROCESSING`).

The U-Net section at the end (reports 002, 003): :func:`build_unet`, its two losses, :class:`UNetInfo` and
:class:`TrainedUNet` (any image in, instance labels out; :meth:`TrainedUNet.segment_many` overlaps the work around the
network with it, :func:`overlapped`), :func:`save_unet` / :func:`load_unet`, and the file-level work of
``cellkit segment`` and ``cellkit evaluate segmentation`` (:func:`segment_files`, :func:`evaluate_label_folders`,
:func:`segmentation_scores`).
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellkit import transforms
from cellkit.datasets import DataError, centre_crop_resize, read_image, to_rgb
from cellkit.notebooks import json_default

if TYPE_CHECKING:  # pragma: no cover
    import keras

#: Name of the metadata entry inside a saved ``.keras`` archive.
METADATA_ENTRY = "cellkit.json"
#: Version of the metadata layout; bumped when a field changes meaning.
METADATA_VERSION = 1

#: Pixel scalings by name: uint8 (n, h, w, 3) -> float32. Report 001 feeds its CNNs [-1, 1].
#: ``zscore`` is report 000's per-image normalisation, ``raw`` its unnormalised input (0..255 as float32).
PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "pm1": transforms.scale_pm1,
    "01": transforms.scale_01,
    "zscore": transforms.zscore_each,
    "raw": transforms.scale_raw,
}


# --------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------


def keras_module():
    """Import Keras (TensorFlow backend) on first use, without TensorFlow's start-up notes on stderr.

    TensorFlow 2.21 writes oneDNN and absl notes straight to file descriptor 2 when it loads and when it runs
    its first op, whatever ``TF_CPP_MIN_LOG_LEVEL`` says; they would bury the command line's one-line errors.
    Only that first import and one tiny op run with descriptor 2 pointed at ``/dev/null``.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras

        keras.ops.add(keras.ops.ones((1,)), 1.0)  # the first op prints the oneDNN note again
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # "triggered tf.function retracing" when many models are trained in turn
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


_keras = keras_module


def build_lenet_original(input_shape: Sequence[int], n_classes: int) -> keras.Model:
    """The original LeNet as report 001 built it: tanh, 5x5 valid convolutions with 6 and 16 filters, 2x2
    max-pooling, dense 120 and 84 (tanh), softmax. Layer names are the report's (C1, S2, C3, S4, C5, F6)."""
    keras = _keras()
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(tuple(input_shape)),
            layers.Conv2D(6, (5, 5), activation="tanh", padding="valid", name="C1"),
            layers.MaxPooling2D((2, 2), name="S2"),
            layers.Conv2D(16, (5, 5), activation="tanh", padding="valid", name="C3"),
            layers.MaxPooling2D((2, 2), name="S4"),
            layers.Flatten(name="Flatten"),
            layers.Dense(120, activation="tanh", name="C5"),
            layers.Dense(84, activation="tanh", name="F6"),
            layers.Dense(n_classes, activation="softmax", dtype="float32", name="Output"),
        ],
        name="lenet_original",
    )


def build_lenet(input_shape: Sequence[int], n_classes: int) -> keras.Model:
    """Report 001's custom LeNet: 3x3 same-padded convolutions with 32 and 64 filters (ReLU), each followed by
    2x2 max-pooling, dense 128 (ReLU) and 84 (tanh), softmax; the report trained it with Adam (0.9397)."""
    keras = _keras()
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(tuple(input_shape)),
            layers.Conv2D(32, (3, 3), activation="relu", padding="same", name="conv1"),
            layers.MaxPooling2D((2, 2), name="pool1"),
            layers.Conv2D(64, (3, 3), activation="relu", padding="same", name="conv2"),
            layers.MaxPooling2D((2, 2), name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dense(128, activation="relu", name="dense128"),
            layers.Dense(84, activation="tanh", name="dense84"),
            layers.Dense(n_classes, activation="softmax", dtype="float32", name="output"),
        ],
        name="lenet",
    )


def build_alexnet(input_shape: Sequence[int], n_classes: int) -> keras.Model:
    """Report 001's AlexNet for 48x48 inputs: 3x3 same-padded ReLU convolutions with 96 and 256 filters, each
    with batch norm and 2x2 max-pooling, then 384-384-256 and a max-pool, dense 1024-1024 (ReLU) each with
    dropout 0.5, softmax. The report's listing verbatim; it scored 80% there."""
    keras = _keras()
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(tuple(input_shape)),
            layers.Conv2D(96, (3, 3), activation="relu", padding="same", name="conv1"),
            layers.BatchNormalization(name="bn1"),
            layers.MaxPooling2D((2, 2), name="pool1"),
            layers.Conv2D(256, (3, 3), activation="relu", padding="same", name="conv2"),
            layers.BatchNormalization(name="bn2"),
            layers.MaxPooling2D((2, 2), name="pool2"),
            layers.Conv2D(384, (3, 3), activation="relu", padding="same", name="conv3"),
            layers.Conv2D(384, (3, 3), activation="relu", padding="same", name="conv4"),
            layers.Conv2D(256, (3, 3), activation="relu", padding="same", name="conv5"),
            layers.MaxPooling2D((2, 2), name="pool3"),
            layers.Flatten(name="flatten"),
            layers.Dense(1024, activation="relu", name="fc1"),
            layers.Dropout(0.5, name="drop1"),
            layers.Dense(1024, activation="relu", name="fc2"),
            layers.Dropout(0.5, name="drop2"),
            layers.Dense(n_classes, activation="softmax", dtype="float32", name="output"),
        ],
        name="alexnet",
    )


#: Widths of the three stages of :func:`build_cellnet`.
CELLNET_WIDTHS = (32, 64, 128)


def build_cellnet(input_shape: Sequence[int], n_classes: int, widths: Sequence[int] = CELLNET_WIDTHS,
                  dropout: float = 0.2) -> keras.Model:
    """This repository's small CNN for 28x28 cells: three VGG-style stages of two 3x3 convolutions, each
    convolution followed by batch norm and ReLU, 2x2 max-pooling between stages, global average pooling,
    dropout and a softmax. Global pooling instead of a large dense layer keeps it at ~0.3 M parameters, and
    the same weights accept any input size of at least 8x8. Batch norm's running statistics use momentum 0.9
    (Keras' default 0.99 needs several hundred steps before they fit the data, which a short run never takes)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(tuple(input_shape))
    x = inputs
    for stage, filters in enumerate(widths, start=1):
        if stage > 1:
            x = layers.MaxPooling2D((2, 2), name=f"pool{stage - 1}")(x)
        for j in (1, 2):
            x = layers.Conv2D(filters, (3, 3), padding="same", use_bias=False, name=f"conv{stage}_{j}")(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"bn{stage}_{j}")(x)
            x = layers.Activation("relu", name=f"relu{stage}_{j}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name="cellnet")


def build_basic_cnn(input_shape: Sequence[int], n_classes: int, dropout: float = 0.5) -> keras.Model:
    """Report 000's basic CNN: two 3x3 same-padded ReLU convolutions (32 and 64 filters), each followed by 2x2
    max-pooling (50x50 -> 25x25 -> 12x12 in the report, 28 -> 14 -> 7 here), dropout against overfitting
    (the report added dropout to each model; the rate is chosen here), dense 128 (ReLU), softmax."""
    keras = _keras()
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(tuple(input_shape)),
            layers.Conv2D(32, (3, 3), activation="relu", padding="same", name="conv1"),
            layers.MaxPooling2D((2, 2), name="pool1"),
            layers.Conv2D(64, (3, 3), activation="relu", padding="same", name="conv2"),
            layers.MaxPooling2D((2, 2), name="pool2"),
            layers.Flatten(name="flatten"),
            layers.Dropout(dropout, name="dropout"),
            layers.Dense(128, activation="relu", name="dense128"),
            layers.Dense(n_classes, activation="softmax", dtype="float32", name="output"),
        ],
        name="basic_cnn",
    )


#: Filters of the four stages of ResNet-18 (He et al. 2016), two basic blocks each.
RESNET18_WIDTHS = (64, 128, 256, 512)


def _basic_block(x: Any, filters: int, stride: int, name: str) -> Any:
    """ResNet's basic block: two 3x3 convolutions with batch norm, identity shortcut (a strided 1x1 projection
    with batch norm when the shape changes), ReLU after the sum."""
    layers = _keras().layers
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn1")(y)
    y = layers.Activation("relu", name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn2")(y)
    if stride != 1 or int(x.shape[-1]) != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{name}_out")(y)


def build_resnet18(input_shape: Sequence[int], n_classes: int, widths: Sequence[int] = RESNET18_WIDTHS,
                   dropout: float = 0.2) -> keras.Model:
    """ResNet-18 (Keras has none): the ImageNet stem (7x7 convolution, stride 2, batch norm, ReLU, 3x3 max-pool
    with stride 2), four stages of two basic blocks ([2, 2, 2, 2]; 64-128-256-512 filters, stride 2 from the
    second stage on), global average pooling, dropout, softmax: 17 convolutions + 1 dense layer, 11.2 M
    parameters. On 28x28 inputs the maps are 7x7 after the stem and 1x1 in the last stage (as torchvision's
    ResNet-18, which report 000 used, does on small images). Batch norm momentum 0.9 (see :func:`build_cellnet`)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(tuple(input_shape))
    x = layers.Conv2D(widths[0], 7, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for stage, filters in enumerate(widths, start=1):
        for block in (1, 2):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters, stride, f"stage{stage}_block{block}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name="resnet18")


def build_resnet50(input_shape: Sequence[int], n_classes: int, dropout: float = 0.2) -> keras.Model:
    """ResNet-50 from ``keras.applications`` without pretrained weights (``weights=None``: report 000 trained
    from scratch, and no download is needed), ``include_top=False``, then global average pooling, dropout and
    a softmax: 23.6 M parameters. Keras' ResNet50 takes inputs of at least 32x32 pixels. Its batch-norm momentum
    is lowered from 0.99 to 0.9, as in :func:`build_cellnet`: with 0.99 the running statistics of a short run on a
    few hundred images still hold their initial values, and validation would score the initialisation."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(tuple(input_shape))
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=tuple(input_shape))
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.9
    x = base(inputs)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name="resnet50")


_VIT_LAYERS: dict[str, type] = {}


def vit_layers() -> dict[str, type]:
    """The ViT's custom layer (:class:`PositionEmbedding`), defined and registered with Keras on first use so
    that saved ViTs load in safe mode. Returns {name: class}."""
    if _VIT_LAYERS:
        return _VIT_LAYERS
    keras = _keras()

    @keras.saving.register_keras_serializable(package="cellkit")
    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned embedding (tokens, dim) to a sequence of tokens (batch, tokens, dim)."""

        def build(self, input_shape):
            self.embedding = self.add_weight(shape=(int(input_shape[-2]), int(input_shape[-1])),
                                             initializer=keras.initializers.RandomNormal(stddev=0.02),
                                             name="embedding")

        def call(self, tokens):
            return tokens + keras.ops.cast(self.embedding, tokens.dtype)

    _VIT_LAYERS["PositionEmbedding"] = PositionEmbedding
    return _VIT_LAYERS


#: The small ViT's shape: patch side (px), token width, transformer blocks, attention heads, MLP width.
VIT_SHAPE = {"patch": 4, "dim": 64, "depth": 4, "heads": 4, "mlp": 128}


def build_vit(input_shape: Sequence[int], n_classes: int, patch: int = VIT_SHAPE["patch"],
              dim: int = VIT_SHAPE["dim"], depth: int = VIT_SHAPE["depth"], heads: int = VIT_SHAPE["heads"],
              mlp: int = VIT_SHAPE["mlp"], dropout: float = 0.1) -> keras.Model:
    """A small Vision Transformer (Dosovitskiy et al. 2021) for cell crops; report 000 used ViT-base (12 blocks,
    86 M parameters, pretrained), which is far beyond a 2-core CPU and needs downloads.

    Non-overlapping ``patch`` x ``patch`` patches (28x28 -> 49 patches of 4x4) are embedded linearly (a strided
    convolution) into ``dim``-wide tokens, a learned position embedding is added, then ``depth`` pre-norm
    transformer blocks (multi-head self-attention with ``heads`` heads, MLP ``dim`` -> ``mlp`` -> ``dim`` with
    GELU, residual connections, dropout), a final layer norm, global average pooling over tokens (instead of a
    class token) and a softmax. The input side must be a multiple of ``patch``."""
    keras = _keras()
    layers = keras.layers
    side = int(input_shape[0])
    if side % patch or int(input_shape[1]) % patch:
        raise ValueError(f"the ViT needs an input side that is a multiple of its patch size {patch}, got "
                         f"{input_shape[0]}x{input_shape[1]}")
    tokens = (side // patch) * (int(input_shape[1]) // patch)
    inputs = keras.Input(tuple(input_shape))
    x = layers.Conv2D(dim, patch, strides=patch, name="patch_embedding")(inputs)
    x = layers.Reshape((tokens, dim), name="tokens")(x)
    x = vit_layers()["PositionEmbedding"](name="position_embedding")(x)
    for i in range(1, depth + 1):
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(x)
        y = layers.MultiHeadAttention(heads, dim // heads, dropout=dropout, name=f"block{i}_attention")(y, y)
        x = layers.Add(name=f"block{i}_add1")([x, y])
        y = layers.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(x)
        y = layers.Dense(mlp, activation="gelu", name=f"block{i}_mlp1")(y)
        y = layers.Dropout(dropout, name=f"block{i}_drop")(y)
        y = layers.Dense(dim, name=f"block{i}_mlp2")(y)
        x = layers.Add(name=f"block{i}_add2")([x, y])
    x = layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
    x = layers.GlobalAveragePooling1D(name="token_pool")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name="vit")


# --------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A registered classifier.

    Attributes
    ----------
    name : the command-line name (``cellkit train classifier --model NAME``).
    builder : ``builder(input_shape, n_classes)`` -> an uncompiled ``keras.Model`` on preprocessed input.
    input_size : default side of the square input in pixels.
    preprocessing : key of :data:`PREPROCESSING` (the scaling the model is trained with).
    min_size : smallest input side the architecture accepts.
    multiple_of : the input side must be a multiple of this (a ViT's patch size); 1 for any side.
    description : one line for ``--help`` and tables.
    source : where the architecture comes from (a report, a paper, "this repository").
    fit : default training recipe: keyword arguments of :class:`cellkit.training.FitConfig`.
    """

    name: str
    builder: Callable[[Sequence[int], int], Any]
    input_size: int
    preprocessing: str = "pm1"
    min_size: int = 8
    description: str = ""
    source: str = ""
    fit: dict[str, Any] = field(default_factory=dict)
    multiple_of: int = 1

    def check_size(self, size: int) -> None:
        """A one-line ValueError naming the problem if ``size`` x ``size`` inputs do not fit this model."""
        if size < self.min_size:
            raise ValueError(f"model {self.name!r} needs inputs of at least {self.min_size}x{self.min_size} "
                             f"pixels, got {size}x{size}")
        if size % self.multiple_of:
            raise ValueError(f"model {self.name!r} needs an input side that is a multiple of {self.multiple_of} "
                             f"pixels, got {size}x{size}")


#: name -> spec. Add models with :func:`register`.
REGISTRY: dict[str, ModelSpec] = {}
#: The model ``cellkit train classifier`` trains when none is named.
DEFAULT_MODEL = "cellnet"

#: The report's recipe: Adam at Keras' default rate, no augmentation, no label smoothing, and Keras' default
#: batch size of 32 (the report gives none); early stopping with patience 5 is ours.
REPORT_FIT = {"optimizer": "adam", "learning_rate": 1e-3, "schedule": "constant", "weight_decay": 0.0,
              "label_smoothing": 0.0, "augment": "none", "epochs": 30, "patience": 5, "batch_size": 32,
              "tta": "none"}  # fmt: skip
#: The recipe of the small CNN, chosen on the validation split (see notebook 04 and the README).
CELLNET_FIT = {"optimizer": "adamw", "learning_rate": 3e-3, "schedule": "cosine", "weight_decay": 5e-4,
               "label_smoothing": 0.1, "augment": "dihedral_shift", "epochs": 20, "patience": 10,
               "batch_size": 128, "tta": "auto"}  # fmt: skip


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to :data:`REGISTRY` (replacing one of the same name) and return it."""
    if spec.preprocessing not in PREPROCESSING:
        raise ValueError(f"{spec.name}: unknown preprocessing {spec.preprocessing!r}; use {', '.join(PREPROCESSING)}")
    REGISTRY[spec.name] = spec
    return spec


for _spec in (
    ModelSpec("lenet-original", build_lenet_original, 28, "pm1", min_size=14,
              description="original LeNet: tanh, 5x5 valid convolutions 6/16, dense 120/84",
              source="report 001 (91%)", fit=REPORT_FIT),
    ModelSpec("lenet", build_lenet, 28, "pm1", min_size=4,
              description="report 001's custom LeNet: ReLU, 3x3 same convolutions 32/64, dense 128 ReLU + 84 tanh",
              source="report 001 (0.9397)", fit=REPORT_FIT),
    ModelSpec("alexnet", build_alexnet, 48, "pm1", min_size=8,
              description="report 001's AlexNet for 48x48: 96-256-384-384-256, batch norm, dense 1024-1024",
              source="report 001 (80%)", fit=REPORT_FIT),
    ModelSpec("cellnet", build_cellnet, 28, "pm1", min_size=8,
              description="small VGG-style CNN with batch norm and global pooling (the default)",
              source="this repository", fit=CELLNET_FIT),
    ModelSpec("basic-cnn", build_basic_cnn, 28, "pm1", min_size=4,
              description="report 000's basic CNN: two 3x3 ReLU convolutions 32/64 with 2x2 max-pool, dense 128",
              source="report 000", fit=REPORT_FIT),
    ModelSpec("resnet18", build_resnet18, 28, "pm1", min_size=8,
              description="ResNet-18: ImageNet stem, basic blocks [2, 2, 2, 2], 64-512 filters, 11.2 M parameters",
              source="He et al. 2016; report 000", fit=REPORT_FIT),
    ModelSpec("resnet50", build_resnet50, 32, "pm1", min_size=32,
              description="ResNet-50 (keras.applications, no pretrained weights), 28x28 cells resized to 32x32",
              source="He et al. 2016; report 000", fit=REPORT_FIT),
    ModelSpec("vit", build_vit, 28, "pm1", min_size=8, multiple_of=VIT_SHAPE["patch"],
              description="small ViT: 4x4 patches, learned position embedding, 4 blocks of width 64, 4 heads",
              source="Dosovitskiy et al. 2021; report 000 (ViT-base)", fit=REPORT_FIT),
):
    register(_spec)


def spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; a one-line error naming the known models otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def build(name: str, n_classes: int, input_size: int | None = None, channels: int = 3) -> keras.Model:
    """Build registered model ``name`` for ``input_size`` x ``input_size`` x ``channels`` inputs (uncompiled).

    Raises ValueError (one line) for an unknown name or an input smaller than the architecture accepts.
    """
    entry = spec(name)
    size = entry.input_size if input_size is None else int(input_size)
    entry.check_size(size)
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    return entry.builder((size, size, channels), n_classes)


def layer_table(model: keras.Model) -> list[dict[str, Any]]:
    """One row per layer: name, type, filters/units, kernel size, strides, padding, activation, parameters."""
    rows = []
    for layer in model.layers:
        config = layer.get_config()
        rows.append({
            "name": layer.name,
            "type": type(layer).__name__,
            "filters_or_units": config.get("filters", config.get("units")),
            "kernel_size": tuple(config["kernel_size"]) if "kernel_size" in config else None,
            "padding": config.get("padding"),
            "activation": config.get("activation"),
            "rate": config.get("rate"),
            "output_shape": tuple(layer.output.shape[1:]) if hasattr(layer, "output") else None,
            "params": int(layer.count_params()),
        })
    return rows


# --------------------------------------------------------------------------------------------------------
# Images in: any size and mode -> what a model expects
# --------------------------------------------------------------------------------------------------------


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """An image as (H, W, 3) uint8: grey copied to 3 channels, alpha dropped, 16-bit divided by 257 (full
    range to 8 bits, as the loaders do), floats in [0, 1] scaled by 255."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (2, 4):
        image = image[..., :-1]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise DataError(f"expected a grey or RGB image, got an array of shape {image.shape}")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype == bool:
        image = image.astype(np.uint8) * np.uint8(255)
    elif np.issubdtype(image.dtype, np.floating):
        if image.size and (np.nanmin(image) < 0 or np.nanmax(image) > 1):
            raise DataError("a float image must hold values in [0, 1]")
        image = np.rint(np.nan_to_num(image) * 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DataError(f"unsupported pixel type {image.dtype}; use 8- or 16-bit images")
    return np.ascontiguousarray(to_rgb(image))


def prepare_images(images: Sequence[np.ndarray] | np.ndarray, size: int, crop: int | None) -> np.ndarray:
    """Images of any size and mode -> (n, size, size, 3) uint8, as the model's training images were made.

    Each image becomes RGB uint8 (:func:`to_uint8_rgb`), then is centre-cropped to ``crop`` pixels (or to its
    largest centred square when ``crop`` is None or larger than the image) and resized bicubically to ``size``.
    An image that is already ``size`` x ``size`` is unchanged, so a 28x28 thumbnail and a 360x363 PBC original
    both end up like the PBC-28 training images when ``crop`` is 200.
    """
    out = [centre_crop_resize(to_uint8_rgb(image), size, crop) for image in images]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)


def preprocess(images: np.ndarray, preprocessing: str) -> np.ndarray:
    """uint8 images (n, h, w, 3) -> float32 model input with the named scaling (:data:`PREPROCESSING`)."""
    try:
        scale = PREPROCESSING[preprocessing]
    except KeyError:
        raise ValueError(f"unknown preprocessing {preprocessing!r}; use {', '.join(PREPROCESSING)}") from None
    return scale(images)


# --------------------------------------------------------------------------------------------------------
# Trained models: metadata, save, load, predict
# --------------------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What travels with a trained model so that it can be used on new images with nothing else.

    Attributes
    ----------
    model : registry name of the architecture.
    class_names : output position -> class name.
    input_size : side of the square input in pixels.
    preprocessing : key of :data:`PREPROCESSING`.
    crop : side of the centre crop taken from an original image before resizing (PBC: 200), or None for the
        largest centred square.
    tta : test-time augmentation used by :func:`predict_proba` by default: ``none``, ``flips`` (4 views) or
        ``dihedral`` (8 views: flips and 90-degree rotations), chosen on the validation split.
    channels : input channels (3: grey images are copied to RGB).
    trained_on : a description of the training data.
    """

    model: str
    class_names: list[str]
    input_size: int
    preprocessing: str = "pm1"
    crop: int | None = None
    tta: str = "none"
    channels: int = 3
    trained_on: str = ""
    format_version: int = METADATA_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        missing = {"model", "class_names", "input_size"} - set(known)
        if missing:
            raise DataError(f"model metadata lacks {', '.join(sorted(missing))}")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainedModel:
    """A Keras model with its :class:`ModelInfo`."""

    model: Any
    info: ModelInfo

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def prepare(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Any images -> (n, size, size, 3) uint8 for this model (see :func:`prepare_images`)."""
        return prepare_images(images, self.info.input_size, self.info.crop)

    def predict_proba(self, images: np.ndarray, tta: str | None = None, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (n, k) for uint8 images already at the model's size (see :meth:`prepare`).

        ``tta`` overrides the recorded test-time augmentation (``none``, ``flips``, ``dihedral``).
        """
        return predict_proba(self.model, images, self.info.preprocessing, tta or self.info.tta, batch_size)

    def predict(self, images: np.ndarray, tta: str | None = None) -> np.ndarray:
        """Class indices (n,) for uint8 images at the model's size."""
        return self.predict_proba(images, tta).argmax(axis=1)


#: Test-time augmentations: name -> list of (k 90-degree rotations, horizontal flip) views.
TTA_VIEWS: dict[str, list[tuple[int, bool]]] = {
    "none": [(0, False)],
    "flips": [(0, False), (0, True), (2, False), (2, True)],  # identity, left-right, 180 deg, top-bottom
    "dihedral": [(k, f) for k in range(4) for f in (False, True)],
}


def view(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Images (n, h, w, c) rotated by ``k`` quarter turns and, if ``flip``, mirrored left-right."""
    out = np.rot90(images, k, axes=(1, 2)) if k % 4 else images
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def predict_proba(model: Any, images: np.ndarray, preprocessing: str = "pm1", tta: str = "none",
                  batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities (n, k) of ``model`` for uint8 images (n, h, w, 3) at its input size, averaged over
    the views of ``tta`` (:data:`TTA_VIEWS`). A one-line ValueError if the images do not fit the model."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown test-time augmentation {tta!r}; use {', '.join(TTA_VIEWS)}")
    images = np.asarray(images)
    expected = tuple(model.input_shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"model {model.name!r} takes images of shape {expected}, got {tuple(images.shape[1:])}; "
                         "prepare them with TrainedModel.prepare (centre crop + resize)")
    if not len(images):
        return np.zeros((0, int(model.output_shape[-1])), np.float32)
    total = None
    for k, flip in TTA_VIEWS[tta]:
        x = preprocess(view(images, k, flip), preprocessing)
        p = _predict_batches(model, x, batch_size)
        total = p if total is None else total + p
    return (total / len(TTA_VIEWS[tta])).astype(np.float32)


def _predict_batches(model: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """``model.predict`` without the progress bar and its per-call overhead, in fixed-size batches."""
    out = [np.asarray(model(x[i : i + batch_size], training=False)) for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32)


def float32_copy(model: Any, name: str, n_classes: int) -> Any:
    """A float32 copy of a (possibly mixed-precision) model of registered architecture ``name``.

    Saved models are always float32, so they run everywhere at full speed and precision whatever the
    training machine supported. Weights are float32 variables under mixed precision too; they are copied.
    """
    keras = _keras()
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("float32")
        copy = build(name, n_classes, int(model.input_shape[1]), int(model.input_shape[-1]))
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def sidecar_path(path: str | Path) -> Path:
    """The JSON beside a model file: ``models/NAME.keras`` -> ``models/NAME.json``."""
    return Path(path).with_suffix(".json")


def save(model: Any, info: ModelInfo, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as a native ``.keras`` file with ``info`` inside it, and ``NAME.json`` beside it.

    The JSON holds ``{"model_info": info, **extra}`` (``extra``: metrics, history, timings ...). A mixed-
    precision model is saved as its float32 copy. Returns the model path.
    """
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a model file must end in .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    if any(getattr(layer, "compute_dtype", "float32") != "float32" for layer in model.layers):
        model = float32_copy(model, info.model, len(info.class_names))
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(METADATA_ENTRY, json.dumps(info.to_dict(), indent=2))
    record = {"model_info": info.to_dict(), **(extra or {})}
    sidecar_path(path).write_text(json.dumps(record, indent=2, default=json_default) + "\n")
    return path


def read_info(path: str | Path) -> ModelInfo:
    """The :class:`ModelInfo` of a saved model: from inside the archive, else from the JSON beside it."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_ENTRY in archive.namelist():
                data = json.loads(archive.read(METADATA_ENTRY))
                if data.get("kind") == UNET_KIND:
                    raise DataError(f"{path}: a U-Net for segmentation, not a classifier; use `cellkit segment`")
                return ModelInfo.from_dict(data)
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a .keras model file (not a zip archive)") from None
    side = sidecar_path(path)
    if side.is_file():
        data = json.loads(side.read_text())
        return ModelInfo.from_dict(data.get("model_info", data))
    raise DataError(f"{path}: no cellkit metadata inside it and no {side.name} beside it; train it with "
                    "`cellkit train classifier` or save it with cellkit.models.save")


def load(path: str | Path) -> TrainedModel:
    """Load a model saved by :func:`save` (Keras safe mode on) with its metadata."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file; train one with `cellkit train classifier --out {path}`")
    if path.suffix != ".keras":
        raise DataError(f"{path}: expected a native Keras model file ending in .keras")
    info = read_info(path)
    keras = _keras()
    vit_layers()  # registers the ViT's custom layer for deserialisation
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot load the model ({first_line})") from None
    if int(model.output_shape[-1]) != len(info.class_names):
        raise DataError(f"{path}: the model has {model.output_shape[-1]} outputs but its metadata names "
                        f"{len(info.class_names)} classes")
    return TrainedModel(model, info)


# --------------------------------------------------------------------------------------------------------
# Classifying files
# --------------------------------------------------------------------------------------------------------


def image_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the image files in folder ``path`` and its subfolders, sorted.

    A folder without images is a one-line DataError.
    """
    from cellkit.datasets.loaders import IMAGE_SUFFIXES

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in it and its subfolders)")
    return files


def classify_files(trained: TrainedModel, files: Sequence[Path], tta: str | None = None, batch_size: int = 64,
                   on_error: Callable[[Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Class and probabilities for each readable file, read and prepared like the model's training images.

    Returns one dict per readable file: ``file``, ``class``, ``probability`` and one ``p_<class>`` per class.
    An unreadable file is skipped; ``on_error(path, message)`` is called for it.
    """
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        batch, kept = [], []
        for path in files[start : start + batch_size]:
            try:
                batch.append(trained.prepare([read_image(path)])[0])
                kept.append(path)
            except (DataError, ValueError, OSError) as error:
                if on_error is not None:
                    on_error(path, str(error))
        if not batch:
            continue
        proba = trained.predict_proba(np.stack(batch), tta)
        for path, p in zip(kept, proba, strict=True):
            best = int(p.argmax())
            row = {"file": str(path), "class": trained.class_names[best], "probability": float(p[best])}
            row.update({f"p_{name}": float(v) for name, v in zip(trained.class_names, p, strict=True)})
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------
# VGG16 transfer (report 004)
# --------------------------------------------------------------------------------------------------------
#
# Report 004 put two dense ReLU layers, dropout and a softmax on an ImageNet VGG16 base. The base here is
# ``keras.applications.VGG16(include_top=False)``; its ImageNet weights are used only when the file is on disk
# (Keras' cache or a path the user gives): nothing is downloaded behind the user's back, and a missing file is
# a one-line error, never a silent switch to other weights.

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


def _caffe(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (n, h, w, 3) -> float32 BGR minus the ImageNet channel means: what VGG16's weights expect."""
    x = np.asarray(images, dtype=np.float32)[..., ::-1]
    return x - np.array([103.939, 116.779, 123.68], dtype=np.float32)


PREPROCESSING["caffe"] = _caffe


def keras_weights_cache() -> Path:
    """Where Keras keeps downloaded application weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def md5sum(path: str | Path) -> str:
    import hashlib

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
    ``caffe`` (:data:`PREPROCESSING`); output (input_size // 32, input_size // 32, 512). ``weights`` as in
    :func:`vgg16_weights` (None: random). Input sides below 32 are a ValueError (five 2x2 max-pools)."""
    if input_size < 32:
        raise ValueError(f"VGG16 needs inputs of at least 32x32 pixels, got {input_size}x{input_size}")
    path, _ = vgg16_weights(weights)
    keras = _keras()
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
    keras = _keras()
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
    keras = _keras()
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
    keras = _keras()
    base = base if base is not None else build_vgg16_base(input_size, weights)
    head = head if head is not None else build_transfer_head(base.output_shape[1:], n_classes)
    inputs = keras.Input(tuple(base.input_shape[1:]))
    return keras.Model(inputs, head(base(inputs)), name="vgg16_transfer")


# --------------------------------------------------------------------------------------------------------
# U-Net for nucleus segmentation (reports 002 and 003)
# --------------------------------------------------------------------------------------------------------
#
# The builder, its two losses, and a trained U-Net that travels with everything ``cellkit segment`` needs
# (input channels, normalisation, post-processing) inside its ``.keras`` file. The image-side work (input
# stack, tiling, instances) is :mod:`cellkit.segmentation`'s; this section only adds the network.

#: Output class names: one sigmoid output (report 003: nucleus vs background) or three softmax classes
#: (report 002: background, cell interior, cell edge).
UNET_CLASS_NAMES: dict[int, tuple[str, ...]] = {1: ("nucleus",), 3: ("background", "cell", "edge")}
#: Metadata ``kind`` of a saved U-Net (a classifier's metadata has none).
UNET_KIND = "unet"


def unet_multiple(depth: int = 4) -> int:
    """Height and width a U-Net of ``depth`` poolings needs to be a multiple of: 2 ** depth (16 for 4)."""
    return 2 ** int(depth)


def build_unet(input_channels: int = 1, n_classes: int = 1, base_filters: int = 64, depth: int = 4,
               dropout: float = 0.05, batch_norm: bool = True, name: str = "unet") -> keras.Model:
    """The U-Net of report 003 (after Ronneberger et al. 2015), with a width parameter.

    Encoder: ``depth`` levels of two 3x3 same-padded convolutions (He normal initialisation), each followed by
    batch normalisation (if ``batch_norm``), ReLU and dropout ``dropout``, then 2x2 max-pooling; the number of
    filters starts at ``base_filters`` (report 003: 64) and doubles per level. A bottom block of the same kind
    with ``base_filters * 2 ** depth`` filters. Decoder: per level a 2x2 transpose convolution with stride 2
    (halving the filters), concatenation with the encoder's output at that level (the skip connection), and two
    convolutions as above. Output: a 1x1 convolution in float32 (also under mixed precision) with a sigmoid for
    ``n_classes == 1`` (report 003) or a softmax over ``n_classes`` (report 002: background, cell, edge).

    The input is ``(None, None, input_channels)``: any height and width that are multiples of
    :func:`unet_multiple` (pad with :func:`cellkit.segmentation.pad_to_multiple`). Batch norm uses momentum 0.9
    so that its running statistics settle within a few hundred steps (Keras' 0.99 needs thousands).
    Returns an uncompiled ``keras.Model``.
    """
    if input_channels < 1 or n_classes < 1 or base_filters < 1 or depth < 1:
        raise ValueError("input_channels, n_classes, base_filters and depth must all be at least 1")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    keras = _keras()
    layers = keras.layers

    def block(x, filters: int, tag: str):
        for j in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal", use_bias=not batch_norm,
                              name=f"{tag}_conv{j}")(x)
            if batch_norm:
                x = layers.BatchNormalization(momentum=0.9, name=f"{tag}_bn{j}")(x)
            x = layers.Activation("relu", name=f"{tag}_relu{j}")(x)
            if dropout > 0:
                x = layers.Dropout(dropout, name=f"{tag}_dropout{j}")(x)
        return x

    inputs = keras.Input((None, None, int(input_channels)), name="image")
    x, skips = inputs, []
    for level in range(1, depth + 1):
        x = block(x, base_filters * 2 ** (level - 1), f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = block(x, base_filters * 2 ** depth, "bottom")
    for level in range(depth, 0, -1):
        filters = base_filters * 2 ** (level - 1)
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", kernel_initializer="he_normal",
                                   name=f"up{level}_transpose")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([skips[level - 1], x])
        x = block(x, filters, f"up{level}")
    activation = "sigmoid" if n_classes == 1 else "softmax"
    outputs = layers.Conv2D(n_classes, 1, activation=activation, dtype="float32", name="output")(x)
    return keras.Model(inputs, outputs, name=name)


def binary_focal_loss(gamma: float = 2.0, alpha: float = 0.5):
    """Report 003's loss: binary focal cross-entropy (Lin et al.), ``-alpha (1-p)^gamma log p`` for nucleus
    pixels and ``-(1-alpha) p^gamma log(1-p)`` for background ones, averaged over pixels. gamma 2 down-weights
    the many easy background pixels; alpha 0.5 weighs both classes the same (the report's choice)."""
    keras = _keras()
    return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=alpha, gamma=gamma,
                                                name="binary_focal")


def weighted_categorical_crossentropy(class_weights: Sequence[float] = (1.0, 1.0, 5.0)):
    """Report 002's loss: cross-entropy with a weight per class, ``-sum_c w_c y_c log p_c`` per pixel, averaged
    over pixels. ``class_weights`` in class order (background, cell, edge); the rare edge class weighs more.

    ``y_true`` is one-hot (B, H, W, K), ``y_pred`` softmax probabilities of the same shape.
    """
    keras = _keras()
    ops = keras.ops
    weights = np.asarray(class_weights, dtype=np.float32)
    eps = 1e-7

    def weighted_categorical_crossentropy(y_true, y_pred):
        y_pred = ops.clip(ops.cast(y_pred, "float32"), eps, 1.0 - eps)
        return -ops.sum(ops.cast(y_true, "float32") * ops.log(y_pred) * weights, axis=-1)

    return weighted_categorical_crossentropy


@dataclass
class UNetInfo:
    """What travels with a trained U-Net so that ``cellkit segment`` needs nothing else.

    Attributes
    ----------
    n_classes : network outputs: 1 (sigmoid, nucleus probability) or 3 (background, cell, edge).
    channels : input channel names of :func:`cellkit.segmentation.input_stack`, in order.
    base_filters, depth, dropout, batch_norm : the architecture (:func:`build_unet`).
    normalise : the percentiles (low, high) of the per-image normalisation.
    canny_thresholds : hysteresis thresholds (0..255) of the Canny channel.
    edge_width : width in pixels of the edge class of the 3-class targets it was trained on.
    postprocess : keyword arguments of :func:`cellkit.segmentation.probs_to_instances`, tuned on validation.
    tile, overlap : tile size and overlap in pixels of :func:`cellkit.segmentation.predict_tiled`.
    trained_on : a description of the training data.
    nucleus_diameter : median nucleus diameter in px the network was trained at; each image is zoomed so that
        its nuclei (estimated by :func:`cellkit.segmentation.estimate_diameter`) have it. None: no zoom.
    """

    n_classes: int
    channels: list[str]
    base_filters: int
    depth: int = 4
    dropout: float = 0.05
    batch_norm: bool = True
    normalise: list[float] = field(default_factory=lambda: [1.0, 99.8])
    canny_thresholds: list[float] = field(default_factory=lambda: [10.0, 200.0])
    edge_width: int = 1
    postprocess: dict[str, Any] = field(default_factory=dict)
    tile: int = 256
    overlap: int = 32
    trained_on: str = ""
    nucleus_diameter: float | None = None
    kind: str = UNET_KIND
    model: str = "unet"
    format_version: int = METADATA_VERSION

    @property
    def class_names(self) -> list[str]:
        return list(UNET_CLASS_NAMES.get(self.n_classes, [f"class_{i}" for i in range(self.n_classes)]))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetInfo:
        if data.get("kind") != UNET_KIND:
            raise DataError("this model is not a U-Net (it is an image classifier); use `cellkit classify` with it")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        missing = {"n_classes", "channels", "base_filters"} - set(known)
        if missing:
            raise DataError(f"U-Net metadata lacks {', '.join(sorted(missing))}")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "class_names": self.class_names}

    def build(self, **architecture: Any) -> keras.Model:
        """A fresh (untrained) network of this architecture, in the current Keras dtype policy; ``architecture``
        (``dropout``, ``batch_norm``) overrides the recorded values."""
        settings = {"dropout": self.dropout, "batch_norm": self.batch_norm, **architecture}
        return build_unet(len(self.channels), self.n_classes, self.base_filters, self.depth, **settings)


class TrainedUNet:
    """A trained U-Net with its :class:`UNetInfo`: any image in, instance labels out.

    >>> unet = load_unet("models/unet.keras")
    >>> labels, probs = unet.segment(image)      # (H, W) int32 ids, (H, W, K) float32 probabilities
    """

    def __init__(self, model: Any, info: UNetInfo, eager: bool = False, flips: bool = False) -> None:
        self.model, self.info, self.eager, self.flips = model, info, eager, flips
        self._network: Any = None

    @property
    def network(self) -> Any:
        """What predicts: :attr:`model` with its batch norm folded into the convolutions
        (:func:`unet_for_inference`), made on first use. ``model`` stays as trained, for saving."""
        if self._network is None:
            self._network = unet_for_inference(self.model, self.info)
        return self._network

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Network output (B, h, w, K) float32 for input stacks (B, h, w, C), h and w multiples of 2 ** depth.

        Runs a traced graph (``predict_on_batch``; tracing costs a second or two per new input shape, then each
        call is fast), or, with ``eager``, the layers one by one (no tracing; for a few predictions only).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.eager:
            return np.asarray(self.network(batch, training=False), np.float32)
        return np.asarray(self.network.predict_on_batch(batch), np.float32)

    def stack(self, image: np.ndarray) -> np.ndarray:
        """The network input of ``image`` (H, W) or (H, W, C), any dtype: normalised channels (H, W, C)."""
        from cellkit import segmentation

        low, high = self.info.normalise
        return segmentation.input_stack(image, self.info.channels, low, high, tuple(self.info.canny_thresholds))

    def scale(self, image: np.ndarray) -> float:
        """The zoom applied to ``image`` before the network: nuclei to the recorded ``nucleus_diameter`` (their
        diameter estimated without a network, :func:`cellkit.segmentation.estimate_diameter`), 1.0 without one."""
        from cellkit import segmentation

        if self.info.nucleus_diameter is None:
            return 1.0
        return segmentation.scale_factor(segmentation.estimate_diameter(image), self.info.nucleus_diameter)

    def prepare(self, image: np.ndarray, scale: float | str = "auto") -> np.ndarray:
        """The network input (h, w, C) of ``image`` (H, W[, C]): zoomed by ``scale`` (``auto``: :meth:`scale`), then
        :meth:`stack`."""
        from cellkit import segmentation

        factor = self.scale(image) if scale == "auto" else float(scale)
        return self.stack(segmentation.zoom(image, factor))

    def predict_stack(self, stack: np.ndarray, tile: int | None | str = "auto", batch_size: int = 4,
                      flips: bool | None = None) -> np.ndarray:
        """Network output (h, w, K) of a prepared input (h, w, C) (:meth:`prepare`), at its resolution, tiled with
        overlap as recorded (``tile`` overrides it; None predicts it in one piece, up to
        :data:`cellkit.segmentation.MAX_UNTILED_PIXELS`). ``flips``: see :meth:`probabilities`."""
        from cellkit import segmentation

        tile = self.info.tile if tile == "auto" else tile
        flips = self.flips if flips is None else flips
        views = [(False, False), (True, False), (False, True), (True, True)] if flips else [(False, False)]
        probs = np.zeros((*stack.shape[:2], self.info.n_classes), np.float32)
        for flip_y, flip_x in views:
            view = stack[::-1 if flip_y else 1, ::-1 if flip_x else 1]
            pred = segmentation.predict_tiled(np.ascontiguousarray(view), self.predict_batch, tile=tile,
                                              overlap=self.info.overlap, batch_size=batch_size,
                                              multiple=unet_multiple(self.info.depth))
            probs += pred[::-1 if flip_y else 1, ::-1 if flip_x else 1]
        return probs / len(views)

    def probabilities(self, image: np.ndarray, tile: int | None | str = "auto", batch_size: int = 4,
                      scale: float | str = "auto", flips: bool | None = None) -> np.ndarray:
        """Per-pixel probabilities (H, W, K) of any-sized ``image`` (H, W[, C]): :meth:`prepare` (zoom by ``scale``),
        :meth:`predict_stack` (tiles), resized back to (H, W).
        ``flips``: test-time augmentation, the mean over the image and its three flips (4 times the network's
        work; the default model on the DSB test split: F1 0.8972 -> 0.8973, SEG 0.7801 -> 0.7804); None: the
        ``flips`` given when this object was made."""
        from cellkit import segmentation

        prediction = self.predict_stack(self.prepare(image, scale), tile, batch_size, flips)
        return segmentation.resize_to(prediction, np.shape(image)[:2])

    def instances(self, probs: np.ndarray, **overrides: Any) -> np.ndarray:
        """Instance labels (H, W) int32 from probabilities, with the recorded post-processing (``overrides``
        replace single parameters)."""
        from cellkit import segmentation

        return segmentation.probs_to_instances(probs, **{**self.info.postprocess, **overrides})

    def segment(self, image: np.ndarray, tile: int | None | str = "auto", **overrides: Any
                ) -> tuple[np.ndarray, np.ndarray]:
        """(instance labels (H, W) int32, probabilities (H, W, K) float32) of one image of any size:
        :meth:`prepare`, :meth:`predict_stack`, :meth:`finish`."""
        return self.finish(image, self.predict_stack(self.prepare(image), tile), **overrides)

    def finish(self, image: np.ndarray, prediction: np.ndarray, **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) of ``image`` from its :meth:`predict_stack` output: the probabilities resized
        back to the image's (H, W), then :meth:`instances` (``overrides`` as there)."""
        from cellkit import segmentation

        probs = segmentation.resize_to(prediction, np.shape(image)[:2])
        return self.instances(probs, **overrides), probs

    def segment_many(self, images: Iterable[np.ndarray], tile: int | None | str = "auto"
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`segment` of each image in order, faster: the next image is prepared and the previous one's
        instances found on worker threads while the network works on the current one (:func:`overlapped`).
        The same results as :meth:`segment`; an error is raised when its image comes up."""
        steps = overlapped(images, self.prepare, lambda stack: self.predict_stack(stack, tile), self.finish)
        for _, outcome in steps:
            if isinstance(outcome, BaseException):
                raise outcome
            yield outcome


def overlapped(items: Iterable[Any], prepare: Callable[[Any], Any], run: Callable[[Any], Any],
               finish: Callable[[Any, Any], Any]) -> Iterator[tuple[Any, Any]]:
    """``(item, finish(item, run(prepare(item))))`` for each of ``items`` in order, or ``(item, exception)`` for an
    item where a step raised one (the others go on).

    ``prepare`` of the next item and ``finish`` of the previous one run on two worker threads while ``run`` (the
    network, which uses every core) works on the current item in the calling thread. The steps around the network
    run on one core; overlapping them keeps both cores of a 2-core CPU busier: the default model segmented all 459
    DSB images 1.1-1.4 times as fast this way as one step after the other (four alternating comparisons), with
    identical labels. At most three items are in flight.
    """
    end = object()
    with ThreadPoolExecutor(1) as before, ThreadPoolExecutor(1) as after:
        iterator = iter(items)
        current = next(iterator, end)
        prepared = before.submit(prepare, current) if current is not end else None
        previous: tuple[Any, Any] | None = None  # (item, future of its finish, or the exception raised)
        while current is not end:
            following = next(iterator, end)
            ahead = before.submit(prepare, following) if following is not end else None
            try:
                outcome: Any = after.submit(finish, current, run(prepared.result()))
            except Exception as error:  # noqa: BLE001 - handed to the caller with its item
                outcome = error
            if previous is not None:
                yield previous[0], _outcome(previous[1])
            previous, current, prepared = (current, outcome), following, ahead
        if previous is not None:
            yield previous[0], _outcome(previous[1])


def _outcome(outcome: Any) -> Any:
    """The result of a future, or the exception it raised; an exception stays as it is."""
    if isinstance(outcome, BaseException):
        return outcome
    try:
        return outcome.result()
    except Exception as error:  # noqa: BLE001
        return error


def _compute_precision(model: Any) -> str:
    """``bfloat16`` if any layer of ``model`` computes in it (Keras ``mixed_bfloat16``), else ``float32``."""
    return "bfloat16" if any(getattr(layer, "compute_dtype", "float32") == "bfloat16" for layer in model.layers) \
        else "float32"


def _build_in_precision(info: UNetInfo, precision: str, **architecture: Any) -> Any:
    """:meth:`UNetInfo.build` under the Keras dtype policy of ``precision``; the global policy is restored."""
    keras = _keras()
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32")
        return info.build(**architecture)
    finally:
        keras.config.set_dtype_policy(previous)


def unet_for_inference(model: Any, info: UNetInfo) -> Any:
    """A copy of the trained U-Net ``model`` for prediction only, in the same precision: each batch
    normalisation folded into the convolution before it (scale ``gamma / sqrt(var + eps)`` on the kernel, bias
    ``beta - mean * scale``) and dropout left out. The same function up to rounding (float32: within 1e-5); on
    a 2-core CPU the default model's network takes half the CPU time under ``mixed_bfloat16`` (a fifth less in
    float32), batch norm no longer making passes of its own over every activation. A model without batch norm
    is returned as it is."""
    if not info.batch_norm:
        return model
    folded = _build_in_precision(info, _compute_precision(model), dropout=0.0, batch_norm=False)
    for layer in folded.layers:
        if not layer.weights:
            continue
        trained = model.get_layer(layer.name)
        norm_name = layer.name.replace("_conv", "_bn")
        if norm_name == layer.name:  # transpose convolutions and the output: no batch norm after them
            layer.set_weights(trained.get_weights())
            continue
        norm = model.get_layer(norm_name)
        gamma, beta, mean, variance = (np.asarray(w, np.float64) for w in norm.get_weights())
        scale = gamma / np.sqrt(variance + norm.epsilon)
        (kernel,) = trained.get_weights()
        layer.set_weights([(kernel * scale).astype(np.float32), (beta - mean * scale).astype(np.float32)])
    return folded


def unet_in_precision(model: Any, info: UNetInfo, precision: str) -> Any:
    """A copy of ``model`` computing in ``precision`` (``float32`` or ``bfloat16``: Keras ``mixed_bfloat16``,
    float32 weights and output); the model itself if it already does. Weights are copied, nothing is retrained."""
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    if _compute_precision(model) == precision:
        return model
    copy = _build_in_precision(info, precision)
    copy.set_weights(model.get_weights())
    return copy


def save_unet(model: Any, info: UNetInfo, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a U-Net as a native float32 ``.keras`` file with ``info`` inside it (``cellkit.json``) and
    ``NAME.json`` beside it holding ``{"model_info": info, **extra}``. Returns the model path."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a model file must end in .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = unet_in_precision(model, info, "float32")
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(METADATA_ENTRY, json.dumps(info.to_dict(), indent=2, default=json_default))
    record = {"model_info": info.to_dict(), **(extra or {})}
    sidecar_path(path).write_text(json.dumps(record, indent=2, default=json_default) + "\n")
    return path


def read_unet_info(path: str | Path) -> UNetInfo:
    """The :class:`UNetInfo` inside a saved U-Net; a one-line DataError for a missing file, another file type,
    or a classifier."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file; train one with `cellkit train unet --out {path}`")
    if path.suffix != ".keras":
        raise DataError(f"{path}: expected a native Keras model file ending in .keras")
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_ENTRY not in archive.namelist():
                raise DataError(f"{path}: no cellkit metadata inside it; train it with `cellkit train unet`")
            data = json.loads(archive.read(METADATA_ENTRY))
    except zipfile.BadZipFile:
        raise DataError(f"{path}: not a .keras model file (not a zip archive)") from None
    try:
        return UNetInfo.from_dict(data)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def load_unet(path: str | Path, precision: str = "float32") -> TrainedUNet:
    """Load a U-Net saved by :func:`save_unet` (Keras safe mode on) with its metadata.

    ``precision``: ``float32``, ``bfloat16`` (mixed, where the CPU has bfloat16 instructions it is about twice
    as fast) or ``auto`` (bfloat16 when the CPU has them).
    """
    info = read_unet_info(path)
    keras = _keras()
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"{path}: cannot load the model ({first_line})") from None
    if int(model.output_shape[-1]) != info.n_classes or int(model.input_shape[-1]) != len(info.channels):
        raise DataError(f"{path}: the network ({model.input_shape[-1]} inputs, {model.output_shape[-1]} outputs) "
                        f"does not match its metadata ({len(info.channels)} channels, {info.n_classes} outputs)")
    if precision == "auto":
        from cellkit.training import cpu_has_bf16

        precision = "bfloat16" if cpu_has_bf16() else "float32"
    return TrainedUNet(unet_in_precision(model, info, precision), info)


# --- files in, label images out (``cellkit segment`` and ``cellkit evaluate segmentation``) --------------


def write_labels(labels: np.ndarray, path: str | Path) -> Path:
    """Write an instance image as a 16-bit PNG (ids 0..65535); a DataError beyond 65,535 objects."""
    import cv2

    labels = np.asarray(labels)
    if labels.size and int(labels.max()) > np.iinfo(np.uint16).max:
        raise DataError(f"{path}: {int(labels.max())} objects do not fit a 16-bit label PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), labels.astype(np.uint16)):
        raise DataError(f"{path}: could not write the label image")
    return path


def _overlay_png(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    from PIL import Image

    from cellkit import plots
    from cellkit.datasets import to_grey

    rgb = plots.overlay_instances(to_grey(image) if image.ndim == 3 else image, labels)
    Image.fromarray(np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)


def segment_files(trained: TrainedUNet, files: Sequence[Path], out_dir: str | Path, root: Path | None = None,
                  overlay: bool = False, tile: int | None | str = "auto", progress: bool = True,
                  on_error: Callable[[Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Segment each file and write ``<out_dir>/<stem>.png`` (uint16 instance ids; 0 is background), with
    ``<stem>_overlay.png`` when ``overlay``. Files found under folder ``root`` keep their subfolders in
    ``out_dir``, so that equal stems in different subfolders do not collide.

    Returns one row per segmented file: ``file``, ``labels`` (the written path), ``n_nuclei``, ``mean_area_px``
    (0 when none), ``height``, ``width``. A file that cannot be read or segmented is skipped and reported to
    ``on_error(path, message)``. Reading and preparing the next file, and finding and writing the previous one's
    nuclei, run on worker threads while the network works (:func:`overlapped`).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="segmenting", unit="image", file=sys.stderr, dynamic_ncols=True)

    def read_and_prepare(path: Path) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(path)
        return image, trained.prepare(image)

    def predict(prepared: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        image, stack = prepared
        return image, trained.predict_stack(stack, tile)

    def write(path: Path, predicted: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        image, prediction = predicted
        labels, _ = trained.finish(image, prediction)
        relative = path.relative_to(root).parent if root is not None else Path()
        target = write_labels(labels, out_dir / relative / f"{path.stem}.png")
        if overlay:
            _overlay_png(image, labels, target.with_name(f"{path.stem}_overlay.png"))
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        return {"file": str(path), "labels": str(target), "n_nuclei": int(areas.size),
                "mean_area_px": round(float(areas.mean()), 1) if areas.size else 0.0,
                "height": int(labels.shape[0]), "width": int(labels.shape[1])}

    expected = (DataError, ValueError, OSError, MemoryError, Image.DecompressionBombError)
    try:
        for path, outcome in overlapped(files, read_and_prepare, predict, write):
            if isinstance(outcome, expected):
                if on_error is not None:
                    message = str(outcome).strip().splitlines()[0] if str(outcome).strip() else type(outcome).__name__
                    on_error(path, message)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                rows.append(outcome)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows


def read_label_folder(path: str | Path, what: str = "labels") -> dict[str, np.ndarray]:
    """Instance label images of folder ``path`` by file stem (``labels/`` or ``masks/`` inside it is used when
    present, e.g. a dataset folder). Each must be a single-channel integer image (0 background, one id per
    object) in a lossless format; a one-line DataError names the first file that is not."""
    from scipy import ndimage

    from cellkit.datasets.loaders import IMAGE_SUFFIXES

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


def evaluate_label_folders(pred_dir: str | Path, gt_dir: str | Path,
                           on_warning: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Score predicted instance images against reference ones, matched by file stem.

    Returns (JSON-ready) ``n_images``, ``precision``, ``recall``, ``f1``, ``ap``, ``pq``, ``mean_iou`` at IoU 0.5
    (:func:`cellkit.metrics.match_dataset`), ``seg`` (:func:`cellkit.metrics.seg_dataset`), ``iou_sweep`` (the
    same scores at IoU 0.5 ... 0.9), ``pixel`` and ``object`` (report 003's pixel- and object-level scores) and
    ``per_image``. Stems present on one side only are left out and reported through ``on_warning``; none in
    common, or a size mismatch, is a one-line DataError.
    """
    preds, gts = read_label_folder(pred_dir, "predicted labels"), read_label_folder(gt_dir, "reference labels")
    common = sorted(set(preds) & set(gts))
    if not common:
        raise DataError(f"no file stem is both in {pred_dir} and in {gt_dir}; name predictions like the reference "
                        f"files (e.g. {next(iter(gts))}.png)")
    for side, names, other in (("prediction", preds, gts), ("reference", gts, preds)):
        lonely = sorted(set(names) - set(other))
        if lonely and on_warning is not None:
            on_warning(f"{len(lonely)} {side} file(s) without a counterpart left out, e.g. {lonely[0]!r}")
    for stem in common:
        if preds[stem].shape != gts[stem].shape:
            raise DataError(f"{stem}: the prediction is {preds[stem].shape} but the reference is "
                            f"{gts[stem].shape}; they must have the same size")
    p, g = [preds[s] for s in common], [gts[s] for s in common]
    return segmentation_scores(p, g, ids=common)


def segmentation_scores(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                        ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Every segmentation score of label images ``preds`` against ``gts`` (pooled over images), JSON-ready:
    the matching scores at IoU 0.5 at the top level, ``seg``, ``iou_sweep``, ``pixel``, ``object`` and
    ``per_image`` (id, n_gt, n_pred, f1 and seg of each image)."""
    from cellkit import metrics

    matched = metrics.match_dataset(preds, gts)
    seg = metrics.seg_dataset(preds, gts)
    at50 = matched["by_threshold"][0.5]
    ids = list(ids) if ids is not None else [str(i) for i in range(len(preds))]
    per_image = []
    for name, pred, gt, image_seg in zip(ids, preds, gts, seg["per_image"], strict=True):
        one = metrics.match_instances(pred, gt, 0.5)
        per_image.append({"id": name, "n_gt": one["n_gt"], "n_pred": one["n_pred"], "f1": one["f1"],
                          "ap": one["ap"], "seg": image_seg})
    return {
        "n_images": len(preds),
        **{k: at50[k] for k in ("precision", "recall", "f1", "ap", "pq", "mean_iou", "tp", "fp", "fn", "n_gt",
                                "n_pred")},
        "seg": seg["seg"],
        "n_reference": seg["n_reference"],
        "iou_sweep": [{k: row[k] for k in ("thresh", "precision", "recall", "f1", "ap", "pq")}
                      for row in matched["table"]],
        "pixel": {k: v for k, v in metrics.pixel_metrics_dataset(preds, gts).items()},
        "object": {k: v for k, v in metrics.object_metrics_dataset(preds, gts).items()},
        "per_image": per_image,
    }
