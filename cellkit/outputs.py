"""Outputs that never destroy anything: the output folder rule, the run manifest, and atomic writes.

What the command line and :func:`cellkit.inference.segment_files` write goes through here:

* every file is written to a temporary name in its folder and renamed into place (:func:`replacing`,
  :func:`write_bytes`, :func:`write_text`), so that an interruption never leaves half a file under a real name;
* a single output file (``--csv``, ``--json``, ``train --out``) is checked before the work starts
  (:func:`check_file`): a folder, an existing file without ``--overwrite`` or a place that cannot be written is a
  one-line :class:`OutputError` before hours of work, not a traceback after them;
* an output folder is written only when it is new, empty (hidden files aside) or written by cellkit before (its
  :data:`MANIFEST` is there); anything else needs ``--overwrite``, which replaces files of the names it writes and
  deletes nothing (:meth:`RunFolder.open`);
* a run folder records what made it and each finished input as it finishes (:class:`RunFolder`), so that a run says
  whether it finished and a rerun skips what is done.

The manifest is two files in the output folder:

``cellkit-run.json`` (:data:`MANIFEST`), rewritten (atomically) only when a run starts and when it stops;
``finished`` is true only after a run went through every input, ``n_done`` counts the inputs in ``counts.csv``::

    {"format": 1, "command": "cellkit segment --model ... --input ... --out ...", "cellkit_version": "0.1.0",
     "model": "/abs/models/unet.keras", "model_sha256": "...", "input": "/abs/my_images",
     "options": {"tile": 512, "flips": false, "precision": "float32", "overlay": true},
     "kind": "segment", "status": "running" | "interrupted" | "failed: <why>" | "finished", "finished": false,
     "started": "2025-01-01T12:00:00+00:00", "updated": "...", "n_done": 17, "n_failed": 1,
     "failed": [{"input": "broken.png", "reason": "..."}], "resume": "cellkit segment --resume --out masks"}

``cellkit-run.jsonl`` (:data:`ENTRIES`), one JSON line appended per finished input (O(1) per image; a torn last
line, left by a kill, is ignored and cut off before the next append)::

    {"input": "sub/a.png", "size": 65536, "mtime_ns": 1700000000000000000, "output": "sub/a.png",
     "overlay": "sub/a_overlay.png", "n_nuclei": 41, "mean_area_px": 212.5, "height": 256, "width": 256}

``counts.csv`` (:data:`COUNTS`) is always written from the entries (:meth:`RunFolder.write_counts`), so that it
lists exactly the label files that are there.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import os
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The manifest header that marks a folder as written by cellkit.
MANIFEST = "cellkit-run.json"
#: The manifest's entries, one JSON line per finished input.
ENTRIES = "cellkit-run.jsonl"
#: Per-image counts of a segmentation run, written from the entries.
COUNTS = "counts.csv"
#: Manifest layout version; a folder of another version counts as another run.
FORMAT = 1
#: Part of every temporary name, so that a leftover one (after a kill -9) is recognisably cellkit's.
TEMP_MARK = ".cellkit-tmp-"
#: Header keys that must be equal for a rerun to continue a run (the rest describes its progress).
IDENTITY = ("format", "kind", "model_sha256", "input", "options")


class OutputError(ValueError):
    """A one-line problem with where results would go, raised before the work when it can be foreseen."""


# --------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------


def temporary_name(path: str | Path, keep_suffix: bool = False) -> Path:
    """A fresh hidden name beside ``path`` (``.NAME.cellkit-tmp-PID-RANDOM``); with ``keep_suffix`` it ends in
    ``path``'s suffix too, for writers that choose the format by it (Keras wants ``.keras``)."""
    path = Path(path)
    suffix = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextmanager
def replacing(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; renamed onto ``path`` (``os.replace``, atomic) when the
    block ends without an exception, removed when it ends with one (Ctrl-C included).

    >>> with replacing("out/model.keras", keep_suffix=True) as temp:
    ...     model.save(temp)
    """
    path = Path(path)
    temp = temporary_name(path, keep_suffix)
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """:func:`replacing` for an output that is a folder (an OME-Zarr): a temporary folder name beside ``path`` to
    write into, renamed onto ``path`` when the block ends without an exception and removed when it ends with one.
    A folder already at ``path`` (the same output of an earlier run) is first renamed aside, then removed once the
    new one is in place, so that ``path`` never holds half of either."""
    import shutil

    path = Path(path)
    temp = temporary_name(path)
    try:
        yield temp
        if path.is_dir():
            old = temporary_name(path)
            os.replace(path, old)
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def present(path: str | Path) -> bool:
    """Whether an output is there: a file, or a folder output such as ``NAME.ome.zarr``."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and path.suffix.lower() == ".zarr")


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary name (:func:`replacing`), making its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temp:
        with open(temp, "xb") as handle:
            handle.write(data)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary name (:func:`replacing`)."""
    return write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, hex, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Single output files, checked before the work
# --------------------------------------------------------------------------------------------------------


def check_not_inside(out: str | Path, inputs: Iterable[str | Path], option: str = "--out") -> None:
    """Refuse ``out`` when it is one of ``inputs`` or lies inside an input folder: no input is ever written."""
    resolved = Path(out).resolve()
    for item in inputs:
        source = Path(item).resolve()
        if resolved == source or (source.is_dir() and source in resolved.parents):
            raise OutputError(f"{out}: refusing to write inside the input data {item}; choose another {option}")


def check_writable_folder(folder: str | Path, what: str | Path, option: str) -> None:
    """A one-line OutputError unless ``folder`` exists and can be written, or can be made (its nearest existing
    ancestor is a writable folder). ``what`` (the output path) and ``option`` name the output in the message.
    Nothing is created."""
    folder = Path(folder)
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what}: cannot write there: {ancestor} is a file, not a folder; choose another {option}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: cannot write there: {ancestor} is not writable; choose another {option}")


def check_file(path: str | Path, option: str, overwrite: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """Check a single output file before the work: not an input, not a folder, not an existing file unless
    ``overwrite``, and in a folder that exists or can be made, writable. Returns ``path`` as a Path; a one-line
    OutputError naming it, ``option`` and the fix otherwise."""
    path = Path(path)
    check_not_inside(path, inputs, option)
    if path.is_dir():
        raise OutputError(f"{path}: {option} names a folder; give a file name inside it, e.g. "
                          f"{path / ('result' + _example_suffix(option))}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it, or choose another {option}")
    check_writable_folder(path.parent, path, option)
    return path


def _example_suffix(option: str) -> str:
    return {"--csv": ".csv", "--json": ".json"}.get(option, ".keras")


# --------------------------------------------------------------------------------------------------------
# Output names
# --------------------------------------------------------------------------------------------------------


def check_unique(outputs: Mapping[Path, Sequence[Path]], out_dir: str | Path) -> None:
    """Refuse, before any work, two inputs whose output names (``{input: [relative output paths]}``) coincide,
    ignoring case (as macOS and Windows file systems do): the second would silently replace the first."""
    owner: dict[str, tuple[Path, Path]] = {}
    for source, names in outputs.items():
        for name in names:
            key = name.as_posix().casefold()
            if key in owner and owner[key][0] != source:
                first, taken = owner[key]
                raise OutputError(f"{first} and {source} would both write {Path(out_dir) / taken}; rename one of "
                                  "them or put them in different folders")
            owner[key] = (source, name)


# --------------------------------------------------------------------------------------------------------
# Run folders: the folder rule and the manifest
# --------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def read_header(folder: str | Path) -> dict[str, Any] | None:
    """The manifest header of a run folder, or None when there is none; a one-line OutputError when it is not
    readable JSON (it is only ever replaced whole, so that means someone else wrote it)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputError(f"{path}: not a readable cellkit manifest ({error}); choose another --out") from None
    if not isinstance(header, dict):
        raise OutputError(f"{path}: not a cellkit manifest; choose another --out")
    return header


def read_entries(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The finished inputs recorded in a run folder, by relative input path (a later line wins); lines that are not
    JSON objects with an ``input`` (a torn last line) are ignored."""
    path = Path(folder) / ENTRIES
    entries: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return entries
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("input"), str):
                entries[entry["input"]] = entry
    return entries


def folder_state(folder: str | Path, option: str = "--out") -> str:
    """``new`` (does not exist), ``empty`` (nothing but hidden files), ``cellkit`` (holds a :data:`MANIFEST`) or
    ``foreign``; a one-line OutputError when ``folder`` is a file or cannot be made or written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: {option} is a file, not a folder; give a folder for the results")
    check_writable_folder(folder, folder, option)
    if not folder.exists():
        return "new"
    if (folder / MANIFEST).is_file():
        return "cellkit"
    return "foreign" if any(not entry.name.startswith(".") for entry in folder.iterdir()) else "empty"


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What makes run header ``new`` another run than ``old``, in words (empty when it continues it)."""
    found = []
    if old.get("format") != new.get("format") or old.get("kind") != new.get("kind"):
        found.append(f"another kind of run ({old.get('kind')}, manifest format {old.get('format')})")
    if old.get("model_sha256") != new.get("model_sha256"):
        found.append(f"another model ({old.get('model')}, sha256 {str(old.get('model_sha256'))[:12]}...)")
    if old.get("input") != new.get("input"):
        found.append(f"another input ({old.get('input')})")
    old_options, new_options = old.get("options") or {}, new.get("options") or {}
    changed = [f"{key} {old_options.get(key)} there, {new_options.get(key)} now"
               for key in sorted(set(old_options) | set(new_options)) if old_options.get(key) != new_options.get(key)]
    if changed:
        found.append("other options (" + ", ".join(changed) + ")")
    return found


class RunFolder:
    """An output folder being written by one run: the folder rule, the manifest, and ``counts.csv``.

    >>> run = RunFolder.open("masks", header, overwrite=False)    # refuses a foreign folder or another run
    >>> run.finished_entry("a.png", Path("in/a.png").stat())      # the entry of an input done before, or None
    >>> run.record({"input": "a.png", ...})                      # after its files are in place; thread-safe
    >>> run.finish({"broken.png": "not a readable image"})       # counts.csv, then the header says finished

    ``header`` holds at least ``kind``, ``model_sha256``, ``input`` and ``options`` (the run's identity,
    :data:`IDENTITY`); ``command``, ``model`` and ``resume`` describe it for people.
    """

    def __init__(self, folder: Path, header: dict[str, Any], entries: dict[str, dict[str, Any]],
                 resumed: bool) -> None:
        self.folder, self.header, self.entries, self.resumed = folder, header, entries, resumed
        self._lock = threading.Lock()
        self._handle: io.TextIOWrapper | None = None

    @staticmethod
    def check(folder: str | Path, header: Mapping[str, Any], overwrite: bool = False) -> bool:
        """Whether the run of ``header`` may write into ``folder``, without writing anything: True when the folder
        holds the same run (:data:`IDENTITY`) to continue, False when it starts afresh there (a new or empty folder;
        with ``overwrite``, any folder). A one-line OutputError otherwise: a file, a place that cannot be written, a
        non-empty folder without a manifest, or a folder of another run."""
        folder = Path(folder)
        header = {"format": FORMAT, **header}
        state = folder_state(folder)
        if state == "foreign" and not overwrite:
            raise OutputError(f"{folder}: not empty and not written by cellkit (no {MANIFEST}); choose a new or empty "
                              "--out folder, or pass --overwrite to write into it (files of the names this run "
                              "writes are replaced, nothing is deleted)")
        previous = read_header(folder) if state == "cellkit" else None
        changed = differences(previous, header) if previous is not None else []
        if changed and not overwrite:
            raise OutputError(f"{folder}: holds the results of another run, with {'; '.join(changed)}; choose "
                              "another --out, or pass --overwrite to start afresh there")
        return previous is not None and not changed

    @classmethod
    def open(cls, folder: str | Path, header: Mapping[str, Any], overwrite: bool = False) -> RunFolder:
        """Claim ``folder`` for the run described by ``header`` (:meth:`check`); the header is written, marked
        unfinished, at once.

        A new or empty folder starts a run. A folder of the same run continues it: its entries are kept and
        :meth:`finished_entry` finds them. With ``overwrite`` a folder of another run, or a non-empty folder without
        a manifest, starts afresh: files of the names this run writes are replaced, none is deleted.
        """
        folder = Path(folder)
        header = {"format": FORMAT, **header}
        resumed = cls.check(folder, header, overwrite)
        entries = read_entries(folder) if resumed else {}
        folder.mkdir(parents=True, exist_ok=True)
        run = cls(folder, {**header, "started": _now()}, entries, resumed)
        run._start_entries(keep=resumed)
        run._write_header("running")
        return run

    # --- entries ---------------------------------------------------------------------------------------

    def _start_entries(self, keep: bool) -> None:
        """Open :data:`ENTRIES` for appending: kept (a torn last line cut off) when continuing, else emptied."""
        path = self.folder / ENTRIES
        if not keep:
            write_text(path, "")
        elif path.is_file():
            _cut_torn_line(path)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by stop

    def finished_entry(self, relative: str, stat: os.stat_result) -> dict[str, Any] | None:
        """The entry of input ``relative`` when it was done by this run before, the input is unchanged (same size
        and modification time, ``stat``) and its output files are still there; else None."""
        entry = self.entries.get(relative)
        if entry is None or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
            return None
        outputs = [entry.get("output"), entry.get("overlay")] if self.header["options"].get("overlay") \
            else [entry.get("output")]
        if not all(isinstance(name, str) and present(self.folder / name) for name in outputs):
            return None
        return entry

    def record(self, entry: Mapping[str, Any]) -> None:
        """Append one finished input (``input``, ``size``, ``mtime_ns``, ``output``, ...) after its files are in
        place: one line, flushed, O(1) whatever the number of images. Safe to call from a worker thread."""
        line = json.dumps(dict(entry), separators=(",", ":")) + "\n"
        with self._lock:
            if self._handle is None:
                raise OutputError(f"{self.folder}: the run was already stopped; {entry['input']} is not recorded")
            self._handle.write(line)
            self._handle.flush()
            self.entries[entry["input"]] = dict(entry)

    # --- the end -----------------------------------------------------------------------------------------

    def listed(self) -> list[dict[str, Any]]:
        """The entries whose label file is there, by input: what ``counts.csv`` lists."""
        with self._lock:
            entries = sorted(self.entries.values(), key=lambda e: e["input"])
        return [e for e in entries if isinstance(e.get("output"), str) and present(self.folder / e["output"])]

    def write_counts(self) -> Path:
        """``counts.csv`` (file, n_nuclei, mean_area_px) from the entries whose label file is there, by input."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "n_nuclei", "mean_area_px"])
        for entry in self.listed():
            writer.writerow([entry["input"], entry.get("n_nuclei"), entry.get("mean_area_px")])
        return write_text(self.folder / COUNTS, buffer.getvalue())

    def finish(self, failed: Mapping[str, str] | None = None) -> None:
        """The run went through every input: ``counts.csv``, then the header marked finished (in that order, so
        that a header that says finished always has its counts). ``failed``: skipped inputs and why."""
        self.stop("finished", failed)

    def stop(self, status: str, failed: Mapping[str, str] | None = None) -> None:
        """End the run with ``status`` (``finished``, ``interrupted``, ``failed: <why>``): close the entries, write
        ``counts.csv`` from them and the header. Anything but ``finished`` leaves the run marked unfinished."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        self.write_counts()
        self.header["failed"] = [{"input": name, "reason": reason} for name, reason in sorted((failed or {}).items())]
        self._write_header(status)

    def _write_header(self, status: str) -> None:
        self.header.update({"status": status, "finished": status == "finished", "updated": _now(),
                            "n_done": len(self.listed()), "n_failed": len(self.header.get("failed") or [])})
        write_text(self.folder / MANIFEST, json.dumps(self.header, indent=2) + "\n")


def _cut_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a write torn by a kill) off an append-only file of lines."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        keep = size - 1
        while keep > 0:  # back to the last newline, in blocks
            start = max(0, keep - 65536)
            handle.seek(start)
            block = handle.read(keep - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            keep = start
        handle.truncate(keep)
