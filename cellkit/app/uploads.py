"""Uploads: checked by content, size and pixel count, then decoded in memory; request bodies bounded."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException

from cellkit.datasets import DataError, decode_image, first_line

#: Largest accepted upload, in bytes (20 MiB).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest accepted image, in pixels (height x width): 16 megapixels, e.g. 4000 x 4000.
MAX_PIXELS = 16_000_000
#: File signatures (first bytes) of the accepted formats; the file name is never trusted.
SIGNATURES: dict[bytes, str] = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"II+\x00": "TIFF",  # BigTIFF
    b"MM\x00+": "TIFF",
}

def image_format(data: bytes) -> str:
    """``PNG``, ``JPEG`` or ``TIFF`` from the first bytes of ``data``; a one-line DataError for anything else."""
    for signature, kind in SIGNATURES.items():
        if data.startswith(signature):
            return kind
    raise DataError("not a PNG, JPEG or TIFF image (checked by its content, not its name)")


def image_shape(data: bytes, kind: str) -> tuple[int, int]:
    """(height, width) in pixels from the image header, without decoding the pixels."""
    try:
        if kind == "TIFF":
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                shape = tif.pages[0].shape
                axes = tif.pages[0].axes
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return int(image.height), int(image.width)
    except Exception as error:  # noqa: BLE001 - any header failure is a bad upload, said in one line
        raise DataError(f"cannot read the {kind} header ({first_line(error)})") from None


def read_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Check and decode an uploaded image held in memory: (H, W) or (H, W, C) uint8/uint16, as stored.

    Checked in this order, each failure a one-line DataError: size <= ``max_bytes``; a PNG, JPEG or TIFF
    signature; height x width <= ``max_pixels`` (read from the header, before decoding); the decoding itself.
    """
    if not data:
        raise DataError("the file is empty")
    if len(data) > max_bytes:
        raise DataError(f"the file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
    kind = image_format(data)
    height, width = image_shape(data, kind)
    if height * width > max_pixels:
        raise DataError(f"the image is {width} x {height} pixels ({height * width / 1e6:.1f} Mpx); the limit is "
                        f"{max_pixels / 1e6:.0f} Mpx")
    from PIL import Image

    try:
        return decode_image(io.BytesIO(data), tiff=kind == "TIFF", name=f"the {kind} image")
    except (Image.DecompressionBombError, MemoryError) as error:
        raise DataError(f"the {kind} image cannot be decoded ({type(error).__name__})") from None


def take_upload(file_info: dict[str, Any], max_bytes: int = MAX_UPLOAD_BYTES) -> bytes:
    """The bytes of a Shiny upload (``{"name", "size", "type", "datapath"}``), read into memory; the temporary
    copy Shiny wrote is deleted straight away, so no uploaded content stays on disk."""
    path = Path(file_info["datapath"])
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"the file is {size / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB")
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


class Upload:
    """An uploaded file held in memory, decoded at most once (on a model worker), however many models or
    transformations look at it afterwards."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self._data = name, data
        self._decoded: np.ndarray | str | None = None  # the image, or why it was refused
        self._lock = threading.Lock()

    def image(self) -> np.ndarray:
        """The decoded image (:func:`read_upload`); its one-line DataError, raised every time it is asked for."""
        with self._lock:
            if self._decoded is None:
                try:
                    self._decoded = read_upload(self._data)
                except DataError as error:
                    self._decoded = str(error)
                self._data = b""  # the bytes are not needed once decoded
            if isinstance(self._decoded, str):
                raise DataError(self._decoded)
            return self._decoded




class UploadLimit:
    """ASGI middleware: refuses a request body larger than ``max_bytes`` with 413 before it reaches Shiny, which
    would otherwise write any size to its temporary folder: at once when its Content-Length says so, else (a body
    sent in chunks) as soon as the bytes read pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send)
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise TooLarge()  # Starlette (Shiny's routes) answers an HTTPException itself
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except TooLarge:
            if not started:  # an app that let it through, not Starlette
                await _too_large(send)


#: What a refused upload is told (the page's upload bar shows it).
TOO_LARGE = f"upload too large: the limit is {MAX_UPLOAD_BYTES // 2**20} MiB"


class TooLarge(HTTPException):
    """A request body passed :class:`UploadLimit`'s limit while it was read: Starlette answers it with 413 and
    :data:`TOO_LARGE`, without a traceback (it is an HTTPException)."""

    def __init__(self) -> None:
        super().__init__(413, TOO_LARGE)


async def _too_large(send: Callable) -> None:
    body = TOO_LARGE.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
