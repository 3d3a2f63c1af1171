"""cellkit.plots: figures that carry numbers show the right ones."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellkit import plots  # noqa: E402


def test_count_scatter_one_panel_per_method_with_its_mae():
    fig = plots.count_scatter([10, 20, 30], {"components": [8, 20, 25], "watershed": [10, 21, 30]}, log=True)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["components\nMAE 2.3", "watershed\nMAE 0.3"]
    assert fig.axes[0].get_xscale() == "log"


def test_montage_title_sits_above_the_grid():
    images = np.zeros((5, 8, 8), np.uint8)
    fig = plots.montage(images, ncols=4, titles=list("abcde"), title="five cells")
    assert fig.get_suptitle() == "five cells"
    assert len(fig.axes) == 8 and sum(len(ax.images) for ax in fig.axes) == 5  # 2 rows of 4, 5 shown
    assert max(ax.get_position().y1 for ax in fig.axes) <= 1 - 0.45 / fig.get_figheight() + 1e-9


def test_grouped_bars_size_and_value_range():
    table = pd.DataFrame({"lenet": [0.5, 0.9], "cellnet": [0.7, 0.95]}, index=["basophil", "neutrophil"])
    fig = plots.grouped_bars(table, annotate=False, figsize=(11, 4), ylim=(0.4, 1.0))
    assert tuple(fig.get_size_inches()) == (11, 4) and fig.axes[0].get_ylim() == (0.4, 1.0)
    assert len(fig.axes[0].patches) == 4


def test_horizontal_bars_first_row_on_top_and_log_axis():
    timing = pd.DataFrame({"28x28": [0.1, 2.0, 0.01], "256x256": [1.0, 30.0, 0.2]}, index=["blur", "canny", "flip"])
    fig = plots.horizontal_bars(timing, title="cost", xlabel="ms", log=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and len(ax.patches) == 6
    assert [t.get_text() for t in ax.get_yticklabels()] == ["flip", "canny", "blur"]  # drawn bottom-up: blur on top
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["28x28", "256x256"]


def test_class_mosaics_one_panel_per_set_one_row_per_class():
    rng = np.random.default_rng(0)
    small = (rng.integers(0, 255, (12, 28, 28, 3), dtype=np.uint8), np.repeat([0, 1, 2], 4))
    large = (rng.integers(0, 255, (9, 48, 48, 3), dtype=np.uint8), np.array([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    fig = plots.class_mosaics({"28": small, "48": large}, ["a", "b", "c"], per_class=4)
    left, right = fig.axes
    assert left.images[0].get_array().shape == (3 * 28, 4 * 28, 3)
    assert right.images[0].get_array().shape == (3 * 48, 4 * 48, 3)
    np.testing.assert_array_equal(left.images[0].get_array()[28:56, :28], small[0][4])  # class b's first image
    assert not right.images[0].get_array()[:48, 3 * 48:].any()  # class a has 3 of 4: the last place stays black
    assert [t.get_text() for t in left.get_yticklabels()] == ["a", "b", "c"] and right.get_title() == "48"


def test_bar_panels_one_panel_per_column_with_values_written():
    costs = pd.DataFrame({"ms": [0.2, 3.0], "per_s": [1300.0, 70.0], "unused": [1, 2]}, index=["basic-cnn", "resnet50"])
    fig = plots.bar_panels(costs, {"ms": "training ms", "per_s": "images per second"})
    assert [ax.get_title() for ax in fig.axes] == ["training ms", "images per second"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["1300.0", "70.0"]
    assert tuple(fig.get_size_inches()) == (8.0, 3.4)


def test_elbow_silhouette_relative_wcss_and_the_reference_k():
    curves = {"cnn": pd.DataFrame({"wcss": [100.0, 50.0, 40.0], "silhouette": [0.2, 0.5, 0.3]},
                                  index=pd.Index([2, 4, 6], name="k"))}
    fig = plots.elbow_silhouette(curves, reference_k=4)
    elbow, silhouette = fig.axes
    np.testing.assert_allclose(elbow.lines[0].get_ydata(), [1.0, 0.5, 0.4])
    assert elbow.get_ylabel() == "WCSS / WCSS at k=2" and elbow.lines[1].get_xdata()[0] == 4  # the dotted line
    assert silhouette.get_title() == "silhouette (dotted: the 4 true classes)"


def test_value_heatmap_writes_every_value_in_a_readable_colour():
    grid = pd.DataFrame([[0.95, 0.3], [0.61, 0.59]], index=["cnn", "pixels"], columns=["kmeans++", "gmm"])
    fig = plots.value_heatmap(grid, title="ARI")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["0.95", "0.30", "0.61", "0.59"]
    assert [t.get_color() for t in ax.texts] == ["black", "white", "black", "white"]
    assert len(fig.axes) == 2  # the heatmap and its colour bar


def test_scatter_maps_one_panel_per_colouring_one_group_per_legend_entry():
    xy = np.arange(12, dtype=float).reshape(6, 2)
    fig = plots.scatter_maps(xy, {"clusters": ([0, 0, 1, 1, 2, 2], ["c0", "c1", "c2"]),
                                  "classes": ([1, 1, 1, 0, 0, 0], ["a", "b"])}, title="t-SNE")
    clusters, classes = fig.axes
    assert len(clusters.collections) == 3 and len(classes.collections) == 2
    assert [t.get_text() for t in classes.get_legend().get_texts()] == ["a", "b"]
    np.testing.assert_array_equal(classes.collections[0].get_offsets(), xy[3:])
    assert fig.get_suptitle() == "t-SNE"


def test_cost_curves_one_line_per_method_on_log_axes():
    cost = pd.DataFrame({"n": [100, 200, 100, 200], "method": ["exact", "exact", "nystroem", "nystroem"],
                         "seconds": [1.0, 8.0, 0.1, 0.2], "peak_mb": [10.0, 40.0, 1.0, 2.0]})
    fig = plots.cost_curves(cost, "n", {"seconds": ("s", "time"), "peak_mb": ("MiB", "memory")}, group="method")
    time, memory = fig.axes
    assert len(time.lines) == len(memory.lines) == 2 and time.get_xscale() == memory.get_yscale() == "log"
    np.testing.assert_array_equal(memory.lines[0].get_ydata(), [10.0, 40.0])
    assert [t.get_text() for t in time.get_legend().get_texts()] == ["exact", "nystroem"]


def test_score_curves_mark_the_chosen_value_and_label_a_log_axis_with_the_measured_values():
    curve = pd.DataFrame({"k": [1, 5, 25], "accuracy": [0.80, 0.86, 0.84], "macro_f1": [0.78, 0.85, 0.82]})
    fig = plots.score_curves(curve, "k", ["accuracy", "macro_f1"], log_x=True, chosen=5)
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and ax.lines[-1].get_xdata()[0] == 5  # two scores, then the dotted chosen line
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", "25"]
    assert "chosen k 5" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_scores_carry_their_intervals_as_asymmetric_error_bars():
    curve = pd.DataFrame({"rate": [1e-4, 1e-3], "seg": [0.60, 0.70], "low": [0.50, 0.68], "high": [0.65, 0.75]})
    ax = plots.score_curves(curve, "rate", ["seg"], log_x=True, interval=("low", "high")).axes[0]
    segments = ax.collections[0].get_segments()  # one vertical segment per point, from low to high
    np.testing.assert_allclose([s[:, 1] for s in segments], [[0.50, 0.65], [0.68, 0.75]])
    means = pd.DataFrame({"SEG": [0.7, 0.6]}, index=["full", "- zoom"])
    lows, highs = pd.DataFrame({"SEG": [0.65, 0.4]}, index=means.index), pd.DataFrame({"SEG": [0.72, 0.7]},
                                                                                    index=means.index)
    ax = plots.scores_with_spread(means, intervals=(lows, highs)).axes[0]
    np.testing.assert_allclose([s[:, 1] for s in ax.collections[0].get_segments()], [[0.65, 0.72], [0.4, 0.7]])
