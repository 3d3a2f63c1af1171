"""Benchmark: segment one large synthetic fluorescence image block by block, in one process; print time and memory.

Run by hand (not a test)::

    python benchmarks/large_image.py --model models/unet.keras --size 20000 --work large_run/

1. Builds a SIZE x SIZE uint8 fluorescence image of simulated nuclei as a zarr array on disk, tile by tile (the
   image is never whole in memory): VARIANTS fields of TILE x TILE px (:func:`cellkit.synthetic.nuclei_field`, no
   background gradient; simulating each takes seconds), each tile one of them turned and flipped at random.
2. Segments it with :func:`cellkit.blockwise.segment_blockwise` (dask ``map_overlap``, labels written block by block
   to an OME-Zarr) and prints the wall time of each step, the peak resident memory of the process
   (``resource.getrusage``: the highest RSS at any moment, model and TensorFlow included) and what was found, as
   JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_image(path: Path, size: int, tile: int, nuclei_per_tile: int, variants: int, seed: int) -> float:
    """Write a ``size`` x ``size`` uint8 synthetic fluorescence image to a zarr array at ``path`` in ``tile``-px
    chunks, each chunk one of ``variants`` simulated fields turned and flipped at random; returns the seconds."""
    import numpy as np
    import zarr

    from cellkit import synthetic

    start = time.perf_counter()
    fields = [synthetic.nuclei_field(shape=(tile, tile), n_nuclei=nuclei_per_tile, seed=seed + k, gradient=0.0,
                                     radius_range=(9.0, 18.0)).fluorescence for k in range(variants)]
    rng = np.random.default_rng(seed)
    image = zarr.open_array(str(path), mode="w", shape=(size, size), chunks=(tile, tile), dtype="uint8")
    for top in range(0, size, tile):
        for left in range(0, size, tile):
            field = np.rot90(fields[rng.integers(variants)], k=int(rng.integers(4)))
            field = field[:, ::-1] if rng.integers(2) else field
            image[top : top + tile, left : left + tile] = field[: size - top, : size - left]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a U-Net from cellkit train unet")
    parser.add_argument("--size", type=int, default=20_000, help="image side in pixels (default 20000)")
    parser.add_argument("--tile", type=int, default=1000, help="side of each simulated field and zarr chunk")
    parser.add_argument("--nuclei-per-tile", type=int, default=600, help="simulated nuclei per tile")
    parser.add_argument("--variants", type=int, default=6, help="distinct simulated tiles (default 6)")
    parser.add_argument("--block", type=int, default=None, help="block side in network px (default: the module's)")
    parser.add_argument("--workers", type=int, default=1, help="blocks segmented at once (default 1)")
    parser.add_argument("--work", required=True, help="a new or empty folder for the image and the labels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from cellkit import blockwise, runtime, unet

    work = Path(args.work)
    if work.exists() and any(work.iterdir()):  # never empty a folder the user may keep something in
        sys.exit(f"error: {work} is not empty; give a new or empty folder as --work")
    work.mkdir(parents=True, exist_ok=True)
    build_seconds = build_image(work / "image.zarr", args.size, args.tile, args.nuclei_per_tile, args.variants,
                                args.seed)
    rss_after_build = runtime.peak_memory_mb()
    print(f"built a {args.size} x {args.size} image in {build_seconds:.0f} s (peak RSS {rss_after_build:.0f} MiB)",
          flush=True)

    import dask.array as da
    import zarr

    start = time.perf_counter()
    trained = unet.load_unet(args.model)
    image = da.from_zarr(zarr.open_array(str(work / "image.zarr"), mode="r"))
    block = args.block or blockwise.DEFAULT_BLOCK
    summary = blockwise.segment_blockwise(trained, image, work / "labels.ome.zarr", "ome-zarr", (0.5, 0.5),
                                          block=block, workers=args.workers, progress=True)
    seconds = time.perf_counter() - start
    result = {"size": args.size, "megapixels": round(args.size**2 / 1e6, 1), "model": str(args.model),
              "base_filters": trained.config.base_filters, "depth": trained.config.depth, "block": block,
              "workers": args.workers, "build_seconds": round(build_seconds, 1),
              "segment_seconds": round(seconds, 1), "mpx_per_s": round(args.size**2 / 1e6 / seconds, 3),
              "peak_rss_mib": round(runtime.peak_memory_mb()), "peak_rss_after_build_mib": round(rss_after_build),
              **summary}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
