"""VGG16 transfer (report 004): weights resolution without internet, the head, the cut base, class imbalance,
the multi-label encoding and its scores, and the confusion-matrix distances behind the dendrogram."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from cellkit import classifiers, metrics, transfer, transforms
from cellkit.datasets import DataError, ImageSet
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


def test_vgg16_cut_recomposes_the_base():
    base = transfer.build_vgg16_base(32, None)
    lower, upper = transfer.split_vgg16(base)
    assert lower.output_shape == (None, 2, 2, 512) and upper.output_shape == (None, 1, 1, 512)
    assert [layer.name for layer in upper.layers[1:]] == ["block5_conv1", "block5_conv2", "block5_conv3",
                                                          "block5_pool"]
    x = classifiers.preprocess(np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), "caffe")
    np.testing.assert_allclose(np.asarray(upper(lower(x))), np.asarray(base(x)), rtol=1e-4, atol=1e-4)
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
