"""What ``cellkit train`` and ``cellkit evaluate`` read: a dataset name, an npz or a folder, as train/validation/test.

>>> from cellkit.datasets import parts
>>> data = parts.load_training_data("my_cells/", size=28)        # class subfolders, split 70/10/20
>>> data.train, data.val, data.test, data.split                  # ImageSets and how they were made
>>> nuclei = parts.load_segmentation_data("dsb2018")             # images with instance masks, the split on file

Every split is :func:`cellkit.datasets.stratified_split` (stratified, seeded); bad input is a one-line
:class:`~cellkit.datasets.DataError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellkit.config import DEFAULT_SEED
from cellkit.datasets.containers import ImageSet, SegmentationSet
from cellkit.datasets.loaders import (
    PBC_CROP,
    load_class_folder,
    load_dsb2018,
    load_instance_folder,
    load_npz,
    load_pbc28,
    load_pbc_jpg,
)
from cellkit.datasets.registry import DataError, locate
from cellkit.datasets.splits import dsb2018_split, split_file, stratified_positions, stratified_split

#: Registered datasets ``cellkit train classifier --data`` accepts by name, and the crop that made them.
NAMED_DATA = {"pbc28": 200, "pbc_jpg": 200}


@dataclass
class LabelledData:
    """Training data resolved from ``--data``: the three parts, the crop rule, and where it came from."""

    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    crop: int | None
    source: str
    split: str


def _default_crop(data: str, crop: int | None) -> int | None:
    """``crop`` if given; else the PBC recipe's 200 for the registered PBC data (by name or location)."""
    if crop is not None:
        return crop if crop > 0 else None
    if data in NAMED_DATA:
        return NAMED_DATA[data]
    path = Path(data).resolve()
    for name in NAMED_DATA:
        folder = locate(name)
        if folder is not None and (path == folder.resolve() or path.parent == folder.resolve()):
            return NAMED_DATA[name]
    return None


def load_training_data(data: str, size: int, crop: int | None = None, seed: int = DEFAULT_SEED
                       ) -> LabelledData:
    """Resolve ``data`` into train/validation/test parts of uint8 RGB images.

    ``data`` is ``pbc28`` (its own 70/10/20 split), ``pbc_jpg`` (the original JPEGs, split as PBC-28), a
    MedMNIST-style npz (``train_``/``val_``/``test_`` arrays; without ``val_`` a tenth of train is held out), a
    plain npz with ``images`` and ``labels``, or a folder of class subfolders (optionally with ``labels.csv``).
    Data without splits are split 70/10/20, stratified and seeded. Folders are read at ``size`` with ``crop``.
    ``crop`` None means the PBC recipe's 200 for the PBC data and the largest centred square otherwise.
    """
    crop = _default_crop(data, crop)
    if data == "pbc28":
        parts = [load_pbc28(s) for s in ("train", "val", "test")]
        return LabelledData(*parts, crop=crop, source="pbc28", split="the npz's train/val/test")
    if data == "pbc_jpg":
        parts = pbc_jpg_parts(load_pbc_jpg(size=size, crop=crop or PBC_CROP))
        return LabelledData(*parts, crop=crop, source="pbc_jpg", split="PBC-28's split, by file name")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{data}: no such file or folder, and not a dataset name (pbc28, pbc_jpg)")
    if path.is_dir():
        whole = load_class_folder(path, size=size, crop=crop)
    elif path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
        if "train_images" in keys:
            train = load_npz(path, split="train")
            test = load_npz(path, split="test") if "test_images" in keys else None
            if "val_images" in keys:
                val = load_npz(path, split="val")
                return LabelledData(train, val, test, crop, str(path), "the npz's own splits")
            index = stratified_positions(train.labels, (0.9, 0.1, 0.0), seed)
            return LabelledData(train.subset(index["train"]), train.subset(index["val"]), test, crop, str(path),
                                f"the npz's train split, 90/10 stratified (seed {seed}), and its test split")
        whole = load_npz(path)
    else:
        raise DataError(f"{path}: expected a .npz file or a folder of class subfolders")
    if len(whole) < 10 * len(whole.class_names):
        raise DataError(f"{path}: {len(whole)} images for {len(whole.class_names)} classes is too few to split "
                        "into train/validation/test; give at least 10 per class")
    index = stratified_positions(whole.labels, seed=seed)
    return LabelledData(*(whole.subset(index[p]) for p in ("train", "val", "test")), crop=crop, source=str(path),
                        split=f"70/10/20 stratified, seed {seed}")


def pbc_jpg_parts(whole: ImageSet) -> tuple[ImageSet, ImageSet, ImageSet]:
    """Train/validation/test parts of PBC JPEGs (``load_pbc_jpg``) as PBC-28 is split: each original goes to the
    part its 28x28 copy is in (matched by file name), so no cell is trained on at one size and tested at another.

    Originals without a 28x28 copy (none in the project's data) go to the training part.
    """
    part_of = {Path(f).name: part for part in ("train", "val", "test") for f in load_pbc28(part).files}
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for f in whole.files:
        split[part_of.get(Path(f).name, "train")].append(f)
    train, val, test = _parts_by_id(whole, split)
    return train, val, test


def _parts_by_id(whole: ImageSet, split: dict[str, list[str]]) -> list[ImageSet]:
    position = {f: i for i, f in enumerate(whole.files)}
    return [whole.subset(sorted(position[f] for f in split[part])) for part in ("train", "val", "test")]


def load_evaluation_data(data: str, class_names: Sequence[str], size: int, crop: int | None, split: str = "test",
                         on_error: Callable[[Path, str], None] | None = None) -> ImageSet:
    """Labelled images from ``data`` for a model of ``class_names`` that takes ``size`` x ``size`` inputs cut with
    ``crop`` (its :class:`~cellkit.classifiers.ModelInfo`), labels renumbered to the model's classes.

    ``data``: ``pbc28`` (its ``split``), ``pbc_jpg`` (its ``split`` part, as PBC-28's), a MedMNIST-style npz
    (``split``), a plain npz, or a folder of class subfolders. Class names found in the data are matched to the
    model's by name; bare class ids must lie within the model's classes. A label outside them is a DataError.
    ``on_error``: in a folder, an unreadable image is left out and reported as ``on_error(file, message)``
    (:func:`~cellkit.datasets.load_class_folder`); None: it is a DataError.
    """
    if data == "pbc28":
        found = load_pbc28(split)
    elif data == "pbc_jpg":
        parts = load_training_data("pbc_jpg", size, crop)
        return {"train": parts.train, "val": parts.val, "test": parts.test}[split]
    else:
        path = Path(data)
        if path.is_dir():
            found = load_class_folder(path, size=size, crop=crop, on_error=on_error)
        elif path.suffix.lower() == ".npz" or path.is_file():
            found = load_npz(path, split=_npz_split(path, split), class_names=list(class_names))
        else:
            raise DataError(f"{data}: no such file or folder, and not a dataset name (pbc28, pbc_jpg)")
    return align_classes(found, class_names)


def _npz_split(path: Path, split: str) -> str | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return None if "images" in archive.files else split
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from None


def align_classes(data: ImageSet, class_names: Sequence[str]) -> ImageSet:
    """``data`` with labels renumbered to positions in ``class_names``, matching names (case-insensitive).

    Data whose names are the generic ``class_0``, ``class_1`` ... keep their ids (which must be < k).
    """
    names = list(class_names)
    generic = [f"class_{i}" for i in range(len(data.class_names))]
    if data.class_names == generic or data.class_names == names:
        if len(data.labels) and data.labels.max() >= len(names):
            raise DataError(f"{data.source}: label {int(data.labels.max())} is outside the model's {len(names)} "
                            f"classes (0..{len(names) - 1})")
        return ImageSet(data.images, data.labels, names, data.files, data.source)
    lookup = {n.lower(): i for i, n in enumerate(names)}
    used = {data.class_names[i] for i in np.unique(data.labels)}
    unknown = sorted(n for n in used if n.lower() not in lookup)
    if unknown:
        raise DataError(f"{data.source}: class {unknown[0]!r} is not one of the model's classes "
                        f"({', '.join(names)})")
    mapping = np.array([lookup.get(n.lower(), -1) for n in data.class_names])
    return ImageSet(data.images, mapping[data.labels], names, data.files, data.source)


@dataclass
class SegmentationData:
    """Training data resolved from ``cellkit train unet --data``: the three parts and how they were made."""

    train: SegmentationSet
    val: SegmentationSet
    test: SegmentationSet
    source: str
    split: str


def load_segmentation_data(data: str, seed: int = DEFAULT_SEED) -> SegmentationData:
    """Images with instance masks for U-Net training, split into train/validation/test.

    ``data`` is ``dsb2018`` (or its folder: the split kept on file, 70/10/20 stratified on image size) or any
    folder with ``images/`` and ``labels/`` (or ``masks/``) of files matched by stem, split 70/10/20 (stratified
    on image size, seeded; at least one validation and one test image). Bad files are one-line DataErrors.
    """
    dsb = locate("dsb2018")
    if data == "dsb2018" or (dsb is not None and Path(data).exists() and Path(data).resolve() == dsb.resolve()):
        split = dsb2018_split(seed)
        parts = [load_dsb2018(split[p]) for p in ("train", "val", "test")]
        return SegmentationData(*parts, source="dsb2018", split=f"70/10/20 stratified on size group, seed {seed}, "
                                f"{split_file('dsb2018', seed).name}")
    path = Path(data)
    if not path.exists():
        raise DataError(f"{data}: no such folder, and not a dataset name (dsb2018)")
    whole = load_instance_folder(path)
    n = len(whole)
    if n < 3:
        raise DataError(f"{path}: {n} image(s) is too few to split into train/validation/test; give at least 3")
    groups = [f"{image.shape[0]}x{image.shape[1]}" for image in whole.images]
    split = stratified_split(whole.ids, groups, seed=seed)
    how = f"70/10/20 stratified on image size, seed {seed}" if n >= 10 else \
        f"{len(split['train'])}/{len(split['val'])}/{len(split['test'])} images, seeded ({seed})"
    whole.groups = groups
    parts = [whole.select(sorted(split[p])) for p in ("train", "val", "test")]
    return SegmentationData(*parts, source=str(path), split=how)
