"""Multi-label views of class labels: a label space says which classes carry each label.

Report 004 turned composite HEp-2 classes into labels; PBC's eight cell types carry haematological labels
the same way (an immature granulocyte is a granulocyte, of the myeloid lineage, immature and nucleated).

>>> from cellkit.datasets.labels import PBC_LABEL_SPACE, multilabel_targets
>>> y = multilabel_targets(train.labels, train.class_names, PBC_LABEL_SPACE)   # (n, 5) uint8
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cellkit.datasets.registry import DataError

#: Label -> the PBC classes that carry it. Granulocytes: cells with granules (immature ones included);
#: mononuclear: the mononuclear leukocytes; myeloid: every lineage from the common myeloid progenitor (all but
#: lymphocytes); immature: precursors normally absent from blood; nucleated: all but platelets (cell fragments).
PBC_LABEL_SPACE: dict[str, tuple[str, ...]] = {
    "granulocyte": ("basophil", "eosinophil", "ig", "neutrophil"),
    "mononuclear": ("lymphocyte", "monocyte"),
    "myeloid": ("basophil", "eosinophil", "erythroblast", "ig", "monocyte", "neutrophil", "platelet"),
    "immature": ("erythroblast", "ig"),
    "nucleated": ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil"),
}


def label_matrix(class_names: Sequence[str], label_space: Mapping[str, Sequence[str]]) -> np.ndarray:
    """(k classes, L labels) bool: entry (c, j) is True when class c carries label j (in ``label_space`` order).

    A class named in ``label_space`` but absent from ``class_names`` is a :class:`DataError` (a typo would
    otherwise silently empty a label); a label carried by no class, or by every class, too (no ROC curve).
    """
    names = [str(c) for c in class_names]
    matrix = np.zeros((len(names), len(label_space)), dtype=bool)
    for j, (label, members) in enumerate(label_space.items()):
        unknown = sorted(set(members) - set(names))
        if unknown:
            raise DataError(f"label {label!r} names classes not in the data: {', '.join(unknown)}")
        matrix[[names.index(m) for m in members], j] = True
        if matrix[:, j].all() or not matrix[:, j].any():
            raise DataError(f"label {label!r} is carried by {'every' if matrix[:, j].all() else 'no'} class")
    return matrix


def multilabel_targets(labels: Sequence[int], class_names: Sequence[str],
                       label_space: Mapping[str, Sequence[str]]) -> np.ndarray:
    """0/1 targets (n, L) uint8 for class indices ``labels`` (n,): row i is the label row of class labels[i]."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (len(labels) and (labels.min() < 0 or labels.max() >= len(class_names))):
        raise DataError(f"labels must be class indices 0..{len(class_names) - 1} in one dimension")
    return label_matrix(class_names, label_space)[labels].astype(np.uint8)


def label_scores_from_classes(proba: np.ndarray, class_names: Sequence[str],
                              label_space: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Label scores (n, L) from class probabilities (n, k): the probability mass of the classes carrying each
    label (what a multi-class model says about the labels, for comparison with dedicated heads)."""
    return np.asarray(proba, dtype=np.float64) @ label_matrix(class_names, label_space).astype(np.float64)
