"""Large images block by block: segment an image of any size with peak memory set by the block size, not the image.

>>> from cellkit import blockwise, formats, unet
>>> trained = unet.load_unet("models/unet.keras")
>>> opened = formats.open_image("slide.ome.zarr")                    # a dask array, never read whole
>>> summary = blockwise.segment_blockwise(trained, opened.data, "masks/slide.ome.zarr", "ome-zarr",
...                                       opened.pixel_size)         # {"n_nuclei": ..., "mean_area_px": ...}

How (after dask-image's ``label`` and Cellpose's distributed mode; written anew here)
    1. One normalisation and one zoom for the whole image (:func:`plan_blocks`): the percentiles of
       :func:`cellkit.segmentation.percentile_normalise` from a strided sample of at most :data:`SAMPLE_PIXELS`
       pixels, the zoom from the nuclei Otsu finds in a 3 x 3 grid of crops (an image of at most
       :data:`SAMPLE_PIXELS` pixels: from all of it, as :meth:`cellkit.unet.TrainedUNet.segment`). The zoom is
       rounded to a fraction p / q with q <= 16 (:func:`aligned_factor`; within 3.3 % for zooms of 0.5 to 2) and
       blocks and halos are multiples of :func:`alignment`, so that every block lands on the same zoomed pixel
       grid and U-Net pooling grid as the whole image: block-wise labels then equal the whole image's labels at
       that zoom when the image's sides are multiples of q (measured: F1 1.0 at IoU 0.5 on a 511 x 763 px
       simulated field at zoom 10/7, a default-architecture U-Net trained for only 60 steps, model tiles on; with
       512 x 768 px, whose zoomed grid is off by a fraction of a pixel, that barely trained model gives F1 0.91: it
       is that sensitive to sub-pixel shifts. ``tests/test_blockwise.py`` asks for at least 0.99 of a tiny one).
    2. ``dask.array.map_overlap`` hands each block with a halo of ``halo`` pixels on every side that has a
       neighbour to the segmenter (:class:`UNetBlocks`: zoom, normalise, network, instances). Its labels in the
       block's core go to the zarr array on disk at once, numbered 1..m within the block; what the block returns is
       small: m, and for each face its core's edge line and the labels it sees one pixel beyond the face
       (:func:`block_labels`).
    3. Stitching (:func:`stitch`): every block's ids are offset by the number of nuclei of the blocks before it,
       so ids are unique across blocks; two labels on either side of a face are one nucleus when each block's own
       segmentation carries its label across the face (block A labels the pixel beyond the face with A's label,
       and block B the pixel before it with B's). Two different nuclei that merely touch at a face stay apart, as
       each block sees the other nucleus there. The merges are connected components of that graph; ids are then
       made consecutive (1..N, in order of first block).
    4. Each block of the zarr array is relabelled in place (:func:`relabel_in_place`), counting areas as it goes.

Why the halo is what it is (:func:`default_halo`)
    A block's labels equal the whole image's when every nucleus that touches its core lies wholly inside the
    block with its halo, and the network sees around each of its pixels what it would see in the whole image.
    So the halo is the U-Net's receptive-field radius, :func:`receptive_radius` (107 px for depth 4), plus the
    largest nucleus, :data:`LARGEST_NUCLEUS` times the model's ``nucleus_diameter`` (72 px for 24 px nuclei), in
    the network's pixels: 179, rounded up to a multiple of 16 (192), converted to the image's pixels by the zoom
    and rounded up to a multiple of :func:`alignment`.

Memory: one block with its halo at a time per worker: the block (2048 + 2 x 192 px a side at the network's scale by
default), its three input channels and three output probabilities in float32 and the network's activations of
one tile batch. Measured with ``benchmarks/large_image.py`` (default-architecture U-Net, one worker): peak RSS of
the whole process, TensorFlow included, 1520 MiB for a 4096 x 4096 image and 1589 MiB for 8192 x 8192. Block
sizes and halos are in the network's pixels (after the zoom) unless named ``..._px`` of the image.
"""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from cellkit import formats, outputs, segmentation
from cellkit.datasets import DataError

#: Default block side in the network's pixels (after the zoom to the model's nucleus size).
DEFAULT_BLOCK = 2048
#: The largest nucleus a halo must hold, as a multiple of the model's ``nucleus_diameter`` (DSB 2018's nuclei span
#: about 0.4 to 3 times their image's median diameter).
LARGEST_NUCLEUS = 3.0
#: The largest nucleus in pixels for a model without a ``nucleus_diameter`` (images used at their own scale; DSB
#: 2018's largest are about 94 px).
LARGEST_NUCLEUS_PX = 96
#: At most this many pixels are sampled for the normalisation percentiles (and an image this small is used whole
#: for the zoom too).
SAMPLE_PIXELS = 4_000_000
#: Side in image pixels of each of the 3 x 3 crops the nucleus size is estimated on in a larger image.
DIAMETER_CROP = 1024

#: Zoom factors of block-wise segmentation are fractions with at most this denominator (:func:`aligned_factor`).
ZOOM_DENOMINATOR = 16

#: A block segmenter: (h, w[, C]) image block with its halo -> (h, w) integer labels, 0 background.
BlockSegmenter = Callable[[np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------------


def receptive_radius(depth: int = 4) -> int:
    """How far (px) a U-Net of ``depth`` poolings (:func:`cellkit.unet.build_unet`) looks from an output pixel.

    At level l (pixels 2^l wide) each 3 x 3 convolution adds 2^l on each side, a 2 x 2 pooling or transpose
    convolution 2^l / 2 (the full field grows by 2^l): two convolutions per level down, at the bottom and up, one
    pooling and one transpose convolution per level. Field width 1 + 10 (2^d - 1) + 4 * 2^d = 14 * 2^d - 9;
    radius 7 * 2^d - 5 (107 px for depth 4).
    """
    return 7 * 2 ** int(depth) - 5


def default_halo(config: Any) -> int:
    """The halo in the network's pixels for a :class:`cellkit.unet.UNetConfig`: :func:`receptive_radius` plus the
    largest nucleus (:data:`LARGEST_NUCLEUS` x ``nucleus_diameter``, or :data:`LARGEST_NUCLEUS_PX`), rounded up to
    a multiple of 2^depth. 192 px for the default model."""
    largest = LARGEST_NUCLEUS_PX if config.nucleus_diameter is None else LARGEST_NUCLEUS * config.nucleus_diameter
    multiple = 2 ** int(config.depth)
    return int(math.ceil((receptive_radius(config.depth) + largest) / multiple) * multiple)


def block_chunks(length: int, block: int, halo: int) -> tuple[int, ...]:
    """Block sizes (px) along one axis of ``length`` px: ``block`` each, the remainder last; a remainder smaller than
    ``halo`` joins the block before it (a halo may not be wider than a neighbouring block)."""
    if block < 1:
        raise ValueError(f"block must be at least 1 px, got {block}")
    sizes = [block] * (length // block) + ([length % block] if length % block else [])
    if len(sizes) > 1 and sizes[-1] < halo:
        last = sizes.pop()
        sizes[-1] += last
    return tuple(sizes) or (length,)


# --------------------------------------------------------------------------------------------------------
# One normalisation and one zoom for the whole image
# --------------------------------------------------------------------------------------------------------


@dataclass
class BlockPlan:
    """What every block shares: ``factor`` (the zoom), ``low``, ``high`` (the normalisation's values at the
    model's percentiles, in image intensity units), ``block_px`` and ``halo_px`` (in the image's pixels)."""

    factor: float
    low: float
    high: float
    block_px: int
    halo_px: int


def _grey(block: Any) -> np.ndarray:
    """(h, w) float32 grey of an (h, w) or (h, w, C) block (the mean of its channels), as the whole-image path."""
    block = np.asarray(block)
    if block.ndim == 3:
        return block.mean(axis=-1, dtype=np.float32) if block.shape[-1] > 1 else block[..., 0].astype(np.float32)
    return block.astype(np.float32, copy=False)


def estimate_factor(trained: Any, image: Any, crop: int = DIAMETER_CROP) -> float:
    """The zoom that brings the image's nuclei to the model's ``nucleus_diameter`` (1.0 without one): from the whole
    image up to :data:`SAMPLE_PIXELS` pixels (as :meth:`cellkit.unet.TrainedUNet.scale`), else from the nuclei
    Otsu finds in a 3 x 3 grid of ``crop`` x ``crop`` crops, pooled."""
    target = trained.config.nucleus_diameter
    if target is None:
        return 1.0
    height, width = image.shape[:2]
    if height * width <= SAMPLE_PIXELS:
        return float(trained.scale(np.asarray(image)))
    areas = []
    for top in np.linspace(0, max(0, height - crop), 3).astype(int):
        for left in np.linspace(0, max(0, width - crop), 3).astype(int):
            labels = segmentation.otsu_watershed(_grey(image[top : top + crop, left : left + crop]))
            counts = np.bincount(labels.ravel())[1:]
            areas.append(counts[counts > 0])
    pooled = np.concatenate(areas)
    diameter = float(2 * np.sqrt(np.median(pooled) / np.pi)) if pooled.size else float("nan")
    return segmentation.scale_factor(diameter, target)


def normalisation(image: Any, factor: float, percentiles: Sequence[float]) -> tuple[float, float]:
    """(low, high): the ``percentiles`` of the grey image, from every pixel of an image of at most
    :data:`SAMPLE_PIXELS` (zoomed by ``factor`` first, exactly as the whole-image path), else from a strided sample
    of at most that many (read block by block for a dask array)."""
    height, width = image.shape[:2]
    stride = max(1, math.ceil(math.sqrt(height * width / SAMPLE_PIXELS)))
    sample = image[::stride, ::stride]
    sample = _grey(sample.compute() if hasattr(sample, "compute") else sample)
    if stride == 1:
        sample = segmentation.zoom(sample, factor)
    low, high = np.percentile(sample, list(percentiles))
    return float(low), float(high)


def _fraction(factor: float) -> Fraction:
    return Fraction(float(factor)).limit_denominator(ZOOM_DENOMINATOR)


def aligned_factor(factor: float) -> float:
    """``factor`` as the nearest fraction p / q with q at most :data:`ZOOM_DENOMINATOR` (within 3.3 % for zooms of
    0.5 to 2, 4.4 % down to 0.125): the zoom blocks are made with, so that a block starting at a multiple of
    :func:`alignment` image px starts on a whole pixel of the zoomed image (and on the U-Net's pooling grid), as the
    same pixel does in the whole image zoomed at once."""
    return float(_fraction(factor))


def alignment(factor: float, depth: int = 4) -> int:
    """Image px that every block origin, block side and halo is a multiple of for zoom ``factor`` = p / q
    (:func:`aligned_factor`): the fewest px whose zoomed length is a whole multiple of 2^depth, 2^depth q / gcd(p,
    2^depth q): 16 at zoom 1, 128 at 7/8, 256 at 21/16, at most 2^depth x :data:`ZOOM_DENOMINATOR`."""
    fraction = _fraction(factor)
    period = 2 ** int(depth) * fraction.denominator
    return period // math.gcd(fraction.numerator, period)


def plan_blocks(trained: Any, image: Any, block: int = DEFAULT_BLOCK, halo: int | None = None) -> BlockPlan:
    """The :class:`BlockPlan` of ``image`` (H, W[, C], numpy or dask) for ``trained``: the zoom
    (:func:`estimate_factor`, :func:`aligned_factor`) and normalisation, and ``block`` and ``halo`` (network px;
    ``halo`` None: :func:`default_halo`) in the image's pixels, rounded up to a multiple of :func:`alignment`."""
    factor = aligned_factor(estimate_factor(trained, image))
    low, high = normalisation(image, factor, trained.config.normalise)
    halo = default_halo(trained.config) if halo is None else int(halo)
    step = alignment(factor, trained.config.depth)
    return BlockPlan(factor, low, high, _round_up(block / factor, step), _round_up(halo / factor, step))


def _round_up(value: float, step: int) -> int:
    """The smallest positive multiple of ``step`` that is at least ``value``."""
    return max(step, int(math.ceil(value / step)) * step)


class UNetBlocks:
    """A :data:`BlockSegmenter` of a trained U-Net with one :class:`BlockPlan`: each block is zoomed by the plan's
    factor, scaled by its (low, high), made into the model's channels, predicted in the model's tiles, resized back
    and turned into instances with the model's post-processing. A block whose side does not zoom to whole pixels
    (one at the image's bottom or right end) is reflected out to one that does first, and cut back after, so that
    every block is zoomed by exactly the plan's factor."""

    def __init__(self, trained: Any, plan: BlockPlan, tile: int | None | str = "auto") -> None:
        self.trained, self.plan, self.tile = trained, plan, tile

    def __call__(self, block: np.ndarray) -> np.ndarray:
        grey = _grey(block)
        period = _fraction(self.plan.factor).denominator  # p/q zooms a multiple of q px to whole px
        padded, shape = segmentation.pad_to_multiple(grey, period, mode="reflect" if min(grey.shape) > 1 else "edge")
        return segmentation.crop_to(self._labels(padded), shape)

    def _labels(self, grey: np.ndarray) -> np.ndarray:
        """Labels (h, w) of a grey block (h, w) whose sides zoom to whole pixels."""
        config, plan = self.trained.config, self.plan
        zoomed = segmentation.zoom(grey, plan.factor)
        if plan.high > plan.low:
            normalised = np.clip((zoomed - np.float32(plan.low)) / np.float32(plan.high - plan.low), 0.0, 1.0)
        else:
            normalised = np.zeros_like(zoomed, dtype=np.float32)
        local = segmentation.local_contrast(normalised) if "local" in config.channels else None
        stack = segmentation.stack_channels(normalised, config.channels, config.canny_thresholds, local=local)
        probs = segmentation.resize_to(self.trained.predict_stack(stack, self.tile), grey.shape)
        return self.trained.instances(probs)


# --------------------------------------------------------------------------------------------------------
# Blocks, faces and stitching
# --------------------------------------------------------------------------------------------------------


@dataclass
class BlockResult:
    """What one block reports (small: its edges, not its pixels): ``n`` labels 1..n in its core, and per face
    (``top``, ``bottom``, ``left``, ``right``) a pair (core edge line, labels one pixel beyond the face), each
    (length of the face,) uint32 in the block's own numbering (0 where a label does not reach into the core)."""

    n: int
    faces: dict[str, tuple[np.ndarray, np.ndarray]]


def block_labels(labels: np.ndarray, halo: tuple[int, int, int, int]) -> tuple[np.ndarray, BlockResult]:
    """Split the labels of a block with halo (h + top + bottom, w + left + right) into its core labels (h, w)
    uint32, renumbered 1..n (in the order of the segmenter's ids; labels that do not reach into the core dropped),
    and the :class:`BlockResult` of its faces. ``halo`` = (top, bottom, left, right) px; a side without halo (the
    image's border) has nothing beyond it (zeros)."""
    top, bottom, left, right = halo
    padded = np.pad(np.asarray(labels), 1)
    height, width = labels.shape[0] - top - bottom, labels.shape[1] - left - right
    ringed = padded[top : top + height + 2, left : left + width + 2]
    present = np.unique(ringed[1:-1, 1:-1])
    present = present[present > 0]
    lookup = np.zeros(int(ringed.max()) + 1, np.uint32)
    lookup[present] = np.arange(1, present.size + 1, dtype=np.uint32)
    ringed = lookup[ringed]
    core = ringed[1:-1, 1:-1]
    faces = {"top": (core[0], ringed[0, 1:-1]), "bottom": (core[-1], ringed[-1, 1:-1]),
             "left": (core[:, 0], ringed[1:-1, 0]), "right": (core[:, -1], ringed[1:-1, -1])}
    return np.ascontiguousarray(core), BlockResult(int(present.size), {k: (a.copy(), b.copy()) for k, (a, b)
                                                                      in faces.items()})


def _face_pairs(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Labels (a, b) of blocks A and B on either side of a face that are one nucleus: A carries a across the face
    and B carries b back across it. ``first`` = A's (core edge, beyond), ``second`` = B's, facing each other."""
    a, a_beyond = first
    b, b_beyond = second
    same = (a > 0) & (b > 0) & (a_beyond == a) & (b_beyond == b)
    return a[same], b[same]


def stitch(results: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lookup) from the (ny, nx) grid of :class:`BlockResult`: block (i, j)'s label k is
    ``lookup[offsets[i, j] + k]`` in the whole image, 1..N consecutive, one id per nucleus however many blocks it
    spans (:func:`_face_pairs` across every inner face). ``lookup`` is uint32 (sum of the blocks' n + 1,)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    counts = np.array([[r.n for r in row] for row in results], dtype=np.int64)
    offsets = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(counts.shape)
    total = int(counts.sum())
    edges_a, edges_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    ny, nx = counts.shape
    for i in range(ny):
        for j in range(nx):
            for di, dj, face, facing in ((0, 1, "right", "left"), (1, 0, "bottom", "top")):
                if i + di < ny and j + dj < nx:
                    a, b = _face_pairs(results[i, j].faces[face], results[i + di, j + dj].faces[facing])
                    edges_a.append(offsets[i, j] + a.astype(np.int64))
                    edges_b.append(offsets[i + di, j + dj] + b.astype(np.int64))
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    graph = coo_matrix((np.ones(a.size, np.int8), (a, b)), shape=(total + 1, total + 1))
    _, component = connected_components(graph, directed=False)
    _, first, final = np.unique(component[1:], return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # ids in order of each nucleus' first label (first block first)
    lookup = np.zeros(total + 1, np.uint32)
    lookup[1:] = order[final] + 1
    return offsets, lookup


def segment_to_zarr(image: Any, segment_block: BlockSegmenter, target: Any, block_px: int, halo_px: int,
                    workers: int = 1, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Segment ``image`` (H, W[, C], numpy or dask) block by block into the zarr array ``target`` (H, W) uint32,
    whose chunks should be ``block_px`` (so that no two blocks write one chunk): ``dask.array.map_overlap`` with a
    halo of ``halo_px`` image px, then :func:`stitch` and :func:`relabel_in_place`. ``workers``: blocks at once
    (1: one after the other, the least memory); ``progress(n)`` is called as blocks finish (twice per block:
    segmented, relabelled). Returns ``n_nuclei``, ``mean_area_px``, ``height``, ``width``, ``blocks``."""
    import dask
    import dask.array as da

    height, width = image.shape[:2]
    if tuple(target.shape) != (height, width):
        raise ValueError(f"target shape {target.shape} is not the image's {(height, width)}")
    chunks = (block_chunks(height, block_px, halo_px), block_chunks(width, block_px, halo_px))
    array = image if isinstance(image, da.Array) else da.from_array(image, chunks=(*chunks, *image.shape[2:]))
    if array.ndim == 3:  # colour: the grey mean, as the whole-image path takes it
        array = array.mean(axis=-1, dtype=np.float32)
    array = array.rechunk(chunks)
    depth = {0: min(halo_px, *chunks[0]), 1: min(halo_px, *chunks[1])}
    starts = [np.concatenate([[0], np.cumsum(c)]) for c in chunks]
    lock = threading.Lock()

    def one_block(data: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        i, j = block_info[0]["chunk-location"][:2]
        halo = (depth[0] * (i > 0), depth[0] * (i < len(chunks[0]) - 1),
                depth[1] * (j > 0), depth[1] * (j < len(chunks[1]) - 1))
        core, result = block_labels(segment_block(data), halo)
        rows, cols = slice(starts[0][i], starts[0][i + 1]), slice(starts[1][j], starts[1][j + 1])
        target[rows, cols] = core
        if progress is not None:
            with lock:
                progress(1)
        out = np.empty((1, 1), dtype=object)
        out[0, 0] = result
        return out

    grid = da.map_overlap(one_block, array, depth=depth, boundary="none", trim=False, dtype=object,
                          chunks=tuple((1,) * len(c) for c in chunks), meta=np.empty((0, 0), dtype=object))
    scheduler = {"scheduler": "synchronous"} if workers <= 1 else {"scheduler": "threads", "num_workers": workers}
    with dask.config.set(**scheduler):
        results = grid.compute()
    offsets, lookup = stitch(results)
    areas = relabel_in_place(target, chunks, offsets, lookup, progress)
    counted = areas[1:][areas[1:] > 0]
    return {"n_nuclei": int(counted.size), "mean_area_px": round(float(counted.mean()), 1) if counted.size else 0.0,
            "height": int(height), "width": int(width), "blocks": int(results.size)}


def relabel_in_place(target: Any, chunks: tuple[tuple[int, ...], tuple[int, ...]], offsets: np.ndarray,
                     lookup: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Renumber each block of ``target`` (zarr (H, W) uint32, blocks of sizes ``chunks``) from its own ids to the
    image's: ``lookup[offsets[i, j] + k]`` for label k > 0. Returns the area (px) of each final id (int64,
    (N + 1,); index 0 is the background)."""
    areas = np.zeros(int(lookup.max()) + 1, np.int64)
    top = 0
    for i, rows in enumerate(chunks[0]):
        left = 0
        for j, cols in enumerate(chunks[1]):
            local = np.asarray(target[top : top + rows, left : left + cols])
            final = lookup[offsets[i, j] + local.astype(np.int64)]
            final[local == 0] = 0
            target[top : top + rows, left : left + cols] = final
            ids, counts = np.unique(final, return_counts=True)
            areas[ids] += counts
            left += cols
            if progress is not None:
                progress(1)
        top += rows
    return areas


# --------------------------------------------------------------------------------------------------------
# The whole job: an image in, a label file out
# --------------------------------------------------------------------------------------------------------


def segment_blockwise(trained: Any, image: Any, path: str | Path, fmt: str = "ome-zarr",
                      pixel_size: tuple[float, float] | None = None, block: int = DEFAULT_BLOCK,
                      halo: int | None = None, workers: int = 1, progress: bool = False,
                      segment_block: BlockSegmenter | None = None, tile: int | None | str = "auto",
                      plan: BlockPlan | None = None) -> dict[str, Any]:
    """Segment ``image`` (H, W[, C]; numpy, dask or zarr) block by block with ``trained`` and write its labels
    (uint32) to ``path`` as ``ome-zarr`` or ``ome-tiff``, keeping ``pixel_size`` (y, x) µm, through a temporary
    name. ``block``, ``halo``: in the network's pixels (:data:`DEFAULT_BLOCK`, :func:`default_halo`).
    ``segment_block`` replaces the U-Net (:class:`UNetBlocks`) by any :data:`BlockSegmenter` (then ``block`` and
    ``halo`` are image px). ``tile``: the network's tiles within a block
    (:meth:`cellkit.unet.TrainedUNet.predict_stack`). ``plan``: a :class:`BlockPlan` to use instead of
    :func:`plan_blocks` (then ``block`` and ``halo`` are ignored). Returns what :func:`segment_to_zarr` returns,
    plus ``factor``.

    The labels never exist whole in memory: blocks go to a zarr array on disk (the OME-Zarr itself, or a temporary
    one beside ``path`` for an OME-TIFF, removed afterwards)."""
    path = Path(path)
    if fmt not in ("ome-zarr", "ome-tiff"):
        raise DataError(f"{path}: block-wise labels are written as ome-zarr or ome-tiff, not {fmt}")
    if segment_block is None:
        plan = plan or plan_blocks(trained, image, block, halo)
        segment_block = UNetBlocks(trained, plan, tile)
    elif plan is None:
        plan = BlockPlan(1.0, 0.0, 1.0, int(block), int(halo if halo is not None else 0))
    height, width = image.shape[:2]
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        n = len(block_chunks(height, plan.block_px, plan.halo_px)) * len(block_chunks(width, plan.block_px,
                                                                                      plan.halo_px))
        bar = tqdm(total=2 * n, desc=f"{path.name} blocks", unit="step", file=sys.stderr, dynamic_ncols=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "ome-zarr":
            with outputs.replacing_folder(path) as temp:
                target = formats.create_ome_zarr(temp, (height, width), pixel_size, chunk=plan.block_px)
                summary = segment_to_zarr(image, segment_block, target, plan.block_px, plan.halo_px, workers,
                                          bar.update if bar is not None else None)
        else:
            scratch = outputs.temporary_name(path)
            try:
                target = formats.create_ome_zarr(scratch, (height, width), pixel_size, chunk=plan.block_px)
                summary = segment_to_zarr(image, segment_block, target, plan.block_px, plan.halo_px, workers,
                                          bar.update if bar is not None else None)
                formats.write_ome_tiff(target, path, pixel_size)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    finally:
        if bar is not None:
            bar.close()
    return {**summary, "factor": plan.factor}
