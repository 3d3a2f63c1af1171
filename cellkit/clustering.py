"""Clustering cells without labels (report 004, section 3): embeddings, k-means++, Gaussian mixtures,
agglomerative clustering, kernel PCA (exact, and with a Nystroem approximation), the elbow and silhouette
curves that choose k, agreement with known classes, and what kernel PCA costs as the number of cells grows.

scikit-learn does the clustering; this module puts its pieces together the way the notebook and the report use
them. Keras is imported only inside :func:`penultimate_embeddings`, so the rest loads fast and is tested without it.

==========================================  ==============================================================
:func:`penultimate_embeddings`              a trained classifier's last hidden layer, one vector per cell
:func:`standardise`                         zero mean, unit variance per column; NaN columns dropped
:func:`median_gamma`                        the RBF kernel width from the median pairwise distance
:func:`nystroem_pca`, :func:`kernel_pca`    kernel PCA, approximated (linear in n) or exact (cubic in n)
:func:`cluster`                             k-means++, Gaussian mixture or agglomerative (Ward) labels
:func:`silhouette`                          mean silhouette of a clustering (on a sample of cells)
:func:`k_curves`                            within-cluster sum of squares (elbow) and silhouette over k
:func:`choose_k`                            the k of the highest silhouette
:func:`agreement`, :func:`compare`          ARI and NMI against known classes, per embedding x method
:func:`select_by_silhouette`                method and k chosen without labels: the highest silhouette
:func:`agreement_interval`                  ARI or NMI with a bootstrap interval over cells (per group, averaged)
:func:`agreement_difference`                the paired bootstrap difference of two clusterings' ARI or NMI
:func:`subtype_scores`                      sub-types (labels no model saw) against unsupervised clusterings
:func:`linear_probe_predictions`            out-of-fold predictions of the sub-types from an embedding (uses labels)
:func:`contingency`                         cells of each class in each cluster
:func:`tsne_map`                            a 2-D map (t-SNE) for plots
:func:`kernel_cost`, :func:`loglog_slope`   time and peak memory of both kernel PCAs as n grows
:func:`per_image_outliers`                  Tukey-fence outliers of a measurement within each image
:func:`nuclei_to_cluster`                   nuclei of label images: crops, morphology, atypical flags
:func:`atypical_nuclei`                     nuclei unusually large, small, bright or dim for their image
:func:`morphology_matrix`                   scale-free shape and texture features, standardised, to cluster
:func:`flag_enrichment`                     share of flagged cells in a cluster minus outside, interval over images
==========================================  ==============================================================

Conventions: an embedding ``X`` is a float array (n cells, d dimensions); cluster labels are int arrays (n,)
with values 0..k-1; times are wall-clock seconds, memory is MiB (peak of Python-tracked allocations, which
include NumPy arrays, during the fit).

>>> X = standardise(penultimate_embeddings(trained, images))        # (n, 128)
>>> Z = nystroem_pca(X, gamma=median_gamma(X), n_components=32)     # (n, 32)
>>> labels = cluster(Z, "kmeans++", k=8)
>>> agreement(true_labels, labels)                                   # {"ari": ..., "nmi": ...}
"""

from __future__ import annotations

import functools
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.decomposition import PCA, KernelPCA
from sklearn.kernel_approximation import Nystroem
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from cellkit import classifiers, features, metrics, runtime, segmentation
from cellkit.datasets import DataError, SegmentationSet

#: Clustering methods of :func:`cluster`.
METHODS = ("kmeans++", "gmm", "agglomerative")


def one_openmp_thread(function: Callable) -> Callable:
    """Run ``function`` with scikit-learn's OpenMP code (k-means, t-SNE, silhouette) on one thread.

    OpenMP threads spin while they wait for each other; on a CPU shared with other jobs, k-means and t-SNE ran
    10 to 30 times slower on two threads than on one (measured on a busy 2-core machine). BLAS is not limited.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1, user_api="openmp"):
            return function(*args, **kwargs)

    return wrapper


# --- embeddings ------------------------------------------------------------------------------------------


def penultimate_embeddings(trained: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The activations of a trained classifier's last hidden layer (the input of its softmax layer).

    Parameters
    ----------
    trained : a :class:`cellkit.classifiers.TrainedModel` (a Keras model and its metadata).
    images : uint8 images (n, h, w, 3) of any size; they are brought to the model's input the way its training
        images were made (:meth:`~cellkit.classifiers.TrainedModel.prepare`) and scaled with its preprocessing.

    Returns
    -------
    float32 array (n, d): d is the width of that layer (128 for ``cellnet``'s global average pooling, 84 for
    the LeNets' last dense layer). Dropout is inactive at inference, so the values are deterministic.
    """
    model = trained.model
    if len(model.layers) < 2:
        raise DataError(f"model {model.name!r} has no hidden layer to take embeddings from")
    head = runtime.keras_module().Model(model.input, model.layers[-2].output)
    x = trained.prepare(images)
    embeddings = classifiers.outputs_of(head, x, trained.info.preprocessing, batch_size)
    return embeddings.reshape(len(embeddings), int(np.prod(embeddings.shape[1:])))


def standardise(X: np.ndarray | pd.DataFrame) -> np.ndarray:
    """Columns scaled to zero mean and unit variance (float64, (n, d')).

    Columns with any NaN or with zero variance carry no usable distance information and are dropped, so d' <= d.
    Without it, k-means on hand-crafted features would cluster on whichever feature has the largest units.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) < 2:
        raise DataError(f"need an (n, d) array with n >= 2 cells, got shape {X.shape}")
    keep = ~np.isnan(X).any(axis=0) & (np.nanstd(X, axis=0) > 0)
    if not keep.any():
        raise DataError("no column of the embedding varies: nothing to cluster on")
    X = X[:, keep]
    return (X - X.mean(axis=0)) / X.std(axis=0)


# --- kernel PCA ----------------------------------------------------------------------------------------


def median_gamma(X: np.ndarray, sample: int = 1000, seed: int = 0) -> float:
    """RBF kernel width ``gamma = 1 / median squared distance`` between cells (the median heuristic).

    The RBF kernel is ``exp(-gamma * ||x - y||^2)``. If gamma is too large every cell is only similar to itself
    (the kernel matrix tends to the identity); if too small every pair looks alike (all ones). With gamma set
    from the median squared distance, a typical pair has similarity ``exp(-1) = 0.37``. Report 004's gamma of
    about 1e-5 is this scale for 4,608-dimensional VGG outputs, whose squared distances are about 1e5.
    ``sample`` cells (chosen with ``seed``) are enough to estimate the median.
    """
    X = np.asarray(X, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pick = X[rng.permutation(len(X))[:sample]] if len(X) > sample else X
    d2 = euclidean_distances(pick, squared=True)[np.triu_indices(len(pick), k=1)]
    median = float(np.median(d2)) if d2.size else 0.0
    if median <= 0:
        raise DataError("all cells are identical: no kernel width fits")
    return 1.0 / median


def nystroem_pca(X: np.ndarray, gamma: float, n_components: int = 32, n_landmarks: int = 300,
                 seed: int = 0) -> np.ndarray:
    """Kernel PCA with the Nystroem approximation (report 004, section 3.4): (n, n_components) float64.

    ``n_landmarks`` cells define an explicit feature map whose inner products approximate the RBF kernel; PCA in
    that space then costs O(n * n_landmarks^2), linear in n, where exact kernel PCA is cubic.
    """
    n_landmarks = min(n_landmarks, len(X))
    features = Nystroem(kernel="rbf", gamma=gamma, n_components=n_landmarks, random_state=seed).fit_transform(X)
    n_components = min(n_components, n_landmarks, len(X))
    return PCA(n_components=n_components, random_state=seed).fit_transform(features)


def kernel_pca(X: np.ndarray, gamma: float, n_components: int = 32, seed: int = 0) -> np.ndarray:
    """Exact RBF kernel PCA: (n, n_components) float64. Builds the full n x n kernel matrix (8 n^2 bytes) and
    eigendecomposes it (O(n^3) time), so use it on a few thousand cells at most."""
    n_components = min(n_components, len(X) - 1)
    return KernelPCA(n_components=n_components, kernel="rbf", gamma=gamma, eigen_solver="dense",
                     random_state=seed).fit_transform(X)


# --- clustering ------------------------------------------------------------------------------------------


@one_openmp_thread
def cluster(X: np.ndarray, method: str, k: int, seed: int = 0) -> np.ndarray:
    """Cluster labels (n,) int64 in 0..k-1.

    Methods (:data:`METHODS`): ``kmeans++`` (k-means with k-means++ seeding, best of 10 starts),
    ``gmm`` (Gaussian mixture with diagonal covariances, k-means start; full covariances need d^2 parameters per
    cluster, too many for 128 dimensions and a few hundred cells each) and ``agglomerative`` (Ward linkage, which
    merges the pair of clusters that increases the within-cluster sum of squares least).
    """
    X = np.asarray(X, dtype=np.float64)
    if not 2 <= k <= len(X):
        raise DataError(f"k must be between 2 and the number of cells ({len(X)}), got {k}")
    if method == "kmeans++":
        return KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit_predict(X)
    if method == "gmm":
        gmm = GaussianMixture(n_components=k, covariance_type="diag", n_init=2, reg_covar=1e-4, random_state=seed)
        return gmm.fit(X).predict(X)
    if method == "agglomerative":
        return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(X).astype(np.int64)
    raise DataError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")


@one_openmp_thread
def silhouette(X: np.ndarray, labels: Sequence[int], sample: int = 2000, seed: int = 0) -> float:
    """Mean silhouette of a clustering, -1..1 (higher: compact, separated clusters), on at most ``sample`` cells
    chosen with ``seed`` (its cost grows as n^2); NaN when there is only one cluster."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(silhouette_score(X, labels, sample_size=min(sample, len(X)), random_state=seed))


@one_openmp_thread
def k_curves(X: np.ndarray, ks: Sequence[int], seed: int = 0, silhouette_sample: int = 2000) -> pd.DataFrame:
    """The elbow and silhouette curves of k-means++ over ``ks``.

    Returns a DataFrame indexed by ``k`` with ``wcss`` (within-cluster sum of squares, the k-means objective, in
    squared units of ``X``; it always falls as k grows, so one looks for the elbow where it stops falling fast)
    and ``silhouette`` (mean over cells of (b - a) / max(a, b), a = mean distance to the own cluster, b = to the
    nearest other cluster; -1..1, higher is better; on at most ``silhouette_sample`` cells).
    """
    rows = []
    for k in ks:
        km = KMeans(n_clusters=int(k), init="k-means++", n_init=10, random_state=seed).fit(X)
        rows.append({"k": int(k), "wcss": float(km.inertia_),
                     "silhouette": silhouette(X, km.labels_, silhouette_sample, seed)})
    return pd.DataFrame(rows).set_index("k")


def choose_k(curves: pd.DataFrame) -> int:
    """The k with the highest silhouette in a :func:`k_curves` table (the elbow is read by eye)."""
    return int(curves["silhouette"].idxmax())


def agreement(truth: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Adjusted Rand index (``ari``: 0 for chance, 1 for identical partitions, can be negative) and normalised
    mutual information (``nmi``: 0..1, arithmetic mean normalisation) between known classes and clusters."""
    return {"ari": float(adjusted_rand_score(truth, labels)), "nmi": float(normalized_mutual_info_score(truth, labels))}


@one_openmp_thread
def compare(embeddings: Mapping[str, np.ndarray], methods: Sequence[str], k: int, truth: Sequence[int],
            seed: int = 0, silhouette_sample: int = 2000) -> tuple[pd.DataFrame, dict[tuple[str, str], np.ndarray]]:
    """Every embedding x method at ``k`` clusters, scored against ``truth``.

    Returns a table (index ``embedding``, ``method``) with ``ari``, ``nmi``, ``silhouette`` (in that embedding's
    space, on at most ``silhouette_sample`` cells) and ``seconds`` (wall clock of the clustering), and the labels
    of each combination.
    """
    rows, labels = [], {}
    for name, X in embeddings.items():
        for method in methods:
            started = time.perf_counter()
            found = cluster(X, method, k, seed)
            seconds = time.perf_counter() - started
            rows.append({"embedding": name, "method": method, **agreement(truth, found),
                         "silhouette": silhouette(X, found, silhouette_sample, seed), "seconds": seconds})
            labels[(name, method)] = found
    return pd.DataFrame(rows).set_index(["embedding", "method"]), labels


@one_openmp_thread
def select_by_silhouette(X: np.ndarray, methods: Sequence[str], ks: Sequence[int], seed: int = 0,
                         silhouette_sample: int = 2000) -> tuple[pd.DataFrame, tuple[str, int], np.ndarray]:
    """Cluster ``X`` with every method x k and keep the one of highest mean silhouette in ``X``: no label used.

    Returns the table (index ``method``, ``k``; column ``silhouette``), the chosen ``(method, k)`` and its labels
    (n,). k larger than n - 1 is skipped. Silhouettes compare clusterings of one space, not spaces with each other.
    """
    rows, found = [], {}
    for method in methods:
        for k in ks:
            if not 2 <= k < len(X):
                continue
            found[(method, int(k))] = labels = cluster(X, method, int(k), seed)
            rows.append({"method": method, "k": int(k), "silhouette": silhouette(X, labels, silhouette_sample, seed)})
    if not rows:
        raise DataError(f"no k in {list(ks)} fits {len(X)} cells")
    table = pd.DataFrame(rows).set_index(["method", "k"])
    chosen = table["silhouette"].idxmax()
    return table, chosen, found[chosen]


def _contingency_table(truth: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts (classes, clusters) of two non-negative int label arrays (n,), empty rows and columns dropped."""
    table = np.zeros((int(truth.max()) + 1, int(labels.max()) + 1), np.int64)
    np.add.at(table, (truth, labels), 1)
    return table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]


def _ari(table: np.ndarray) -> float:
    """Adjusted Rand index from a contingency table (as scikit-learn's ``adjusted_rand_score``)."""
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    index, rows, cols, total = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0)), pairs(table.sum())
    expected = rows * cols / total if total else 0.0
    maximum = (rows + cols) / 2
    return 1.0 if maximum == expected else float((index - expected) / (maximum - expected))


def _nmi(table: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean of the entropies) from a contingency table, as
    scikit-learn's ``normalized_mutual_info_score``: 1 when both partitions are one group each."""
    p = table / table.sum()
    pr, pc = p.sum(axis=1), p.sum(axis=0)
    if len(pr) == 1 and len(pc) == 1:
        return 1.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pr, pc)[nz])).sum())
    entropy = lambda q: float(-(q[q > 0] * np.log(q[q > 0])).sum())  # noqa: E731
    denominator = (entropy(pr) + entropy(pc)) / 2
    return 0.0 if denominator <= 0 else max(mi, 0.0) / denominator


SCORES: dict[str, Callable[[np.ndarray], float]] = {"ari": _ari, "nmi": _nmi}


def _grouped_score(score: str) -> Callable[[np.ndarray, np.ndarray, np.ndarray], float]:
    """The mean over groups of ``score`` between truth and clusters within each group."""
    function = SCORES[score]

    def statistic(truth: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
        return float(np.mean([function(_contingency_table(truth[groups == g], labels[groups == g]))
                              for g in np.unique(groups)]))

    return statistic


def _as_units(truth: Sequence[int], labels: Sequence[int], groups: Sequence[Any] | None) -> list[np.ndarray]:
    truth, labels = np.asarray(truth, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if truth.shape != labels.shape or truth.ndim != 1 or len(truth) < 2:
        raise DataError(f"truth and labels must be two int arrays (n,) of the same n >= 2, got {truth.shape} "
                        f"and {labels.shape}")
    if (truth < 0).any() or (labels < 0).any():
        raise DataError("truth and labels must be non-negative ids")
    groups = np.zeros(len(truth), np.int64) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    if len(groups) != len(truth):
        raise DataError(f"{len(groups)} groups for {len(truth)} cells")
    return [truth, labels, groups]


def agreement_interval(truth: Sequence[int], labels: Sequence[int], score: str = "ari",
                       groups: Sequence[Any] | None = None, **options: Any) -> metrics.Interval:
    """ARI or NMI (``score``) between known classes and clusters, with a bootstrap interval over cells.

    With ``groups`` (n,) the score is computed within each group and averaged (e.g. the sub-types of ig and of
    neutrophil cells, each clustered on its own), and the cells of all groups are resampled together. The clusters
    are fixed: the interval says how much the score depends on which cells were scored, not how much the
    clustering would change on other cells. ``options``: of :func:`cellkit.metrics.bootstrap_interval`.
    """
    if score not in SCORES:
        raise DataError(f"unknown score {score!r}; use one of {', '.join(SCORES)}")
    return metrics.bootstrap_interval(_as_units(truth, labels, groups), _grouped_score(score), **options)


def agreement_difference(truth: Sequence[int], labels_a: Sequence[int], labels_b: Sequence[int], score: str = "ari",
                         groups: Sequence[Any] | None = None, **options: Any) -> metrics.Interval:
    """Score of clustering a minus score of clustering b on the same cells (:func:`agreement_interval`), with a
    paired bootstrap interval (:func:`cellkit.metrics.paired_difference`); "not resolved" if it holds 0."""
    if score not in SCORES:
        raise DataError(f"unknown score {score!r}; use one of {', '.join(SCORES)}")
    units_a, units_b = _as_units(truth, labels_a, groups), _as_units(truth, labels_b, groups)
    return metrics.paired_difference(units_a, units_b, _grouped_score(score), **options)


def subtype_scores(embeddings: Mapping[str, np.ndarray], truth: Sequence[int], methods: Sequence[str],
                   ks: Sequence[int], seed: int = 0, **options: Any
                   ) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, pd.DataFrame]]:
    """Cluster the cells of one class in each embedding with the method and k of the best silhouette
    (:func:`select_by_silhouette`, no label used), then score the clusters against ``truth`` (the sub-types).

    Returns a table indexed by ``embedding`` with ``method``, ``k``, ``silhouette``, ``ari`` and ``nmi`` with
    their bootstrap intervals (``ari_low``, ``ari_high``, ``nmi_low``, ``nmi_high``; ``options`` go to
    :func:`agreement_interval`) and ``ari_at_true_k`` (k-means++ at k = the number of sub-types, which uses a fact
    about the labels: shown for reference only); the chosen labels of each embedding; and each selection table.
    """
    truth = np.asarray(truth)
    k_true = len(np.unique(truth))
    rows, chosen_labels, selections = [], {}, {}
    for name, X in embeddings.items():
        selections[name], (method, k), labels = select_by_silhouette(X, methods, ks, seed)
        ari = agreement_interval(truth, labels, "ari", seed=seed, **options)
        nmi = agreement_interval(truth, labels, "nmi", seed=seed, **options)
        rows.append({"embedding": name, "method": method, "k": k,
                     "silhouette": float(selections[name].loc[(method, k), "silhouette"]),
                     "ari": ari.estimate, "ari_low": ari.low, "ari_high": ari.high,
                     "nmi": nmi.estimate, "nmi_low": nmi.low, "nmi_high": nmi.high,
                     "ari_at_true_k": agreement(truth, cluster(X, "kmeans++", k_true, seed))["ari"]})
        chosen_labels[name] = labels
    return pd.DataFrame(rows).set_index("embedding"), chosen_labels, selections


def linear_probe_predictions(X: np.ndarray, truth: Sequence[int], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold predictions (n,) of a logistic regression that learns ``truth`` from ``X`` (stratified
    ``folds``-fold cross-validation; features scaled within each fold). It uses the labels: it asks whether the
    embedding holds the sub-types at all, which no clustering can find if it does not."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, np.asarray(X, dtype=np.float64), np.asarray(truth), cv=splitter)


def contingency(truth: Sequence[int], labels: Sequence[int], class_names: Sequence[str]) -> pd.DataFrame:
    """Cells of each class (rows, named) in each cluster (columns ``c0``, ``c1``...), as counts."""
    truth, labels = np.asarray(truth), np.asarray(labels)
    k = int(labels.max()) + 1 if labels.size else 0
    table = np.zeros((len(class_names), k), np.int64)
    np.add.at(table, (truth, labels), 1)
    return pd.DataFrame(table, index=list(class_names), columns=[f"c{j}" for j in range(k)])


@one_openmp_thread
def tsne_map(X: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """A 2-D t-SNE map (n, 2) for plots. Distances between far-apart groups in it mean little; only who sits
    next to whom does. Runs on the first 50 principal components when X is wider, as is customary."""
    X = np.asarray(X, dtype=np.float64)
    if X.shape[1] > 50:
        X = PCA(n_components=50, random_state=seed).fit_transform(X)
    perplexity = min(perplexity, (len(X) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(X)


# --- cost of kernel PCA ------------------------------------------------------------------------------------


def measure(function: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock seconds and peak traced memory (MiB) of one call of ``function``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        function()
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return seconds, peak / 2**20


def kernel_cost(X: np.ndarray, sizes: Sequence[int], gamma: float, n_components: int = 32, n_landmarks: int = 300,
                exact_max: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Time and peak memory of :func:`nystroem_pca` and :func:`kernel_pca` on the first n cells of ``X``.

    ``exact_max`` skips exact kernel PCA above that n (it is the one that grows cubically). Returns a long
    table with ``n``, ``method`` (``nystroem+pca`` or ``exact kpca``), ``seconds`` and ``peak_mb``.
    """
    rows = []
    for n in sizes:
        if n > len(X):
            raise DataError(f"kernel_cost: n = {n} but only {len(X)} cells were given")
        part = X[:n]
        runs = {"nystroem+pca": lambda p=part: nystroem_pca(p, gamma, n_components, n_landmarks, seed)}
        if exact_max is None or n <= exact_max:
            runs["exact kpca"] = lambda p=part: kernel_pca(p, gamma, n_components, seed)
        for method, function in runs.items():
            seconds, peak = measure(function)
            rows.append({"n": int(n), "method": method, "seconds": seconds, "peak_mb": peak})
    return pd.DataFrame(rows)


def loglog_slope(n: Sequence[float], values: Sequence[float]) -> float:
    """The exponent b of ``values ~ a * n^b``, fitted by least squares on log-log axes (1 linear, 3 cubic)."""
    n, values = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    if len(n) < 2:
        raise DataError("need at least two sizes to fit a slope")
    return float(np.polyfit(np.log(n), np.log(values), 1)[0])


def cost_slopes(cost: pd.DataFrame, measures: Sequence[str] = ("seconds", "peak_mb"), large: float = 1 / 8
                ) -> dict[str, float]:
    """The growth exponent (:func:`loglog_slope`) of each method and measure of a :func:`kernel_cost` table, fitted
    at its large-n end (n at least ``large`` times the largest n: small sizes are dominated by fixed costs), as
    ``{"<method>: <measure>": slope}``; NaN where fewer than two sizes are there to fit."""
    end = cost[cost["n"] >= large * cost["n"].max()]
    slopes = {}
    for method in cost["method"].unique():
        part = end[end["method"] == method]
        for measure in measures:
            slopes[f"{method}: {measure}"] = loglog_slope(part["n"], part[measure]) if len(part) >= 2 else np.nan
    return slopes


# --- atypical cells -------------------------------------------------------------------------------------


def per_image_outliers(values: Sequence[float], groups: Sequence[Any], fence: float = 1.5) -> np.ndarray:
    """Boolean (n,): True where a value lies outside its group's Tukey fences [Q1 - fence*IQR, Q3 + fence*IQR].

    Used per image so that a nucleus is atypical relative to the nuclei it was imaged with, not to other
    microscopes or magnifications. Groups of fewer than 4 values flag nothing.
    """
    frame = pd.DataFrame({"v": np.asarray(values, dtype=float), "g": list(groups)})
    grouped = frame.groupby("g")["v"]
    q1, q3, size = grouped.transform(lambda v: v.quantile(0.25)), grouped.transform(lambda v: v.quantile(0.75)), \
        grouped.transform("size")
    iqr = q3 - q1
    outside = (frame["v"] < q1 - fence * iqr) | (frame["v"] > q3 + fence * iqr)
    return (outside & (size >= 4)).to_numpy()


# --- nuclei of label images (notebook 09's DSB part) ------------------------------------------------------------

#: Morphology columns of :func:`cellkit.features.nucleus_morphology` that do not depend on the magnification
#: (absolute sizes would sort images by microscope).
SCALE_FREE_MORPHOLOGY = ("relative_area", "relative_intensity", "circularity", "eccentricity", "solidity", "extent",
                         "intensity_cv")
#: The ones nuclei are clustered on by default (:func:`morphology_matrix`): shape and texture, without the size and
#: brightness that define :func:`atypical_nuclei`, so that "atypical nuclei gather in one cluster" is not circular.
SHAPE_AND_TEXTURE = ("circularity", "eccentricity", "solidity", "extent", "intensity_cv")


@dataclass
class Nuclei:
    """The nuclei of a set of label images, ready to cluster (:func:`nuclei_to_cluster`).

    ``table``: one row per nucleus, the columns of :func:`cellkit.features.nucleus_morphology` and ``atypical``
    (:func:`atypical_nuclei`). ``crops``: (n, size, size, 3) ``float32`` crops in [0, 1], in the rows' order
    (:func:`cellkit.segmentation.crops_from_dataset`). ``n_size_outliers``, ``n_dark``: objects the crop rules
    dropped; ``n_border``: nuclei left out because they touch the image border.
    """

    table: pd.DataFrame
    crops: np.ndarray
    n_size_outliers: int
    n_dark: int
    n_border: int

    def __len__(self) -> int:
        return len(self.table)

    @property
    def n_cropped(self) -> int:
        """Nuclei the crop rules kept, those on the border included."""
        return len(self.table) + self.n_border


def nuclei_to_cluster(data: SegmentationSet, size: int = 96, fence: float = 1.5) -> Nuclei:
    """The nuclei of ``data`` (images and instance labels) as report 004 clustered its cells: one ``size`` x
    ``size`` crop each (report 004's rules: the 5 % size outliers of the whole set and mostly black cells
    dropped), the morphology of each measured on its mask in the full image, and the ``atypical`` flag.

    Nuclei that touch the image border are left out: part of their outline is the border's, not their own (in
    notebook 09's first run they made up much of an "elongated, straight-edged" cluster). Atypical is judged
    among the nuclei kept, within each image (:func:`atypical_nuclei`).
    """
    crops = segmentation.crops_from_dataset(data.images, data.labels, size)
    morphology = features.nucleus_morphology(data).set_index(["image_index", "label"])
    table = morphology.loc[list(zip(crops.image_index, crops.ids, strict=True))].reset_index()
    inside = ~table["on_border"].to_numpy(dtype=bool)
    table = table[inside].reset_index(drop=True)
    table["atypical"] = atypical_nuclei(table, fence)
    return Nuclei(table, crops.crops[inside], crops.n_size_outliers, crops.n_dark, int((~inside).sum()))


def atypical_nuclei(table: pd.DataFrame, fence: float = 1.5) -> np.ndarray:
    """Boolean (n,): nuclei whose area (``area_px``) or brightness relative to their image's median nucleus
    (``relative_intensity``) lies outside the Tukey fences of the nuclei of their own image (``image_index``;
    :func:`per_image_outliers`): unusually large, small, bright or dim for their field of view. Decided before
    and without any clustering (report 004's atypical cells were the brighter ones)."""
    by_image = table["image_index"]
    return (per_image_outliers(table["area_px"], by_image, fence)
            | per_image_outliers(table["relative_intensity"], by_image, fence))


def morphology_matrix(table: pd.DataFrame, columns: Sequence[str] = SHAPE_AND_TEXTURE) -> np.ndarray:
    """Morphology columns (of :data:`SCALE_FREE_MORPHOLOGY`; default :data:`SHAPE_AND_TEXTURE`) as an embedding to
    cluster, (n, d') float64 (:func:`standardise`; constant columns dropped). ``relative_area``, if chosen, enters
    as its log, so that a nucleus twice and one half the typical area lie equally far from it."""
    unknown = sorted(set(columns) - set(SCALE_FREE_MORPHOLOGY))
    if unknown:
        raise DataError(f"not scale-free morphology columns: {', '.join(unknown)}")
    return standardise(np.column_stack([np.log(table[c]) if c == "relative_area" else table[c] for c in columns]))


def flag_enrichment(flags: Sequence[bool], in_cluster: Sequence[bool], units: Sequence[Any],
                    **options: Any) -> metrics.Interval:
    """Share of flagged cells (e.g. atypical nuclei) in a cluster minus the share outside it, with a bootstrap
    interval that resamples ``units`` (e.g. images: nuclei of one image are not independent). A resample without
    any cell in (or out of) the cluster counts that share as 0. ``options``: of
    :func:`cellkit.metrics.bootstrap_interval`."""
    frame = pd.DataFrame({"flag": np.asarray(flags, bool), "inside": np.asarray(in_cluster, bool),
                          "unit": np.asarray(units)})
    frame["flag_in"], frame["flag_out"] = frame["flag"] & frame["inside"], frame["flag"] & ~frame["inside"]
    frame["outside"] = ~frame["inside"]
    counts = frame.groupby("unit")[["flag_in", "inside", "flag_out", "outside"]].sum().to_numpy(np.float64)

    def difference(c: np.ndarray) -> float:
        total = c.sum(axis=0)
        share = lambda a, n: a / n if n else 0.0  # noqa: E731
        return float(share(total[0], total[1]) - share(total[2], total[3]))

    return metrics.bootstrap_interval([counts], difference, **options)
