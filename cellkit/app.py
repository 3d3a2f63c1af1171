"""The interactive app (``cellkit app``, or ``shiny run cellkit/app.py``): a thin Shiny layer over the package.

Four tabs, for people who do not code:

- Performance: every classifier result recorded in ``figures/*/metrics.json`` (notebook runs) and in the
  ``models/*.json`` files beside trained models, overall and per class, with confusion matrices and learning
  curves, each row saying which profile and dataset produced it; U-Net scores likewise.
- Compare: two of those classifiers side by side, with per-class F1 bars.
- Classify: upload an image (PNG, JPEG, TIFF), choose a classifier and an input transformation (report 000's:
  none, normalisation, Gaussian blur, Canny, Sobel); see the model's input, the predicted class and the
  probabilities.
- Segment: upload a fluorescence image; see the nuclei found by a U-Net, their count and a size histogram;
  download the label mask (16-bit PNG).

Uploads are checked by content (PNG, JPEG and TIFF signatures), size (:data:`MAX_UPLOAD_BYTES`, also for request
bodies sent in chunks: :class:`UploadLimit`) and pixel count (:data:`MAX_PIXELS`) before decoding; they are decoded
in memory and Shiny's temporary copy is deleted at once. Models load with Keras' safe mode. Model work (loading,
classifying, segmenting) runs on a few worker threads (:class:`ModelJobs`), so that one large image does not stop
other visitors' pages. The server listens on 127.0.0.1 unless told otherwise, and answers only requests addressed
to the host names it serves (:func:`default_allowed_hosts`).

>>> serve(models_dir="models", host="127.0.0.1", port=8000)    # what `cellkit app` calls
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException

from cellkit import config, plots, transforms
from cellkit.datasets import DataError, decode_image, to_grey

#: Largest accepted upload, in bytes (20 MiB).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest accepted image, in pixels (height x width): 16 megapixels, e.g. 4000 x 4000.
MAX_PIXELS = 16_000_000
#: File signatures (first bytes) of the accepted formats; the file name is never trusted.
SIGNATURES: dict[bytes, str] = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",  # BigTIFF
    b"MM\x00+": "TIFF",
}
#: Model jobs (loading, classifying, segmenting) that run at once, each on a worker thread: the event loop stays
#: free for every other visitor, and a crowd cannot start dozens of segmentations (one of 16 Mpx holds ~2 GB).
MODEL_WORKERS = 2
#: Model jobs that may wait for a worker besides the running ones; an upload beyond them is told the app is busy.
MAX_WAITING_JOBS = 8
#: The Segment tab draws its overlay at most this many pixels on a side (it is shown ~420 px high): a full-size
#: float overlay of a 16 Mpx image would hold 384 MB and take seconds to draw.
OVERLAY_MAX_SIDE = 1024
#: Host names a server on a loopback address answers to (the Host header; IPv6 literals in brackets).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
NO_MODELS_HINT = ("make them with `make models`, or train one with `cellkit train classifier --out "
                  "models/cellnet.keras` or `cellkit train unet --out models/unet.keras`")


# --------------------------------------------------------------------------------------------------------
# Uploads: content checks, then decoding in memory
# --------------------------------------------------------------------------------------------------------


def image_format(data: bytes) -> str:
    """``PNG``, ``JPEG`` or ``TIFF`` from the first bytes of ``data``; a one-line DataError for anything else."""
    for signature, kind in SIGNATURES.items():
        if data.startswith(signature):
            return kind
    raise DataError("not a PNG, JPEG or TIFF image (checked by its content, not its name)")


def image_shape(data: bytes, kind: str) -> tuple[int, int]:
    """(height, width) in pixels from the image header, without decoding the pixels."""
    try:
        if kind == "TIFF":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                shape = tif.pages[0].shape
                axes = tif.pages[0].axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return int(image.height), int(image.width)
    except Exception as error:  # noqa: BLE001 - any header failure is a bad upload, said in one line
        raise DataError(f"cannot read the {kind} header ({first_line(error)})") from None


def read_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Check and decode an uploaded image held in memory: (H, W) or (H, W, C) uint8/uint16, as stored.

    Checked in this order, each failure a one-line DataError: size <= ``max_bytes``; a PNG, JPEG or TIFF
    signature; height x width <= ``max_pixels`` (read from the header, before decoding); the decoding itself.
    """
    if not data:
        raise DataError("the file is empty")
    if len(data) > max_bytes:
        raise DataError(f"the file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    kind = image_format(data)
    height, width = image_shape(data, kind)
    if height * width > max_pixels:
        raise DataError(f"the image is {width} x {height} pixels ({height * width / 1e6:.1f} Mpx); the limit is "
                        f"{max_pixels / 1e6:.0f} Mpx")
    from PIL import Image

    try:
        return decode_image(io.BytesIO(data), tiff=kind == "TIFF", name=f"the {kind} image")
    except (Image.DecompressionBombError, MemoryError) as error:
        raise DataError(f"the {kind} image cannot be decoded ({type(error).__name__})") from None


def take_upload(file_info: dict[str, Any], max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    """The bytes of a Shiny upload (``{"name", "size", "type", "datapath"}``), read into memory; the temporary
    copy Shiny wrote is deleted straight away, so no uploaded content stays on disk."""
    path = Path(file_info["datapath"])
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"the file is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


class Upload:
    """An uploaded file held in memory, decoded at most once (on a model worker), however many models or
    transformations look at it afterwards."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self._data = name, data
        self._decoded: np.ndarray | str | None = None  # the image, or why it was refused
        self._lock = threading.Lock()

    def image(self) -> np.ndarray:
        """The decoded image (:func:`read_upload`); its one-line DataError, raised every time it is asked for."""
        with self._lock:
            if self._decoded is None:
                try:
                    self._decoded = read_upload(self._data)
                except DataError as error:
                    self._decoded = str(error)
                self._data = b""  # the bytes are not needed once decoded
            if isinstance(self._decoded, str):
                raise DataError(self._decoded)
            return self._decoded


# --------------------------------------------------------------------------------------------------------
# Models on disk
# --------------------------------------------------------------------------------------------------------


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


def _read_json(path: Path) -> dict[str, Any] | None:
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


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what the page shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------------
# Recorded results (Performance and Compare tabs)
# --------------------------------------------------------------------------------------------------------


@dataclass
class ClassifierResult:
    """One classifier's test (or validation) report with where it came from."""

    name: str
    source: str
    profile: str
    data: str
    report: dict[str, Any]
    part: str = "test"
    history: dict[str, list[float]] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"result": self.name, "accuracy": _round(self.report.get("accuracy")),
                "macro-F1": _round(self.report.get("macro_f1")), "ROC AUC": _round(self.report.get("auc_ovr")),
                "images": self.report.get("n"), "split": self.part, "profile": self.profile, "data": self.data,
                "source": self.source}

    def per_class(self) -> dict[str, dict[str, float]]:
        return self.report.get("per_class") or {}


def _round(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if isinstance(value, int | float) else value


def _is_report(node: Any) -> bool:
    return isinstance(node, dict) and {"per_class", "confusion_matrix", "accuracy"} <= set(node)


def _reports_in(node: Any, trail: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every dict under ``node`` that holds a classification report under ``test`` (or, lacking a test
    split, ``validation``), with the keys leading to it."""
    found = []
    if isinstance(node, dict):
        for part in ("test", "validation"):
            if _is_report(node.get(part)):
                found.append((trail, node))
                break
        for key, value in node.items():
            if key not in ("test", "validation"):
                found += _reports_in(value, (*trail, str(key)))
    return found


def _provenance(record: dict[str, Any]) -> tuple[str, str]:
    """(profile, data) of a notebook's metrics.json; synthetic stand-in data is named as such."""
    names = sorted({d.get("name", "?") for d in (record.get("datasets") or {}).values()})
    data = "SYNTHETIC stand-in" if record.get("synthetic_data") else ", ".join(names) or "-"
    return str(record.get("profile", "?")), data


def _result(name: str, source: str, profile: str, data: str, node: dict[str, Any]) -> ClassifierResult:
    part = "test" if _is_report(node.get("test")) else "validation"
    history = node.get("history") or (node.get("fit") or {}).get("history") or {}
    return ClassifierResult(name, source, profile, data, node[part], part, history)


def classifier_results(figures_dir: str | Path, models_dir: str | Path) -> list[ClassifierResult]:
    """Classifier reports recorded by notebook runs (``figures/*/metrics.json``) and trained models
    (``models/*.json``), in that order."""
    results = []
    for path in sorted(Path(figures_dir).glob("*/metrics.json")):
        record = _read_json(path) or {}
        profile, data = _provenance(record)
        for trail, node in _reports_in(record.get("metrics") or {}):
            name = f"{path.parent.name}: {'/'.join(trail) or 'model'}"
            results.append(_result(name, f"figures/{path.parent.name}/metrics.json", profile, data, node))
    for entry in find_models(models_dir)[0]:
        if entry.kind == "classifier" and _reports_in(entry.record):
            data = (entry.record.get("data") or {}).get("source") or entry.info.trained_on or "-"
            source = f"models/{entry.path.with_suffix('.json').name}"
            results.append(_result(f"{entry.path.name} ({entry.info.model})", source, "cellkit train classifier",
                                   data, entry.record))
    return results


def segmentation_results(figures_dir: str | Path, models_dir: str | Path) -> list[dict[str, Any]]:
    """U-Net scores at IoU 0.5 and SEG from notebook headlines and ``models/*.json``, one row each."""
    rows = []
    for path in sorted(Path(figures_dir).glob("*/metrics.json")):
        record = _read_json(path) or {}
        headline = record.get("headline") or {}
        if "f1_iou50" in headline:
            profile, data = _provenance(record)
            rows.append({"result": f"{path.parent.name}: best U-Net", "F1": _round(headline.get("f1_iou50")),
                         "AP": _round(headline.get("ap_iou50")), "SEG": _round(headline.get("seg")),
                         "profile": profile, "data": data, "source": f"figures/{path.parent.name}/metrics.json"})
    for entry in find_models(models_dir)[0]:
        test = entry.record.get("test") if entry.kind == "unet" else None
        if isinstance(test, dict):
            rows.append({"result": entry.path.name, "F1": _round(test.get("f1")), "AP": _round(test.get("ap")),
                         "SEG": _round(test.get("seg")), "profile": "cellkit train unet",
                         "data": (entry.record.get("data") or {}).get("source") or "-",
                         "source": f"models/{entry.path.with_suffix('.json').name}"})
    return rows


def per_class_f1(results: list[ClassifierResult]):
    """A DataFrame of per-class F1 (rows: classes of the first result, columns: results)."""
    import pandas as pd

    columns = {r.name: {c: s.get("f1") for c, s in r.per_class().items()} for r in results}
    return pd.DataFrame(columns).round(3)


def default_pair(results: list[ClassifierResult]) -> tuple[str, str]:
    """The two results the Compare tab opens with: the best non-ViT model and a ViT if one is recorded
    (report 000's comparison), else the two best by accuracy."""
    ranked = sorted(results, key=lambda r: -(r.report.get("accuracy") or 0))
    vit = [r for r in ranked if "vit" in r.name.lower()]
    cnn = [r for r in ranked if "vit" not in r.name.lower()]
    pair = [cnn[0], vit[0]] if cnn and vit else ranked[:2]
    names = [r.name for r in pair] + [r.name for r in ranked][: 2 - len(pair)]
    return (names[0], names[-1]) if names else ("", "")


# --------------------------------------------------------------------------------------------------------
# Classify and segment one image
# --------------------------------------------------------------------------------------------------------


def _normalise(image: np.ndarray) -> np.ndarray:
    """Report 000's per-image normalisation (z-score), brought back to 0..255 by its own minimum and maximum."""
    z = transforms.zscore(transforms.as_float(image))
    span = float(z.max() - z.min())
    return transforms.as_uint8((z - z.min()) / span if span > 0 else np.zeros_like(z))


#: Input transformations of report 000 with its parameters, applied to the model's input (uint8 RGB at the
#: model's size) as the report applied them to its 50x50 inputs.
INPUT_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda image: image,
    "normalisation": _normalise,
    "Gaussian blur 25x25": transforms.gaussian_blur,
    "Canny 10/200": transforms.canny,
    "Sobel": transforms.sobel,
}


@dataclass
class Classification:
    """What the Classify tab shows: the prepared and transformed model input, and the probabilities."""

    prepared: np.ndarray
    transformed: np.ndarray
    probabilities: dict[str, float]
    seconds: float
    transform: str = "none"

    @property
    def best(self) -> tuple[str, float]:
        name = max(self.probabilities, key=self.probabilities.get)
        return name, self.probabilities[name]


def classify_image(trained: Any, image: np.ndarray, transform: str = "none") -> Classification:
    """Prepare ``image`` as the model's training images were made (:meth:`TrainedModel.prepare`), apply the
    input transformation ``transform`` (:data:`INPUT_TRANSFORMS`), and predict class probabilities."""
    if transform not in INPUT_TRANSFORMS:
        raise ValueError(f"unknown transformation {transform!r}; use {', '.join(INPUT_TRANSFORMS)}")
    started = time.perf_counter()
    prepared = trained.prepare([image])[0]
    transformed = trained.prepare([INPUT_TRANSFORMS[transform](prepared)])[0]  # Canny is grey: back to RGB
    proba = trained.predict_proba(transformed[None])[0]
    probabilities = {name: float(p) for name, p in zip(trained.class_names, proba, strict=True)}
    return Classification(prepared, transformed, probabilities, time.perf_counter() - started, transform)


@dataclass
class Segmentation:
    """What the Segment tab shows: instance labels (H, W) int32, the overlay (H, W, 3) float in [0, 1], and
    the area of each nucleus in pixels."""

    labels: np.ndarray
    overlay: np.ndarray
    areas: np.ndarray
    seconds: float

    @property
    def count(self) -> int:
        return int(self.areas.size)


def segment_image(unet: Any, image: np.ndarray) -> Segmentation:
    """Segment ``image`` with a loaded U-Net (tiled as recorded; the labels `cellkit segment` writes with the same
    model) and measure each nucleus; the overlay is drawn at display size (:func:`display_overlay`)."""
    started = time.perf_counter()
    labels, _ = unet.segment(image)
    areas = np.bincount(labels.ravel())[1:]
    grey = to_grey(image) if image.ndim == 3 else image
    return Segmentation(labels, display_overlay(grey, labels), areas[areas > 0], time.perf_counter() - started)


def display_overlay(grey: np.ndarray, labels: np.ndarray, max_side: int = OVERLAY_MAX_SIDE) -> np.ndarray:
    """The outlined nuclei over ``grey`` (:func:`cellkit.plots.overlay_instances`), every n-th pixel of a large image
    so that the longer side is at most ``max_side``; a smaller image is drawn whole."""
    step = max(1, -(-max(labels.shape) // max_side))
    return plots.overlay_instances(grey[::step, ::step], labels[::step, ::step]).astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# Model jobs: on a few worker threads, never on the event loop
# --------------------------------------------------------------------------------------------------------


class Busy(DataError):
    """More model jobs are waiting than :data:`MAX_WAITING_JOBS`."""


class ModelJobs:
    """A small pool of worker threads for model work, with a bound on the jobs waiting for it.

    The app's server awaits :meth:`run` from Shiny extended tasks, so that the event loop (every visitor's pages,
    uploads and outputs) goes on while a model works.
    """

    def __init__(self, workers: int = MODEL_WORKERS, max_waiting: int = MAX_WAITING_JOBS) -> None:
        self.workers, self.max_waiting = workers, max_waiting
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cellkit-model")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished (running or waiting)."""
        return self._pending

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` on a worker thread, awaited; :class:`Busy` when too many jobs are pending already.
        Cancelling the await drops a job still waiting for a worker; one already running finishes unseen."""
        with self._lock:
            if self._pending >= self.workers + self.max_waiting:
                raise Busy("the app is busy with other images; try again in a minute")
            self._pending += 1
        try:
            future = self._pool.submit(func, *args)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, future: Future | None) -> None:
        with self._lock:
            self._pending -= 1


#: The app's model workers, shared by every session.
MODEL_JOBS = ModelJobs()
#: The errors a model job reports as one line in its tab: bad images, damaged or unreadable model files, no memory.
EXPECTED_ERRORS = (DataError, ValueError, OSError, MemoryError)


def model_step(upload: Upload, entry: ModelEntry, step: Callable[[Any, np.ndarray], Any]) -> Any:
    """On a model worker: decode ``upload``, load ``entry``'s model and return ``step(model, image)``; each expected
    failure (:data:`EXPECTED_ERRORS`) is returned as a one-line message instead."""
    what = "U-Net" if entry.kind == "unet" else "classifier"
    try:
        image = upload.image()
    except DataError as error:
        return f"{upload.name}: {error}"
    try:
        model = load_model(entry)
    except EXPECTED_ERRORS as error:
        return f"the {what} {entry.path.name} cannot be loaded: {first_line(error)}"
    try:
        return step(model, image)
    except EXPECTED_ERRORS as error:
        return f"cannot use this image with the {what}: {first_line(error)}"


async def model_job(upload: Upload | str | None, entry: ModelEntry | str, step: Callable[[Any, np.ndarray], Any],
                    jobs: ModelJobs = MODEL_JOBS) -> Any:
    """What a tab shows for an upload and a model choice: None before any upload, a one-line message (a refused
    upload, no model, a busy app, a failure), or ``step``'s result computed on a model worker (:func:`model_step`)."""
    if not isinstance(upload, Upload):
        return upload
    if isinstance(entry, str):
        return entry
    try:
        return await jobs.run(model_step, upload, entry, step)
    except Busy as error:
        return str(error)
    except Exception as error:  # a bug: one line in the page, the traceback in the server's log
        logging.getLogger(__name__).error("model job failed", exc_info=error)
        return f"unexpected error ({type(error).__name__}: {first_line(error)})"


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def probability_bars(probabilities: dict[str, float], title: str = ""):
    """Horizontal bars of class probabilities, the predicted class highlighted."""
    import matplotlib.pyplot as plt

    names = list(probabilities)
    values = np.array([probabilities[n] for n in names])
    fig, ax = plt.subplots(figsize=(5.5, 0.32 * len(names) + 1.0))
    colours = ["tab:blue" if i == values.argmax() else "0.7" for i in range(len(names))]
    bars = ax.barh(names[::-1], values[::-1], color=colours[::-1])
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values[::-1]], fontsize=8, padding=2)
    ax.set(xlim=(0, 1.12), xlabel="probability", title=title)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def fitted(fig: Any) -> Any:
    """``fig`` laid out again whenever it is drawn: Shiny resizes a figure to its place in the page, and a
    layout computed once at the old size would cut off labels."""
    if fig is not None:
        fig.set_layout_engine("tight")
    return fig


def image_panels(images: list[np.ndarray], titles: list[str]):
    """Images side by side, pixels kept sharp (a 28x28 input is shown enlarged, not smoothed)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(3.2 * len(images), 3.4), squeeze=False)
    for ax, image, title in zip(axes[0], images, titles, strict=True):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------
# The Shiny app
# --------------------------------------------------------------------------------------------------------

ACCEPT = [".png", ".jpg", ".jpeg", ".tif", ".tiff"]


def _choices(entries: list[ModelEntry], kind: str) -> dict[str, str]:
    return {str(e.path): e.label for e in entries if e.kind == kind}


def build_ui(models_dir: Path) -> Callable[[Any], Any]:
    """The page, built per request so that models added since the server started are listed."""
    from shiny import ui

    def page(request: Any) -> Any:
        entries, problems = find_models(models_dir)
        classifiers, unets = _choices(entries, "classifier"), _choices(entries, "unet")
        found = ui.tags.ul(*[ui.tags.li(e.label) for e in entries]) if entries else ui.p(
            f"No models in {models_dir}: {NO_MODELS_HINT}.", class_="text-danger", id="no-models")
        skipped = ui.p("Skipped: " + "; ".join(problems), class_="text-warning") if problems else None
        missing_classifier = ui.p(f"No classifier found in {models_dir}: {NO_MODELS_HINT}.", class_="text-danger")
        missing_unet = ui.p(f"No U-Net found in {models_dir}: {NO_MODELS_HINT}.", class_="text-danger")
        limits = f"PNG, JPEG or TIFF; at most {MAX_UPLOAD_BYTES // 2**20} MiB and {MAX_PIXELS // 10**6} megapixels"
        return ui.page_navbar(
            ui.nav_panel(
                "Performance",
                ui.h4("Classifiers"),
                ui.p("Every result recorded by a notebook run (figures/*/metrics.json) or beside a trained model "
                     "(models/*.json). 'profile' and 'data' say which run and dataset produced each number."),
                ui.output_table("perf_table"),
                ui.input_select("perf_pick", "Details of", choices=[]),
                ui.output_table("perf_per_class"),
                ui.layout_columns(ui.output_plot("perf_confusion", height="420px"),
                                  ui.output_plot("perf_curves", height="360px")),
                ui.h4("Segmentation (IoU 0.5 matching, SEG)"),
                ui.output_table("perf_segmentation"),
                ui.h4("Models found"), found, skipped,
            ),
            ui.nav_panel(
                "Compare",
                ui.layout_columns(ui.input_select("cmp_a", "Model A", choices=[]),
                                  ui.input_select("cmp_b", "Model B", choices=[])),
                ui.output_table("cmp_table"),
                ui.output_plot("cmp_bars", height="420px"),
            ),
            ui.nav_panel(
                "Classify",
                ui.layout_sidebar(
                    ui.sidebar(
                        ui.input_file("cls_file", "Cell image", accept=ACCEPT, button_label="Upload..."),
                        ui.p(limits, class_="small text-muted"),
                        ui.input_select("cls_model", "Model", choices=classifiers) if classifiers
                        else missing_classifier,
                        ui.input_select("cls_transform", "Input transformation", choices=list(INPUT_TRANSFORMS)),
                        width=330,
                    ),
                    ui.output_ui("cls_status"),
                    ui.layout_columns(ui.output_plot("cls_input", height="300px"),
                                      ui.output_plot("cls_bars", height="340px")),
                ),
            ),
            ui.nav_panel(
                "Segment",
                ui.layout_sidebar(
                    ui.sidebar(
                        ui.input_file("seg_file", "Fluorescence image", accept=ACCEPT, button_label="Upload..."),
                        ui.p(limits, class_="small text-muted"),
                        ui.input_select("seg_model", "U-Net", choices=unets) if unets else missing_unet,
                        ui.output_ui("seg_download"),
                        width=330,
                    ),
                    ui.output_ui("seg_status"),
                    ui.layout_columns(ui.output_plot("seg_overlay", height="420px"),
                                      ui.output_plot("seg_sizes", height="320px")),
                ),
            ),
            title="cellkit", id="tab", window_title="cellkit app",
        )

    return page


#: What a tab's outcome is while its model job runs (:func:`_outcome`).
WORKING: Any = object()


def _status(result: Any, prompt: str, tab: str, shown: Callable[[Any], list[Any]], working: str) -> Any:
    """The status box of tab ``tab`` (``cls`` or ``seg``): the prompt before an upload, ``working`` while the model
    works (id ``<tab>-working``), the one-line error (id ``<tab>-error``), or ``shown(result)``."""
    from shiny import ui

    if result is None:
        return ui.p(prompt, class_="text-muted")
    if result is WORKING:
        return ui.div(ui.span(class_="spinner-border spinner-border-sm me-2", role="status"), working,
                      class_="alert alert-info", id=f"{tab}-working")
    if isinstance(result, str):
        return ui.div(f"Error: {result}", class_="alert alert-danger", role="alert", id=f"{tab}-error")
    return ui.div(*shown(result), class_="alert alert-success")


def _outcome(task: Any) -> Any:
    """A tab's outcome from its extended task (reactive on its status): None before it first ran, :data:`WORKING`
    while it runs (or was just cancelled for a newer run, :func:`_restart`), then :func:`model_job`'s result."""
    status = task.status()
    if status in ("running", "cancelled"):
        return WORKING
    if status == "success":
        return task.result()
    if status == "error":  # model_job turns every failure into a message; this is a safety net
        return f"unexpected error ({first_line(task.error.get())})"
    return None


def build_server(models_dir: Path, figures_dir: Path) -> Callable[..., None]:
    """The server function: one reactive graph per browser session."""
    from shiny import reactive, render, ui

    from cellkit import inference

    def server(input: Any, output: Any, session: Any) -> None:
        results = classifier_results(figures_dir, models_dir)
        by_name = {r.name: r for r in results}
        names = list(by_name)
        first, second = default_pair(results)
        ui.update_select("perf_pick", choices=names, selected=first or None)
        ui.update_select("cmp_a", choices=names, selected=first or None)
        ui.update_select("cmp_b", choices=names, selected=second or None)

        # --- Performance and Compare -------------------------------------------------------------------
        @render.table
        def perf_table():
            import pandas as pd

            if not results:
                return pd.DataFrame({"note": [f"no classifier results yet: run `make run` or `make models` "
                                              f"({NO_MODELS_HINT})"]})
            return pd.DataFrame([r.row() for r in results])

        def picked() -> ClassifierResult | None:
            return by_name.get(input.perf_pick())

        @render.table
        def perf_per_class():
            import pandas as pd

            result = picked()
            if result is None:
                return None
            table = pd.DataFrame(result.per_class()).T.rename_axis("class").reset_index().round(3)
            if "support" in table:
                table["support"] = table["support"].astype(int)
            return table

        @render.plot
        def perf_confusion():
            result = picked()
            if result is None:
                return None
            classes = result.report.get("class_names") or list(result.per_class())
            return fitted(plots.confusion_heatmap(result.report["confusion_matrix"], classes,
                                                  title=f"{result.name} ({result.part}, {result.profile})"))

        @render.plot
        def perf_curves():
            result = picked()
            if result is None or not result.history:
                return None
            return fitted(plots.learning_curves({result.name.split(": ")[-1]: result.history}))

        @render.table
        def perf_segmentation():
            import pandas as pd

            rows = segmentation_results(figures_dir, models_dir)
            return pd.DataFrame(rows) if rows else pd.DataFrame(
                {"note": ["no segmentation results yet: run notebook 07 or `make models`"]})

        def compared() -> list[ClassifierResult]:
            return [by_name[n] for n in (input.cmp_a(), input.cmp_b()) if n in by_name]

        @render.table
        def cmp_table():
            import pandas as pd

            return pd.DataFrame([r.row() for r in compared()]) if compared() else None

        @render.plot
        def cmp_bars():
            chosen = compared()
            if not chosen:
                return None
            table = per_class_f1(chosen)
            table.columns = [f"{'AB'[i]}: {name}" for i, name in enumerate(table.columns)]
            return fitted(plots.grouped_bars(table, title="per-class F1", ylabel="F1"))

        # --- Classify ----------------------------------------------------------------------------------
        @reactive.calc
        def cls_upload() -> Upload | str | None:
            return _take(input.cls_file())

        @reactive.extended_task
        async def cls_task(upload: Upload | str | None, entry: ModelEntry | str, transform: str) -> Any:
            return await model_job(upload, entry, lambda model, image: classify_image(model, image, transform))

        @reactive.effect
        def _classify() -> None:
            _restart(cls_task, cls_upload(), _chosen(input, "cls_model", models_dir), input.cls_transform())

        def cls_result() -> Any:
            return _outcome(cls_task)

        @render.ui
        def cls_status():
            def shown(result: Classification) -> list[Any]:
                name, p = result.best
                return [ui.h4(f"Predicted class: {name}", id="cls-class"),
                        ui.p(f"probability {p:.3f}; transformation: {result.transform}; "
                             f"{result.seconds * 1000:.0f} ms")]

            return _status(cls_result(), "Upload a cell image to classify it.", "cls", shown, "Classifying...")

        @render.plot
        def cls_input():
            result = cls_result()
            if not isinstance(result, Classification):
                return None
            size = result.prepared.shape[0]
            return fitted(image_panels([result.prepared, result.transformed],
                                       [f"model input ({size}x{size})", f"after {result.transform}"]))

        @render.plot
        def cls_bars():
            result = cls_result()
            return fitted(probability_bars(result.probabilities, "class probabilities")) \
                if isinstance(result, Classification) else None

        # --- Segment -----------------------------------------------------------------------------------
        @reactive.calc
        def seg_upload() -> Upload | str | None:
            return _take(input.seg_file())

        @reactive.extended_task
        async def seg_task(upload: Upload | str | None, entry: ModelEntry | str) -> Any:
            return await model_job(upload, entry, segment_image)

        @reactive.effect
        def _segment() -> None:
            _restart(seg_task, seg_upload(), _chosen(input, "seg_model", models_dir))

        def seg_result() -> Any:
            return _outcome(seg_task)

        @render.ui
        def seg_status():
            def shown(result: Segmentation) -> list[Any]:
                h, w = result.labels.shape
                mean = f"; mean area {result.areas.mean():.0f} px" if result.count else ""
                return [ui.h4(f"{result.count} nuclei", id="seg-count"),
                        ui.p(f"{w} x {h} pixels{mean}; {result.seconds:.1f} s")]

            return _status(seg_result(), "Upload a fluorescence image of nuclei to segment and count them.",
                           "seg", shown, "Segmenting... (a large image takes a while; the app stays usable)")

        @render.plot
        def seg_overlay():
            result = seg_result()
            return fitted(image_panels([result.overlay], [f"{result.count} nuclei"])) \
                if isinstance(result, Segmentation) else None

        @render.plot
        def seg_sizes():
            result = seg_result()
            if not isinstance(result, Segmentation) or result.count < 2:
                return None
            return fitted(plots.distribution(result.areas, xlabel="nucleus area (pixels)", title="nucleus sizes",
                                             bins=min(40, max(5, result.count // 2))))

        @render.ui
        def seg_download():
            return ui.download_button("seg_labels", "Download label mask (16-bit PNG)") \
                if isinstance(seg_result(), Segmentation) else None

        @render.download_button(filename="labels.png", media_type="image/png")
        async def seg_labels():
            result = seg_result()
            if isinstance(result, Segmentation):  # encoding 16 Mpx takes a second: not on the event loop
                yield await asyncio.to_thread(inference.encode_labels, result.labels)

        # a closed page's jobs still waiting for a worker are dropped
        session.on_ended(cls_task.cancel)
        session.on_ended(seg_task.cancel)

    return server


def _take(files: list[dict[str, Any]] | None) -> Upload | str | None:
    """The upload (the first of Shiny's file infos) read into memory, the one-line reason it was refused, or None
    before any upload. Called once per upload: the temporary copy is gone afterwards; decoding waits for a model
    worker (:meth:`Upload.image`)."""
    if not files:
        return None
    name = files[0].get("name", "the file")
    try:
        return Upload(name, take_upload(files[0]))
    except DataError as error:
        return f"{name}: {error}"
    except OSError as error:
        return f"{name}: could not read the upload ({error.strerror or error})"


def _chosen(input: Any, select_id: str, models_dir: Path) -> ModelEntry | str:
    """The model chosen in select ``select_id``, or a one-line message when there is none or it is gone."""
    what = "classifier" if select_id == "cls_model" else "U-Net"
    if select_id not in input:
        return f"no {what} found in {models_dir}: {NO_MODELS_HINT}"
    chosen = getattr(input, select_id)()
    entry = next((e for e in find_models(models_dir)[0] if str(e.path) == chosen), None)
    return entry if entry is not None else f"the model {Path(chosen).name} is gone; reload the page"


def _restart(task: Any, *args: Any) -> None:
    """Start ``task`` on new inputs, dropping a run of it on the old ones (its result would be stale)."""
    task.cancel()
    task.invoke(*args)


class UploadLimit:
    """ASGI middleware: refuses a request body larger than ``max_bytes`` with 413 before it reaches Shiny, which
    would otherwise write any size to its temporary folder: at once when its Content-Length says so, else (a body
    sent in chunks) as soon as the bytes read pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send)
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise TooLarge()  # Starlette (Shiny's routes) answers an HTTPException itself
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except TooLarge:
            if not started:  # an app that let it through, not Starlette
                await _too_large(send)


#: What a refused upload is told (the page's upload bar shows it).
TOO_LARGE = f"upload too large: the limit is {MAX_UPLOAD_BYTES // 2**20} MiB"


class TooLarge(HTTPException):
    """A request body passed :class:`UploadLimit`'s limit while it was read: Starlette answers it with 413 and
    :data:`TOO_LARGE`, without a traceback (it is an HTTPException)."""

    def __init__(self) -> None:
        super().__init__(413, TOO_LARGE)


async def _too_large(send: Callable) -> None:
    body = TOO_LARGE.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def default_allowed_hosts(host: str) -> list[str]:
    """The Host header names a server listening on ``host`` answers to: the loopback names (127.0.0.1, localhost,
    [::1]) on a loopback address, ``host`` itself on another one, any name (``*``) on all addresses (0.0.0.0,
    ::), where visitors may use any of the machine's names; :func:`serve`'s ``allowed_hosts`` narrows that."""
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0", "::"):
        return ["*"]
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:  # a name
        return [*LOOPBACK_HOSTS] if bare.lower() == "localhost" else [bare.lower()]
    name = f"[{address.compressed}]" if address.version == 6 else address.compressed
    return list(dict.fromkeys([*LOOPBACK_HOSTS, name])) if address.is_loopback else [name]


def create_app(models_dir: str | Path | None = None, figures_dir: str | Path | None = None,
               allowed_hosts: list[str] | None = None) -> Any:
    """The ASGI app: Shiny's app behind :class:`UploadLimit` (a margin of 1 MiB over :data:`MAX_UPLOAD_BYTES`,
    so that a slightly larger file still reaches the page's own message), behind Starlette's
    ``TrustedHostMiddleware``: a request whose Host header is not in ``allowed_hosts`` (default: the loopback names,
    :data:`LOOPBACK_HOSTS`; ``["*"]`` accepts any) gets 400."""
    from shiny import App
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    models_dir = Path(models_dir) if models_dir else config.models_dir()
    figures_dir = Path(figures_dir) if figures_dir else config.figures_dir()
    shiny_app = App(build_ui(models_dir), build_server(models_dir, figures_dir))
    limited = UploadLimit(shiny_app, MAX_UPLOAD_BYTES + 2**20)
    return TrustedHostMiddleware(limited, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS), www_redirect=False)


def serve(models_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          figures_dir: str | Path | None = None, allowed_hosts: list[str] | None = None) -> None:
    """Run the app with uvicorn until interrupted. Keras is imported first, so that the first upload does not
    wait for it. ``allowed_hosts``: the Host names to answer (default: :func:`default_allowed_hosts` of ``host``),
    e.g. ``["cells.example.org"]`` for ``host="0.0.0.0"``."""
    import uvicorn

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # noqa: F401 - warm-up import: several seconds on a small CPU

    allowed = list(allowed_hosts or default_allowed_hosts(host))
    app = create_app(models_dir, figures_dir, allowed)
    print(f"cellkit app on http://{host}:{port} (models: {Path(models_dir or config.models_dir())})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        names = "any host name" if "*" in allowed else ", ".join(allowed)
        print(f"note: listening on {host}: other machines that reach it can use the app and upload images; it "
              f"answers requests for {names}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


#: For ``shiny run cellkit/app.py``: the project's models/ and figures/ folders.
app = create_app()
