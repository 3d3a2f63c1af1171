"""cellkit.features on hand-made arrays whose answers are known."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from skimage.filters import threshold_otsu

from cellkit import features
from cellkit.datasets import SegmentationSet


def test_features_imports_no_keras():
    code = "import sys, cellkit.features; print(any(m in sys.modules for m in ('keras', 'tensorflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- grey levels and thresholds ---


def test_luma_of_pure_colours_and_grey_passthrough():
    image = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [100, 100, 100]]], dtype=np.uint8)
    assert features.luma(image).tolist() == [[76, 150], [29, 100]]  # 0.299, 0.587, 0.114 of 255
    grey = np.array([[1, 2]], dtype=np.uint8)
    assert features.luma(grey) is grey


def test_luma_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        features.luma(np.zeros((2, 2, 3), dtype=np.float32))


def test_otsu_threshold_of_two_levels_separates_them():
    image = np.array([[10, 10], [200, 200]], dtype=np.uint8)
    assert int(features.otsu_thresholds(image)) == 10  # dark is grey <= t


def test_otsu_thresholds_match_scikit_image_per_image():
    rng = np.random.default_rng(0)
    stack = np.concatenate(
        [
            rng.integers(0, 256, size=(20, 16, 16)),
            rng.integers(90, 140, size=(20, 16, 16)),  # narrow range: empty bins on both sides
            np.where(rng.random((20, 16, 16)) < 0.3, 40, 220) + rng.integers(-5, 6, size=(20, 16, 16)),
        ]
    ).astype(np.uint8)
    expected = [threshold_otsu(image) for image in stack]
    assert features.otsu_thresholds(stack).tolist() == expected


def test_otsu_threshold_of_a_constant_image_is_its_value():
    stack = np.stack([np.full((3, 3), 7, np.uint8), np.array([[0, 255, 0]] * 3, np.uint8)])
    assert features.otsu_thresholds(stack).tolist() == [7, 0]


# --- colour and intensity features ---


def test_colour_intensity_features_of_a_2x2_image():
    # two white background pixels and two dark pixels, one reddish and one bluish
    image = np.array([[[255, 255, 255], [255, 255, 255]], [[100, 0, 0], [0, 0, 100]]], dtype=np.uint8)
    table = features.colour_intensity_features(image[None])
    assert list(table.columns) == list(features.COLOUR_INTENSITY_COLUMNS)
    row = table.iloc[0]
    assert row.mean_r == pytest.approx((255 + 255 + 100 + 0) / 4)
    assert row.mean_g == pytest.approx(255 / 2)
    assert row.mean_b == pytest.approx((255 + 255 + 0 + 100) / 4)
    grey = [255, 255, 30, 11]  # rint(0.299 * 100) = 30, rint(0.114 * 100) = 11
    assert row.grey_mean == pytest.approx(np.mean(grey))
    assert row.threshold == 30
    assert row.dark_mean == pytest.approx((30 + 11) / 2)
    assert row.bright_mean == pytest.approx(255)
    assert row.dark_fraction == pytest.approx(0.5)


def test_colour_intensity_features_is_per_image_and_handles_constant_images():
    black = np.zeros((4, 4, 3), np.uint8)
    half = np.zeros((4, 4, 3), np.uint8)
    half[:, 2:] = 200
    table = features.colour_intensity_features(np.stack([black, half]))
    assert len(table) == 2
    assert table.loc[0, "dark_fraction"] == 1.0 and np.isnan(table.loc[0, "bright_mean"])
    assert table.loc[1, "dark_mean"] == 0 and table.loc[1, "bright_mean"] == 200
    assert table.loc[1, "grey_mean"] == pytest.approx(100)


def test_colour_intensity_features_with_a_fixed_threshold():
    image = np.array([[[10, 10, 10], [60, 60, 60]], [[120, 120, 120], [250, 250, 250]]], dtype=np.uint8)
    row = features.colour_intensity_features(image[None], threshold=100).iloc[0]
    assert row.threshold == 100 and row.dark_fraction == 0.5
    assert (row.dark_mean, row.bright_mean) == (35, 185)
    row = features.colour_intensity_features(image[None], threshold=255).iloc[0]
    assert row.dark_fraction == 1 and np.isnan(row.bright_mean)


def test_colour_intensity_features_rejects_grey_stacks():
    with pytest.raises(ValueError, match="RGB"):
        features.colour_intensity_features(np.zeros((2, 4, 4), np.uint8))


# --- instances ---

LABELS = np.array(
    [
        [1, 1, 0, 0, 0],
        [1, 1, 0, 3, 0],
        [0, 0, 0, 3, 0],
        [0, 0, 0, 0, 0],
    ],
    dtype=np.uint16,
)  # id 1: 4 px on the border, id 2 absent, id 3: 2 px inside
IMAGE = np.array(
    [
        [100, 100, 10, 10, 10],
        [100, 100, 10, 50, 10],
        [10, 10, 10, 70, 10],
        [10, 10, 10, 10, 10],
    ],
    dtype=np.uint8,
)


def test_instance_areas_skips_absent_ids():
    assert features.instance_areas(LABELS).tolist() == [4, 2]
    assert features.instance_areas(np.zeros((3, 3), np.uint16)).tolist() == []


def test_instance_areas_rejects_float_labels():
    with pytest.raises(ValueError, match="integer"):
        features.instance_areas(LABELS.astype(float))


def _set() -> SegmentationSet:
    empty = np.zeros((2, 3), np.uint16)
    return SegmentationSet([IMAGE, np.full((2, 3), 5, np.uint8)], [LABELS, empty], ["a", "b"], groups=["4x5", "2x3"])


def test_nucleus_table():
    table = features.nucleus_table(_set())
    assert table["label"].tolist() == [1, 3]
    assert table["area_px"].tolist() == [4, 2]
    assert table["mean_intensity"].tolist() == pytest.approx([100, 60])
    assert table["on_border"].tolist() == [True, False]
    assert set(table["image_id"]) == {"a"} and set(table["group"]) == {"4x5"}


def test_nuclei_stats():
    table = features.nuclei_stats(_set()).set_index("image_id")
    a, b = table.loc["a"], table.loc["b"]
    assert (a.height, a.width, a.n_nuclei) == (4, 5, 2)
    assert a.nuclei_fraction == pytest.approx(6 / 20)
    assert a.median_area_px == 3 and a.mean_area_px == 3
    assert a.nuclei_mean == pytest.approx((4 * 100 + 50 + 70) / 6)
    assert a.background_mean == pytest.approx(10)
    assert b.n_nuclei == 0 and np.isnan(b.median_area_px) and np.isnan(b.nuclei_mean)
    assert b.background_mean == 5


def test_intensity_histograms_count_background_and_nuclei_pixels():
    table = features.intensity_histograms(_set())
    a = table[table["group"] == "4x5"].set_index("level")
    assert len(a) == 256
    assert a.loc[10, "background"] == 14 and a.loc[100, "nuclei"] == 4
    assert a.loc[50, "nuclei"] == 1 and a.loc[70, "nuclei"] == 1
    assert a["background"].sum() == 14 and a["nuclei"].sum() == 6
    assert a["nuclei_density"].sum() == pytest.approx(1)
    b = table[table["group"] == "2x3"]
    assert b["nuclei"].sum() == 0 and b["nuclei_density"].sum() == 0


def test_intensity_histograms_scale_16_bit_images():
    data = SegmentationSet([np.array([[0, 65535]], np.uint16)], [np.array([[0, 1]], np.uint16)], ["x"])
    table = features.intensity_histograms(data).set_index("level")
    assert table.loc[0, "background"] == 1 and table.loc[255, "nuclei"] == 1


# --- describing a set ---


def test_image_size_counts():
    shapes = [(28, 28, 3)] * 3 + [(363, 360, 3), (360, 360)]
    table = features.image_size_counts(shapes)
    assert table.to_dict("records") == [
        {"height": 28, "width": 28, "size": "28x28", "n_images": 3},
        {"height": 360, "width": 360, "size": "360x360", "n_images": 1},
        {"height": 363, "width": 360, "size": "363x360", "n_images": 1},
    ]


def test_summarise():
    stats = features.summarise([1, 2, 3, 4, np.nan, 5])
    assert stats["n"] == 5 and stats["median"] == 3 and stats["mean"] == 3
    assert (stats["min"], stats["max"]) == (1, 5)
    assert (stats["q1"], stats["q3"], stats["iqr"]) == (2, 4, 2)
    assert features.summarise(pd.Series([], dtype=float)) == {"n": 0}


def test_stratified_sample_keeps_shares_and_rare_groups():
    groups = ["big"] * 90 + ["mid"] * 9 + ["one"]
    sample = features.stratified_sample(groups, 20, seed=1)
    chosen = pd.Series(np.asarray(groups)[sample]).value_counts()
    assert chosen["one"] == 1 and chosen["big"] == 18 and chosen["mid"] == 1
    assert len(sample) == len(set(sample.tolist())) == 20
    assert features.stratified_sample(groups, 20, seed=1).tolist() == sample.tolist()  # seeded
    assert features.stratified_sample(groups, None).tolist() == list(range(100))
    with pytest.raises(ValueError, match="one of each"):
        features.stratified_sample(groups, 2)


def test_nucleus_morphology_of_two_squares():
    labels = np.zeros((30, 30), np.uint16)
    labels[2:12, 2:12] = 1  # 10 x 10
    labels[20:24, 20:24] = 5  # 4 x 4
    image = np.where(labels == 1, 100, np.where(labels == 5, 50, 0)).astype(np.uint8)
    data = SegmentationSet([image, image], [labels, np.zeros_like(labels)], ["a", "empty"], groups=["g", "g"])
    table = features.nucleus_morphology(data)
    assert table["label"].tolist() == [1, 5] and table["image_index"].tolist() == [0, 0]
    assert table["area_px"].tolist() == [100, 16]
    np.testing.assert_allclose(table["relative_area"], [100 / 58, 16 / 58])  # median of 100 and 16 is 58
    np.testing.assert_allclose(table["relative_intensity"], [100 / 75, 50 / 75])
    np.testing.assert_allclose(table[["solidity", "extent"]], 1.0)
    np.testing.assert_allclose(table["eccentricity"], 0.0, atol=1e-12)  # a square's inertia ellipse is a circle
    np.testing.assert_allclose(table["intensity_cv"], 0.0, atol=1e-12)
    assert set(features.MORPHOLOGY_COLUMNS) <= set(table.columns)
    assert not table["on_border"].any()
    labels[0, 0] = 7
    assert features.nucleus_morphology(data)["on_border"].tolist() == [False, False, True]
