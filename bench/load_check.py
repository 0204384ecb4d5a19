"""Reloads under load: prove that route changes through NATS cost no request.

Run the full check (about two minutes, loopback only, stops by itself)::

    .venv/bin/python bench/load_check.py

It starts everything it needs on free loopback ports, in a scratch directory:
a nats-server with JetStream, two echo backends (a process of their own,
answering plain requests, `?sleep=SECONDS` slow requests and websockets),
HAProxy in master-worker mode, and the sidecar (the same `Sidecar` and
`Store` that `momus-haproxy run` uses) following the key. Then, at once:

- `wrk` keep-alive clients (wrk never retries a failed request),
- `hey -disable-keepalive` clients, a new connection for every request,
- slow requests that the backend holds for a few seconds,
- websocket sessions that echo a message every 100 ms for a few seconds,
- one idle websocket opened after every reload and kept open ("pinned"),
  so that each reload leaves an old worker behind,

while `--changes` route changes are put under the key one after the other,
each applied (rendered, checked, installed, reloaded) before the next.

It checks: no refused, reset or failed request and no 5xx from any client;
every slow request completes; every websocket session that lived through a
reload ends on the worker it started on, now an old worker; the master pid
never changes; every change is applied and reloads HAProxy; old workers never
exceed `mworker-max-reloads`; and the old workers drain once the clients are
done. It prints a table of figures (and `--json FILE` writes them) and exits
with status 0 when every check holds, 1 otherwise. A run is bounded by
`--max-seconds`; everything it started is stopped by pid on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from momus_haproxy.errors import ReloadError  # noqa: E402
from momus_haproxy.haproxy import HAProxyProcess  # noqa: E402
from momus_haproxy.install import install  # noqa: E402
from momus_haproxy.nats_server import EmbeddedNats, free_port  # noqa: E402
from momus_haproxy.reload import MasterSocket, ProcState  # noqa: E402
from momus_haproxy.render import RenderSettings  # noqa: E402
from momus_haproxy.sidecar import (  # noqa: E402
    ApplyResult,
    Sidecar,
    SidecarSettings,
    initial_files,
)
from momus_haproxy.watch import NatsOptions, Store  # noqa: E402

HOST = "load.test"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
MAX_SLEEP = 30.0
log = logging.getLogger("load_check")


# --------------------------------------------------------------------------
# Settings and figures


@dataclass(frozen=True)
class Params:
    """What one run does; every field is a command-line option."""

    changes: int = 240
    runtime_every: int = 6
    wrk_connections: int = 16
    hey_connections: int = 4
    hey_rate: int = 50
    slow: int = 10
    slow_seconds: float = 2.5
    ws_sessions: int = 2
    ws_lifetime: float = 4.0
    pinned: bool = True
    max_reloads: int = 50
    max_seconds: float = 600.0
    haproxy_bin: str = "haproxy"
    keep: bool = False


@dataclass
class Report:
    """The figures of one run, and the checks that failed."""

    changes_put: int = 0
    changes_applied: int = 0
    changes_needing_reload: int = 0
    applied_at_runtime: int = 0
    reloads: int = 0
    apply_ms_p50: float = 0.0
    apply_ms_p95: float = 0.0
    apply_ms_max: float = 0.0
    master_pids: list[int] = field(default_factory=list)
    max_old_workers: int = 0
    haproxy_pss_mib_max: float = 0.0
    old_workers_at_end: int = -1
    old_workers_left: list[str] = field(default_factory=list)
    drain_seconds: float = 0.0
    wrk_requests: int = 0
    wrk_errors: dict[str, int] = field(default_factory=dict)
    wrk_non_2xx_3xx: int = 0
    hey_requests: int = 0
    hey_statuses: dict[str, int] = field(default_factory=dict)
    hey_errors: dict[str, int] = field(default_factory=dict)
    slow_sent: int = 0
    slow_ok: int = 0
    slow_failures: list[str] = field(default_factory=list)
    slow_seconds_min: float = 0.0
    ws_sessions: int = 0
    ws_messages: int = 0
    ws_failures: list[str] = field(default_factory=list)
    ws_spanning_reload: int = 0
    ws_ended_on_old_worker: int = 0
    ws_cut_by_bound: int = 0
    pinned_opened: int = 0
    pinned_alive: int = 0
    pinned_cut: int = 0
    pinned_unexpected: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def requests_sent(self) -> int:
        """Every HTTP request and websocket message the clients sent."""
        return (
            self.wrk_requests
            + self.hey_requests
            + self.slow_sent
            + self.ws_messages
            + self.ws_sessions
        )

    @property
    def requests_failed(self) -> int:
        """Every failed request, reset, refusal, 5xx or lost websocket message."""
        hey_bad = sum(n for code, n in self.hey_statuses.items() if code != "200")
        return (
            sum(self.wrk_errors.values())
            + self.wrk_non_2xx_3xx
            + sum(self.hey_errors.values())
            + hey_bad
            + len(self.slow_failures)
            + len(self.ws_failures)
        )


# --------------------------------------------------------------------------
# The echo backend, run as a process of its own (`--serve-backend NAME:PORT`)


async def serve_backend(name: str, port: int) -> None:
    """Answer HTTP/1.1 with a small JSON echo; hold `?sleep=` requests; echo ws."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while await _answer_one(name, reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def _answer_one(
    name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Serve one request; return whether the connection stays open for more."""
    target, headers = await _read_head(reader)
    length = int(headers.get("content-length", "0") or 0)
    if length:
        await reader.readexactly(length)
    if headers.get("upgrade", "").lower() == "websocket":
        await _websocket_echo(headers, reader, writer)
        return False
    sleep = parse_qs(urlsplit(target).query).get("sleep", ["0"])[0]
    with contextlib.suppress(ValueError):
        await asyncio.sleep(min(float(sleep), MAX_SLEEP))
    body = json.dumps({"backend": name, "path": target}).encode()
    close = headers.get("connection", "").lower() == "close"
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )
    await writer.drain()
    return not close


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """Read a request head; return its target and lower-cased headers."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    target = lines[0].split(" ")[1]
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key:
            headers[key.strip().lower()] = value.strip()
    return target, headers


async def _websocket_echo(
    headers: dict[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Accept a websocket upgrade and echo each frame until a close frame."""
    accept = ws_accept(headers.get("sec-websocket-key", ""))
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n" + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )
    await writer.drain()
    while True:
        opcode, payload = await ws_read(reader)
        writer.write(ws_frame(payload, opcode=opcode, mask=False))
        await writer.drain()
        if opcode == 8:
            return


# --------------------------------------------------------------------------
# Websocket frames, just enough of RFC 6455 for an echo


def ws_accept(key: str) -> str:
    """Return the Sec-WebSocket-Accept value for a Sec-WebSocket-Key."""
    digest = hashlib.sha1((key + WS_GUID).encode()).digest()  # noqa: S324
    return base64.b64encode(digest).decode()


def ws_frame(payload: bytes, *, opcode: int = 1, mask: bool = True) -> bytes:
    """Build one final frame; clients mask, servers do not."""
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head = bytes([0x80 | opcode, bit | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, bit | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, bit | 127]) + size.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def ws_read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read one frame; return its opcode and unmasked payload."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        size = int.from_bytes(await reader.readexactly(2), "big")
    elif size == 127:
        size = int.from_bytes(await reader.readexactly(8), "big")
    key = await reader.readexactly(4) if second & 0x80 else b""
    payload = await reader.readexactly(size)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


class WebSocket:
    """A websocket client connection through HAProxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.local_port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def connect(cls, port: int, host: str = HOST, path: str = "/ws") -> WebSocket:
        """Open a connection, upgrade it, and check the server's accept value."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except BaseException:
            writer.close()
            raise
        text = head.decode("latin-1")
        if not text.startswith("HTTP/1.1 101") or ws_accept(key) not in text:
            writer.close()
            raise ConnectionError(f"websocket upgrade refused: {text.splitlines()[0]}")
        return cls(reader, writer)

    async def echo(self, text: str, within: float = 5.0) -> None:
        """Send `text` and wait up to `within` seconds for the same text back."""
        self.writer.write(ws_frame(text.encode()))
        await self.writer.drain()
        opcode, payload = await asyncio.wait_for(ws_read(self.reader), within)
        if opcode != 1 or payload != text.encode():
            raise ConnectionError(f"echo of {text!r} came back as {payload!r}")

    async def close(self) -> None:
        """Close politely: a close frame, its answer, then the connection."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, TimeoutError):
            self.writer.write(ws_frame(b"", opcode=8))
            await self.writer.drain()
            await asyncio.wait_for(ws_read(self.reader), 5)
        self.abort()

    def abort(self) -> None:
        """Drop the connection."""
        self.writer.close()


# --------------------------------------------------------------------------
# Which HAProxy process holds a connection


def haproxy_pids() -> list[int]:
    """Return the pids of every process named haproxy on this machine."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "haproxy":
                    pids.append(int(entry))
    return pids


def connection_owner(server_port: int, client_port: int) -> int | None:
    """Return the pid of the HAProxy process holding a loopback connection.

    The connection is the one from our `client_port` to HAProxy's listener on
    `server_port`; its HAProxy side is found in /proc/net/tcp by its ports,
    then among the open files of the haproxy processes by its inode.
    """
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == local and parts[2] == remote:
            inode = parts[9]
            break
    if inode is None:
        return None
    wanted = f"socket:[{inode}]"
    for pid in haproxy_pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                        return pid
    return None


def proportional_memory_mib(pids: Iterable[int]) -> float:
    """Return the memory the processes hold, shared pages split among them (PSS)."""
    total_kib = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            match = re.search(r"^Pss:\s+(\d+) kB", text, re.MULTILINE)
            total_kib += int(match.group(1)) if match else 0
    return round(total_kib / 1024, 1)


# --------------------------------------------------------------------------
# The stack: nats-server, backends, HAProxy, the sidecar


@dataclass
class Stack:
    """Everything a run talks to."""

    workdir: Path
    nats_url: str
    http_port: int
    backend_ports: list[int]
    haproxy: HAProxyProcess
    sidecar: Sidecar
    results: dict[int, ApplyResult] = field(default_factory=dict)
    applied: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def on_result(self, result: ApplyResult) -> None:
        """Keep each revision's result and wake whoever waits for one."""
        self.results[result.revision] = result
        self.applied.set()

    async def wait_result(self, revision: int, within: float) -> ApplyResult:
        """Wait up to `within` seconds for the sidecar's result for `revision`."""
        deadline = time.monotonic() + within
        while revision not in self.results:
            left = deadline - time.monotonic()
            if self.task is not None and self.task.done():
                raise RuntimeError(f"the sidecar stopped: {self.task!r}")
            if left <= 0:
                raise TimeoutError(f"revision {revision} not applied in {within} s")
            self.applied.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.applied.wait(), min(left, 1.0))
        return self.results[revision]


def document(index: int, ports: list[int], runtime_every: int = 0) -> bytes:
    """The `index`th routing document.

    Each one moves the cluster to another set of destinations and adds a route
    for a new host. Most also flip the load-balancing policy, which only a
    reload can change; every `runtime_every`th one does not, so the sidecar
    can apply it through HAProxy's runtime API instead.
    """
    flips = index - index // runtime_every if runtime_every else index
    choices = [ports[:1], ports, ports[1:]]
    destinations = {
        f"d{port}": {"Address": f"http://127.0.0.1:{port}"}
        for port in choices[index % 3]
    }
    routes = [
        {
            "RouteId": "load",
            "ClusterId": "load",
            "Match": {"Hosts": [HOST], "Path": "{**catch-all}"},
        },
        {
            "RouteId": "extra",
            "ClusterId": "load",
            "Match": {"Hosts": [f"v{index}.test"]},
        },
    ]
    cluster = {
        "ClusterId": "load",
        "LoadBalancingPolicy": ("RoundRobin", "LeastRequests")[flips % 2],
        "Destinations": destinations,
    }
    return json.dumps({"Routes": routes, "Clusters": [cluster]}).encode()


def needs_reload(index: int, runtime_every: int) -> bool:
    """Whether the `index`th document changes what only a reload can change."""
    return not runtime_every or index % runtime_every != 0


async def start_backend(name: str, port: int) -> asyncio.subprocess.Process:
    """Run an echo backend process and wait until it listens."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve-backend",
        f"{name}:{port}",
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 10)
    except TimeoutError:
        line = b""
    if line.strip() != b"ready":
        await stop_process(process, signal.SIGKILL)
        raise RuntimeError(f"echo backend {name} did not start")
    return process


async def stop_process(
    process: asyncio.subprocess.Process, sig: int = signal.SIGTERM
) -> None:
    """Stop a process we started, by its pid; kill it if it does not stop."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
    try:
        await asyncio.wait_for(process.wait(), 30)
    except TimeoutError:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def stack(params: Params, workdir: Path) -> AsyncIterator[Stack]:
    """Start NATS, two backends, HAProxy and the sidecar; stop them all after."""
    ports = [free_port(), free_port()]
    http_port = free_port()
    render = RenderSettings(
        http_bind=f"127.0.0.1:{http_port}",
        stats_bind=None,
        max_reloads=params.max_reloads,
    )
    settings = SidecarSettings(
        config_dir=workdir / "conf",
        master_socket=workdir / "run" / "master.sock",
        data_dir=workdir / "data",
        haproxy_bin=params.haproxy_bin,
        render=render,
    )
    backends: list[asyncio.subprocess.Process] = []
    try:
        for name, port in zip("ab", ports, strict=True):
            backends.append(await start_backend(name, port))
        nats_url = f"nats://127.0.0.1:{free_port()}"
        async with EmbeddedNats(nats_url, workdir / "nats"):
            install(initial_files(settings).files, settings.config_dir)
            haproxy = HAProxyProcess(
                settings.config_dir, workdir / "run", haproxy_bin=params.haproxy_bin
            )
            async with haproxy:
                store = Store(NatsOptions(servers=[nats_url]), wait=True)
                sidecar = Sidecar(settings, store)
                running = Stack(workdir, nats_url, http_port, ports, haproxy, sidecar)
                sidecar.on_result = running.on_result
                task = asyncio.create_task(sidecar.run())
                running.task = task
                try:
                    yield running
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    finally:
        for process in backends:
            await stop_process(process)


# --------------------------------------------------------------------------
# Load generators


async def start_tool(
    argv: list[str], workdir: Path, name: str
) -> asyncio.subprocess.Process:
    """Start wrk or hey with its output in a file of the work directory."""
    output = (workdir / f"{name}.out").open("wb")
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    finally:
        output.close()


def parse_wrk(text: str, report: Report) -> None:
    """Read requests, socket errors and non-2xx/3xx answers from wrk's summary."""
    match = re.search(r"(\d+) requests in", text)
    report.wrk_requests = int(match.group(1)) if match else 0
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    names = ("connect", "read", "write", "timeout")
    counts = [int(n) for n in errors.groups()] if errors else [0, 0, 0, 0]
    report.wrk_errors = dict(zip(names, counts, strict=True))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    report.wrk_non_2xx_3xx = int(bad.group(1)) if bad else 0
    if match is None:
        report.failures.append(f"wrk printed no summary: {text[-300:]!r}")


def parse_hey(text: str, report: Report) -> None:
    """Read the status and error distributions from hey's summary."""
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith(("Status code distribution", "Error distribution")):
            section = line
            continue
        status = re.match(r"\s+\[(\d+)\]\s+(\d+) responses", line)
        error = re.match(r"\s+\[(\d+)\]\s+(.*)", line)
        if section.startswith("Status") and status:
            statuses[status.group(1)] = int(status.group(2))
        elif section.startswith("Error") and error:
            errors[error.group(2)[:120]] = int(error.group(1))
    report.hey_statuses = statuses
    report.hey_errors = errors
    report.hey_requests = sum(statuses.values()) + sum(errors.values())
    if "Summary:" not in text:
        report.failures.append(f"hey printed no summary: {text[-300:]!r}")


async def slow_request(port: int, seconds: float, report: Report) -> None:
    """Send one request the backend holds for `seconds`, on a new connection."""
    report.slow_sent += 1
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        report.slow_failures.append(f"slow request: {exc!r}")
        return
    try:
        writer.write(
            f"GET /slow?sleep={seconds} HTTP/1.1\r\nHost: {HOST}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), seconds + 30)
    except (OSError, TimeoutError) as exc:
        report.slow_failures.append(f"slow request: {exc!r}")
        return
    finally:
        writer.close()
    took = time.monotonic() - started
    status = answer.split(b" ", 2)[1:2]
    if status != [b"200"] or took < seconds:
        report.slow_failures.append(f"slow request: {answer[:60]!r} after {took:.2f} s")
        return
    report.slow_ok += 1
    report.slow_seconds_min = min(report.slow_seconds_min or took, took)


async def ws_session(
    port: int, params: Params, master: MasterSocket, report: Report
) -> None:
    """Echo a message every 100 ms for `params.ws_lifetime` seconds, then close.

    The HAProxy process that holds the connection is read at the start and at
    the end: it must be the same, and after a reload it must be an old worker.
    A session whose worker lived through more than `max_reloads` reloads is
    ended by HAProxy by design; it is counted apart, not as a failure.
    """
    try:
        ws = await WebSocket.connect(port)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        report.ws_failures.append(f"websocket connect: {exc!r}")
        return
    report.ws_sessions += 1
    try:
        await _echo_for(port, ws, params, master, report)
    except ReloadError as exc:
        report.ws_failures.append(f"websocket session: {exc}")
    finally:
        await ws.close()


async def _echo_for(
    port: int, ws: WebSocket, params: Params, master: MasterSocket, report: Report
) -> None:
    """Echo through `ws` for its lifetime, then check which worker held it."""
    owner = connection_owner(port, ws.local_port)
    before = (await master.show_proc()).reloads
    try:
        deadline = time.monotonic() + params.ws_lifetime
        while time.monotonic() < deadline:
            report.ws_messages += 1
            await ws.echo(f"message {report.ws_messages}")
            await asyncio.sleep(0.1)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        lived = (await master.show_proc()).reloads - before
        if lived > params.max_reloads:
            report.ws_cut_by_bound += 1
        else:
            report.ws_failures.append(f"websocket message: {exc!r}")
        return
    state = await master.show_proc()
    _check_ws_owner(port, ws, owner, before, state, report, params.max_reloads)


def _check_ws_owner(
    port: int,
    ws: WebSocket,
    owner: int | None,
    before: int,
    state: ProcState,
    report: Report,
    max_reloads: int,
) -> None:
    """Count a session that lived through a reload and ended on an old worker."""
    now = connection_owner(port, ws.local_port)
    if now is None and state.reloads - before > max_reloads:
        report.ws_cut_by_bound += 1
        return
    if owner is None or now != owner:
        report.ws_failures.append(f"websocket moved from pid {owner} to {now}")
        return
    if state.reloads > before:
        report.ws_spanning_reload += 1
        if owner in state.old_worker_pids:
            report.ws_ended_on_old_worker += 1


async def ws_sessions(
    port: int,
    params: Params,
    master: MasterSocket,
    stop: asyncio.Event,
    report: Report,
) -> None:
    """Run websocket sessions one after the other until `stop` is set."""
    while not stop.is_set():
        await ws_session(port, params, master, report)


async def sample(
    master: MasterSocket, stop: asyncio.Event, report: Report, pids: set[int]
) -> None:
    """Read `show proc` four times a second: master pid and old workers."""
    while not stop.is_set():
        with contextlib.suppress(ReloadError):
            state = await master.show_proc()
            pids.add(state.master_pid)
            if len(state.old_workers) >= report.max_old_workers:
                report.max_old_workers = len(state.old_workers)
                processes = (
                    state.master_pid,
                    *state.worker_pids,
                    *state.old_worker_pids,
                )
                memory = proportional_memory_mib(processes)
                report.haproxy_pss_mib_max = max(report.haproxy_pss_mib_max, memory)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


# --------------------------------------------------------------------------
# One run


@dataclass
class Pinned:
    """An idle websocket opened right after a reload, kept to pin its worker."""

    ws: WebSocket
    reloads_at_open: int


async def run(params: Params) -> Report:
    """Start the stack, put the changes under load, and return the figures."""
    report = Report()
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="momus-load-"))
    _log_to(workdir / "sidecar.log")
    try:
        async with stack(params, workdir) as running:
            await asyncio.wait_for(
                _under_load(params, running, report), params.max_seconds
            )
    except TimeoutError:
        report.failures.append(f"the run did not finish within {params.max_seconds} s")
    report.duration_s = round(time.monotonic() - started, 1)
    _judge(params, report)
    if params.keep or report.failures:
        print(f"work directory kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _log_to(path: Path) -> None:
    """Send the sidecar's log lines to a file of the work directory."""
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


async def _under_load(params: Params, running: Stack, report: Report) -> None:
    """Apply the first document, then the changes with every client running."""
    master = MasterSocket(running.haproxy.master_socket, retry_for=10)
    async with Store(NatsOptions(servers=[running.nats_url])) as operator:
        ports = running.backend_ports
        first = await operator.put(document(0, ports))
        await running.wait_result(first, 30)
        reloads_before = (await master.show_proc()).reloads
        url = f"http://127.0.0.1:{running.http_port}/"
        tools = await _start_tools(params, running.workdir, url)
        stop = asyncio.Event()
        pids: set[int] = set()
        background = [
            asyncio.create_task(sample(master, stop, report, pids)),
            *(
                asyncio.create_task(
                    ws_sessions(running.http_port, params, master, stop, report)
                )
                for _ in range(params.ws_sessions)
            ),
        ]
        pinned: list[Pinned] = []
        try:
            await _apply_changes(params, running, operator, master, report, pinned)
        finally:
            stop.set()
            await asyncio.gather(*background, return_exceptions=True)
            for tool in tools.values():
                await stop_process(tool, signal.SIGINT)
        await _check_pinned(params, master, pinned, report)
        report.reloads = (await master.show_proc()).reloads - reloads_before
        await _drain(master, report)
        report.master_pids = sorted(pids | {(await master.show_proc()).master_pid})
    parse_wrk((running.workdir / "wrk.out").read_text(errors="replace"), report)
    parse_hey((running.workdir / "hey.out").read_text(errors="replace"), report)


async def _start_tools(
    params: Params, workdir: Path, url: str
) -> dict[str, asyncio.subprocess.Process]:
    """Start wrk (keep-alive) and hey (a new connection per request)."""
    bound = f"{int(params.max_seconds)}s"
    wrk = [
        "wrk", "-t1", f"-c{params.wrk_connections}", f"-d{bound}",
        "--timeout", "10s", "-H", f"Host: {HOST}", url,
    ]  # fmt: skip
    hey = [
        "hey", "-z", bound, "-c", str(params.hey_connections),
        "-q", str(params.hey_rate), "-t", "20", "-disable-keepalive",
        "-host", HOST, url + "hey",
    ]  # fmt: skip
    return {
        "wrk": await start_tool(wrk, workdir, "wrk"),
        "hey": await start_tool(hey, workdir, "hey"),
    }


async def _apply_changes(
    params: Params,
    running: Stack,
    operator: Store,
    master: MasterSocket,
    report: Report,
    pinned: list[Pinned],
) -> None:
    """Put each change, wait until it is applied, and keep the slow requests going."""
    latencies: list[float] = []
    slow_every = max(1, params.changes // max(1, params.slow))
    slow_tasks: list[asyncio.Task[None]] = []
    for index in range(1, params.changes + 1):
        if params.slow and index % slow_every == 1 and len(slow_tasks) < params.slow:
            coroutine = slow_request(running.http_port, params.slow_seconds, report)
            slow_tasks.append(asyncio.create_task(coroutine))
        put_at = time.monotonic()
        value = document(index, running.backend_ports, params.runtime_every)
        revision = await operator.put(value)
        result = await running.wait_result(revision, 60)
        report.changes_put += 1
        report.changes_needing_reload += needs_reload(index, params.runtime_every)
        report.applied_at_runtime += result.outcome == "runtime"
        latencies.append((time.monotonic() - put_at) * 1000)
        if result.outcome not in ("applied", "runtime"):
            report.failures.append(
                f"revision {revision}: {result.outcome} {result.error}"
            )
            continue
        report.changes_applied += 1
        if params.pinned:
            await _pin(running.http_port, master, pinned, report)
    await asyncio.gather(*slow_tasks)
    _latencies(latencies, report)


async def _pin(
    port: int, master: MasterSocket, pinned: list[Pinned], report: Report
) -> None:
    """Open an idle websocket on the worker that is current now."""
    try:
        ws = await WebSocket.connect(port)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        report.ws_failures.append(f"pinned websocket connect: {exc!r}")
        return
    report.pinned_opened += 1
    try:
        pinned.append(Pinned(ws, (await master.show_proc()).reloads))
    except ReloadError as exc:
        report.ws_failures.append(f"pinned websocket: {exc}")
        ws.abort()


async def _check_pinned(
    params: Params, master: MasterSocket, pinned: list[Pinned], report: Report
) -> None:
    """Each pinned socket must be alive unless its worker outlived the bound.

    `mworker-max-reloads N` ends a worker that has lived through more than N
    reloads; one opened within the last N - 1 reloads must still echo, and
    one opened N + 2 or more reloads ago must have been closed by HAProxy.
    """
    reloads = (await master.show_proc()).reloads
    for number, item in enumerate(pinned):
        lived = reloads - item.reloads_at_open
        try:
            await item.ws.echo("still there?", within=3)
            alive = True
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            alive = False
        report.pinned_alive += alive
        report.pinned_cut += not alive
        if alive and lived >= params.max_reloads + 2:
            report.pinned_unexpected.append(f"#{number} alive after {lived} reloads")
        if not alive and lived < params.max_reloads:
            report.pinned_unexpected.append(f"#{number} cut after {lived} reloads")
        if alive:
            await item.ws.close()
        else:
            item.ws.abort()


async def _drain(master: MasterSocket, report: Report, within: float = 30) -> None:
    """Wait until no old worker is left, and say how long it took."""
    started = time.monotonic()
    state = await master.show_proc()
    while state.old_workers and time.monotonic() - started < within:
        await asyncio.sleep(0.2)
        state = await master.show_proc()
    report.old_workers_at_end = len(state.old_workers)
    report.old_workers_left = [
        f"pid {worker.pid}: {worker.reloads} reloads, sockets {_sockets(worker.pid)}"
        for worker in state.old_workers
    ]
    report.drain_seconds = round(time.monotonic() - started, 1)


def _sockets(pid: int) -> str:
    """Describe the TCP connections a process holds: local and remote port, state."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[9] in inodes:
            local, remote = (int(part.split(":")[1], 16) for part in parts[1:3])
            found.append(f"{local}->{remote} state {parts[3]}")
    return ", ".join(found) or f"{len(inodes)} non-TCP"


def _latencies(values: list[float], report: Report) -> None:
    """Record the put-to-applied times in milliseconds."""
    if not values:
        return
    ordered = sorted(values)
    report.apply_ms_p50 = round(statistics.median(ordered), 1)
    report.apply_ms_p95 = round(ordered[int(0.95 * (len(ordered) - 1))], 1)
    report.apply_ms_max = round(ordered[-1], 1)


def _judge(params: Params, report: Report) -> None:
    """Turn the figures into the list of failed checks."""
    checks = {
        "every change applied": report.changes_applied == params.changes,
        "a reload per change that needs one": (
            report.reloads >= report.changes_needing_reload
        ),
        "no failed request": report.requests_failed == 0,
        "every slow request completed": report.slow_ok == params.slow,
        "one master pid": len(report.master_pids) == 1,
        "old workers within the bound": report.max_old_workers <= params.max_reloads,
        "old workers drained": report.old_workers_at_end == 0,
        "pinned sockets as the bound says": not report.pinned_unexpected,
        "websockets ended on old workers": (
            report.ws_ended_on_old_worker == report.ws_spanning_reload
        ),
        "some websocket lived through a reload": (
            params.ws_sessions == 0 or report.ws_spanning_reload > 0
        ),
    }
    report.failures += [name for name, held in checks.items() if not held]


# --------------------------------------------------------------------------
# Output


def table(report: Report) -> str:
    """Format the figures as a Markdown table."""
    rows = [
        ("route changes put / applied",
         f"{report.changes_put} / {report.changes_applied}"),
        ("changes needing a reload / applied at runtime",
         f"{report.changes_needing_reload} / {report.applied_at_runtime}"),
        ("HAProxy reloads", report.reloads),
        ("apply time p50 / p95 / max (ms)",
         f"{report.apply_ms_p50} / {report.apply_ms_p95} / {report.apply_ms_max}"),
        ("requests sent (all clients)", report.requests_sent),
        ("requests failed", report.requests_failed),
        ("wrk keep-alive requests", report.wrk_requests),
        ("wrk socket errors", _pairs(report.wrk_errors)),
        ("wrk non-2xx/3xx", report.wrk_non_2xx_3xx),
        ("hey new-connection requests", report.hey_requests),
        ("hey statuses", _pairs(report.hey_statuses)),
        ("hey errors", _pairs(report.hey_errors) or "none"),
        ("slow requests sent / completed", f"{report.slow_sent} / {report.slow_ok}"),
        ("shortest slow request (s)", round(report.slow_seconds_min, 2)),
        ("websocket sessions / messages",
         f"{report.ws_sessions} / {report.ws_messages}"),
        ("sessions through a reload / ended on old worker",
         f"{report.ws_spanning_reload} / {report.ws_ended_on_old_worker}"),
        ("sessions ended by mworker-max-reloads", report.ws_cut_by_bound),
        ("pinned websockets opened / alive / cut",
         f"{report.pinned_opened} / {report.pinned_alive} / {report.pinned_cut}"),
        ("most old workers at once", report.max_old_workers),
        ("HAProxy memory then, PSS (MiB)", report.haproxy_pss_mib_max),
        ("master pids seen", ", ".join(map(str, report.master_pids))),
        ("old workers drained in (s)", report.drain_seconds),
        ("run time (s)", report.duration_s),
    ]  # fmt: skip
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def _pairs(values: dict[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in values.items())


def parse_args(argv: Iterable[str]) -> tuple[Params, Path | None]:
    """Read the command line."""
    defaults = Params()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--changes", type=int, default=defaults.changes, help="route changes to apply")
    add(
        "--runtime-every",
        type=int,
        default=defaults.runtime_every,
        help="every Nth change needs no reload (0: every change reloads)",
    )
    add("--wrk-connections", type=int, default=defaults.wrk_connections)
    add("--hey-connections", type=int, default=defaults.hey_connections)
    add("--hey-rate", type=int, default=defaults.hey_rate, help="per hey connection")
    add("--slow", type=int, default=defaults.slow, help="slow requests to send")
    add("--slow-seconds", type=float, default=defaults.slow_seconds)
    add("--ws-sessions", type=int, default=defaults.ws_sessions)
    add("--ws-lifetime", type=float, default=defaults.ws_lifetime)
    add("--no-pinned", dest="pinned", action="store_false")
    add("--max-reloads", type=int, default=defaults.max_reloads)
    add("--max-seconds", type=float, default=defaults.max_seconds)
    add("--haproxy-bin", default=shutil.which("haproxy") or "/usr/sbin/haproxy")
    add("--keep", action="store_true", help="keep the work directory")
    add("--json", type=Path, help="also write the figures to this file")
    add("--serve-backend", help=argparse.SUPPRESS)
    args = vars(parser.parse_args(list(argv)))
    output = args.pop("json")
    backend = args.pop("serve_backend")
    if backend:
        name, _, port = backend.partition(":")
        asyncio.run(serve_backend(name, int(port)))
        sys.exit(0)
    return Params(**args), output


def main(argv: Iterable[str] = sys.argv[1:]) -> int:
    """Run the check, print the table, and return the exit status."""
    params, output = parse_args(argv)
    report = asyncio.run(run(params))
    print(table(report))
    if output is not None:
        figures = asdict(report)
        figures |= {
            "requests_sent": report.requests_sent,
            "requests_failed": report.requests_failed,
            "params": asdict(params),
        }
        output.write_text(json.dumps(figures, indent=2))
    for failure in report.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    for detail in [
        *report.slow_failures,
        *report.ws_failures,
        *report.pinned_unexpected,
        *report.old_workers_left,
    ]:
        print(f"  {detail}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
