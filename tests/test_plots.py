"""cellkit.plots: figures that carry numbers show the right ones."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from cellkit import plots  # noqa: E402


def test_count_scatter_one_panel_per_method_with_its_mae():
    fig = plots.count_scatter([10, 20, 30], {"components": [8, 20, 25], "watershed": [10, 21, 30]}, log=True)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["components\nMAE 2.3", "watershed\nMAE 0.3"]
    assert fig.axes[0].get_xscale() == "log"
