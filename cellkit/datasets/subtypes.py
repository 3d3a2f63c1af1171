"""PBC sub-types, read from the file names: labels that no model in this project is trained on.

The PBC dataset (Acevedo et al. 2020) names each file after its cell's finer type: the immature granulocytes
(class ``ig``) are metamyelocytes (``MMY_...jpg``), myelocytes (``MY_``) and promyelocytes (``PMY_``), the
neutrophils band (``BNE_``) and segmented (``SNE_``) neutrophils. Files named after the class itself (``IG_``,
``NEUTROPHIL_``) carry no sub-type. The PBC-28 npz and the JPEG folder keep those names (``ig/MY_12345.jpg``), so
report 004's question, whether clusters find sub-types nobody labelled, can be scored here.

>>> cells = subtype_set(datasets.load_pbc28("test"), "ig")   # ImageSet: labels are sub-type ids
>>> cells.class_names                                          # ['MMY', 'MY', 'PMY']
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from cellkit.datasets.containers import ImageSet
from cellkit.datasets.registry import DataError

#: Class -> its sub-type codes, as the file names spell them (sorted; the position is the sub-type id).
PBC_SUBTYPES: dict[str, tuple[str, ...]] = {
    "ig": ("MMY", "MY", "PMY"),
    "neutrophil": ("BNE", "SNE"),
}

#: What each code stands for.
SUBTYPE_NAMES: dict[str, str] = {
    "MMY": "metamyelocyte", "MY": "myelocyte", "PMY": "promyelocyte",
    "BNE": "band neutrophil", "SNE": "segmented neutrophil",
}


def subtype_code(file: str) -> str:
    """The prefix of a PBC file's base name before the first ``_`` (``ig/MMY_1.jpg`` -> ``MMY``), upper case;
    empty when the name has no ``_``."""
    name = PurePosixPath(str(file).replace("\\", "/")).name
    prefix, underscore, _ = name.partition("_")
    return prefix.upper() if underscore else ""


def subtype_set(data: ImageSet, class_name: str) -> ImageSet:
    """The cells of ``class_name`` in ``data`` whose file name carries a sub-type of :data:`PBC_SUBTYPES`, as an
    ImageSet whose labels are sub-type ids and whose ``class_names`` are the codes (``MMY``, ``MY``, ``PMY``).

    Cells named after the class only (``IG_``, ``NEUTROPHIL_``) are left out: their sub-type is unknown. A
    DataError when the class has no sub-types here, or when no cell of it has a sub-type in its name (a set
    without file names, such as the synthetic stand-in).
    """
    if class_name not in PBC_SUBTYPES:
        raise DataError(f"no sub-types known for class {class_name!r}; use one of {', '.join(PBC_SUBTYPES)}")
    if class_name not in data.class_names:
        raise DataError(f"class {class_name!r} is not in the data (classes: {', '.join(data.class_names)})")
    codes = PBC_SUBTYPES[class_name]
    in_class = data.labels == data.class_names.index(class_name)
    found = np.array([subtype_code(f) for f in data.files])
    keep = np.flatnonzero(in_class & np.isin(found, codes))
    if not len(keep):
        raise DataError(f"no {class_name} cell of {data.source or 'the data'} has a sub-type in its file name "
                        f"({', '.join(codes)}_...); the real PBC files are needed")
    cells = data.subset(keep)
    return ImageSet(cells.images, np.array([codes.index(c) for c in found[keep]], np.int64), list(codes),
                    cells.files, cells.source)
