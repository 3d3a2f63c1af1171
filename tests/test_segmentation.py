"""cellkit.segmentation on hand-made arrays with known answers, simulated nuclei, and a few real DSB images."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import find_boundaries

from cellkit import datasets, metrics, synthetic
from cellkit import segmentation as seg
from cellkit.datasets import DataError


def test_segmentation_imports_no_keras():
    code = "import sys, cellkit.segmentation; print(any(m in sys.modules for m in ('keras', 'tensorflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _disc(shape, centre, radius):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _touching_squares() -> np.ndarray:
    labels = np.zeros((40, 50), np.uint16)
    labels[10:30, 5:25] = 1
    labels[10:30, 25:45] = 7  # shares the column boundary 24 | 25 with object 1
    return labels


# --- normalisation and sizes ---


@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (32, 48), (100, 129, 3)])
def test_pad_to_multiple_then_crop_round_trip(shape):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    padded, original = seg.pad_to_multiple(image, 16)
    assert original == shape[:2]
    assert padded.shape[0] % 16 == 0 and padded.shape[1] % 16 == 0 and padded.shape[2:] == shape[2:]
    assert padded.shape[0] - shape[0] < 16 and padded.shape[1] - shape[1] < 16
    np.testing.assert_array_equal(seg.crop_to(padded, original), image)


def test_pad_to_multiple_reflects_and_leaves_fitting_images_alone():
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    padded, _ = seg.pad_to_multiple(image, 8)
    assert padded.shape == (8, 8)
    np.testing.assert_array_equal(padded[4], image[2, [0, 1, 2, 3, 4, 3, 2, 1]])  # reflected about the last row
    fitting = np.zeros((32, 16))
    assert seg.pad_to_multiple(fitting, 16)[0] is fitting


def test_percentile_normalise_range_and_constant_images():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4000, size=(64, 64)).astype(np.uint16)
    x = seg.percentile_normalise(image)
    assert x.dtype == np.float32 and x.shape == image.shape
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.005 < np.mean(x == 0) < 0.02 and np.mean(x == 1) < 0.005  # only the tails beyond 1 and 99.8 clip
    unclipped = seg.percentile_normalise(image, clip=False)
    assert unclipped.min() < 0 and unclipped.max() > 1
    for constant in (np.full((8, 8), 7, np.uint8), np.zeros((8, 8), np.float32)):
        z = seg.percentile_normalise(constant)
        assert z.dtype == np.float32 and np.all(z == 0)


def test_local_contrast_measures_each_spot_against_its_neighbourhood():
    image = np.full((128, 256), 0.05, np.float32)
    image[30:40, 30:40] = 0.9  # a bright nucleus ...
    image[30:40, 200:210] = 0.15  # ... and a dim one far away, 0.1 above its background
    local = seg.local_contrast(image, sigma=16)
    assert local.dtype == np.float32 and local.shape == image.shape
    assert 0.0 <= local.min() and local.max() <= 1.0
    # the dim nucleus, 0.15 in the image, stands out locally (over 2 local standard deviations: > 0.83)
    assert local[35, 205] > 0.83 and local[35, 35] > 0.95
    assert local[100, 120] == pytest.approx(0.5, abs=1e-3)  # flat background: the local mean
    np.testing.assert_allclose(seg.local_contrast(np.full((32, 32), 0.3, np.float32)), 0.5, atol=1e-6)
    # pixel noise (sigma 0.03) on flat background: without smoothing and floor 16 % of pixels lie above one
    # local standard deviation; with them, fewer than 0.1 % (none in this draw)
    noise = np.clip(0.1 + 0.03 * np.random.default_rng(0).standard_normal((128, 128)), 0, 1).astype(np.float32)
    assert (seg.local_contrast(noise, floor=0, smooth=0) > 0.5 + 1 / 6).mean() > 0.1
    assert (seg.local_contrast(noise) > 0.5 + 1 / 6).mean() < 0.001


def test_input_stack_channels():
    image = np.full((64, 64), 20, np.uint8)
    image[20:44, 20:44] = 200
    image[0, 0] = 0
    stack = seg.input_stack(image, seg.CHANNELS)
    assert stack.shape == (64, 64, 3) and stack.dtype == np.float32
    original, inverse, canny = np.moveaxis(stack, -1, 0)
    np.testing.assert_allclose(original, seg.percentile_normalise(image))
    np.testing.assert_allclose(inverse, 1 - original)
    assert set(np.unique(canny)) == {0.0, 1.0}
    ring = find_boundaries(image > 100, mode="thick")
    assert canny[ring].mean() > 0.4 and not canny[~ring].any()  # edges on the square's outline only
    one = seg.input_stack(image)
    assert one.shape == (64, 64, 1)
    np.testing.assert_array_equal(one[..., 0], original)
    assert seg.input_stack(np.dstack([image] * 3), ("inverse",)).shape == (64, 64, 1)  # colour averaged
    four = seg.input_stack(image, seg.INPUT_CHANNELS)
    np.testing.assert_array_equal(four[..., :3], stack)
    np.testing.assert_allclose(four[..., 3], seg.local_contrast(original))
    with pytest.raises(ValueError, match="channels"):
        seg.input_stack(image, ("original", "sobel"))


# --- targets ---


def test_three_class_target_separates_touching_squares():
    labels = _touching_squares()
    target = seg.three_class_target(labels)
    assert target.dtype == np.uint8 and set(np.unique(target)) == {0, 1, 2}
    np.testing.assert_array_equal(target == 0, labels == 0)
    _, n_interiors = ndi.label(target == 1, structure=np.ones((3, 3)))
    assert n_interiors == 2  # separate even with 8-connectivity
    np.testing.assert_array_equal(target == 2, find_boundaries(labels, connectivity=2, mode="inner"))
    assert (target[10:30, 24] == 2).all() and (target[10:30, 25] == 2).all()  # both sides of the shared boundary
    np.testing.assert_array_equal(seg.binary_target(labels), labels > 0)


def test_three_class_target_edge_width():
    labels = _touching_squares()
    thick = seg.three_class_target(labels, edge_width=2)
    assert (thick[12:28, 23:27] == 2).all() and (thick[12:28, 8:22] == 1).all()
    assert (thick == 2).sum() > (seg.three_class_target(labels) == 2).sum()
    with pytest.raises(ValueError, match="edge_width"):
        seg.three_class_target(labels, edge_width=0)


def test_class_weights():
    target = np.array([[0, 0, 0, 0], [0, 1, 1, 2]], np.uint8)
    np.testing.assert_array_equal(seg.class_weight_map(target), [[1, 1, 1, 1], [1, 1, 1, 5]])
    # class frequencies 5/8, 2/8, 1/8; median 2/8
    np.testing.assert_allclose(seg.balanced_class_weights([target, target]), [0.4, 1.0, 2.0])


# --- training crops ---


def test_random_crops_shapes_foreground_and_determinism():
    field = synthetic.nuclei_field(shape=(200, 300), n_nuclei=4, seed=3)
    images, labels = [field.fluorescence], [field.labels]
    x, y = seg.random_crops(images, labels, n=12, size=64, rng=np.random.default_rng(0), foreground_fraction=1.0)
    assert x.shape == (12, 64, 64) and x.dtype == np.uint8 and y.shape == (12, 64, 64) and y.dtype == np.int32
    assert all(crop.any() for crop in y)
    x2, y2 = seg.random_crops(images, labels, n=12, size=64, rng=np.random.default_rng(0), foreground_fraction=1.0)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # each crop is a window of the source
    crop = x[0]
    hits = [(i, j) for i in range(200 - 63) for j in range(300 - 63) if field.fluorescence[i, j] == crop[0, 0]]
    assert any((field.fluorescence[i : i + 64, j : j + 64] == crop).all() for i, j in hits)


def test_random_crops_pick_images_in_proportion_to_their_weights():
    # constant images 0, 1, 2 tell which image a crop came from
    images = [np.full((32, 32), k, np.uint8) for k in range(3)]
    labels = [np.zeros((32, 32), np.int32)] * 3
    x, _ = seg.random_crops(images, labels, n=3000, size=16, rng=np.random.default_rng(1),
                            image_weights=[1.0, 0.0, 3.0])
    share = np.bincount(x[:, 0, 0], minlength=3) / len(x)
    np.testing.assert_allclose(share, [0.25, 0.0, 0.75], atol=0.03)
    for bad in ([1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, np.nan, 1.0]):
        with pytest.raises(ValueError, match="image_weights"):
            seg.random_crops(images, labels, n=1, size=16, image_weights=bad)


def test_nuclei_weights_count_objects_with_at_least_one():
    labels = np.zeros((10, 10), np.int32)
    labels[1:3, 1:3], labels[5:7, 5:7], labels[8, 8] = 4, 9, 2
    np.testing.assert_array_equal(seg.nuclei_weights([labels, np.zeros((5, 5), np.int32), labels > 0]), [3, 1, 1])


def test_random_crops_pad_small_images_with_mirrored_objects_as_new_ids():
    image = np.zeros((40, 50, 2), np.float32)
    labels = np.zeros((40, 50), np.uint16)
    labels[5:15, 0:10] = 3
    image[labels > 0] = 1
    x, y = seg.random_crops([image], [labels], n=2, size=(128, 96), rng=np.random.default_rng(0))
    assert x.shape == (2, 128, 96, 2) and y.shape == (2, 128, 96)
    assert len(np.unique(y[0])) - 1 > 1  # the object and its mirror images
    np.testing.assert_array_equal(x[0][..., 0] > 0, y[0] > 0)
    target = seg.three_class_target(y[0])
    _, n_objects = ndi.label(target == 1)
    assert n_objects == len(np.unique(y[0])) - 1  # mirrored copies are separated by edges


def test_random_crops_with_notebook_02_augmentation():
    from cellkit import transforms

    field = synthetic.nuclei_field(shape=(160, 160), seed=2)
    stack = seg.input_stack(field.fluorescence, seg.CHANNELS)
    x, y = seg.random_crops([stack], [field.labels], n=3, size=128, rng=np.random.default_rng(5),
                            augmentation=transforms.RECIPES["report002"])
    assert x.shape == (3, 128, 128, 3) and x.dtype == np.float32 and y.shape == (3, 128, 128)
    assert set(np.unique(y)) <= set(np.unique(field.labels))


# --- label images and instances ---


def test_remove_small_and_relabel():
    labels = np.zeros((10, 10), np.uint16)
    labels[0:2, 0:2] = 5  # 4 px
    labels[5:10, 5:10] = 9  # 25 px
    labels[0, 9] = 2  # 1 px
    out = seg.remove_small(labels, min_size=4)
    assert out.dtype == np.int32
    assert sorted(np.unique(out)) == [0, 1, 2]
    np.testing.assert_array_equal(out == 2, labels == 9)
    kept = seg.remove_small(labels, min_size=5, relabel=False)
    assert sorted(np.unique(kept)) == [0, 9]
    np.testing.assert_array_equal(seg.relabel_sequential(np.array([[0, 40], [7, 40]])), [[0, 2], [1, 2]])


def test_holes_filled_known_case():
    ring = np.zeros((7, 9), bool)
    ring[1:6, 1:6] = True
    ring[2:4, 2:4] = False  # a hole: filled
    ring[0:3, 7] = True  # a bar on the border, the background beside it touches the border: not a hole
    diamond = np.zeros((5, 5), bool)
    diamond[[1, 2, 2, 3], [1, 0, 2, 1]] = True  # (2, 1) is shut in on its 4 sides, open only diagonally: a hole
    filled = seg.holes_filled(ring)
    assert filled.dtype == bool
    assert filled[1:6, 1:6].all() and filled.sum() == 25 + 3
    assert seg.holes_filled(diamond)[2, 1] and seg.holes_filled(diamond).sum() == 5


def test_holes_filled_equals_scipy_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(100):
        mask = rng.random(tuple(rng.integers(1, 40, 2))) < rng.uniform(0.3, 0.8)
        np.testing.assert_array_equal(seg.holes_filled(mask), ndi.binary_fill_holes(mask))


def test_instances_from_foreground_components_and_small_objects():
    prob = np.zeros((30, 30), np.float32)
    prob[2:10, 2:10] = 0.9
    prob[5, 5] = 0.1  # a hole
    prob[15:25, 15:25] = 0.7
    prob[28, 28] = 0.95  # a speck
    labels = seg.instances_from_foreground(prob, threshold=0.5, min_size=5)
    assert labels.dtype == np.int32 and labels.max() == 2
    assert labels[5, 5] == labels[2, 2] and labels[28, 28] == 0


def test_watershed_splits_two_overlapping_discs():
    shape = (60, 80)
    mask = _disc(shape, (30, 25), 14) | _disc(shape, (30, 50), 14)
    assert ndi.label(mask)[1] == 1
    labels = seg.watershed_split(mask)
    assert labels.max() == 2
    assert labels[30, 25] != labels[30, 50] and labels[30, 25] > 0 and labels[30, 50] > 0
    single = seg.watershed_split(_disc(shape, (30, 40), 14))
    assert single.max() == 1


def test_h_maxima_matches_scikit_image():
    rng = np.random.default_rng(0)
    mask = np.zeros((120, 160), bool)
    for _ in range(25):
        mask |= _disc(mask.shape, rng.integers(0, 120, 2), rng.integers(3, 15))
    distance = seg._distance(mask)
    for h in (0.5, 2.0, 3.0):
        np.testing.assert_array_equal(seg._h_maxima(distance, h), h_maxima(distance, np.float32(h)).astype(bool))


def test_instances_from_three_class_recovers_a_perfect_target():
    field = synthetic.nuclei_field(seed=4)
    assert field.touching  # the test is about touching nuclei
    probs = np.eye(3, dtype=np.float32)[seg.three_class_target(field.labels)]
    labels = seg.instances_from_three_class(probs, min_size=0)
    match = metrics.match_instances(labels, field.labels)
    assert match["f1"] == 1.0 and match["mean_iou"] > 0.98
    # report 002's convention (edge pixels are background): every nucleus found, but each loses its outline
    interiors = metrics.match_instances(seg.instances_from_three_class(probs, grow=False, min_size=0), field.labels)
    assert interiors["tp"] == field.n_nuclei and interiors["mean_iou"] < 0.85


def test_probs_to_instances_dispatches_on_classes():
    labels = _touching_squares()
    three = np.eye(3, dtype=np.float32)[seg.three_class_target(labels)]
    assert seg.probs_to_instances(three).max() == 2
    two = np.eye(2, dtype=np.float32)[seg.binary_target(labels)]
    assert seg.probs_to_instances(two).max() == 1  # connected components keep the squares merged
    with pytest.raises(DataError):
        seg.probs_to_instances(np.zeros((4, 4, 5)))


# --- tiled prediction ---


def _pointwise(batch):
    return np.concatenate([2 * batch + 1, batch**2], axis=-1)


def _mean3x3(batch):
    return ndi.uniform_filter(batch, size=(1, 3, 3, 1), mode="reflect")


@pytest.mark.parametrize("predict", [_pointwise, _mean3x3])
def test_tiled_prediction_equals_untiled(predict):
    stack = np.random.default_rng(0).random((300, 517, 2)).astype(np.float32)
    whole = seg.predict_tiled(stack, predict, tile=None)
    assert whole.shape == (300, 517, predict(stack[None, :2, :2]).shape[-1]) and whole.dtype == np.float32
    tiled = seg.predict_tiled(stack, predict, tile=128, overlap=32, batch_size=3)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)
    # the blending does matter: without a margin the 3 x 3 filter's cut-off tile edges leak in
    rough = seg.predict_tiled(stack, predict, tile=128, overlap=32, margin=0)
    if predict is _mean3x3:
        assert np.abs(rough - whole).max() > 1e-3


def test_tiled_prediction_batches_and_small_images():
    calls = []

    def predict(batch):
        calls.append(batch.shape)
        return batch[..., :1]

    out = seg.predict_tiled(np.ones((70, 90), np.float32), predict, tile=256)
    assert out.shape == (70, 90, 1) and calls == [(1, 80, 96, 1)]  # one padded pass
    calls.clear()
    seg.predict_tiled(np.ones((600, 600, 1), np.float32), predict, tile=256, overlap=32, batch_size=4)
    assert sum(c[0] for c in calls) == 9 and all(c[0] <= 4 and c[1:3] == (256, 256) for c in calls)


def test_tiled_prediction_bad_input():
    with pytest.raises(DataError, match="predict returned shape") as error:
        seg.predict_tiled(np.ones((64, 64, 1)), lambda b: b[:, ::2, ::2], tile=32)
    with pytest.raises(DataError, match="too large") as error:
        seg.predict_tiled(np.ones((100, 100, 1)), _pointwise, tile=None, max_pixels=5000)
    assert "\n" not in str(error.value) and "tile" in str(error.value)
    assert seg.predict_tiled(np.ones((100, 100, 1)), _pointwise, tile=64, max_pixels=5000).shape == (100, 100, 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        seg.predict_tiled(np.ones((64, 64, 1)), _pointwise, tile=100)


# --- the classical baseline ---


def test_otsu_watershed_on_simulated_nuclei():
    preds, gts = [], []
    for seed in range(3):
        field = synthetic.nuclei_field(seed=seed)
        preds.append(seg.otsu_watershed(field.fluorescence))
        gts.append(field.labels)
    assert preds[0].dtype == np.int32
    assert metrics.match_dataset(preds, gts, thresholds=[0.5])["by_threshold"][0.5]["f1"] > 0.85  # 0.95
    assert seg.otsu_watershed(np.full((32, 32), 9, np.uint8)).max() == 0


def test_otsu_watershed_on_real_dsb_test_images(real_data):
    ids = datasets.dsb2018_split()["test"][:10]
    data = datasets.load_dsb2018(ids)
    preds = [seg.otsu_watershed(image) for image in data.images]
    f1 = metrics.match_dataset(preds, data.labels, thresholds=[0.5])["by_threshold"][0.5]["f1"]
    assert 0.6 < f1 < 0.95  # about 0.8 on the whole test split


# --- single-cell crops (report 004) ---


def _squares_image(sides, gap=4, value=1.0):
    """A row of bright squares of the given sides on black, labels 1..n in that order."""
    height = max(sides) + 2 * gap
    width = sum(sides) + gap * (len(sides) + 1)
    image, labels = np.zeros((height, width), np.float32), np.zeros((height, width), np.int32)
    x = gap
    for k, side in enumerate(sides, start=1):
        image[gap : gap + side, x : x + side] = value
        labels[gap : gap + side, x : x + side] = k
        x += side + gap
    return image, labels


def test_single_cell_crops_square_object_fills_the_crop():
    image, labels = _squares_image([10])
    out = seg.single_cell_crops(image, labels, size=96)
    assert out.crops.shape == (1, 96, 96, 3) and out.crops.dtype == np.float32
    np.testing.assert_allclose(out.crops, 1.0)
    np.testing.assert_array_equal(out.ids, [1])
    np.testing.assert_array_equal(out.areas, [100])
    np.testing.assert_array_equal(out.image_index, [0])
    assert len(out) == 1 and out.n_size_outliers == 0 and out.n_dark == 0


def test_single_cell_crops_pads_to_a_square_with_black_bars_and_masks_neighbours():
    image = np.zeros((30, 40), np.float32)
    labels = np.zeros((30, 40), np.int32)
    image[10:20, 5:25], labels[10:20, 5:25] = 1.0, 3  # 10 x 20 px object, id 3
    image[20:24, 5:25], labels[20:24, 5:25] = 0.5, 4  # a neighbour just below it
    out = seg.single_cell_crops(image, labels, size=20, outlier_fraction=0.0, margin=2)
    crop = out.crops[list(out.ids).index(3), ..., 0]
    # box rows 8..21 (14 px: 2 margin + 10 + 2 margin) x cols 3..26 (24 px): 5 black rows above, 5 below
    assert crop.shape == (20, 20)
    expected = np.zeros((24, 24), np.float32)
    expected[5 + 2 : 5 + 12, 2:22] = 1.0  # the neighbour's rows are masked out
    np.testing.assert_allclose(crop, cv2.resize(expected, (20, 20), interpolation=cv2.INTER_AREA), atol=1e-6)
    unmasked = seg.single_cell_crops(image, labels, size=24, outlier_fraction=0.0, margin=2, mask_outside=False)
    assert unmasked.crops[0, 5 + 12, 5, 0] == pytest.approx(0.5)  # the neighbour shows when not masked


def test_single_cell_crops_size_rule_drops_the_extremes():
    sides = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]  # 20 objects, growing
    image, labels = _squares_image(sides[::-1])  # ids 1..20 from largest to smallest
    out = seg.single_cell_crops(image, labels, size=8, outlier_fraction=0.2)  # floor(20 * 0.2 / 2) = 2 per side
    assert out.n_size_outliers == 4
    np.testing.assert_array_equal(out.ids, np.arange(3, 19))
    np.testing.assert_array_equal(out.areas, np.asarray(sides[::-1][2:18]) ** 2)
    assert len(seg.single_cell_crops(image, labels, size=8, outlier_fraction=0.05)) == 20  # floor(0.5) = 0


def test_single_cell_crops_black_pixel_rule():
    image, labels = _squares_image([10, 10, 10])
    image[labels == 2] = 0.0  # a "cell" on empty space
    image[4:14, 32:37] = 0.0  # the left half of cell 3 is black: 50 % is not more than 50 %
    out = seg.single_cell_crops(image, labels, size=16, outlier_fraction=0.0)
    np.testing.assert_array_equal(out.ids, [1, 3])
    assert out.n_dark == 1
    strict = seg.single_cell_crops(image, labels, size=16, outlier_fraction=0.0, max_black_fraction=0.4)
    np.testing.assert_array_equal(strict.ids, [1])


def test_crops_from_dataset_applies_the_size_rule_over_the_set():
    small, small_labels = _squares_image([4, 5, 6, 7, 8])
    large, large_labels = _squares_image([14, 15, 16, 17, 18])
    out = seg.crops_from_dataset([small, large], [small_labels, large_labels], size=12, outlier_fraction=0.4)
    # 10 objects, floor(10 * 0.4 / 2) = 2 per side: the two smallest of the first image, two largest of the second
    np.testing.assert_array_equal(out.image_index, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(out.ids, [3, 4, 5, 1, 2, 3])
    assert out.crops.shape == (6, 12, 12, 3) and out.n_size_outliers == 4
    assert out.crops.min() >= 0.0 and out.crops.max() <= 1.0


def test_single_cell_crops_on_simulated_nuclei_and_bad_input():
    field = synthetic.nuclei_field(shape=(128, 128), seed=3)
    out = seg.single_cell_crops(field.fluorescence, field.labels)
    n = int(field.labels.max())
    assert len(out) + out.n_size_outliers + out.n_dark == n and out.n_size_outliers == 2 * int(n * 0.05 / 2)
    assert out.crops.shape == (len(out), 96, 96, 3) and np.isfinite(out.crops).all()
    np.testing.assert_array_equal(out.crops[..., 0], out.crops[..., 2])
    empty = seg.single_cell_crops(field.fluorescence, np.zeros_like(field.labels))
    assert empty.crops.shape == (0, 96, 96, 3) and len(empty) == 0
    with pytest.raises(DataError, match="must match"):
        seg.single_cell_crops(field.fluorescence, field.labels[:10])
    with pytest.raises(DataError, match="one label image per image"):
        seg.crops_from_dataset([field.fluorescence], [])


# --- automatic labels, the label-image filter and counting (report 003) ---


def _discs_image(discs, shape=(128, 128), value=200, noise=4, seed=0):
    """uint8 fluorescence-like image of bright discs (centre, radius) on a dark noisy background, and labels."""
    rng = np.random.default_rng(seed)
    image = rng.normal(20, noise, shape)
    labels = np.zeros(shape, np.int32)
    for k, (centre, radius) in enumerate(discs, start=1):
        disc = _disc(shape, centre, radius)
        image[disc] = value + rng.normal(0, noise, int(disc.sum()))
        labels[disc] = k
    return np.clip(image, 0, 255).astype(np.uint8), labels


def test_equivalent_diameters_and_filter_by_diameter():
    labels = np.zeros((100, 100), np.int32)
    labels[_disc(labels.shape, (20, 20), 2)] = 1  # 13 px: diameter 4.07
    labels[_disc(labels.shape, (50, 50), 8)] = 5  # 197 px: 15.8
    labels[_disc(labels.shape, (75, 75), 20)] = 9  # 1257 px: 40.0
    diameters = seg.equivalent_diameters(labels)
    assert diameters[5] == pytest.approx(np.sqrt(4 * 197 / np.pi)) and 15 < diameters[5] < 17
    kept = seg.filter_by_diameter(labels, (5, 30))
    np.testing.assert_array_equal(np.unique(kept), [0, 1])
    np.testing.assert_array_equal(kept > 0, labels == 5)
    assert seg.filter_by_diameter(labels, (0, 100)).max() == 3


def test_automatic_labels_known_discs():
    image, labels = _discs_image([((30, 30), 3), ((30, 90), 8), ((85, 60), 20)])  # diameters about 6, 16, 40
    auto = seg.automatic_labels(image)
    assert auto.dtype == np.int32 and auto.max() == 2  # the 40 px nucleus is outside report 003's 5-30 px
    match = metrics.match_instances(auto, np.where(labels == 3, 0, labels))
    assert match["f1"] == 1.0 and match["mean_iou"] > 0.8
    wide = seg.automatic_labels(image, diameter_range=(5, 60))
    assert wide.max() == 3 and metrics.match_instances(wide, labels)["f1"] == 1.0
    # 16-bit input: stretched to 8 bits first, same objects
    auto16 = seg.automatic_labels(image.astype(np.uint16) * 3)
    assert metrics.match_instances(auto16, auto)["f1"] == 1.0
    assert seg.automatic_labels(np.full((64, 64), 7, np.uint8)).max() == 0


def test_automatic_labels_split_touching_nuclei():
    image, labels = _discs_image([((40, 40), 9), ((40, 57), 9)], shape=(96, 96))  # overlapping discs: a clump
    merged = seg.automatic_labels(image, split_touching=False, diameter_range=None)
    split = seg.automatic_labels(image, split_touching=True, diameter_range=None)
    assert merged.max() == 1 and split.max() == 2
    assert metrics.match_instances(split, labels)["f1"] == 1.0


def test_automatic_labels_on_simulated_fluorescence_agree_with_the_truth():
    field = synthetic.nuclei_field(shape=(256, 256), seed=4)
    auto = seg.automatic_labels(field.fluorescence)
    agreement = metrics.label_agreement([auto], [field.labels])
    assert agreement["pixel_dice"] > 0.8 and agreement["object_f1"] > 0.7  # radii 6-14 px: inside 5-30 px


def test_filter_label_images_drops_the_emptiest_quarter_and_overfull_images():
    shares = [0.10, 0.02, 0.30, 0.60, 0.05, 0.20, 0.01, 0.15]
    masks = []
    for share in shares:
        mask = np.zeros((10, 100), bool)
        mask.ravel()[: int(round(share * 1000))] = True
        masks.append(mask)
    keep = seg.filter_label_images(masks)
    # floor(8 * 0.25) = 2 lowest (0.01 and 0.02) and the image with more nucleus than background (0.60)
    np.testing.assert_array_equal(keep, [True, False, True, False, True, True, False, True])
    assert seg.filter_label_images(masks, drop_lowest=0.0, max_foreground=1.0).all()
    assert seg.filter_label_images([]).shape == (0,)


def test_automatic_label_set_replaces_the_labels_and_applies_the_filter():
    fields = [synthetic.nuclei_field(shape=(64, 64), n_nuclei=3 + i, seed=i) for i in range(8)]
    data = datasets.SegmentationSet(images=[f.fluorescence for f in fields], labels=[f.labels for f in fields],
                           ids=[f"im{i}" for i in range(8)], source="sim", groups=[str(i) for i in range(8)])
    auto = [np.where(f.labels > 0, 1, 0).astype(np.int32) for f in fields]
    auto[5] = np.zeros_like(auto[5])  # the stain missed everything here
    all_set = seg.automatic_label_set(data, auto)
    assert all_set.ids == data.ids and all(a is b for a, b in zip(all_set.labels, auto, strict=True))
    assert all_set.source == "sim, automatic labels" and data.labels[0] is fields[0].labels  # input unchanged
    kept = seg.automatic_label_set(data, auto, filtered=True)
    keep = seg.filter_label_images(auto)
    assert kept.ids == [i for i, k in zip(data.ids, keep, strict=True) if k] and "im5" not in kept.ids
    assert kept.groups == [g for g, k in zip(data.groups, keep, strict=True) if k]
    assert kept.source.endswith("filtered")
    with pytest.raises(ValueError, match="7 label images for 8 images"):
        seg.automatic_label_set(data, auto[:7])


def test_count_nuclei_three_ways():
    labels = np.zeros((80, 80), np.int32)
    labels[_disc(labels.shape, (20, 20), 6)] = 1
    labels[_disc(labels.shape, (20, 31), 6) & (labels == 0)] = 2  # touching nucleus 1: one component
    labels[_disc(labels.shape, (60, 60), 6)] = 3
    labels[70:72, 5:7] = 4  # a 4-px speck
    mask = labels > 0
    assert seg.count_nuclei(mask, "components") == 3.0  # the clump once, the speck once
    assert seg.count_nuclei(mask, "components", min_size=10) == 2.0
    assert seg.count_nuclei(mask, "watershed", min_size=10) == 3.0
    disc_area = float(_disc(labels.shape, (60, 60), 6).sum())
    by_area = seg.count_nuclei(mask, "area", typical_area=disc_area)
    assert by_area == pytest.approx(mask.sum() / disc_area) and 2.8 < by_area < 3.2
    assert seg.count_nuclei(mask, "area", min_size=10) == pytest.approx(mask.sum() / np.median([
        (labels == 3).sum(), ((labels == 1) | (labels == 2)).sum()]))  # own median component area
    assert seg.count_nuclei(np.zeros((5, 5), bool), "area") == 0.0
    assert seg.typical_nucleus_area([labels]) == pytest.approx(np.median(np.bincount(labels.ravel())[1:]))
    with pytest.raises(ValueError, match="unknown counting method"):
        seg.count_nuclei(mask, "guess")


# --- object scale ---


def _disks(radius: int, n: int = 3, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A dark image with ``n`` separate bright disks of ``radius`` px in a row, and their labels."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for k in range(n):
        cy, cx = size // 2, (k + 1) * size // (n + 1)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k + 1
    return np.where(labels > 0, 200, 10).astype(np.uint8), labels


def test_median_diameter_is_that_of_the_median_area():
    labels = np.zeros((40, 40), np.int32)
    labels[:10, :10], labels[20:30, :20], labels[:10, 20:40], labels[30:40, 20:40] = 1, 2, 3, 4  # 100, 3 x 200
    assert seg.median_diameter(labels) == pytest.approx(2 * np.sqrt(200 / np.pi))
    assert np.isnan(seg.median_diameter(np.zeros((5, 5), np.int32)))


def test_median_area_of_objects_skips_absent_ids_and_is_nan_without_objects():
    labels = np.zeros((40, 40), np.uint16)
    labels[:10, :10], labels[20:30, :20], labels[:10, 20:40], labels[30:40, 30:40] = 1, 2, 5, 7  # 100, 200, 200, 100
    assert seg.median_area(labels) == 150.0  # even count: the mean of the middle two; ids 3, 4 and 6 absent
    labels[30:40, 30:40] = 0
    assert seg.median_area(labels) == 200.0
    assert np.isnan(seg.median_area(np.zeros((5, 5), np.int32)))


def test_estimate_diameter_finds_the_disk_size():
    for radius in (5, 12):
        image, labels = _disks(radius)
        assert seg.estimate_diameter(image) == pytest.approx(2 * radius, rel=0.1)
        assert seg.median_diameter(labels) == pytest.approx(2 * radius, rel=0.05)
    assert np.isnan(seg.estimate_diameter(np.full((32, 32), 7, np.uint8)))


def test_scale_factor_brings_nuclei_to_the_target_within_limits():
    assert seg.scale_factor(8.0, 16.0) == 2.0
    assert seg.scale_factor(40.0, 16.0) == pytest.approx(0.4)
    assert seg.scale_factor(500.0, 16.0) == seg.SCALE_LIMITS[0]
    assert seg.scale_factor(1.0, 16.0) == seg.SCALE_LIMITS[1]
    assert seg.scale_factor(float("nan"), 16.0) == 1.0 and seg.scale_factor(20.0, None) == 1.0


def test_zoom_labels_and_images_and_back():
    labels = np.array([[1, 2], [3, 0]], np.uint16)
    big = seg.zoom(labels, 2.0, labels=True)
    np.testing.assert_array_equal(big, np.kron(labels, np.ones((2, 2), np.uint16)))
    assert big.dtype == np.uint16
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(seg.zoom(image, 0.5), [[2.5, 4.5], [10.5, 12.5]])  # means of 2 x 2 blocks
    assert seg.zoom(image, 1.0) is image
    assert seg.zoom(np.zeros((101, 33)), 0.3).shape == (30, 10)
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], size=(30, 40)).astype(np.float32)
    back = seg.resize_to(probs, (61, 83))
    assert back.shape == (61, 83, 3) and back.dtype == np.float32
    np.testing.assert_allclose(back.sum(axis=-1), 1.0, atol=1e-5)  # still probabilities
    with pytest.raises(ValueError):
        seg.zoom(image, 0.0)


def test_a_zoomed_disk_has_the_target_diameter():
    image, labels = _disks(20, n=2, size=200)
    factor = seg.scale_factor(seg.median_diameter(labels), 16.0)
    assert seg.median_diameter(seg.zoom(labels, factor, labels=True)) == pytest.approx(16.0, rel=0.05)
    assert seg.zoom(image, factor).shape == (80, 80)
