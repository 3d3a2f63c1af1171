"""The notebooks' machinery: profiles, the record each notebook writes, and the papermill runner.

A notebook starts a :class:`NotebookRun`, loads its data through it (so the dataset actually used is
recorded, and a synthetic stand-in is announced and stamped on every figure), saves figures through it,
and finishes it, which writes ``figures/<notebook>/metrics.json``.

>>> run = NotebookRun("01_eda", profile="smoke", seed=42)
>>> train = run.load("pbc28", split="train")
>>> run.save_fig(fig, "class_counts")
>>> run.finish(metrics={...}, headline={...})
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cellkit import config, plots, results, runtime
from cellkit.config import executed_dir, notebook_paths  # noqa: F401 - the runner's names
from cellkit.datasets import DatasetNotFound, ImageSet, SegmentationSet

PROFILES = config.PROFILES
#: Packages whose versions every metrics.json records.
RECORDED_PACKAGES = (
    "numpy", "scipy", "pandas", "scikit-learn", "scikit-image", "opencv-python-headless",
    "tensorflow-cpu", "keras", "matplotlib",
)  # fmt: skip


# --- profiles ----------------------------------------------------------------------------------------


def profiles_file() -> Path:
    return config.notebooks_dir() / "profiles.yml"


def load_profiles() -> dict[str, dict[str, dict[str, Any]]]:
    """``{profile: {notebook stem: {parameter: value}}}`` from ``notebooks/profiles.yml``."""
    with open(profiles_file()) as handle:
        profiles = yaml.safe_load(handle) or {}
    unknown = set(profiles) - set(PROFILES)
    if unknown:
        raise ValueError(f"{profiles_file()}: unknown profiles {sorted(unknown)}; use {', '.join(PROFILES)}")
    return {name: (profiles.get(name) or {}) for name in PROFILES}


def profile_parameters(notebook: str, profile: str) -> dict[str, Any]:
    """The parameters papermill injects into ``notebook`` (a stem like ``01_eda``) for ``profile``.

    Always includes ``profile``; the rest are the profile's overrides of the notebook's parameters cell.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    overrides = load_profiles()[profile].get(notebook) or {}
    return {"profile": profile, **overrides}


# --- the record a notebook writes ----------------------------------------------------------------------


class NotebookRun:
    """What one execution of a notebook used and measured; writes ``figures/<notebook>/metrics.json``.

    Parameters
    ----------
    notebook : the notebook's stem, e.g. ``"01_eda"``; its figures go to ``figures/01_eda/``.
    profile : ``smoke``, ``default`` or ``full``; a smoke run writes to ``figures/smoke/01_eda/`` instead, so it
        never replaces the figures and numbers of a default or full run.
    seed : seeds Python, NumPy and Keras (see :func:`cellkit.config.seed_everything`).
    parameters : the notebook's parameters, recorded as they were.
    allow_synthetic : if False, a missing dataset raises instead of falling back to synthetic data.
    """

    def __init__(
        self,
        notebook: str,
        profile: str = "default",
        seed: int = config.DEFAULT_SEED,
        parameters: dict[str, Any] | None = None,
        allow_synthetic: bool = True,
    ) -> None:
        self.notebook = notebook
        self.profile = profile
        self.seed = seed
        self.parameters = dict(parameters or {})
        self.allow_synthetic = allow_synthetic
        self.figures_dir = config.figures_dir(notebook, profile)
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        self.datasets: dict[str, dict[str, Any]] = {}
        self.splits: dict[str, Any] = {}
        self.figures: list[str] = []
        self.rng = config.seed_everything(seed)
        self._started = time.perf_counter()
        self._started_at = datetime.now(UTC)

    @property
    def synthetic(self) -> bool:
        """True when any dataset this run uses is the synthetic stand-in."""
        return any(d["synthetic"] for d in self.datasets.values())

    def load(self, name: str, stand_in: Callable[[], ImageSet | SegmentationSet] | None = None,
             **loader_kwargs: Any) -> ImageSet | SegmentationSet:
        """Load registered dataset ``name`` with its loader, recording what was used.

        ``name`` is ``pbc28`` (kwargs: ``split``), ``pbc_jpg`` (``size``, ``per_class``) or ``dsb2018``
        (``ids``). When the dataset is not found, ``stand_in`` (default: a matching generator of
        :mod:`cellkit.synthetic`) makes simulated data instead, with a loud warning, and every later figure
        is stamped; with ``allow_synthetic=False`` the not-found error is raised.
        """
        from cellkit import datasets

        loaders = {"pbc28": datasets.load_pbc28, "pbc_jpg": datasets.load_pbc_jpg, "dsb2018": datasets.load_dsb2018}
        if name not in loaders:
            raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(loaders)}")
        key = f"{name}:{loader_kwargs['split']}" if "split" in loader_kwargs else name
        try:
            data = loaders[name](**loader_kwargs)
            self.datasets[key] = {"name": name, "synthetic": False, "path": str(datasets.locate(name)),
                                  "n": len(data)}
        except DatasetNotFound as error:
            if not self.allow_synthetic:
                raise
            data = (stand_in or _default_stand_in(name, loader_kwargs, self.seed))()
            self.datasets[key] = {"name": name, "synthetic": True, "path": None, "n": len(data),
                                  "reason": str(error)}
            _announce_synthetic(name, str(error))
        return data

    def record_split(self, dataset: str, description: str | dict[str, Any]) -> None:
        """Record how ``dataset`` was split (a description, or part sizes and the split file)."""
        self.splits[dataset] = description

    def save_fig(self, fig: Any, name: str, close: bool = False) -> Path:
        """Save ``fig`` as ``figures/<notebook>/<name>.png``; stamped when the data are synthetic."""
        path = plots.save_fig(fig, self.figures_dir / name, stamp=plots.SYNTHETIC_STAMP if self.synthetic else None)
        self.figures.append(path.name)
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
        return path

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self._started

    def finish(self, metrics: dict[str, Any], headline: dict[str, Any]) -> Path:
        """Write ``metrics.json`` and return its path.

        ``headline`` holds the notebook's key numbers under stable names (the README table reads them);
        ``metrics`` everything else worth keeping. Both must be JSON-serialisable (numpy scalars are fine).
        """
        record = {
            "notebook": self.notebook,
            "profile": self.profile,
            "seed": self.seed,
            "synthetic_data": self.synthetic,
            "datasets": self.datasets,
            "splits": self.splits,
            "parameters": self.parameters,
            "headline": headline,
            "metrics": metrics,
            "figures": sorted(set(self.figures)),
            "wall_time_s": round(self.elapsed(), 2),
            "peak_memory_mb": round(runtime.peak_memory_mb(), 1),
            "started_utc": self._started_at.isoformat(timespec="seconds"),
            "versions": package_versions(),
            "git_commit": git_commit(),
            "code": results.code_fingerprints(),
        }
        path = self.figures_dir / "metrics.json"
        path.write_text(config.to_json(record))
        return path


def _default_stand_in(name: str, kwargs: dict[str, Any], seed: int) -> Callable[[], ImageSet | SegmentationSet]:
    from cellkit import synthetic

    if name == "dsb2018":
        return lambda: synthetic.nuclei_dataset(n_images=24, seed=seed)
    size = 28 if name == "pbc28" else int(kwargs.get("size", 48))
    split_seed = {"train": 0, "val": 1, "test": 2}.get(kwargs.get("split", "train"), 0)
    return lambda: synthetic.blood_cell_crops(n_per_class=40, size=size, seed=seed + split_seed)


def _announce_synthetic(name: str, reason: str) -> None:
    banner = "!" * 100
    message = (
        f"\n{banner}\nUSING SYNTHETIC STAND-IN DATA for {name!r}: the real dataset was not found.\n{reason}\n"
        f"Every number below is about simulated images, and every figure is stamped as such.\n{banner}\n"
    )
    print(message, file=sys.stderr)
    warnings.warn(f"synthetic stand-in data used for {name!r}", stacklevel=3)


def package_versions() -> dict[str, str]:
    """Python's and the main packages' versions, for metrics.json."""
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    """The project's git commit (with ``-dirty`` when tracked files have changes), or ``unknown``. The committed
    records in ``results/`` do not count: a run rewrites them one notebook after another."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=config.PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# --- the papermill runner ---------------------------------------------------------------------------


@dataclass
class NotebookResult:
    """How one notebook execution went."""

    notebook: str
    profile: str
    seconds: float
    output: Path
    error: str | None = None
    #: What the run's metrics.json says: True when it fell back to the simulated stand-in, None without a record.
    synthetic_data: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def recorded_synthetic(notebook: str, profile: str, since: float) -> bool | None:
    """Whether the metrics.json that ``notebook`` wrote in ``profile`` at or after ``since`` (seconds since the
    epoch) records the simulated stand-in; None when no record was written since then."""
    path = config.figures_dir(notebook, profile) / "metrics.json"
    if not path.is_file() or path.stat().st_mtime < since:
        return None
    return bool(json.loads(path.read_text()).get("synthetic_data"))


def run_notebook(path: Path, profile: str, output_dir: Path | None = None, progress: bool = True,
                 timeout: int | None = None) -> NotebookResult:
    """Execute one notebook with papermill in ``profile``; failures are returned, not raised.

    The executed copy (with outputs) is written to ``output_dir`` (default :func:`executed_dir`). ``timeout``
    bounds each cell, in seconds. A default or full run that finishes and writes its ``metrics.json`` also leaves
    its committed record in ``results/<profile>/`` (:func:`cellkit.results.write_record`).
    """
    import papermill

    output_dir = output_dir or executed_dir(profile)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / path.name
    started, started_at, cpu_before = time.perf_counter(), time.time(), _children_cpu_seconds()
    error = None
    try:
        with _inline_figures():
            papermill.execute_notebook(
                str(path), str(output), parameters=profile_parameters(path.stem, profile), cwd=str(path.parent),
                kernel_name="python3", progress_bar=progress, execution_timeout=timeout,
            )
    except papermill.PapermillExecutionError as failure:
        error = f"cell {failure.cell_index}: {failure.ename}: {failure.evalue}"
    seconds = time.perf_counter() - started
    cpu_after = _children_cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    synthetic = recorded_synthetic(path.stem, profile, started_at)
    if error is None and synthetic is not None and profile not in config.CHECK_PROFILES:
        results.write_record(config.figures_dir(path.stem, profile) / "metrics.json", path, profile, seconds, cpu)
    return NotebookResult(path.stem, profile, seconds, output, error, synthetic)


@contextmanager
def _inline_figures() -> Iterator[None]:
    """Let the kernel show figures in the executed copy (the course website renders them) even when this process
    draws without a display (``MPLBACKEND=Agg``), which the kernel would otherwise inherit."""
    before = os.environ.get("MPLBACKEND")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MPLBACKEND"]
        else:
            os.environ["MPLBACKEND"] = before


def _children_cpu_seconds() -> float | None:
    """User plus system CPU seconds of the finished child processes (the notebook kernels), None where the system
    does not say."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def strip_outputs(path: Path) -> bool:
    """Remove outputs, execution counts and volatile metadata from a notebook in place; True if changed."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
        for key in ("execution", "papermill"):
            if key in cell.metadata:
                del cell.metadata[key]
                changed = True
    if "papermill" in notebook.metadata:
        del notebook.metadata["papermill"]
        changed = True
    if changed:
        nbformat.write(notebook, path)
    return changed


if __name__ == "__main__":  # python -m cellkit.notebooks strip notebooks/*.ipynb
    if len(sys.argv) < 3 or sys.argv[1] != "strip":
        sys.exit("usage: python -m cellkit.notebooks strip NOTEBOOK.ipynb ...")
    for notebook_path in sys.argv[2:]:
        if strip_outputs(Path(notebook_path)):
            print(f"stripped {notebook_path}")
