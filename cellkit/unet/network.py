"""The U-Net network: report 003's architecture with a width parameter, its two losses, and copies of a trained
network for prediction (batch norm folded into the convolutions) and in another precision.

>>> model = build_unet(input_channels=3, n_classes=3, base_filters=16)     # uncompiled, any (H, W) multiple of 16
>>> fast = unet_for_inference(model, config)                               # the same function, about twice as fast
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cellkit import runtime
from cellkit.unet.config import UNetConfig

if TYPE_CHECKING:  # pragma: no cover
    import keras


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
    keras = runtime.keras_module()
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
    keras = runtime.keras_module()
    return keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=alpha, gamma=gamma,
                                                name="binary_focal")


def weighted_categorical_crossentropy(class_weights: Sequence[float] = (1.0, 1.0, 5.0)):
    """Report 002's loss: cross-entropy with a weight per class, ``-sum_c w_c y_c log p_c`` per pixel, averaged
    over pixels. ``class_weights`` in class order (background, cell, edge); the rare edge class weighs more.

    ``y_true`` is one-hot (B, H, W, K), ``y_pred`` softmax probabilities of the same shape.
    """
    keras = runtime.keras_module()
    ops = keras.ops
    weights = np.asarray(class_weights, dtype=np.float32)
    eps = 1e-7

    def weighted_categorical_crossentropy(y_true, y_pred):
        y_pred = ops.clip(ops.cast(y_pred, "float32"), eps, 1.0 - eps)
        return -ops.sum(ops.cast(y_true, "float32") * ops.log(y_pred) * weights, axis=-1)

    return weighted_categorical_crossentropy


def build_from_config(config: UNetConfig, precision: str = "float32", **architecture: Any) -> keras.Model:
    """A fresh (untrained) network of ``config``'s architecture computing in ``precision`` (``float32`` or
    ``bfloat16``: Keras ``mixed_bfloat16``); ``architecture`` (``dropout``, ``batch_norm``, ``name``) overrides the
    configured values. Keras' global dtype policy is left as it was."""
    settings = {"dropout": config.dropout, "batch_norm": config.batch_norm, **architecture}
    with runtime.dtype_policy(precision):
        return build_unet(len(config.channels), config.n_classes, config.base_filters, config.depth, **settings)


def unet_for_inference(model: Any, config: UNetConfig) -> Any:
    """A copy of the trained U-Net ``model`` for prediction only, in the same precision: each batch
    normalisation folded into the convolution before it (scale ``gamma / sqrt(var + eps)`` on the kernel, bias
    ``beta - mean * scale``) and dropout left out. The same function up to rounding (float32: within 1e-5); on
    a 2-core CPU the default model's network takes half the CPU time under ``mixed_bfloat16`` (a fifth less in
    float32), batch norm no longer making passes of its own over every activation. A model without batch norm
    is returned as it is."""
    if not config.batch_norm:
        return model
    folded = build_from_config(config, runtime.compute_precision(model), dropout=0.0, batch_norm=False)
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


def unet_in_precision(model: Any, config: UNetConfig, precision: str) -> Any:
    """A copy of ``model`` computing in ``precision`` (``float32`` or ``bfloat16``: Keras ``mixed_bfloat16``,
    float32 weights and output); the model itself if it already does. Weights are copied, nothing is retrained."""
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be float32 or bfloat16, got {precision!r}")
    if runtime.compute_precision(model) == precision:
        return model
    copy = build_from_config(config, precision)
    copy.set_weights(model.get_weights())
    return copy
