"""A trained model on disk: a native ``.keras`` archive with cellkit's metadata inside, and a record beside it.

``models/NAME.keras`` holds the network and a ``cellkit.json`` entry with what the model needs to be used on new
images (a classifier's :class:`cellkit.classifiers.ModelInfo`, a U-Net's :class:`cellkit.unet.UNetConfig`);
``models/NAME.json`` beside it holds ``{"model_info": <the same metadata>, **record}`` (scores, history,
timings). The metadata is read here without Keras, so a models folder can be listed in a blink; networks are
loaded with Keras' safe mode on. Every problem with a file is a one-line :class:`~cellkit.datasets.DataError`
that names it.

>>> saving.model_kind("models/unet.keras")          # "unet" or "classifier", from the metadata alone
>>> saving.read_metadata("models/cellnet.keras")    # the dict inside the archive (None when there is none)
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

from cellkit import config, runtime
from cellkit.datasets import DataError, first_line

#: Name of the metadata entry inside a saved ``.keras`` archive.
METADATA_ENTRY = "cellkit.json"
#: The archive member that holds the weights (Keras' layout), and the metadata key of its sha256.
WEIGHTS_ENTRY = "model.weights.h5"
WEIGHTS_CHECKSUM = "weights_sha256"
#: Metadata ``kind`` of a saved U-Net (a classifier's metadata has none).
UNET_KIND = "unet"


def sidecar_path(path: str | Path) -> Path:
    """The JSON beside a model file: ``models/NAME.keras`` -> ``models/NAME.json``."""
    return Path(path).with_suffix(".json")


def check_model_file(path: str | Path, train_command: str) -> Path:
    """``path`` as a Path when it names an existing ``.keras`` file; otherwise a one-line DataError that says how to
    make one (``train_command``, e.g. ``cellkit train unet``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file; train one with `{train_command} --out {path}`")
    if path.suffix != ".keras":
        raise DataError(f"{path}: expected a native Keras model file ending in .keras")
    return path


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The metadata dict inside a saved model archive, or None when it has no ``cellkit.json`` entry.

    A file that is not a zip archive, or whose entry is not a JSON object, is a one-line DataError.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            if METADATA_ENTRY not in archive.namelist():
                return None
            text = archive.read(METADATA_ENTRY)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DataError(f"{path}: not a .keras model file (not a readable zip archive: {first_line(error)})") \
            from None
    try:
        data = json.loads(text)
    except ValueError as error:
        raise DataError(f"{path}: its {METADATA_ENTRY} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: its {METADATA_ENTRY} is not a JSON object")
    return data


def model_kind(path: str | Path) -> str:
    """``unet`` or ``classifier`` from the metadata inside a ``.keras`` file. A file without readable metadata
    counts as a classifier, whose reader then says in one line what is wrong with it."""
    try:
        data = read_metadata(path)
    except (DataError, OSError):
        return "classifier"
    return UNET_KIND if data is not None and data.get("kind") == UNET_KIND else "classifier"


def save_model(model: Any, metadata: dict[str, Any], path: str | Path, record: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as a native ``.keras`` file with ``metadata`` inside it (:data:`METADATA_ENTRY`, with the
    sha256 of the weights added, so that a damaged copy is refused when it is loaded) and ``NAME.json`` beside it
    holding ``{"model_info": metadata, **record}``. Returns the model path.

    The caller passes a float32 network (saved models run everywhere at full precision)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ValueError(f"{path}: a model file must end in .keras")
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        metadata = {**metadata, WEIGHTS_CHECKSUM: _sha256(archive.read(WEIGHTS_ENTRY))}
        archive.writestr(METADATA_ENTRY, json.dumps(metadata, indent=2, default=config.json_default))
    sidecar_path(path).write_text(config.to_json({"model_info": metadata, **(record or {})}))
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """The record written beside a model (:func:`sidecar_path`), or ``{}`` when there is none or it is unreadable."""
    try:
        return json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}


def check_weights(path: str | Path, metadata: dict[str, Any] | None) -> None:
    """A one-line DataError when the weights inside a saved model do not match the sha256 its metadata recorded
    (a damaged or altered copy); models saved before the checksum was recorded are not checked."""
    expected = (metadata or {}).get(WEIGHTS_CHECKSUM)
    if expected is None:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            found = _sha256(archive.read(WEIGHTS_ENTRY))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: the weights cannot be read ({first_line(error)}); the file is damaged: copy it "
                        "again or retrain the model") from None
    if found != expected:
        raise DataError(f"{path}: the weights do not match the checksum saved with them; the file is damaged or "
                        "altered: copy it again or retrain the model")


def load_network(path: str | Path) -> Any:
    """The Keras network of a saved model (uncompiled, safe mode on), its weights checked against the checksum in
    its metadata (:func:`check_weights`); a one-line DataError if it cannot be read."""
    check_weights(path, read_metadata(path))
    keras = runtime.keras_module()
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except (ValueError, OSError, TypeError, RuntimeError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # h5py raises RuntimeError or OSError for damaged weights, zipfile BadZipFile for a damaged member
        raise DataError(f"{path}: cannot load the model ({first_line(error)}); the file is damaged or was not "
                        "written by cellkit: copy it again or retrain the model") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
