"""Tests of cellkit.synthetic: reproducible simulated images whose ground truth is exact."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellkit import synthetic
from cellkit.datasets.containers import ImageSet, SegmentationSet

SHAPE = (128, 160)  # not square, so that swapped axes would show


def adjacent_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (smaller id, larger id) of different nuclei that touch 4-adjacently."""
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        touch = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch].tolist(), b[touch].tolist(), strict=True)}
    return pairs


@pytest.fixture(scope="module")
def field() -> synthetic.SyntheticField:
    return synthetic.nuclei_field(seed=3)


# --- nuclei_field ---------------------------------------------------------------------------------


def test_field_shapes_and_dtypes():
    f = synthetic.nuclei_field(shape=SHAPE, n_nuclei=10, seed=1)
    assert f.fluorescence.shape == f.phase.shape == f.labels.shape == SHAPE
    assert f.fluorescence.dtype == f.phase.dtype == np.uint8
    assert f.labels.dtype == np.uint16
    assert f.centres.shape == f.semi_axes.shape == (f.n_nuclei, 2)
    assert f.angles.shape == (f.n_nuclei,)


def test_same_seed_same_arrays_other_seed_differs():
    a, b, c = (synthetic.nuclei_field(shape=SHAPE, n_nuclei=10, seed=s) for s in (5, 5, 6))
    for name in ("fluorescence", "phase", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert not np.array_equal(getattr(a, name), getattr(c, name))


@pytest.mark.parametrize("seed", range(5))
def test_labels_consecutive_with_requested_count(seed):
    f = synthetic.nuclei_field(seed=seed)
    ids = np.unique(f.labels)
    np.testing.assert_array_equal(ids, np.arange(0, 26))
    assert f.n_nuclei == 25


def test_crowded_field_never_exceeds_request():
    f = synthetic.nuclei_field(shape=(64, 64), n_nuclei=60, seed=0)
    np.testing.assert_array_equal(np.unique(f.labels), np.arange(0, f.n_nuclei + 1))
    assert 0 < f.n_nuclei <= 60


def test_every_label_is_one_connected_component(field):
    for i, box in enumerate(ndimage.find_objects(field.labels), start=1):
        assert ndimage.label(field.labels[box] == i)[1] == 1, f"label {i} is in pieces"


def test_centres_lie_in_their_own_label(field):
    rows, cols = np.rint(field.centres).astype(int).T
    np.testing.assert_array_equal(field.labels[rows, cols], np.arange(1, field.n_nuclei + 1))


def test_touching_pairs_share_a_boundary(field):
    pairs = adjacent_pairs(field.labels)
    assert pairs, "touching_fraction > 0 but no two nuclei touch"
    assert pairs == {tuple(sorted(p)) for p in field.touching}


def test_no_touching_when_fraction_is_zero():
    for seed in range(3):
        f = synthetic.nuclei_field(seed=seed, touching_fraction=0.0)
        assert adjacent_pairs(f.labels) == set()
        assert f.touching == []


def test_nuclei_brighter_than_background_in_fluorescence(field):
    inside = field.labels > 0
    assert field.fluorescence[inside].mean() > field.fluorescence[~inside].mean() + 50


def test_phase_halo_brighter_than_interior(field):
    cells = field.labels > 0
    interior = ndimage.binary_erosion(cells, iterations=3)
    halo = ndimage.binary_dilation(cells, iterations=2) & ~cells
    phase = field.phase.astype(float)
    assert phase[halo].mean() > phase[interior].mean() + 10
    # Weaker contrast than fluorescence: the background stays mid-grey.
    assert 80 < np.median(phase[~cells]) < 180


def background_noise(f: synthetic.SyntheticField) -> float:
    """Variance of neighbour differences far from nuclei, where the light is flat at the pixel scale."""
    far = ~ndimage.binary_dilation(f.labels > 0, iterations=10)
    both = far[:, :-1] & far[:, 1:]
    diffs = np.diff(f.fluorescence.astype(float), axis=1)[both]
    return float(diffs.var())


def test_poisson_noise_present_and_shrinks_with_more_photons():
    noisy = synthetic.nuclei_field(seed=2, photons=300.0)
    clean = synthetic.nuclei_field(seed=2, photons=1e8)
    assert background_noise(noisy) > 1.0
    assert background_noise(clean) < 0.5 * background_noise(noisy)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="too small"):
        synthetic.nuclei_field(shape=(20, 20))
    with pytest.raises(ValueError, match="touching_fraction"):
        synthetic.nuclei_field(touching_fraction=1.5)


# --- datasets of fields ---------------------------------------------------------------------------


def test_nuclei_dataset_is_a_segmentation_set():
    ds = synthetic.nuclei_dataset(n_images=4, shape=SHAPE, seed=0, n_nuclei=10)
    assert isinstance(ds, SegmentationSet)
    assert ds.ids == ["synthetic_000", "synthetic_001", "synthetic_002", "synthetic_003"]
    assert ds.source == "synthetic" and ds.is_synthetic
    assert ds.groups == ["128x160"] * 4
    counts = [int(lab.max()) for lab in ds.labels]
    assert all(5 <= c <= 15 for c in counts) and len(set(counts)) > 1, counts
    for image, lab in zip(ds.images, ds.labels, strict=True):
        assert image.dtype == np.uint8 and lab.dtype == np.uint16 and image.shape == SHAPE


def test_nuclei_dataset_deterministic():
    a = synthetic.nuclei_dataset(n_images=2, shape=SHAPE, seed=4, n_nuclei=8)
    b = synthetic.nuclei_dataset(n_images=2, shape=SHAPE, seed=4, n_nuclei=8)
    c = synthetic.nuclei_dataset(n_images=2, shape=SHAPE, seed=5, n_nuclei=8)
    for x, y, z in zip(a.images, b.images, c.images, strict=True):
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)


def test_paired_dataset_shares_labels_and_ids():
    fluo, phase = synthetic.paired_dataset(n_images=3, shape=SHAPE, seed=0, n_nuclei=8)
    alone = synthetic.nuclei_dataset(n_images=3, shape=SHAPE, seed=0, n_nuclei=8)
    assert fluo.ids == phase.ids == alone.ids
    for f, p, a, lf, lp in zip(fluo.images, phase.images, alone.images, fluo.labels, phase.labels, strict=True):
        np.testing.assert_array_equal(lf, lp)
        np.testing.assert_array_equal(f, a)
        assert not np.array_equal(f, p)


# --- blood-cell crops -----------------------------------------------------------------------------


def test_blood_crops_shapes_classes_and_files():
    crops = synthetic.blood_cell_crops(n_per_class=5, size=28, seed=0)
    assert isinstance(crops, ImageSet)
    assert crops.images.shape == (40, 28, 28, 3) and crops.images.dtype == np.uint8
    assert crops.class_names == [
        "basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet",
    ]  # fmt: skip
    assert set(crops.class_counts().values()) == {5}
    assert crops.files[0] == "synthetic_basophil_000.png"
    assert crops.files[-1] == "synthetic_platelet_004.png"
    assert crops.source == "synthetic"


def test_blood_crops_deterministic_and_other_sizes():
    a = synthetic.blood_cell_crops(n_per_class=3, seed=7)
    b = synthetic.blood_cell_crops(n_per_class=3, seed=7)
    c = synthetic.blood_cell_crops(n_per_class=3, seed=8)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert synthetic.blood_cell_crops(n_per_class=1, size=64).images.shape == (8, 64, 64, 3)


def simple_features(images: np.ndarray) -> np.ndarray:
    """Per image: mean and spread of each colour, centre mean colour, darkest value, dark fraction."""
    x = images.astype(float) / 255.0
    grey = x.mean(axis=-1)
    h, w = grey.shape[1:]
    centre = x[:, h // 3 : 2 * h // 3, w // 3 : 2 * w // 3]
    return np.column_stack(
        [x.mean(axis=(1, 2)), x.std(axis=(1, 2)), centre.mean(axis=(1, 2)),
         grey.min(axis=(1, 2)), (grey < 0.45).mean(axis=(1, 2))]
    )  # fmt: skip


def test_blood_classes_learnable_from_simple_features():
    train = synthetic.blood_cell_crops(n_per_class=20, seed=0)
    test = synthetic.blood_cell_crops(n_per_class=20, seed=1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(simple_features(train.images), train.labels)
    accuracy = (model.predict(simple_features(test.images)) == test.labels).mean()
    assert accuracy > 0.5  # chance is 0.125


def test_blood_classes_not_separable_by_mean_colour_alone():
    train = synthetic.blood_cell_crops(n_per_class=20, seed=0)
    test = synthetic.blood_cell_crops(n_per_class=20, seed=1)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(train.images.mean(axis=(1, 2)), train.labels)
    assert (model.predict(test.images.mean(axis=(1, 2))) == test.labels).mean() < 0.9
