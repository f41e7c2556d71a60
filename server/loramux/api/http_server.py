"""uvicorn serving the HTTP front door on the gRPC server's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the App owns SIGTERM and SIGINT (it drains first)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """Owns the listening socket and the uvicorn server task."""

    def __init__(self, app, host: str, port: int, tls_cert: Path | None = None, tls_key: Path | None = None,
                 grace: float = 5.0) -> None:
        # The socket is bound here, so that a port in use is our error and not uvicorn's sys.exit.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise RuntimeError(f"cannot bind HTTP {host}:{port}: {exc}") from None
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", ws="none",
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key, timeout_graceful_shutdown=grace)
        self._server = _Server(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let open responses end (up to `grace`), close."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
