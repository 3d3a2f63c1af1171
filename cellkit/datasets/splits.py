"""Seeded, stratified splits, written to a file so that every notebook and command uses the same one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from cellkit import config
from cellkit.datasets.registry import DataError

#: Fractions of the train, validation and test parts.
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def stratified_split(
    ids: list[str],
    groups: list[str],
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = config.DEFAULT_SEED,
) -> dict[str, list[str]]:
    """Split ``ids`` into train/val/test with each group's share kept in every part.

    Groups too small to appear in all three parts (fewer than ``ceil(1 / min fraction)`` members) are
    pooled into one ``"rare"`` stratum first, so that no group makes stratification impossible.
    Returns ``{"train": [...], "val": [...], "test": [...]}``, each list sorted.
    """
    if len(ids) != len(groups):
        raise ValueError(f"{len(ids)} ids but {len(groups)} groups")
    if not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    strata = _pool_rare_groups(groups, min_size=int(np.ceil(1 / min(fractions))))
    train_frac, val_frac, test_frac = fractions
    rest_ids, test_ids, rest_strata, _ = train_test_split(
        ids, strata, test_size=test_frac, stratify=strata, random_state=seed
    )
    rest_strata = _pool_rare_groups(rest_strata, min_size=int(np.ceil((train_frac + val_frac) / val_frac)))
    train_ids, val_ids = train_test_split(
        rest_ids, test_size=val_frac / (train_frac + val_frac), stratify=rest_strata, random_state=seed
    )
    return {"train": sorted(train_ids), "val": sorted(val_ids), "test": sorted(test_ids)}


def _pool_rare_groups(groups: list[str], min_size: int) -> list[str]:
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
    from cellkit.datasets.loaders import load_dsb2018_manifest

    manifest = load_dsb2018_manifest()
    return saved_split("dsb2018", manifest["image_id"].tolist(), manifest["size_group"].tolist(), seed)
