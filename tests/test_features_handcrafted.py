"""Hand-crafted features of notebook 03 (cellkit.features): every family on inputs with a known answer,
and the vectorised implementations against scikit-image's per-image reference functions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.color import rgb2hsv
from skimage.draw import disk, ellipse
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from skimage.measure import perimeter, regionprops

from cellkit import features


def _disk(radius: float, size: int, centre: tuple[float, float] | None = None) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    rows, cols = disk(centre or ((size - 1) / 2, (size - 1) / 2), radius, shape=mask.shape)
    mask[rows, cols] = True
    return mask


def _cell_image(size: int = 28, radius: float = 7, centre: tuple[float, float] | None = None) -> np.ndarray:
    """A pale pink background with one purple disk (a stained cell) and a darker core (its nucleus)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = (240, 215, 200)
    centre = centre or ((size - 1) / 2, (size - 1) / 2)
    image[_disk(radius, size, centre)] = (150, 110, 200)
    image[_disk(radius / 2, size, centre)] = (70, 30, 120)
    return image


@pytest.fixture(scope="module")
def random_rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(12, 28, 28, 3), dtype=np.uint8)


# --- colour ---


def test_rgb_to_hsv_of_known_colours():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [0, 0, 0], [255, 255, 0]]], np.uint8)
    hsv = features.rgb_to_hsv(colours)[0].astype(int)
    assert hsv[:, 0].tolist() == [0, 85, 170, 0, 0, 42]  # 0, 120, 240, grey, black, 60 degrees (42.5, to even)
    assert hsv[:, 1].tolist() == [255, 255, 255, 0, 0, 255]
    assert hsv[:, 2].tolist() == [255, 255, 255, 128, 0, 255]


def test_rgb_to_hsv_agrees_with_scikit_image(random_rgb):
    reference = rgb2hsv(random_rgb) * np.array([255, 255, 255])
    assert np.abs(features.rgb_to_hsv(random_rgb).astype(float) - reference).max() <= 0.5 + 1e-6


def test_colour_statistics_of_a_known_image():
    image = np.zeros((2, 2, 3), np.uint8)
    image[0] = (10, 20, 30)
    image[1] = (30, 40, 50)
    table = features.colour_statistics(image[None])
    row = table.iloc[0]
    assert (row.mean_r, row.mean_g, row.mean_b) == (20, 30, 40)  # report 001's mean RGB
    assert (row.std_r, row.std_g, row.std_b) == (10, 10, 10)
    assert row.p50_r == 20 and row.p25_r == 10 and row.p75_r == 30
    assert row.mean_v == 40  # value = max channel = blue
    assert list(table.columns[:5]) == ["mean_r", "std_r", "p25_r", "p50_r", "p75_r"]
    assert table.shape == (1, 5 * len(features.CHANNEL_NAMES))


def test_colour_histograms_sum_to_one_and_put_pixels_in_the_right_bins(random_rgb):
    table = features.colour_histograms(random_rgb, bins=16)
    assert table.shape == (12, 6 * 16)
    for channel in ("r", "g", "b", "h", "s", "v"):
        part = table.filter(regex=f"^{channel}_")
        assert part.shape[1] == 16
        np.testing.assert_allclose(part.sum(axis=1), 1.0)
    constant = np.full((1, 4, 4, 3), (0, 100, 255), np.uint8)
    row = features.colour_histograms(constant, bins=8, channels=("r", "g", "b")).iloc[0]
    assert row["r_00"] == 1 and row["g_03"] == 1 and row["b_07"] == 1  # 100 // 32 = 3, 255 // 32 = 7
    assert row.sum() == 3


def test_colour_histograms_reject_bad_arguments(random_rgb):
    with pytest.raises(ValueError, match="divide"):
        features.colour_histograms(random_rgb, bins=10)
    with pytest.raises(ValueError, match="unknown channels"):
        features.colour_histograms(random_rgb, channels=("x",))
    with pytest.raises(ValueError, match="uint8 RGB"):
        features.colour_histograms(random_rgb[..., 0])


# --- texture: LBP ---


@pytest.mark.parametrize(("points", "radius"), [(8, 1), (16, 2), (8, 1.5), (12, 3)])
def test_lbp_codes_match_scikit_image_on_the_interior(points, radius):
    grey = np.random.default_rng(points).integers(0, 256, size=(5, 20, 23), dtype=np.uint8)
    grey[:, 5:9, 5:9] = 77  # flat patches make ties (neighbour == centre) that must break the same way
    margin = int(np.ceil(radius))
    mine = features.lbp_codes(grey, points, radius)
    assert mine.shape == (5, 20 - 2 * margin, 23 - 2 * margin)
    for image, codes in zip(grey, mine, strict=True):
        reference = local_binary_pattern(image, points, radius, "uniform")[margin:-margin, margin:-margin]
        np.testing.assert_array_equal(codes, reference)


def test_lbp_of_a_constant_image_is_one_code():
    for points, radius in features.LBP_SETTINGS:
        codes = features.lbp_codes(np.full((10, 10), 123, np.uint8), points, radius)
        assert set(np.unique(codes).tolist()) == {points}  # every neighbour >= centre: all ones, uniform
    table = features.lbp_histograms(np.full((3, 12, 12), 9, np.uint8))
    assert table.shape == (3, 10 + 18)
    assert (table["p8r1_08"] == 1).all() and (table["p16r2_16"] == 1).all()
    assert table.sum(axis=1).tolist() == [2.0, 2.0, 2.0]  # one histogram per setting, each sums to 1


def test_lbp_of_a_bright_spot_and_a_dark_spot():
    bright = np.zeros((5, 5), np.uint8)
    bright[2, 2] = 200
    assert features.lbp_codes(bright, 8, 1)[1, 1] == 0  # a local maximum: no neighbour as bright
    dark = np.full((5, 5), 200, np.uint8)
    dark[2, 2] = 0
    assert features.lbp_codes(dark, 8, 1)[1, 1] == 8  # a local minimum: all neighbours brighter


def test_lbp_histograms_sum_to_one_per_setting(random_rgb):
    table = features.lbp_histograms(features.luma(random_rgb))
    np.testing.assert_allclose(table.filter(like="p8r1_").sum(axis=1), 1.0)
    np.testing.assert_allclose(table.filter(like="p16r2_").sum(axis=1), 1.0)


def test_lbp_codes_reject_images_without_interior():
    with pytest.raises(ValueError, match="interior"):
        features.lbp_codes(np.zeros((1, 4, 4), np.uint8), 16, 2)


# --- texture: GLCM ---


@pytest.mark.parametrize(("angle", "radians"), [(0, 0.0), (45, np.pi / 4), (90, np.pi / 2), (135, 3 * np.pi / 4)])
def test_glcm_and_properties_match_scikit_image(angle, radians):
    quantised = np.random.default_rng(angle).integers(0, 8, size=(4, 15, 17), dtype=np.uint8)
    (offset,) = features.glcm_offsets(1, [angle])
    mine = features.glcm(quantised, 8, offset)
    props = features.glcm_properties(mine)
    for k, image in enumerate(quantised):
        reference = graycomatrix(image, [1], [radians], levels=8, symmetric=True, normed=True)
        np.testing.assert_allclose(mine[k], reference[:, :, 0, 0], atol=1e-12)
        for name in features.GLCM_PROPERTIES:
            assert props[name][k] == pytest.approx(graycoprops(reference, name)[0, 0], abs=1e-12)


def test_glcm_of_a_constant_image():
    props = features.glcm_properties(features.glcm(np.full((1, 6, 6), 3), 4, (0, 1)))
    assert props["contrast"][0] == 0 and props["dissimilarity"][0] == 0
    assert props["homogeneity"][0] == 1 and props["energy"][0] == 1 and props["entropy"][0] == 0
    assert props["correlation"][0] == 1  # zero variance: 1 by convention, as scikit-image


def test_glcm_of_vertical_stripes():
    stripes = np.tile(np.array([0, 3]), (6, 3))[None]  # columns alternate 0, 3
    horizontal = features.glcm_properties(features.glcm(stripes, 4, (0, 1)))
    vertical = features.glcm_properties(features.glcm(stripes, 4, (1, 0)))
    assert horizontal["contrast"][0] == 9 and horizontal["correlation"][0] == pytest.approx(-1)
    assert vertical["contrast"][0] == 0 and vertical["correlation"][0] == pytest.approx(1)


def test_glcm_features_names_and_constant_images():
    images = np.full((2, 10, 10, 3), 200, np.uint8)
    table = features.glcm_features(images, channels=("grey", "s"), levels=8, distances=(1, 3))
    assert table.shape == (2, 2 * 2 * len(features.GLCM_PROPERTIES))
    assert "grey_d3_contrast" in table and "s_d1_entropy" in table
    assert (table.filter(like="contrast") == 0).all().all()
    assert (table.filter(like="energy") == 1).all().all()


# --- shape ---


@pytest.mark.parametrize("radius", [10, 20, 40])
def test_perimeter_and_area_of_a_disk(radius):
    mask = _disk(radius, 2 * radius + 10)
    assert features.perimeters(mask) == pytest.approx(2 * np.pi * radius, rel=0.05)
    row = features.shape_features(mask[None]).iloc[0]
    assert row.area == pytest.approx(np.pi * radius**2, rel=0.03)
    assert row.equivalent_diameter == pytest.approx(2 * radius, rel=0.02)
    assert row.eccentricity == pytest.approx(0, abs=1e-6)  # a circle
    assert row.circularity == pytest.approx(1, abs=0.1)
    assert row.solidity == pytest.approx(1, abs=0.06)  # the hull of pixel squares is a little larger
    assert row.centre_offset == pytest.approx(0, abs=1e-9)


def test_perimeters_match_scikit_image():
    masks = np.random.default_rng(1).random((6, 20, 20)) < 0.55
    masks[0] = False
    for neighbourhood in (4, 8):
        reference = [perimeter(m, neighbourhood) for m in masks]
        np.testing.assert_allclose(features.perimeters(masks, neighbourhood), reference, atol=1e-9)


def test_shape_of_an_elongated_ellipse():
    mask = np.zeros((60, 100), bool)
    rows, cols = ellipse(30, 50, 10, 40, shape=mask.shape)
    mask[rows, cols] = True
    row = features.shape_features(mask[None]).iloc[0]
    assert row.eccentricity == pytest.approx(np.sqrt(1 - (10 / 40) ** 2), abs=0.01)  # 0.968
    assert row.major_axis == pytest.approx(80, rel=0.02) and row.minor_axis == pytest.approx(20, rel=0.03)
    reference = regionprops(mask.astype(np.uint8))[0]
    assert row.eccentricity == pytest.approx(reference.eccentricity, abs=1e-9)
    assert row.solidity == pytest.approx(reference.solidity, abs=1e-9)
    assert row.extent == pytest.approx(reference.extent, abs=1e-9)
    assert row.perimeter == pytest.approx(reference.perimeter, abs=1e-9)


def test_shape_features_of_a_square_and_of_an_empty_image():
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:6, 3:9] = True  # 4 x 6 rectangle
    table = features.shape_features(masks)
    assert list(table.columns) == list(features.SHAPE_COLUMNS)
    assert table.loc[0, "area"] == 24 and table.loc[0, "extent"] == 1 and table.loc[0, "solidity"] == 1
    assert table.loc[1, "area"] == 0 and table.loc[1, "perimeter"] == 0 and np.isnan(table.loc[1, "solidity"])


def test_central_object_keeps_the_component_nearest_the_centre():
    masks = np.zeros((3, 21, 21), bool)
    masks[0, 8:13, 8:13] = True  # small, in the centre
    masks[0, 0:6, 0:15] = True  # larger, in a corner
    masks[1, 0:4, 0:4] = True  # only corners: the nearer one wins
    masks[1, 15:21, 12:21] = True
    kept = features.central_object(masks)
    assert kept[0].sum() == 25 and kept[0, 10, 10]
    assert kept[1].sum() == 54 and kept[1, 20, 20]
    assert not kept[2].any()  # empty stays empty


def test_fill_holes_fills_each_image_including_the_first_and_last():
    ring = _disk(6, 17) & ~_disk(3, 17)
    filled = features.fill_holes(np.stack([ring, ring, ring]))
    np.testing.assert_array_equal(filled, np.stack([_disk(6, 17)] * 3))


def test_close_masks_joins_parts_one_pixel_apart_without_eroding_the_border():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 0:3, 0:3] = True
    masks[0, 0:3, 4:7] = True
    closed = features.close_masks(masks, 1)
    assert closed[0, 0:3, 3].all() and closed[0, 0, 0]
    assert features.count_components(masks).tolist() == [2]
    assert features.count_components(closed).tolist() == [1]


def test_cell_masks_find_the_central_cell_and_its_nucleus():
    images = np.stack([_cell_image(), _cell_image(centre=(10, 16))])
    images[0, 0:3, 0:3] = (150, 110, 200)  # a stained fragment in a corner: not the central cell
    cell, nucleus = features.cell_masks(images)
    np.testing.assert_array_equal(cell[0], _disk(7, 28))
    np.testing.assert_array_equal(nucleus[0], _disk(3.5, 28))
    np.testing.assert_array_equal(cell[1], _disk(7, 28, (10, 16)))
    assert not (nucleus & ~cell).any()


def test_cell_shape_and_region_colour_features_of_a_synthetic_cell():
    images = _cell_image()[None]
    table = features.cell_shape_features(images)
    row = table.iloc[0]
    assert row.cell_area == _disk(7, 28).sum() and row.nucleus_area == _disk(3.5, 28).sum()
    assert row.nucleus_fraction == pytest.approx(row.nucleus_area / row.cell_area)
    assert row.nucleus_lobes == 1 and row.cell_eccentricity < 0.1
    assert row.cell_fraction == pytest.approx(row.cell_area / 28**2)
    colours = features.region_colour_features(images).iloc[0]
    assert (colours.nucleus_r, colours.nucleus_g, colours.nucleus_b) == (70, 30, 120)
    assert (colours.cytoplasm_r, colours.background_r) == (150, 240)


def test_handcrafted_features_shape_names_and_independence_from_chunks(random_rgb):
    images = np.concatenate([random_rgb, np.stack([_cell_image()] * 3)])
    table = features.handcrafted_features(images)
    assert len(table) == len(images) and table.index.tolist() == list(range(len(images)))
    families = features.feature_families(table.columns)
    assert list(dict.fromkeys(families)) == list(features.FEATURE_FAMILIES)
    assert table.columns.is_unique and (table.dtypes == np.float64).all()
    assert "shape.cell_perimeter" in table and "colour.mean_r" in table and "lbp.p8r1_08" in table
    chunked = features.handcrafted_features(images, n_jobs=2, chunk_size=4)
    pd.testing.assert_frame_equal(table, chunked)
    only = features.handcrafted_features(images, families=("lbp",))
    assert set(features.feature_families(only.columns)) == {"lbp"}
    with pytest.raises(ValueError, match="unknown feature families"):
        features.handcrafted_features(images, families=("colour", "deep"))


def test_handcrafted_features_of_48_pixel_crops_have_the_same_columns():
    small = features.handcrafted_features(np.stack([_cell_image(28)] * 2))
    large = features.handcrafted_features(np.stack([_cell_image(48, radius=12)] * 2))
    assert list(small.columns) == list(large.columns)
