"""Hand-crafted features of images and of the objects in them, as numpy arrays and pandas tables.

Every function works on a whole set at once (vectorised over images or over the objects of an image), says
the shapes and units it takes and returns, and imports no Keras, so it loads fast and is tested without it.

Sections
--------
- Grey levels and thresholds: :func:`luma`, :func:`otsu_thresholds`.
- Colour and intensity of RGB crops (report 001's EDA): :func:`colour_intensity_features`.
- Hand-crafted features for classification (notebook 03, report 001's random forest), one function per family
  and :func:`handcrafted_features` for all of them (chunked, on several processes):

  - colour: :func:`rgb_to_hsv`, :func:`colour_statistics` (mean RGB and more), :func:`colour_histograms`;
  - texture: :func:`lbp_codes`, :func:`lbp_histograms`, :func:`glcm`, :func:`glcm_properties`,
    :func:`glcm_features` (Haralick);
  - shape: :func:`stain_channel`, :func:`cell_masks` (central cell and nucleus), :func:`central_object`,
    :func:`fill_holes`, :func:`close_masks`, :func:`count_components`, :func:`perimeters`,
    :func:`shape_features`, :func:`cell_shape_features`, :func:`region_colour_features`.
- Instances in label images (nuclei): :func:`instance_areas`, :func:`nucleus_table`, :func:`nuclei_stats`,
  :func:`intensity_histograms`.
- Describing a set: :func:`image_size_counts`, :func:`summarise`, :func:`stratified_sample`.

>>> from cellkit import datasets, features
>>> table = features.colour_intensity_features(datasets.load_pbc28("train").images)
>>> X = features.handcrafted_features(datasets.load_pbc28("train").images, n_jobs=2)  # (11965, 248)
>>> per_image = features.nuclei_stats(datasets.load_dsb2018())
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import ndimage

if TYPE_CHECKING:
    from cellkit.datasets import SegmentationSet

#: Weights of R, G, B in the grey level (ITU-R BT.601 luma, as OpenCV's and PIL's RGB -> grey).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
#: Number of grey levels of an 8-bit image.
LEVELS = 256

# --- grey levels and thresholds -------------------------------------------------------------------------


def luma(images: np.ndarray) -> np.ndarray:
    """Grey levels of RGB images: ``0.299 R + 0.587 G + 0.114 B``, rounded, as uint8.

    Parameters
    ----------
    images : uint8 array, shape (..., height, width, 3) RGB, or (..., height, width) already grey.

    Returns
    -------
    uint8 array of shape (..., height, width), grey levels 0-255 (the values OpenCV's ``RGB2GRAY`` gives,
    up to rounding of exact halves).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"luma expects uint8 images, got {images.dtype}")
    if images.ndim >= 3 and images.shape[-1] == 3:
        grey = images.astype(np.float32) @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return images


def otsu_thresholds(grey: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each 8-bit grey image in a stack, computed from per-image histograms at once.

    The threshold ``t`` maximises the between-class variance of the two classes ``grey <= t`` (dark) and
    ``grey > t`` (bright); it equals ``skimage.filters.threshold_otsu`` of each image. A constant image's
    threshold is its one value (so all its pixels count as dark).

    Parameters
    ----------
    grey : uint8 array, shape (n, height, width) (or (height, width) for one image).

    Returns
    -------
    int array, shape (n,) (or a scalar array for one image): grey levels 0-255.
    """
    grey = np.asarray(grey)
    if grey.dtype != np.uint8:
        raise ValueError(f"otsu_thresholds expects uint8 grey images, got {grey.dtype}")
    single = grey.ndim == 2
    stack = grey.reshape(1 if single else len(grey), -1)
    thresholds = _otsu_from_counts(_histograms_uint8(stack))
    return thresholds[0] if single else thresholds


def _histograms_uint8(values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-row histograms of uint8 values: (n, m) -> (n, 256) counts (weighted: sums of ``weights``)."""
    n = len(values)
    offsets = (np.arange(n, dtype=np.int64) * LEVELS)[:, None]
    flat_weights = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    counts = np.bincount((values + offsets).ravel(), weights=flat_weights, minlength=n * LEVELS)
    return counts.reshape(n, LEVELS)


def _otsu_from_counts(counts: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each row of 256-level histograms (n, 256) -> (n,) int grey levels.

    A histogram with one occupied level gets that level; an empty one gets 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    levels = np.arange(LEVELS, dtype=np.float64)
    # the same arithmetic as scikit-image, so that ties break the same way
    weight1 = np.cumsum(counts, axis=1)
    weight2 = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(counts * levels, axis=1) / weight1
        mean2 = (np.cumsum((counts * levels)[:, ::-1], axis=1) / weight2[:, ::-1])[:, ::-1]
        variance12 = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    variance12 = np.nan_to_num(variance12, nan=0.0)  # thresholds below the darkest or at the brightest pixel
    thresholds = np.argmax(variance12, axis=1)
    occupied = (counts > 0).sum(axis=1)
    one_level = occupied == 1
    thresholds[one_level] = np.argmax(counts[one_level], axis=1)
    thresholds[occupied == 0] = 0
    return thresholds


# --- colour and intensity of RGB crops --------------------------------------------------------------------

#: Columns of :func:`colour_intensity_features`, in order.
COLOUR_INTENSITY_COLUMNS = (
    "mean_r", "mean_g", "mean_b", "grey_mean", "threshold", "dark_mean", "bright_mean", "dark_fraction",
)  # fmt: skip


def colour_intensity_features(images: np.ndarray, threshold: int | None = None) -> pd.DataFrame:
    """Report 001's colour and intensity features, one row per RGB image.

    Parameters
    ----------
    images : uint8 array, shape (n, height, width, 3), RGB.
    threshold : grey level (0-255) splitting dark from bright pixels, the same for every image; None
        (default) uses each image's own Otsu threshold, which adapts to staining and exposure.

    Returns
    -------
    DataFrame with n rows and the columns of :data:`COLOUR_INTENSITY_COLUMNS`, grey levels in 0-255:

    - ``mean_r``, ``mean_g``, ``mean_b``: mean of each channel over the image;
    - ``grey_mean``: mean of the grey image (:func:`luma`);
    - ``threshold``: the grey level used, the image's Otsu threshold on grey (:func:`otsu_thresholds`)
      unless ``threshold`` is given;
    - ``dark_mean``: mean grey level of the "black" pixels, ``grey <= threshold`` (in stained blood
      smears: the stained cell, mostly its nucleus); NaN when there are none;
    - ``bright_mean``: mean grey level of the "white" pixels, ``grey > threshold`` (background, pale
      red cells); NaN when there are none (a constant image under Otsu);
    - ``dark_fraction``: share of pixels that are dark, 0-1.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images of shape (n, height, width, 3), got {images.shape}")
    n = len(images)
    channel_means = images.reshape(n, -1, 3).mean(axis=1, dtype=np.float64)
    grey = luma(images).reshape(n, -1)
    if threshold is None:
        thresholds = otsu_thresholds(grey.reshape(images.shape[:3]))
    else:
        thresholds = np.full(n, int(threshold))
    dark = grey <= thresholds[:, None]
    n_dark = dark.sum(axis=1)
    n_bright = grey.shape[1] - n_dark
    grey_sum = grey.sum(axis=1, dtype=np.float64)
    dark_sum = np.where(dark, grey, 0).sum(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        dark_mean = np.where(n_dark > 0, dark_sum / n_dark, np.nan)
        bright_mean = np.where(n_bright > 0, (grey_sum - dark_sum) / n_bright, np.nan)
    return pd.DataFrame(
        {
            "mean_r": channel_means[:, 0],
            "mean_g": channel_means[:, 1],
            "mean_b": channel_means[:, 2],
            "grey_mean": grey_sum / grey.shape[1],
            "threshold": thresholds,
            "dark_mean": dark_mean,
            "bright_mean": bright_mean,
            "dark_fraction": n_dark / grey.shape[1],
        },
        columns=list(COLOUR_INTENSITY_COLUMNS),
    )


# --- hand-crafted features for classification (notebook 03) -------------------------------------------------
#
# Report 001's random forest used colour histograms, local binary patterns, mean RGB and the cell perimeter.
# Each family below has its own function taking a stack of RGB crops (n, height, width, 3) uint8 and returning
# a DataFrame with one row per image; :func:`handcrafted_features` joins them, in chunks, on several cores.
# Column names are ``family.feature`` so that importances can be summed per family (:func:`feature_families`).

#: Feature families of :func:`handcrafted_features`, in column order.
FEATURE_FAMILIES = ("colour", "histogram", "lbp", "glcm", "shape", "region_colour")
#: (points, radius in pixels) of the local binary patterns of :func:`lbp_histograms`.
LBP_SETTINGS = ((8, 1), (16, 2))
#: Texture properties of :func:`glcm_properties`, as scikit-image's ``graycoprops`` defines them.
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "entropy")
#: Angles of the co-occurrence offsets, in degrees; properties are averaged over them (rotation invariance).
GLCM_ANGLES = (0, 45, 90, 135)


def rgb_to_hsv(images: np.ndarray) -> np.ndarray:
    """Hue, saturation and value of RGB images, each scaled to 0-255 and rounded (uint8).

    Parameters
    ----------
    images : uint8 array, shape (..., 3) RGB, e.g. (n, height, width, 3).

    Returns
    -------
    uint8 array of the same shape: hue (0-255 for 0-360 degrees, 0 for grey pixels), saturation
    ``(max - min) / max`` (0 for black) and value ``max(R, G, B)``, as ``skimage.color.rgb2hsv`` times 255.
    """
    rgb = np.asarray(images)
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images (..., 3), got {rgb.dtype} {rgb.shape}")
    rgb = rgb.astype(np.float64)
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        saturation = np.where(value > 0, delta / value, 0)
        r, g, b = (rgb[..., i] for i in range(3))
        safe = np.where(delta > 0, delta, 1)
        hue = np.where(value == r, (g - b) / safe, np.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6) % 1, 0)
    hsv = np.stack([hue * 255, saturation * 255, value], axis=-1)
    return np.clip(np.rint(hsv), 0, 255).astype(np.uint8)


def _check_rgb_stack(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images of shape (n, height, width, 3), got {images.dtype} {images.shape}")
    return images


# colour: mean RGB and more ----------------------------------------------------------------------------------


def colour_statistics(images: np.ndarray) -> pd.DataFrame:
    """Mean, standard deviation and quartiles of each colour channel over each image (report 001's mean RGB).

    Parameters
    ----------
    images : uint8 array, shape (n, height, width, 3), RGB.

    Returns
    -------
    DataFrame, n rows; for each channel ``c`` of R, G, B, H, S, V and grey (:func:`luma`, :func:`rgb_to_hsv`),
    all on 0-255: ``mean_c``, ``std_c`` (population), ``p25_c``, ``p50_c``, ``p75_c`` (percentiles, linear
    interpolation). Hue is circular, so its mean means little for reds; its histogram does better.
    """
    images = _check_rgb_stack(images)
    channels = _channel_stack(images)
    n = len(images)
    flat = channels.reshape(n, -1, channels.shape[-1]).astype(np.float32)
    columns: dict[str, np.ndarray] = {}
    quartiles = np.percentile(flat, [25, 50, 75], axis=1)
    for i, name in enumerate(CHANNEL_NAMES):
        columns[f"mean_{name}"] = flat[:, :, i].mean(axis=1, dtype=np.float64)
        columns[f"std_{name}"] = flat[:, :, i].std(axis=1, dtype=np.float64)
        for q, quartile in zip((25, 50, 75), quartiles, strict=True):
            columns[f"p{q}_{name}"] = quartile[:, i]
    return pd.DataFrame(columns)


#: Channels of :func:`_channel_stack`: RGB, HSV (0-255) and grey.
CHANNEL_NAMES = ("r", "g", "b", "h", "s", "v", "grey")


def _channel_stack(images: np.ndarray) -> np.ndarray:
    """(n, h, w, 7) uint8: R, G, B, H, S, V, grey."""
    return np.concatenate([images, rgb_to_hsv(images), luma(images)[..., None]], axis=-1)


def colour_histograms(images: np.ndarray, bins: int = 16, channels: Sequence[str] = CHANNEL_NAMES[:6]) -> pd.DataFrame:
    """Normalised histograms of colour channels, one per channel and image (report 001's colour histograms).

    Parameters
    ----------
    images : uint8 array, shape (n, height, width, 3), RGB.
    bins : number of equal bins over 0-255 per channel (256 must be divisible by it).
    channels : which of ``r g b h s v grey`` (:data:`CHANNEL_NAMES`) to histogram.

    Returns
    -------
    DataFrame, n rows, ``len(channels) * bins`` columns ``{channel}_{bin:02d}``: the share of the image's
    pixels in each bin, so that each channel's histogram sums to 1.
    """
    images = _check_rgb_stack(images)
    if LEVELS % bins:
        raise ValueError(f"bins must divide 256, got {bins}")
    unknown = set(channels) - set(CHANNEL_NAMES)
    if unknown:
        raise ValueError(f"unknown channels {sorted(unknown)}; use {', '.join(CHANNEL_NAMES)}")
    stack = _channel_stack(images)
    n, pixels = len(images), images.shape[1] * images.shape[2]
    frames = []
    for name in channels:
        binned = stack[..., CHANNEL_NAMES.index(name)].reshape(n, -1) // (LEVELS // bins)
        offsets = (np.arange(n, dtype=np.int64) * bins)[:, None]
        counts = np.bincount((binned + offsets).ravel(), minlength=n * bins).reshape(n, bins)
        frames.append(pd.DataFrame(counts / pixels, columns=[f"{name}_{b:02d}" for b in range(bins)]))
    return pd.concat(frames, axis=1)


# texture: local binary patterns and grey-level co-occurrence ------------------------------------------------


def lbp_codes(grey: np.ndarray, points: int = 8, radius: float = 1) -> np.ndarray:
    """Rotation-invariant uniform local binary pattern of every interior pixel of a stack of grey images.

    Each pixel is compared with ``points`` neighbours on a circle of ``radius`` pixels (bilinear
    interpolation); a neighbour at least as bright as the centre is a 1. A pattern with at most two 0/1
    changes along the circle is coded by its number of ones (0..points); any other pattern gets
    ``points + 1``. This is ``skimage.feature.local_binary_pattern(image, points, radius, "uniform")``,
    code for code, computed for the whole stack at once with numpy.

    Only pixels at least ``ceil(radius)`` from the border are coded: their neighbours all lie inside the
    image, whereas scikit-image pads with zeros, which gives the border its own artificial texture.

    Parameters
    ----------
    grey : uint8 (or integer) array, shape (n, height, width) or (height, width).
    points, radius : number of neighbours and circle radius in pixels.

    Returns
    -------
    int16 array, shape (n, height - 2m, width - 2m) with ``m = ceil(radius)`` (no n axis for one image):
    codes 0..points+1.
    """
    grey = np.asarray(grey)
    single = grey.ndim == 2
    stack = grey[None] if single else grey
    if stack.ndim != 3:
        raise ValueError(f"expected grey images (n, height, width), got shape {grey.shape}")
    margin = int(np.ceil(radius))
    n, h, w = stack.shape
    if h <= 2 * margin or w <= 2 * margin:
        raise ValueError(f"images of {h}x{w} pixels have no interior at radius {radius}")
    image = stack.astype(np.float64)
    rows = np.arange(margin, h - margin, dtype=np.float64)[:, None]
    cols = np.arange(margin, w - margin, dtype=np.float64)[None, :]
    centre = image[:, margin : h - margin, margin : w - margin]
    angle = 2 * np.pi * np.arange(points, dtype=np.float64) / points
    # the same positions and arithmetic as scikit-image, so that ties (neighbour == centre) break the same way
    row_offsets, col_offsets = np.round(-radius * np.sin(angle), 5), np.round(radius * np.cos(angle), 5)
    bits = np.empty((points, *centre.shape), dtype=np.int8)
    for p, (dr, dc) in enumerate(zip(row_offsets, col_offsets, strict=True)):
        r, c = rows + dr, cols + dc
        r0, c0 = np.floor(r), np.floor(c)
        fr, fc = r - r0, c - c0
        lo_r, lo_c = int(r0[0, 0]), int(c0[0, 0])
        hi_r, hi_c = int(np.ceil(r[0, 0])), int(np.ceil(c[0, 0]))

        def window(top: int, left: int) -> np.ndarray:
            return image[:, top : top + h - 2 * margin, left : left + w - 2 * margin]

        upper = (1 - fc) * window(lo_r, lo_c) + fc * window(lo_r, hi_c)
        lower = (1 - fc) * window(hi_r, lo_c) + fc * window(hi_r, hi_c)
        texture = (1 - fr) * upper + fr * lower
        bits[p] = texture - centre >= 0
    changes = np.abs(np.diff(bits, axis=0)).sum(axis=0)  # along the circle, not wrapping (as scikit-image)
    codes = np.where(changes <= 2, bits.sum(axis=0, dtype=np.int16), points + 1).astype(np.int16)
    return codes[0] if single else codes


def lbp_histograms(grey: np.ndarray, settings: Sequence[tuple[int, float]] = LBP_SETTINGS) -> pd.DataFrame:
    """Normalised histograms of uniform LBP codes (:func:`lbp_codes`) of each grey image (report 001's LBP).

    Parameters
    ----------
    grey : uint8 array, shape (n, height, width).
    settings : (points, radius) pairs; each adds ``points + 2`` bins.

    Returns
    -------
    DataFrame, n rows, columns ``p{points}r{radius}_{code:02d}``: the share of interior pixels with each
    code, summing to 1 per setting. Code ``points`` (all neighbours at least as bright) is flat regions and
    local minima, 0 local maxima, ``points + 1`` the non-uniform (noisy) patterns.
    """
    grey = np.asarray(grey)
    n = len(grey)
    frames = []
    for points, radius in settings:
        codes = lbp_codes(grey, points, radius).reshape(n, -1).astype(np.int64)
        bins = points + 2
        offsets = (np.arange(n, dtype=np.int64) * bins)[:, None]
        counts = np.bincount((codes + offsets).ravel(), minlength=n * bins).reshape(n, bins)
        names = [f"p{points}r{radius:g}_{code:02d}" for code in range(bins)]
        frames.append(pd.DataFrame(counts / codes.shape[1], columns=names))
    return pd.concat(frames, axis=1)


def glcm_offsets(distance: int, angles: Sequence[int] = GLCM_ANGLES) -> list[tuple[int, int]]:
    """(row, column) offsets of the pixel pairs at ``distance`` along each angle (degrees: 0, 45, 90, 135).

    0 degrees pairs a pixel with the one ``distance`` to its right, 90 with the one ``distance`` below,
    45 and 135 with the diagonal neighbours ``distance`` rows below and columns right or left (Haralick's
    chessboard distance). At distance 1 these are the offsets of ``skimage.feature.graycomatrix`` (angles
    0, pi/4, pi/2, 3 pi/4, with rows pointing down); for symmetric matrices the sign of an offset is irrelevant.
    """
    table = {0: (0, distance), 45: (distance, distance), 90: (distance, 0), 135: (distance, -distance)}
    unknown = set(angles) - set(table)
    if unknown:
        raise ValueError(f"angles must be among 0, 45, 90, 135 degrees, got {sorted(unknown)}")
    return [table[a] for a in angles]


def glcm(quantised: np.ndarray, levels: int, offset: tuple[int, int], symmetric: bool = True) -> np.ndarray:
    """Normalised grey-level co-occurrence matrix of each image in a stack, for one pixel offset.

    Parameters
    ----------
    quantised : integer array, shape (n, height, width), values 0..levels-1.
    levels : number of grey levels.
    offset : (rows, columns) from a pixel to its partner, e.g. (0, 1) the right neighbour.
    symmetric : count each pair both ways (i, j) and (j, i), as ``graycomatrix(symmetric=True)``.

    Returns
    -------
    float64 array, shape (n, levels, levels): ``P[k, i, j]`` the share of image k's pixel pairs in which
    the pixel has level i and its partner level j; each matrix sums to 1 (0 when no pair fits in the image).
    """
    q = np.asarray(quantised)
    if q.ndim != 3:
        raise ValueError(f"expected a stack (n, height, width), got shape {q.shape}")
    n, h, w = q.shape
    dr, dc = offset
    if abs(dr) >= h or abs(dc) >= w:
        return np.zeros((n, levels, levels))
    first = q[:, max(0, -dr) : h - max(0, dr), max(0, -dc) : w - max(0, dc)].astype(np.int64)
    second = q[:, max(0, dr) : h + min(0, dr), max(0, dc) : w + min(0, dc)].astype(np.int64)
    offsets = (np.arange(n, dtype=np.int64) * levels * levels)[:, None, None]
    counts = np.bincount((offsets + first * levels + second).ravel(), minlength=n * levels * levels)
    matrices = counts.reshape(n, levels, levels).astype(np.float64)
    if symmetric:
        matrices = matrices + matrices.transpose(0, 2, 1)
    totals = matrices.sum(axis=(1, 2), keepdims=True)
    return np.divide(matrices, totals, out=np.zeros_like(matrices), where=totals > 0)


def glcm_properties(matrices: np.ndarray) -> dict[str, np.ndarray]:
    """Haralick texture properties of normalised co-occurrence matrices, as ``skimage.feature.graycoprops``.

    Parameters
    ----------
    matrices : float array, shape (n, levels, levels), each summing to 1 (:func:`glcm`).

    Returns
    -------
    ``{property: (n,) array}`` for :data:`GLCM_PROPERTIES`, with i, j the level indices:
    contrast ``sum P (i-j)^2`` (0 for a constant image), dissimilarity ``sum P |i-j|``, homogeneity
    ``sum P / (1 + (i-j)^2)``, energy ``sqrt(sum P^2)`` (1 for a constant image), correlation of i and j
    (1 when either has zero variance, as scikit-image) and entropy ``-sum P ln P`` (nats).
    """
    p = np.asarray(matrices, dtype=np.float64)
    levels = p.shape[-1]
    i = np.arange(levels, dtype=np.float64)[:, None]
    j = np.arange(levels, dtype=np.float64)[None, :]
    diff = i - j
    mean_i = (p * i).sum(axis=(1, 2))
    mean_j = (p * j).sum(axis=(1, 2))
    di = i[None] - mean_i[:, None, None]
    dj = j[None] - mean_j[:, None, None]
    std_i = np.sqrt((p * di**2).sum(axis=(1, 2)))
    std_j = np.sqrt((p * dj**2).sum(axis=(1, 2)))
    cov = (p * di * dj).sum(axis=(1, 2))
    flat = (std_i < 1e-15) | (std_j < 1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = np.where(flat, 1.0, cov / np.where(flat, 1, std_i * std_j))
    log_p = np.log(p, where=p > 0, out=np.zeros_like(p))
    return {
        "contrast": (p * diff**2).sum(axis=(1, 2)),
        "dissimilarity": (p * np.abs(diff)).sum(axis=(1, 2)),
        "homogeneity": (p / (1 + diff**2)).sum(axis=(1, 2)),
        "energy": np.sqrt((p**2).sum(axis=(1, 2))),
        "correlation": correlation,
        "entropy": -(p * log_p).sum(axis=(1, 2)),
    }


def glcm_features(
    images: np.ndarray,
    channels: Sequence[str] = ("grey", "s", "r", "b"),
    levels: int = 16,
    distances: Sequence[int] = (1, 2),
    angles: Sequence[int] = GLCM_ANGLES,
) -> pd.DataFrame:
    """Haralick texture features (GLCM properties) of several colour channels of each RGB image.

    Each channel (of :data:`CHANNEL_NAMES`, 0-255) is quantised to ``levels`` equal bins, a symmetric
    normalised co-occurrence matrix is counted for every distance and angle (:func:`glcm`,
    :func:`glcm_offsets`), and each property of :data:`GLCM_PROPERTIES` is averaged over the angles.

    Parameters
    ----------
    images : uint8 array, shape (n, height, width, 3), RGB.
    channels : channels to describe; levels ``0-255 // (256 // levels)``.
    levels : grey levels after quantisation (256 must be divisible by it); few levels suit small images,
        whose 784 pixels would spread thinly over a 256 x 256 matrix.
    distances : pixel distances of the pairs.
    angles : degrees, among 0, 45, 90, 135.

    Returns
    -------
    DataFrame, n rows, columns ``{channel}_d{distance}_{property}``; contrast and dissimilarity are in
    quantised levels (squared for contrast), the others unitless.
    """
    images = _check_rgb_stack(images)
    if LEVELS % levels:
        raise ValueError(f"levels must divide 256, got {levels}")
    stack = _channel_stack(images)
    columns: dict[str, np.ndarray] = {}
    for name in channels:
        quantised = stack[..., CHANNEL_NAMES.index(name)] // (LEVELS // levels)
        for distance in distances:
            per_angle = [glcm_properties(glcm(quantised, levels, off)) for off in glcm_offsets(distance, angles)]
            for prop in GLCM_PROPERTIES:
                columns[f"{name}_d{distance}_{prop}"] = np.mean([values[prop] for values in per_angle], axis=0)
    return pd.DataFrame(columns)


# shape: the central cell and its nucleus ---------------------------------------------------------------


def _in_plane(structure2d: np.ndarray) -> np.ndarray:
    """A 3-D structuring element that connects pixels within each image of a stack, never across images."""
    structure2d = np.asarray(structure2d)
    structure = np.zeros((3, *structure2d.shape), dtype=structure2d.dtype)
    structure[1] = structure2d
    return structure


def central_object(masks: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Keep, in each binary image of a stack, only the connected component nearest the image centre.

    The distance of a component is that of its pixel nearest the centre (0 when it covers the centre); ties
    go to the larger component. Images without foreground stay empty.

    Parameters
    ----------
    masks : bool array, shape (n, height, width).
    connectivity : 1 for 4-connected components, 2 for 8-connected.

    Returns
    -------
    bool array of the same shape.
    """
    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    labels, count = ndimage.label(masks, _in_plane(ndimage.generate_binary_structure(2, connectivity)))
    if count == 0:
        return masks.copy()
    ids = np.arange(1, count + 1)
    image_of = ndimage.minimum(np.broadcast_to(np.arange(n)[:, None, None], labels.shape), labels, ids)
    rows, cols = np.mgrid[:h, :w]
    distance = np.hypot(rows - (h - 1) / 2, cols - (w - 1) / 2)
    nearest = ndimage.minimum(np.broadcast_to(distance, labels.shape), labels, ids)
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = np.lexsort((-area, nearest, image_of))
    first = order[np.r_[True, np.diff(np.asarray(image_of)[order]) != 0]]
    keep = np.zeros(count + 1, dtype=bool)
    keep[first + 1] = True
    return keep[labels]


def fill_holes(masks: np.ndarray) -> np.ndarray:
    """Fill the holes (background not connected to the image border) of each binary image of a stack."""
    masks = np.asarray(masks, dtype=bool)
    padded = np.pad(masks, ((1, 1), (0, 0), (0, 0)))  # the first and last images must not count as border
    filled = ndimage.binary_fill_holes(padded, _in_plane(ndimage.generate_binary_structure(2, 1)))
    return filled[1:-1]


def close_masks(masks: np.ndarray, radius: int = 1) -> np.ndarray:
    """Morphological closing of each binary image with a (2 radius + 1) square, joining nearby parts.

    Images are padded so that the closing does not erode objects touching the border.
    """
    masks = np.asarray(masks, dtype=bool)
    if radius <= 0:
        return masks.copy()
    pad = radius
    padded = np.pad(masks, ((0, 0), (pad, pad), (pad, pad)))
    closed = ndimage.binary_closing(padded, _in_plane(np.ones((2 * radius + 1,) * 2, dtype=bool)))
    return closed[:, pad:-pad, pad:-pad]


def stain_channel(images: np.ndarray) -> np.ndarray:
    """How blue-purple (stained) each pixel is: ``B - R + 128``, clipped to 0-255, uint8 (n, height, width).

    In May-Grunwald-Giemsa smears the white cells stain purple-blue (B above R) while red cells and the
    background are pink to orange (R above B), so this one channel separates them better than grey levels.
    """
    images = _check_rgb_stack(images)
    return np.clip(images[..., 2].astype(np.int16) - images[..., 0] + 128, 0, 255).astype(np.uint8)


def cell_masks(images: np.ndarray, closing: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Segment the central stained white cell and its nucleus in each RGB crop of a blood smear.

    1. Cell: pixels above the image's own Otsu threshold in saturation (:func:`rgb_to_hsv`, catches the
       orange granules of eosinophils) or in the stain channel (:func:`stain_channel`, catches the
       blue-purple nucleus and cytoplasm), closed (:func:`close_masks`, joins the lobes of a segmented
       nucleus), the component nearest the centre (:func:`central_object`), holes filled (:func:`fill_holes`).
    2. Nucleus: the pixels of the cell at most as bright as the Otsu threshold of grey levels computed over
       the cell's pixels only (the nucleus stains darker than the cytoplasm). When a crop shows little
       cytoplasm, this splits the nucleus itself into darker and lighter parts: at 28x28 pixels the
       nucleus mask is a rough one, the cell mask a good one.

    Parameters
    ----------
    images : uint8 array, shape (n, height, width, 3), RGB.
    closing : radius of the closing in pixels (0: none).

    Returns
    -------
    (cell, nucleus): bool arrays, shape (n, height, width); the nucleus lies within the cell.
    """
    images = _check_rgb_stack(images)
    n = len(images)
    saturation = rgb_to_hsv(images)[..., 1]
    stain = stain_channel(images)
    stained = (saturation > otsu_thresholds(saturation)[:, None, None]) | (
        stain > otsu_thresholds(stain)[:, None, None]
    )
    cell = fill_holes(central_object(close_masks(stained, closing)))
    grey = luma(images)
    inside = _histograms_uint8(grey.reshape(n, -1), weights=cell.reshape(n, -1))
    nucleus = cell & (grey <= _otsu_from_counts(inside)[:, None, None])
    return cell, nucleus


def perimeters(masks: np.ndarray, neighbourhood: int = 4) -> np.ndarray:
    """Perimeter of the foreground of each binary image of a stack, in pixels.

    The same estimate as ``skimage.measure.perimeter`` (boundary pixels weighted by their local pattern:
    1 for straight runs, sqrt(2) for diagonal ones, (1 + sqrt(2)) / 2 for corners), for a whole stack at
    once. A digital disk of radius r measures close to ``2 pi r``.

    Parameters
    ----------
    masks : bool array, shape (n, height, width) (or (height, width) for one image).
    neighbourhood : 4 or 8, the connectivity that defines boundary pixels (as scikit-image).

    Returns
    -------
    float64 array, shape (n,) (a float for one image): perimeters in pixel lengths.
    """
    masks = np.asarray(masks, dtype=bool)
    single = masks.ndim == 2
    stack = masks[None] if single else masks
    if neighbourhood not in (4, 8):
        raise ValueError(f"neighbourhood must be 4 or 8, got {neighbourhood}")
    strel = ndimage.generate_binary_structure(2, 1 if neighbourhood == 4 else 2)
    eroded = ndimage.binary_erosion(stack, _in_plane(strel), border_value=0)
    border = (stack & ~eroded).astype(np.int64)
    kernel = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]])
    patterns = ndimage.convolve(border, _in_plane(kernel), mode="constant", cval=0)
    weights = np.zeros(50, dtype=np.float64)
    weights[[5, 7, 15, 17, 25, 27]] = 1
    weights[[21, 33]] = np.sqrt(2)
    weights[[13, 23]] = (1 + np.sqrt(2)) / 2
    n = len(stack)
    offsets = (np.arange(n, dtype=np.int64) * 50)[:, None]
    counts = np.bincount((np.minimum(patterns.reshape(n, -1), 49) + offsets).ravel(), minlength=n * 50)
    result = counts.reshape(n, 50) @ weights
    return float(result[0]) if single else result


#: Columns of :func:`shape_features`, in order.
SHAPE_COLUMNS = (
    "area", "perimeter", "circularity", "equivalent_diameter", "major_axis", "minor_axis", "eccentricity",
    "solidity", "extent", "centre_offset",
)  # fmt: skip


def shape_features(masks: np.ndarray) -> pd.DataFrame:
    """Size and shape of the foreground of each binary image of a stack (one object per image).

    Definitions follow ``skimage.measure.regionprops`` of the foreground taken as one region.

    Parameters
    ----------
    masks : bool array, shape (n, height, width).

    Returns
    -------
    DataFrame, n rows, columns :data:`SHAPE_COLUMNS`, lengths in pixels and areas in pixels^2:

    - ``area``: foreground pixels; ``perimeter``: :func:`perimeters` (4-neighbourhood);
    - ``circularity``: ``4 pi area / perimeter^2``, about 1 for a disk, lower for ragged or elongated shapes;
    - ``equivalent_diameter``: diameter of the disk of the same area;
    - ``major_axis``, ``minor_axis``: lengths of the axes of the ellipse with the same second moments;
    - ``eccentricity``: of that ellipse, 0 for a circle, towards 1 for elongated shapes;
    - ``solidity``: area over the area of the convex hull (``skimage.morphology.convex_hull_image``);
    - ``extent``: area over the area of the bounding box;
    - ``centre_offset``: distance from the centroid to the image centre.

    Empty images get 0 everywhere except ``solidity``, ``extent`` and ``circularity`` (NaN).
    """
    from skimage.morphology import convex_hull_image

    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    weights = masks.astype(np.float64)
    area = weights.sum(axis=(1, 2))
    safe_area = np.where(area > 0, area, 1)
    rows = np.arange(h, dtype=np.float64)[None, :, None]
    cols = np.arange(w, dtype=np.float64)[None, None, :]
    centre_r = (weights * rows).sum(axis=(1, 2)) / safe_area
    centre_c = (weights * cols).sum(axis=(1, 2)) / safe_area
    dr = rows - centre_r[:, None, None]
    dc = cols - centre_c[:, None, None]
    mu_rr = (weights * dr**2).sum(axis=(1, 2)) / safe_area
    mu_cc = (weights * dc**2).sum(axis=(1, 2)) / safe_area
    mu_rc = (weights * dr * dc).sum(axis=(1, 2)) / safe_area
    half_trace = (mu_rr + mu_cc) / 2
    root = np.sqrt(((mu_rr - mu_cc) / 2) ** 2 + mu_rc**2)
    major, minor = half_trace + root, np.maximum(half_trace - root, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(major > 0, np.sqrt(np.clip(1 - minor / np.where(major > 0, major, 1), 0, 1)), 0)
        perimeter = perimeters(masks)
        circularity = np.where(perimeter > 0, 4 * np.pi * area / perimeter**2, np.nan)
        any_row, any_col = masks.any(axis=2), masks.any(axis=1)
        box = (h - np.argmax(any_row[:, ::-1], axis=1) - np.argmax(any_row, axis=1)) * (
            w - np.argmax(any_col[:, ::-1], axis=1) - np.argmax(any_col, axis=1)
        )
        extent = np.where(area > 0, area / box, np.nan)
    hull_area = np.array([convex_hull_image(m).sum() if m.any() else 0 for m in masks], dtype=np.float64)
    solidity = np.where(hull_area > 0, area / np.where(hull_area > 0, hull_area, 1), np.nan)
    offset = np.where(area > 0, np.hypot(centre_r - (h - 1) / 2, centre_c - (w - 1) / 2), 0)
    return pd.DataFrame(
        {
            "area": area, "perimeter": perimeter, "circularity": circularity,
            "equivalent_diameter": np.sqrt(4 * area / np.pi), "major_axis": 4 * np.sqrt(major),
            "minor_axis": 4 * np.sqrt(minor), "eccentricity": eccentricity, "solidity": solidity,
            "extent": extent, "centre_offset": offset,
        },
        columns=list(SHAPE_COLUMNS),
    )  # fmt: skip


def count_components(masks: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Number of connected components of each binary image of a stack, (n,) int (e.g. nucleus lobes)."""
    masks = np.asarray(masks, dtype=bool)
    labels, count = ndimage.label(masks, _in_plane(ndimage.generate_binary_structure(2, connectivity)))
    if count == 0:
        return np.zeros(len(masks), dtype=np.int64)
    image_of = ndimage.minimum(np.broadcast_to(np.arange(len(masks))[:, None, None], labels.shape), labels,
                               np.arange(1, count + 1))
    return np.bincount(np.asarray(image_of, dtype=np.int64), minlength=len(masks))


def cell_shape_features(
    images: np.ndarray, closing: int = 1, masks: tuple[np.ndarray, np.ndarray] | None = None
) -> pd.DataFrame:
    """Shape of the central cell and of its nucleus (:func:`cell_masks`), with report 001's cell perimeter.

    Parameters
    ----------
    images : uint8 array, shape (n, height, width, 3), RGB.
    closing : passed to :func:`cell_masks`.
    masks : (cell, nucleus) already computed by :func:`cell_masks`, to avoid segmenting twice.

    Returns
    -------
    DataFrame, n rows: ``cell_*`` and ``nucleus_*`` for every column of :func:`shape_features` (pixels), plus
    ``nucleus_fraction`` (nucleus area over cell area, 0-1, NaN without a cell), ``nucleus_lobes``
    (8-connected parts of the nucleus) and ``cell_fraction`` (cell area over image area, 0-1).
    """
    images = _check_rgb_stack(images)
    cell, nucleus = masks if masks is not None else cell_masks(images, closing)
    frames = [shape_features(cell).add_prefix("cell_"), shape_features(nucleus).add_prefix("nucleus_")]
    table = pd.concat(frames, axis=1)
    cell_area = table["cell_area"].to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        table["nucleus_fraction"] = np.where(cell_area > 0, table["nucleus_area"] / cell_area, np.nan)
    table["nucleus_lobes"] = count_components(nucleus)
    table["cell_fraction"] = cell_area / (images.shape[1] * images.shape[2])
    return table


def region_colour_features(
    images: np.ndarray, closing: int = 1, masks: tuple[np.ndarray, np.ndarray] | None = None
) -> pd.DataFrame:
    """Mean colour of the nucleus, the cytoplasm (cell minus nucleus) and the background of each crop.

    Regions come from :func:`cell_masks` (or ``masks``, its result). Granules colour the cytoplasm (orange in
    eosinophils, dark in basophils), so its colour separates classes that the whole-image mean mixes with the
    background.

    Returns
    -------
    DataFrame, n rows, columns ``{region}_{channel}`` for regions nucleus, cytoplasm, background and
    channels r, g, b, h, s, v (0-255); NaN where a region is empty.
    """
    images = _check_rgb_stack(images)
    cell, nucleus = masks if masks is not None else cell_masks(images, closing)
    channels = _channel_stack(images)[..., :6].astype(np.float64)
    regions = {"nucleus": nucleus, "cytoplasm": cell & ~nucleus, "background": ~cell}
    columns: dict[str, np.ndarray] = {}
    for region, mask in regions.items():
        pixels = mask.sum(axis=(1, 2)).astype(np.float64)
        sums = np.einsum("nhwc,nhw->nc", channels, mask.astype(np.float64))
        with np.errstate(divide="ignore", invalid="ignore"):
            means = np.where(pixels[:, None] > 0, sums / pixels[:, None], np.nan)
        for i, name in enumerate(CHANNEL_NAMES[:6]):
            columns[f"{region}_{name}"] = means[:, i]
    return pd.DataFrame(columns)


# all families at once ------------------------------------------------------------------------------------


def _features_of_chunk(images: np.ndarray, families: Sequence[str]) -> pd.DataFrame:
    masks = cell_masks(images) if {"shape", "region_colour"} & set(families) else None
    makers = {
        "colour": colour_statistics,
        "histogram": colour_histograms,
        "lbp": lambda x: lbp_histograms(luma(x)),
        "glcm": glcm_features,
        "shape": lambda x: cell_shape_features(x, masks=masks),
        "region_colour": lambda x: region_colour_features(x, masks=masks),
    }
    return pd.concat([makers[f](images).add_prefix(f"{f}.") for f in families], axis=1)


def handcrafted_features(
    images: np.ndarray,
    n_jobs: int = 1,
    chunk_size: int = 1000,
    families: Sequence[str] = FEATURE_FAMILIES,
) -> pd.DataFrame:
    """All hand-crafted features of a stack of RGB crops: one row per image, columns ``family.feature``.

    Families, in :data:`FEATURE_FAMILIES` order (each its own function, with units in its docstring):

    ==================  ==================================================================================
    ``colour``          :func:`colour_statistics`: mean (report 001's mean RGB), std, quartiles of R G B H S V
                        and grey
    ``histogram``       :func:`colour_histograms`: 16-bin histograms of R, G, B, H, S, V
    ``lbp``             :func:`lbp_histograms`: uniform LBP of grey at (8 points, radius 1) and (16, 2)
    ``glcm``            :func:`glcm_features`: Haralick properties of grey, saturation, red and blue
    ``shape``           :func:`cell_shape_features`: area, perimeter (report 001), eccentricity, solidity...
                        of the central cell and its nucleus
    ``region_colour``   :func:`region_colour_features`: mean colour of nucleus, cytoplasm and background
    ==================  ==================================================================================

    Parameters
    ----------
    images : uint8 array, shape (n, height, width, 3), RGB.
    n_jobs : worker processes (joblib; -1 all cores); the stack is cut into chunks of at most ``chunk_size``
        images, at least one per process, which also bounds memory. 1 computes in this process.
    chunk_size : most images per chunk.
    families : which families to compute, a subset of :data:`FEATURE_FAMILIES`.

    Returns
    -------
    DataFrame, n rows (index 0..n-1), float columns named ``family.feature``; NaN where a feature is
    undefined (e.g. the colour of an empty nucleus). Every image is computed independently, so the result
    does not depend on ``n_jobs`` or ``chunk_size``.
    """
    images = _check_rgb_stack(images)
    unknown = [f for f in families if f not in FEATURE_FAMILIES]
    if unknown:
        raise ValueError(f"unknown feature families {unknown}; use {', '.join(FEATURE_FAMILIES)}")
    if n_jobs != 1:  # at least one chunk per process, so that small stacks are shared out too
        workers = n_jobs if n_jobs > 0 else os.cpu_count() or 1
        chunk_size = max(1, min(chunk_size, -(-len(images) // workers)))
    starts = range(0, max(len(images), 1), chunk_size)
    chunks = [images[s : s + chunk_size] for s in starts]
    if n_jobs == 1 or len(chunks) == 1:
        parts = [_features_of_chunk(chunk, families) for chunk in chunks]
    else:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=n_jobs)(delayed(_features_of_chunk)(chunk, families) for chunk in chunks)
    return pd.concat(parts, ignore_index=True).astype(np.float64)


def feature_families(columns: Iterable[str]) -> list[str]:
    """The family of each ``family.feature`` column name of :func:`handcrafted_features`."""
    return [str(column).split(".", 1)[0] for column in columns]


# --- instances in label images -----------------------------------------------------------------------------


def instance_areas(labels: np.ndarray) -> np.ndarray:
    """Area of each instance of a label image, in pixels.

    Parameters
    ----------
    labels : integer array, shape (height, width): 0 background, 1..N one id per object (ids may skip).

    Returns
    -------
    int64 array, shape (number of ids present,): the pixel count of each present id, in increasing id
    order. Ids absent from the image are left out, so the length is the number of objects.
    """
    counts = _bincount_labels(labels)[1:]
    return counts[counts > 0]


def _bincount_labels(labels: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer image, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 is background)")
    flat_weights = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    return np.bincount(labels.ravel(), weights=flat_weights, minlength=1)


def _border_ids(labels: np.ndarray) -> np.ndarray:
    """Ids (> 0) of instances that touch the image border."""
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    ids = np.unique(border)
    return ids[ids > 0]


def nucleus_table(data: SegmentationSet) -> pd.DataFrame:
    """One row per object (nucleus) of every image of a :class:`~cellkit.datasets.SegmentationSet`.

    Returns
    -------
    DataFrame with columns

    - ``image_id``, ``group`` (e.g. the DSB size group), ``label`` (the id in the label image);
    - ``area_px``: area in pixels;
    - ``mean_intensity``: mean grey level of the object's pixels, in the image's units (0-255 for 8-bit);
    - ``on_border``: True when the object touches the image border (its area is then truncated).
    """
    frames = []
    for image, labels, image_id, group in zip(data.images, data.labels, data.ids, data.groups, strict=True):
        areas = _bincount_labels(labels)
        sums = _bincount_labels(labels, weights=image)
        ids = np.flatnonzero(areas[1:]) + 1
        frames.append(
            pd.DataFrame(
                {
                    "image_id": image_id,
                    "group": group,
                    "label": ids,
                    "area_px": areas[ids],
                    "mean_intensity": sums[ids] / areas[ids],
                    "on_border": np.isin(ids, _border_ids(labels)),
                }
            )
        )
    columns = ["image_id", "group", "label", "area_px", "mean_intensity", "on_border"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


#: Columns of :func:`nucleus_morphology` that describe a nucleus (the rest identify it).
MORPHOLOGY_COLUMNS = (
    "area_px", "perimeter_px", "circularity", "major_axis_px", "minor_axis_px", "eccentricity", "solidity",
    "extent", "relative_area", "relative_intensity", "intensity_cv",
)  # fmt: skip


def nucleus_morphology(data: SegmentationSet) -> pd.DataFrame:
    """Size, shape and brightness of every object (nucleus) of every image, one row each (notebook 09).

    Returns
    -------
    DataFrame with ``image_index`` (position in ``data``), ``image_id``, ``group``, ``label`` (the id in the label
    image) and :data:`MORPHOLOGY_COLUMNS`, as ``skimage.measure.regionprops`` defines them:

    - ``area_px``, ``perimeter_px`` (pixels^2, pixels); ``circularity`` ``4 pi area / perimeter^2`` (about 1 for
      a disk, lower for ragged or elongated outlines);
    - ``major_axis_px``, ``minor_axis_px``, ``eccentricity`` of the ellipse with the same second moments;
    - ``solidity`` (area over convex hull area: low for kidney shapes or two touching nuclei), ``extent``
      (area over bounding box area);
    - ``relative_area``: area over the median area of its image's nuclei (1 = typical for its image, so that
      images at different magnifications compare);
    - ``relative_intensity``: mean grey level of the nucleus over the median of that over its image's nuclei
      (1 = typical for its image, so stains and exposures of different images compare);
    - ``intensity_cv``: standard deviation over mean of its grey levels (texture: uniform vs speckled);
    - ``on_border``: True when the object touches the image border (its outline is then partly the border's).
    """
    from skimage.measure import regionprops_table

    properties = ("label", "area", "perimeter", "axis_major_length", "axis_minor_length", "eccentricity",
                  "solidity", "extent", "intensity_mean", "intensity_std")
    frames = []
    for index, (image, labels, image_id, group) in enumerate(
        zip(data.images, data.labels, data.ids, data.groups, strict=True)
    ):
        grey = np.asarray(image, dtype=np.float64)
        grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
        table = pd.DataFrame(regionprops_table(np.asarray(labels, dtype=np.int64), grey, properties=properties))
        if table.empty:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            frames.append(pd.DataFrame({
                "image_index": index, "image_id": image_id, "group": group, "label": table["label"],
                "area_px": table["area"], "perimeter_px": table["perimeter"],
                "circularity": 4 * np.pi * table["area"] / table["perimeter"] ** 2,
                "major_axis_px": table["axis_major_length"], "minor_axis_px": table["axis_minor_length"],
                "eccentricity": table["eccentricity"], "solidity": table["solidity"], "extent": table["extent"],
                "relative_area": table["area"] / table["area"].median(),
                "relative_intensity": table["intensity_mean"] / table["intensity_mean"].median(),
                "intensity_cv": table["intensity_std"] / table["intensity_mean"],
                "on_border": np.isin(table["label"], _border_ids(labels)),
            }))  # fmt: skip
    columns = ["image_index", "image_id", "group", "label", *MORPHOLOGY_COLUMNS, "on_border"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def nuclei_stats(data: SegmentationSet) -> pd.DataFrame:
    """One row per image of a :class:`~cellkit.datasets.SegmentationSet`: size, object count and intensities.

    Returns
    -------
    DataFrame with columns

    - ``image_id``, ``group``, ``height``, ``width`` (pixels);
    - ``n_nuclei``: number of objects (distinct ids > 0);
    - ``nuclei_fraction``: share of the image's pixels inside an object, 0-1;
    - ``median_area_px``, ``mean_area_px``: of the image's objects, in pixels (NaN without objects);
    - ``background_mean``, ``nuclei_mean``: mean grey level of background and of object pixels, in the
      image's units (NaN when a class has no pixels).
    """
    rows = []
    for image, labels, image_id, group in zip(data.images, data.labels, data.ids, data.groups, strict=True):
        areas = instance_areas(labels)
        foreground = labels > 0
        n_fg = int(foreground.sum())
        n_bg = labels.size - n_fg
        total = float(image.sum(dtype=np.float64))
        fg_sum = float(image[foreground].sum(dtype=np.float64))
        rows.append(
            {
                "image_id": image_id,
                "group": group,
                "height": labels.shape[0],
                "width": labels.shape[1],
                "n_nuclei": len(areas),
                "nuclei_fraction": n_fg / labels.size,
                "median_area_px": float(np.median(areas)) if len(areas) else np.nan,
                "mean_area_px": float(areas.mean()) if len(areas) else np.nan,
                "background_mean": (total - fg_sum) / n_bg if n_bg else np.nan,
                "nuclei_mean": fg_sum / n_fg if n_fg else np.nan,
            }
        )
    return pd.DataFrame(rows)


def intensity_histograms(data: SegmentationSet) -> pd.DataFrame:
    """Grey-level histograms of background and of object pixels, summed over the images of each group.

    Images are read as 8-bit grey levels: uint8 as stored, other integer types scaled by their type's
    range (uint16 // 257), floats taken as 0-1.

    Returns
    -------
    DataFrame with one row per group and grey level: ``group``, ``level`` (0-255), ``background`` and
    ``nuclei`` (pixel counts), and ``background_density``, ``nuclei_density`` (each count divided by
    its group's total, so that the two sum to 1 over the levels).
    """
    totals: dict[str, np.ndarray] = {}
    for image, labels, group in zip(data.images, data.labels, data.groups, strict=True):
        grey = _as_uint8(image).ravel()
        foreground = (np.asarray(labels) > 0).ravel()
        both = np.bincount(grey + LEVELS * foreground, minlength=2 * LEVELS).reshape(2, LEVELS)
        totals[group] = totals.get(group, 0) + both
    frames = []
    for group, (background, nuclei) in totals.items():
        frame = pd.DataFrame({"group": group, "level": np.arange(LEVELS), "background": background, "nuclei": nuclei})
        frame["background_density"] = background / max(background.sum(), 1)
        frame["nuclei_density"] = nuclei / max(nuclei.sum(), 1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _as_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.integer):
        top = np.iinfo(image.dtype).max
        return (image.astype(np.float64) * 255 / top).round().astype(np.uint8)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


# --- describing a set --------------------------------------------------------------------------------------


def image_size_counts(shapes: Iterable[Sequence[int]]) -> pd.DataFrame:
    """How many images have each size.

    Parameters
    ----------
    shapes : one (height, width, ...) per image, e.g. ``[im.shape for im in images]``; extra entries
        (channels) are ignored.

    Returns
    -------
    DataFrame with columns ``height``, ``width`` (pixels), ``size`` (``"HxW"``) and ``n_images``, most
    frequent size first.
    """
    table = pd.DataFrame([tuple(int(s) for s in shape[:2]) for shape in shapes], columns=["height", "width"])
    counts = table.value_counts(["height", "width"]).rename("n_images").reset_index()
    counts.insert(2, "size", counts["height"].astype(str) + "x" + counts["width"].astype(str))
    return counts.sort_values(["n_images", "height", "width"], ascending=[False, True, True], ignore_index=True)


def summarise(values: Iterable[float]) -> dict[str, float]:
    """Count, mean, min, 5th/25th/50th/75th/95th percentiles, max and IQR of ``values`` (NaN ignored).

    Returns plain floats (``n`` an int), ready for ``metrics.json``.
    """
    values = np.asarray(list(values) if not isinstance(values, np.ndarray | pd.Series) else values, float)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"n": 0}
    p5, q1, median, q3, p95 = np.percentile(values, [5, 25, 50, 75, 95])
    return {
        "n": len(values), "mean": float(values.mean()), "min": float(values.min()), "p5": float(p5),
        "q1": float(q1), "median": float(median), "q3": float(q3), "p95": float(p95),
        "max": float(values.max()), "iqr": float(q3 - q1),
    }  # fmt: skip


def stratified_sample(groups: Sequence, n: int | None, seed: int = 0) -> np.ndarray:
    """Positions of a seeded random sample of about ``n`` items that keeps each group's share.

    Every group keeps at least one item (so rare groups, such as DSB's single 1040x1388 image, stay in a
    small sample); the other places are shared in proportion to group size. ``n`` None, or at least the
    number of items, returns all positions.

    Returns
    -------
    int array of positions into ``groups``, sorted.
    """
    groups = np.asarray(groups)
    if n is None or n >= len(groups):
        return np.arange(len(groups))
    rng = np.random.default_rng(seed)
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if n < len(names):
        raise ValueError(f"a sample of {n} cannot hold one of each of {len(names)} groups")
    quota = np.maximum(1, np.floor(sizes * n / len(groups))).astype(int)
    # hand out what rounding left over, largest remainders first, never beyond a group's size
    remainders = sizes * n / len(groups) - np.floor(sizes * n / len(groups))
    for index in np.argsort(-remainders, kind="stable"):
        if quota.sum() >= n:
            break
        quota[index] = min(quota[index] + 1, sizes[index])
    chosen = [rng.permutation(np.flatnonzero(inverse == g))[:k] for g, k in enumerate(quota)]
    return np.sort(np.concatenate(chosen))
