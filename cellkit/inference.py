"""Models on files: classify images, segment images into label files, and read models of either kind. What the
command line (``cellkit classify``, ``cellkit segment``) and the app call.

>>> from cellkit import inference
>>> files = inference.image_files("my_images/")                       # a file, or a folder searched recursively
>>> rows = inference.classify_files(inference.load_model("models/cellnet.keras"), files)
>>> rows = inference.segment_files(inference.load_model("models/unet.keras"), files, "masks/")

Label images are 16-bit PNGs (0 background, one id per nucleus): :func:`write_labels`, :func:`encode_labels`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import classifiers, plots, runtime, saving, unet
from cellkit.datasets import DataError, read_image, to_grey
from cellkit.datasets.loaders import IMAGE_SUFFIXES

#: The precision models predict in, for the command line and the app alike: ``auto`` is bfloat16 where the CPU has
#: native instructions for it (about twice as fast at the same accuracy: the default U-Net's test F1 0.8988 and SEG
#: 0.7806 in float32, 0.8990 and 0.7804 in bfloat16; docs/unet_default_model.md), float32 elsewhere.
DEFAULT_PRECISION = "auto"


def load_model(path: str | Path, precision: str = DEFAULT_PRECISION) -> classifiers.TrainedModel | unet.TrainedUNet:
    """A saved classifier or U-Net, whichever ``path`` holds (:func:`cellkit.saving.model_kind`); a U-Net computes
    in ``precision`` (``float32``, ``bfloat16`` or ``auto``; :data:`DEFAULT_PRECISION`)."""
    if saving.model_kind(path) == saving.UNET_KIND:
        return unet.load_unet(path, precision=precision)
    return classifiers.load(path)


def image_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the image files in folder ``path`` and its subfolders, sorted.

    A folder without images is a one-line DataError.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in it and its subfolders)")
    return files


def classify_files(trained: classifiers.TrainedModel, files: Sequence[Path], tta: str | None = None,
                   batch_size: int = 64,
                   on_error: Callable[[Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Class and probabilities for each readable file, read and prepared like the model's training images.

    Returns one dict per readable file: ``file``, ``class``, ``probability`` and one ``p_<class>`` per class.
    An unreadable file is skipped; ``on_error(path, message)`` is called for it.
    """
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        batch, kept = [], []
        for path in files[start : start + batch_size]:
            try:
                batch.append(trained.prepare([read_image(path)])[0])
                kept.append(path)
            except (DataError, ValueError, OSError) as error:
                if on_error is not None:
                    on_error(path, str(error))
        if not batch:
            continue
        proba = trained.predict_proba(np.stack(batch), tta)
        for path, p in zip(kept, proba, strict=True):
            best = int(p.argmax())
            row = {"file": str(path), "class": trained.class_names[best], "probability": float(p[best])}
            row.update({f"p_{name}": float(v) for name, v in zip(trained.class_names, p, strict=True)})
            rows.append(row)
    return rows


def encode_labels(labels: np.ndarray) -> bytes:
    """An instance image as 16-bit PNG bytes (ids 0..65535); a one-line DataError beyond 65,535 objects."""
    import cv2

    labels = np.asarray(labels)
    if labels.size and int(labels.max()) > np.iinfo(np.uint16).max:
        raise DataError(f"{int(labels.max())} objects do not fit a 16-bit label PNG")
    ok, buffer = cv2.imencode(".png", labels.astype(np.uint16))
    if not ok:
        raise DataError("could not encode the label image")
    return buffer.tobytes()


def write_labels(labels: np.ndarray, path: str | Path) -> Path:
    """Write an instance image as a 16-bit PNG (:func:`encode_labels`); a DataError naming ``path`` if it cannot."""
    path = Path(path)
    try:
        data = encode_labels(labels)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _overlay_png(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    from PIL import Image

    rgb = plots.overlay_instances(to_grey(image) if image.ndim == 3 else image, labels)
    Image.fromarray(np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)


def segment_files(trained: unet.TrainedUNet, files: Sequence[Path], out_dir: str | Path, root: Path | None = None,
                  overlay: bool = False, tile: int | None | str = "auto", progress: bool = True,
                  on_error: Callable[[Path, str], None] | None = None) -> list[dict[str, Any]]:
    """Segment each file and write ``<out_dir>/<stem>.png`` (uint16 instance ids; 0 is background), with
    ``<stem>_overlay.png`` when ``overlay``. Files found under folder ``root`` keep their subfolders in
    ``out_dir``, so that equal stems in different subfolders do not collide.

    Returns one row per segmented file: ``file``, ``labels`` (the written path), ``n_nuclei``, ``mean_area_px``
    (0 when none), ``height``, ``width``. A file that cannot be read or segmented is skipped and reported to
    ``on_error(path, message)``. Reading and preparing the next file, and finding and writing the previous one's
    nuclei, run on worker threads while the network works (:func:`cellkit.runtime.overlapped`).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="segmenting", unit="image", file=sys.stderr, dynamic_ncols=True)

    def read_and_prepare(path: Path) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(path)
        return image, trained.prepare(image)

    def predict(prepared: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        image, stack = prepared
        return image, trained.predict_stack(stack, tile)

    def write(path: Path, predicted: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        image, prediction = predicted
        labels, _ = trained.finish(image, prediction)
        relative = path.relative_to(root).parent if root is not None else Path()
        target = write_labels(labels, out_dir / relative / f"{path.stem}.png")
        if overlay:
            _overlay_png(image, labels, target.with_name(f"{path.stem}_overlay.png"))
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        return {"file": str(path), "labels": str(target), "n_nuclei": int(areas.size),
                "mean_area_px": round(float(areas.mean()), 1) if areas.size else 0.0,
                "height": int(labels.shape[0]), "width": int(labels.shape[1])}

    expected = (DataError, ValueError, OSError, MemoryError, Image.DecompressionBombError)
    try:
        for path, outcome in runtime.overlapped(files, read_and_prepare, predict, write):
            if isinstance(outcome, expected):
                if on_error is not None:
                    message = str(outcome).strip().splitlines()[0] if str(outcome).strip() else type(outcome).__name__
                    on_error(path, message)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                rows.append(outcome)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return rows
