"""cellkit.clustering on blobs and rings whose clusters are known, and on hand-made nuclei."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_blobs, make_circles

from cellkit import clustering, datasets, segmentation, synthetic
from cellkit.datasets import DataError


@pytest.fixture(scope="module")
def blobs():
    """Four well-separated Gaussian blobs in 10 dimensions, 60 points each."""
    X, y = make_blobs(n_samples=240, centers=4, n_features=10, cluster_std=1.0, center_box=(-20, 20), random_state=3)
    return X, y


def test_clustering_imports_no_keras():
    code = "import sys, cellkit.clustering; print(any(m in sys.modules for m in ('keras', 'tensorflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("method", clustering.METHODS)
def test_every_method_recovers_separated_blobs(blobs, method):
    X, y = blobs
    labels = clustering.cluster(X, method, k=4, seed=0)
    assert labels.shape == (240,) and set(np.unique(labels)) == {0, 1, 2, 3}
    assert clustering.agreement(y, labels) == {"ari": pytest.approx(1.0), "nmi": pytest.approx(1.0)}


def test_cluster_rejects_bad_k_and_method(blobs):
    X, _ = blobs
    with pytest.raises(DataError, match="k must be"):
        clustering.cluster(X, "kmeans++", k=1)
    with pytest.raises(DataError, match="unknown clustering method"):
        clustering.cluster(X, "dbscan", k=4)


def test_agreement_known_values():
    assert clustering.agreement([0, 0, 1, 1], [1, 1, 0, 0]) == {"ari": 1.0, "nmi": 1.0}  # names do not matter
    independent = clustering.agreement([0, 0, 1, 1], [0, 1, 0, 1])
    assert independent["nmi"] == pytest.approx(0.0, abs=1e-12)
    assert independent["ari"] == pytest.approx(-0.5)  # worse than chance: every pair split the other way


def test_k_curves_elbow_and_silhouette_point_at_the_true_k(blobs):
    X, _ = blobs
    curves = clustering.k_curves(X, range(2, 8), seed=0)
    assert list(curves.index) == [2, 3, 4, 5, 6, 7]
    assert curves["wcss"].is_monotonic_decreasing
    assert clustering.choose_k(curves) == 4
    drops = -curves["wcss"].diff()
    assert drops.loc[4] > 5 * drops.loc[5]  # the elbow: past k=4 splitting a blob gains little


def test_wcss_equals_the_kmeans_objective():
    X = np.array([[0.0], [2.0], [10.0], [12.0]])
    curves = clustering.k_curves(X, [2], seed=0)
    assert curves.loc[2, "wcss"] == pytest.approx(4.0)  # each point 1 from its centre: 4 * 1^2


def test_standardise_drops_constant_and_nan_columns():
    X = np.array([[1.0, 5.0, np.nan, 0.0], [3.0, 5.0, 1.0, 10.0], [5.0, 5.0, 2.0, 20.0]])
    Z = clustering.standardise(X)
    assert Z.shape == (3, 2)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(Z.std(axis=0), 1)
    with pytest.raises(DataError, match="n >= 2"):
        clustering.standardise(np.zeros((1, 3)))


def test_median_gamma_is_inverse_median_squared_distance():
    X = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # squared distances 9, 16, 25
    assert clustering.median_gamma(X) == pytest.approx(1 / 16)
    with pytest.raises(DataError, match="identical"):
        clustering.median_gamma(np.ones((5, 2)))


def test_kernel_pca_separates_rings_that_kmeans_cannot():
    X, y = make_circles(n_samples=300, factor=0.3, noise=0.04, random_state=0)
    plain = clustering.agreement(y, clustering.cluster(X, "kmeans++", 2))["ari"]
    assert plain < 0.1  # a straight boundary cannot split concentric rings
    gamma = 3.0  # the rings are about 0.7 apart: kernel exp(-3 * 0.49) = 0.23 between them, near 1 along a ring
    exact = clustering.kernel_pca(X, gamma, n_components=4)
    approx = clustering.nystroem_pca(X, gamma, n_components=4, n_landmarks=100)
    assert exact.shape == (300, 4) and approx.shape == (300, 4)
    for Z in (exact, approx):
        assert clustering.agreement(y, clustering.cluster(Z[:, :2], "kmeans++", 2))["ari"] > 0.95
    # too narrow a kernel: points on the outer ring no longer look alike, and the rings are lost again
    narrow = clustering.kernel_pca(X, 30.0, n_components=4)
    assert clustering.agreement(y, clustering.cluster(narrow[:, :2], "kmeans++", 2))["ari"] < 0.5


def test_nystroem_with_all_points_as_landmarks_matches_exact_kernel_pca(blobs):
    X, _ = blobs
    gamma = clustering.median_gamma(X)
    exact = clustering.kernel_pca(X, gamma, n_components=3)
    approx = clustering.nystroem_pca(X, gamma, n_components=3, n_landmarks=len(X))
    for j in range(3):  # the same components up to sign
        assert abs(np.corrcoef(exact[:, j], approx[:, j])[0, 1]) > 0.999


def test_compare_table_and_labels(blobs):
    X, y = blobs
    table, labels = clustering.compare({"blobs": X, "noise": np.random.default_rng(0).normal(size=X.shape)},
                                       ["kmeans++", "agglomerative"], k=4, truth=y)
    assert list(table.index) == [("blobs", "kmeans++"), ("blobs", "agglomerative"),
                                 ("noise", "kmeans++"), ("noise", "agglomerative")]
    assert table.loc[("blobs", "kmeans++"), "ari"] == pytest.approx(1.0)
    assert table.loc[("noise", "kmeans++"), "ari"] < 0.05
    assert table.loc[("blobs", "kmeans++"), "silhouette"] > 0.7
    assert labels[("noise", "agglomerative")].shape == (240,)


def test_contingency_counts():
    table = clustering.contingency([0, 0, 1, 1, 1], [1, 1, 0, 0, 1], ["a", "b"])
    assert table.to_dict() == {"c0": {"a": 0, "b": 2}, "c1": {"a": 2, "b": 1}}


def test_tsne_keeps_blobs_apart(blobs):
    X, y = blobs
    Y = clustering.tsne_map(X, seed=0, perplexity=20)
    assert Y.shape == (240, 2)
    assert clustering.agreement(y, clustering.cluster(Y, "kmeans++", 4))["ari"] > 0.95


def test_kernel_cost_exact_grows_faster_than_nystroem():
    X = np.random.default_rng(0).normal(size=(800, 8))
    cost = clustering.kernel_cost(X, [200, 400, 800], gamma=0.1, n_components=8, n_landmarks=100)
    assert set(cost["method"]) == {"nystroem+pca", "exact kpca"} and len(cost) == 6
    exact = cost[cost["method"] == "exact kpca"]
    nys = cost[cost["method"] == "nystroem+pca"]
    # the kernel matrix alone is 8 n^2 bytes: 4.9 MiB at n = 800; Nystroem's map is 8 n * 100 bytes
    assert exact["peak_mb"].iloc[-1] > 4.8
    assert nys["peak_mb"].iloc[-1] < exact["peak_mb"].iloc[-1] / 3
    assert clustering.loglog_slope(exact["n"], exact["peak_mb"]) > 1.7  # quadratic memory
    assert clustering.loglog_slope(nys["n"], nys["peak_mb"]) < 1.3  # linear memory
    with pytest.raises(DataError, match="only 800 cells"):
        clustering.kernel_cost(X, [2000], gamma=0.1)


def test_kernel_cost_can_skip_exact_above_a_size():
    X = np.random.default_rng(0).normal(size=(200, 4))
    cost = clustering.kernel_cost(X, [100, 200], gamma=0.1, n_components=4, n_landmarks=50, exact_max=100)
    assert cost.groupby("method").size().to_dict() == {"exact kpca": 1, "nystroem+pca": 2}


def test_loglog_slope_known_powers():
    n = np.array([100, 200, 400, 800])
    assert clustering.loglog_slope(n, 3 * n) == pytest.approx(1.0)
    assert clustering.loglog_slope(n, 1e-9 * n**3) == pytest.approx(3.0)


def test_per_image_outliers_uses_each_images_own_fences():
    values = [10, 11, 12, 13, 50] + [100, 101, 102, 103, 104] + [1, 2]
    groups = ["a"] * 5 + ["b"] * 5 + ["c"] * 2
    flags = clustering.per_image_outliers(values, groups)
    assert flags.tolist() == [False] * 4 + [True] + [False] * 5 + [False, False]  # 100 is normal in image b


def _disc_field(discs, shape=(120, 120), background=10):
    """An image and its labels with one uniform disc per (row, column, radius, grey level), ids 1.. in order."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    image, labels = np.full(shape, background, np.uint8), np.zeros(shape, np.int32)
    for k, (row, col, radius, grey) in enumerate(discs, start=1):
        inside = (yy - row) ** 2 + (xx - col) ** 2 <= radius**2
        image[inside], labels[inside] = grey, k
    return image, labels


@pytest.fixture(scope="module")
def two_fields():
    """Image 0: eight typical nuclei (radius 5, grey 150), one large (radius 9), one bright (grey 250) and one cut
    by the top border; image 1: five nuclei of radius 8, all alike (another magnification, nothing atypical)."""
    typical = [(20 + 25 * (k // 4), 15 + 25 * (k % 4), 5, 150) for k in range(8)]
    first = _disc_field(typical + [(85, 30, 9, 150), (85, 80, 5, 250), (2, 105, 5, 150)])
    second = _disc_field([(25, 25, 8, 120), (25, 75, 8, 120), (75, 25, 8, 120), (75, 75, 8, 120), (50, 50, 8, 120)])
    return datasets.SegmentationSet(images=[first[0], second[0]], labels=[first[1], second[1]], ids=["a", "b"],
                                    source="hand-made discs")


def test_nuclei_to_cluster_leaves_out_the_border_and_flags_what_is_atypical_in_its_own_image(two_fields):
    nuclei = clustering.nuclei_to_cluster(two_fields, size=32)
    table = nuclei.table
    assert (len(nuclei), nuclei.n_border, nuclei.n_cropped) == (15, 1, 16)  # the border disc (id 11) left out
    assert (nuclei.n_size_outliers, nuclei.n_dark) == (0, 0)  # 5 % of 16 objects rounds to none
    assert nuclei.crops.shape == (15, 32, 32, 3) and not table["on_border"].any()
    assert sorted(map(tuple, table[["image_index", "label"]].values.tolist())) == (
        [(0, k) for k in range(1, 11)] + [(1, k) for k in range(1, 6)])
    atypical = table.loc[table["atypical"], ["image_index", "label"]].values.tolist()
    assert atypical == [[0, 9], [0, 10]]  # the large one and the bright one; image 1's large nuclei are its normal
    assert table.loc[table["image_index"] == 1, "relative_area"].tolist() == [1.0] * 5


def test_nuclei_rows_and_crops_are_in_the_same_order(two_fields):
    nuclei = clustering.nuclei_to_cluster(two_fields, size=32)
    crops = segmentation.crops_from_dataset(two_fields.images, two_fields.labels, size=32)
    kept = [(i, k) for i, k in zip(crops.image_index, crops.ids, strict=True) if not (i == 0 and k == 11)]
    assert list(zip(nuclei.table["image_index"], nuclei.table["label"], strict=True)) == kept
    np.testing.assert_array_equal(nuclei.crops, crops.crops[[pair != (0, 11) for pair in
                                                             zip(crops.image_index, crops.ids, strict=True)]])


def test_atypical_nuclei_are_area_or_brightness_outliers_of_their_image():
    table = pd.DataFrame({"image_index": [0] * 6 + [1] * 4,
                          "area_px": [100, 100, 100, 100, 400, 100, 400, 400, 400, 400],
                          "relative_intensity": [1.0, 1.0, 1.0, 1.0, 1.0, 0.3, 1.0, 1.0, 1.0, 1.0]})
    assert clustering.atypical_nuclei(table).tolist() == [False] * 4 + [True, True] + [False] * 4


def test_morphology_matrix_leaves_out_size_and_brightness_unless_asked():
    table = pd.DataFrame({"relative_area": [0.5, 1.0, 2.0], "relative_intensity": [1.0, 1.2, 0.8],
                          "circularity": 0.875, "eccentricity": [0.25, 0.5, 0.3], "solidity": 0.9375, "extent": 0.75,
                          "intensity_cv": [0.1, 0.2, 0.3], "area_px": [50, 100, 200]})
    X = clustering.morphology_matrix(table)
    assert X.shape == (3, 2)  # eccentricity and intensity cv; the constant three dropped; no size, no brightness
    np.testing.assert_allclose(X.mean(axis=0), 0.0, atol=1e-12)
    X = clustering.morphology_matrix(table, ("relative_area", "relative_intensity"))
    np.testing.assert_allclose(X[:, 0], [-np.sqrt(1.5), 0.0, np.sqrt(1.5)])  # log(0.5), 0, log(2): symmetric
    with pytest.raises(DataError, match="area_px"):
        clustering.morphology_matrix(table, ("area_px",))


def test_flag_enrichment_compares_shares_and_resamples_units():
    flags = np.array([1, 1, 0, 0, 1, 0, 0, 0] * 10, bool)
    inside = np.array([1, 1, 1, 1, 0, 0, 0, 0] * 10, bool)
    units = np.repeat(np.arange(10), 8)
    interval = clustering.flag_enrichment(flags, inside, units, n_resamples=200)
    assert interval.estimate == pytest.approx(0.5 - 0.25) and interval.n_units == 10
    assert interval.low == interval.high == pytest.approx(0.25)  # every image alike: no spread
    flags[:8] = [0, 0, 0, 0, 1, 1, 1, 1]  # image 0 differs
    assert clustering.flag_enrichment(flags, inside, units, n_resamples=200).low < 0.25


def test_nuclei_to_cluster_on_simulated_nuclei():
    data = synthetic.nuclei_dataset(n_images=3, seed=4)
    nuclei = clustering.nuclei_to_cluster(data)
    assert len(nuclei) == len(nuclei.crops) > 0 and nuclei.crops.shape[1:] == (96, 96, 3)
    assert nuclei.n_cropped + nuclei.n_size_outliers + nuclei.n_dark == sum(int(lab.max()) for lab in data.labels)
    assert set(clustering.SCALE_FREE_MORPHOLOGY) <= set(nuclei.table.columns)
    assert clustering.morphology_matrix(nuclei.table).shape[0] == len(nuclei)


def test_penultimate_embeddings_of_a_tiny_model():
    from cellkit import classifiers, runtime

    keras = runtime.keras_module()
    inputs = keras.Input((8, 8, 3))
    hidden = keras.layers.Dense(5, name="hidden")(keras.layers.Flatten()(inputs))
    outputs = keras.layers.Dense(2, activation="softmax", name="output")(hidden)
    info = classifiers.ModelInfo(model="tiny", class_names=["a", "b"], input_size=8, preprocessing="pm1")
    trained = classifiers.TrainedModel(keras.Model(inputs, outputs), info)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    emb = clustering.penultimate_embeddings(trained, images, batch_size=2)
    assert emb.shape == (3, 5) and emb.dtype == np.float32
    x = classifiers.preprocess(images, "pm1").reshape(3, -1)
    kernel, bias = trained.model.get_layer("hidden").get_weights()
    np.testing.assert_allclose(emb, x @ kernel + bias, rtol=1e-4, atol=1e-4)
    assert clustering.penultimate_embeddings(trained, images[:0]).shape == (0, 5)



def test_cost_slopes_fit_each_method_and_measure_at_the_large_end():
    n = np.array([100, 200, 400, 800, 1600])
    cost = pd.DataFrame({"method": ["exact"] * 5 + ["nystroem"] * 5, "n": np.concatenate([n, n]),
                         "seconds": np.concatenate([1e-6 * n**2 + (n < 200) * 5.0, 1e-3 * n]),
                         "peak_mb": np.concatenate([1e-4 * n**2, 0.1 * n])})
    slopes = clustering.cost_slopes(cost)
    assert slopes["exact: seconds"] == pytest.approx(2.0)  # n = 100's fixed cost lies below the large end (>= 200)
    assert slopes["nystroem: peak_mb"] == pytest.approx(1.0)
    assert np.isnan(clustering.cost_slopes(cost[cost["n"] == 1600])["exact: seconds"])


# --- sub-types: choices without labels, scores with intervals ----------------------------------------------


def test_select_by_silhouette_finds_the_blobs_without_labels(blobs):
    X, y = blobs
    table, chosen, labels = clustering.select_by_silhouette(X, ("kmeans++", "agglomerative"), [2, 3, 4, 6, 300])
    assert list(table.index.names) == ["method", "k"] and len(table) == 8  # k = 300 > n - 1 is skipped
    assert chosen[1] == 4 and clustering.agreement(y, labels)["ari"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="no k in"):
        clustering.select_by_silhouette(X[:3], ("kmeans++",), [3, 4])


def test_agreement_interval_matches_scikit_learn_and_averages_groups():
    rng = np.random.default_rng(0)
    truth, labels = rng.integers(0, 3, 300), rng.integers(0, 4, 300)
    labels[:150] = truth[:150]  # half the cells agree
    expected = clustering.agreement(truth, labels)
    for score in ("ari", "nmi"):
        interval = clustering.agreement_interval(truth, labels, score, n_resamples=200)
        assert interval.estimate == pytest.approx(expected[score], abs=1e-12)
        assert interval.low < interval.estimate < interval.high and interval.n_units == 300
    groups = np.repeat(["ig", "neutrophil"], 150)
    per_group = [clustering.agreement(truth[groups == g], labels[groups == g])["ari"] for g in ("ig", "neutrophil")]
    pooled = clustering.agreement_interval(truth, labels, "ari", groups=groups, n_resamples=200)
    assert pooled.estimate == pytest.approx(np.mean(per_group), abs=1e-12)  # 1.0 and about 0


def test_fast_scores_agree_with_scikit_learn_on_edge_cases():
    for truth, labels in (([0, 0, 1, 1], [0, 0, 0, 0]), ([0, 0, 0, 0], [0, 1, 2, 3]), ([0, 1, 2, 3], [3, 2, 1, 0]),
                          ([0, 0, 0, 0], [1, 1, 1, 1]), ([0, 5, 5, 0, 2], [2, 2, 7, 7, 0])):
        expected = clustering.agreement(truth, labels)
        for score in ("ari", "nmi"):
            got = clustering.agreement_interval(truth, labels, score, n_resamples=20).estimate
            assert got == pytest.approx(expected[score], abs=1e-12), (truth, labels, score)


def test_agreement_difference_is_paired_and_zero_for_the_same_clustering():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 200)
    noise = rng.integers(0, 2, 200)
    same = clustering.agreement_difference(truth, truth, truth, "nmi", n_resamples=100)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    better = clustering.agreement_difference(truth, truth, noise, "ari", n_resamples=200)
    assert better.low > 0.8 and better.verdict() == "the first is better"
    with pytest.raises(DataError, match="unknown score"):
        clustering.agreement_difference(truth, truth, noise, "purity")
    with pytest.raises(DataError, match="same n"):
        clustering.agreement_interval(truth, truth[:10])


def test_subtype_scores_choose_without_labels_and_report_intervals(blobs):
    X, y = blobs
    size = np.where(np.isin(y, (0, 1)), 1.0, 2.0)[:, None] + np.random.default_rng(0).normal(0, 0.01, (240, 1))
    table, labels, selections = clustering.subtype_scores({"blobs": X, "size": size}, y, ("kmeans++",), [2, 3, 4],
                                                         n_resamples=100)
    assert table.loc["blobs", "k"] == 4 and table.loc["blobs", "ari"] == pytest.approx(1.0)
    assert table.loc["size", "k"] == 2  # two sizes: two clusters, each holding two blobs
    assert table.loc["size", "ari_low"] <= table.loc["size", "ari"] <= table.loc["size", "ari_high"] < 1
    assert table.loc["size", "ari_at_true_k"] < 1 and set(labels) == set(selections) == {"blobs", "size"}


def test_linear_probe_predictions_are_out_of_fold(blobs):
    X, y = blobs
    predicted = clustering.linear_probe_predictions(X, y, folds=3)
    assert predicted.shape == y.shape and (predicted == y).mean() == pytest.approx(1.0)
    noise = np.random.default_rng(0).normal(size=(240, 5))  # nothing to learn: near chance out of fold
    assert (clustering.linear_probe_predictions(noise, y, folds=3) == y).mean() < 0.45
