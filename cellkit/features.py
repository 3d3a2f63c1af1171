"""Hand-crafted features of images and of the objects in them, as numpy arrays and pandas tables.

Every function works on a whole set at once (vectorised over images or over the objects of an image), says
the shapes and units it takes and returns, and imports no Keras, so it loads fast and is tested without it.

Sections
--------
- Grey levels and thresholds: :func:`luma`, :func:`otsu_thresholds`.
- Colour and intensity of RGB crops (report 001's EDA): :func:`colour_intensity_features`.
- Instances in label images (nuclei): :func:`instance_areas`, :func:`nucleus_table`, :func:`nuclei_stats`,
  :func:`intensity_histograms`.
- Describing a set: :func:`image_size_counts`, :func:`summarise`, :func:`stratified_sample`.

>>> from cellkit import datasets, features
>>> table = features.colour_intensity_features(datasets.load_pbc28("train").images)
>>> per_image = features.nuclei_stats(datasets.load_dsb2018())
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

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
    n = len(stack)
    offsets = (np.arange(n, dtype=np.int64) * LEVELS)[:, None]
    counts = np.bincount((stack + offsets).ravel(), minlength=n * LEVELS).reshape(n, LEVELS)
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
    constant = stack.min(axis=1) == stack.max(axis=1)
    thresholds[constant] = stack[constant, 0]
    return thresholds[0] if single else thresholds


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
