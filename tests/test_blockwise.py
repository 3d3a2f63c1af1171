"""Large images block by block (cellkit.blockwise): stitched labels equal the whole image's, ids are unique across
blocks, a nucleus cut by block borders is one label, and the halo covers the U-Net's receptive field.

Stitching is checked exactly with a classical segmenter (threshold + distance-transform watershed: local, so the
whole image's labels are the reference to the pixel), and end to end with a tiny U-Net trained for a few steps on
simulated nuclei, against the same network on the whole image.
"""

from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
import zarr

from cellkit import blockwise, formats, metrics, segmentation, synthetic

THRESHOLD = 60  # the simulated nuclei's grey level cut (uint8 image, background about 20)


def classical(block: np.ndarray) -> np.ndarray:
    """A local segmenter: a fixed threshold, then a distance-transform watershed splits touching nuclei."""
    return segmentation.watershed_split(np.asarray(block) > THRESHOLD)


def blockwise_labels(image: np.ndarray, block: int, halo: int, segmenter=classical) -> tuple[np.ndarray, dict]:
    target = zarr.create_array(store=zarr.storage.MemoryStore(), shape=image.shape[:2], chunks=(block, block),
                               dtype="uint32")
    summary = blockwise.segment_to_zarr(image, segmenter, target, block, halo)
    return target[:], summary


def one_to_one(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images are the same partition up to renumbering."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(set(pairs[0])) == len(set(pairs[1])) == pairs.shape[1]


@pytest.fixture(scope="module")
def field():
    return synthetic.nuclei_field(shape=(520, 700), n_nuclei=260, seed=1)


@pytest.fixture(scope="module")
def classical_run(field):
    whole = classical(field.fluorescence)
    stitched, summary = blockwise_labels(field.fluorescence, 160, 56)
    return whole, stitched, summary


def test_stitched_labels_are_the_whole_image_labels(classical_run):
    whole, stitched, summary = classical_run
    assert summary["blocks"] == 15 and whole.max() > 150  # 3 x 5 blocks
    assert one_to_one(whole, stitched)
    assert metrics.match_instances(stitched, whole)["f1"] == 1.0
    assert summary["n_nuclei"] == whole.max()
    assert summary["mean_area_px"] == pytest.approx(np.bincount(whole.ravel())[1:].mean(), abs=0.05)


def test_label_ids_are_unique_across_blocks_and_consecutive(classical_run):
    _, stitched, _ = classical_run
    ids = np.unique(stitched)
    assert np.array_equal(ids, np.arange(ids.size))  # 0, 1..N: no gaps, no id from one block's numbering left
    faces_y, faces_x = np.cumsum(blockwise.block_chunks(520, 160, 56))[:-1], np.cumsum(blockwise.block_chunks(
        700, 160, 56))[:-1]
    crossing = set()
    for y in faces_y:
        same = (stitched[y - 1] == stitched[y]) & (stitched[y] > 0)
        crossing |= set(stitched[y][same].tolist())
    for x in faces_x:
        same = (stitched[:, x - 1] == stitched[:, x]) & (stitched[:, x] > 0)
        crossing |= set(stitched[:, x][same].tolist())
    assert len(crossing) >= 10  # the stitching had work to do
    from scipy import ndimage as ndi

    objects = ndi.find_objects(stitched)
    for label in crossing:  # each id is one connected object, not two nuclei of two blocks sharing a number
        box = objects[label - 1]
        _, n = ndi.label(stitched[box] == label)
        assert n == 1


def test_a_nucleus_across_block_borders_is_one_label():
    image = np.full((400, 400), 20, np.uint8)
    yy, xx = np.mgrid[:400, :400]

    def disk(cy, cx, r):
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 200

    disk(200, 90, 18)   # across the horizontal border at y = 200
    disk(200, 200, 18)  # on the corner of four blocks
    disk(90, 200 - 15, 16)  # two touching nuclei, their contact line on the vertical border at x = 200
    disk(90, 200 + 15, 16)
    whole = classical(image)
    stitched, summary = blockwise_labels(image, 200, 48)
    assert summary["blocks"] == 4 and whole.max() == 4
    assert len(np.unique(stitched[yy_disk(200, 90, 18)])) == 1
    assert len(np.unique(stitched[yy_disk(200, 200, 18)])) == 1
    assert stitched[90, 180] != stitched[90, 220] and stitched[90, 180] > 0 and stitched[90, 220] > 0
    assert one_to_one(whole, stitched) and stitched.max() == 4


def test_an_image_without_nuclei_gives_empty_labels():
    stitched, summary = blockwise_labels(np.full((300, 300), 20, np.uint8), 100, 32)
    assert summary["blocks"] == 9 and summary["n_nuclei"] == 0 and summary["mean_area_px"] == 0.0
    assert not stitched.any()


def yy_disk(cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:400, :400]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= (r - 2) ** 2


def test_block_sizes_and_the_default_halo():
    from cellkit import unet

    assert blockwise.block_chunks(1000, 256, 64) == (256, 256, 256, 232)
    assert blockwise.block_chunks(1000, 300, 128) == (300, 300, 400)  # a 100 px remainder is narrower than the halo
    assert blockwise.receptive_radius(4) == 107
    assert blockwise.default_halo(unet.UNetConfig()) == 192  # 107 + 3 x 24 px, up to a multiple of 16
    assert blockwise.default_halo(unet.UNetConfig(nucleus_diameter=None)) == 208  # 107 + 96
    assert blockwise.aligned_factor(1.3041) == 17 / 13 and blockwise.alignment(17 / 13) == 16 * 13
    assert blockwise.alignment(1.0) == 16 and blockwise.alignment(0.875) == 128 and blockwise.alignment(1.3125) == 256
    assert blockwise.aligned_factor(0.15) == 2 / 13  # the nearest fraction of denominator <= 16


def test_the_receptive_radius_is_what_a_unet_sees():
    from cellkit import unet

    model = unet.build_unet(input_channels=1, n_classes=1, base_filters=4, depth=2, dropout=0.0, batch_norm=False)
    rng = np.random.default_rng(0)
    image = rng.random((1, 128, 128, 1), dtype=np.float32)
    changed = image.copy()
    changed[0, 64, 64, 0] += 10.0
    diff = np.abs(np.asarray(model(changed)) - np.asarray(model(image)))[0, ..., 0]
    ys, xs = np.nonzero(diff > 0)
    reach = int(max(np.abs(ys - 64).max(), np.abs(xs - 64).max()))
    radius = blockwise.receptive_radius(2)
    assert radius == 23
    assert radius - 3 <= reach <= radius  # never beyond it: a halo of the radius is enough


@pytest.fixture(scope="module")
def tiny_unet():
    """A 4-filter U-Net trained for 4 steps on simulated nuclei: far from a good segmenter (its labels are mostly
    fragments), but a real network whose every label the block-wise path must reproduce."""
    from cellkit import unet

    train = synthetic.nuclei_dataset(n_images=4, seed=10)
    config = unet.UNetConfig(base_filters=4, crop=64, batch_size=4, epochs=1, steps_per_epoch=4, learning_rate=1e-2,
                             val_crops=2, val_crop_size=64, nucleus_diameter=16.0, schedule="constant")
    model, _ = unet.fit_unet(train, train, config, seed=0, progress="none")
    return unet.TrainedUNet(model, config, eager=True)


def test_unet_blockwise_labels_match_the_whole_image(tiny_unet, field, tmp_path):
    plan = blockwise.plan_blocks(tiny_unet, field.fluorescence, block=128)
    q = Fraction(plan.factor).limit_denominator(16).denominator
    image = field.fluorescence[: 512 // q * q, : 640 // q * q]  # sides the zoom p / q takes to whole pixels
    low, high = blockwise.normalisation(image, plan.factor, tiny_unet.config.normalise)  # of this crop, as whole
    plan = replace(plan, low=low, high=high)
    whole = tiny_unet.instances(tiny_unet.probabilities(image, tile=None, scale=plan.factor))
    summary = blockwise.segment_blockwise(tiny_unet, image, tmp_path / "labels.ome.zarr", "ome-zarr", (0.5, 0.5),
                                          tile=None, plan=plan)
    stitched, pixel_size = formats.read_labels_file(tmp_path / "labels.ome.zarr")
    assert summary["blocks"] >= 4 and summary["factor"] == plan.factor
    assert whole.max() >= 20, "the tiny U-Net should find nuclei for this comparison to mean something"
    assert metrics.match_instances(stitched, whole, thresh=0.5)["f1"] >= 0.99
    assert summary["n_nuclei"] == len(np.unique(stitched)) - 1 and pixel_size == (0.5, 0.5)
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
