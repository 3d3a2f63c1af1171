"""Segmentation on a Dask cluster: ``cellkit segment --workers N`` (a cluster of N worker processes on this
machine) or ``--scheduler ADDRESS`` (a cluster started with ``dask scheduler`` and ``dask worker``).

>>> from cellkit import cluster
>>> with cluster.connect(workers=2) as client:                       # or scheduler="tcp://10.0.0.5:8786"
...     rows = cluster.segment_files(client, "models/unet.keras", files, "masks/", run=run)

One task per image: a worker reads the file, segments it and writes its label file (through a temporary name,
:mod:`cellkit.outputs`) exactly as the single-process run does (the same code, :mod:`cellkit.inference`), and
returns the image's manifest entry. The calling process owns the run folder (:class:`cellkit.outputs.RunFolder`):
it records each entry as its result arrives, so that ``--resume``, ``counts.csv`` and the manifest work as they
do without a cluster. A worker that dies is replaced and its images are done again by another (Dask reschedules
them); an image is recorded once, when its result arrives.

Each worker process loads the model once (kept per process, keyed by the sha256 of the model file, which it checks
against the one the run was started with) and computes in the precision the run records, with TensorFlow using
all the CPUs of its machine as the single-process run does: the thread count changes the last bits of the
network's output, and the labels are to be those of the single-process run. The workers read the inputs and write
the outputs under the same absolute paths as the calling process, so a cluster of several machines needs them on a
shared file system.

Nothing here imports Dask or TensorFlow until it is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellkit import inference, outputs
from cellkit.datasets import DataError, first_line

#: Seconds to wait for the scheduler of ``--scheduler`` before giving up with a one-line error.
CONNECT_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------------------
# The client: a local cluster, or one that runs already
# --------------------------------------------------------------------------------------------------------


class SchedulerUnreachable(OSError):
    """No Dask scheduler answers at the address given (one line, for the command line)."""


class ClusterFailed(OSError):
    """The cluster could not finish a task (its workers kept dying on it, or it was cancelled): one line."""


@contextlib.contextmanager
def connect(workers: int | None = None, scheduler: str | None = None,
            timeout: float = CONNECT_TIMEOUT) -> Iterator[Any]:
    """A ``distributed.Client`` for the block: with ``workers``, on a new ``LocalCluster`` of that many
    single-threaded worker processes on 127.0.0.1 (no dashboard), closed after the block; with ``scheduler``, on the
    running cluster at that address (e.g. ``tcp://10.0.0.5:8786``), left running after the block.

    A scheduler that does not answer within ``timeout`` seconds is a one-line :class:`SchedulerUnreachable`.
    """
    if (workers is None) == (scheduler is None):
        raise ValueError("give either a number of local workers or a scheduler address")
    from distributed import Client

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=timeout)
        except (OSError, ValueError, TypeError) as error:  # refused, timed out, or not an address at all
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SchedulerUnreachable(f"cannot reach the Dask scheduler at {scheduler} ({reason}); start one with "
                                       "`dask scheduler` and `dask worker ADDRESS`, or check the address") from None
        with client:
            try:
                client.wait_for_workers(1, timeout=timeout)
            except TimeoutError:
                raise SchedulerUnreachable(f"the Dask scheduler at {scheduler} has no workers; start some with "
                                           f"`dask worker {scheduler}`") from None
            yield client
        return
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    with local_cluster(workers) as local, Client(local) as client:
        yield client


def local_cluster(workers: int, log_level: int = logging.ERROR) -> Any:
    """A ``distributed.LocalCluster`` of ``workers`` single-threaded worker processes on 127.0.0.1, without a
    dashboard (its HTTP server on a free port), logging from ``log_level`` up. Close it (``with``) after use."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None, silence_logs=log_level,
                        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})  # not 8787, which may be taken


def describe(client: Any) -> str:
    """The cluster behind ``client`` in words: its scheduler address and number of workers."""
    info = client.scheduler_info()
    return f"{len(info.get('workers', {}))} Dask worker(s) of the scheduler at {client.scheduler.address}"


# --------------------------------------------------------------------------------------------------------
# The workers' side
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the run's model: the file (absolute path), its sha256, and the precision
    (``float32`` or ``bfloat16``, resolved by the calling process) and ``flips`` of the run."""

    path: str
    sha256: str
    precision: str
    flips: bool = False


_LOADED: dict[tuple[str, str], Any] = {}  # (sha256, precision) -> TrainedUNet, one per worker process
_LOCK = threading.Lock()


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return f"the Dask worker at {get_worker().address}"
    except ValueError:  # not on a worker (the tests call this directly too)
        return f"process {os.getpid()}"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the block: TensorFlow's start-up notes (see
    :func:`cellkit.runtime.keras_module`) would land on the command line's stderr from a local worker."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _check_threads() -> None:
    """TensorFlow on this worker uses all the CPUs of its machine, as the single-process run does; a one-line
    DataError when it already runs with another number (set by other work in this process)."""
    from cellkit import runtime

    with _quiet_stderr():
        import tensorflow as tf

        wanted = runtime.set_threads(None)  # before the first op: TensorFlow's thread pools are made once
        keras = runtime.keras_module()
        keras.ops.add(keras.ops.ones((1,)), 1.0)  # the first op, which prints its notes, in here
    used = tf.config.threading.get_intra_op_parallelism_threads()
    if used not in (0, wanted):  # 0: TensorFlow's default, all the CPUs
        raise DataError(f"{_worker_name()}: TensorFlow already runs with {used} threads, not {wanted} as the "
                        "single-process run does; restart the workers")


def worker_model(spec: ModelSpec) -> Any:
    """The run's model in this worker process, loaded on first use and kept (only the last model is kept). The
    file's sha256 must be that of the run: a worker that sees another file there is a one-line DataError."""
    key = (spec.sha256, spec.precision)
    with _LOCK:
        if key not in _LOADED:
            from cellkit import unet

            found = outputs.sha256_file(spec.path)  # an OSError if the file is not there: a one-line error too
            if found != spec.sha256:
                raise DataError(f"{spec.path} on {_worker_name()}: not the model file the run was started with "
                                f"(sha256 {found[:12]}..., the run's {spec.sha256[:12]}...); give every worker the "
                                "same file")
            _check_threads()
            _LOADED.clear()
            _LOADED[key] = unet.load_unet(spec.path, precision=spec.precision)
        trained = _LOADED[key]
    trained.flips = spec.flips
    return trained


class _Entry:
    """Stands in for the run folder on a worker: keeps the entry of the one image segmented there."""

    def __init__(self) -> None:
        self.entry: dict[str, Any] | None = None

    def record(self, entry: dict[str, Any]) -> None:
        self.entry = dict(entry)


def segment_task(spec: ModelSpec, path: str, root: str | None, out_dir: str, names: Sequence[str],
                 label_format: str, tile: int | None | str) -> dict[str, Any]:
    """One image on a worker: read, segment and write its files (the code of the single-process run,
    :mod:`cellkit.inference`), returning ``{"entry": manifest entry}``, or ``{"failed": reason}`` for an input
    the run skips (unreadable, too large, ...). What stops a run (a model that gives NaN, an output folder that
    cannot be written) is raised and reaches the calling process."""
    trained = worker_model(spec)
    source = Path(path)
    recorder, failed = _Entry(), {}
    inference.segment_inputs(trained=trained, files=[source], out_dir=Path(out_dir),
                            names={source: tuple(Path(name) for name in names)},
                            root=Path(root) if root is not None else None, run=recorder, tile=tile, progress=False,
                            on_error=None, failed=failed, fmts={source: label_format})
    if recorder.entry is not None:
        return {"entry": recorder.entry}
    if failed:
        return {"failed": next(iter(failed.values()))}
    raise DataError(f"{path}: {_worker_name()} returned no result for it")  # not expected: say so, not skip it


def preload(client: Any, spec: ModelSpec) -> None:
    """Load the model on every worker now (it is otherwise loaded by each worker's first task): for timing."""
    client.run(worker_model, spec)


def worker_peak_memory(client: Any) -> dict[str, float]:
    """Peak resident memory in MiB of each worker process so far, by worker address."""
    from cellkit import runtime

    return client.run(runtime.peak_memory_mb)


# --------------------------------------------------------------------------------------------------------
# The calling process's side: tasks out, entries into the run folder
# --------------------------------------------------------------------------------------------------------


def segment_files(client: Any, model: str | Path, files: Sequence[Path], out_dir: str | Path,
                  run: outputs.RunFolder, root: Path | None = None, overlay: bool = False,
                  tile: int | None | str = "auto", progress: bool = True,
                  on_error: Callable[[Path, str], None] | None = None, output_format: str = "auto"
                  ) -> list[dict[str, Any]]:
    """:func:`cellkit.inference.segment_files` on the workers of ``client``: one task per image not done yet
    (``run``'s manifest), each entry recorded in ``run`` as its result arrives (``distributed.as_completed``),
    ``counts.csv`` written and the run marked finished at the end, or marked unfinished (interrupted, failed) with
    its counts written before the exception goes on. The model (``model``, whose sha256, precision and flips are
    the ones of ``run``'s header) is loaded once per worker.

    Returns one row per segmented or already-done file, as :func:`cellkit.inference.segment_files` does (in the
    order of ``files``); a skipped file is reported to ``on_error(path, message)``.
    """
    from concurrent.futures import CancelledError

    from distributed import KilledWorker, as_completed

    out_dir = Path(out_dir)
    fmts = inference.label_formats(files, output_format)
    names = inference.output_names(files, root, overlay, fmts)
    outputs.check_unique(names, out_dir)
    options = run.header["options"]
    spec = ModelSpec(str(Path(model).absolute()), run.header["model_sha256"], options["precision"],
                     bool(options["flips"]))
    rows, todo = inference.done_and_todo(run, files, out_dir, root)
    failed: dict[str, str] = {}
    futures: list[Any] = []
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="segmenting", unit="image", file=sys.stderr, dynamic_ncols=True)
    try:
        root_abs = str(root.absolute()) if root is not None else None
        futures = client.map(segment_task, [spec] * len(todo), [str(p.absolute()) for p in todo],
                             [root_abs] * len(todo), [str(out_dir.absolute())] * len(todo),
                             [[name.as_posix() for name in names[p]] for p in todo],
                             [fmts.get(p, "png") for p in todo], [tile] * len(todo), pure=False)
        source = {future.key: path for future, path in zip(futures, todo, strict=True)}
        for future in as_completed(futures):
            path = source[future.key]
            outcome = future.result()  # a worker's exception is raised here: the run stops
            future.release()
            if "entry" in outcome:
                run.record(outcome["entry"])  # the worker has put the files in place before returning
                rows[path] = inference.result_row(path, out_dir, outcome["entry"])
            else:
                failed[inference.relative_input(path, root)] = outcome["failed"]
                if on_error is not None:
                    on_error(path, outcome["failed"])
            if bar is not None:
                bar.update(1)
    except BaseException as error:
        with contextlib.suppress(Exception):  # the cluster may be gone; the run's record comes first
            client.cancel(futures)  # what runs finishes its file; it is not recorded, a rerun does it again
        inference.stop_run(run, error, failed)
        if isinstance(error, (KilledWorker, CancelledError)):
            raise ClusterFailed(f"the Dask cluster could not finish the run: {type(error).__name__}: "
                                f"{first_line(error)}") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    run.finish(failed)
    return [rows[path] for path in files if path in rows]
