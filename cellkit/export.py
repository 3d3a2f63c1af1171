"""Trained models as bioimage.io model packages (model spec 0.5): ``cellkit export --format bioimageio``.

A package is one zip that tools of the bioimage.io ecosystem (bioimageio.core, deepImageJ, ...) can run without
cellkit: ``rdf.yaml`` (the description), the weights twice (a Keras 3 ``.keras`` file, the original, and a
TensorFlow SavedModel made from it), a test input with the output the network computes for it, a cover image drawn
from them, documentation (markdown), the project's licence and the citations of the architecture, of cellkit and
of the training data. The description is built with :mod:`bioimageio.spec`'s classes; the package is written
through a temporary name, checked (:func:`check_package`: the spec's validation with its file checks, which needs
no network, and bioimageio.core's test, which runs each weight format on the test input and compares with the test
output) and only then renamed into place.

What bioimage.io's pre- and post-processing can express is described in its terms; the rest is stated in the
description and the documentation, with what a user must do:

* a classifier takes the RGB image cropped and resized to its input size (uint8); its pixel scaling is in the
  package (``scale_linear``, ``zero_mean_unit_variance``); the centre crop, the resize and the test-time
  augmentation cellkit averages over are not;
* a U-Net of report 002 takes the 3-channel stack of :func:`cellkit.segmentation.input_stack` (percentile-normalised
  image, its inverse, Canny edges of it): a Canny channel is no bioimage.io operation, so the package's input is the
  stack itself, made by the user; a 1-channel U-Net takes the grey image with its percentile normalisation in the
  package (``scale_range`` and ``clip``). Either way the zoom to the recorded nucleus diameter and the instances
  (seeded watershed, :func:`cellkit.segmentation.probs_to_instances`) stay outside: the package's output is the
  network's per-pixel probabilities.

>>> from cellkit import export
>>> result = export.export_bioimageio("models/unet.keras", "unet.bioimageio.zip")
>>> result.validation, result.test        # "valid-format" (the spec's best), "passed" (bioimageio.core's test)

bioimageio.core 0.11 runs both weight formats here. Its TensorFlow 2 adapter needs a SavedModel whose serving
endpoint returns a dict (it asserts so); Keras 3's plain ``model.export`` returns a bare tensor, so the SavedModel is
written with an endpoint that returns ``{output id: tensor}``. TensorFlow, Keras and bioimageio are imported inside
the functions that need them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import outputs, saving
from cellkit.datasets import DataError

#: Package formats ``cellkit export`` writes.
FORMATS = ("bioimageio",)
#: Weight formats in a package, the original first (the other is converted from it).
WEIGHT_FORMATS = ("keras_v3", "tensorflow_saved_model_bundle")
#: Largest side in pixels of a U-Net's test input (a centre crop of the prepared sample).
TEST_SIDE = 256
#: Papers of the architectures, cited in a package: registry name -> (text, DOI).
ARCHITECTURE_CITATIONS: dict[str, tuple[str, str]] = {
    "unet": ("Ronneberger O., Fischer P., Brox T., U-Net: Convolutional Networks for Biomedical Image Segmentation, "
             "MICCAI 2015, LNCS 9351:234-241", "10.1007/978-3-319-24574-4_28"),
    "lenet": ("LeCun Y., Bottou L., Bengio Y., Haffner P., Gradient-based learning applied to document recognition, "
              "Proceedings of the IEEE 86(11):2278-2324 (1998)", "10.1109/5.726791"),
    "alexnet": ("Krizhevsky A., Sutskever I., Hinton G.E., ImageNet classification with deep convolutional neural "
                "networks, Communications of the ACM 60(6):84-90 (2017)", "10.1145/3065386"),
    "resnet": ("He K., Zhang X., Ren S., Sun J., Deep residual learning for image recognition, CVPR 2016",
               "10.1109/CVPR.2016.90"),
    "vit": ("Dosovitskiy A. et al., An image is worth 16x16 words: transformers for image recognition at scale, "
            "ICLR 2021", "10.48550/arXiv.2010.11929"),
}
_ARCHITECTURE_PAPER = {"unet": "unet", "lenet": "lenet", "lenet-original": "lenet", "alexnet": "alexnet",
                       "resnet18": "resnet", "resnet18-small": "resnet", "resnet50": "resnet", "vit": "vit"}
#: Channel names of a classifier's input, by pixel scaling (``caffe`` models take BGR, see :func:`_scaling_ops`).
_RGB, _BGR = ["red", "green", "blue"], ["blue", "green", "red"]


class ExportError(ValueError):
    """A package that could not be made or did not pass its checks; one line."""


@dataclass
class Export:
    """What :func:`export_bioimageio` wrote: the package, the model kind, its weight formats, the checks' outcomes
    (``valid-format``, the best the spec alone gives, and ``passed``), the sample image its test input came from,
    what the package cannot express and notes for the user."""

    path: Path
    kind: str
    weight_formats: list[str]
    validation: str
    test: str
    sample: str
    not_in_package: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: (name, status) of each step of bioimageio.core's test, e.g. ("Reproduce test outputs from test inputs
    #: (keras_v3)", "passed")
    test_steps: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# The command's work
# --------------------------------------------------------------------------------------------------------


def export_bioimageio(model: str | Path, out: str | Path, sample: str | Path | None = None, overwrite: bool = False,
                      authors: Sequence[str] = (), cite_url: str | None = None,
                      weight_formats: Sequence[str] = WEIGHT_FORMATS,
                      log: Callable[[str], None] | None = None) -> Export:
    """Package the cellkit model file ``model`` (a U-Net or a classifier) as a bioimage.io model at ``out`` (a
    ``.zip``), checked by :func:`check_package` before it is renamed into place.

    ``sample``: the image the test input is made from (default: the first test image of DSB 2018 for a U-Net, of
    PBC-28 for a classifier; a one-line error when that dataset is not found). ``authors``: names for the
    description (default: the cellkit authors). ``cite_url``: where cellkit (or this model) is published, cited in
    the package; without one cellkit is named in the description and documentation but not cited (a citation needs
    a DOI or a URL). ``weight_formats``: :data:`WEIGHT_FORMATS` (the default) or ``("keras_v3",)`` alone (the
    SavedModel is made from it; leaving it out saves time in tests). An existing ``out`` is refused unless
    ``overwrite``; every problem is a one-line error before anything is written, and a package that fails its checks
    is deleted. ``log`` receives progress lines."""
    say = log or (lambda line: None)
    weight_formats = list(weight_formats)
    if "keras_v3" not in weight_formats or not set(weight_formats) <= set(WEIGHT_FORMATS):
        raise ValueError(f"weight formats must hold keras_v3 and come from {', '.join(WEIGHT_FORMATS)}, got "
                         f"{weight_formats}")
    model = Path(model)
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise ExportError(f"{out}: a bioimage.io package is a .zip file; choose an --out ending in .zip")
    if not model.is_file():
        raise DataError(f"{model}: no such model file; export a model that `cellkit train unet` or `cellkit train "
                        "classifier` wrote")
    saving.check_model_file(model, "cellkit train unet")  # a .keras file
    outputs.check_file(out, "--out", overwrite, [model] + ([sample] if sample else []))  # before the work
    part = _load(model)
    image, sample_name = _sample_image(part["kind"], sample)
    say(f"exporting the {part['title']} {model.name}; test input from {sample_name}")
    # bioimageio.core's Keras adapter sets KERAS_BACKEND to its own setting, torch unless the variable says otherwise
    # (child processes would inherit it); cellkit's Keras runs on TensorFlow
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    with tempfile.TemporaryDirectory(prefix="cellkit-export-") as temp:
        folder = Path(temp)
        made = _make_files(part, image, folder, model.stem, weight_formats)
        try:
            with _quiet():  # the spec's warnings (e.g. FAIR suggestions) as log lines: check_package judges
                descr = _description(part, made, model, sample_name, authors, cite_url)
        except ValueError as error:  # pydantic's ValidationError: a value bioimage.io refuses
            raise ExportError(f"{model}: cannot be described for bioimage.io ({_validation_error(error)})") from None
        out.parent.mkdir(parents=True, exist_ok=True)
        from bioimageio.spec import save_bioimageio_package

        with outputs.replacing(out, keep_suffix=True) as package:
            with _quiet():
                save_bioimageio_package(descr, output_path=package)
            say("checking the package: validation (with file checks) and bioimageio.core's test of "
                f"{' and '.join(made['weight_formats'])}")
            validation, test, steps = check_package(package, name=str(out))
    notes = [] if cite_url else ["cellkit is not cited in the package (no --cite-url): a bioimage.io citation "
                                 "needs a DOI or a URL"]
    if part["data_citation"] is None:
        notes.append(f"the training data ({part['data_source']}) is no registered cellkit dataset; its citation is "
                     "not in the package")
    return Export(out, part["kind"], made["weight_formats"], validation, test, sample_name, part["not_in_package"],
                  notes, steps)


def check_package(path: str | Path, name: str | None = None) -> tuple[str, str, list[tuple[str, str]]]:
    """(validation status, test status, (name, status) of each step of the test) of a bioimage.io package: the
    statuses ``valid-format`` and ``passed``; otherwise a one-line ExportError that names the first failed check.

    Validation is :func:`bioimageio.spec.load_description` with ``perform_io_checks`` (every file in the package
    present, its sha256 right); nothing is downloaded (URLs are only asked for, and a failed request is a warning).
    ``valid-format`` with no failed detail is the best the spec alone gives: bioimage.io keeps ``passed`` for a
    resource whose test passed too. The test is :func:`bioimageio.core.test_model`: the format validation again, then
    each weight format runs on the test input, through the package's pre- and post-processing, and must reproduce the
    test output, then runs on other valid input sizes; its overall status must be ``passed``. It runs in a temporary
    working folder because bioimageio.core unzips SavedModel weights into the current one. ``name``: how messages
    name the package (default: its path).
    """
    from bioimageio.spec import InvalidDescr, load_description

    path = Path(path).resolve()
    name = name or str(path)
    with _quiet():
        descr = load_description(path, perform_io_checks=True)
    summary = descr.validation_summary
    if isinstance(descr, InvalidDescr) or summary.status != "valid-format" or summary.errors:
        raise ExportError(f"{name}: the package does not validate ({_first_failure(summary)})")
    validation = summary.status
    from bioimageio.core import test_model

    with tempfile.TemporaryDirectory(prefix="cellkit-bioimageio-test-") as work, contextlib.chdir(work), _quiet():
        summary = test_model(path)
    if summary.status != "passed":
        raise ExportError(f"{name}: bioimageio.core's test failed ({_first_failure(summary)}); nothing was written")
    return validation, summary.status, [(detail.name, detail.status) for detail in summary.details]


@contextlib.contextmanager
def _quiet() -> Any:
    """bioimageio's log lines and Keras' progress bars (its adapter calls ``model.predict``) off for a while: the
    summary that comes back says what went wrong."""
    from loguru import logger

    from cellkit import runtime

    keras = runtime.keras_module()
    was_interactive = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    logger.disable("bioimageio")
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        logger.enable("bioimageio")
        if was_interactive:
            keras.config.enable_interactive_logging()


def _validation_error(error: ValueError) -> str:
    """A pydantic ValidationError (or another ValueError) as ``field: message`` on one line."""
    errors = getattr(error, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        return f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', '')}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _first_failure(summary: Any) -> str:
    """The first failed detail of a bioimage.io ValidationSummary, as ``name: message`` on one line."""
    for detail in summary.details:
        if detail.status == "failed":
            message = next((f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in detail.errors), "")
            text = f"{detail.name}: {message}" if message else detail.name
            return " ".join(text.split())[:300]
    return f"status {summary.status}"


# --------------------------------------------------------------------------------------------------------
# The model and its sample
# --------------------------------------------------------------------------------------------------------


def _load(model: Path) -> dict[str, Any]:
    """What a package needs from a cellkit model file: its network, metadata, how its input is made and what cannot
    be described. One-line DataErrors for anything that is not a cellkit model."""
    from cellkit import classifiers, unet

    record = saving.read_record(model)
    source = str((record.get("data") or {}).get("source") or "")
    if saving.model_kind(model) == saving.UNET_KIND:
        config = unet.read_unet_config(model)
        network = saving.load_network(model)
        if int(network.input_shape[-1]) != len(config.channels):
            raise DataError(f"{model}: the network takes {network.input_shape[-1]} channels, its metadata names "
                            f"{len(config.channels)}")
        trained = unet.TrainedUNet(network, config)
        part = {"kind": "unet", "title": f"{config.n_classes}-class U-Net", "network": network, "trained": trained,
                "metadata": config.to_metadata(), "architecture": "unet", "scores": _scores(record, "unet")}
        part["not_in_package"] = _unet_limits(config)
    else:
        trained = classifiers.load(model)
        info = trained.info
        part = {"kind": "classifier", "title": f"{info.model} classifier", "network": trained.model,
                "trained": trained, "metadata": info.to_dict(), "architecture": info.model,
                "scores": _scores(record, "classifier")}
        part["not_in_package"] = _classifier_limits(info)
    part["data_source"] = source or "unrecorded data"
    part["data_citation"] = _data_citation(source)
    part["trained_on"] = part["metadata"].get("trained_on") or source
    return part


def _sample_image(kind: str, sample: str | Path | None) -> tuple[np.ndarray, str]:
    """The image a test input is made from, and how the package names it."""
    from cellkit import datasets

    if sample is not None:
        return datasets.read_image(sample), Path(sample).name
    name = "dsb2018" if kind == "unet" else "pbc28"
    if datasets.locate(name) is None:
        raise DataError(f"no sample image: the default one comes from {name}, which is not found; pass --sample "
                        "IMAGE (an image like those the model is for) or get it with "
                        f"`cellkit data fetch {datasets.info(name).fetch_name}`")
    if kind == "unet":
        image_id = datasets.dsb2018_split()["test"][0]
        return datasets.load_dsb2018([image_id]).images[0], f"DSB 2018 test image {image_id}"
    test = datasets.load_pbc28("test")
    return test.images[0], f"PBC-28 test image 0 ({test.class_names[int(test.labels[0])]})"


def _data_citation(source: str) -> tuple[str, str] | None:
    """(text, DOI) of a registered training dataset's citation (its first DOI), or None."""
    from cellkit import datasets

    entry = datasets.REGISTRY.get(source)
    if entry is None:
        return None
    found = re.search(r"doi:(10\.\d{4,9}/[^\s;,]+)", entry.citation)
    return (entry.citation, found.group(1)) if found else None


def _scores(record: dict[str, Any], kind: str) -> list[str]:
    """The scores recorded beside the model (test split, else validation), as lines for the documentation."""
    keys = ("f1", "ap", "pq", "seg") if kind == "unet" else ("accuracy", "macro_f1")
    lines = []
    for part in ("test", "validation"):
        report = record.get(part)
        if isinstance(report, dict):
            n = report.get("n_images", report.get("n"))
            values = ", ".join(f"{k} {report[k]:.4f}" for k in keys if isinstance(report.get(k), (int, float)))
            if values:
                lines.append(f"{part} split ({n} images): {values}")
            break
    return lines


def _unet_limits(config: Any) -> list[str]:
    """What a U-Net's package cannot express, each with what the user must do."""
    limits = []
    if tuple(config.channels) != ("original",):
        limits.append(
            f"the input is the {len(config.channels)}-channel stack {', '.join(config.channels)} of "
            "cellkit.segmentation.input_stack, not an image: scale the grey image so that its percentile "
            f"{config.normalise[0]:g} becomes 0 and its percentile {config.normalise[1]:g} becomes 1, clipped to "
            "[0, 1] (percentiles of the whole image, not of each tile)"
            + ("; inverse is 1 minus that" if "inverse" in config.channels else "")
            + (f"; canny is OpenCV's Canny edges (hysteresis thresholds {config.canny_thresholds[0]:g} and "
               f"{config.canny_thresholds[1]:g}, 3x3 Sobel, L1 gradient) of that image quantised to 8 bits, as 0 "
               "or 1" if "canny" in config.channels else "")
            + ("; local is cellkit.segmentation.local_contrast of it" if "local" in config.channels else "")
            + " (bioimage.io has no Canny or channel-making operation)")
    if config.nucleus_diameter is not None:
        limits.append(f"zoom each image so that its nuclei are about {config.nucleus_diameter:g} px across before "
                      "the network (cellkit estimates their diameter, cellkit.segmentation.estimate_diameter), and "
                      "zoom the output back")
    limits.append(f"the output is per-pixel probabilities ({', '.join(config.class_names)}); instances are found "
                  "from them by cellkit.segmentation.probs_to_instances (seeded watershed) with the model's "
                  f"recorded parameters {json.dumps(config.postprocess, sort_keys=True)}: no bioimage.io operation")
    limits.append(f"large images: predict tiles of {config.tile} px overlapping by {config.overlap} px (bioimage.io "
                  "tools tile by themselves; the output has no halo declared)")
    return limits


def _classifier_limits(info: Any) -> list[str]:
    crop = f"a centre crop of {info.crop} px" if info.crop else "the largest centred square"
    limits = [f"the input is an RGB image of exactly {info.input_size}x{info.input_size} px: take {crop} of the "
              f"image and resize it bicubically to {info.input_size} px (cellkit.classifiers.prepare_images)"]
    if info.tta != "none":
        limits.append(f"cellkit averages the probabilities over the {info.tta} views of each image (test-time "
                      "augmentation); the package gives those of the image as it is")
    if info.preprocessing == "caffe":
        limits.append("the channels are in BGR order (what VGG16's ImageNet weights expect)")
    if info.model == "vit":
        limits.append("the Keras weights hold cellkit's PositionEmbedding layer: loading them needs cellkit "
                      "(cellkit.classifiers.vit_layers); the TensorFlow SavedModel weights do not")
    return limits


# --------------------------------------------------------------------------------------------------------
# The files of a package
# --------------------------------------------------------------------------------------------------------


def _make_files(part: dict[str, Any], image: np.ndarray, folder: Path, stem: str,
                weight_formats: Sequence[str]) -> dict[str, Any]:
    """Weights, test tensors, cover and documentation in ``folder``; returns their paths and the weight formats."""
    from cellkit import runtime

    keras = runtime.keras_module()
    network = part["network"]
    test_input, network_input = _test_input(part, image)
    test_output = np.asarray(network.predict_on_batch(network_input), dtype=np.float32)
    if not np.isfinite(test_output).all():
        raise DataError("the network's output on the test input holds NaN or infinite values; the model is damaged")
    made: dict[str, Any] = {"test_input": folder / "test_input.npy", "test_output": folder / "test_output.npy",
                            "input_array": test_input, "output_array": test_output}
    np.save(made["test_input"], test_input)
    np.save(made["test_output"], test_output)
    made["keras_v3"] = folder / f"{_file_stem(stem)}.keras"
    network.save(made["keras_v3"])  # the bare network: no cellkit metadata, no optimizer
    if "tensorflow_saved_model_bundle" in weight_formats:
        made["tensorflow_saved_model_bundle"] = _saved_model(keras, network, folder, _file_stem(stem))
    made["weight_formats"] = [name for name in WEIGHT_FORMATS if name in weight_formats]
    made["keras_version"], made["backend"] = keras.__version__, keras.backend.backend()
    import tensorflow as tf

    made["tensorflow_version"] = tf.__version__
    made["cover"] = folder / "cover.png"
    made["cover"].write_bytes(_cover_png(part, test_input, network_input, test_output))
    made["documentation"] = folder / "README.md"
    return made


def _file_stem(stem: str) -> str:
    """A file name stem that is safe inside a package (letters, digits, ``_-.``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "model"


def _test_input(part: dict[str, Any], image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the package's test input, what the network takes for it) from a sample image: for a U-Net the prepared input
    (zoomed, the stack, or the grey image for a 1-channel one), centre-cropped to at most :data:`TEST_SIDE` px, a
    multiple of 2 ** depth; for a classifier the cropped and resized uint8 image and its scaled version."""
    from cellkit import classifiers, segmentation
    from cellkit.unet import unet_multiple

    trained = part["trained"]
    if part["kind"] == "classifier":
        prepared = trained.prepare([image])
        raw = prepared[..., ::-1] if trained.info.preprocessing == "caffe" else prepared  # BGR in, see _scaling_ops
        return np.ascontiguousarray(raw), classifiers.preprocess(prepared, trained.info.preprocessing)
    config = trained.config
    zoomed = segmentation.zoom(image, trained.scale(image))
    multiple = unet_multiple(config.depth)
    height, width = np.shape(zoomed)[:2]
    side_y, side_x = (min(TEST_SIDE, s) // multiple * multiple for s in (height, width))
    if min(side_y, side_x) < multiple:
        raise DataError(f"the sample image is too small: {height}x{width} px after the zoom, the U-Net needs at "
                        f"least {multiple} px a side")
    top, left = (height - side_y) // 2, (width - side_x) // 2
    crop = np.asarray(zoomed)[top : top + side_y, left : left + side_x]
    network_input = trained.stack(crop)[None].astype(np.float32)  # normalised over the crop, as the package does
    if tuple(config.channels) == ("original",):  # the package normalises: its input is the grey image
        grey = np.asarray(crop, dtype=np.float32)
        grey = grey.mean(axis=-1) if grey.ndim == 3 else grey  # as cellkit.segmentation.input_stack makes grey
        return np.ascontiguousarray(grey[None, :, :, None]), network_input
    return np.ascontiguousarray(network_input), network_input


def _saved_model(keras: Any, network: Any, folder: Path, stem: str) -> Path:
    """A zipped TensorFlow SavedModel of ``network`` whose ``serve`` endpoint returns ``{"output": tensor}``."""
    saved = folder / "saved_model"
    archive = keras.export.ExportArchive()
    archive.track(network)
    shape = tuple(network.input_shape)
    archive.add_endpoint(name="serve", fn=lambda x: {"output": network(x, training=False)},
                         input_signature=[keras.InputSpec(shape=shape, dtype="float32")])
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        archive.write_out(str(saved), verbose=False)
    zipped = shutil.make_archive(str(folder / f"{stem}_savedmodel"), "zip", saved)
    shutil.rmtree(saved)
    return Path(zipped)


def _cover_png(part: dict[str, Any], test_input: np.ndarray, network_input: np.ndarray,
               test_output: np.ndarray) -> bytes:
    """A 2:1 PNG: the test input and the network's output (U-Net: the probabilities as colours; classifier: a bar
    chart of the class probabilities)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4), dpi=80)
    left, right = figure.subplots(1, 2)
    if part["kind"] == "unet":
        left.imshow(network_input[0, ..., 0], cmap="gray", vmin=0, vmax=1)
        left.set_title("input (normalised image)")
        probs = test_output[0]
        names = part["trained"].config.class_names
        if probs.shape[-1] == 3:  # background, cell, edge -> blue, green, red
            right.imshow(np.clip(probs[..., ::-1], 0, 1))
            right.set_title("output: edge (red), cell (green), background (blue)", fontsize=9)
        else:
            right.imshow(probs[..., 0], cmap="magma", vmin=0, vmax=1)
            right.set_title(f"output: p({names[0]})")
        for axis in (left, right):
            axis.set_axis_off()
    else:
        info = part["trained"].info
        rgb = test_input[0][..., ::-1] if info.preprocessing == "caffe" else test_input[0]
        left.imshow(rgb, interpolation="nearest")
        left.set_title(f"input ({info.input_size}x{info.input_size} RGB)")
        left.set_axis_off()
        positions = np.arange(len(info.class_names))
        right.barh(positions, test_output[0], color="tab:blue")
        right.set_yticks(positions, info.class_names, fontsize=8)
        right.invert_yaxis()
        right.set_xlim(0, 1)
        right.set_title("output: class probabilities")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------
# The description
# --------------------------------------------------------------------------------------------------------


def project_licence() -> str:
    """cellkit's licence (SPDX id) from its installed metadata, i.e. pyproject.toml."""
    metadata = importlib.metadata.metadata("cellkit")
    licence = metadata.get("License-Expression") or metadata.get("License")
    if not licence:
        raise ExportError("cellkit's package metadata names no licence; reinstall it (pip install -e .)")
    return licence.strip()


def _description(part: dict[str, Any], made: dict[str, Any], model: Path, sample_name: str,
                 authors: Sequence[str], cite_url: str | None) -> Any:
    """The bioimage.io ModelDescr of a package (spec 0.5), its documentation written beside the other files."""
    from bioimageio.spec.model import v0_5 as spec

    from cellkit import __version__

    kind = part["kind"]
    inputs, outputs_ = (_unet_tensors if kind == "unet" else _classifier_tensors)(part, made)
    entries: dict[str, Any] = {"keras_v3": spec.KerasV3WeightsDescr(
        source=made["keras_v3"], keras_version=spec.Version(made["keras_version"]),
        backend=(made["backend"], spec.Version(made["tensorflow_version"])))}
    if "tensorflow_saved_model_bundle" in made:
        entries["tensorflow_saved_model_bundle"] = spec.TensorflowSavedModelBundleWeightsDescr(
            source=made["tensorflow_saved_model_bundle"], tensorflow_version=spec.Version(made["tensorflow_version"]),
            parent="keras_v3",
            comment="converted from the Keras weights; its serving endpoint returns {'output': probabilities}")
    weights = spec.WeightsDescr(**entries)
    cite = []
    if cite_url:
        cite.append(spec.CiteEntry(text=f"cellkit {__version__}: deep learning for cell microscopy images "
                                        "(the cellkit authors)", url=cite_url))
    paper = ARCHITECTURE_CITATIONS.get(_ARCHITECTURE_PAPER.get(part["architecture"], ""))
    if paper is not None:
        cite.append(spec.CiteEntry(text=paper[0], doi=spec.Doi(paper[1])))
    if part["data_citation"] is not None:
        cite.append(spec.CiteEntry(text=f"Training data: {part['data_citation'][0]}",
                                   doi=spec.Doi(part["data_citation"][1])))
    made["documentation"].write_text(_documentation(part, made, model, sample_name, cite_url))
    title = "U-Net nucleus segmentation" if kind == "unet" else f"{part['architecture']} cell classifier"
    caveat = ("Input: the network's input stack, made by the user (Canny channel, zoom and instance post-processing "
              "are not bioimage.io operations; see the documentation)." if kind == "unet" else
              "Input: the RGB image cropped and resized to the network's size; scaling included, crop and resize "
              "not (see the documentation).")
    description = (f"cellkit {part['title']} trained on {part['trained_on'] or 'unrecorded data'}; outputs "
                   f"per-{'pixel' if kind == 'unet' else 'image'} class probabilities. {caveat}")
    tags = ["cellkit", "keras", "tensorflow", "2d"] + (
        ["segmentation", "nuclei", "unet", "instance-segmentation"] if kind == "unet"
        else ["classification", "cells", part["architecture"]])
    return spec.ModelDescr(
        name=f"cellkit {title}"[:64],
        description=description[:1024],
        authors=[spec.Author(name=name) for name in (authors or ["the cellkit authors"])],
        cite=cite,
        license=spec.LicenseId(project_licence()),
        documentation=spec.FileDescr(source=made["documentation"]),
        covers=[spec.FileDescr(source=made["cover"])],
        tags=tags,
        version=spec.Version(__version__),
        inputs=inputs,
        outputs=outputs_,
        weights=weights,
        config=spec.Config(cellkit={"version": __version__, "kind": kind, "source_file": model.name,
                                    "metadata": json.loads(json.dumps(part["metadata"], default=_json_default))}),
    )


def _json_default(value: Any) -> Any:
    from cellkit import config

    return config.json_default(value)


def _unet_tensors(part: dict[str, Any], made: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    from bioimageio.spec.model import v0_5 as spec

    config = part["trained"].config
    multiple = 2 ** config.depth
    space = [spec.SpaceInputAxis(id=spec.AxisId(axis), size=spec.ParameterizedSize(min=multiple, step=multiple))
             for axis in ("y", "x")]
    if tuple(config.channels) == ("original",):
        low, high = config.normalise
        input_ = spec.InputTensorDescr(
            id=spec.TensorId("image"), axes=[spec.BatchAxis(), *space, spec.ChannelAxis(channel_names=["grey"])],
            description="the grey image (colour averaged to grey), zoomed so that nuclei are about "
                        f"{config.nucleus_diameter} px across" if config.nucleus_diameter else "the grey image",
            test_tensor=spec.FileDescr(source=made["test_input"]),
            data=spec.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=[
                spec.ScaleRangeDescr(kwargs=spec.ScaleRangeKwargs(axes=[spec.AxisId("y"), spec.AxisId("x")],
                                                                  min_percentile=low, max_percentile=high)),
                spec.ClipDescr(kwargs=spec.ClipKwargs(min=0.0, max=1.0)),
                spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
            ])
    else:
        input_ = spec.InputTensorDescr(
            id=spec.TensorId("stack"),
            axes=[spec.BatchAxis(), *space, spec.ChannelAxis(channel_names=list(config.channels))],
            description=f"input stack ({', '.join(config.channels)}) of cellkit.segmentation.input_stack, made by "
                        "the user (see the documentation)",
            test_tensor=spec.FileDescr(source=made["test_input"]),
            data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
    size = [spec.SpaceOutputAxis(id=spec.AxisId(axis), size=spec.SizeReference(tensor_id=input_.id,
                                                                               axis_id=spec.AxisId(axis)))
            for axis in ("y", "x")]
    output = spec.OutputTensorDescr(
        id=spec.TensorId("probabilities"),
        axes=[spec.BatchAxis(), *size, spec.ChannelAxis(channel_names=config.class_names)],
        description=f"per-pixel probabilities of {', '.join(config.class_names)}; instances: see the documentation",
        test_tensor=spec.FileDescr(source=made["test_output"]),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
    return [input_], [output]


def _scaling_ops(preprocessing: str) -> list[Any]:
    """A classifier's pixel scaling (:data:`cellkit.classifiers.PREPROCESSING`) as bioimage.io operations on its
    uint8 input, then float32."""
    from bioimageio.spec.model import v0_5 as spec

    from cellkit import transforms

    ops: list[Any] = {
        "pm1": [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=2 / 255, offset=-1.0))],
        "01": [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=1 / 255))],
        "zscore": [spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(
            axes=[spec.AxisId("y"), spec.AxisId("x"), spec.AxisId("channel")]))],
        "raw": [],
        # the input is BGR (see _test_input); the means are subtracted along the channel axis
        "caffe": [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearAlongAxisKwargs(
            axis=spec.AxisId("channel"), offset=[-m for m in transforms.IMAGENET_BGR_MEANS]))],
    }[preprocessing]
    return [*ops, spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))]


def _classifier_tensors(part: dict[str, Any], made: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    from bioimageio.spec.model import v0_5 as spec

    info = part["trained"].info
    channels = _BGR if info.preprocessing == "caffe" else _RGB
    input_ = spec.InputTensorDescr(
        id=spec.TensorId("image"),
        axes=[spec.BatchAxis(), spec.SpaceInputAxis(id=spec.AxisId("y"), size=info.input_size),
              spec.SpaceInputAxis(id=spec.AxisId("x"), size=info.input_size), spec.ChannelAxis(channel_names=channels)],
        description=f"an {''.join(c[0].upper() for c in channels)} image cropped and resized to "
                    f"{info.input_size}x{info.input_size} px, 8 bits (see the documentation)",
        test_tensor=spec.FileDescr(source=made["test_input"]),
        data=spec.IntervalOrRatioDataDescr(type="uint8", range=(0, 255)),
        preprocessing=_scaling_ops(info.preprocessing))
    output = spec.OutputTensorDescr(
        id=spec.TensorId("probabilities"),
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=list(info.class_names))],
        description="class probabilities (softmax) of the image as it is (no test-time augmentation)",
        test_tensor=spec.FileDescr(source=made["test_output"]),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
    return [input_], [output]


def _documentation(part: dict[str, Any], made: dict[str, Any], model: Path, sample_name: str,
                   cite_url: str | None) -> str:
    """The package's README.md: what the model is, what goes in and comes out, what a user must do outside the
    package, how it was validated, licence and citations."""
    from cellkit import __version__

    kind = part["kind"]
    lines = [f"# cellkit {part['title']}", "",
             f"Exported by `cellkit export` (cellkit {__version__}) from `{model.name}`, trained on "
             f"{part['trained_on'] or 'unrecorded data'}.", ""]
    if kind == "unet":
        config = part["trained"].config
        lines += [f"A U-Net ({config.base_filters} filters in the first level, depth {config.depth}) that gives each "
                  f"pixel the probabilities of {', '.join(config.class_names)}; cellkit turns them into one label "
                  "per nucleus.", ""]
    else:
        info = part["trained"].info
        lines += [f"A {info.model} network that gives an image of one cell the probabilities of "
                  f"{len(info.class_names)} classes: {', '.join(info.class_names)}.", ""]
    lines += ["## Inputs and outputs", "",
              f"- input: {_input_text(part)}",
              f"- output: {_output_text(part)}", "",
              "## What this package does not do, and what you must do", ""]
    lines += [f"- {limit}" for limit in part["not_in_package"]]
    lines += ["", "With cellkit installed, the original model file does all of it: "
              + ("`cellkit segment --model MODEL.keras --input IMAGES --out MASKS`." if kind == "unet"
                 else "`cellkit classify --model MODEL.keras IMAGES --csv predictions.csv`."), ""]
    lines += ["# Validation", "",
              f"The test input was made from {sample_name}: {_test_input_text(part, made)}; the test output is "
              "what the network computes for it. bioimageio.core's test of this package reproduces it with "
              f"{'each weight format' if len(made['weight_formats']) > 1 else 'the weights'} "
              f"({', '.join(made['weight_formats'])}).", ""]
    if part["scores"]:
        lines += ["Scores recorded when the model was trained (cellkit's full pipeline, instances included):", ""]
        lines += [f"- {line}" for line in part["scores"]] + [""]
    else:
        lines += ["No scores were recorded beside the model file.", ""]
    lines += ["## Licence and citation", "",
              f"The package is under the {project_licence()} licence, as cellkit is. Cite the architecture and the "
              "training data:", ""]
    paper = ARCHITECTURE_CITATIONS.get(_ARCHITECTURE_PAPER.get(part["architecture"], ""))
    if paper is not None:
        lines.append(f"- {paper[0]}, doi:{paper[1]}")
    if part["data_citation"] is not None:
        lines.append(f"- {part['data_citation'][0]}")
    else:
        lines.append(f"- the training data ({part['data_source']}) is not a dataset cellkit knows; cite it as its "
                     "source asks")
    lines.append(f"- cellkit {__version__}" + (f", {cite_url}" if cite_url else " (the cellkit authors)"))
    lines += ["", "cellkit's metadata of the model is under `config.cellkit` in rdf.yaml.", ""]
    return "\n".join(lines)


def _test_input_text(part: dict[str, Any], made: dict[str, Any]) -> str:
    shape = "x".join(str(n) for n in made["input_array"].shape[1:3])
    if part["kind"] == "unet":
        return f"zoomed as above, its centre cut to {shape} px, then made into the network's input as above"
    return f"cropped and resized to {shape} px as above"


def _input_text(part: dict[str, Any]) -> str:
    if part["kind"] == "unet":
        config = part["trained"].config
        if tuple(config.channels) == ("original",):
            return (f"the grey image (float32); the package scales it by its percentiles {config.normalise[0]:g} "
                    f"and {config.normalise[1]:g} and clips to [0, 1] (`scale_range`, `clip`)")
        return (f"the stack ({', '.join(config.channels)}) of cellkit.segmentation.input_stack, float32 in [0, 1], "
                "height and width multiples of " + str(2 ** config.depth))
    info = part["trained"].info
    return (f"an {'BGR' if info.preprocessing == 'caffe' else 'RGB'} uint8 image of {info.input_size}x"
            f"{info.input_size} px; the package scales it as the network was trained "
            f"(cellkit's `{info.preprocessing}` scaling)")


def _output_text(part: dict[str, Any]) -> str:
    if part["kind"] == "unet":
        return (f"probabilities ({', '.join(part['trained'].config.class_names)}) per pixel, float32, the "
                "input's height and width")
    return f"probabilities of the classes ({', '.join(part['trained'].info.class_names)}), float32"
