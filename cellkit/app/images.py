"""Classify and segment one image, as the Classify and Segment tabs show it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellkit import plots, transforms
from cellkit.datasets import to_grey

#: The Segment tab draws its overlay at most this many pixels on a side (it is shown ~420 px high): a full-size
#: float overlay of a 16 Mpx image would hold 384 MB and take seconds to draw.
OVERLAY_MAX_SIDE = 1024

def _normalise(image: np.ndarray) -> np.ndarray:
    """Report 000's per-image normalisation (z-score), brought back to 0..255 by its own minimum and maximum."""
    z = transforms.zscore(transforms.as_float(image))
    span = float(z.max() - z.min())
    return transforms.as_uint8((z - z.min()) / span if span > 0 else np.zeros_like(z))


#: Input transformations of report 000 with its parameters, applied to the model's input (uint8 RGB at the
#: model's size) as the report applied them to its 50x50 inputs.
INPUT_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda image: image,
    "normalisation": _normalise,
    "Gaussian blur 25x25": transforms.gaussian_blur,
    "Canny 10/200": transforms.canny,
    "Sobel": transforms.sobel,
}


@dataclass
class Classification:
    """What the Classify tab shows: the prepared and transformed model input, and the probabilities."""

    prepared: np.ndarray
    transformed: np.ndarray
    probabilities: dict[str, float]
    seconds: float
    transform: str = "none"

    @property
    def best(self) -> tuple[str, float]:
        name = max(self.probabilities, key=self.probabilities.get)
        return name, self.probabilities[name]


def classify_image(trained: Any, image: np.ndarray, transform: str = "none") -> Classification:
    """Prepare ``image`` as the model's training images were made (:meth:`TrainedModel.prepare`), apply the
    input transformation ``transform`` (:data:`INPUT_TRANSFORMS`), and predict class probabilities."""
    if transform not in INPUT_TRANSFORMS:
        raise ValueError(f"unknown transformation {transform!r}; use {', '.join(INPUT_TRANSFORMS)}")
    started = time.perf_counter()
    prepared = trained.prepare([image])[0]
    transformed = trained.prepare([INPUT_TRANSFORMS[transform](prepared)])[0]  # Canny is grey: back to RGB
    proba = trained.predict_proba(transformed[None])[0]
    probabilities = {name: float(p) for name, p in zip(trained.class_names, proba, strict=True)}
    return Classification(prepared, transformed, probabilities, time.perf_counter() - started, transform)


@dataclass
class Segmentation:
    """What the Segment tab shows: instance labels (H, W) int32, the overlay (H, W, 3) float in [0, 1], and
    the area of each nucleus in pixels."""

    labels: np.ndarray
    overlay: np.ndarray
    areas: np.ndarray
    seconds: float

    @property
    def count(self) -> int:
        return int(self.areas.size)


def segment_image(unet: Any, image: np.ndarray) -> Segmentation:
    """Segment ``image`` with a loaded U-Net (tiled as recorded; the labels `cellkit segment` writes with the same
    model) and measure each nucleus; the overlay is drawn at display size (:func:`display_overlay`)."""
    started = time.perf_counter()
    labels, _ = unet.segment(image)
    areas = np.bincount(labels.ravel())[1:]
    grey = to_grey(image) if image.ndim == 3 else image
    return Segmentation(labels, display_overlay(grey, labels), areas[areas > 0], time.perf_counter() - started)


def display_overlay(grey: np.ndarray, labels: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """The outlined nuclei over ``grey`` (:func:`cellkit.plots.overlay_instances`), every n-th pixel of a large image
    so that the longer side is at most ``max_side``; a smaller image is drawn whole."""
    step = max(1, -(-max(labels.shape) // max_side))
    return plots.overlay_instances(grey[::step, ::step], labels[::step, ::step]).astype(np.float32)
