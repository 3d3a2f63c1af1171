"""Classifiers: report 001's LeNets and AlexNet, this repository's small CNN, report 000's basic CNN, ResNet-18,
ResNet-50 and a small ViT; one registry; a trained classifier with its metadata, saved and loaded.

Every classifier is registered in :data:`REGISTRY` under a command-line name with a builder
``builder(input_shape, n_classes) -> keras.Model``, its default input size, the pixel scaling it expects
(:data:`PREPROCESSING`) and its default training recipe. To add one::

    from cellkit import classifiers

    def build_mine(input_shape, n_classes):
        ...  # a keras.Model taking preprocessed images of input_shape, softmax over n_classes
        return model

    classifiers.register(classifiers.ModelSpec("mine", build_mine, input_size=28, preprocessing="pm1",
                                               min_size=16, description="my network"))

Builders take images already scaled (the model has no rescaling layer); :func:`preprocess` does the
scaling with :mod:`cellkit.transforms`, and :func:`prepare_images` brings images of any size and mode to
what a model expects (RGB uint8, centre crop, bicubic resize), as the training data were made.

A trained model (:class:`TrainedModel`) is saved as a native ``.keras`` file with :class:`ModelInfo` inside
the archive (class names, input size, scaling, crop rule and test-time augmentation; see :mod:`cellkit.saving`);
:func:`load` reads both back with Keras' safe mode on. Training is :func:`cellkit.training.train_classifier`.

Keras is imported on first use, so that ``import cellkit.classifiers`` (e.g. to list the model names, or to
reject an unknown one) stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellkit import runtime, saving, transforms
from cellkit.datasets import DataError, centre_crop_resize, to_rgb

if TYPE_CHECKING:  # pragma: no cover
    import keras

#: Version of the metadata layout; bumped when a field changes meaning.
METADATA_VERSION = 1

#: Pixel scalings by name: uint8 (n, h, w, 3) -> float32. Report 001 feeds its CNNs [-1, 1].
#: ``zscore`` is report 000's per-image normalisation, ``raw`` its unnormalised input (0..255 as float32),
#: ``caffe`` what VGG16's ImageNet weights expect (notebook 06).
PREPROCESSING: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "pm1": transforms.scale_pm1,
    "01": transforms.scale_01,
    "zscore": transforms.zscore_each,
    "raw": transforms.scale_raw,
    "caffe": transforms.scale_caffe,
}


# --------------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------------


def build_lenet_original(input_shape: Sequence[int], n_classes: int) -> keras.Model:
    """The original LeNet as report 001 built it: tanh, 5x5 valid convolutions with 6 and 16 filters, 2x2
    max-pooling, dense 120 and 84 (tanh), softmax. Layer names are the report's (C1, S2, C3, S4, C5, F6)."""
    keras = runtime.keras_module()
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
    keras = runtime.keras_module()
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
    keras = runtime.keras_module()
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
    keras = runtime.keras_module()
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
    keras = runtime.keras_module()
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
    layers = runtime.keras_module().layers
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


#: ResNet-18 for small images (notebook 05): a quarter of the filters (16-32-64-128), as the CIFAR ResNets of
#: He et al. (2016, section 4.2) start from 16 filters; with the small stem it costs 1/14 of the full widths' time.
RESNET18_SMALL_WIDTHS = (16, 32, 64, 128)


def build_resnet18(input_shape: Sequence[int], n_classes: int, widths: Sequence[int] = RESNET18_WIDTHS,
                   dropout: float = 0.2, stem: str = "imagenet") -> keras.Model:
    """ResNet-18 (Keras has none): a stem, four stages of two basic blocks ([2, 2, 2, 2]; ``widths`` filters,
    64-128-256-512 by default, stride 2 from the second stage on), global average pooling, dropout, softmax:
    17 convolutions + 1 dense layer, 11.2 M parameters with the default widths.

    ``stem="imagenet"``: 7x7 convolution with stride 2, batch norm, ReLU, 3x3 max-pool with stride 2; on 28x28
    inputs the maps are 7x7 after the stem and 1x1 in the last stage (as torchvision's ResNet-18, which report
    000 used, does on small images). ``stem="small"`` (for small images, as CIFAR ResNets): one 3x3 convolution
    with stride 1, batch norm, ReLU and no max-pool, so 28x28 inputs keep 28x28 maps in the first stage and 4x4
    in the last. Batch norm momentum 0.9 (see :func:`build_cellnet`)."""
    if stem not in ("imagenet", "small"):
        raise ValueError(f"stem must be imagenet or small, got {stem!r}")
    keras = runtime.keras_module()
    layers = keras.layers
    inputs = keras.Input(tuple(input_shape))
    if stem == "small":
        x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    else:
        x = layers.Conv2D(widths[0], 7, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.Activation("relu", name="stem_relu")(x)
    if stem == "imagenet":
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
    keras = runtime.keras_module()
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
    keras = runtime.keras_module()

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
    keras = runtime.keras_module()
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
#: The recipe of the small CNN, chosen on the validation split (see notebook 04 and docs/classifier_recipe.md).
CELLNET_FIT = {"optimizer": "adamw", "learning_rate": 3e-3, "schedule": "cosine", "weight_decay": 5e-4,
               "label_smoothing": 0.1, "augment": "dihedral_shift", "epochs": 8, "patience": 10,
               "batch_size": 128, "tta": "auto"}  # fmt: skip
#: The validation accuracy the default classifier should reach within 2 minutes of training on 2 CPU cores
#: (``cellkit train classifier`` and notebook 04 report when it first did).
CELLNET_VAL_ACCURACY_TARGET = 0.98


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
    ModelSpec("resnet18-small", partial(build_resnet18, widths=RESNET18_SMALL_WIDTHS, stem="small"), 28, "pm1",
              min_size=8, description="ResNet-18 for small images: 3x3 stride-1 stem without max-pool, basic blocks "
              "[2, 2, 2, 2], 16-128 filters, 0.7 M parameters", source="He et al. 2016; report 000", fit=REPORT_FIT),
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
# Trained classifiers: metadata, prediction, save, load
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
        p = outputs_of(model, transforms.dihedral_view(images, k, flip), preprocessing, batch_size)
        total = p if total is None else total + p
    return (total / len(TTA_VIEWS[tta])).astype(np.float32)


def outputs_of(model: Any, images: np.ndarray, preprocessing: str | None, batch_size: int = 32) -> np.ndarray:
    """``model``'s float32 outputs for uint8 ``images`` (scaled with ``preprocessing``, :data:`PREPROCESSING`) or
    for float arrays (``preprocessing=None``), batch by batch, so that only one batch is scaled at a time; no
    progress bar and none of ``model.predict``'s per-call overhead. NaN or infinite outputs are a one-line
    DataError (:func:`cellkit.runtime.finite_outputs`)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        x = preprocess(x, preprocessing) if preprocessing else x
        out.append(runtime.finite_outputs(model(x, training=False)))
    return np.concatenate(out) if out else np.zeros((0, *model.output_shape[1:]), np.float32)




def float32_copy(model: Any, name: str, n_classes: int) -> Any:
    """A float32 copy of a (possibly mixed-precision) model of registered architecture ``name``.

    Saved models are always float32, so they run everywhere at full speed and precision whatever the
    training machine supported. Weights are float32 variables under mixed precision too; they are copied.
    """
    with runtime.dtype_policy("float32"):
        copy = build(name, n_classes, int(model.input_shape[1]), int(model.input_shape[-1]))
    copy.set_weights(model.get_weights())
    return copy


def save(model: Any, info: ModelInfo, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as a native ``.keras`` file with ``info`` inside it, and ``NAME.json`` beside it
    (:func:`cellkit.saving.save_model`). The JSON holds ``{"model_info": info, **extra}`` (``extra``: metrics,
    history, timings ...). A mixed-precision model is saved as its float32 copy. Returns the model path.
    """
    if runtime.compute_precision(model) != "float32":
        model = float32_copy(model, info.model, len(info.class_names))
    return saving.save_model(model, info.to_dict(), path, extra)


def read_info(path: str | Path) -> ModelInfo:
    """The :class:`ModelInfo` of a saved model: from inside the archive, else from the JSON beside it."""
    path = Path(path)
    data = saving.read_metadata(path)
    if data is not None and data.get("kind") == saving.UNET_KIND:
        raise DataError(f"{path}: a U-Net for segmentation, not a classifier; use `cellkit segment`")
    if data is None:
        record = saving.read_record(path)
        data = record.get("model_info", record) or None
    if data is None:
        raise DataError(f"{path}: no cellkit metadata inside it and no {saving.sidecar_path(path).name} beside it; "
                        "train it with `cellkit train classifier` or save it with cellkit.classifiers.save")
    try:
        return ModelInfo.from_dict(data)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def load(path: str | Path) -> TrainedModel:
    """Load a model saved by :func:`save` (Keras safe mode on) with its metadata."""
    path = saving.check_model_file(path, "cellkit train classifier")
    info = read_info(path)
    vit_layers()  # registers the ViT's custom layer for deserialisation
    model = saving.load_network(path)
    if int(model.output_shape[-1]) != len(info.class_names):
        raise DataError(f"{path}: the model has {model.output_shape[-1]} outputs but its metadata names "
                        f"{len(info.class_names)} classes")
    return TrainedModel(model, info)
