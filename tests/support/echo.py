"""Echo backends and a plain HTTP client for tests that send traffic through HAProxy.

An echo backend answers every request with status 200 and a JSON body::

    {"backend": NAME, "method": ..., "path": RAW_PATH_AND_QUERY,
     "headers": {lower-case name: value}}

so a test can see which backend got a request and what HAProxy sent it.
Per-path rules (`{"/health": {"require_host": H, "else_status": 400}}`, the
shape of `backend_rules` in the shared cases) answer `else_status` unless the
Host header is `H`; a `sleep=SECONDS` query parameter or the backend's
`delay` holds the answer back, for slow-request tests.

Fixture: `echo_backends`, a factory; `echo_backends.start("d1")` returns a
running `EchoBackend` on a free loopback port. Everything started is stopped
at teardown.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

__all__ = [
    "EchoBackend",
    "EchoBackends",
    "PathRule",
    "Response",
    "echo_backends",
    "free_port",
    "http_request",
]

_MAX_SLEEP = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass(frozen=True)
class PathRule:
    """Answer `else_status` on this path unless the Host header is `require_host`."""

    require_host: str
    else_status: int = 400

    @classmethod
    def from_case(cls, rule: PathRule | Mapping[str, Any]) -> PathRule:
        """Accept a rule as written in a case's `backend_rules`, or as is."""
        if isinstance(rule, PathRule):
            return rule
        return cls(str(rule["require_host"]), int(rule.get("else_status", 400)))


@dataclass
class EchoBackend:
    """One echo server; `stop()` and `start()` again keep the same port."""

    name: str
    port: int = 0
    rules: dict[str, PathRule] = field(default_factory=dict)
    delay: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)
    _server: _EchoServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        """Return whether the backend accepts connections now."""
        return self._server is not None

    def start(self) -> EchoBackend:
        """Listen on `port` (a free one the first time) and serve in a thread."""
        if self._server is not None:
            return self
        server = _EchoServer(("127.0.0.1", self.port), _EchoHandler, self)
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"echo-{self.name}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop listening and cut the open connections, as a crashed server would."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        server.shutdown()
        server.cut_connections()
        server.server_close()
        thread.join()

    def record(self, summary: dict[str, Any]) -> None:
        """Remember a request the backend received."""
        self.requests.append(summary)


class _EchoServer(ThreadingHTTPServer):
    """A threaded HTTP server that knows its backend and its open connections."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        backend: EchoBackend,
    ) -> None:
        self.backend = backend
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Track the connection so that `stop()` can cut it."""
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Forget a connection the handler has finished with."""
        with self._lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore connections cut by a stopping backend or a gone client."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def cut_connections(self) -> None:
        """Shut down every open connection, waking the threads that serve them."""
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _EchoHandler(BaseHTTPRequestHandler):
    """Answer any method with the JSON echo of the request."""

    protocol_version = "HTTP/1.1"
    server: _EchoServer
    timeout = 30

    def __getattr__(self, name: str) -> Callable[[], None]:
        """Route every `do_<METHOD>` to the echo, whatever the method."""
        if name.startswith("do_"):
            return self._answer
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""

    def _answer(self) -> None:
        """Read the request body, apply rules and delay, and send the echo."""
        backend = self.server.backend
        self._read_body()
        summary = {
            "backend": backend.name,
            "method": self.command,
            "path": self.path,
            "headers": {name.lower(): value for name, value in self._headers()},
        }
        backend.record(summary)
        time.sleep(min(self._delay(backend), _MAX_SLEEP))

        body = json.dumps(summary).encode()
        self.send_response(self._status(backend))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _headers(self) -> Iterator[tuple[str, str]]:
        """Yield each header once, repeated ones joined with commas."""
        names = dict.fromkeys(name.lower() for name in self.headers)
        for name in names:
            yield name, ", ".join(self.headers.get_all(name) or [])

    def _read_body(self) -> bytes:
        """Read the body, by length or chunked, so the connection stays usable."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunks()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunks(self) -> bytes:
        """Read a chunked body and its trailer."""
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        return b"".join(chunks)

    def _delay(self, backend: EchoBackend) -> float:
        """Return how long to hold the answer: `?sleep=` or the backend's delay."""
        values = parse_qs(urlsplit(self.path).query).get("sleep")
        if values:
            with contextlib.suppress(ValueError):
                return float(values[0])
        return backend.delay

    def _status(self, backend: EchoBackend) -> int:
        """Return 200, or a rule's `else_status` when its Host does not match."""
        rule = backend.rules.get(urlsplit(self.path).path)
        if rule is None or self.headers.get("Host") == rule.require_host:
            return 200
        return rule.else_status


class EchoBackends:
    """The `echo_backends` fixture: starts echo backends and stops them all."""

    def __init__(self) -> None:
        self.started: list[EchoBackend] = []

    def start(
        self,
        name: str,
        *,
        rules: Mapping[str, PathRule | Mapping[str, Any]] | None = None,
        delay: float = 0.0,
        port: int = 0,
    ) -> EchoBackend:
        """Start an echo backend called `name` on `port` (0: a free one)."""
        backend = EchoBackend(
            name,
            port=port,
            rules={
                path: PathRule.from_case(rule) for path, rule in (rules or {}).items()
            },
            delay=delay,
        )
        self.started.append(backend.start())
        return backend

    def stop_all(self) -> None:
        """Stop every backend started through this factory."""
        for backend in self.started:
            backend.stop()


@pytest.fixture
def echo_backends() -> Iterator[EchoBackends]:
    """Start echo backends on demand; stop them all after the test."""
    backends = EchoBackends()
    yield backends
    backends.stop_all()


@dataclass(frozen=True)
class Response:
    """An HTTP answer: status, lower-cased headers, the JSON body if any, the text."""

    status: int
    headers: dict[str, str]
    json: Any
    text: str


def http_request(
    port: int,
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5,
    body: bytes | None = None,
) -> Response:
    """Send one request to 127.0.0.1:`port` on a new connection; never follow redirects.

    `path` goes on the request line exactly as given (raw path and query).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        return read_response(connection.getresponse())
    finally:
        connection.close()


def read_response(answer: http.client.HTTPResponse) -> Response:
    """Read a whole `http.client` answer into a `Response`."""
    text = answer.read().decode(errors="replace")
    headers = {name.lower(): value for name, value in answer.getheaders()}
    parsed: Any = None
    if "json" in headers.get("content-type", ""):
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
    return Response(answer.status, headers, parsed, text)
