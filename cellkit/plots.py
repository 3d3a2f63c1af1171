"""Figures: one ``save_fig`` for every figure the project writes, and the plots notebooks share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

#: Resolution of every saved figure, in dots per inch.
DPI = 120
SYNTHETIC_STAMP = "SYNTHETIC STAND-IN DATA - not the real dataset"


def save_fig(fig: plt.Figure, path: str | Path, stamp: str | None = None) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI` dpi to ``path`` (``.png`` added if missing), folders made.

    ``stamp``, when given, is written across the figure in red (used to mark synthetic stand-in data so
    that no figure made from it can pass for a real result).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if stamp:
        fig.text(
            0.5, 0.5, stamp, ha="center", va="center", rotation=20, fontsize=18, color="red", alpha=0.55,
            fontweight="bold", transform=fig.transFigure, zorder=1000,
        )
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def montage(
    images: np.ndarray | Sequence[np.ndarray],
    ncols: int = 8,
    titles: Sequence[str] | None = None,
    cell_inches: float = 1.1,
    cmap: str = "gray",
) -> plt.Figure:
    """A grid of images (grey or RGB, any dtype matplotlib shows) with optional titles, axes hidden."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * cell_inches, nrows * cell_inches), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap=cmap if np.ndim(images[i]) == 2 else None)
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout(pad=0.2)
    return fig


def overlay_instances(image: np.ndarray, labels: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """An RGB float image in [0, 1]: ``image`` in grey with each instance tinted and its outline drawn.

    ``image`` is 2-D (any range, scaled by its 1st-99.8th percentiles); ``labels`` the instance mask.
    """
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    low, high = np.percentile(image, [1, 99.8])
    grey = np.clip((image.astype(np.float32) - low) / max(high - low, 1e-6), 0, 1)
    rgb = label2rgb(labels, image=grey, alpha=alpha, bg_label=0, image_alpha=1.0)
    rgb[find_boundaries(labels, mode="inner")] = (1.0, 1.0, 0.0)
    return rgb
