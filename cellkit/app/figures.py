"""The app's figures: probability bars and image panels."""

from __future__ import annotations

from typing import Any

import numpy as np


def probability_bars(probabilities: dict[str, float], title: str = ""):
    """Horizontal bars of class probabilities, the predicted class highlighted."""
    import matplotlib.pyplot as plt

    names = list(probabilities)
    values = np.array([probabilities[n] for n in names])
    fig, ax = plt.subplots(figsize=(5.5, 0.32 * len(names) + 1.0))
    colours = ["tab:blue" if i == values.argmax() else "0.7" for i in range(len(names))]
    bars = ax.barh(names[::-1], values[::-1], color=colours[::-1])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values[::-1]], fontsize=8, padding=2)
    ax.set(xlim=(0, 1.12), xlabel="probability", title=title)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def fitted(fig: Any) -> Any:
    """``fig`` laid out again whenever it is drawn: Shiny resizes a figure to its place in the page, and a
    layout computed once at the old size would cut off labels."""
    if fig is not None:
        fig.set_layout_engine("tight")
    return fig


def image_panels(images: list[np.ndarray], titles: list[str]):
    """Images side by side, pixels kept sharp (a 28x28 input is shown enlarged, not smoothed)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.4), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles, strict=True):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig
