"""Project paths, environment overrides, seeding, and JSON encoding of numpy values.

Every path the package uses comes from here, never from the working directory, so that a notebook,
the command line and the tests find the same files wherever they are started from.

Environment variables
---------------------
``CELLKIT_DATA_DIR``
    A folder holding the datasets (``pbc_blood_28/``, ``pbc_blood_jpg/``, ``dsb2018_fluo/``). Searched
    before the project's own ``data/`` folder. CI points it at a read-only copy of the real data.
``CELLKIT_CACHE_DIR``
    Where downloads and derived caches go (default ``data/`` inside the project, or the user cache
    folder when the package is installed outside a checkout).
``CELLKIT_DOWNLOAD_MIRROR``
    A base URL serving the same archive names as the public sources; ``cellkit data fetch`` then downloads
    from it (an institutional mirror, or a local server in the tests).
``CELLKIT_FIGURES_DIR``
    Where notebooks write figures and ``metrics.json`` (default ``figures/`` in the project; smoke runs in
    its ``smoke/`` subfolder).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
DEFAULT_SEED = 42


def env_path(name: str) -> Path | None:
    """The folder the environment variable ``name`` names (``~`` expanded, made absolute), or None when unset."""
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser().resolve() if value else None


def is_checkout() -> bool:
    """True when the package runs from a project checkout (editable install), not from site-packages."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "notebooks").is_dir()


def project_data_dir() -> Path:
    """The project's own ``data/`` folder, where ``cellkit data fetch`` builds datasets by default."""
    override = env_path("CELLKIT_CACHE_DIR")
    if override is not None:
        return override
    if is_checkout():
        return PROJECT_ROOT / "data"
    return Path.home() / ".cache" / "cellkit"


def data_search_dirs() -> list[Path]:
    """Folders searched for a dataset, in order: ``$CELLKIT_DATA_DIR``, then the project's ``data/``."""
    dirs = []
    env_dir = env_path("CELLKIT_DATA_DIR")
    if env_dir is not None:
        dirs.append(env_dir)
    dirs.append(project_data_dir())
    return dirs


#: The notebooks' parameter profiles, from quickest to fullest (``notebooks/profiles.yml`` holds their overrides).
PROFILES = ("smoke", "default", "full")

#: Profiles whose runs only check that the code runs: their figures go to ``figures/<profile>/<notebook>/``
#: so that they never replace the figures and numbers of a ``default`` or ``full`` run.
CHECK_PROFILES = ("smoke",)


def figures_dir(notebook: str | None = None, profile: str | None = None) -> Path:
    """Where figures go: ``figures/``, ``figures/<notebook>/`` (e.g. ``figures/01_eda``), or for a smoke run
    ``figures/smoke/<notebook>/``; ``default`` and ``full`` runs share ``figures/<notebook>/``."""
    root = env_path("CELLKIT_FIGURES_DIR") or PROJECT_ROOT / "figures"
    if profile in CHECK_PROFILES:
        root = root / profile
    return root / notebook if notebook else root


def notebooks_dir() -> Path:
    """The folder of numbered notebooks and ``profiles.yml``."""
    return PROJECT_ROOT / "notebooks"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``), sorted; ``only`` keeps those whose number or stem match."""
    paths = sorted(p for p in notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if only:
        wanted = {w.removesuffix(".ipynb") for w in only}
        paths = [p for p in paths if p.stem in wanted or p.stem[:2] in wanted]
        if not paths:
            raise ValueError(f"no notebook matches {', '.join(only)}; see notebooks/ for the numbers")
    return paths


def executed_dir(profile: str) -> Path:
    """Where executed copies of the notebooks go (git-ignored): ``notebooks/executed/<profile>/``."""
    return notebooks_dir() / "executed" / profile


def models_dir() -> Path:
    """Where ``cellkit train`` and ``make models`` put trained models by default."""
    return PROJECT_ROOT / "models"


def seed_everything(seed: int = DEFAULT_SEED) -> np.random.Generator:
    """Seed Python's, NumPy's and (if already imported) Keras' random generators.

    Returns a fresh ``numpy.random.Generator`` seeded with ``seed`` for code that takes one explicitly.
    Keras is seeded only when it has been imported already, so calling this never pays the import cost
    of TensorFlow.
    """
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds code (and libraries) that still use the legacy global state
    os.environ["PYTHONHASHSEED"] = str(seed)
    if "keras" in sys.modules:
        sys.modules["keras"].utils.set_random_seed(seed)
    return np.random.default_rng(seed)


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, and paths, as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def to_json(value: Any) -> str:
    """``value`` as indented JSON text ending in a newline, numpy values and paths included (:func:`json_default`)."""
    return json.dumps(value, indent=2, default=json_default) + "\n"
