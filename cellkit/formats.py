"""Microscopy image files beyond one PNG: OME-TIFF and OME-Zarr in, label images out as 16-bit PNG, OME-Zarr or
OME-TIFF, with the physical pixel size kept.

>>> opened = open_image("big.ome.zarr")          # level 0 of an OME-Zarr, lazily (a dask array), axes checked
>>> opened.data.shape, opened.pixel_size          # (H, W[, C]), (y, x) in micrometres or None
>>> write_labels_file(labels, "masks/a.ome.tif", "ome-tiff", opened.pixel_size)

What is read
    PNG, JPEG, BMP and TIFF files as :func:`cellkit.datasets.read_image` reads them (whole, in memory); a TIFF
    larger than :data:`LAZY_PIXELS` (or any OME-Zarr) lazily as a dask array, block by block. The pixel size comes
    from the OME-XML of an OME-TIFF (``PhysicalSizeY``/``PhysicalSizeX`` and their units) and from the scale of
    level 0 of an OME-Zarr (NGFF 0.4 or 0.5; ``coordinateTransformations`` and the axes' units). An OME-Zarr
    must have ``y`` and ``x`` axes; any other axis (t, c, z) must hold one entry: one 2-D plane per image.
What is written
    ``png``: a 16-bit PNG (at most 65,535 objects; :func:`cellkit.inference.write_labels`); ``ome-zarr``: an
    OME-Zarr (NGFF 0.4, zarr format 2) with one level ``0`` of uint32 labels, axes y, x and their pixel size;
    ``ome-tiff``: an OME-TIFF of uint32 labels (tiled and BigTIFF when large) with ``PhysicalSizeY/X`` in µm.
    Every output goes to a temporary name in its folder first and is renamed into place
    (:func:`cellkit.outputs.replacing`, :func:`cellkit.outputs.replacing_folder`).

Pixel sizes are (y, x) in micrometres, or None when the file does not say.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import outputs
from cellkit.datasets import DataError, loaders, read_image

#: What ``cellkit segment --output-format`` accepts; ``auto`` is a PNG below :data:`LAZY_PIXELS`, else OME-Zarr.
OUTPUT_FORMATS = ("auto", "png", "ome-zarr", "ome-tiff")
#: The file name ending of each written format.
LABEL_SUFFIXES = {"png": ".png", "ome-zarr": ".ome.zarr", "ome-tiff": ".ome.tif"}
#: Images of more pixels than this are read lazily and segmented block by block (:mod:`cellkit.blockwise`):
#: 4096 x 4096 px. Below it the whole image, its network input and its probabilities fit in well under 2 GiB.
LAZY_PIXELS = 4096 * 4096
#: Factors from a length unit (OME-XML or NGFF spelling) to micrometres.
UNITS_UM = {"pm": 1e-6, "picometer": 1e-6, "nm": 1e-3, "nanometer": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0,
            "micrometer": 1.0, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6}
#: Side of the chunks (and TIFF tiles) of written label images, in pixels.
CHUNK = 1024


@dataclass
class Opened:
    """An image opened for segmentation: ``data`` (H, W) or (H, W, C), a numpy array or a lazy dask array, and
    its ``pixel_size`` (y, x) in micrometres or None."""

    data: Any
    pixel_size: tuple[float, float] | None
    name: str

    @property
    def lazy(self) -> bool:
        """Whether ``data`` is read block by block (a dask array) rather than held in memory."""
        return not isinstance(self.data, np.ndarray)


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` is a zarr folder (``NAME.zarr``, e.g. ``NAME.ome.zarr``): one image, not a folder of them."""
    path = Path(path)
    return path.suffix.lower() == ".zarr" and path.is_dir()


def image_pixels(path: str | Path) -> int | None:
    """H x W of an image file or OME-Zarr from its header only (nothing decoded); None when it cannot be told
    (reading the file later says why)."""
    path = Path(path)
    try:
        if is_zarr(path):
            shape, axes = _zarr_level0(path)[1:3]
            return int(shape[axes.index("y")] * shape[axes.index("x")])
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tiff:
                page = tiff.pages[0]
                return int(page.imagelength * page.imagewidth)
        from PIL import Image

        with Image.open(path) as image:
            return int(image.width * image.height)
    except (DataError, ValueError, OSError, KeyError, IndexError):
        return None
    except Exception:  # noqa: BLE001 - PIL's DecompressionBombError and the like: reading says it in one line
        return None


def open_image(path: str | Path, lazy_pixels: int | None = None) -> Opened:
    """The image in file or zarr folder ``path`` with its pixel size: an OME-Zarr's level 0 and a TIFF of more than
    ``lazy_pixels`` (None: :data:`LAZY_PIXELS`) pixels as dask arrays (read block by block), anything else in
    memory as :func:`cellkit.datasets.read_image` reads it. A one-line DataError when it is not one 2-D image."""
    path = Path(path)
    lazy_pixels = LAZY_PIXELS if lazy_pixels is None else lazy_pixels
    if is_zarr(path):
        return read_ome_zarr(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        pixels = image_pixels(path)
        pixel_size = tiff_pixel_size(path)
        if pixels is not None and pixels > lazy_pixels:
            return Opened(_lazy_tiff(path), pixel_size, str(path))
        return Opened(read_image(path), pixel_size, str(path))
    return Opened(read_image(path), None, str(path))


def _lazy_tiff(path: Path) -> Any:
    """A one-page TIFF as a dask array of its tiles or strips (H, W[, C]); other pages are a one-line DataError."""
    import dask.array as da
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tiff:
        if len(tiff.pages) > 1:
            raise DataError(f"{path}: a TIFF of {len(tiff.pages)} pages (a stack, a movie or a channel per page); give "
                            "one image per file")
    store = tifffile.imread(path, aszarr=True)
    return loaders.grey_or_colour(da.from_zarr(zarr.open_array(store, mode="r")), str(path))


def tiff_pixel_size(path: str | Path) -> tuple[float, float] | None:
    """(y, x) pixel size in micrometres from an OME-TIFF's OME-XML (``PhysicalSizeY``, ``PhysicalSizeX`` and their
    units, µm when unstated); None for a TIFF without it or an unknown unit."""
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        xml = tiff.ome_metadata if tiff.is_ome else None
    if not xml:
        return None
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in ("Y", "X"):
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in UNITS_UM:
            return None
        sizes.append(float(value) * UNITS_UM[unit])
    return sizes[0], sizes[1]


def _multiscales(path: Path) -> tuple[Any, dict[str, Any]]:
    """The zarr group at ``path`` and its first NGFF ``multiscales`` entry (0.4: in the attributes; 0.5: under
    ``ome``); a one-line DataError for a zarr that is not an OME-Zarr image."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as error:  # noqa: BLE001 - zarr raises several kinds for a folder that is not a group
        raise DataError(f"{path}: not a readable OME-Zarr image ({type(error).__name__}: {error})".splitlines()[0]
                        ) from None
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        raise DataError(f"{path}: a zarr without OME-Zarr multiscales metadata; give an OME-Zarr image (NGFF 0.4 or "
                        "0.5) with y and x axes")
    return group, multiscales[0]


def _axes(multiscale: dict[str, Any]) -> list[dict[str, Any]]:
    """The axes of an NGFF multiscale as dicts with ``name`` (and ``unit`` when given); 0.3's names too."""
    return [{"name": a} if isinstance(a, str) else dict(a) for a in multiscale.get("axes") or []]


def _zarr_level0(path: Path) -> tuple[Any, tuple[int, ...], list[str], dict[str, Any]]:
    """(level-0 zarr array, its shape, axis names, multiscale entry) of an OME-Zarr; a one-line DataError when its
    axes are not named, do not match the array, or lack y or x."""
    group, multiscale = _multiscales(path)
    datasets = multiscale.get("datasets") or []
    if not datasets:
        raise DataError(f"{path}: OME-Zarr multiscales without datasets; give an OME-Zarr image")
    try:
        array = group[datasets[0]["path"]]
    except KeyError:
        raise DataError(f"{path}: OME-Zarr level {datasets[0]['path']!r} is missing") from None
    names = [str(a.get("name", "")).lower() for a in _axes(multiscale)]
    if len(names) != array.ndim or "y" not in names or "x" not in names:
        raise DataError(f"{path}: OME-Zarr axes {names or 'unnamed'} for an array of shape {array.shape}; expected "
                        "y and x axes (e.g. ['c', 'y', 'x'])")
    return array, tuple(int(n) for n in array.shape), names, multiscale


def read_ome_zarr(path: str | Path) -> Opened:
    """Level 0 of an OME-Zarr image as a dask array (H, W) with its pixel size (y, x) in µm (None when its axes
    have no known length unit). Axes other than y and x must hold one entry each: a one-line DataError otherwise."""
    import dask.array as da

    path = Path(path)
    array, shape, names, multiscale = _zarr_level0(path)
    extra = [f"{name} ({size})" for name, size in zip(names, shape, strict=True) if name not in "yx" and size != 1]
    if extra:
        raise DataError(f"{path}: OME-Zarr axes {', '.join(extra)} hold more than one plane; cellkit segments one 2-D "
                        "plane: save the nuclear channel alone")
    data = da.from_zarr(array)
    index = tuple(slice(None) if name in ("y", "x") else 0 for name in names)
    data = data[index]
    if names.index("y") > names.index("x"):
        data = data.T
    return Opened(data, _zarr_pixel_size(multiscale, names), str(path))


def _zarr_pixel_size(multiscale: dict[str, Any], names: list[str]) -> tuple[float, float] | None:
    """(y, x) pixel size in µm of level 0 of an NGFF multiscale: the product of its scale transformations times the
    axes' unit; None when a unit is missing or unknown."""
    scale = np.ones(len(names))
    transforms = [*(multiscale["datasets"][0].get("coordinateTransformations") or []),
                  *(multiscale.get("coordinateTransformations") or [])]
    for transform in transforms:
        if transform.get("type") == "scale" and len(transform.get("scale") or []) == len(names):
            scale *= np.asarray(transform["scale"], dtype=float)
    axes = _axes(multiscale)
    sizes = []
    for axis in ("y", "x"):
        unit = axes[names.index(axis)].get("unit")
        if unit not in UNITS_UM:
            return None
        sizes.append(float(scale[names.index(axis)]) * UNITS_UM[unit])
    return sizes[0], sizes[1]


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def label_format(output_format: str, pixels: int | None, lazy_pixels: int | None = None) -> str:
    """The format a label image of ``pixels`` (H x W; None: unknown, taken as small) is written in: ``output_format``
    itself, or for ``auto`` a PNG up to ``lazy_pixels`` (None: :data:`LAZY_PIXELS`) and an OME-Zarr above."""
    lazy_pixels = LAZY_PIXELS if lazy_pixels is None else lazy_pixels
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    if output_format != "auto":
        return output_format
    return "ome-zarr" if pixels is not None and pixels > lazy_pixels else "png"


def label_name(stem: str, fmt: str) -> str:
    """The file name of the label image of input ``stem`` in format ``fmt`` (:data:`LABEL_SUFFIXES`)."""
    return stem + LABEL_SUFFIXES[fmt]


def ngff_attributes(pixel_size: tuple[float, float] | None, name: str = "labels") -> dict[str, Any]:
    """NGFF 0.4 ``multiscales`` attributes of a one-level (y, x) image: the pixel size in micrometres as the scale of
    level ``0``, or scale 1 and no unit when it is unknown."""
    unit = {"unit": "micrometer"} if pixel_size is not None else {}
    scale = [float(s) for s in pixel_size] if pixel_size is not None else [1.0, 1.0]
    return {"multiscales": [{
        "version": "0.4", "name": name,
        "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }]}


def create_ome_zarr(folder: str | Path, shape: tuple[int, int], pixel_size: tuple[float, float] | None,
                    chunk: int = CHUNK) -> Any:
    """A new OME-Zarr at ``folder`` (NGFF 0.4, zarr format 2) with an empty uint32 level ``0`` of ``shape`` (H, W)
    in ``chunk`` x ``chunk`` chunks; returns that zarr array, to be filled block by block."""
    import zarr

    group = zarr.open_group(str(folder), mode="w-", zarr_format=2)
    group.attrs.update(ngff_attributes(pixel_size))
    chunks = (min(chunk, max(1, shape[0])), min(chunk, max(1, shape[1])))
    return group.create_array("0", shape=tuple(int(n) for n in shape), chunks=chunks, dtype="uint32",
                              fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"})


def write_labels_file(labels: Any, path: str | Path, fmt: str, pixel_size: tuple[float, float] | None = None
                      ) -> Path:
    """Write label image ``labels`` (H, W; a numpy array or a zarr array read chunk by chunk) to ``path`` as
    ``ome-zarr`` or ``ome-tiff`` (uint32) keeping ``pixel_size`` (y, x) µm, through a temporary name. (16-bit PNGs
    are :func:`cellkit.inference.write_labels`'.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "ome-zarr":
        with outputs.replacing_folder(path) as temp:
            target = create_ome_zarr(temp, labels.shape, pixel_size)
            for rows, cols in _blocks(labels.shape, CHUNK):
                target[rows, cols] = np.asarray(labels[rows, cols], dtype=np.uint32)
        return path
    if fmt == "ome-tiff":
        return write_ome_tiff(labels, path, pixel_size)
    raise ValueError(f"label files written here are ome-zarr or ome-tiff, not {fmt!r}")


def write_ome_tiff(labels: Any, path: str | Path, pixel_size: tuple[float, float] | None = None,
                   tile: int = 512) -> Path:
    """Write label image ``labels`` (H, W; numpy or zarr, read tile by tile) as a uint32 OME-TIFF at ``path``
    through a temporary name: tiled (``tile`` px) and BigTIFF when large, deflate-compressed, with
    ``PhysicalSizeY/X`` in µm when ``pixel_size`` (y, x) is known. Memory: one row of tiles."""
    import tifffile

    path = Path(path)
    height, width = (int(n) for n in labels.shape)
    metadata: dict[str, Any] = {"axes": "YX"}
    if pixel_size is not None:
        metadata.update(PhysicalSizeY=float(pixel_size[0]), PhysicalSizeYUnit="µm",
                        PhysicalSizeX=float(pixel_size[1]), PhysicalSizeXUnit="µm")
    large = height * width > tile * tile
    with outputs.replacing(path, keep_suffix=True) as temp:
        if large:
            tifffile.imwrite(temp, _tiles(labels, tile), shape=(height, width), dtype=np.uint32, tile=(tile, tile),
                             ome=True, metadata=metadata, compression="zlib", bigtiff=height * width * 4 > 2**31)
        else:
            tifffile.imwrite(temp, np.asarray(labels, dtype=np.uint32), ome=True, metadata=metadata,
                             compression="zlib")
    return path


def _tiles(labels: Any, tile: int) -> Iterator[np.ndarray]:
    """The ``tile`` x ``tile`` tiles of ``labels`` (H, W) in row-major order, edge tiles zero-padded, read one row of
    tiles at a time (as tifffile writes them)."""
    height, width = labels.shape
    for top in range(0, height, tile):
        band = np.asarray(labels[top : top + tile, :], dtype=np.uint32)
        for left in range(0, width, tile):
            piece = np.zeros((tile, tile), np.uint32)
            part = band[:, left : left + tile]
            piece[: part.shape[0], : part.shape[1]] = part
            yield piece


def _blocks(shape: tuple[int, ...], side: int) -> Iterator[tuple[slice, slice]]:
    """(rows, cols) slices of the ``side`` x ``side`` blocks covering (H, W) ``shape``, row-major."""
    for top in range(0, int(shape[0]), side):
        for left in range(0, int(shape[1]), side):
            yield slice(top, min(top + side, int(shape[0]))), slice(left, min(left + side, int(shape[1])))


def read_labels_file(path: str | Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """(labels (H, W), pixel size (y, x) µm or None) of a label file this module wrote (PNG, OME-TIFF, OME-Zarr),
    whole, in memory: for checks and small images."""
    path = Path(path)
    if is_zarr(path):
        opened = read_ome_zarr(path)
        return np.asarray(opened.data), opened.pixel_size
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path), tiff_pixel_size(path)
    return read_image(path), None


def describe_pixel_size(pixel_size: tuple[float, float] | None) -> str | None:
    """A pixel size for a manifest: ``"0.65 x 0.65 um"`` (y x), or None."""
    if pixel_size is None or not all(math.isfinite(s) for s in pixel_size):
        return None
    return f"{pixel_size[0]:g} x {pixel_size[1]:g} um"

