"""What the benchmarks share: the processes, the documents, probes and statistics.

Every process listens on 127.0.0.1 only and is stopped through the object
that started it (by its pid); every load is bounded in time or count.

- `Origin`: an HAProxy that answers every request itself on a few ports, with
  the port's index as the body, so a probe can tell which destination served
  it. It costs far less per request than the HAProxy under test.
- `Stack`: nats-server, an HAProxy in master-worker mode and the product's own
  `momus-haproxy run` (a separate process, as an operator runs it) following
  the bucket. `put()` writes a document; `result()` reads the sidecar's log
  line for a revision.
- `document()`: a routing document with N routes, one host and one
  destination each, or a mix with paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.aio.client import Client

from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.nats_server import EmbeddedNats, free_port
from momus_haproxy.reload import MasterSocket, ProcState
from momus_haproxy.render import RenderSettings
from momus_haproxy.sidecar import SidecarSettings, initial_files

ROOT = Path(__file__).resolve().parent.parent
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BUCKET, KEY = "momus", "route-config"

_RESULT = re.compile(
    r"revision (?P<revision>\d+) (?:"
    r"applied in (?P<total>\d+) ms \(render (?P<render>\d+), check (?P<check>\d+), "
    r"reload (?P<reload>\d+) ms\)"
    r"|applied at runtime in (?P<rt_total>\d+) ms \(render (?P<rt_render>\d+), "
    r"check (?P<rt_check>\d+), runtime (?P<runtime>\d+) ms\)"
    r"|(?P<unchanged>renders what is live)"
    r"|(?P<failed>refused|check failed|install failed|reload failed)"
    r")"
)


# Statistics -------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, p95, p99, min, max and the interquartile range of `values`."""
    if not values:
        return {}
    return {
        "n": len(values),
        "p50": statistics.median(values),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "min": min(values),
        "max": max(values),
        "iqr": percentile(values, 0.75) - percentile(values, 0.25),
    }


def spread(values: Sequence[float]) -> str:
    """`median (min-max)`, the way BENCHMARKS.md writes a repeated figure."""
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, data: Any) -> None:
    """Write the raw figures of a run, for BENCHMARKS.md and for the smoke tests."""
    if path is not None:
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def machine_note() -> str:
    """When and where a run happened, and how busy the machine was."""
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"{haproxy_version()}"
    )


def haproxy_version() -> str:
    """HAProxy's version line."""
    out = subprocess.run([HAPROXY, "-v"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else "haproxy ?"


# Documents --------------------------------------------------------------------


def host(index: int) -> str:
    """The host name of route `index` in the generated documents."""
    return f"h{index}.bench.test"


def document(
    routes: int,
    ports: Sequence[int],
    *,
    mix: bool = False,
    shared: int = 0,
    extra_routes: Sequence[dict[str, Any]] = (),
    extra_clusters: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A document with `routes` routes, each with its own cluster and destination.

    Plain: route i takes every path of host i. With `mix`, hosts come in
    groups of four routes: a catch-all, two path prefixes and a literal path.
    With `shared`, the routes share that many clusters instead.
    """
    route_list, clusters = [], []
    for index in range(routes):
        match: dict[str, Any] = {"Hosts": [host(index // 4 if mix else index)]}
        if mix and index % 4 in (1, 2):
            match["Path"] = f"/api{index % 4}/{{**rest}}"
        elif mix and index % 4 == 3:
            match["Path"] = "/about"
        name = f"c{index % shared if shared else index}"
        route_list.append({"RouteId": f"r{index}", "ClusterId": name, "Match": match})
    for index in range(shared or routes):
        address = f"http://127.0.0.1:{ports[index % len(ports)]}"
        clusters.append(
            {"ClusterId": f"c{index}", "Destinations": {"d": {"Address": address}}}
        )
    return {
        "Routes": route_list + list(extra_routes),
        "Clusters": clusters + list(extra_clusters),
    }


def route(name: str, cluster: str, *hosts: str) -> dict[str, Any]:
    """A route taking every path of `hosts`."""
    return {"RouteId": name, "ClusterId": cluster, "Match": {"Hosts": list(hosts)}}


def cluster(name: str, *ports: int) -> dict[str, Any]:
    """A round-robin cluster with one destination per port."""
    destinations = {
        f"p{port}": {"Address": f"http://127.0.0.1:{port}"} for port in ports
    }
    return {
        "ClusterId": name,
        "LoadBalancingPolicy": "RoundRobin",
        "Destinations": destinations,
    }


def encode(doc: dict[str, Any]) -> bytes:
    """The document as the bytes put under the key."""
    return json.dumps(doc, separators=(",", ":")).encode()


# Probes -----------------------------------------------------------------------


async def get(port: int, host_name: str, path: str = "/") -> tuple[int, str]:
    """One request on a new connection; returns status and body ((0, '') if refused)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, ""
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host_name}\r\nConnection: close\r\n"
        writer.write(request.encode() + b"\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
    except (OSError, TimeoutError):
        return 0, ""
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, ""
    return status, body.decode(errors="replace")


async def wait_for_answer(
    port: int,
    host_name: str,
    wanted: set[str],
    *,
    after: float,
    within: float,
    interval: float = 0.005,
    run: int = 1,
) -> float:
    """Poll until `run` answers in a row have a body in `wanted`; return when.

    The time returned is that of the last probe's start, as seconds after
    `after` (a `time.perf_counter()` value).
    """
    deadline = after + within
    streak = 0
    while True:
        sent = time.perf_counter()
        status, body = await get(port, host_name)
        streak = streak + 1 if status == 200 and body in wanted else 0
        if streak >= run:
            return sent - after
        if sent > deadline:
            message = f"{host_name} not answered by {sorted(wanted)} in {within} s"
            raise TimeoutError(message)
        await asyncio.sleep(interval)


# Processes --------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of a process, in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned_haproxy(directory: Path, cpus: str | None) -> str:
    """The haproxy command, run on the CPUs `cpus` (taskset list) if given.

    HAProxy sizes its thread count to the CPUs it may run on, so pinning it
    to one CPU also gives it one thread.
    """
    if cpus is None:
        return HAPROXY
    wrapper = directory / f"haproxy-on-{cpus.replace(',', '_')}"
    wrapper.write_text(f'#!/bin/sh\nexec taskset -c {cpus} {HAPROXY} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@contextlib.asynccontextmanager
async def scratch_dir(prefix: str) -> AsyncIterator[Path]:
    """A temporary directory removed afterwards (short, for socket paths)."""
    path = Path(tempfile.mkdtemp(prefix=f"momus-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Origin:
    """An HAProxy that answers on `count` ports with the port's index as the body.

    It closes every connection after its answer, so the HAProxy under test
    pays the same connection set-up per request whichever route it takes.
    """

    def __init__(self, base: Path, count: int, *, cpus: str | None = None) -> None:
        self.base = base / "origin"
        self.ports = [free_port() for _ in range(count)]
        self.cpus = cpus
        self.process: HAProxyProcess | None = None

    def index(self, port: int) -> str:
        """The body the origin answers on `port`."""
        return str(self.ports.index(port))

    async def __aenter__(self) -> Origin:
        config = self.base / "conf"
        config.mkdir(parents=True)
        lines = [
            "global",
            "    maxconn 4000",
            "defaults",
            "    mode http",
            "    timeout connect 5s",
            "    timeout client 30s",
            "    timeout server 30s",
            # Close after each answer: HAProxy under test then opens a server
            # connection per request whatever the route, and never piles up
            # idle connections to 10,000 distinct servers.
            "    option httpclose",
        ]
        for index, port in enumerate(self.ports):
            lines += [
                f"frontend o{index}",
                f"    bind 127.0.0.1:{port}",
                "    http-request return status 200 content-type text/plain"
                f' string "{index}"',
            ]
        (config / "haproxy.cfg").write_text("\n".join(lines) + "\n")
        binary = pinned_haproxy(self.base, self.cpus)
        self.process = HAProxyProcess(config, self.base / "run", haproxy_bin=binary)
        await self.process.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            await self.process.aclose()


@dataclass
class Result:
    """One revision as the sidecar logged it; times in milliseconds."""

    revision: int
    outcome: str
    total: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)


@dataclass
class Stack:
    """nats-server, HAProxy and `momus-haproxy run`, all on loopback."""

    base: Path
    quiet_period: float = 0.03
    haproxy_cpus: str | None = None
    sidecar_args: Sequence[str] = ()
    http_port: int = 0
    nats: EmbeddedNats | None = None
    haproxy: HAProxyProcess | None = None
    sidecar: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    _kv: Any = None
    _log_offset: int = 0
    _results: dict[int, Result] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        """The sidecar's log."""
        return self.base / "sidecar.log"

    @property
    def master(self) -> MasterSocket:
        """A client for HAProxy's master socket."""
        assert self.haproxy is not None
        return self.haproxy.master()

    async def __aenter__(self) -> Stack:
        await self._start_nats()
        await self._start_haproxy()
        self._start_sidecar()
        self.client = await nats.connect(self.nats.url if self.nats else "")
        self._kv = await self._bucket()
        await self._wait_log("watching key", 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.close()
        if self.sidecar is not None and self.sidecar.poll() is None:
            self.sidecar.terminate()
            try:
                await asyncio.to_thread(self.sidecar.wait, 10)
            except subprocess.TimeoutExpired:
                self.sidecar.kill()
                await asyncio.to_thread(self.sidecar.wait)
        if self.haproxy is not None:
            await self.haproxy.aclose()
        if self.nats is not None:
            await self.nats.aclose()

    async def _start_nats(self) -> None:
        data = self.base / "nats"
        data.mkdir(parents=True)
        config = data / "nats.conf"
        # 10,000 routes make a document of about 1.5 MB; NATS's default is 1 MB.
        config.write_text("max_payload: 16MB\n")
        self.nats = EmbeddedNats(
            f"nats://127.0.0.1:{free_port()}", data, config_file=config
        )
        await self.nats.start()

    def _settings(self) -> SidecarSettings:
        self.http_port = self.http_port or free_port()
        return SidecarSettings(
            config_dir=self.base / "conf",
            master_socket=self.base / "run" / "master.sock",
            data_dir=self.base / "data",
            render=RenderSettings(
                http_bind=f"127.0.0.1:{self.http_port}", stats_bind=None
            ),
        )

    async def _start_haproxy(self) -> None:
        settings = self._settings()
        install(initial_files(settings).files, settings.config_dir)
        binary = pinned_haproxy(self.base, self.haproxy_cpus)
        self.haproxy = HAProxyProcess(
            settings.config_dir, self.base / "run", haproxy_bin=binary, stop_timeout=10
        )
        await self.haproxy.start()

    def _start_sidecar(self) -> None:
        assert self.nats is not None
        assert self.haproxy is not None
        settings = self._settings()
        command = [
            str(Path(sys.executable).parent / "momus-haproxy"),
            "run",
            "--nats-url", self.nats.url,
            "--config-dir", str(settings.config_dir),
            "--master-socket", str(self.haproxy.master_socket),
            "--data-dir", str(settings.data_dir),
            "--http-bind", f"127.0.0.1:{self.http_port}",
            "--stats-bind", "",
            "--health-bind", "",
            "--quiet-period", str(self.quiet_period),
            *self.sidecar_args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.sidecar = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
            )

    async def _bucket(self) -> Any:
        assert self.client is not None
        js = self.client.jetstream(timeout=10)
        try:
            return await js.key_value(BUCKET)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(bucket=BUCKET, history=16)

    async def put(self, doc: dict[str, Any] | bytes) -> int:
        """Put a document under the key; return its revision."""
        value = doc if isinstance(doc, bytes) else encode(doc)
        revision: int = await self._kv.put(KEY, value)
        return revision

    async def result(self, revision: int, within: float = 60) -> Result:
        """Wait for the sidecar's log line about `revision`."""
        deadline = time.monotonic() + within
        while revision not in self._results:
            self._read_log()
            if revision in self._results:
                break
            if self.sidecar is not None and self.sidecar.poll() is not None:
                raise RuntimeError(f"the sidecar exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no result for revision {revision}: {self.log_tail()}"
                )
            await asyncio.sleep(0.005)
        return self._results[revision]

    def results(self) -> dict[int, Result]:
        """Every revision the sidecar has logged so far."""
        self._read_log()
        return dict(self._results)

    def _read_log(self) -> None:
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            data = log.read()
        end = data.rfind(b"\n") + 1
        self._log_offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            match = _RESULT.search(line)
            if match is not None:
                self._record(match)

    def _record(self, match: re.Match[str]) -> None:
        revision = int(match["revision"])
        if match["total"]:
            stages = {k: float(match[k]) for k in ("render", "check", "reload")}
            result = Result(revision, "applied", float(match["total"]), stages)
        elif match["rt_total"]:
            stages = {
                "render": float(match["rt_render"]),
                "check": float(match["rt_check"]),
                "runtime": float(match["runtime"]),
            }
            result = Result(revision, "runtime", float(match["rt_total"]), stages)
        elif match["unchanged"]:
            result = Result(revision, "unchanged")
        else:
            result = Result(revision, match["failed"].replace(" ", "_"))
        self._results[revision] = result

    async def _wait_log(self, text: str, within: float) -> None:
        deadline = time.monotonic() + within
        while text not in self.log_path.read_text(errors="replace"):
            if self.sidecar is not None and self.sidecar.poll() is not None:
                raise RuntimeError(f"the sidecar exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the sidecar did not log {text!r}: {self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        """The end of the sidecar's log."""
        return "\n".join(
            self.log_path.read_text(errors="replace").splitlines()[-lines:]
        )

    async def proc(self) -> ProcState:
        """HAProxy's `show proc`."""
        return await self.master.show_proc()

    async def haproxy_rss(self) -> tuple[int, int]:
        """Resident memory in KiB of HAProxy's master and of its current worker."""
        state = await self.proc()
        worker = sum(rss_kib(pid) for pid in state.worker_pids)
        return rss_kib(state.master_pid), worker

    def sidecar_rss(self) -> int:
        """Resident memory in KiB of the sidecar process."""
        return rss_kib(self.sidecar.pid) if self.sidecar else 0

    async def wait_old_workers_gone(self, within: float = 30) -> None:
        """Wait until no old worker is left (HAProxy has no event to wait on)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not (await self.proc()).old_workers:
                return
            await asyncio.sleep(0.1)
