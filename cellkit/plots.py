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
    title: str = "",
) -> plt.Figure:
    """A grid of images (grey or RGB, any dtype matplotlib shows) with optional titles, axes hidden; ``title``
    goes above the grid."""
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
    if title:
        fig.suptitle(title, fontsize=9)
        fig.subplots_adjust(top=1 - 0.45 / fig.get_figheight())  # room for the title: 0.45 inch
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


# --- EDA plots (01_eda): counts, class montages, feature distributions, histograms ----------------------


def grouped_bars(
    table, title: str = "", xlabel: str = "", ylabel: str = "count", log: bool = False, annotate: bool = True,
    figsize: tuple[float, float] | None = None, ylim: tuple[float, float] | None = None,
) -> plt.Figure:
    """Bars of a table of counts: one cluster per row (e.g. class), one bar per column (e.g. split).

    ``table`` is a pandas DataFrame whose index names the clusters and whose columns the bars; with
    ``annotate`` every bar is labelled with its value. ``figsize`` (inches; default: wider with more bars) and
    ``ylim`` (default: matplotlib's) set the figure's size and the value axis.
    """
    n_rows, n_cols = table.shape
    fig, ax = plt.subplots(figsize=figsize or (max(6.0, 0.9 * n_rows * max(1, n_cols) ** 0.5 + 2), 4))
    width = 0.8 / n_cols
    x = np.arange(n_rows)
    for j, column in enumerate(table.columns):
        bars = ax.bar(x + (j - (n_cols - 1) / 2) * width, table[column].to_numpy(), width, label=str(column))
        if annotate:
            ax.bar_label(bars, fontsize=7, padding=1)
    tilt = n_rows > 5
    ax.set_xticks(x, [str(i) for i in table.index], rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    if n_cols > 1:
        ax.legend(title=table.columns.name, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def class_montage(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    per_class: int = 8,
    title: str = "",
    cell_inches: float = 0.9,
) -> plt.Figure:
    """A grid with one row per class (named on the left) and up to ``per_class`` of its images.

    ``images`` is (n, h, w[, 3]); ``labels`` (n,) class ids. The first ``per_class`` images of each class
    are shown, in the order given; a class with fewer leaves its row partly empty.
    """
    labels = np.asarray(labels)
    n_classes = len(class_names)
    fig, axes = plt.subplots(
        n_classes, per_class, figsize=(per_class * cell_inches + 1.2, n_classes * cell_inches + 0.4), squeeze=False
    )
    for row, name in enumerate(class_names):
        members = np.flatnonzero(labels == row)[:per_class]
        for col, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
            if col < len(members):
                image = images[members[col]]
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout(pad=0.3, h_pad=0.2, w_pad=0.2)
    if title:
        top = 1 - 0.35 / fig.get_figheight()
        fig.subplots_adjust(top=top)
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig


def feature_boxplots(table, columns: Sequence[str], by: str, ncols: int = 3, order: Sequence[str] | None = None,
                     ylabel: str = "grey level (0-255)", title: str = "") -> plt.Figure:
    """One box plot per feature column of ``table`` (a DataFrame), boxes grouped by column ``by``."""
    import seaborn as sns

    nrows = int(np.ceil(len(columns) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, column in zip(axes.flat, columns, strict=False):
        sns.boxplot(data=table, x=by, y=column, hue=by, order=order, hue_order=order, ax=ax, fliersize=1,
                    linewidth=0.8, palette="tab10", legend=False)
        ax.set(title=column, xlabel="", ylabel=ylabel)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def pair_plot(table, columns: Sequence[str], hue: str, title: str = "", hue_order: Sequence[str] | None = None,
              height: float = 1.6) -> plt.Figure:
    """A seaborn pair plot of ``columns`` of ``table`` coloured by ``hue``: scatter below, density diagonal."""
    import seaborn as sns

    grid = sns.pairplot(
        table, vars=list(columns), hue=hue, hue_order=hue_order, corner=True, height=height, palette="tab10",
        plot_kws={"s": 4, "alpha": 0.35, "linewidth": 0, "rasterized": True}, diag_kws={"common_norm": False},
    )
    if title:
        grid.figure.suptitle(title, y=1.01)
    return grid.figure


def correlation_heatmap(table, columns: Sequence[str], title: str = "Pearson correlation") -> plt.Figure:
    """A heatmap of the Pearson correlations between ``columns`` of ``table``, values written in."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(0.75 * len(columns) + 2, 0.65 * len(columns) + 1.2))
    sns.heatmap(table[list(columns)].corr(), vmin=-1, vmax=1, cmap="RdBu_r", annot=True, fmt=".2f", square=True,
                ax=ax, cbar_kws={"label": "r", "shrink": 0.8}, annot_kws={"fontsize": 8})
    ax.set_title(title)
    fig.tight_layout()
    return fig


def distribution(values, xlabel: str, title: str = "", log_x: bool = False, bins: int = 60,
                 percentiles: Sequence[float] = (5, 50, 95)) -> plt.Figure:
    """A histogram of ``values`` with dashed vertical lines at ``percentiles`` (labelled in the legend)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    edges = np.geomspace(max(values.min(), 1e-9), values.max(), bins + 1) if log_x else bins
    ax.hist(values, bins=edges, color="0.55", edgecolor="white", linewidth=0.3)
    for q, colour in zip(percentiles, plt.cm.viridis(np.linspace(0.1, 0.85, len(percentiles))), strict=True):
        at = np.percentile(values, q)
        ax.axvline(at, color=colour, linestyle="--", linewidth=1.2, label=f"{q:g}th percentile: {at:,.0f}")
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def values_by_group(table, column: str, by: str, ylabel: str, title: str = "", log: bool = False,
                    order: Sequence[str] | None = None, max_points: int = 3000, seed: int = 0) -> plt.Figure:
    """Box plots of ``column`` per group ``by`` with the points over them; tick labels give each n.

    At most ``max_points`` points are drawn (a seeded sample), the boxes use all rows.
    """
    import seaborn as sns

    order = list(order) if order is not None else list(table[by].value_counts().index)
    sizes = table[by].value_counts()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(order) + 2), 4))
    sns.boxplot(data=table, x=by, y=column, order=order, ax=ax, color="0.85", fliersize=0, linewidth=0.8)
    points = table.sample(min(len(table), max_points), random_state=seed)
    sns.stripplot(data=points, x=by, y=column, order=order, ax=ax, size=2 if len(points) > 300 else 4,
                  alpha=0.5 if len(points) > 300 else 0.8, jitter=0.25,
                  hue=by, hue_order=order, palette="tab10", legend=False)
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(order)), [f"{g}\nn={sizes.get(g, 0)}" for g in order], fontsize=8)
    ax.set(xlabel=by, ylabel=ylabel, title=title)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def intensity_histogram_panels(histograms, ncols: int = 4, title: str = "",
                               order: Sequence[str] | None = None) -> plt.Figure:
    """Background vs object grey-level histograms, one panel per group (in ``order``), log y.

    ``histograms`` is the table of :func:`cellkit.features.intensity_histograms` (columns group, level,
    background_density, nuclei_density).
    """
    groups = list(order) if order is not None else list(dict.fromkeys(histograms["group"]))
    nrows = int(np.ceil(len(groups) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.6 * nrows), squeeze=False, sharex=True)
    for ax, group in zip(axes.flat, groups, strict=False):
        part = histograms[histograms["group"] == group]
        ax.fill_between(part["level"], part["background_density"], step="mid", alpha=0.5, label="background")
        ax.fill_between(part["level"], part["nuclei_density"], step="mid", alpha=0.5, label="nuclei")
        ax.set_yscale("log")
        ax.set_ylim(1e-6, 1)
        ax.set_title(str(group), fontsize=9)
        ax.set_xlabel("grey level (0-255)", fontsize=8)
        ax.set_ylabel("share of pixels", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- transforms (02_preprocessing_and_augmentation): images beside their histograms, cost bars ---------------


def _display_range(image: np.ndarray) -> tuple[np.ndarray, float, float, bool]:
    """What imshow gets for ``image``: (array, vmin, vmax, rescaled). uint8 on 0..255, floats on [0, 1] when
    they fit, otherwise their own min..max (rescaled to [0, 1] for colour, which imshow needs)."""
    if image.dtype == bool:
        return image.astype(np.float32), 0.0, 1.0, False
    if image.dtype == np.uint8:
        return image, 0.0, 255.0, False
    x = image.astype(np.float32)
    low, high = float(np.nanmin(x)), float(np.nanmax(x))
    if low >= 0 and high <= 1:
        return x, 0.0, 1.0, False
    if x.ndim == 3:
        return (x - low) / max(high - low, 1e-12), 0.0, 1.0, True
    return x, low, high, True


def images_with_histograms(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    bins: int = 64,
    log: bool = False,
    cell_inches: float = 2.0,
    title: str = "",
    marks: Sequence[float | None] | None = None,
) -> plt.Figure:
    """Each image above its intensity histogram, side by side: what a transform does to pixels and their spread.

    ``images`` are grey (H, W) or RGB (H, W, 3), of any dtype: uint8 is shown on 0..255 (so a dark image looks
    dark), floats on [0, 1] when they fit and on their own min..max otherwise (e.g. z-scores; the panel says
    so), bool as 0/1. Histograms are grey for grey images and one line per channel for RGB, over 0..255 for uint8
    and over the data range for floats; ``log`` puts counts on a log scale (dark fluorescence backgrounds
    otherwise flatten everything else). Each histogram's label gives the dtype and the min..max of the values;
    ``marks``, one per image (None for none), draws a dashed vertical line on its histogram, e.g. a threshold.
    """
    from matplotlib.ticker import NullFormatter

    n = len(images)
    titles = list(titles) if titles is not None else [""] * n
    fig, axes = plt.subplots(
        2, n, figsize=(n * cell_inches, cell_inches * 1.72), squeeze=False, gridspec_kw={"height_ratios": [1, 0.62]}
    )
    for i, image in enumerate(images):
        image = np.asarray(image)
        shown, vmin, vmax, rescaled = _display_range(image)
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=vmin, vmax=vmax, interpolation="nearest")
        top.set_xticks([])
        top.set_yticks([])
        top.set_title(titles[i], fontsize=8)
        if rescaled:
            top.set_xlabel("shown min..max", fontsize=6)
        values = image.astype(np.float32) if image.dtype != np.float32 else image
        if image.dtype == np.uint8:
            edges = np.linspace(0, 256, bins + 1)
        elif image.dtype == bool:
            edges = np.array([-0.25, 0.25, 0.75, 1.25])
        else:
            low, high = float(values.min()), float(values.max())
            low, high = (0.0, 1.0) if low >= 0 and high <= 1 else (low, high if high > low else low + 1)
            edges = np.linspace(low, high, bins + 1)
        if values.ndim == 3 and values.shape[-1] == 3:
            for channel, colour in enumerate(("tab:red", "tab:green", "tab:blue")):
                counts, _ = np.histogram(values[..., channel], edges)
                bottom.stairs(counts, edges, color=colour, linewidth=0.9)
        else:
            counts, _ = np.histogram(values, edges)
            bottom.stairs(counts, edges, fill=True, color="0.45")
        if marks is not None and marks[i] is not None:
            bottom.axvline(marks[i], color="tab:orange", linestyle="--", linewidth=1.0)
        if log:
            bottom.set_yscale("log")
            bottom.set_ylim(bottom=0.7)  # single pixels stay visible, two-valued images get comparable bars
            bottom.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_xlim(edges[0], edges[-1])
        bottom.tick_params(labelsize=6, which="both")
        note = f"{values.mean():.1%} foreground" if image.dtype == bool else f"{values.min():.3g}..{values.max():.3g}"
        bottom.set_xlabel(f"{image.dtype}, {note}", fontsize=6, labelpad=1)
        bottom.spines[["top", "right"]].set_visible(False)
    axes[1, 0].set_ylabel("pixels" + (" (log)" if log else ""), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.3, h_pad=0.4, w_pad=0.5)
    return fig


def horizontal_bars(table, title: str = "", xlabel: str = "", log: bool = False,
                    figsize: tuple[float, float] = (7, 6.5)) -> plt.Figure:
    """Horizontal bars of a table: one group per row (e.g. a transformation; the first row at the top), one bar per
    column (e.g. an image size), the legend outside on the right; ``log`` for a log value axis (values spanning
    orders of magnitude, such as milliseconds per image)."""
    fig, ax = plt.subplots(figsize=figsize)
    table.iloc[::-1].plot.barh(ax=ax, logx=log, width=0.8)
    ax.set(xlabel=xlabel, ylabel="", title=title)
    ax.grid(axis="x", which="both", linewidth=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


# --- classifiers (04_cnn_lenet_alexnet): example cells, learning curves, confusion matrices, ROC curves ---


def class_mosaics(sets: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str], per_class: int = 6,
                  figsize: tuple[float, float] = (10, 5.2)) -> plt.Figure:
    """Image sets side by side, one panel each: a row per class (named on the left) of its first ``per_class``
    images, drawn as one mosaic at the images' own pixel size (so panels of 28x28 and 48x48 images compare).

    ``sets`` maps a panel title to (images (n, s, s, 3) uint8, labels (n,) class ids); a class with fewer images
    leaves its row partly black.
    """
    fig, axes = plt.subplots(1, len(sets), figsize=figsize, squeeze=False)
    for ax, (title, (images, labels)) in zip(axes[0], sets.items(), strict=True):
        size = images.shape[1]
        mosaic = np.zeros((len(class_names) * size, per_class * size, *images.shape[3:]), images.dtype)
        for c in range(len(class_names)):
            for j, i in enumerate(np.flatnonzero(np.asarray(labels) == c)[:per_class]):
                mosaic[c * size:(c + 1) * size, j * size:(j + 1) * size] = images[i]
        ax.imshow(mosaic)
        ax.set_yticks(np.arange(len(class_names)) * size + size / 2, class_names, fontsize=8)
        ax.set_xticks([])
        ax.set_title(title)
    fig.tight_layout()
    return fig


def learning_curves(histories: dict[str, dict[str, Sequence[float]]], title: str = "",
                    metrics: Sequence[str] = ("loss", "accuracy"), best_by: str = "val_accuracy") -> plt.Figure:
    """Training (solid) and validation (dashed) curves per epoch, one panel per metric, one colour per model.

    ``histories`` maps a model name to a Keras-style history: ``{"loss": [...], "val_loss": [...], ...}``.
    A circle marks the epoch early stopping kept: the best ``best_by`` (``val_accuracy``: highest; ``val_loss``:
    lowest).
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.6), squeeze=False)
    colours = plt.cm.tab10(np.arange(len(histories)) % 10)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for colour, (name, history) in zip(colours, histories.items(), strict=True):
            train, val = history.get(metric, []), history.get(f"val_{metric}", [])
            epochs = np.arange(1, len(train) + 1)
            ax.plot(epochs, train, color=colour, linewidth=1.3, label=f"{name} train")
            if len(val):
                ax.plot(epochs, val, color=colour, linewidth=1.3, linestyle="--", label=f"{name} validation")
                watched = np.asarray(history.get(best_by, val), dtype=float)
                best = int(np.nanargmin(watched) if best_by == "val_loss" else np.nanargmax(watched))
                ax.plot(best + 1, val[best], "o", color=colour, markersize=5)
        ax.set(xlabel="epoch", ylabel=metric, title=metric)
        if "loss" in metric:
            ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0, -1].legend(fontsize=7, frameon=False, loc="lower right" if "acc" in metrics[-1] else "best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def confusion_heatmap(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str = "",
                      normalise: bool = True) -> plt.Figure:
    """A confusion matrix (rows true, columns predicted) as a heatmap; with ``normalise`` each row is shown as
    shares of its true class (recall on the diagonal) and the counts are written in the cells."""
    counts = np.asarray(matrix, dtype=float)
    shown = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalise else counts
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(0.62 * k + 2.4, 0.55 * k + 1.6))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else None)
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.6 * (shown.max() or 1) else "black")
    ax.set_xticks(range(k), class_names, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalise else "count")
    fig.tight_layout()
    return fig


def roc_curves(y_true: Sequence[int], y_score: np.ndarray, class_names: Sequence[str], title: str = "") -> plt.Figure:
    """One-vs-rest ROC curve of every class (``y_score`` (n, k) probabilities), its AUC in the legend.

    The false-positive rate is on a log axis: good classifiers differ at rates of 1e-3..1e-2, invisible on a
    linear one.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for c, name in enumerate(class_names):
        positive = y_true == c
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, y_score[:, c])
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUC {roc_auc_score(positive, y_score[:, c]):.4f})")
    low = 1 / max(2, int(np.max([np.sum(y_true != c) for c in range(len(class_names))])))
    grid = np.geomspace(low, 1, 50)
    ax.plot(grid, grid, color="0.7", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set(xlabel="false positive rate (log)", ylabel="true positive rate", title=title, xlim=(low, 1),
           ylim=(0, 1.01))
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def class_dendrogram(distances: np.ndarray, class_names: Sequence[str], title: str = "",
                     method: str = "single") -> plt.Figure:
    """Dendrogram of classes from a (k, k) distance matrix (e.g. :func:`cellkit.metrics.confusion_distances`),
    ``method`` linkage (report 004: single). The height of a join is the distance at which two groups merge."""
    from scipy.cluster.hierarchy import dendrogram, linkage
    from scipy.spatial.distance import squareform

    tree = linkage(squareform(np.asarray(distances, dtype=float), checks=False), method=method)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    dendrogram(tree, labels=list(class_names), ax=ax, color_threshold=0, above_threshold_color="0.3",
               leaf_rotation=30)
    ax.set(ylabel="1 - mean confusion rate", title=title or f"classes by confusion ({method} linkage)")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def multilabel_roc(y_true: np.ndarray, scores: dict[str, np.ndarray], label_names: Sequence[str],
                   title: str = "") -> plt.Figure:
    """One panel per label (columns of ``y_true`` (n, L) 0/1): the ROC curve of each method in ``scores``
    (name -> (n, L) scores) with its AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true).astype(bool)
    fig, axes = plt.subplots(1, len(label_names), figsize=(3.1 * len(label_names), 3.3), squeeze=False)
    for j, (ax, label) in enumerate(zip(axes[0], label_names, strict=True)):
        if 0 < y_true[:, j].sum() < len(y_true):
            for method, score in scores.items():
                fpr, tpr, _ = roc_curve(y_true[:, j], score[:, j])
                ax.plot(fpr, tpr, linewidth=1.2, label=f"{method} {roc_auc_score(y_true[:, j], score[:, j]):.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        ax.set(title=f"{label} (n+ {int(y_true[:, j].sum())})", xlabel="false positive rate", xlim=(0, 1),
               ylim=(0, 1.01))
        ax.legend(fontsize=6, frameon=False, loc="lower right", title="AUC", title_fontsize=6)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0, 0].set_ylabel("true positive rate")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- hand-crafted features (03_handcrafted_features_random_forest): importances, scores with spread ----------


def feature_importances(importances, families: Sequence[str], top: int = 25, title: str = "",
                        xlabel: str = "mean decrease in impurity") -> plt.Figure:
    """The ``top`` most important features as horizontal bars coloured by family, beside each family's total.

    ``importances`` is a pandas Series indexed by feature name (e.g. a forest's ``feature_importances_``);
    ``families`` gives the family of each entry, in the same order (see
    :func:`cellkit.features.feature_families`). The right panel sums the importances per family, so a family
    of many weak features (histogram bins) can be compared with one of few strong ones.
    """
    import pandas as pd

    table = pd.DataFrame({"importance": np.asarray(importances, dtype=float), "family": list(families)},
                         index=[str(i) for i in importances.index])
    order = list(dict.fromkeys(table["family"]))
    colour_of = {family: plt.cm.tab10(i % 10) for i, family in enumerate(order)}
    best = table.nlargest(top, "importance").iloc[::-1]
    totals = table.groupby("family", sort=False)["importance"].sum().sort_values()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.22 * len(best) + 1.2)),
                                      gridspec_kw={"width_ratios": [2.2, 1]})
    left.barh(range(len(best)), best["importance"], color=[colour_of[f] for f in best["family"]])
    left.set_yticks(range(len(best)), best.index, fontsize=7)
    left.set(xlabel=xlabel, title=f"top {len(best)} features")
    right.barh(range(len(totals)), totals.to_numpy(), color=[colour_of[f] for f in totals.index])
    right.set_yticks(range(len(totals)), [f"{f} ({(table['family'] == f).sum()})" for f in totals.index], fontsize=8)
    right.set(xlabel=f"sum of {xlabel}", title="per family (number of features)")
    for ax in (left, right):
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(axis="x", labelsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def scores_with_spread(means, spreads=None, title: str = "", ylabel: str = "score", ylim: tuple | None = None,
                       reference: float | None = None, reference_label: str = "", intervals: tuple | None = None
                       ) -> plt.Figure:
    """Grouped bars of mean scores (e.g. cross-validated accuracy) with error bars and the values written on top.

    ``means`` is a DataFrame (rows: clusters, e.g. image sizes; columns: bars, e.g. metrics); ``spreads`` the
    same shape (e.g. standard deviations over folds), or None; ``intervals`` instead, a pair (lows, highs) of
    DataFrames of that shape, e.g. 95 % intervals. ``reference`` draws a dashed horizontal line, e.g. a source
    report's number.
    """
    n_rows, n_cols = means.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * n_rows * n_cols + 1.5), 3.8))
    width = 0.8 / n_cols
    x = np.arange(n_rows)
    for j, column in enumerate(means.columns):
        errors = None if spreads is None else spreads[column].to_numpy()
        if intervals is not None:
            lows, highs = (bound[column].to_numpy() for bound in intervals)
            errors = [means[column].to_numpy() - lows, highs - means[column].to_numpy()]
        bars = ax.bar(x + (j - (n_cols - 1) / 2) * width, means[column].to_numpy(), width, yerr=errors,
                      capsize=3, label=str(column))
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    if reference is not None:
        ax.axhline(reference, color="0.3", linestyle="--", linewidth=1, label=reference_label or None)
    ax.set_xticks(x, [str(i) for i in means.index])
    ax.set(title=title, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


# --- the transformations x models study (05_transformations_vs_models): cost per model ---------------------------


def bar_panels(table, titles: dict[str, str], fmt: str = "%.1f", panel_inches: tuple[float, float] = (4.0, 3.4),
               colour: str = "tab:blue") -> plt.Figure:
    """One panel per column of ``table`` named in ``titles`` (column -> panel title), a bar per row (e.g. a model,
    named by the index) with its value written on it (``fmt``). For quantities in different units side by side,
    such as training time, inference speed and memory per model."""
    width, height = panel_inches
    fig, axes = plt.subplots(1, len(titles), figsize=(width * len(titles), height), squeeze=False)
    for ax, (column, title) in zip(axes[0], titles.items(), strict=True):
        bars = ax.bar([str(i) for i in table.index], table[column], color=colour)
        ax.bar_label(bars, fmt=fmt, fontsize=7)
        ax.set(title=title)
        ax.tick_params(axis="x", rotation=20)
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


# --- segmentation (07_unet_segmentation): TP/FP/FN overlays, image panels, score curves ------------------------

#: Colours of :func:`tp_fp_fn_overlay` (report 003's convention).
TP_COLOUR, FP_COLOUR, FN_COLOUR = (0.1, 0.85, 0.1), (0.95, 0.1, 0.1), (0.15, 0.35, 1.0)


def tp_fp_fn_overlay(pred: np.ndarray, gt: np.ndarray, image: np.ndarray | None = None,
                     image_weight: float = 0.45) -> np.ndarray:
    """Pixel-level agreement of a prediction with the reference as an RGB float image in [0, 1] (report 003's
    figures 5.6 and 6.3): green = true positive (nucleus in both), red = false positive (predicted only), blue =
    false negative (reference only). Background agreeing in both is black, or ``image`` in grey (scaled by its
    1st-99.8th percentiles, dimmed by ``image_weight``) when given.

    ``pred``, ``gt``: (H, W) label images or masks (non-zero = nucleus).
    """
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt shapes differ: {pred.shape} vs {gt.shape}")
    if image is None:
        rgb = np.zeros(pred.shape + (3,), np.float32)
    else:
        grey = np.asarray(image, dtype=np.float32)
        grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
        low, high = np.percentile(grey, [1, 99.8])
        grey = np.clip((grey - low) / max(high - low, 1e-6), 0, 1) * image_weight
        rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[pred & gt] = TP_COLOUR
    rgb[pred & ~gt] = FP_COLOUR
    rgb[~pred & gt] = FN_COLOUR
    return rgb


def segmentation_panels(rows: Sequence[dict], columns: Sequence[str] = ("image", "reference", "prediction", "tp/fp/fn"),
                        cell_inches: float = 2.6, title: str = "", max_side: int | None = 384) -> plt.Figure:
    """A grid with one row per example: each ``row`` is a dict with ``image`` (H, W), ``gt`` and ``pred``
    (instance labels) and an optional ``title``; columns: the image, the reference and the prediction with their
    instances outlined (:func:`overlay_instances`), and the TP/FP/FN overlay (:func:`tp_fp_fn_overlay`).
    Images larger than ``max_side`` pixels are shown as their central ``max_side`` x ``max_side`` part (the
    row title says so), so that nuclei stay visible."""
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(rows), len(columns), figsize=(len(columns) * cell_inches,
                                                                len(rows) * cell_inches + 0.5), squeeze=False)
    for r, row in enumerate(rows):
        image, gt, pred = np.asarray(row["image"]), np.asarray(row["gt"]), np.asarray(row["pred"])
        label = row.get("title", "")
        if max_side is not None and max(gt.shape) > max_side:
            top, left = max(0, (gt.shape[0] - max_side) // 2), max(0, (gt.shape[1] - max_side) // 2)
            window = (slice(top, top + max_side), slice(left, left + max_side))
            image, gt, pred = image[window], gt[window], pred[window]
            label = f"{label}\n(centre {min(max_side, gt.shape[0])} x {min(max_side, gt.shape[1])})".strip()
        grey = image.mean(axis=-1) if image.ndim == 3 else image
        panels = {
            "image": None,
            "reference": overlay_instances(grey, gt),
            "prediction": overlay_instances(grey, pred),
            "tp/fp/fn": tp_fp_fn_overlay(pred, gt),
        }
        for c, name in enumerate(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if name == "image":
                low, high = np.percentile(grey, [1, 99.8])
                ax.imshow(grey, cmap="gray", vmin=low, vmax=max(high, low + 1e-6))
            else:
                ax.imshow(panels[name])
            if r == 0:
                ax.set_title(name, fontsize=9)
        if label:
            axes[r, 0].set_ylabel(label, fontsize=7)
    fig.legend(handles=[Patch(color=TP_COLOUR, label="true positive"), Patch(color=FP_COLOUR, label="false positive"),
                        Patch(color=FN_COLOUR, label="false negative")], loc="lower center", ncol=3, fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def score_curves(table, x: str, columns: Sequence[str], group: str | None = None, title: str = "",
                 xlabel: str | None = None, ylabel: str = "score", log_x: bool = False,
                 chosen: float | None = None, interval: tuple[str, str] | None = None) -> plt.Figure:
    """Scores against a hyperparameter: one line per column of ``columns`` (or, with ``group``, one line per
    value of that column for the single score ``columns[0]``), markers at the measured points, values written.
    ``interval``: the columns (low, high) of each point's interval, drawn as error bars (one score per line).

    ``table`` is a DataFrame with a column ``x`` (e.g. the learning rate) and the score columns. ``chosen``: the
    value of ``x`` chosen (e.g. on the validation split), marked by a dotted vertical line. On a log axis the
    measured values of ``x`` label the ticks.
    """
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    if group is None:
        series = [(str(c), table.sort_values(x), c) for c in columns]
    else:
        series = [(f"{group} {g}", part.sort_values(x), columns[0]) for g, part in table.groupby(group)]
    for label, part, column in series:
        errors = None if interval is None else [part[column] - part[interval[0]], part[interval[1]] - part[column]]
        ax.errorbar(part[x], part[column], yerr=errors, marker="o", linewidth=1.3, capsize=3, label=label)
        for xv, yv in zip(part[x], part[column], strict=True):
            ax.annotate(f"{yv:.3f}", (xv, yv), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=7)
    if chosen is not None:
        ax.axvline(chosen, color="0.5", linestyle=":", linewidth=1, label=f"chosen {x} {chosen:g}")
    if log_x:
        ax.set_xscale("log")
        ticks = np.unique(np.asarray(table[x], dtype=float))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set(xlabel=xlabel or x, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


# --- counting (08_automatic_labels) --------------------------------------------------------------------------


def count_scatter(true: Sequence[float], predicted: dict[str, Sequence[float]], title: str = "",
                  log: bool = False) -> plt.Figure:
    """Predicted against true nucleus counts per image, one panel per method in ``predicted`` (name -> counts,
    aligned with ``true``), the identity line dashed and the mean absolute error in each panel's title."""
    true = np.asarray(true, dtype=float)
    n = len(predicted)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False, sharex=True, sharey=True)
    top = max([true.max(initial=1.0)] + [np.max(np.asarray(p, float), initial=1.0) for p in predicted.values()])
    low = 0.8 if log else 0.0
    for ax, (name, counts) in zip(axes[0], predicted.items(), strict=True):
        counts = np.asarray(counts, dtype=float)
        ax.scatter(np.maximum(true, low), np.maximum(counts, low), s=10, alpha=0.6)
        ax.plot([low, top * 1.05], [low, top * 1.05], "--", color="0.4", linewidth=1)
        ax.set_title(f"{name}\nMAE {np.abs(counts - true).mean():.1f}", fontsize=9)
        ax.set_xlabel("true count")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.spines[["top", "right"]].set_visible(False)
    axes[0, 0].set_ylabel("predicted count")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- clustering (09_clustering): choosing k, scores per embedding x method, maps, cost curves ------------------


def elbow_silhouette(curves: dict, reference_k: int | None = None) -> plt.Figure:
    """The elbow and silhouette curves of k-means, one line per embedding: ``curves`` maps a name to a table indexed
    by k with ``wcss`` and ``silhouette`` (:func:`cellkit.clustering.k_curves`). WCSS is shown relative to its
    value at the smallest k, so embeddings of different scales share an axis; ``reference_k`` (e.g. the number of
    true classes) is marked by a dotted line."""
    fig, (elbow, silhouette) = plt.subplots(1, 2, figsize=(11, 3.8))
    first_k = None
    for name, table in curves.items():
        first_k = table.index[0]
        elbow.plot(table.index, table["wcss"] / table["wcss"].iloc[0], marker="o", label=name)
        silhouette.plot(table.index, table["silhouette"], marker="o", label=name)
    for ax in (elbow, silhouette):
        if reference_k is not None:
            ax.axvline(reference_k, color="grey", ls=":", lw=1)
        ax.set_xlabel("k (clusters)")
    elbow.set(ylabel=f"WCSS / WCSS at k={first_k}", title="elbow: within-cluster sum of squares")
    marked = "" if reference_k is None else f" (dotted: the {reference_k} true classes)"
    silhouette.set(ylabel="mean silhouette", title=f"silhouette{marked}")
    silhouette.legend()
    fig.tight_layout()
    return fig


def value_heatmap(table, title: str = "", vmin: float = 0.0, vmax: float = 1.0, fmt: str = "{:.2f}",
                  cmap: str = "viridis") -> plt.Figure:
    """A table of scores (rows x columns, e.g. embedding x method) as a heatmap with each value written in its
    cell (white on the dark part of the colour scale, black on the light part) and a colour bar."""
    values = np.asarray(table, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    light = vmin + 0.6 * (vmax - vmin)
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, fmt.format(value), ha="center", va="center", color="white" if value < light else "black",
                fontsize=9)
    ax.set_xticks(range(values.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(values.shape[0]), [str(i) for i in table.index])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def scatter_maps(xy: np.ndarray, colourings: dict[str, tuple[Sequence[int], Sequence[str]]], title: str = "",
                 figsize: tuple[float, float] = (12, 5.2)) -> plt.Figure:
    """The same 2-D map (``xy`` (n, 2), e.g. t-SNE) once per colouring, side by side: ``colourings`` maps a panel
    title to (a group id 0..g-1 per point, the g group names for the legend). Axes carry no ticks: only who sits
    next to whom matters on such maps."""
    xy = np.asarray(xy)
    fig, axes = plt.subplots(1, len(colourings), figsize=figsize, squeeze=False)
    for ax, (panel, (values, names)) in zip(axes[0], colourings.items(), strict=True):
        values = np.asarray(values)
        for j, name in enumerate(names):
            keep = values == j
            ax.scatter(xy[keep, 0], xy[keep, 1], s=4, color=plt.cm.tab10(j % 10), label=name)
        ax.set(title=panel, xticks=[], yticks=[])
        ax.legend(markerscale=3, fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def cost_curves(table, x: str, panels: dict[str, tuple[str, str]], group: str, xlabel: str | None = None,
                log: bool = True) -> plt.Figure:
    """Costs against a size on log-log axes (slopes are the measured exponents), one line per value of ``group``
    (e.g. a method), one panel per measured column: ``panels`` maps a column of ``table`` to (y label, title)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for name, part in table.groupby(group):
        for ax, column in zip(axes[0], panels, strict=True):
            ax.plot(part[x], part[column], marker="o", label=name)
    scale = "log" if log else "linear"
    for ax, (ylabel, title) in zip(axes[0], panels.values(), strict=True):
        ax.set(xscale=scale, yscale=scale, xlabel=xlabel or x, ylabel=ylabel, title=title)
    axes[0, 0].legend()
    fig.tight_layout()
    return fig
