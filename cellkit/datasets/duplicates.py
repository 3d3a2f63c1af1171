"""Pixel-identical images: find them, drop them before a split, and prove two sets share no image.

Two images are the same image when their pixels are equal (same shape, dtype and values): a file copied under
another name, or two originals that became equal after resizing. An image kept twice can land on both sides of a
split, and a test score on it is a training score. Report 004 was transfer learning: its source and target had to
be different images, which was never checked.

>>> data, groups = drop_duplicates(whole)          # before any split: one copy of each image kept
>>> assert_disjoint(source, target, ("source", "target"))   # DataError naming the shared files, if any
>>> parts, removed = disjoint_parts({"train": train, "val": val, "test": test})   # a split kept on file, cleaned

Works on any set with ``images`` (a stack or a list of arrays of any shape) and ``files`` (ImageSet) or ``ids``
(SegmentationSet); a name that is an empty string (unknown) is never counted as shared.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from cellkit.datasets.registry import DataError


def pixel_hash(image: np.ndarray) -> str:
    """A 32-hex-digit digest (BLAKE2b) of one image's shape, dtype and pixel values: equal for equal pixels."""
    array = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.shape}|{array.dtype.str}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def pixel_hashes(images: Any) -> list[str]:
    """:func:`pixel_hash` of every image of a stack (n, ...) or a list of arrays, in order."""
    return [pixel_hash(image) for image in images]


def file_names(data: Any) -> list[str]:
    """The base name of each item's file (``ig/MY_1.jpg`` -> ``MY_1.jpg``; ``files`` of an ImageSet, else ``ids``);
    empty where unknown. Base names, because the same file can sit under two class folders."""
    names = getattr(data, "files", None) or getattr(data, "ids", None) or [""] * len(data.images)
    return [PurePosixPath(str(name).replace("\\", "/")).name if name else "" for name in names]


def duplicate_groups(images: Any) -> list[list[int]]:
    """Positions of pixel-identical images, one list per group of two or more, each sorted, groups in order of
    their first member. Empty when every image is unique."""
    positions: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(pixel_hashes(images)):
        positions[digest].append(index)
    return sorted((group for group in positions.values() if len(group) > 1), key=lambda group: group[0])


def drop_duplicates(data: Any) -> tuple[Any, list[list[int]]]:
    """``data`` with one copy of each pixel-identical image (the first), and the :func:`duplicate_groups` found
    (positions in ``data``). Call it on the whole set before splitting it, so no image is on both sides."""
    groups = duplicate_groups(data.images)
    dropped = {index for group in groups for index in group[1:]}
    if not dropped:
        return data, groups
    return data.subset(np.array([i for i in range(len(data.images)) if i not in dropped], np.int64)), groups


@dataclass(frozen=True)
class Overlap:
    """What two sets share: ``files`` as (position in a, position in b, base name) and ``pixels`` as
    (position in a, position in b) pairs of pixel-identical images."""

    files: list[tuple[int, int, str]]
    pixels: list[tuple[int, int]]

    @property
    def disjoint(self) -> bool:
        return not self.files and not self.pixels

    def positions_in_b(self) -> list[int]:
        """Sorted positions in the second set of every item it shares with the first, by file or by pixels."""
        return sorted({j for _, j, _ in self.files} | {j for _, j in self.pixels})


def overlap(a: Any, b: Any) -> Overlap:
    """The files (same base name) and the pixel-identical images that sets ``a`` and ``b`` have in common."""
    by_name: dict[str, list[int]] = defaultdict(list)
    for i, name in enumerate(file_names(a)):
        if name:
            by_name[name].append(i)
    files = [(i, j, name) for j, name in enumerate(file_names(b)) if name for i in by_name.get(name, [])]
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, digest in enumerate(pixel_hashes(a.images)):
        by_hash[digest].append(i)
    pixels = [(i, j) for j, digest in enumerate(pixel_hashes(b.images)) for i in by_hash.get(digest, [])]
    return Overlap(files, pixels)


def assert_disjoint(a: Any, b: Any, names: tuple[str, str] = ("the first set", "the second set")) -> Overlap:
    """Prove that ``a`` and ``b`` share no file and no pixel-identical image; return the (empty) :class:`Overlap`.

    Raises a one-line :class:`DataError` naming how many they share and an example otherwise.
    """
    found = overlap(a, b)
    if found.disjoint:
        return found
    a_names, b_names = file_names(a), file_names(b)
    example = (f"file {found.files[0][2]!r}" if found.files else
               f"pixels of {a_names[found.pixels[0][0]] or found.pixels[0][0]!r} and "
               f"{b_names[found.pixels[0][1]] or found.pixels[0][1]!r}")
    raise DataError(f"{names[0]} and {names[1]} are not disjoint: {len(found.files)} shared file(s), "
                    f"{len(found.pixels)} pixel-identical pair(s), e.g. {example}")


def without(data: Any, other: Any) -> Any:
    """The items of ``data`` that share neither a file nor pixels with ``other`` (e.g. test cells whose copy is in
    the training set), in their order; ``data`` itself when it shares nothing."""
    shared = set(overlap(other, data).positions_in_b())
    if not shared:
        return data
    return data.subset(np.array([i for i in range(len(data.images)) if i not in shared], np.int64))


def disjoint_parts(parts: Mapping[str, Any], order: Sequence[str] = ("train", "val", "test")
                   ) -> tuple[dict[str, Any], dict[str, int]]:
    """The parts of a split made disjoint and free of duplicates, and how many items each part lost.

    Parts are taken in ``order``. From each part, the items that share a file (base name) or their pixels with any
    item of an earlier part (as given, before its own duplicates were dropped) are removed, and then one copy of
    each pixel-identical group within the part is kept (its first). So a cell filed twice stays in the earliest
    part that holds it, once, and the test part, last, never scores an image a model saw in training. The result
    is checked with :func:`assert_disjoint` for every pair of parts; items keep their order. A split kept on file
    is not changed: call this on its parts wherever they are read.

    ``parts``: one set per name of ``order`` (ImageSet or SegmentationSet, see the module docstring); no other
    names. Returns (the cleaned parts in ``order``, each the very object given when it lost nothing; the number of
    items removed from each part).

    >>> parts, removed = disjoint_parts({"train": train, "val": val, "test": test})   # PBC-28's saved split
    >>> removed
    {'train': 8, 'val': 5, 'test': 3}
    >>> train, val, test = parts["train"], parts["val"], parts["test"]
    """
    if sorted(parts) != sorted(order) or len(set(order)) != len(order):
        raise ValueError(f"parts {sorted(parts)} do not match the order {list(order)}")
    cleaned: dict[str, Any] = {}
    removed: dict[str, int] = {}
    for position, name in enumerate(order):
        rest = parts[name]
        for earlier in order[:position]:
            rest = without(rest, parts[earlier])
        cleaned[name], _ = drop_duplicates(rest)
        removed[name] = len(parts[name].images) - len(cleaned[name].images)
    for position, first in enumerate(order):
        for second in order[position + 1:]:
            assert_disjoint(cleaned[first], cleaned[second], (f"the {first} part", f"the {second} part"))
    return cleaned, removed
