"""The two shapes of data the project passes around: labelled images and images with instance masks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    """Labelled images for classification.

    Attributes
    ----------
    images : uint8 array, shape (n, height, width, 3) for RGB or (n, height, width) for grey.
    labels : int array, shape (n,), class ids indexing ``class_names``.
    class_names : the class names, position = class id.
    files : source file of each image (relative path or name), or empty strings when unknown.
    source : where the data came from: the dataset name, a path, or ``"synthetic"``.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if not self.files:
            self.files = [""] * len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"

    def class_counts(self) -> dict[str, int]:
        """Number of images per class name, in class-id order."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts, strict=True)}

    def subset(self, index: np.ndarray | list[int]) -> ImageSet:
        """The images at ``index`` (integer positions or a boolean mask), same class names."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index],
            class_names=list(self.class_names),
            files=[self.files[i] for i in index],
            source=self.source,
        )


@dataclass
class SegmentationSet:
    """Images with instance masks, possibly of different sizes.

    Attributes
    ----------
    images : list of 2-D arrays (height, width), uint8 or uint16 grey.
    labels : list of 2-D uint16/int arrays of the same shapes: 0 background, 1..N one id per object.
    ids : one name per image (file stem).
    source : the dataset name, a path, or ``"synthetic"``.
    groups : optional group of each image (e.g. DSB ``size_group``), same length as ``ids``.
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    ids: list[str]
    source: str = ""
    groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.labels) == len(self.ids)):
            raise ValueError(
                f"{len(self.images)} images, {len(self.labels)} label images, {len(self.ids)} ids"
            )
        for image, label, name in zip(self.images, self.labels, self.ids, strict=True):
            if image.shape[:2] != label.shape[:2]:
                raise ValueError(
                    f"{name}: image is {image.shape[:2]} but its labels are {label.shape[:2]}"
                )
        if not self.groups:
            self.groups = [""] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_synthetic(self) -> bool:
        return self.source == "synthetic"

    def subset(self, index: np.ndarray | list[int]) -> SegmentationSet:
        """The images at integer positions ``index``."""
        index = [int(i) for i in np.asarray(index)]
        return SegmentationSet(
            images=[self.images[i] for i in index],
            labels=[self.labels[i] for i in index],
            ids=[self.ids[i] for i in index],
            source=self.source,
            groups=[self.groups[i] for i in index],
        )

    def select(self, ids: list[str]) -> SegmentationSet:
        """The images whose id is in ``ids``, in the order of ``ids``."""
        position = {name: i for i, name in enumerate(self.ids)}
        missing = [name for name in ids if name not in position]
        if missing:
            raise KeyError(f"{len(missing)} ids not in this set, e.g. {missing[0]}")
        return self.subset([position[name] for name in ids])
