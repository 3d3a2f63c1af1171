"""Loaders that turn files into numpy arrays: the registered datasets and any folder of the same shape.

Every loader checks what it reads and raises :class:`DataError` with one line naming the file and the
fix; none of them writes anything into the folder it reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cellkit.datasets.containers import ImageSet, SegmentationSet
from cellkit.datasets.registry import DataError, require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: The largest image one file may hold, in pixels (PIL's limit against decompression bombs, 179 megapixels): a
#: larger one is refused with one line rather than decoded into memory.
MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
MEDMNIST_SPLITS = ("train", "val", "test")
#: The MedMNIST recipe for PBC: a centre crop of this many pixels before resizing.
PBC_CROP = 200


# --- single files ---------------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Read one image file as a numpy array, as stored (uint8 or uint16; grey (H, W) or colour (H, W, C)).

    TIFFs go through ``tifffile`` (16-bit safe), the rest through PIL. Palette and grey+alpha images are converted
    to grey or RGB; an alpha channel is dropped. What cannot be one 2-D image is a one-line DataError, the same
    for every command and the app: a multi-page TIFF (a stack or a movie), other than 1 to 4 channels, or more
    than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return decode_image(path, tiff=path.suffix.lower() in (".tif", ".tiff"), name=str(path),
                        hint="; replace or remove the file")


def decode_image(source: str | Path | BinaryIO, tiff: bool, name: str, hint: str = "") -> np.ndarray:
    """Decode an image from a path or an open binary stream (e.g. ``io.BytesIO`` of an upload) as
    :func:`read_image` does; ``tiff`` picks ``tifffile`` over PIL. A one-line DataError names ``name``
    (then ``hint``) when it cannot be decoded or is not one 2-D image."""
    try:
        array = _decode_tiff(source, name) if tiff else _decode_pil(source)
    except DataError:  # already one line that names the file
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{name}: more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, the most one image may have; "
                        "cut it into tiles first") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"{name}: not a readable image ({error}){hint}") from None
    return grey_or_colour(array, name)


def grey_or_colour(array: Any, name: str) -> Any:
    """``array`` as one (H, W) grey or (H, W, 3) colour image: alpha dropped, a single channel squeezed; a
    one-line DataError naming ``name`` otherwise. Reads only the shape, so a dask or zarr array stays lazy."""
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # grey+alpha or RGBA: alpha carries no signal here
        array = array[..., :-1]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and 4 < array.shape[-1] <= 8:  # more are spatial, e.g. a channels-first array
        raise DataError(f"{name}: {array.shape[-1]} channels; give a grey, RGB or RGBA image (one channel or one "
                        "colour image per file)")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise DataError(f"{name}: expected one 2-D grey or colour image, got an array of shape {array.shape} "
                        "(channels first, or a stack?); save one image per file")
    return array


def _decode_pil(source: str | Path | BinaryIO) -> np.ndarray:
    with warnings.catch_warnings():
        # PIL warns from half of MAX_IMAGE_PIXELS on and raises DecompressionBombError beyond it
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as image:
            return _pil_to_array(image)


def _decode_tiff(source: str | Path | BinaryIO, name: str) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(source) as tiff:
        pages = len(tiff.pages)
        if pages > 1:
            raise DataError(f"{name}: a TIFF of {pages} pages (a stack, a movie or a channel per page); give one "
                            "image per file")
        if int(np.prod(tiff.pages[0].shape[:2])) > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError("too many pixels")
        return np.asarray(tiff.pages[0].asarray())


def _pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    elif image.mode == "1":
        image = image.convert("L")
    return np.asarray(image)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """A grey (H, W) image as (H, W, 3) by copying the channel; an RGB image unchanged."""
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image


def to_grey(image: np.ndarray) -> np.ndarray:
    """An RGB (H, W, 3) image as grey (H, W) by the mean of channels, same dtype; grey unchanged."""
    if image.ndim == 2:
        return image
    return image.mean(axis=-1).round().astype(image.dtype)


def centre_crop_resize(image: np.ndarray, size: int | None, crop: int | None = PBC_CROP) -> np.ndarray:
    """Centre-crop to ``crop`` x ``crop`` pixels (the largest centred square if None), then resize.

    Resizing is PIL's bicubic, as in the MedMNIST recipe; ``size`` None keeps the crop's size.
    Works on uint8 grey or RGB images.
    """
    height, width = image.shape[:2]
    side = min(height, width) if crop is None else min(crop, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    cropped = image[top : top + side, left : left + side]
    if size is None or size == side:
        return np.ascontiguousarray(cropped)
    resized = Image.fromarray(cropped).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized)


# --- classification: npz files and class folders ---------------------------------------------------------


def load_npz(path: str | Path, split: str | None = None, class_names: list[str] | None = None) -> ImageSet:
    """Load labelled images from a MedMNIST-style npz (``{split}_images``) or a plain one (``images``).

    Parameters
    ----------
    path : the ``.npz`` file.
    split : ``train``, ``val`` or ``test`` for a MedMNIST-style file (default ``test`` when the file
        has splits); must be None for a plain file with ``images`` and ``labels``.
    class_names : names for the class ids when the file stores none (default ``class_0`` ...).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a .npz with images and labels")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from None
    with archive:
        keys = set(archive.files)
        if split is None and "images" not in keys:
            split = "test"
        prefix = f"{split}_" if split else ""
        image_key, label_key = f"{prefix}images", f"{prefix}labels"
        if image_key not in keys or label_key not in keys:
            found = ", ".join(sorted(keys)) or "nothing"
            raise DataError(f"{path}: needs arrays {image_key!r} and {label_key!r}, found {found}")
        images = archive[image_key]
        labels = archive[label_key].reshape(-1)
        files_key = f"{prefix}files"
        files = [str(f) for f in archive[files_key]] if files_key in keys else []
        stored_names = [str(n) for n in archive["class_names"]] if "class_names" in keys else None
    images = _check_image_stack(images, path)
    labels = _check_labels(labels, path, len(images))
    names = stored_names or class_names or [f"class_{i}" for i in range(int(labels.max()) + 1)]
    if labels.max() >= len(names):
        raise DataError(f"{path}: label {int(labels.max())} but only {len(names)} class names")
    return ImageSet(images, labels, names, files, source=str(path))


def _check_image_stack(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise DataError(f"{path}: images must be (n, h, w) or (n, h, w, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and images.size and 0 <= images.min() and images.max() <= 1:
            return (images * 255).round().astype(np.uint8)
        raise DataError(f"{path}: images must be uint8 (or floats in [0, 1]), got {images.dtype}")
    return images


def _check_labels(labels: np.ndarray, path: Path, n_images: int) -> np.ndarray:
    if len(labels) != n_images:
        raise DataError(f"{path}: {n_images} images but {len(labels)} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be integer class ids, got {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise DataError(f"{path}: negative label {int(labels.min())}; class ids start at 0")
    return labels.astype(np.int64)


def load_pbc28(split: str = "train") -> ImageSet:
    """PBC blood cells at 28x28 RGB (BloodMNIST recipe): ``split`` is ``train``, ``val`` or ``test``."""
    if split not in MEDMNIST_SPLITS:
        raise DataError(f"split must be one of {', '.join(MEDMNIST_SPLITS)}, got {split!r}")
    data = load_npz(require("pbc28") / "pbc_blood_28.npz", split=split)
    data.source = "pbc28"
    return data


def load_class_folder(
    path: str | Path,
    size: int | None = None,
    crop: int | None = None,
    per_class: int | None = None,
    seed: int = 0,
    on_error: Callable[[Path, str], None] | None = None,
) -> ImageSet:
    """Load a folder of class subfolders (``<class>/<image>``) as RGB uint8 images.

    Parameters
    ----------
    path : the folder. If it holds ``labels.csv`` with ``path`` and ``label`` (and ``class_name``)
        columns, that file decides the classes and ids; otherwise subfolder names, sorted, are the classes.
    size : side in pixels of the square output (centre crop then bicubic resize); None keeps the original
        size, which then must be the same for all images.
    crop : side of the centre crop before resizing (None: the largest centred square).
    per_class : keep at most this many images per class, chosen with ``seed`` (None: all).
    on_error : called as ``on_error(file, message)`` for an image that cannot be read, which is then left out (as
        ``cellkit classify`` leaves it out); None: the first such image is a one-line DataError.
    """
    folder = Path(path)
    table = _class_folder_table(folder)
    if per_class is not None:
        rng = np.random.default_rng(seed)
        keep = [
            i
            for _, rows in table.groupby("label").groups.items()
            for i in rng.permutation(np.asarray(rows))[:per_class]
        ]
        table = table.loc[sorted(keep)].reset_index(drop=True)
    names = table.drop_duplicates("label").sort_values("label")["class_name"].tolist()  # before any is left out
    images, kept = [], []
    for index, rel in enumerate(table["path"]):
        try:
            images.append(centre_crop_resize(to_rgb(_read_uint8(folder / rel)), size, crop))
            kept.append(index)
        except DataError as error:
            if on_error is None:
                raise
            on_error(folder / rel, str(error))
    if not images:
        raise DataError(f"{folder}: none of its {len(table)} images could be read")
    table = table.iloc[kept].reset_index(drop=True)
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise DataError(f"{folder}: images have different sizes {sorted(shapes)[:3]}...; pass size=N to resize")
    return ImageSet(np.stack(images), table["label"].to_numpy(np.int64), names, table["path"].tolist(), str(folder))


def _class_folder_table(folder: Path) -> pd.DataFrame:
    """The (path, label, class_name) table of a class folder, from labels.csv or from subfolder names."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; give a folder with one subfolder of images per class")
    labels_csv = folder / "labels.csv"
    if labels_csv.is_file():
        table = pd.read_csv(labels_csv)
        missing = {"path", "label"} - set(table.columns)
        if missing:
            raise DataError(f"{labels_csv}: needs columns path and label, missing {', '.join(sorted(missing))}")
        if "class_name" not in table.columns:
            table["class_name"] = [f"class_{i}" for i in table["label"]]
        return table[["path", "label", "class_name"]].reset_index(drop=True)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = [
        (f"{d.name}/{f.name}", label, d.name)
        for label, d in enumerate(class_dirs)
        for f in sorted(d.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not rows:
        raise DataError(f"{folder}: no images found; expected <class>/<image>.png|jpg|tif subfolders")
    return pd.DataFrame(rows, columns=["path", "label", "class_name"])


def _read_uint8(path: Path) -> np.ndarray:
    image = read_image(path)
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image // 257).astype(np.uint8)
    raise DataError(f"{path}: unsupported pixel type {image.dtype}; save it as 8- or 16-bit")


def load_pbc_jpg(size: int = 48, per_class: int | None = None, seed: int = 0, crop: int = PBC_CROP) -> ImageSet:
    """The original PBC JPEGs, centre-cropped to ``crop`` pixels then resized to ``size`` x ``size`` RGB.

    With the defaults this is the MedMNIST recipe at another size (48 as in report 001, 96 for VGG16).
    """
    data = load_class_folder(require("pbc_jpg"), size=size, crop=crop, per_class=per_class, seed=seed)
    data.source = "pbc_jpg"
    return data


# --- segmentation: images with instance masks -------------------------------------------------------------


def load_instance_folder(path: str | Path, ids: Iterable[str] | None = None) -> SegmentationSet:
    """Load ``images/`` with ``labels/`` (or ``masks/``) of instance masks, matched by file stem.

    Images become 2-D grey (RGB averaged); labels must be integer images (0 background, one id per
    object) of the same height and width as their image. ``ids`` limits loading to those stems.
    """
    folder = Path(path)
    image_dir = folder / "images"
    label_dir = next((folder / n for n in ("labels", "masks") if (folder / n).is_dir()), None)
    if not image_dir.is_dir() or label_dir is None:
        raise DataError(f"{folder}: expected subfolders images/ and labels/ (or masks/) of matching files")
    image_files = _files_by_stem(image_dir)
    label_files = _files_by_stem(label_dir)
    wanted = sorted(image_files) if ids is None else list(ids)
    if not wanted:
        raise DataError(f"{image_dir}: no images found (.png, .tif, .jpg)")
    missing = [stem for stem in wanted if stem not in label_files or stem not in image_files]
    if missing:
        raise DataError(f"{folder}: {len(missing)} images have no matching label file, e.g. {missing[0]!r}")
    images, labels = [], []
    for stem in wanted:
        image = to_grey(read_image(image_files[stem]))
        label = _check_instance_labels(read_image(label_files[stem]), label_files[stem])
        if image.shape != label.shape:
            raise DataError(
                f"{label_files[stem]}: labels are {label.shape} but the image is {image.shape}; they must match"
            )
        images.append(image)
        labels.append(label)
    return SegmentationSet(images, labels, wanted, source=str(folder))


def _files_by_stem(folder: Path) -> dict[str, Path]:
    return {f.stem: f for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}


def _check_instance_labels(label: np.ndarray, path: Path) -> np.ndarray:
    if label.ndim != 2:
        raise DataError(f"{path}: an instance mask must be a single-channel integer image, got {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        raise DataError(f"{path}: an instance mask must hold integer ids, got {label.dtype}")
    return label.astype(np.uint16) if label.dtype.itemsize <= 2 else label.astype(np.int32)


def load_dsb2018_manifest() -> pd.DataFrame:
    """The DSB 2018 fluorescence manifest: one row per image (image_id, height, width, n_nuclei, size_group)."""
    return pd.read_csv(require("dsb2018") / "manifest.csv")


def load_dsb2018(ids: Iterable[str] | None = None) -> SegmentationSet:
    """DSB 2018 fluorescence nuclei: 8-bit grey images with uint16 instance labels, sizes vary.

    ``ids`` selects images (e.g. one part of :func:`cellkit.datasets.dsb2018_split`); default all.
    ``groups`` of the result holds each image's ``size_group`` ("256x256", "520x696", ...).
    """
    folder = require("dsb2018")
    manifest = load_dsb2018_manifest().set_index("image_id")
    data = load_instance_folder(folder, ids=list(manifest.index) if ids is None else ids)
    data.source = "dsb2018"
    data.groups = [str(manifest.loc[i, "size_group"]) for i in data.ids]
    return data
