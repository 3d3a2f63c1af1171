"""One registry of the project's datasets: where each is looked for, how to tell it is there, its licence.

Resolution order for a dataset: ``$CELLKIT_DATA_DIR/<folder>``, then the project's ``data/<folder>``
(where ``cellkit data fetch`` builds it). Notebooks fall back to ``cellkit.synthetic`` only after both,
and say so loudly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cellkit import config


class DataError(ValueError):
    """Bad or missing input data. The message is one line that names the file and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a one-line report shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class DatasetNotFound(DataError):
    """A registered dataset is in none of the searched folders."""


@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset.

    ``folder`` is its folder name inside a data directory; ``marker`` a file inside that folder whose
    presence means the dataset is complete; ``fetch_name`` the name ``cellkit data fetch`` takes.
    """

    name: str
    folder: str
    marker: str
    title: str
    licence: str
    citation: str
    source_url: str
    fetch_name: str


PBC_CITATION = (
    "Acevedo A. et al., A dataset of microscopic peripheral blood cell images for development of automatic "
    "recognition systems, Data in Brief 30:105474 (2020), doi:10.1016/j.dib.2020.105474; "
    "Mendeley Data doi:10.17632/snkd93bnjr.1"
)

REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            name="pbc28",
            folder="pbc_blood_28",
            marker="pbc_blood_28.npz",
            title="PBC blood cells, 8 classes, 28x28 RGB (BloodMNIST recipe), stratified 70/10/20 split",
            licence="CC BY 4.0",
            citation=PBC_CITATION,
            source_url="https://data.mendeley.com/datasets/snkd93bnjr/1",
            fetch_name="pbc",
        ),
        DatasetInfo(
            name="pbc_jpg",
            folder="pbc_blood_jpg",
            marker="labels.csv",
            title="PBC blood cells, original 360x363 JPEGs in class folders with labels.csv",
            licence="CC BY 4.0",
            citation=PBC_CITATION,
            source_url="https://data.mendeley.com/datasets/snkd93bnjr/1",
            fetch_name="pbc",
        ),
        DatasetInfo(
            name="dsb2018",
            folder="dsb2018_fluo",
            marker="manifest.csv",
            title="2018 Data Science Bowl stage1_train, fluorescence images with uint16 instance labels",
            licence="CC0 1.0 (public domain)",
            citation=(
                "Caicedo J.C. et al., Nucleus segmentation across imaging experiments: the 2018 Data Science "
                "Bowl, Nature Methods 16:1247-1253 (2019), doi:10.1038/s41592-019-0612-7"
            ),
            source_url="https://bbbc.broadinstitute.org/BBBC038",
            fetch_name="dsb2018",
        ),
    ]
}

FETCH_NAMES = sorted({info.fetch_name for info in REGISTRY.values()})


def info(name: str) -> DatasetInfo:
    """The registry entry for ``name``; a one-line error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(REGISTRY)}") from None


def locate(name: str) -> Path | None:
    """The folder holding dataset ``name``, or None when no searched folder has it complete."""
    entry = info(name)
    for base in config.data_search_dirs():
        folder = base / entry.folder
        if (folder / entry.marker).is_file():
            return folder
    return None


def require(name: str) -> Path:
    """Like :func:`locate`, but raise :class:`DatasetNotFound` with what to do when it is missing."""
    folder = locate(name)
    if folder is None:
        entry = info(name)
        searched = ", ".join(str(d / entry.folder) for d in config.data_search_dirs())
        raise DatasetNotFound(
            f"dataset {name!r} not found (looked in {searched}); run `cellkit data fetch {entry.fetch_name}` "
            f"or set CELLKIT_DATA_DIR to a folder that holds {entry.folder}/"
        )
    return folder
