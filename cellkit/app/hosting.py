"""The app served: Shiny behind the upload limit and the allowed host names, run with uvicorn."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

from cellkit import config
from cellkit.app.server import build_server, build_ui
from cellkit.app.uploads import (
    MAX_UPLOAD_BYTES,
    UploadLimit,
)

#: Host names a server on a loopback address answers to (the Host header; IPv6 literals in brackets).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

def default_allowed_hosts(host: str) -> list[str]:
    """The Host header names a server listening on ``host`` answers to: the loopback names (127.0.0.1, localhost,
    [::1]) on a loopback address, ``host`` itself on another one, any name (``*``) on all addresses (0.0.0.0,
    ::), where visitors may use any of the machine's names; :func:`serve`'s ``allowed_hosts`` narrows that."""
    bare = host.strip("[]")
    if bare in ("", "0.0.0.0", "::"):
        return ["*"]
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:  # a name
        return [*LOOPBACK_HOSTS] if bare.lower() == "localhost" else [bare.lower()]
    name = f"[{address.compressed}]" if address.version == 6 else address.compressed
    return list(dict.fromkeys([*LOOPBACK_HOSTS, name])) if address.is_loopback else [name]


def create_app(models_dir: str | Path | None = None, figures_dir: str | Path | None = None,
               allowed_hosts: list[str] | None = None) -> Any:
    """The ASGI app: Shiny's app behind :class:`UploadLimit` (a margin of 1 MiB over :data:`MAX_UPLOAD_BYTES`,
    so that a slightly larger file still reaches the page's own message), behind Starlette's
    ``TrustedHostMiddleware``: a request whose Host header is not in ``allowed_hosts`` (default: the loopback names,
    :data:`LOOPBACK_HOSTS`; ``["*"]`` accepts any) gets 400."""
    from shiny import App
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    models_dir = Path(models_dir) if models_dir else config.models_dir()
    figures_dir = Path(figures_dir) if figures_dir else config.figures_dir()
    shiny_app = App(build_ui(models_dir), build_server(models_dir, figures_dir))
    limited = UploadLimit(shiny_app, MAX_UPLOAD_BYTES + 2**20)
    return TrustedHostMiddleware(limited, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS), www_redirect=False)


def serve(models_dir: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
          figures_dir: str | Path | None = None, allowed_hosts: list[str] | None = None) -> None:
    """Run the app with uvicorn until interrupted. Keras is imported first, so that the first upload does not
    wait for it. ``allowed_hosts``: the Host names to answer (default: :func:`default_allowed_hosts` of ``host``),
    e.g. ``["cells.example.org"]`` for ``host="0.0.0.0"``."""
    import uvicorn

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras  # noqa: F401 - warm-up import: several seconds on a small CPU

    allowed = list(allowed_hosts or default_allowed_hosts(host))
    app = create_app(models_dir, figures_dir, allowed)
    print(f"cellkit app on http://{host}:{port} (models: {Path(models_dir or config.models_dir())})", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        names = "any host name" if "*" in allowed else ", ".join(allowed)
        print(f"note: listening on {host}: other machines that reach it can use the app and upload images; it "
              f"answers requests for {names}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
