"""Simulated microscopy images with exact ground truth, reproducible from a seed.

Three uses: fast tests that need images with known answers; the loud last-resort stand-in when a real
dataset is missing; and notebook 08, which needs paired fluorescence and phase-contrast images of the
same cells (no open real pairs exist).

- :func:`nuclei_field` draws one field of nuclei: a fluorescence image, the paired phase-contrast-like
  image of the same cells, and the exact instance mask.
- :func:`nuclei_dataset` and :func:`paired_dataset` stack fields into :class:`SegmentationSet` objects.
- :func:`blood_cell_crops` draws small RGB crops of the eight PBC / BloodMNIST classes.

Units: lengths and positions are in pixels (row, column), angles in radians, intensities before the
conversion to ``uint8`` in expected photon counts. The same seed gives identical arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cellkit.datasets.containers import ImageSet, SegmentationSet

BLOOD_CLASSES = [
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
]

_PLACEMENT_ATTEMPTS = 300  # candidate positions tried per nucleus before giving up on it
_GAP = 2.0  # pixels kept free between nuclei that are not meant to touch, so they are never 4-adjacent


# --------------------------------------------------------------------------------------------------
# Nuclei fields
# --------------------------------------------------------------------------------------------------


@dataclass
class SyntheticField:
    """One simulated field of nuclei with its exact ground truth.

    Attributes
    ----------
    fluorescence : uint8 array (height, width). Dark background, bright nuclei: Poisson photon counts
        scaled so that the brightest possible expected count maps to 255.
    phase : uint8 array (height, width). The same cells as seen in phase contrast: mid-grey background,
        nuclei with a darker interior and a bright halo around their edge, weaker contrast, its own
        illumination and noise.
    labels : uint16 array (height, width). 0 is background, 1..N one id per nucleus, consecutive.
    centres : float array (N, 2), the centre of nucleus ``i + 1`` as (row, column) in pixels.
    semi_axes : float array (N, 2), its (major, minor) semi-axes in pixels.
    angles : float array (N,), the direction of its major axis in radians (0 = along the columns).
    touching : pairs of label ids that were placed touching each other (sharing a boundary).
    """

    fluorescence: np.ndarray
    phase: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    semi_axes: np.ndarray
    angles: np.ndarray
    touching: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_nuclei(self) -> int:
        """Number of nuclei N in ``labels``."""
        return len(self.centres)


def nuclei_field(
    shape: tuple[int, int] = (256, 256),
    n_nuclei: int = 25,
    seed: int = 0,
    radius_range: tuple[float, float] = (6.0, 14.0),
    touching_fraction: float = 0.3,
    blur_sigma: float = 1.5,
    photons: float = 300.0,
    background: float = 0.08,
    gradient: float = 0.5,
) -> SyntheticField:
    """Simulate one fluorescence field of nuclei, its phase-contrast twin and the exact instance mask.

    Nuclei are ellipses with random orientation, brightness and a slight chromatin texture. About
    ``touching_fraction`` of them are placed overlapping a neighbour a little; every pixel in the overlap
    goes to the nearer centre, so the two share a boundary as touching nuclei do in real images.
    The optics blur the image and the camera counts photons, so the noise is Poisson.

    Parameters
    ----------
    shape : (height, width) of the images in pixels.
    n_nuclei : number of nuclei asked for. Placement is random without overlaps; if a nucleus finds
        no room after many attempts it is left out, so the field has ``<= n_nuclei`` nuclei (always
        exactly ``n_nuclei`` at the defaults). ``SyntheticField.n_nuclei`` says how many were drawn.
    seed : random seed; the same seed gives identical arrays.
    radius_range : (min, max) major semi-axis in pixels. The minor semi-axis is 65-100 % of it.
    touching_fraction : fraction of nuclei, in [0, 1], placed touching an earlier nucleus.
        0 gives nuclei at least two pixels apart from each other.
    blur_sigma : standard deviation of the Gaussian point-spread function in pixels (0 = no blur).
    photons : expected photon count at the centre of the brightest nucleus under full illumination.
        Lower means noisier (the signal-to-noise ratio is about ``sqrt(photons)``).
    background : background light as a fraction of ``photons`` (autofluorescence, out-of-focus light).
    gradient : strength of the uneven illumination in [0, 1]: a linear ramp plus a vignette; the
        illumination varies by roughly this fraction across the field. 0 is flat.

    Returns
    -------
    SyntheticField with ``fluorescence`` and ``phase`` (uint8, ``shape``) and ``labels`` (uint16).
    """
    _check_field_args(shape, n_nuclei, radius_range, touching_fraction, gradient)
    rng = np.random.default_rng(seed)
    centres, axes, angles, touching = _place_nuclei(rng, shape, n_nuclei, radius_range, touching_fraction)
    labels, rho = _render_ellipses(shape, centres, axes, angles)
    labels, kept = _one_component_per_label(labels)
    rho[labels == 0] = 1.0
    touching = _renumber_pairs(touching, kept)
    centres, axes, angles = centres[kept], axes[kept], angles[kept]

    texture = _smooth_noise(rng, shape, sigma=1.2)
    fluorescence = _fluorescence_image(rng, labels, rho, texture, blur_sigma, photons, background, gradient)
    phase = _phase_image(rng, labels, rho, texture, gradient)
    return SyntheticField(fluorescence, phase, labels, centres, axes, angles, touching)


def _check_field_args(
    shape: tuple[int, int],
    n_nuclei: int,
    radius_range: tuple[float, float],
    touching_fraction: float,
    gradient: float,
) -> None:
    """Raise ValueError with a one-line reason for arguments nuclei_field cannot honour."""
    low, high = radius_range
    if not 0 < low <= high:
        raise ValueError(f"radius_range must be 0 < min <= max, got {radius_range}")
    if min(shape) < 2 * high + 4:
        raise ValueError(f"shape {tuple(shape)} is too small for nuclei of radius up to {high} px")
    if n_nuclei < 0:
        raise ValueError(f"n_nuclei must be >= 0, got {n_nuclei}")
    if not 0 <= touching_fraction <= 1:
        raise ValueError(f"touching_fraction must be in [0, 1], got {touching_fraction}")
    if not 0 <= gradient <= 1:
        raise ValueError(f"gradient must be in [0, 1], got {gradient}")


def _ellipse_radius(a: np.ndarray, b: np.ndarray, theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Distance in pixels from an ellipse's centre to its edge in direction ``phi``.

    ``a``, ``b`` are the semi-axes, ``theta`` the direction of ``a``; all broadcast together.
    """
    t = phi - theta
    return a * b / np.hypot(b * np.cos(t), a * np.sin(t))


def _place_nuclei(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n: int,
    radius_range: tuple[float, float],
    touching_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Choose centres (N, 2), semi-axes (N, 2) and angles (N,) of up to ``n`` ellipses.

    Also returns the pairs of 1-based ids placed touching. A nucleus meant to touch falls back to a free
    position when no touching one fits, and is dropped when no free one fits either.
    """
    n_touch = min(round(touching_fraction * n), max(n - 1, 0))
    # The first nucleus has nothing to touch, so the touching ones are chosen among the later ones.
    to_touch = set(rng.choice(np.arange(1, n), size=n_touch, replace=False).tolist()) if n_touch else set()
    centres: list[np.ndarray] = []
    axes: list[tuple[float, float]] = []
    angles: list[float] = []
    touching: list[tuple[int, int]] = []
    for k in range(n):
        a = rng.uniform(*radius_range)
        b = a * rng.uniform(0.65, 1.0)
        theta = rng.uniform(0.0, np.pi)
        centre, partner = None, None
        if k in to_touch and centres:
            centre, partner = _touching_position(rng, shape, (a, b, theta), centres, axes, angles)
        if centre is None:
            centre = _free_position(rng, shape, a, centres, axes)
        if centre is None:
            continue
        centres.append(centre)
        axes.append((a, b))
        angles.append(theta)
        if partner is not None:
            touching.append((partner + 1, len(centres)))
    return (
        np.array(centres, dtype=float).reshape(-1, 2),
        np.array(axes, dtype=float).reshape(-1, 2),
        np.array(angles, dtype=float),
        touching,
    )


def _inside(shape: tuple[int, int], candidates: np.ndarray, radius: float) -> np.ndarray:
    """Which (row, column) candidates (M, 2) keep a circle of ``radius`` px one pixel inside the image."""
    low = radius + 1.0
    high = np.array(shape, dtype=float) - radius - 2.0
    return np.all((candidates >= low) & (candidates <= high), axis=1)


def _clear_of(candidates: np.ndarray, radius: float, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Which candidates (M, 2) keep their bounding circle ``_GAP`` px away from every existing circle."""
    if len(centres) == 0:
        return np.ones(len(candidates), dtype=bool)
    distance = np.linalg.norm(candidates[:, None, :] - centres[None, :, :], axis=2)
    return np.all(distance > radius + radii[None, :] + _GAP, axis=1)


def _free_position(
    rng: np.random.Generator,
    shape: tuple[int, int],
    a: float,
    centres: list[np.ndarray],
    axes: list[tuple[float, float]],
) -> np.ndarray | None:
    """A centre for an ellipse of major semi-axis ``a`` clear of all others, or None if none fits."""
    candidates = rng.uniform((0.0, 0.0), shape, size=(_PLACEMENT_ATTEMPTS, 2))
    existing = np.array(centres).reshape(-1, 2)
    radii = np.array([ax[0] for ax in axes])
    ok = _inside(shape, candidates, a) & _clear_of(candidates, a, existing, radii)
    return candidates[np.argmax(ok)] if ok.any() else None


def _touching_position(
    rng: np.random.Generator,
    shape: tuple[int, int],
    ellipse: tuple[float, float, float],
    centres: list[np.ndarray],
    axes: list[tuple[float, float]],
    angles: list[float],
) -> tuple[np.ndarray | None, int | None]:
    """A centre that makes the new ellipse overlap one existing ellipse slightly and no other.

    Returns (centre, index of the partner) or (None, None) when no candidate fits.
    """
    a, b, theta = ellipse
    existing = np.array(centres)
    ex_axes = np.array(axes)
    ex_angles = np.array(angles)
    partner = rng.integers(0, len(centres), size=_PLACEMENT_ATTEMPTS)
    phi = rng.uniform(0.0, 2 * np.pi, size=_PLACEMENT_ATTEMPTS)
    r_partner = _ellipse_radius(ex_axes[partner, 0], ex_axes[partner, 1], ex_angles[partner], phi)
    r_new = _ellipse_radius(a, b, theta, phi)
    # Overlap along the line of centres by 1 px up to a third of the smaller radius: enough for a shared
    # boundary after the nearest-centre split, little enough to keep each nucleus convex-looking.
    smaller = np.minimum(r_partner, r_new)
    overlap = 1.0 + rng.uniform(0.0, 1.0, size=_PLACEMENT_ATTEMPTS) * np.maximum(smaller / 3 - 1.0, 0.0)
    distance = np.maximum(r_partner + r_new - overlap, np.maximum(r_partner, r_new) + 1.0)
    candidates = existing[partner] + distance[:, None] * np.stack([np.sin(phi), np.cos(phi)], axis=1)
    ok = _inside(shape, candidates, a)
    for i in np.flatnonzero(ok):
        others = np.arange(len(centres)) != partner[i]
        if _clear_of(candidates[i : i + 1], a, existing[others], ex_axes[others, 0])[0]:
            return candidates[i], int(partner[i])
    return None, None


def _render_ellipses(
    shape: tuple[int, int], centres: np.ndarray, axes: np.ndarray, angles: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise the ellipses into a label image (uint16) and a normalised radius map (float).

    A pixel covered by several ellipses goes to the one whose centre is nearest. The radius map holds,
    for every nucleus pixel, its distance from the centre relative to the edge (0 at the centre, 1 at
    the edge) and 1 elsewhere; it shapes the intensity profile of each nucleus.
    """
    labels = np.zeros(shape, dtype=np.uint16)
    rho = np.ones(shape, dtype=float)
    nearest = np.full(shape, np.inf)
    for i, ((cy, cx), (a, b), theta) in enumerate(zip(centres, axes, angles, strict=True)):
        box = (
            slice(max(int(cy - a) - 1, 0), min(int(cy + a) + 2, shape[0])),
            slice(max(int(cx - a) - 1, 0), min(int(cx + a) + 2, shape[1])),
        )
        dy, dx = np.ogrid[box]
        dy, dx = dy - cy, dx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        rho_i = np.hypot(u / a, v / b)
        distance = np.hypot(dy, dx)
        take = (rho_i < 1.0) & (distance < nearest[box])
        labels[box][take] = i + 1
        rho[box][take] = rho_i[take]
        nearest[box][take] = distance[take]
    return labels, rho


def _one_component_per_label(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the largest 4-connected piece of each label, then renumber ids to 1..N consecutively.

    The nearest-centre split can, in rare tight overlaps, cut a sliver off a nucleus; such slivers
    become background. Returns the new labels and the 0-based indices of the old ids that survived.
    """
    labels = labels.copy()
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        own = labels[box] == i
        pieces, n_pieces = ndimage.label(own)
        if n_pieces > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            labels[box][own & (pieces != np.argmax(sizes) + 1)] = 0
    present = np.unique(labels)
    present = present[present > 0]
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
    return lookup[labels], (present - 1).astype(int)


def _renumber_pairs(pairs: list[tuple[int, int]], kept: np.ndarray) -> list[tuple[int, int]]:
    """Map 1-based id pairs through the renumbering that kept the 0-based indices ``kept``."""
    new_id = {int(old) + 1: new + 1 for new, old in enumerate(kept)}
    return [(new_id[p], new_id[q]) for p, q in pairs if p in new_id and q in new_id]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise of unit standard deviation, same shape; texture for nuclei."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / max(float(noise.std()), 1e-12)


def _illumination(rng: np.random.Generator, shape: tuple[int, int], gradient: float) -> np.ndarray:
    """Uneven illumination (height, width), about 1: a linear ramp times a vignette.

    The ramp in a random direction spans ``1 +- gradient / 2``; the vignette darkens from an off-centre
    optical axis to ``1 - gradient / 2`` in the farthest corner.
    """
    yy, xx = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    direction = rng.uniform(0.0, 2 * np.pi)
    ramp = (np.cos(direction) * xx + np.sin(direction) * yy) / np.sqrt(2)
    oy, ox = rng.uniform(-0.3, 0.3, size=2)
    r2 = (yy - oy) ** 2 + (xx - ox) ** 2
    vignette = 1.0 - 0.5 * gradient * r2 / r2.max()
    return (1.0 + 0.5 * gradient * ramp) * vignette


def _fluorescence_image(
    rng: np.random.Generator,
    labels: np.ndarray,
    rho: np.ndarray,
    texture: np.ndarray,
    blur_sigma: float,
    photons: float,
    background: float,
    gradient: float,
) -> np.ndarray:
    """Fluorescence image (uint8, same shape as ``labels``): dye density -> blur -> light -> photons."""
    n = int(labels.max())
    brightness = np.concatenate([[0.0], rng.uniform(0.55, 1.0, size=n)])
    # Domed profile (thicker in the middle) with slight chromatin texture.
    dye = brightness[labels] * (1.0 - 0.3 * rho**2) * (1.0 + 0.12 * texture)
    dye = np.clip(dye, 0.0, None)
    if blur_sigma > 0:
        dye = ndimage.gaussian_filter(dye, blur_sigma)
    light = _illumination(rng, labels.shape, gradient)
    counts = rng.poisson(photons * light * (background + dye))
    full_scale = photons * (1.0 + background) * (1.0 + 0.5 * gradient)
    return _to_uint8(counts / full_scale)


def _phase_image(
    rng: np.random.Generator,
    labels: np.ndarray,
    rho: np.ndarray,
    texture: np.ndarray,
    gradient: float,
) -> np.ndarray:
    """Phase-contrast-like image (uint8, same shape as ``labels``) of the same nuclei.

    Phase contrast responds to the optical path length (cell thickness) relative to its surroundings:
    a high-pass of the thickness map, sign-inverted, makes the interior dark and a bright halo just
    outside the edge. Bright-field light gives many photons, so the noise is mostly camera read noise.
    """
    n = int(labels.max())
    thickness_scale = np.concatenate([[0.0], rng.uniform(0.7, 1.0, size=n)])
    thickness = thickness_scale[labels] * np.sqrt(np.clip(1.0 - rho**2, 0.0, 1.0))
    thickness = thickness * (1.0 + 0.15 * texture)  # nucleoli and chromatin shift the phase a little
    near = ndimage.gaussian_filter(thickness, 1.0)
    surround = ndimage.gaussian_filter(thickness, 4.0)
    contrast = -(near - surround)
    light = _illumination(rng, labels.shape, 0.5 * gradient)
    bright_field_photons = 5000.0
    counts = rng.poisson(bright_field_photons * light * (0.5 + 0.45 * contrast).clip(0.02, None))
    signal = counts / bright_field_photons + rng.normal(0.0, 0.015, size=labels.shape)
    return _to_uint8(signal)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to uint8 0..255 with rounding and clipping."""
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Datasets of fields
# --------------------------------------------------------------------------------------------------


def _fields(n_images: int, shape: tuple[int, int], seed: int, field_kwargs: dict) -> list[tuple[str, SyntheticField]]:
    """``n_images`` fields with ids ``synthetic_000``...; nucleus counts vary from 50 % to 150 %."""
    mean_count = int(field_kwargs.pop("n_nuclei", 25))
    counts = np.random.default_rng(seed).integers(
        max(mean_count // 2, 1), max(round(1.5 * mean_count), 1) + 1, size=n_images
    )
    fields = []
    for i, count in enumerate(counts):
        # Independent streams per image: image i is the same whatever n_images is.
        field_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        fields.append(
            (
                f"synthetic_{i:03d}",
                nuclei_field(shape=shape, n_nuclei=int(count), seed=field_seed, **field_kwargs),
            )
        )
    return fields


def nuclei_dataset(
    n_images: int = 8, shape: tuple[int, int] = (256, 256), seed: int = 0, **field_kwargs
) -> SegmentationSet:
    """Simulated fluorescence nuclei with exact instance masks, as a :class:`SegmentationSet`.

    Parameters
    ----------
    n_images : number of fields.
    shape : (height, width) of every field in pixels.
    seed : random seed; the same seed gives identical sets.
    field_kwargs : passed to :func:`nuclei_field`. ``n_nuclei`` (default 25) is the mean count: each
        field draws its own count uniformly between half and one and a half times it.

    Returns
    -------
    SegmentationSet with ``images`` uint8 (height, width) fluorescence, ``labels`` uint16 of the same
    shape, ids ``synthetic_000``, ``synthetic_001``..., source ``"synthetic"`` and groups ``"HxW"``.
    """
    fields = _fields(n_images, shape, seed, dict(field_kwargs))
    return _segmentation_set(fields, "fluorescence", shape)


def paired_dataset(
    n_images: int = 8, shape: tuple[int, int] = (256, 256), seed: int = 0, **field_kwargs
) -> tuple[SegmentationSet, SegmentationSet]:
    """Paired fluorescence and phase-contrast-like images of the same nuclei.

    Arguments as for :func:`nuclei_dataset`; its fluorescence set is identical for the same arguments.

    Returns
    -------
    (fluorescence, phase): two :class:`SegmentationSet` objects with the same ids, groups and the very
    same label arrays; ``phase.images[i]`` shows the cells of ``fluorescence.images[i]``. Both uint8
    (height, width).
    """
    fields = _fields(n_images, shape, seed, dict(field_kwargs))
    return _segmentation_set(fields, "fluorescence", shape), _segmentation_set(fields, "phase", shape)


def _segmentation_set(
    fields: list[tuple[str, SyntheticField]], modality: str, shape: tuple[int, int]
) -> SegmentationSet:
    """A SegmentationSet of one modality (``"fluorescence"`` or ``"phase"``) of the fields."""
    group = f"{shape[0]}x{shape[1]}"
    return SegmentationSet(
        images=[getattr(f, modality) for _, f in fields],
        labels=[f.labels for _, f in fields],
        ids=[name for name, _ in fields],
        source="synthetic",
        groups=[group] * len(fields),
    )


# --------------------------------------------------------------------------------------------------
# Blood-cell crops
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CellStyle:
    """How one blood-cell class looks. Lengths are fractions of the crop width, colours RGB in [0, 1].

    ``nucleus`` is one of ``round``, ``oval``, ``bilobed``, ``multilobed``, ``kidney``, ``fragments``.
    ``granule_density`` is the fraction of pixels that are granules; ``granules_over_nucleus`` says
    whether the granules also cover the nucleus (basophils).
    """

    cell_radius: float
    cytoplasm: tuple[float, float, float]
    nucleus: str
    nucleus_radius: float
    nucleus_colour: tuple[float, float, float]
    granule_colour: tuple[float, float, float] = (0.0, 0.0, 0.0)
    granule_density: float = 0.0
    granules_over_nucleus: bool = False


# Colours after May-Gruenwald-Giemsa staining as in the PBC images (approximate).
_STYLES = {
    "basophil": _CellStyle(0.24, (0.62, 0.48, 0.68), "bilobed", 0.10, (0.38, 0.22, 0.50),
                           (0.24, 0.10, 0.34), 0.45, True),
    "eosinophil": _CellStyle(0.26, (0.90, 0.64, 0.50), "bilobed", 0.10, (0.42, 0.24, 0.52),
                             (0.88, 0.44, 0.26), 0.55),
    "erythroblast": _CellStyle(0.17, (0.60, 0.56, 0.76), "round", 0.12, (0.26, 0.13, 0.36)),
    "ig": _CellStyle(0.29, (0.80, 0.72, 0.82), "oval", 0.16, (0.50, 0.34, 0.60),
                     (0.66, 0.50, 0.68), 0.15),
    "lymphocyte": _CellStyle(0.19, (0.68, 0.70, 0.88), "round", 0.15, (0.34, 0.19, 0.48)),
    "monocyte": _CellStyle(0.29, (0.74, 0.70, 0.80), "kidney", 0.17, (0.52, 0.38, 0.62),
                           (0.90, 0.88, 0.92), 0.08),
    "neutrophil": _CellStyle(0.25, (0.86, 0.76, 0.82), "multilobed", 0.07, (0.40, 0.23, 0.52),
                             (0.72, 0.58, 0.72), 0.25),
    "platelet": _CellStyle(0.0, (0.0, 0.0, 0.0), "fragments", 0.035, (0.50, 0.32, 0.62)),
}  # fmt: skip

_PLASMA = np.array([0.91, 0.84, 0.80])  # pinkish background
_RED_CELL = np.array([0.86, 0.60, 0.58])
_MAX_RED_CELLS = 6
_MAX_LOBES = 4


def blood_cell_crops(n_per_class: int = 20, size: int = 28, seed: int = 0) -> ImageSet:
    """Small RGB crops that look like stained blood cells of the eight PBC / BloodMNIST classes.

    Each crop shows pale red blood cells on a pinkish background and, in the middle, one cell whose
    nucleus shape, colour and size and whose cytoplasm colour and granules depend on its class:
    basophil dark purple granules over a bilobed nucleus; eosinophil orange granules and a bilobed
    nucleus; erythroblast small with a round dense nucleus; ig (immature granulocyte) large with an oval
    nucleus; lymphocyte a large round nucleus in a thin rim of blue cytoplasm; monocyte large with a
    kidney-shaped nucleus; neutrophil a multilobed nucleus; platelet tiny purple fragments and no
    central cell. Position, size, rotation, stain colour and brightness vary from crop to crop, so the
    classes are learnable but overlap in simple colour statistics.

    Parameters
    ----------
    n_per_class : crops per class.
    size : height and width of each crop in pixels (drawn at this size, not resized).
    seed : random seed; the same seed gives identical crops.

    Returns
    -------
    ImageSet with ``images`` uint8 (8 * n_per_class, size, size, 3) in class order, ``labels`` the
    class ids (positions in ``BLOOD_CLASSES``), files ``synthetic_<class>_<000>.png`` and source
    ``"synthetic"``.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    streams = np.random.SeedSequence(seed).spawn(len(BLOOD_CLASSES))
    images, labels, files = [], [], []
    for class_id, (name, stream) in enumerate(zip(BLOOD_CLASSES, streams, strict=True)):
        rng = np.random.default_rng(stream)
        images.append(_draw_class(rng, _STYLES[name], n_per_class, size))
        labels.append(np.full(n_per_class, class_id, dtype=np.int64))
        files.extend(f"synthetic_{name}_{i:03d}.png" for i in range(n_per_class))
    return ImageSet(
        images=np.concatenate(images).reshape(-1, size, size, 3),
        labels=np.concatenate(labels),
        class_names=list(BLOOD_CLASSES),
        files=files,
        source="synthetic",
    )


def _draw_class(rng: np.random.Generator, style: _CellStyle, n: int, size: int) -> np.ndarray:
    """``n`` crops (n, size, size, 3) uint8 of one class, drawn together as arrays."""
    grid = (np.arange(size) + 0.5) / size - 0.5  # pixel centres, crop width = 1
    yy, xx = grid[None, :, None], grid[None, None, :]
    pixel = 1.0 / size

    stain = _stain_jitter(rng, n)  # (n, 3) multiplicative colour cast of this slide and camera
    canvas = np.broadcast_to(_PLASMA * stain[:, None, None, :], (n, size, size, 3)).copy()
    canvas = _paint_red_cells(rng, canvas, yy, xx, pixel, stain)

    centre = rng.uniform(-0.07, 0.07, size=(n, 2))  # position jitter
    scale = rng.uniform(0.85, 1.15, size=n)  # cell size varies within a class
    rotation = rng.uniform(0.0, 2 * np.pi, size=n)
    cy, cx = centre[:, 0, None, None], centre[:, 1, None, None]

    if style.cell_radius > 0:
        radius = (style.cell_radius * scale)[:, None, None]
        cell = _soft_edge(radius - np.hypot(yy - cy, xx - cx), pixel)
        cytoplasm = _jitter_colour(rng, style.cytoplasm, n) * stain
        canvas = _paint(canvas, cell, cytoplasm)
    else:
        cell = np.zeros((n, size, size))

    lobes = _nucleus_lobes(rng, style, n, scale, rotation)
    nucleus = _lobe_mask(lobes, centre, yy, xx, pixel)
    if style.nucleus == "kidney":
        nucleus = nucleus * (1.0 - _kidney_bite(style, scale, rotation, centre, yy, xx, pixel))

    nucleus_colour = _jitter_colour(rng, style.nucleus_colour, n) * stain
    # Chromatin makes the nucleus mottled rather than flat.
    mottle = 1.0 + 0.08 * _smooth_noise(rng, (n, size, size), sigma=(0, 0.6, 0.6))[..., None]
    canvas = _paint(canvas, nucleus, nucleus_colour[:, None, None, :] * mottle)

    if style.granule_density > 0:
        area = cell if style.granules_over_nucleus else cell * (1.0 - nucleus)
        grains = (rng.random((n, size, size)) < style.granule_density) * area
        strength = rng.uniform(0.6, 1.0, size=(n, 1, 1))
        granule = _jitter_colour(rng, style.granule_colour, n) * stain
        canvas = _paint(canvas, grains * strength, granule)

    canvas = ndimage.gaussian_filter(canvas, sigma=(0, 0.5, 0.5, 0))  # optics and resampling softness
    canvas = canvas * rng.uniform(0.9, 1.1, size=(n, 1, 1, 1))  # exposure
    canvas = canvas + rng.normal(0.0, 0.015, size=canvas.shape)  # camera noise
    return _to_uint8(canvas)


def _soft_edge(signed_distance: np.ndarray, pixel: float) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance (positive inside), anti-aliased over one pixel."""
    return np.clip(0.5 + signed_distance / pixel, 0.0, 1.0)


def _paint(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend ``colour`` (n, 3) or (n, h, w, 3) over ``canvas`` (n, h, w, 3) with ``coverage`` (n, h, w)."""
    if colour.ndim == 2:
        colour = colour[:, None, None, :]
    alpha = coverage[..., None]
    return canvas * (1.0 - alpha) + colour * alpha


def _stain_jitter(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-crop RGB gains (n, 3) around 1: stain strength and white balance differ between slides."""
    return rng.normal(1.0, 0.04, size=(n, 3)) * rng.uniform(0.94, 1.06, size=(n, 1))


def _jitter_colour(rng: np.random.Generator, colour: tuple[float, float, float], n: int) -> np.ndarray:
    """``n`` copies (n, 3) of ``colour`` with small independent per-channel jitter."""
    return np.clip(np.asarray(colour) + rng.normal(0.0, 0.04, size=(n, 3)), 0.0, 1.0)


def _paint_red_cells(
    rng: np.random.Generator,
    canvas: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    pixel: float,
    stain: np.ndarray,
) -> np.ndarray:
    """Paint 2-6 pale red blood cells with a lighter central pallor per crop, some cut by the border."""
    n = len(canvas)
    count = rng.integers(2, _MAX_RED_CELLS + 1, size=n)
    present = np.arange(_MAX_RED_CELLS)[None, :] < count[:, None]  # (n, K)
    cy = rng.uniform(-0.6, 0.6, size=(n, _MAX_RED_CELLS))
    cx = rng.uniform(-0.6, 0.6, size=(n, _MAX_RED_CELLS))
    radius = rng.uniform(0.13, 0.17, size=(n, _MAX_RED_CELLS))
    distance = np.hypot(yy[:, None] - cy[..., None, None], xx[:, None] - cx[..., None, None])
    disc = _soft_edge(radius[..., None, None] - distance, pixel) * present[..., None, None]
    pallor = _soft_edge(0.45 * radius[..., None, None] - distance, pixel) * disc
    colour = _RED_CELL * stain
    canvas = _paint(canvas, disc.max(axis=1), colour)
    return _paint(canvas, 0.5 * pallor.max(axis=1), _PLASMA * stain)


def _nucleus_lobes(
    rng: np.random.Generator, style: _CellStyle, n: int, scale: np.ndarray, rotation: np.ndarray
) -> np.ndarray:
    """Lobes of each nucleus as an array (n, _MAX_LOBES, 5): offset y, offset x, a, b, angle.

    Offsets are from the cell centre in crop widths; a lobe with a == 0 is absent. The layout is drawn
    unrotated and then turned by ``rotation`` so that every class appears at every orientation.
    """
    lobes = np.zeros((n, _MAX_LOBES, 5))
    r = style.nucleus_radius * scale * rng.uniform(0.9, 1.1, size=n)
    if style.nucleus == "round":
        lobes[:, 0, 2] = r
        lobes[:, 0, 3] = r * rng.uniform(0.85, 1.0, size=n)
        lobes[:, 0, 1] = rng.uniform(0.0, 0.2, size=n) * style.nucleus_radius  # slightly eccentric
    elif style.nucleus == "oval":
        lobes[:, 0, 1] = 0.25 * style.cell_radius * scale  # pushed to one side of the cell
        lobes[:, 0, 2] = r
        lobes[:, 0, 3] = r * rng.uniform(0.65, 0.8, size=n)
    elif style.nucleus == "kidney":
        lobes[:, 0, 2] = r
        lobes[:, 0, 3] = 0.75 * r
    elif style.nucleus == "bilobed":
        for k, side in enumerate((-1.0, 1.0)):
            lobes[:, k, 1] = side * 0.9 * r
            lobes[:, k, 2] = r * rng.uniform(0.9, 1.1, size=n)
            lobes[:, k, 3] = 0.8 * lobes[:, k, 2]
            lobes[:, k, 4] = rng.uniform(-0.5, 0.5, size=n)
    elif style.nucleus == "multilobed":
        n_lobes = rng.integers(3, _MAX_LOBES + 1, size=n)
        arc = 0.55 * style.cell_radius * scale
        for k in range(_MAX_LOBES):
            # Lobes strung along an arc, like the segmented nucleus of a mature neutrophil.
            t = (k - (n_lobes - 1) / 2) * 0.8
            on = k < n_lobes
            lobes[:, k, 0] = on * arc * (np.cos(t) - 0.6)
            lobes[:, k, 1] = on * arc * np.sin(t)
            lobes[:, k, 2] = on * r * rng.uniform(0.9, 1.25, size=n)
            lobes[:, k, 3] = 0.85 * lobes[:, k, 2]
            lobes[:, k, 4] = -t  # long axis along the arc
    elif style.nucleus == "fragments":
        n_lobes = rng.integers(1, _MAX_LOBES + 1, size=n)
        for k in range(_MAX_LOBES):
            on = k < n_lobes
            lobes[:, k, 0:2] = rng.normal(0.0, 0.06, size=(n, 2))
            lobes[:, k, 2] = on * r * rng.uniform(0.7, 1.4, size=n)
            lobes[:, k, 3] = lobes[:, k, 2] * rng.uniform(0.6, 1.0, size=n)
            lobes[:, k, 4] = rng.uniform(0.0, np.pi, size=n)
    else:
        raise ValueError(f"unknown nucleus kind {style.nucleus!r}")
    return _rotate_lobes(lobes, rotation)


def _rotate_lobes(lobes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """Turn the lobe layout (n, L, 5) of each crop by its angle ``rotation`` (n,) about the cell centre."""
    c, s = np.cos(rotation)[:, None], np.sin(rotation)[:, None]
    oy, ox = lobes[..., 0].copy(), lobes[..., 1].copy()
    # Turning by -rotation in the (x, y) plane, the same sense as subtracting it from each lobe's angle.
    lobes[..., 0] = c * oy - s * ox
    lobes[..., 1] = s * oy + c * ox
    lobes[..., 4] = lobes[..., 4] - rotation[:, None]
    return lobes


def _lobe_mask(lobes: np.ndarray, centre: np.ndarray, yy: np.ndarray, xx: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased union (n, h, w) of the elliptical lobes (n, L, 5) placed at each cell ``centre``."""
    oy = (centre[:, 0, None] + lobes[..., 0])[..., None, None]
    ox = (centre[:, 1, None] + lobes[..., 1])[..., None, None]
    a, b, angle = (lobes[..., i][..., None, None] for i in (2, 3, 4))
    dy, dx = yy[:, None] - oy, xx[:, None] - ox
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    present = a > 0
    a, b = np.where(present, a, 1.0), np.where(present, b, 1.0)
    rho = np.hypot(u / a, v / b)
    # (1 - rho) * mean radius approximates the signed distance to the edge, enough for anti-aliasing.
    coverage = _soft_edge((1.0 - rho) * np.sqrt(a * b), pixel) * present
    return coverage.max(axis=1)


def _kidney_bite(
    style: _CellStyle,
    scale: np.ndarray,
    rotation: np.ndarray,
    centre: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    pixel: float,
) -> np.ndarray:
    """The notch (n, h, w) cut from one side of a monocyte's oval nucleus to make it kidney-shaped."""
    r = style.nucleus_radius * scale
    # The notch sits on the minor axis (perpendicular to the major axis, which points along ``-rotation``).
    distance_out = 0.95 * r
    by = centre[:, 0] + distance_out * np.cos(rotation)
    bx = centre[:, 1] + distance_out * np.sin(rotation)
    d = np.hypot(yy - by[:, None, None], xx - bx[:, None, None])
    return _soft_edge((0.5 * r)[:, None, None] - d, pixel)
