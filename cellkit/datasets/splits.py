"""Seeded, stratified splits, written to a file so that every notebook and command uses the same one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellkit import config
from cellkit.datasets.loaders import load_dsb2018_manifest
from cellkit.datasets.registry import DataError

#: Fractions of the train, validation and test parts.
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def stratified_split(
    ids: Sequence[Hashable],
    groups: Sequence[Hashable],
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = config.DEFAULT_SEED,
) -> dict[str, list]:
    """Split ``ids`` into train/val/test with each group's share kept in every part: the one split the project
    uses (the DSB split on file, PBC-28 built from the originals, the data ``cellkit train`` reads).

    Part sizes are whole counts of the total, ``round(n * fraction)`` for test and validation (so that float
    shares cannot round a part up by one); a test fraction of 0 gives an empty test part. Groups too small to
    appear in every part (fewer than ``ceil(1 / smallest fraction)`` members) are pooled into one ``"rare"``
    stratum first, so that no group makes stratification impossible. Needs at least one id for every part with a
    non-zero fraction. Returns ``{"train": [...], "val": [...], "test": [...]}``, each list sorted.
    """
    if len(ids) != len(groups):
        raise ValueError(f"{len(ids)} ids but {len(groups)} groups")
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0 or not fractions[1] > 0:
        raise ValueError(f"fractions must be (train, val, test) >= 0 with val > 0, summing to 1, got {fractions}")
    ids, groups = list(ids), list(groups)
    n_test, n_val = round(len(ids) * fractions[2]), max(1, round(len(ids) * fractions[1]))
    if fractions[2] > 0:
        n_test = max(1, n_test)
    if len(ids) < n_test + n_val + 1:
        raise DataError(f"{len(ids)} item(s) are too few to split into train/validation/test; give at least "
                        f"{n_test + n_val + 1}")
    positive = [f for f in fractions if f > 0]
    strata = _pool_rare_groups(groups, min_size=int(np.ceil(1 / min(positive))))
    rest_ids, rest_strata, test_ids = ids, strata, []
    if n_test:
        rest_ids, test_ids, rest_strata, _ = _split(ids, strata, n_test, seed)
    rest_strata = _pool_rare_groups(rest_strata, min_size=int(np.ceil((fractions[0] + fractions[1]) / fractions[1])))
    train_ids, val_ids, _, _ = _split(rest_ids, rest_strata, n_val, seed)
    return {"train": sorted(train_ids), "val": sorted(val_ids), "test": sorted(test_ids)}


def _split(ids: list, strata: list, n_held: int, seed: int) -> tuple[list, list, list, list]:
    """(kept ids, held-out ids, their strata): ``n_held`` ids held out, stratified when every stratum can give one."""
    from sklearn.model_selection import train_test_split  # here: importing datasets stays quick (cellkit --help)

    stratify = strata if len(set(strata)) <= min(n_held, len(ids) - n_held) else None
    return train_test_split(ids, strata, test_size=n_held, stratify=stratify, random_state=seed)


def stratified_positions(labels: np.ndarray, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                         seed: int = config.DEFAULT_SEED) -> dict[str, np.ndarray]:
    """:func:`stratified_split` of the positions 0..n-1 of ``labels`` (n,): sorted int64 positions per part."""
    parts = stratified_split(list(range(len(labels))), np.asarray(labels).tolist(), fractions, seed)
    return {part: np.asarray(members, dtype=np.int64) for part, members in parts.items()}


def sample(data: Any, n: int | None, seed: int = config.DEFAULT_SEED) -> Any:
    """At most ``n`` items of ``data`` (an ImageSet or SegmentationSet) drawn with ``seed``, in their original
    order; all of them when ``n`` is None."""
    if n is None:
        return data
    return data.subset(np.sort(np.random.default_rng(seed).permutation(len(data))[:n]))


def per_class(data: Any, n: int | None, seed: int = config.DEFAULT_SEED) -> Any:
    """At most ``n`` images of each class of an ImageSet, chosen with ``seed``, in their original order (None: all)."""
    if n is None:
        return data
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(data.labels == c))[:n] for c in range(len(data.class_names))]
    return data.subset(np.sort(np.concatenate(keep)))


def _pool_rare_groups(groups: list, min_size: int) -> list:
    counts = Counter(groups)
    pooled = [g if counts[g] >= min_size else "rare" for g in groups]
    if 0 < Counter(pooled)["rare"] < min_size:
        # a "rare" stratum that is itself too small joins the largest group
        largest = Counter(groups).most_common(1)[0][0]
        pooled = [largest if g == "rare" else g for g in pooled]
    return pooled


def split_file(dataset: str, seed: int) -> Path:
    """Where the split of ``dataset`` with ``seed`` is kept: ``data/splits/<dataset>_seed<seed>.csv``."""
    return config.project_data_dir() / "splits" / f"{dataset}_seed{seed}.csv"


def saved_split(
    dataset: str, ids: list[str], groups: list[str], seed: int = config.DEFAULT_SEED
) -> dict[str, list[str]]:
    """The split of ``ids`` kept on file for ``dataset`` and ``seed``; made and written on first use.

    The file is a CSV of ``id,group,split``. It is remade when the ids on file differ from ``ids``
    (a dataset with more or fewer images than when the split was made), never silently mixed.
    """
    path = split_file(dataset, seed)
    if path.is_file():
        table = pd.read_csv(path, dtype=str)
        if set(table["id"]) == set(ids):
            return {part: sorted(table.loc[table["split"] == part, "id"]) for part in ("train", "val", "test")}
    parts = stratified_split(ids, groups, seed=seed)
    group_of = dict(zip(ids, groups, strict=True))
    rows = [(i, group_of[i], part) for part, members in parts.items() for i in members]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows, columns=["id", "group", "split"]).to_csv(path, index=False)
    except OSError as error:
        raise DataError(
            f"{path}: cannot write the split file ({error}); set CELLKIT_CACHE_DIR to a writable folder"
        ) from None
    return parts


def dsb2018_split(seed: int = config.DEFAULT_SEED) -> dict[str, list[str]]:
    """The DSB 2018 fluorescence split, 70/10/20 stratified on ``size_group``, kept on file."""
    manifest = load_dsb2018_manifest()
    return saved_split("dsb2018", manifest["image_id"].tolist(), manifest["size_group"].tolist(), seed)


def split_of(data: Any, seed: int = config.DEFAULT_SEED) -> dict[str, list[str]]:
    """The project's split of a loaded DSB SegmentationSet: :func:`dsb2018_split` for the real data, or for the
    synthetic stand-in (which has no split file) its own ids split the same way, stratified on its groups."""
    if getattr(data, "is_synthetic", False):
        return stratified_split(data.ids, data.groups, seed=seed)
    return dsb2018_split(seed)
