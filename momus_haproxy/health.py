"""A small local HTTP listener for probes: `/healthz`, `/readyz` and `/metrics`.

`/healthz` answers 200 while the process runs. `/readyz` answers 200 once a
revision is applied and HAProxy's master answers, 503 otherwise, with the
reason in the body. `/metrics` serves the Prometheus registry given to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from types import TracebackType

from .errors import ProcessError

__all__ = ["HealthServer", "Probe", "check_bind"]

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[tuple[bool, str]]]
"""A readiness check: returns (ready, a one-line reason)."""

_STATUS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Unavailable"}


class HealthServer:
    """Serves the probe endpoints on `host:port` until closed."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Probe,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.ready = ready
        self.metrics = metrics
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start listening; a port of 0 picks a free one (see `port` after)."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port)
        except OSError as exc:
            raise _bind_error(self.host, self.port, exc) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health endpoints on http://%s:%d/readyz", self.host, self.port)

    async def aclose(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            status, kind, body = await self._answer(request.split(b"\r\n", 1)[0])
            head = (
                f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.LimitOverrunError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> tuple[int, str, bytes]:
        parts = line.decode("latin-1").split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        path = parts[1].split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, reason = await self.ready()
            return (200 if ready else 503), "text/plain", f"{reason}\n".encode()
        if path == "/metrics" and self.metrics is not None:
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics()
        return 404, "text/plain", b"not found\n"


def check_bind(host: str, port: int) -> None:
    """Raise the error `start()` would raise if `host:port` cannot be bound now.

    Standalone mode asks before it starts nats-server and HAProxy, so that a
    taken port stops it before anything runs.
    """
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise _bind_error(host, port, exc) from exc


def _bind_error(host: str, port: int, exc: OSError) -> ProcessError:
    return ProcessError(
        f"cannot listen on {host}:{port} for the health endpoints: "
        f"{exc.strerror or exc}; choose another address with --health-bind "
        "(MOMUS_HEALTH_BIND), or an empty one for none."
    )
