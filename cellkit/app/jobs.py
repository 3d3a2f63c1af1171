"""Model jobs on a few worker threads, never on the event loop, with a bound on the jobs waiting."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from cellkit.app.models import ModelEntry, first_line, load_model
from cellkit.app.uploads import (
    Upload,
)
from cellkit.datasets import DataError

#: Model jobs (loading, classifying, segmenting) that run at once, each on a worker thread: the event loop stays
#: free for every other visitor, and a crowd cannot start dozens of segmentations (one of 16 Mpx holds ~2 GB).
MODEL_WORKERS = 2
#: Model jobs that may wait for a worker besides the running ones; an upload beyond them is told the app is busy.
MAX_WAITING_JOBS = 8

class Busy(DataError):
    """More model jobs are waiting than :data:`MAX_WAITING_JOBS`."""


class ModelJobs:
    """A small pool of worker threads for model work, with a bound on the jobs waiting for it.

    The app's server awaits :meth:`run` from Shiny extended tasks, so that the event loop (every visitor's pages,
    uploads and outputs) goes on while a model works.
    """

    def __init__(self, workers: int = MODEL_WORKERS, max_waiting: int = MAX_WAITING_JOBS) -> None:
        self.workers, self.max_waiting = workers, max_waiting
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cellkit-model")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished (running or waiting)."""
        return self._pending

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` on a worker thread, awaited; :class:`Busy` when too many jobs are pending already.
        Cancelling the await drops a job still waiting for a worker; one already running finishes unseen."""
        with self._lock:
            if self._pending >= self.workers + self.max_waiting:
                raise Busy("the app is busy with other images; try again in a minute")
            self._pending += 1
        try:
            future = self._pool.submit(func, *args)
        except BaseException:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, future: Future | None) -> None:
        with self._lock:
            self._pending -= 1


#: The app's model workers, shared by every session.
MODEL_JOBS = ModelJobs()
#: The errors a model job reports as one line in its tab: bad images, damaged or unreadable model files, no memory.
EXPECTED_ERRORS = (DataError, ValueError, OSError, MemoryError)


def model_step(upload: Upload, entry: ModelEntry, step: Callable[[Any, np.ndarray], Any]) -> Any:
    """On a model worker: decode ``upload``, load ``entry``'s model and return ``step(model, image)``; each expected
    failure (:data:`EXPECTED_ERRORS`) is returned as a one-line message instead."""
    what = "U-Net" if entry.kind == "unet" else "classifier"
    try:
        image = upload.image()
    except DataError as error:
        return f"{upload.name}: {error}"
    try:
        model = load_model(entry)
    except EXPECTED_ERRORS as error:
        return f"the {what} {entry.path.name} cannot be loaded: {first_line(error)}"
    try:
        return step(model, image)
    except EXPECTED_ERRORS as error:
        return f"cannot use this image with the {what}: {first_line(error)}"


async def model_job(upload: Upload | str | None, entry: ModelEntry | str, step: Callable[[Any, np.ndarray], Any],
                    jobs: ModelJobs = MODEL_JOBS) -> Any:
    """What a tab shows for an upload and a model choice: None before any upload, a one-line message (a refused
    upload, no model, a busy app, a failure), or ``step``'s result computed on a model worker (:func:`model_step`)."""
    if not isinstance(upload, Upload):
        return upload
    if isinstance(entry, str):
        return entry
    try:
        return await jobs.run(model_step, upload, entry, step)
    except Busy as error:
        return str(error)
    except Exception as error:  # a bug: one line in the page, the traceback in the server's log
        logging.getLogger(__name__).error("model job failed", exc_info=error)
        return f"unexpected error ({type(error).__name__}: {first_line(error)})"
