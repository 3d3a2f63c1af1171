"""Models on files: classify images, segment images into label files, and read models of either kind. What the
command line (``cellkit classify``, ``cellkit segment``) and the app call.

>>> from cellkit import inference
>>> files = inference.image_files("my_images/")                       # a file, or a folder searched recursively
>>> rows = inference.classify_files(inference.load_model("models/cellnet.keras"), files)
>>> rows = inference.segment_files(inference.load_model("models/unet.keras"), files, "masks/")

Label images are 16-bit PNGs (0 background, one id per nucleus): :func:`write_labels`, :func:`encode_labels`; with
``output_format`` OME-Zarr or OME-TIFF (:mod:`cellkit.formats`), and images above
:data:`cellkit.formats.LAZY_PIXELS` are then segmented block by block (:mod:`cellkit.blockwise`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cellkit import blockwise, classifiers, formats, outputs, plots, runtime, saving, unet
from cellkit.datasets import DataError, first_line, read_image, to_grey
from cellkit.datasets.loaders import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS

#: The precision models predict in, for the command line and the app alike: ``auto`` is bfloat16 where the CPU has
#: native instructions for it (about twice as fast at the same accuracy: the default U-Net's test F1 0.8988 and SEG
#: 0.7806 in float32, 0.8990 and 0.7804 in bfloat16; docs/unet_default_model.md), float32 elsewhere.
DEFAULT_PRECISION = "auto"
#: What makes one input fail without stopping the others: unreadable, too large, too many objects, out of memory.
SKIPPABLE = (DataError, ValueError, OSError, MemoryError, Image.DecompressionBombError)


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
    if path.is_file() or formats.is_zarr(path):  # an OME-Zarr folder is one image
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if ((p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
                                                    or formats.is_zarr(p))
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and not any(part.lower().endswith(".zarr") for part in p.relative_to(path).parts[:-1]))
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
            except SKIPPABLE as error:  # e.g. a 225-megapixel image: the others' results are kept
                if on_error is not None:
                    on_error(path, first_line(error))
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
    """Write an instance image as a 16-bit PNG (:func:`encode_labels`) through a temporary name
    (:func:`cellkit.outputs.write_bytes`); a DataError naming ``path`` if it cannot be encoded."""
    path = Path(path)
    try:
        data = encode_labels(labels)
    except DataError as error:
        raise DataError(f"{path}: {error}") from None
    return outputs.write_bytes(path, data)


def _overlay_png(image: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Outlines of ``labels`` on ``image`` as an 8-bit RGB PNG at ``path`` (through a temporary name)."""
    rgb = plots.overlay_instances(to_grey(image) if image.ndim == 3 else image, labels)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
    outputs.write_bytes(path, buffer.getvalue())


def relative_input(path: Path, root: Path | None) -> str:
    """How an input is named in a run's manifest and counts.csv: its path under folder ``root`` (POSIX
    separators), or its file name when there is no root."""
    return path.relative_to(root).as_posix() if root is not None else path.name


def output_names(files: Sequence[Path], root: Path | None = None, overlay: bool = False,
                 label_formats: dict[Path, str] | None = None) -> dict[Path, tuple[Path, ...]]:
    """The files :func:`segment_files` writes for each input, relative to the output folder: ``STEM.png`` (or the
    suffix of its entry in ``label_formats``, :func:`label_formats`; and ``STEM_overlay.png``) in the input's
    subfolder under ``root`` (none without a root). ``STEM`` drops ``.ome`` too (``a.ome.tif`` -> ``a``)."""
    names = {}
    for path in files:
        folder = path.relative_to(root).parent if root is not None else Path()
        stem = path.stem.removesuffix(".ome") if path.stem.lower().endswith(".ome") else path.stem
        label = formats.label_name(stem, (label_formats or {}).get(path, "png"))
        names[path] = (folder / label, *((folder / f"{stem}_overlay.png",) if overlay else ()))
    return names


def label_formats(files: Sequence[Path], output_format: str = "auto") -> dict[Path, str]:
    """The format each input's labels are written in (:func:`cellkit.formats.label_format`: for ``auto``, by its
    size read from its header)."""
    return {path: formats.label_format(output_format, formats.image_pixels(path) if output_format == "auto"
                                       else None) for path in files}


def segment_header(model_sha256: str, input_path: Path | None, tile: int | None, flips: bool, precision: str,
                   overlay: bool, output_format: str = "auto", **description: Any) -> dict[str, Any]:
    """The manifest header of a segmentation run (:class:`cellkit.outputs.RunFolder`): what makes its results, the
    model's checksum, the input (absolute) and the options that change them (``tile`` side in pixels or None for
    whole images, ``flips``, the ``precision`` computed in, ``overlay``, and ``output_format`` when it is not
    ``auto``, so that runs from before that option continue), plus ``description`` (``command``, ``model``,
    ``resume``: for people)."""
    from cellkit import __version__

    options = {"tile": tile, "flips": bool(flips), "precision": precision, "overlay": bool(overlay)}
    if output_format != "auto":
        options["output_format"] = output_format
    return {"kind": "segment", "cellkit_version": __version__, **description, "model_sha256": model_sha256,
            "input": str(input_path.resolve()) if input_path is not None else None, "options": options}


def _weights_sha256(trained: unet.TrainedUNet) -> str:
    """A checksum of a network's weights (for runs of a model that did not come from a file)."""
    digest = hashlib.sha256()
    for weights in trained.model.get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    return "weights:" + digest.hexdigest()


def segment_files(trained: unet.TrainedUNet, files: Sequence[Path], out_dir: str | Path, root: Path | None = None,
                  overlay: bool = False, tile: int | None | str = "auto", progress: bool = True,
                  on_error: Callable[[Path, str], None] | None = None, run: outputs.RunFolder | None = None,
                  overwrite: bool = False, output_format: str = "auto") -> list[dict[str, Any]]:
    """Segment each file and write ``<out_dir>/<stem>.png`` (uint16 instance ids; 0 is background), with
    ``<stem>_overlay.png`` when ``overlay``. Files found under folder ``root`` keep their subfolders in
    ``out_dir``, so that equal stems in different subfolders do not collide; two inputs that would still write one
    name (``a.png`` and ``a.tif``) are a one-line OutputError before any work.

    ``out_dir`` is a run folder (:class:`cellkit.outputs.RunFolder`; ``run``, or opened here with ``overwrite``):
    each finished input is recorded in its manifest as it finishes, inputs it already holds (same model, options and
    unchanged file) are skipped, ``counts.csv`` is written from the manifest at the end, and an interruption
    (Ctrl-C, an error) leaves the run marked unfinished with its counts written before the exception goes on.
    Every file goes to a temporary name first and is renamed into place.

    ``output_format`` (:data:`cellkit.formats.OUTPUT_FORMATS`): ``png`` as above; ``ome-zarr`` or ``ome-tiff``
    (``STEM.ome.zarr``, ``STEM.ome.tif``, uint32, with the input's pixel size); ``auto``: PNG up to
    :data:`cellkit.formats.LAZY_PIXELS` pixels, OME-Zarr above. An image above that size written as OME-Zarr or
    OME-TIFF is read lazily and segmented block by block (:func:`cellkit.blockwise.segment_blockwise`), one such
    image at a time, after the images segmented whole.

    Returns one row per segmented or already-done file: ``file``, ``labels`` (the written path), ``n_nuclei``,
    ``mean_area_px`` (0 when none), ``height``, ``width``. A file that cannot be read or segmented is skipped and
    reported to ``on_error(path, message)``; a file that cannot be written stops the run (OutputError). Reading and
    preparing the next file, and finding and writing the previous one's nuclei, run on worker threads while the
    network works (:func:`cellkit.runtime.overlapped`).
    """
    out_dir = Path(out_dir)
    fmts = label_formats(files, output_format)
    names = output_names(files, root, overlay, fmts)
    outputs.check_unique(names, out_dir)
    if run is None:
        tile_used = trained.config.tile if tile == "auto" else tile
        run = outputs.RunFolder.open(out_dir, segment_header(
            _weights_sha256(trained), root, tile_used, trained.flips, runtime.compute_precision(trained.model),
            overlay, output_format, command="cellkit.inference.segment_files"), overwrite)
    done, todo = done_and_todo(run, files, out_dir, root)
    rows = list(done.values())
    failed: dict[str, str] = {}
    try:
        rows += segment_inputs(trained, todo, out_dir, names, root, run, tile, progress, on_error, failed, fmts)
    except BaseException as error:
        stop_run(run, error, failed)
        raise
    run.finish(failed)
    return rows


def segment_inputs(trained: unet.TrainedUNet, files: Sequence[Path], out_dir: Path,
                  names: dict[Path, tuple[Path, ...]], root: Path | None, run: outputs.RunFolder,
                  tile: int | None | str, progress: bool, on_error: Callable[[Path, str], None] | None,
                  failed: dict[str, str], fmts: dict[Path, str] | None = None) -> list[dict[str, Any]]:
    """The work of :func:`segment_files` on the inputs not done yet; skipped ones are added to ``failed``.
    ``fmts``: each input's label format (:func:`label_formats`; PNG when absent)."""
    fmts = fmts or {}
    large = [path for path in files if _by_blocks(path, fmts.get(path, "png"))]
    rows: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="segmenting", unit="image", file=sys.stderr, dynamic_ncols=True)

    def read_and_prepare(path: Path) -> tuple[os.stat_result, np.ndarray, Any, np.ndarray]:
        stat = path.stat()  # before reading: a file changed meanwhile is redone by the next run
        image, pixel_size = _read_whole(path)
        return stat, image, pixel_size, trained.prepare(image)

    def predict(prepared: tuple[os.stat_result, np.ndarray, Any, np.ndarray]
                ) -> tuple[os.stat_result, np.ndarray, Any, np.ndarray]:
        stat, image, pixel_size, stack = prepared
        return stat, image, pixel_size, trained.predict_stack(stack, tile)

    def write(path: Path, predicted: tuple[os.stat_result, np.ndarray, Any, np.ndarray]) -> dict[str, Any]:
        stat, image, pixel_size, prediction = predicted
        labels, _ = trained.finish(image, prediction)
        label_name, *overlay_name = names[path]
        fmt = fmts.get(path, "png")
        data = encode_labels(labels) if fmt == "png" else None  # a DataError here skips the file, as a read error
        try:
            if data is not None:
                outputs.write_bytes(out_dir / label_name, data)
            else:
                formats.write_labels_file(labels, out_dir / label_name, fmt, pixel_size)
            if overlay_name:
                _overlay_png(image, labels, out_dir / overlay_name[0])
        except OSError as error:  # the output folder, not this input: stop rather than fail every file alike
            raise _cannot_write(error, out_dir) from None
        areas = np.bincount(labels.ravel())[1:]
        areas = areas[areas > 0]
        entry = _entry(path, root, stat, label_name, overlay_name[0] if overlay_name else None, pixel_size,
                       n_nuclei=int(areas.size), mean_area_px=round(float(areas.mean()), 1) if areas.size else 0.0,
                       height=int(labels.shape[0]), width=int(labels.shape[1]))
        run.record(entry)  # after the files are in place: the manifest never names a file that is not there
        return result_row(path, out_dir, entry)

    def by_blocks(path: Path) -> dict[str, Any]:
        stat = path.stat()
        opened = formats.open_image(path, lazy_pixels=0)  # read block by block, never whole
        label_name = names[path][0]
        try:
            summary = blockwise.segment_blockwise(trained, opened.data, out_dir / label_name, fmts[path],
                                                  opened.pixel_size, tile=tile, progress=progress)
        except OSError as error:
            raise _cannot_write(error, out_dir) from None
        entry = _entry(path, root, stat, label_name, None, opened.pixel_size,
                       **{key: summary[key] for key in ("n_nuclei", "mean_area_px", "height", "width", "blocks")})
        run.record(entry)
        return result_row(path, out_dir, entry)

    def by_blocks_steps():
        for path in large:
            try:
                yield path, by_blocks(path)
            except Exception as error:  # noqa: BLE001 - sorted out below, as the overlapped steps' outcomes
                yield path, error

    steps = runtime.overlapped([p for p in files if p not in large], read_and_prepare, predict, write)
    try:
        for path, outcome in itertools.chain(steps, by_blocks_steps()):
            if isinstance(outcome, (outputs.OutputError, runtime.NonFiniteOutputs)):  # every file would fail alike
                raise outcome
            if isinstance(outcome, SKIPPABLE):
                failed[relative_input(path, root)] = first_line(outcome)
                if on_error is not None:
                    on_error(path, first_line(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                rows.append(outcome)
            if bar is not None:
                bar.update(1)
    finally:
        steps.close()  # waits for the worker threads (an interruption included): nothing is written after this
        if bar is not None:
            bar.close()
    return rows


def _entry(path: Path, root: Path | None, stat: os.stat_result, label_name: Path, overlay_name: Path | None,
           pixel_size: tuple[float, float] | None, **counts: Any) -> dict[str, Any]:
    """The manifest entry of one segmented input: what it was (path under ``root``, size, modification time, read
    before the image), what was written, ``counts`` (n_nuclei, mean_area_px, height, width, ...) and the pixel
    size when the input had one."""
    return {"input": relative_input(path, root), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "output": label_name.as_posix(), "overlay": overlay_name.as_posix() if overlay_name else None, **counts,
            **({"pixel_size_um": list(pixel_size)} if pixel_size is not None else {})}


def _cannot_write(error: OSError, out_dir: Path) -> outputs.OutputError:
    """The one-line error that stops a run whose output folder cannot be written."""
    return outputs.OutputError(f"{error.filename or out_dir}: cannot write ({error.strerror or error}); check the "
                               "output folder (space left, permissions, a file in the way)")


def done_and_todo(run: outputs.RunFolder, files: Sequence[Path], out_dir: Path, root: Path | None
                  ) -> tuple[dict[Path, dict[str, Any]], list[Path]]:
    """The inputs ``run`` finished before with the same file (their result rows, by path) and those still to do,
    in the order of ``files``."""
    done: dict[Path, dict[str, Any]] = {}
    todo = []
    for path in files:
        try:
            entry = run.finished_entry(relative_input(path, root), path.stat())
        except OSError:  # gone since it was listed: reading it says so
            entry = None
        if entry is None:
            todo.append(path)
        else:
            done[path] = result_row(path, out_dir, entry)
    return done, todo


def stop_run(run: outputs.RunFolder, error: BaseException, failed: dict[str, str]) -> None:
    """Mark ``run`` unfinished because of ``error`` (interrupted by Ctrl-C or SIGTERM, or failed), its counts
    written: what :func:`segment_files` and the cluster's run do before the exception goes on."""
    run.stop("interrupted" if isinstance(error, KeyboardInterrupt) else f"failed: {first_line(error)}", failed)


def _by_blocks(path: Path, fmt: str) -> bool:
    """Whether input ``path`` is segmented block by block: labels as OME-Zarr or OME-TIFF of an image of more than
    :data:`cellkit.formats.LAZY_PIXELS` pixels."""
    return fmt in ("ome-zarr", "ome-tiff") and (formats.image_pixels(path) or 0) > formats.LAZY_PIXELS


def _read_whole(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """(image, pixel size (y, x) µm or None) of an input segmented whole: an OME-Zarr's level 0 (refused beyond
    :data:`cellkit.datasets.loaders.MAX_IMAGE_PIXELS`), any other file as :func:`read_image` reads it."""
    if formats.is_zarr(path):
        opened = formats.read_ome_zarr(path)
        if int(np.prod(opened.data.shape[:2])) > MAX_IMAGE_PIXELS:
            raise DataError(f"{path}: more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels to segment whole; write its "
                            "labels as ome-zarr or ome-tiff (segmented block by block)")
        return np.asarray(opened.data), opened.pixel_size
    image = read_image(path)
    return image, formats.tiff_pixel_size(path) if path.suffix.lower() in (".tif", ".tiff") else None


def result_row(path: Path, out_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """A row of :func:`segment_files` from a manifest entry."""
    return {"file": str(path), "labels": str(out_dir / entry["output"]),
            **{key: entry[key] for key in ("n_nuclei", "mean_area_px", "height", "width")}}


