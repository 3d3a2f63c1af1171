"""A trained U-Net: any image in, instance labels out; saved with its configuration and loaded back.

>>> unet = load_unet("models/unet.keras")
>>> labels, probs = unet.segment(image)                 # (H, W) int32 ids, (H, W, K) float32 probabilities
>>> for labels, probs in unet.segment_many(images):     # faster on many images: the steps around the network
...     ...                                             # run on worker threads while it works
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import runtime, saving, segmentation
from cellkit.datasets import DataError
from cellkit.unet.config import UNetConfig, unet_multiple
from cellkit.unet.network import unet_for_inference, unet_in_precision


class TrainedUNet:
    """A trained U-Net with its :class:`~cellkit.unet.UNetConfig`: any image in, instance labels out.

    >>> unet = load_unet("models/unet.keras")
    >>> labels, probs = unet.segment(image)      # (H, W) int32 ids, (H, W, K) float32 probabilities
    """

    def __init__(self, model: Any, config: UNetConfig, eager: bool = False, flips: bool = False) -> None:
        self.model, self.config, self.eager, self.flips = model, config, eager, flips
        self._network: Any = None

    @property
    def network(self) -> Any:
        """What predicts: :attr:`model` with its batch norm folded into the convolutions
        (:func:`unet_for_inference`), made on first use. ``model`` stays as trained, for saving."""
        if self._network is None:
            self._network = unet_for_inference(self.model, self.config)
        return self._network

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Network output (B, h, w, K) float32 for input stacks (B, h, w, C), h and w multiples of 2 ** depth.

        Runs a traced graph (``predict_on_batch``; tracing costs a second or two per new input shape, then each
        call is fast), or, with ``eager``, the layers one by one (no tracing; for a few predictions only). NaN or
        infinite outputs (damaged weights) are a one-line DataError.
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.eager:
            return runtime.finite_outputs(self.network(batch, training=False))
        return runtime.finite_outputs(self.network.predict_on_batch(batch))

    def stack(self, image: np.ndarray) -> np.ndarray:
        """The network input of ``image`` (H, W) or (H, W, C), any dtype: normalised channels (H, W, C)."""
        return segmentation.input_stack(image, self.config.channels, self.config.normalise,
                                        self.config.canny_thresholds)

    def scale(self, image: np.ndarray) -> float:
        """The zoom applied to ``image`` before the network: nuclei to the recorded ``nucleus_diameter`` (their
        diameter estimated without a network, :func:`cellkit.segmentation.estimate_diameter`), 1.0 without one."""
        if self.config.nucleus_diameter is None:
            return 1.0
        return segmentation.scale_factor(segmentation.estimate_diameter(image), self.config.nucleus_diameter)

    def prepare(self, image: np.ndarray, scale: float | str = "auto") -> np.ndarray:
        """The network input (h, w, C) of ``image`` (H, W[, C]): zoomed by ``scale`` (``auto``: :meth:`scale`), then
        :meth:`stack`."""
        factor = self.scale(image) if scale == "auto" else float(scale)
        return self.stack(segmentation.zoom(image, factor))

    def predict_stack(self, stack: np.ndarray, tile: int | None | str = "auto", batch_size: int = 4,
                      flips: bool | None = None) -> np.ndarray:
        """Network output (h, w, K) of a prepared input (h, w, C) (:meth:`prepare`), at its resolution, tiled with
        overlap as recorded (``tile`` overrides it; None predicts it in one piece, up to
        :data:`cellkit.segmentation.MAX_UNTILED_PIXELS`). ``flips``: see :meth:`probabilities`."""
        tile = self.config.tile if tile == "auto" else tile
        flips = self.flips if flips is None else flips
        views = [(False, False), (True, False), (False, True), (True, True)] if flips else [(False, False)]
        probs = np.zeros((*stack.shape[:2], self.config.n_classes), np.float32)
        for flip_y, flip_x in views:
            view = stack[::-1 if flip_y else 1, ::-1 if flip_x else 1]
            pred = segmentation.predict_tiled(np.ascontiguousarray(view), self.predict_batch, tile=tile,
                                              overlap=self.config.overlap, batch_size=batch_size,
                                              multiple=unet_multiple(self.config.depth))
            probs += pred[::-1 if flip_y else 1, ::-1 if flip_x else 1]
        return probs / len(views)

    def probabilities(self, image: np.ndarray, tile: int | None | str = "auto", batch_size: int = 4,
                      scale: float | str = "auto", flips: bool | None = None) -> np.ndarray:
        """Per-pixel probabilities (H, W, K) of any-sized ``image`` (H, W[, C]): :meth:`prepare` (zoom by ``scale``),
        :meth:`predict_stack` (tiles), resized back to (H, W).
        ``flips``: test-time augmentation, the mean over the image and its three flips (4 times the network's
        work; the default model on the DSB test split: F1 0.8972 -> 0.8973, SEG 0.7801 -> 0.7804); None: the
        ``flips`` given when this object was made."""
        prediction = self.predict_stack(self.prepare(image, scale), tile, batch_size, flips)
        return segmentation.resize_to(prediction, np.shape(image)[:2])

    def instances(self, probs: np.ndarray, **overrides: Any) -> np.ndarray:
        """Instance labels (H, W) int32 from probabilities, with the recorded post-processing (``overrides``
        replace single parameters)."""
        return segmentation.probs_to_instances(probs, **{**self.config.postprocess, **overrides})

    def segment(self, image: np.ndarray, tile: int | None | str = "auto", **overrides: Any
                ) -> tuple[np.ndarray, np.ndarray]:
        """(instance labels (H, W) int32, probabilities (H, W, K) float32) of one image of any size:
        :meth:`prepare`, :meth:`predict_stack`, :meth:`finish`."""
        return self.finish(image, self.predict_stack(self.prepare(image), tile), **overrides)

    def finish(self, image: np.ndarray, prediction: np.ndarray, **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) of ``image`` from its :meth:`predict_stack` output: the probabilities resized
        back to the image's (H, W), then :meth:`instances` (``overrides`` as there)."""
        probs = segmentation.resize_to(prediction, np.shape(image)[:2])
        return self.instances(probs, **overrides), probs

    def segment_many(self, images: Iterable[np.ndarray], tile: int | None | str = "auto"
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`segment` of each image in order, faster: the next image is prepared and the previous one's
        instances found on worker threads while the network works on the current one
        (:func:`cellkit.runtime.overlapped`).
        The same results as :meth:`segment`; an error is raised when its image comes up."""
        steps = runtime.overlapped(images, self.prepare, lambda stack: self.predict_stack(stack, tile), self.finish)
        for _, outcome in steps:
            if isinstance(outcome, BaseException):
                raise outcome
            yield outcome


def save_unet(model: Any, config: UNetConfig, path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Save a U-Net as a native float32 ``.keras`` file with ``config`` inside it and ``NAME.json`` beside it holding
    ``{"model_info": config, **record}`` (:func:`cellkit.saving.save_model`). Returns the model path."""
    return saving.save_model(unet_in_precision(model, config, "float32"), config.to_metadata(), path, record)


def read_unet_config(path: str | Path) -> UNetConfig:
    """The :class:`~cellkit.unet.UNetConfig` inside a saved U-Net (:meth:`UNetConfig.from_metadata`, with the record
    beside an older model); a one-line DataError for a missing file, another file type, or a classifier."""
    path = saving.check_model_file(path, "cellkit train unet")
    data = saving.read_metadata(path)
    if data is None:
        raise DataError(f"{path}: no cellkit metadata inside it; train it with `cellkit train unet`")
    try:
        return UNetConfig.from_metadata(data, saving.read_record(path))
    except DataError as error:
        raise DataError(f"{path}: {error}") from None


def load_unet(path: str | Path, precision: str = "float32") -> TrainedUNet:
    """Load a U-Net saved by :func:`save_unet` (Keras safe mode on) with its configuration.

    ``precision``: ``float32``, ``bfloat16`` (mixed, where the CPU has bfloat16 instructions it is about twice
    as fast) or ``auto`` (bfloat16 when the CPU has them).
    """
    config = read_unet_config(path)
    model = saving.load_network(path)
    if int(model.output_shape[-1]) != config.n_classes or int(model.input_shape[-1]) != len(config.channels):
        raise DataError(f"{path}: the network ({model.input_shape[-1]} inputs, {model.output_shape[-1]} outputs) "
                        f"does not match its metadata ({len(config.channels)} channels, {config.n_classes} outputs)")
    return TrainedUNet(unet_in_precision(model, config, runtime.resolve_precision(precision)), config)
