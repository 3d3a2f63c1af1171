"""The Keras/TensorFlow handle, numeric precision (bfloat16 or float32), and threads.

>>> from cellkit import runtime
>>> keras = runtime.keras_module()                 # imported once, quietly
>>> with runtime.dtype_policy("auto") as used:     # "bfloat16" where the CPU has the instructions, else "float32"
...     model = build_something()                  # layers compute in ``used``; the policy is restored after
>>> runtime.set_threads(2)

Everything that needs Keras gets it from :func:`keras_module`, so that importing ``cellkit.metrics``,
``segmentation``, ``transforms``, ``features``, ``datasets`` or ``cli`` never loads TensorFlow. :func:`overlapped`
keeps both cores of a small CPU busy while a network runs: the steps around it go to worker threads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cellkit.datasets import DataError

#: Precisions a caller may ask for; ``auto`` is bfloat16 where the CPU has native instructions for it.
PRECISIONS = ("auto", "bfloat16", "float32")


def keras_module():
    """Import Keras (TensorFlow backend) on first use, without TensorFlow's start-up notes on stderr.

    TensorFlow 2.21 writes oneDNN and absl notes straight to file descriptor 2 when it loads and when it runs
    its first op, whatever ``TF_CPP_MIN_LOG_LEVEL`` says; they would bury the command line's one-line errors.
    Only that first import and one tiny op run with descriptor 2 pointed at ``/dev/null``.
    """
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras

        keras.ops.add(keras.ops.ones((1,)), 1.0)  # the first op prints the oneDNN note again
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # "triggered tf.function retracing" when many models are trained in turn
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


# --------------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX-512 BF16 or AMX-BF16; Linux ``/proc/cpuinfo``)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str = "auto") -> str:
    """``bfloat16`` or ``float32`` for a requested ``precision`` (:data:`PRECISIONS`); ``auto`` is bfloat16 when
    :func:`cpu_has_bf16`. A one-line ValueError for anything else."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    return "bfloat16" if precision == "bfloat16" or (precision == "auto" and cpu_has_bf16()) else "float32"


def set_precision(precision: str = "auto") -> str:
    """Set Keras' global dtype policy for models built from now on; returns ``"bfloat16"`` or ``"float32"``.

    ``bfloat16`` is Keras' ``mixed_bfloat16`` (bfloat16 compute, float32 weights; about twice as fast on CPUs with
    AVX-512 BF16/AMX). Output layers stay float32 (the builders set ``dtype="float32"`` on them), and saved models
    are float32 either way. :func:`dtype_policy` does the same for one block of code only.
    """
    used = resolve_precision(precision)
    keras_module().config.set_dtype_policy("mixed_bfloat16" if used == "bfloat16" else "float32")
    return used


def current_precision() -> str:
    """The precision of Keras' global dtype policy: ``bfloat16`` or ``float32``."""
    return "bfloat16" if "bfloat16" in keras_module().config.dtype_policy().name else "float32"


@contextmanager
def dtype_policy(precision: str = "auto") -> Iterator[str]:
    """Models built inside the block compute in ``precision`` (:func:`set_precision`); the global policy that held
    before is restored after it. Yields the precision used."""
    keras = keras_module()
    previous = keras.config.dtype_policy()
    try:
        yield set_precision(precision)
    finally:
        keras.config.set_dtype_policy(previous)


def compute_precision(model: Any) -> str:
    """``bfloat16`` if any layer of ``model`` computes in it (Keras ``mixed_bfloat16``), else ``float32``."""
    return "bfloat16" if any(getattr(layer, "compute_dtype", "float32") == "bfloat16" for layer in model.layers) \
        else "float32"


class NonFiniteOutputs(DataError):
    """A network gave NaN or infinite outputs: the model, not the image, is at fault, so a run stops."""


def finite_outputs(outputs: Any) -> np.ndarray:
    """A network's outputs as a float32 array; a one-line DataError when any is NaN or infinite, which a trained
    network never gives on finite input (its weights are damaged), so that no wrong result is written silently
    (:class:`NonFiniteOutputs`)."""
    outputs = np.asarray(outputs, dtype=np.float32)
    if not np.isfinite(outputs).all():
        raise NonFiniteOutputs("the network gave NaN or infinite outputs: its weights are damaged; copy the model file "
                        "again or retrain it")
    return outputs


# --------------------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------------------


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads inside TensorFlow ops (default: the CPUs this process may use) and one op at a time.

    Has an effect only before TensorFlow runs its first op; returns the number of threads.
    """
    import tensorflow as tf  # not keras_module(): its first op would initialise TensorFlow's thread pools

    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already initialised: keep what it has
        pass
    return n


def overlapped(items: Iterable[Any], prepare: Callable[[Any], Any], run: Callable[[Any], Any],
               finish: Callable[[Any, Any], Any]) -> Iterator[tuple[Any, Any]]:
    """``(item, finish(item, run(prepare(item))))`` for each of ``items`` in order, or ``(item, exception)`` for an
    item where a step raised one (the others go on).

    ``prepare`` of the next item and ``finish`` of the previous one run on two worker threads while ``run`` (the
    network, which uses every core) works on the current item in the calling thread. The steps around the network
    run on one core; overlapping them keeps both cores of a 2-core CPU busier: the default U-Net segmented all 459
    DSB images 1.1-1.4 times as fast this way as one step after the other (four alternating comparisons), with
    identical labels. At most three items are in flight.
    """
    end = object()
    with ThreadPoolExecutor(1) as before, ThreadPoolExecutor(1) as after:
        iterator = iter(items)
        current = next(iterator, end)
        prepared = before.submit(prepare, current) if current is not end else None
        previous: tuple[Any, Any] | None = None  # (item, future of its finish, or the exception raised)
        while current is not end:
            following = next(iterator, end)
            ahead = before.submit(prepare, following) if following is not end else None
            try:
                outcome: Any = after.submit(finish, current, run(prepared.result()))
            except Exception as error:  # noqa: BLE001 - handed to the caller with its item
                outcome = error
            if previous is not None:
                yield previous[0], _outcome(previous[1])
            previous, current, prepared = (current, outcome), following, ahead
        if previous is not None:
            yield previous[0], _outcome(previous[1])


def _outcome(outcome: Any) -> Any:
    """The result of a future, or the exception it raised; an exception stays as it is."""
    if isinstance(outcome, BaseException):
        return outcome
    try:
        return outcome.result()
    except Exception as error:  # noqa: BLE001
        return error


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20
