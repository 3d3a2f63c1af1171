"""Transfer (report 004): the unlabelled DSB source and SimCLR, moving an encoder, the linear probe, label
fractions, class imbalance, VGG16 and its weights without internet, the multi-label encoding and its scores, and
the confusion-matrix distances behind the dendrogram."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cellkit import classifiers, metrics, transfer, transforms
from cellkit.config import DEFAULT_SEED
from cellkit.datasets import DataError, ImageSet, SegmentationSet
from cellkit.datasets.labels import PBC_LABEL_SPACE, label_matrix, label_scores_from_classes, multilabel_targets

PBC = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


# --- multi-label encoding ------------------------------------------------------------------------------------


def test_pbc_label_space_known_rows():
    matrix = label_matrix(PBC, PBC_LABEL_SPACE)
    assert list(PBC_LABEL_SPACE) == ["granulocyte", "mononuclear", "myeloid", "immature", "nucleated"]
    rows = {name: matrix[i].astype(int).tolist() for i, name in enumerate(PBC)}
    assert rows["ig"] == [1, 0, 1, 1, 1]  # an immature granulocyte: granulocyte, myeloid, immature, nucleated
    assert rows["lymphocyte"] == [0, 1, 0, 0, 1]
    assert rows["platelet"] == [0, 0, 1, 0, 0]  # a fragment of a megakaryocyte: myeloid, no nucleus
    assert rows["erythroblast"] == [0, 0, 1, 1, 1]
    assert matrix.sum(axis=0).tolist() == [4, 2, 7, 2, 7]


def test_multilabel_targets_follow_the_class_rows():
    y = multilabel_targets(np.array([3, 4, 7, 3]), PBC, PBC_LABEL_SPACE)
    assert y.dtype == np.uint8 and y.shape == (4, 5)
    assert y.tolist() == [[1, 0, 1, 1, 1], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0], [1, 0, 1, 1, 1]]


def test_label_space_errors_are_one_line():
    with pytest.raises(DataError, match="not in the data: neutrofil"):
        label_matrix(PBC, {"granulocyte": ("neutrofil",)})
    with pytest.raises(DataError, match="every class"):
        label_matrix(["a", "b"], {"all": ("a", "b")})
    with pytest.raises(DataError, match="class indices"):
        multilabel_targets(np.array([8]), PBC, PBC_LABEL_SPACE)


def test_label_scores_from_class_probabilities_sum_member_classes():
    proba = np.array([[0.5, 0.0, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0]])
    scores = label_scores_from_classes(proba, PBC, PBC_LABEL_SPACE)
    np.testing.assert_allclose(scores, [[0.75, 0.25, 0.75, 0.25, 1.0]])


def test_multilabel_auc_known_answer():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 1]])
    s = np.array([[0.9, 0.2], [0.4, 0.3], [0.6, 0.8], [0.1, 0.1]])
    auc = metrics.multilabel_auc(y, s, ["a", "b"])
    # a: positives 0.9, 0.4 vs negatives 0.6, 0.1 -> 3 of 4 pairs ranked right; b: single negative 0.2 vs 0.3,
    # 0.8, 0.1 -> 2 of 3
    assert auc["per_label"] == pytest.approx({"a": 0.75, "b": 2 / 3})
    assert auc["macro"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert metrics.multilabel_auc(np.ones((3, 1)), np.ones((3, 1)), ["x"])["per_label"]["x"] is None


def test_label_weights_balance_each_label():
    y = np.array([[1, 1], [0, 1], [0, 1], [0, 1]])
    w = transfer.label_weights(y)
    # label 0: 1 positive of 4 -> 4/2 = 2.0, negatives 4/6; label 1: all positive -> no weighting
    np.testing.assert_allclose(w[:, 0], [2.0, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(w[:, 1], 1.0)
    np.testing.assert_allclose((w[:, 0] * y[:, 0]).sum(), (w[:, 0] * (1 - y[:, 0])).sum())


def test_confusion_distances_known_answer():
    matrix = [[8, 2, 0], [4, 6, 0], [0, 0, 10]]
    d = metrics.confusion_distances(matrix)
    # rates: a->b 0.2, b->a 0.4: d(a, b) = 1 - 0.3; c is never confused: distance 1
    np.testing.assert_allclose(d, [[0, 0.7, 1], [0.7, 0, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="square"):
        metrics.confusion_distances([[1, 2]])


# --- class imbalance --------------------------------------------------------------------------------------------


def _set(counts, size=8):
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.random.default_rng(0).integers(0, 255, (len(labels), size, size, 3), dtype=np.uint8)
    return ImageSet(images, labels, [f"c{i}" for i in range(len(counts))], files=[f"f{i}" for i in range(len(labels))])


def test_imbalanced_subset_follows_the_shares():
    data = _set([50, 50, 50])
    subset = transfer.imbalanced_subset(data, [4, 2, 1], largest=40)
    assert np.bincount(subset.labels).tolist() == [40, 20, 10]


def test_minority_copies_fill_up_to_the_largest_class_only():
    data = _set([12, 5, 3])
    copies, labels = transfer.minority_copies(data.images, data.labels, 3, np.random.default_rng(1))
    assert np.bincount(labels, minlength=3).tolist() == [0, 7, 9]
    assert copies.shape == (16, 8, 8, 3) and copies.dtype == np.uint8
    # every copy is one of the 8 symmetries of an image of its class
    for image, label in zip(copies, labels, strict=True):
        members = data.images[data.labels == label]
        views = [transforms.dihedral_view(members, k, flip) for k in range(4) for flip in (False, True)]
        assert any((v == image).all(axis=(1, 2, 3)).any() for v in views)
    none, _ = transfer.minority_copies(data.images[:5], np.zeros(5, int), 1, np.random.default_rng(1))
    assert len(none) == 0


# --- the network --------------------------------------------------------------------------------------------------


def test_transfer_head_is_the_reports():
    head = transfer.build_transfer_head((3, 3, 512), 8)
    dense = [row for row in classifiers.layer_table(head) if row["type"] == "Dense"]
    assert [(r["filters_or_units"], r["activation"]) for r in dense] == [(256, "relu"), (128, "relu"),
                                                                          (8, "softmax")]
    assert [type(layer).__name__ for layer in head.layers] == [
        "InputLayer", "GlobalAveragePooling2D", "Dense", "Dense", "Dropout", "Dense"]
    assert head.get_layer("head_dropout").rate == 0.5
    assert head.count_params() == (512 * 256 + 256) + (256 * 128 + 128) + (128 * 8 + 8)
    out = np.asarray(head(np.random.default_rng(0).normal(size=(4, 3, 3, 512)).astype("float32")))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    sigmoid = transfer.build_transfer_head((512,), 5, "sigmoid")
    assert sigmoid.output_shape == (None, 5) and sigmoid.layers[-1].get_config()["activation"] == "sigmoid"
    with pytest.raises(ValueError, match="softmax or sigmoid"):
        transfer.build_transfer_head((512,), 5, "relu")


def test_vgg16_needs_32_pixels():
    with pytest.raises(ValueError, match="at least 32x32"):
        transfer.build_vgg16_base(28)


def test_caffe_scaling_is_bgr_minus_imagenet_means():
    x = np.zeros((1, 1, 1, 3), np.uint8)
    x[..., 0] = 200  # red
    np.testing.assert_allclose(classifiers.preprocess(x, "caffe")[0, 0, 0], [-103.939, -116.779, 200 - 123.68],
                               rtol=1e-6)


# --- ImageNet weights without internet ------------------------------------------------------------------------------


@pytest.fixture
def weights_file(tmp_path):
    """A notop VGG16 weights file in the layout Keras publishes (legacy HDF5), of a random base."""
    from keras.src.legacy.saving import legacy_h5_format

    base = transfer.build_vgg16_base(32, None)
    path = tmp_path / transfer.VGG16_NOTOP_FILE
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, base)
    return path, base


def test_weights_from_keras_cache_are_used(weights_file, tmp_path, monkeypatch):
    path, source = weights_file
    monkeypatch.delenv(transfer.VGG16_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    path.rename(tmp_path / "models" / transfer.VGG16_NOTOP_FILE)
    found, record = transfer.vgg16_weights("imagenet")
    assert found == tmp_path / "models" / transfer.VGG16_NOTOP_FILE
    assert record["weights"] == "imagenet" and record["official"] is False  # random weights: not Keras' md5
    base = transfer.build_vgg16_base(64, "imagenet")  # another input size: convolution weights do not depend on it
    for mine, theirs in zip(base.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_weights_from_a_path_or_the_environment(weights_file, monkeypatch):
    path, source = weights_file
    base = transfer.build_vgg16_base(32, path)
    np.testing.assert_array_equal(base.get_weights()[0], source.get_weights()[0])
    monkeypatch.setenv(transfer.VGG16_WEIGHTS_ENV, str(path))
    assert transfer.find_imagenet_weights() == path
    assert transfer.vgg16_weights("imagenet")[1]["md5"] == transfer.md5sum(path)


def test_missing_weights_are_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(transfer.VGG16_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert transfer.find_imagenet_weights() is None
    with pytest.raises(DataError, match=transfer.VGG16_NOTOP_MD5) as error:
        transfer.vgg16_weights("imagenet")
    assert "\n" not in str(error.value) and transfer.VGG16_NOTOP_FILE in str(error.value)
    with pytest.raises(DataError, match="no such file"):
        transfer.build_vgg16_base(32, tmp_path / "missing.h5")
    monkeypatch.setenv(transfer.VGG16_WEIGHTS_ENV, str(tmp_path / "gone.h5"))
    with pytest.raises(DataError, match="CELLKIT_VGG16_WEIGHTS"):
        transfer.vgg16_weights("imagenet")
    assert transfer.vgg16_weights(None)[1]["weights"] == "none"


def test_wrong_weights_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "other.h5"
    with h5py.File(bad, "w") as handle:
        handle.create_dataset("x", data=np.zeros(3))
    with pytest.raises(DataError, match="not VGG16"):
        transfer.build_vgg16_base(32, bad)


def test_vgg16_features_read_the_weights_file(weights_file):
    path, source = weights_file
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    features = transfer.vgg16_features(images, path)
    expected = np.asarray(source(classifiers.preprocess(images, "caffe"))).mean(axis=(1, 2))
    assert features.shape == (3, 512)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


# --- the source: DSB nucleus crops and SimCLR -------------------------------------------------------------------


def test_nucleus_crops_are_unlabelled_uint8_images_named_by_object():
    image = np.zeros((40, 40), np.uint8)
    labels = np.zeros((40, 40), np.uint16)
    for k, (y, x) in enumerate([(4, 4), (4, 24), (24, 4), (24, 24)], start=1):
        labels[y : y + 10, x : x + 10] = k
        image[y : y + 10, x : x + 10] = 50 * k
    dsb = SegmentationSet([image, image], [labels, labels], ["a", "b"], source="dsb2018")
    crops = transfer.nucleus_crops(dsb, 16, margin=2)
    assert crops.images.shape == (8, 16, 16, 3) and crops.images.dtype == np.uint8
    assert crops.class_names == ["nucleus"] and set(crops.labels.tolist()) == {0}
    assert crops.files[:4] == ["a#1", "a#2", "a#3", "a#4"] and crops.files[4] == "b#1"
    assert (crops.images[..., 0] == crops.images[..., 2]).all()  # grey copied to 3 channels
    assert len(transfer.nucleus_crops(dsb, 16, max_crops=3).images) == 3
    empty = SegmentationSet([image], [np.zeros_like(labels)], ["c"])
    with pytest.raises(DataError, match="no nucleus crops"):
        transfer.nucleus_crops(empty, 16)


def test_contrastive_view_without_crop_or_colour_is_an_inverted_symmetry():
    images = np.random.default_rng(0).integers(0, 255, (5, 12, 12, 3), dtype=np.uint8)
    views = transfer.contrastive_views(images, np.random.default_rng(1), min_side=1.0, invert=1.0, gain=(1, 1),
                                       offset=0.0)
    for image, view in zip(images, views, strict=True):
        symmetries = [transforms.dihedral_view(255 - image[None], k, flip)[0] for k in range(4) for flip in (0, 1)]
        assert any((view == s).all() for s in symmetries)
    coloured = transfer.contrastive_views(images, np.random.default_rng(1))
    assert coloured.shape == images.shape and coloured.dtype == np.uint8
    np.testing.assert_array_equal(coloured, transfer.contrastive_views(images, np.random.default_rng(1)))


def _nt_xent_reference(z1, z2, t):
    z = np.concatenate([z1, z2]).astype(float)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        logits = np.array([z[i] @ z[j] / t for j in others])
        losses.append(-(z[i] @ z[partner] / t) + np.log(np.exp(logits).sum()))
    return float(np.mean(losses))


def test_nt_xent_matches_its_definition():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    assert float(transfer.nt_xent(z1, z2, 0.5)) == pytest.approx(_nt_xent_reference(z1, z2, 0.5), rel=1e-4)
    # two orthogonal pairs, each view equal to its partner: the loss is the smallest it can be at this temperature
    z = np.eye(2) * 3
    assert float(transfer.nt_xent(z, z, 0.1)) == pytest.approx(_nt_xent_reference(z, z, 0.1), abs=1e-6)
    assert float(transfer.nt_xent(z, z, 0.1)) < 1e-3


def test_pretraining_changes_the_encoder_and_moves_into_a_classifier():
    images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    pretrained = transfer.pretrain_contrastive(images, widths=(4, 8, 8), epochs=3, batch_size=4, max_seconds=0,
                                               progress="none")
    assert len(pretrained.losses) == 1 and np.isfinite(pretrained.losses[0])  # the budget stops after one epoch
    assert pretrained.to_dict()["n_images"] == 8
    fresh = classifiers.build_cellnet((16, 16, 3), 2, (4, 8, 8))
    keras = transfer.keras
    keras.utils.set_random_seed(DEFAULT_SEED)
    same_start = classifiers.build_cellnet((16, 16, 3), 2, (4, 8, 8))
    assert not np.allclose(pretrained.model.get_layer("conv1_1").get_weights()[0],
                           same_start.get_layer("conv1_1").get_weights()[0])
    target = classifiers.build_cellnet((16, 16, 3), 5, (4, 8, 8))
    output_before = target.get_layer("output").get_weights()[0].copy()
    transfer.with_encoder_weights(target, pretrained.model)
    for name in ("conv1_1", "bn2_2", "conv3_2"):
        for mine, theirs in zip(target.get_layer(name).get_weights(), pretrained.model.get_layer(name).get_weights(),
                                strict=True):
            np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(target.get_layer("output").get_weights()[0], output_before)
    features = transfer.embed(target, images)
    assert features.shape == (8, 8)
    np.testing.assert_allclose(features, transfer.embed(pretrained.model, images), rtol=1e-5, atol=1e-6)
    assert fresh.count_params() == same_start.count_params()


def test_linear_probe_chooses_c_on_validation():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    x = rng.normal(size=(60, 3)) + 4 * np.eye(3)[y]
    probe = transfer.linear_probe(x, y, x[::2], y[::2], cs=(0.1, 1.0))
    assert probe.val_accuracy == {0.1: 1.0, 1.0: 1.0} and probe.c == 0.1  # a tie goes to the stronger penalty
    assert probe.predict_proba(x).shape == (60, 3)


def test_cnn_run_from_source_weights_with_a_remedy():
    data = _set([6, 3], size=16)
    source = classifiers.build_cellnet((16, 16, 3), 2, (4, 8, 8))
    run = transfer.cnn_run(data, data, data, epochs=1, widths=(4, 8, 8), source=source, variant="augment")
    assert run.test_proba.shape == (9, 2) and run.fits["train"].epochs_run == 1
    assert run.summary()["test_accuracy"] == run.test_report["accuracy"]
    with pytest.raises(ValueError, match="unknown imbalance variant"):
        transfer.cnn_run(data, data, data, variant="oversample")


# --- label fractions -----------------------------------------------------------------------------------------------


def test_label_fractions_are_stratified_and_nested():
    labels = np.repeat([0, 1, 2], [40, 20, 3])
    tenth, half = transfer.label_fraction(labels, 0.1, 3), transfer.label_fraction(labels, 0.5, 3)
    assert np.bincount(labels[tenth], minlength=3).tolist() == [4, 2, 1]
    assert np.bincount(labels[half], minlength=3).tolist() == [20, 10, 2]
    assert set(tenth) <= set(half)
    assert len(transfer.label_fraction(labels, 1.0, 3)) == len(labels)
    with pytest.raises(ValueError, match="fraction"):
        transfer.label_fraction(labels, 0.0, 3)
    assert [transfer.epochs_for_fraction(20, f) for f in (1.0, 0.25, 0.1)] == [20, 40, 64]


def test_imbalanced_indices_follow_the_shares():
    labels = np.repeat([0, 1, 2], 30)
    index = transfer.imbalanced_indices(labels, [1, 2, 4], 20)
    assert np.bincount(labels[index]).tolist() == [5, 10, 20] and (np.diff(index) > 0).all()
    with pytest.raises(ValueError, match="positive share"):
        transfer.imbalanced_indices(labels, [1, 0, 4], 20)


# --- repeated seeds ---------------------------------------------------------------------------------------------


def test_class_score_matches_the_classification_report():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 3, 50)  # class 3 never predicted
    report = metrics.classification_report(y_true, y_pred, ["a", "b", "c", "d", "e"])  # "e" in neither: not counted
    assert transfer.class_score(y_true, y_pred, 5, "macro_f1") == pytest.approx(report["macro_f1"])
    assert transfer.class_score(y_true, y_pred, 5) == pytest.approx(report["accuracy"])
    with pytest.raises(ValueError, match="accuracy or macro_f1"):
        transfer.class_score(y_true, y_pred, 5, "auc")


def test_seed_interval_averages_the_seeds_and_resamples_images():
    y = np.repeat([0, 1], 10)
    right, half = y.copy(), np.where(np.arange(20) % 2 == 0, y, 1 - y)  # seed 1 all right, seed 2 half right
    interval = transfer.seed_interval(y, [right, half], 2, n_resamples=200)
    assert interval.estimate == pytest.approx(0.75) and interval.n_units == 20
    assert interval.low < 0.75 < interval.high
    one = transfer.seed_interval(y, [right, right], 2, "macro_f1", n_resamples=50)
    assert (one.estimate, one.low, one.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="one \\(n,\\) array"):
        transfer.seed_interval(y, [np.zeros((20, 2), int)], 2)


def test_seed_difference_is_paired_over_images():
    y = np.repeat([0, 1, 2], 10)
    a = [y.copy(), y.copy()]
    b = [np.where(np.arange(30) < 6, (y + 1) % 3, y), y.copy()]  # seed 1 of b misses the first 6 images
    gain = transfer.seed_difference(y, a, b, 3, n_resamples=500)
    assert gain.estimate == pytest.approx(0.1)  # accuracy (1 + 1) / 2 - (0.8 + 1) / 2
    assert gain.low >= 0 and gain.high > 0.1
    same = transfer.seed_difference(y, a, a, 3, "macro_f1", n_resamples=50)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)


def test_seed_runs_pair_each_seed_on_one_label_subset():
    data = _set([8, 8], size=16)
    source = classifiers.build_cellnet((16, 16, 3), 2, (4, 8, 8))
    runs = transfer.seed_runs(data, data, data, seeds=[1, 2], epochs=1, widths=(4, 8, 8), source=source,
                              fraction=0.5)
    assert set(runs) == {transfer.FINE_TUNED, transfer.SCRATCH} and all(len(r) == 2 for r in runs.values())
    assert [r.name for r in runs[transfer.SCRATCH]] == ["cellnet from scratch 0.5 seed 1",
                                                        "cellnet from scratch 0.5 seed 2"]
    assert runs[transfer.FINE_TUNED][0].fits["train"].epochs_run == transfer.epochs_for_fraction(1, 0.5) == 2
    assert runs[transfer.FINE_TUNED][0].test_proba.shape == (16, 2)
    assert runs[transfer.FINE_TUNED][0].cpu_seconds > 0


# --- the imagenet_weights setting of notebook 06 ------------------------------------------------------------------


def test_imagenet_setting_auto_uses_a_file_on_disk_and_says_when_there_is_none(weights_file, tmp_path, monkeypatch):
    path, source = weights_file
    monkeypatch.delenv(transfer.VGG16_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    missing = transfer.imagenet_choice("auto")
    assert missing["weights"] == "none" and transfer.VGG16_NOTOP_FILE in missing["reason"]
    assert transfer.imagenet_choice(None)["weights"] == "none"
    (tmp_path / "keras" / "models").mkdir(parents=True)
    cached = tmp_path / "keras" / "models" / transfer.VGG16_NOTOP_FILE
    cached.write_bytes(path.read_bytes())
    found = transfer.imagenet_choice("auto")
    assert found["weights"] == "imagenet" and found["file"] == str(cached) and found["md5"] == transfer.md5sum(path)
    given = transfer.imagenet_choice(str(path))
    assert given["weights"] == "file" and given["official"] is False  # random weights: not Keras' md5
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    expected = np.asarray(source(classifiers.preprocess(images, "caffe"))).mean(axis=(1, 2))
    np.testing.assert_allclose(transfer.vgg16_features(images, given["file"]), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match="no such file"):
        transfer.imagenet_choice(str(tmp_path / "gone.h5"))
