"""Datasets: one registry, loaders that return numpy arrays, seeded splits kept on file, and downloads.

>>> from cellkit import datasets
>>> train = datasets.load_pbc28("train")            # ImageSet, images (11965, 28, 28, 3) uint8
>>> cells = datasets.load_pbc_jpg(size=48)           # original JPEGs, centre crop + bicubic resize
>>> split = datasets.dsb2018_split()                 # {"train": ids, "val": ids, "test": ids}
>>> nuclei = datasets.load_dsb2018(split["test"])    # SegmentationSet, images + uint16 instance labels
>>> whole, groups = datasets.drop_duplicates(whole)  # before any split: one copy of each pixel-identical image
>>> datasets.assert_disjoint(source, target)         # no shared file name, no pixel-identical image
>>> ig = datasets.subtype_set(test, "ig")            # PBC sub-types from the file names (MMY, MY, PMY)

Every split in the project is :func:`stratified_split` (``datasets/splits.py``). What ``cellkit train`` and
``cellkit evaluate`` read (a dataset name, an npz or a folder, as train/validation/test) is
:func:`load_training_data`, :func:`load_evaluation_data` and :func:`load_segmentation_data` (``datasets/parts.py``).
"""

from cellkit.datasets.containers import ImageSet, SegmentationSet
from cellkit.datasets.duplicates import (
    Overlap,
    assert_disjoint,
    disjoint_parts,
    drop_duplicates,
    duplicate_groups,
    overlap,
    pixel_hash,
    without,
)
from cellkit.datasets.loaders import (
    centre_crop_resize,
    decode_image,
    load_class_folder,
    load_dsb2018,
    load_dsb2018_manifest,
    load_instance_folder,
    load_npz,
    load_pbc28,
    load_pbc_jpg,
    read_image,
    to_grey,
    to_rgb,
)
from cellkit.datasets.parts import (
    LabelledData,
    SegmentationData,
    align_classes,
    load_evaluation_data,
    load_segmentation_data,
    load_training_data,
    pbc_jpg_parts,
)
from cellkit.datasets.registry import (
    REGISTRY,
    DataError,
    DatasetInfo,
    DatasetNotFound,
    first_line,
    info,
    locate,
    require,
)
from cellkit.datasets.splits import (
    dsb2018_split,
    per_class,
    sample,
    saved_split,
    split_file,
    split_of,
    stratified_positions,
    stratified_split,
)
from cellkit.datasets.subtypes import PBC_SUBTYPES, SUBTYPE_NAMES, subtype_code, subtype_set

__all__ = [
    "PBC_SUBTYPES",
    "REGISTRY",
    "SUBTYPE_NAMES",
    "Overlap",
    "assert_disjoint",
    "disjoint_parts",
    "drop_duplicates",
    "duplicate_groups",
    "overlap",
    "pixel_hash",
    "subtype_code",
    "subtype_set",
    "without",
    "DataError",
    "first_line",
    "DatasetInfo",
    "DatasetNotFound",
    "LabelledData",
    "SegmentationData",
    "ImageSet",
    "align_classes",
    "SegmentationSet",
    "centre_crop_resize",
    "decode_image",
    "dsb2018_split",
    "info",
    "load_class_folder",
    "load_dsb2018",
    "load_dsb2018_manifest",
    "load_evaluation_data",
    "load_instance_folder",
    "load_npz",
    "load_pbc28",
    "load_pbc_jpg",
    "load_segmentation_data",
    "load_training_data",
    "locate",
    "pbc_jpg_parts",
    "read_image",
    "require",
    "per_class",
    "sample",
    "saved_split",
    "split_file",
    "split_of",
    "stratified_positions",
    "stratified_split",
    "to_grey",
    "to_rgb",
]
