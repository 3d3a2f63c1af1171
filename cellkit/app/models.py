"""The models the app offers: found on disk, loaded safely once."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellkit.datasets import DataError, first_line

NO_MODELS_HINT = ("make them with `make models`, or train one with `cellkit train classifier --out "
                  "models/cellnet.keras` or `cellkit train unet --out models/unet.keras`")

@dataclass
class ModelEntry:
    """A ``.keras`` file in the models folder: its kind (``classifier`` or ``unet``), metadata and record."""

    path: Path
    kind: str
    info: Any
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.kind == "unet":
            return f"{self.path.name} (U-Net, {self.info.n_classes} output(s), {'+'.join(self.info.channels)})"
        return f"{self.path.name} ({self.info.model}, {len(self.info.class_names)} classes, " \
               f"{self.info.input_size}x{self.info.input_size})"


def find_models(folder: str | Path) -> tuple[list[ModelEntry], list[str]]:
    """The models in ``folder`` (``*.keras`` with the metadata cellkit writes inside), sorted by name, and one
    line per file that is not one. Only the metadata is read here: no Keras, nothing loaded."""
    from cellkit import classifiers, saving, unet

    entries, problems = [], []
    for path in sorted(Path(folder).glob("*.keras")) if Path(folder).is_dir() else []:
        kind = saving.model_kind(path)
        try:
            entry = ModelEntry(path, kind, (unet.read_unet_config if kind == "unet" else classifiers.read_info)(path))
        except (DataError, ValueError, KeyError, OSError) as error:
            problems.append(f"{path.name}: {first_line(error)}")
            continue
        entry.record = saving.read_record(path)
        entries.append(entry)
    return entries, problems


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it cannot be read or parsed (a record being written, a damaged file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_LOADED: dict[str, tuple[float, Any]] = {}
_LOAD_LOCK = threading.Lock()


def load_model(entry: ModelEntry) -> Any:
    """The loaded model of ``entry`` (safe mode on, :data:`cellkit.inference.DEFAULT_PRECISION`, as `cellkit
    segment` loads it), kept in memory until its file changes. Called on a model worker (:class:`ModelJobs`)."""
    from cellkit import inference

    path, mtime = str(entry.path.resolve()), entry.path.stat().st_mtime
    with _LOAD_LOCK:
        if _LOADED.get(path, (None,))[0] != mtime:
            _LOADED.pop(path, None)  # the old version goes before the new one loads
            _LOADED[path] = (mtime, inference.load_model(entry.path))
        return _LOADED[path][1]

