"""Image transformations of the source reports, as pure functions on numpy arrays.

Normalisation (reports 000, 001), contrast (003, 004), thresholds and morphology (003, 004), filters (000, 002),
and augmentation (000, 002, 003, 004; one module: :class:`Augmentation` recipes for images with their masks, and
:func:`augment_batch` for training batches), with the reports' parameters as defaults. The U-Net's input stack
(report 002: original, inverse, Canny) is :func:`cellkit.segmentation.input_stack`. Nothing here imports Keras or
TensorFlow: a U-Net or a ``tf.data`` pipeline calls these functions on numpy arrays.

Conventions
-----------
- An *image* is ``(H, W)`` grey or ``(H, W, C)`` channels-last, ``uint8`` (0..255) or floating point
  (``float32``, nominally in [0, 1]). ``bool`` and ``uint16`` are accepted where noted.
- Unless a docstring says otherwise, the output has the input's shape and dtype convention: ``uint8`` in, ``uint8``
  out; float in, ``float32`` out on the same scale. Functions that need 8 bits internally (OpenCV's histogram
  equalisation, CLAHE, Canny) convert a float image with :func:`as_uint8` and back.
- A *mask* is ``(H, W)``, ``bool`` or an integer instance image (0 background, 1..N one id per object).
  Geometric transforms move masks with nearest-neighbour interpolation, so ids are kept, never blended.
- Coordinates are pixels, ``x`` = column and ``y`` = row, pixel centres at integers. Angles are in degrees; a
  positive rotation turns the image counter-clockwise as displayed.
- Randomness comes only from a ``numpy.random.Generator`` argument: the same generator state gives the same
  output, and functions draw a fixed number of values so that streams stay in step.
- Intensity thresholds (Canny's 10 and 200, Otsu's bounds) are on the 0..255 scale, as the reports state them.

>>> rng = np.random.default_rng(0)
>>> edges = canny(image)                                          # report 000's thresholds, 10 and 200
>>> image2, mask2 = augment_pair(image, labels, rng, RECIPES["report002"])
>>> batch = augment_batch(images, rng, "dihedral_shift")          # a classifier's training batch
>>> table = timing_table(catalogue(), {"28x28": small, "256x256": large})   # ms per image
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd

from cellkit.features import cell_masks

__all__ = [
    "AUGMENTATIONS",
    "CANNY_THRESHOLDS",
    "RECIPES",
    "Augmentation",
    "adaptive_equalize",
    "add_gaussian_noise",
    "affine_transform",
    "as_float",
    "as_uint8",
    "augment",
    "augment_batch",
    "augment_pair",
    "dihedral_view",
    "boundary_mask",
    "canny",
    "catalogue",
    "cell_mask_input",
    "check_alignment",
    "clahe",
    "contrast_to_noise",
    "contrast_stretch",
    "equalize",
    "erode",
    "flip",
    "foreground_iou",
    "gaussian_blur",
    "invert",
    "local_otsu_mask",
    "local_otsu_threshold",
    "otsu_mask",
    "otsu_threshold",
    "random_crop",
    "rotate",
    "scale_01",
    "scale_caffe",
    "scale_pm1",
    "scale_raw",
    "sobel",
    "stretch_crop",
    "time_per_image",
    "timing_table",
    "zscore",
    "zscore_each",
]

_FILLS = {
    "reflect": cv2.BORDER_REFLECT,  # d c b a | a b c d | d c b a  (Keras' and scipy's "reflect")
    "constant": cv2.BORDER_CONSTANT,
    "nearest": cv2.BORDER_REPLICATE,
    "wrap": cv2.BORDER_WRAP,
}


# --- dtypes -------------------------------------------------------------------------------------------------


def as_float(image: np.ndarray) -> np.ndarray:
    """``image`` as ``float32`` on the [0, 1] scale: uint8 / 255, uint16 / 65535, bool as 0/1; floats unchanged.

    Float input is only cast to ``float32``, not rescaled (it is assumed to be on the [0, 1] scale already).
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535)
    if image.dtype == bool:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise TypeError(f"expected a uint8, uint16, bool or float image, got {image.dtype}")


def as_uint8(image: np.ndarray) -> np.ndarray:
    """``image`` as ``uint8`` 0..255: floats on [0, 1] are clipped, scaled and rounded; uint16 drops 8 bits."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    if image.dtype == bool:
        return image.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(image.dtype, np.floating):
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise TypeError(f"expected a uint8, uint16, bool or float image, got {image.dtype}")


def _like(result8: np.ndarray, template: np.ndarray) -> np.ndarray:
    """A uint8 result back in ``template``'s convention: uint8 stays, anything else becomes float32 on [0, 1]."""
    return result8 if template.dtype == np.uint8 else result8.astype(np.float32) / np.float32(255)


def _grey(image: np.ndarray) -> np.ndarray:
    """A 2-D image: grey unchanged, one channel squeezed, colour averaged over channels (same dtype)."""
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[-1] == 1:
        return image[..., 0]
    if image.ndim == 3:
        mean = image.mean(axis=-1, dtype=np.float32)
        return np.rint(mean).astype(image.dtype) if image.dtype == np.uint8 else mean
    raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")


def _per_channel(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
    """Apply a 2-D function to each channel of an (H, W, C) image, or to a 2-D image directly."""
    if image.ndim == 2:
        return fn(image)
    return np.stack([fn(np.ascontiguousarray(image[..., c])) for c in range(image.shape[-1])], axis=-1)


# --- normalisation (reports 000, 001) -------------------------------------------------------------------------


def scale_01(image: np.ndarray) -> np.ndarray:
    """Fixed scaling to [0, 1] (``float32``): uint8 / 255. The same mapping for every image, so it keeps
    brightness differences between images (unlike :func:`zscore`)."""
    return as_float(image)


def scale_pm1(image: np.ndarray) -> np.ndarray:
    """Fixed scaling to [-1, 1] (``float32``): ``2 * x / 255 - 1`` for uint8, as report 001 fed its CNNs."""
    return as_float(image) * np.float32(2) - np.float32(1)


def zscore(image: np.ndarray, per_channel: bool = False, eps: float = 1e-6) -> np.ndarray:
    """Per-image standardisation (report 000): subtract the image's mean, divide by its standard deviation.

    Returns ``float32`` with mean 0 and standard deviation 1 (over all pixels, or over each channel when
    ``per_channel``); a constant image becomes all zeros (``eps`` guards the division). Values are unbounded,
    typically within about [-3, 10] for cells on a dark background.
    """
    x = as_float(image)
    axes = (0, 1) if per_channel and x.ndim == 3 else None
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    return ((x - mean) / np.maximum(std, eps)).astype(np.float32)


def zscore_each(images: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """:func:`zscore` of every image of a batch (n, h, w[, c]) on its own: ``float32``, each image with mean 0
    and standard deviation 1 over its pixels and channels (report 000's normalisation, as a model's input
    scaling); a constant image becomes zeros. The result does not depend on the input's scale."""
    x = np.asarray(images, dtype=np.float32)
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    std = x.std(axis=axes, keepdims=True, dtype=np.float64)
    return ((x - mean) / np.maximum(std, eps)).astype(np.float32)


def scale_raw(images: np.ndarray) -> np.ndarray:
    """No normalisation: pixel values as ``float32`` on their own scale (0..255 for uint8); report 000's
    "raw" input, the baseline its normalisation is measured against."""
    return np.asarray(images, dtype=np.float32)


#: The ImageNet channel means (BGR) that VGG16's weights expect subtracted.
IMAGENET_BGR_MEANS = (103.939, 116.779, 123.68)


def scale_caffe(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (n, h, w, 3) -> float32 BGR minus the ImageNet channel means: what VGG16's weights expect (Keras'
    ``caffe`` mode)."""
    x = np.asarray(images, dtype=np.float32)[..., ::-1]
    return x - np.array(IMAGENET_BGR_MEANS, dtype=np.float32)


# --- contrast (reports 003, 004) --------------------------------------------------------------------------------


def contrast_stretch(image: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Linear contrast stretch: the ``low``-th and ``high``-th percentiles map to the ends of the range.

    Values outside are clipped. Percentiles are taken over all pixels and channels together, so colours keep
    their balance; ``(0, 100)`` is plain min-max scaling. Output dtype as input (uint8 0..255, float 0..1).
    """
    x = as_float(image)
    if image.dtype == np.uint8:
        lo, hi = _percentiles_uint8(image, (low, high)) / np.float32(255)
    else:
        lo, hi = np.percentile(x, [low, high])
    if hi <= lo:
        return image.copy() if image.dtype == np.uint8 else x.copy()
    out = np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return as_uint8(out) if image.dtype == np.uint8 else out


def _percentiles_uint8(image: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """``np.percentile`` (linear interpolation) of a uint8 image from its histogram: same values, faster."""
    cumulative = np.cumsum(np.bincount(image.ravel(), minlength=256))
    position = np.asarray(percentiles, dtype=np.float64) / 100 * (image.size - 1)
    below = np.floor(position)
    value_below = np.searchsorted(cumulative, below, side="right")
    value_above = np.searchsorted(cumulative, np.minimum(below + 1, image.size - 1), side="right")
    return value_below + (position - below) * (value_above - value_below)


def equalize(image: np.ndarray) -> np.ndarray:
    """Global histogram equalisation (report 004): grey levels remapped by their cumulative histogram.

    The output histogram is as flat as 256 discrete levels allow and the mapping is monotonic (never swaps the
    order of two grey levels). Colour images are equalised per channel. Output dtype as input.
    """
    return _like(_per_channel(cv2.equalizeHist, as_uint8(image)), image)


def clahe(image: np.ndarray, clip_limit: float = 3.0, block_size: int | None = 127) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (report 003: block 127 px, maximum slope 3.0).

    The image is divided into tiles of about ``block_size`` pixels (``round(side / block_size)`` tiles per side,
    at least one; None gives OpenCV's 8 x 8 tiles); each tile is equalised with its histogram clipped at
    ``clip_limit`` times the uniform level (the "maximum slope"), and tiles are blended bilinearly. ``clip_limit``
    0 disables clipping (plain adaptive equalisation). Colour images are processed per channel. Output as input.
    """
    image8 = as_uint8(image)
    height, width = image8.shape[:2]
    if block_size is None:
        tiles = (8, 8)
    else:
        tiles = (max(1, round(width / block_size)), max(1, round(height / block_size)))
    operator = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=tiles)
    return _like(_per_channel(operator.apply, image8), image)


def adaptive_equalize(image: np.ndarray, block_size: int | None = None) -> np.ndarray:
    """Adaptive histogram equalisation without a contrast limit (report 004): :func:`clahe` with clipping off.

    Stronger local contrast than CLAHE, and noise in flat regions is amplified as much as signal.
    ``block_size`` None uses 8 x 8 tiles. Output dtype as input.
    """
    return clahe(image, clip_limit=0.0, block_size=block_size)


# --- thresholds and morphology (reports 003, 004) -------------------------------------------------------------------


def _otsu_from_histograms(hist: np.ndarray) -> np.ndarray:
    """Otsu thresholds of histograms ``(n, L)`` over levels 0..L-1: foreground is ``level > threshold``.

    Maximises the between-class variance ``w0 * w1 * (mu0 - mu1) ** 2``. When a range of thresholds ties (empty
    levels between two populations) the middle of that range is returned, e.g. 124.5 for a 50/200 image.
    Histograms with a single occupied level return that level (no pixel is foreground).
    """
    counts = np.ascontiguousarray(np.atleast_2d(hist).T, dtype=np.float64)  # (L, n): cumsum across rows
    n_levels = counts.shape[0]
    w0 = np.cumsum(counts, axis=0)
    m0 = np.cumsum(counts * np.arange(n_levels, dtype=np.float64)[:, None], axis=0)
    total, mass = w0[-1], m0[-1]
    w1 = total - w0
    # w0 * w1 * (mu0 - mu1) ** 2, up to the constant factor 1 / total ** 2
    between = (mass * w0 - total * m0) ** 2 / np.maximum(w0 * w1, 1e-300)
    between[(w0 == 0) | (w1 == 0)] = -1.0
    best = between.max(axis=0)
    first = between.argmax(axis=0)
    on_top = between >= best - 1e-9 * np.abs(best)
    after = ~on_top & (np.arange(n_levels)[:, None] > first)
    last = np.where(after.any(axis=0), after.argmax(axis=0) - 1, n_levels - 1)
    thresholds = (first + last) / 2.0
    single = best < 0  # one occupied level: nothing to separate
    thresholds[single] = mass[single] / np.maximum(total[single], 1)
    return thresholds


def otsu_threshold(image: np.ndarray) -> float:
    """Global Otsu threshold (reports 003, 004), in the image's units: foreground is ``image > threshold``.

    Colour images are averaged to grey first. Float images are quantised to 256 levels on [0, 1] and the
    threshold is returned on that scale. A two-level image gives a threshold strictly between the levels.
    """
    image8 = as_uint8(_grey(image))
    t = float(_otsu_from_histograms(np.bincount(image8.ravel(), minlength=256))[0])
    return t if image.dtype == np.uint8 else t / 255.0


def otsu_mask(image: np.ndarray) -> np.ndarray:
    """``bool`` (H, W): pixels brighter than the global :func:`otsu_threshold`."""
    grey = _grey(image)
    return grey > otsu_threshold(grey)


def local_otsu_threshold(
    image: np.ndarray,
    window: int = 20,
    bounds: tuple[float, float] = (0.05, 1.0),
    global_range: tuple[float, float] = (0.7, 1.5),
) -> np.ndarray:
    """Adaptive (local) Otsu threshold map as CellProfiler computes it (report 003: window 20, bounds 0.05-1.0).

    The image is cut into blocks of about ``window`` x ``window`` pixels; each block gets its own Otsu threshold,
    which is kept within ``global_range`` times the global Otsu threshold (so that a block of pure background
    does not threshold its noise) and within ``bounds`` (fractions of full scale, 1.0 = 255 for uint8); block
    values are then interpolated bilinearly between block centres (CellProfiler uses a spline).

    Returns ``float32`` (H, W) in the image's units; foreground is ``image > map``.
    """
    image8 = as_uint8(_grey(image))
    height, width = image8.shape
    ny, nx = max(1, height // window), max(1, width // window)
    rows = np.arange(height) * ny // height
    cols = np.arange(width) * nx // width
    block = (rows[:, None] * nx + cols[None, :]).ravel()
    hist = np.bincount(block * 256 + image8.ravel(), minlength=ny * nx * 256).reshape(ny * nx, 256)
    local = _otsu_from_histograms(hist).reshape(ny, nx)
    guide = float(_otsu_from_histograms(hist.sum(axis=0))[0])
    guide = min(max(guide, bounds[0] * 255), bounds[1] * 255)
    low = max(bounds[0] * 255, global_range[0] * guide)
    high = min(bounds[1] * 255, global_range[1] * guide)
    local = np.clip(local, low, high).astype(np.float32)
    tmap = cv2.resize(local, (width, height), interpolation=cv2.INTER_LINEAR)
    return tmap if image.dtype == np.uint8 else tmap / np.float32(255)


def local_otsu_mask(
    image: np.ndarray,
    window: int = 20,
    bounds: tuple[float, float] = (0.05, 1.0),
    global_range: tuple[float, float] = (0.7, 1.5),
) -> np.ndarray:
    """``bool`` (H, W): pixels brighter than the :func:`local_otsu_threshold` map at their position."""
    grey = _grey(image)
    return grey > local_otsu_threshold(grey, window=window, bounds=bounds, global_range=global_range)


def _kernel(radius: int, shape: str) -> np.ndarray:
    size = 2 * int(radius) + 1
    kinds = {"disk": cv2.MORPH_ELLIPSE, "square": cv2.MORPH_RECT, "cross": cv2.MORPH_CROSS}
    if shape not in kinds:
        raise ValueError(f"shape must be one of {', '.join(kinds)}, got {shape!r}")
    return cv2.getStructuringElement(kinds[shape], (size, size))


def erode(image: np.ndarray, radius: int = 1, shape: str = "disk") -> np.ndarray:
    """Morphological erosion (report 004): each pixel becomes the minimum over a ``shape`` of ``radius`` px.

    On a mask, objects shrink by ``radius`` pixels on every side (a 20 x 20 square eroded with radius 2 becomes
    16 x 16) and specks smaller than the structuring element vanish; pixels outside the image do not erode.
    ``shape`` is ``disk``, ``square`` or ``cross``. Accepts bool, uint8 and float32; output dtype as input.
    """
    kernel = _kernel(radius, shape)
    if image.dtype == bool:
        return cv2.erode(image.astype(np.uint8), kernel).astype(bool)
    return cv2.erode(np.ascontiguousarray(image), kernel)


def boundary_mask(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """``bool`` (H, W): object pixels within ``width`` px of another label or the background (inner boundary).

    The "cell boundary" input of report 000, and the edge class of report 002's 3-class U-Net target. ``labels``
    is a bool mask or an integer instance image; touching objects both get a boundary along their shared edge.
    Pixels at the image border are not boundaries unless the object ends there.
    """
    labels = np.asarray(labels)
    if labels.dtype == bool:
        values = labels.astype(np.uint8)
    elif labels.size and labels.max() < 2**16 and labels.min() >= 0:
        values = labels.astype(np.uint16)
    else:
        values = labels.astype(np.float32)
    kernel = _kernel(width, "square")
    changes = (cv2.dilate(values, kernel) != values) | (cv2.erode(values, kernel) != values)
    return changes & (values > 0)


def cell_mask_input(images: np.ndarray, fill: int = 0) -> np.ndarray:
    """Report 000's cell-mask input for blood-smear crops: each RGB uint8 image (n, h, w, 3) with the pixels
    outside its central stained cell (:func:`cellkit.features.cell_masks`) set to ``fill``, so that a model
    sees the cell's colour and texture but not the red cells and background around it. Same shape and dtype."""
    images = np.asarray(images)
    cell, _ = cell_masks(images)
    return np.where(cell[..., None], images, np.asarray(fill, images.dtype))


# --- filters (reports 000, 002) --------------------------------------------------------------


def gaussian_blur(image: np.ndarray, ksize: int = 25, sigma: float = 0.0) -> np.ndarray:
    """Gaussian blur with a ``ksize`` x ``ksize`` kernel (report 000: 25 x 25), borders reflected.

    ``sigma`` in pixels; 0 lets OpenCV derive it from the kernel size (4.1 px for 25). ``ksize`` must be odd.
    A constant image is unchanged. Any channel count; output dtype as input.
    """
    if ksize % 2 != 1:
        raise ValueError(f"ksize must be odd, got {ksize}")
    return _per_channel_cv(lambda x: cv2.GaussianBlur(x, (ksize, ksize), sigma), image)


def sobel(image: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude (report 000), in the image's units of intensity step.

    ``sqrt(gx ** 2 + gy ** 2) / 4`` with 3 x 3 Sobel kernels, so a vertical or horizontal step of height ``h``
    gives ``h`` on the two pixels either side of it and a constant image gives 0. uint8 output is clipped to
    255 (diagonal steps reach about 1.06 h); float output is ``float32``, unclipped. Per channel for colour.
    """
    x = image.astype(np.float32) if image.dtype != np.float32 else image

    def magnitude(channel: np.ndarray) -> np.ndarray:
        gx = cv2.Sobel(channel, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(channel, cv2.CV_32F, 0, 1, ksize=3)
        # not cv2.magnitude: in OpenCV 5.0 it returns results one float32 step apart from call to call, which
        # flipped the rounding of about 1 image in 3 and made notebook 05's Sobel cells differ between runs
        return np.sqrt(gx * gx + gy * gy) * np.float32(0.25)

    out = _per_channel(magnitude, x)
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8) if image.dtype == np.uint8 else out


#: Report 000's Canny hysteresis thresholds on the 0..255 scale; report 002 gives none and the U-Net input uses these.
CANNY_THRESHOLDS = (10.0, 200.0)


def canny(image: np.ndarray, low: float = CANNY_THRESHOLDS[0], high: float = CANNY_THRESHOLDS[1]) -> np.ndarray:
    """Canny edges (reports 000, 002) with hysteresis thresholds ``low`` and ``high`` on the 0..255 scale.

    Colour images are averaged to grey first. Returns (H, W): uint8 0/255 for uint8 input, float32 0/1 otherwise.
    The thresholds apply to the Sobel gradient (3 x 3, L1 norm) of the 8-bit image.
    """
    return _like(cv2.Canny(as_uint8(_grey(image)), float(low), float(high)), image)


def invert(image: np.ndarray) -> np.ndarray:
    """The inverse image (report 002): ``255 - x`` for uint8, ``1 - x`` for floats on [0, 1], ``~x`` for bool."""
    if image.dtype == bool:
        return ~image
    if image.dtype == np.uint8:
        return np.uint8(255) - image
    return np.float32(1) - as_float(image)


def _per_channel_cv(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
    """Run an OpenCV function that handles up to 4 channels on any channel count, keeping (H, W, 1) shapes."""
    image = np.ascontiguousarray(image)
    if image.ndim == 2 or image.shape[-1] in (2, 3, 4):
        out = fn(image)
    else:
        out = np.concatenate(
            [np.atleast_3d(fn(np.ascontiguousarray(image[..., c : c + 4]))) for c in range(0, image.shape[-1], 4)],
            axis=-1,
        )
    return out.reshape(out.shape[:2] + image.shape[2:])


# --- geometry ----------------------------------------------------------------------------------------------------


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _linear(a: float, b: float, c: float, d: float) -> np.ndarray:
    return np.array([[a, b, 0.0], [c, d, 0.0], [0.0, 0.0, 1.0]])


def _about_centre(
    shape: tuple[int, int],
    angle: float = 0.0,
    shear: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    flip_h: bool = False,
    flip_v: bool = False,
) -> np.ndarray:
    """3 x 3 forward matrix (input -> output, x = column): flips, shear, rotation about the centre, then shift.

    ``shift`` is (dy, dx) in pixels (down, right); ``shear`` in degrees (x += tan(shear) * y).
    """
    cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    theta = np.deg2rad(angle)
    cos, sin = np.cos(theta), np.sin(theta)
    rotation = _linear(cos, sin, -sin, cos)  # counter-clockwise on screen (y points down)
    shearing = _linear(1.0, np.tan(np.deg2rad(shear)), 0.0, 1.0)
    flipping = _linear(-1.0 if flip_h else 1.0, 0.0, 0.0, -1.0 if flip_v else 1.0)
    centred = rotation @ shearing @ flipping
    return _translation(cx + shift[1], cy + shift[0]) @ centred @ _translation(-cx, -cy)


def _stretch_crop_matrix(scale: tuple[float, float], offset: tuple[int, int]) -> np.ndarray:
    """Resize by (sy, sx) with pixel-area alignment (as ``cv2.resize``), then crop from (top, left)."""
    sy, sx = scale
    resize = _translation(-0.5, -0.5) @ _linear(sx, 0.0, 0.0, sy) @ _translation(0.5, 0.5)
    return _translation(-offset[1], -offset[0]) @ resize


def _warp(image: np.ndarray, matrix: np.ndarray, out_shape: tuple[int, int], nearest: bool, fill: str,
          cval: float = 0.0) -> np.ndarray:
    """Warp with a 3 x 3 forward matrix; ``nearest`` for masks (ids kept). Output (out_shape + channels)."""
    if fill not in _FILLS:
        raise ValueError(f"fill must be one of {', '.join(_FILLS)}, got {fill!r}")
    dtype = image.dtype
    if dtype == np.bool_:
        work = image.astype(np.uint8)
    elif dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        work = image
    elif np.issubdtype(dtype, np.integer) and image.size and image.min() >= 0 and image.max() < 2**16:
        work = image.astype(np.uint16)
    else:
        work = image.astype(np.float64)
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    size = (int(out_shape[1]), int(out_shape[0]))
    out = _per_channel_cv(
        lambda x: cv2.warpAffine(x, matrix[:2], size, flags=flags, borderMode=_FILLS[fill], borderValue=cval),
        work,
    )
    out = out.reshape(tuple(out_shape) + image.shape[2:])
    return out.astype(dtype, copy=False)


def flip(image: np.ndarray, horizontal: bool = False, vertical: bool = False) -> np.ndarray:
    """Mirror left-right (``horizontal``) and/or top-bottom (``vertical``); exact, any dtype (masks too)."""
    if horizontal:
        image = image[:, ::-1]
    if vertical:
        image = image[::-1]
    return np.ascontiguousarray(image)


def affine_transform(
    image: np.ndarray,
    angle: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    shear: float = 0.0,
    nearest: bool = False,
    fill: str = "reflect",
    cval: float = 0.0,
) -> np.ndarray:
    """Rotate by ``angle`` degrees about the centre, shear, then shift by (dy, dx) pixels (report 003).

    ``fill`` says what enters from outside: ``reflect`` (report 003's reflected fill), ``constant`` (``cval``),
    ``nearest`` or ``wrap``. ``nearest`` selects nearest-neighbour interpolation, for masks; bilinear otherwise.
    Output shape and dtype as input.
    """
    matrix = _about_centre(image.shape[:2], angle=angle, shear=shear, shift=shift)
    return _warp(image, matrix, image.shape[:2], nearest, fill, cval)


def rotate(image: np.ndarray, angle: float, nearest: bool = False, fill: str = "constant", cval: float = 0.0
           ) -> np.ndarray:
    """Rotate by ``angle`` degrees (counter-clockwise) about the centre; corners filled with ``cval`` by default,
    as torchvision's RandomRotation does (report 000 drew angles in [-50, 50]). Output as input."""
    return affine_transform(image, angle=angle, nearest=nearest, fill=fill, cval=cval)


def random_crop(image: np.ndarray, rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A ``size`` = (height, width) window at a uniformly random position; exact pixels, no interpolation."""
    height, width = image.shape[:2]
    if size[0] > height or size[1] > width:
        raise ValueError(f"crop {tuple(size)} is larger than the image {height, width}")
    top = int(rng.integers(0, height - size[0] + 1))
    left = int(rng.integers(0, width - size[1] + 1))
    return image[top : top + size[0], left : left + size[1]].copy()


def stretch_crop(
    image: np.ndarray, rng: np.random.Generator, size: tuple[int, int] = (128, 128),
    stretch: tuple[float, float] = (0.8, 1.25),
) -> np.ndarray:
    """Report 002's stretch-then-crop: scale each axis by a factor drawn from ``stretch``, then a random
    ``size`` crop (reflected padding when the stretched image is smaller). Output (height, width[, C]), dtype
    as input. For an image and its mask together use :func:`augment_pair` with ``RECIPES["report002"]``."""
    recipe = Augmentation(flip_h=0.0, flip_v=0.0, stretch=stretch, crop=tuple(size))
    return augment(image, rng, recipe)


def add_gaussian_noise(
    image: np.ndarray,
    rng: np.random.Generator,
    sigma: float = 0.005,
    channels: Sequence[int] | None = None,
    clip: bool = True,
) -> np.ndarray:
    """Add N(0, ``sigma``) noise on the [0, 1] scale to ``channels`` only (report 002: 0.005 on the original and
    inverse channels of the input-enhancement stack, none on Canny).

    Returns ``float32``; uint8 input is scaled to [0, 1] first. ``channels`` None means all; a 2-D image counts
    as channel 0. ``clip`` keeps values in [0, 1]. Draws one normal value per pixel of every channel (noise on
    unchosen channels is discarded) so that the stream does not depend on ``channels``.
    """
    x = as_float(image).copy()
    noise = rng.standard_normal(size=x.shape, dtype=np.float32) * np.float32(sigma)
    if channels is None:
        x += noise
    elif x.ndim == 2:
        if 0 in channels:
            x += noise
    else:
        chosen = list(channels)
        x[..., chosen] += noise[..., chosen]
    return np.clip(x, 0.0, 1.0) if clip else x


# --- augmentation pipeline --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augmentation:
    """What one random augmentation may do; :func:`augment_pair` applies it to an image and its mask.

    All geometric steps are composed into one affine warp (one interpolation, fast):
    flips -> shear -> rotation -> shift (about the image centre) -> stretch -> crop.

    Attributes
    ----------
    flip_h, flip_v : probabilities of a left-right and a top-bottom flip.
    rotation : maximum angle in degrees; the angle is uniform in [-rotation, rotation] (report 000: 50).
    shift : maximum shift as a fraction of the height (rows) and width (columns), uniform in [-shift, shift].
    shear : maximum shear angle in degrees, uniform in [-shear, shear].
    stretch : (min, max) scale factor, drawn independently for each axis (report 002's stretch).
    crop : (height, width) of a random crop taken after stretching (report 002: 256; 128 worked best); None
        keeps the input size (a stretched image is then cropped back to it).
    fill : what enters from outside the image: ``reflect`` (report 003), ``constant``, ``nearest`` or ``wrap``.
    cval : the constant for ``fill="constant"`` (the mask gets 0).
    noise_sigma : standard deviation of Gaussian noise on the [0, 1] scale added to the image only (report 002:
        0.005); 0 adds none. With noise the image comes back as ``float32``.
    noise_channels : channels that get noise (report 002: (0, 1)); None means all.
    """

    flip_h: float = 0.5
    flip_v: float = 0.5
    rotation: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    stretch: tuple[float, float] = (1.0, 1.0)
    crop: tuple[int, int] | None = None
    fill: str = "reflect"
    cval: float = 0.0
    noise_sigma: float = 0.0
    noise_channels: tuple[int, ...] | None = None

    def sample(self, rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
        """Draw one geometric transform for an image of ``shape`` (H, W): (3 x 3 forward matrix, output shape).

        Always draws the same ten numbers from ``rng``, whichever steps are enabled.
        """
        height, width = int(shape[0]), int(shape[1])
        u = rng.random(10)
        angle = (2 * u[2] - 1) * self.rotation
        shear = (2 * u[3] - 1) * self.shear
        shift = ((2 * u[4] - 1) * self.shift * height, (2 * u[5] - 1) * self.shift * width)
        geometry = _about_centre((height, width), angle, shear, shift, u[0] < self.flip_h, u[1] < self.flip_v)
        low, high = self.stretch
        scale = (low + (high - low) * u[8], low + (high - low) * u[9])
        out_shape = tuple(self.crop) if self.crop is not None else (height, width)
        stretched = (round(height * scale[0]), round(width * scale[1]))
        offset = tuple(
            int(u[6 + axis] * (stretched[axis] - out_shape[axis] + 1)) if stretched[axis] >= out_shape[axis]
            else -((out_shape[axis] - stretched[axis]) // 2)
            for axis in (0, 1)
        )
        return _stretch_crop_matrix(scale, offset) @ geometry, out_shape


#: The augmentations of the source reports. Magnitudes that a report does not state are marked "chosen here".
RECIPES: dict[str, Augmentation] = {
    # 000: random flip and random rotation in [-50, 50] degrees; corners filled with black (torchvision's default)
    "report000": Augmentation(flip_h=0.5, flip_v=0.5, rotation=50.0, fill="constant"),
    # 002: stretch (range chosen here) then a random 128 x 128 crop, flips, noise 0.005 on channels 0 and 1
    "report002": Augmentation(flip_h=0.5, flip_v=0.5, stretch=(0.8, 1.25), crop=(128, 128), noise_sigma=0.005,
                              noise_channels=(0, 1)),
    # 003: rotation, shifts, shear and flips with reflected fill (magnitudes chosen here)
    "report003": Augmentation(flip_h=0.5, flip_v=0.5, rotation=45.0, shift=0.1, shear=10.0, fill="reflect"),
    # 004: flips and rotations (magnitudes chosen here: any angle, reflected fill)
    "report004": Augmentation(flip_h=0.5, flip_v=0.5, rotation=180.0, fill="reflect"),
}


def _noise(image: np.ndarray, rng: np.random.Generator, augmentation: Augmentation) -> np.ndarray:
    if augmentation.noise_sigma <= 0:
        return image
    return add_gaussian_noise(image, rng, augmentation.noise_sigma, augmentation.noise_channels)


def augment(image: np.ndarray, rng: np.random.Generator, augmentation: Augmentation = RECIPES["report003"]
            ) -> np.ndarray:
    """One random augmentation of ``image`` (bilinear). Shape (crop or input size)[, C]; dtype as input, or
    ``float32`` when the augmentation adds noise. Draws exactly what :func:`augment_pair` draws, so with the same
    generator state the image is identical to the image :func:`augment_pair` returns."""
    matrix, out_shape = augmentation.sample(rng, image.shape[:2])
    warped = _warp(image, matrix, out_shape, False, augmentation.fill, augmentation.cval)
    return _noise(warped, rng, augmentation)


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, augmentation: Augmentation = RECIPES["report003"]
) -> tuple[np.ndarray, np.ndarray]:
    """The same random geometric transform applied to ``image`` (bilinear) and ``mask`` (nearest neighbour).

    ``mask`` is (H, W) bool or integer ids, same height and width as ``image``; its dtype is kept and its values
    are always a subset of the input's (ids are never blended; reflected fill can repeat an object). Noise, if
    any, goes on the image only. Returns (image, mask) with the crop size or the input size.
    """
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image is {image.shape[:2]} but the mask is {mask.shape[:2]}")
    matrix, out_shape = augmentation.sample(rng, image.shape[:2])
    warped = _warp(image, matrix, out_shape, False, augmentation.fill, augmentation.cval)
    warped_mask = _warp(mask, matrix, out_shape, True, augmentation.fill, 0.0)
    return _noise(warped, rng, augmentation), warped_mask


#: Named augmentations of classifier training batches (:func:`augment_batch`): ``none``; ``flips``; ``dihedral``
#: (the 8 symmetries of the square: a cell on a slide has no "up"); ``dihedral_shift`` (dihedral, then a shift by
#: up to ``max_shift`` px, borders reflected); ``flip_rotate50`` (report 000: :data:`RECIPES` ``report000``).
AUGMENTATIONS = ("none", "flips", "dihedral", "dihedral_shift", "flip_rotate50")


def augment_batch(
    images: np.ndarray | Sequence[np.ndarray],
    rng: np.random.Generator,
    augmentation: Augmentation | str = RECIPES["report003"],
    masks: np.ndarray | Sequence[np.ndarray] | None = None,
    max_shift: int = 2,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """A randomly augmented copy of a batch (N, H, W[, C]): each image independently, in order, with one generator.

    ``augmentation`` is an :class:`Augmentation` recipe (e.g. ``RECIPES["report002"]``; bilinear, applied by
    :func:`augment` or, with ``masks`` (N, H, W), pairwise by :func:`augment_pair`, returning (images, masks)), or
    one of the named batch augmentations :data:`AUGMENTATIONS`. ``flips``, ``dihedral`` and ``dihedral_shift`` are
    exact (no interpolation, any dtype kept); the 90-degree rotations need square images. Draws from ``rng`` only.
    Outputs are stacked arrays (all the same size: the crop, or the input size).
    """
    if isinstance(augmentation, str):
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augmentation!r}; use {', '.join(AUGMENTATIONS)}")
        if masks is not None:
            raise ValueError(f"augmentation {augmentation!r} takes images only, not masks; give a recipe")
        if augmentation == "flip_rotate50" and len(images):
            augmentation = RECIPES["report000"]
        else:
            return _symmetries(np.asarray(images), rng, augmentation, max_shift)
    if masks is None:
        return np.stack([augment(image, rng, augmentation) for image in images])
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    pairs = [augment_pair(image, mask, rng, augmentation) for image, mask in zip(images, masks, strict=True)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def dihedral_view(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Images (n, h, w[, c]) rotated by ``k`` quarter turns and, if ``flip``, mirrored left-right (one of the 8
    symmetries of the square; used for augmentation and test-time augmentation)."""
    out = np.rot90(images, k, axes=(1, 2)) if k % 4 else images
    return np.ascontiguousarray(out[:, :, ::-1] if flip else out)


def _symmetries(images: np.ndarray, rng: np.random.Generator, mode: str, max_shift: int) -> np.ndarray:
    """The exact batch augmentations ``none``, ``flips``, ``dihedral`` and ``dihedral_shift`` of :func:`augment_batch`
    (and any of them on an empty batch)."""
    if mode == "none" or not len(images):
        return images.copy()
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
        out[index] = dihedral_view(images[index], c // 2, bool(c % 2))
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


def foreground_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of the foregrounds (non-zero pixels) of two masks of the same shape; 1.0 when
    both are empty."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def contrast_to_noise(image: np.ndarray, mask: np.ndarray) -> float:
    """Contrast-to-noise ratio ``(mean(object) - mean(background)) / std(background)`` of a grey image.

    ``mask`` marks objects (non-zero). Unitless, so unchanged by any linear rescaling (normalisation, contrast
    stretching without clipping); a non-linear transform such as equalisation can change it. NaN if either
    region is empty.
    """
    x = as_float(_grey(image)).astype(np.float64)
    inside = np.asarray(mask) != 0
    if inside.all() or not inside.any():
        return float("nan")
    background = x[~inside]
    return float((x[inside].mean() - background.mean()) / max(background.std(), 1e-12))


def check_alignment(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    rng: np.random.Generator,
    augmentation: Augmentation = RECIPES["report003"],
    rounds: int = 4,
) -> pd.DataFrame:
    """Measure that :func:`augment_pair` keeps masks on their images; one row per image and round.

    Columns
    -------
    pair_iou : IoU of the augmented mask's foreground with the mask's foreground indicator pushed through the
        image path (bilinear, thresholded at 0.5) under the same draw; 1.0 means perfect alignment, interpolation
        costs a little on object edges.
    control_iou : the same with the image path given an independent draw: what misalignment looks like.
    otsu_iou_before, otsu_iou_after : IoU of the image's global Otsu mask with the mask's foreground, before and
        after augmentation (equal when the two stay aligned; the image's own intensities, no indicator trick).
    ids_kept : True when every id in the augmented mask was in the original mask.
    """
    rows = []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        foreground = np.asarray(mask) > 0
        for round_ in range(rounds):
            state = rng.bit_generator.state
            indicator, warped_mask = augment_pair(foreground.astype(np.float32), mask, rng, augmentation)
            rng.bit_generator.state = state  # the same draw again, now for the real image
            warped_image, _ = augment_pair(image, mask, rng, augmentation)
            control = augment(foreground.astype(np.float32), rng, augmentation)  # an independent draw
            rows.append({
                "image": index,
                "round": round_,
                "pair_iou": foreground_iou(indicator > 0.5, warped_mask > 0),
                "control_iou": foreground_iou(control > 0.5, warped_mask > 0),
                "otsu_iou_before": foreground_iou(otsu_mask(image), foreground),
                "otsu_iou_after": foreground_iou(otsu_mask(warped_image), warped_mask > 0),
                "ids_kept": bool(np.isin(np.unique(warped_mask), np.unique(mask)).all()),
            })
    return pd.DataFrame(rows)


# --- the catalogue and its cost ------------------------------------------------------------------------------


def catalogue(rng: np.random.Generator | None = None) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Every transform of the reports with the reports' parameters, as a one-argument function, by stable name.

    Each takes one image (grey or colour, uint8 or float) and returns its transform. Random ones draw from
    ``rng`` (default: a generator seeded with 0). The keys are the rows of the notebook's timing table and the
    transformations notebook 05 compares.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    return {
        "scale_01": scale_01,
        "scale_pm1": scale_pm1,
        "zscore": zscore,
        "contrast_stretch": contrast_stretch,
        "equalize": equalize,
        "adaptive_equalize": adaptive_equalize,
        "clahe": clahe,
        "otsu_mask": otsu_mask,
        "local_otsu_mask": local_otsu_mask,
        "eroded_otsu_mask": lambda x: erode(otsu_mask(x), radius=1),
        "cell_boundary": lambda x: boundary_mask(otsu_mask(x)),
        "gaussian_blur_25": gaussian_blur,
        "canny_10_200": canny,
        "sobel": sobel,
        "invert": invert,
        "flip": lambda x: flip(x, *(rng.random(2) < 0.5)),
        "rotate_50": lambda x: rotate(x, rng.uniform(-50, 50)),
        "stretch_crop": lambda x: stretch_crop(x, rng, size=(x.shape[0] // 2, x.shape[1] // 2)),
        "gaussian_noise": lambda x: add_gaussian_noise(x, rng, sigma=0.005),
        "affine_reflect": lambda x: augment(x, rng, RECIPES["report003"]),
    }


def time_per_image(fn: Callable[[np.ndarray], object], images: np.ndarray | Sequence[np.ndarray],
                   repeats: int = 3, warmup: int = 1) -> float:
    """Milliseconds per image that ``fn`` takes, calling it once per image over the batch.

    Runs ``warmup`` untimed passes, then ``repeats`` timed passes, and returns the fastest pass divided by the
    number of images (the minimum is the least disturbed by other processes). Wall-clock, one thread of Python.
    """
    if not len(images):
        raise ValueError("no images to time")
    for _ in range(warmup):
        for image in images:
            fn(image)
    best = np.inf
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        for image in images:
            fn(image)
        best = min(best, time.perf_counter() - started)
    return 1000.0 * best / len(images)


def timing_table(
    transforms: dict[str, Callable[[np.ndarray], object]],
    batches: dict[str, np.ndarray | Sequence[np.ndarray]],
    repeats: int = 3,
) -> pd.DataFrame:
    """Milliseconds per image for each transform (rows) on each batch (columns, e.g. ``"28x28"``)."""
    table = {
        name: {batch: time_per_image(fn, images, repeats=repeats) for batch, images in batches.items()}
        for name, fn in transforms.items()
    }
    return pd.DataFrame.from_dict(table, orient="index").rename_axis("transform")

