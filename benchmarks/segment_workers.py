"""How `cellkit segment` scales on a Dask cluster: images per second with 1, 2, ... local workers (or on a running
cluster), the scaling efficiency (speedup over the first worker count / workers) and each worker's peak memory.
Run by hand, not by the tests:

    python benchmarks/segment_workers.py --model models/unet.keras                  # all DSB images, 1 and 2 workers
    python benchmarks/segment_workers.py --model models/unet.keras --limit 100 --workers 1 2 4
    python benchmarks/segment_workers.py --model /shared/unet.keras --scheduler tcp://10.0.0.5:8786 \
        --scratch /shared/tmp                                                      # a cluster with a shared disk

The images are the DSB 2018 stage-1 training images (`cellkit data fetch dsb2018`). Each measurement starts the
cluster and loads the model on every worker first (timed apart: "start"), then times the segmentation of the
images as `cellkit segment --workers N` does it (one task per image, the manifest kept by this process); the label
files of every measurement are compared with those of the first. Peak memory is each worker process's peak
resident set (getrusage) at the end. `--single-process` adds the run without Dask (plain `cellkit segment`, its
reading and writing overlapped with the network on threads) for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path


def _label_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def measure(client, model: Path, files: list[Path], root: Path, precision: str, scratch: Path) -> dict:
    """Segment ``files`` on ``client``'s workers into a fresh folder under ``scratch``; seconds, rate, memory."""
    from cellkit import cluster, inference, outputs, unet

    sha = outputs.sha256_file(model)
    tile = unet.read_unet_config(model).tile
    start = time.perf_counter()
    cluster.preload(client, cluster.ModelSpec(str(model.absolute()), sha, precision))
    loaded = time.perf_counter() - start
    out = Path(tempfile.mkdtemp(prefix="segment_workers_", dir=scratch)) / "masks"
    header = inference.segment_header(sha, root, tile, False, precision, False, command="segment_workers.py")
    run = outputs.RunFolder.open(out, header)
    start = time.perf_counter()
    rows = cluster.segment_files(client, model, files, out, run, root=root, tile=tile, progress=True)
    seconds = time.perf_counter() - start
    memory = cluster.worker_peak_memory(client)
    return {"workers": len(memory), "images": len(rows), "load_seconds": loaded, "seconds": seconds,
            "images_per_second": len(rows) / seconds, "peak_mib": sorted(memory.values()),
            "labels": _label_digest(out), "out": out}


def measure_single_process(model: Path, files: list[Path], root: Path, precision: str, scratch: Path) -> dict:
    """The same images without Dask, as plain `cellkit segment` does them (in this process, steps overlapped)."""
    from cellkit import inference, outputs, runtime, unet

    start = time.perf_counter()
    trained = unet.load_unet(model, precision=precision)
    loaded = time.perf_counter() - start
    out = Path(tempfile.mkdtemp(prefix="segment_single_", dir=scratch)) / "masks"
    tile = trained.config.tile
    header = inference.segment_header(outputs.sha256_file(model), root, tile, False, precision, False,
                                      command="segment_workers.py")
    run = outputs.RunFolder.open(out, header)
    start = time.perf_counter()
    rows = inference.segment_files(trained, files, out, root=root, tile=tile, run=run)
    seconds = time.perf_counter() - start
    return {"workers": 0, "images": len(rows), "load_seconds": loaded, "start_seconds": loaded, "seconds": seconds,
            "images_per_second": len(rows) / seconds, "peak_mib": [runtime.peak_memory_mb()],
            "labels": _label_digest(out), "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a U-Net from cellkit train unet")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="local worker counts (default: 1 2)")
    parser.add_argument("--scheduler", help="measure on this running cluster instead of local ones")
    parser.add_argument("--limit", type=int, help="the first N images only (default: all)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--single-process", action="store_true",
                        help="also time the run without Dask (in this process; printed as 0 workers, not in the "
                             "speedups)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the label files go (on a shared disk for --scheduler)")
    args = parser.parse_args()


    from cellkit import cluster, datasets

    root = datasets.require("dsb2018") / "images"
    files = sorted(root.glob("*.png"))[: args.limit]
    print(f"{len(files)} DSB 2018 images, model {args.model} ({args.precision})", flush=True)
    results = []
    for workers in ([None] if args.scheduler else args.workers):
        start = time.perf_counter()
        with cluster.connect(workers=workers, scheduler=args.scheduler) as client:
            started = time.perf_counter() - start
            result = measure(client, args.model, files, root, args.precision, args.scratch)
        result["start_seconds"] = started + result["load_seconds"]
        results.append(result)
        print(f"{result['workers']} worker(s): {result['images_per_second']:.2f} images/s "
              f"({result['seconds']:.1f} s; start and model load {result['start_seconds']:.1f} s)", flush=True)
    if args.single_process:
        single = measure_single_process(args.model, files, root, args.precision, args.scratch)
        print(f"no Dask: {single['images_per_second']:.2f} images/s ({single['seconds']:.1f} s)", flush=True)
    base = results[0]
    print("\nworkers  images  seconds  images/s  speedup  efficiency  peak MiB per worker  labels")
    for result in results:
        speedup = result["images_per_second"] / base["images_per_second"]
        efficiency = speedup / (result["workers"] / base["workers"])
        same = "same" if result["labels"] == base["labels"] else "DIFFERENT"
        print(f"{result['workers']:>7}  {result['images']:>6}  {result['seconds']:>7.1f}  "
              f"{result['images_per_second']:>8.2f}  {speedup:>7.2f}  {efficiency:>10.2f}  "
              f"{', '.join(f'{m:.0f}' for m in result['peak_mib']):>19}  {same}")
    if args.single_process:
        same = "same" if single["labels"] == base["labels"] else "DIFFERENT"
        print(f"no Dask  {single['images']:>6}  {single['seconds']:>7.1f}  {single['images_per_second']:>8.2f}  "
              f"{single['images_per_second'] / base['images_per_second']:>7.2f}  {'':>10}  "
              f"{single['peak_mib'][0]:>19.0f}  {same}")
        results.append(single)
    print(f"label files in {', '.join(str(r['out']) for r in results)}")


if __name__ == "__main__":
    main()
