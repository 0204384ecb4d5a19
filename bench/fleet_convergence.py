"""Fleet convergence: time from a put until every edge node serves the new document.

    .venv/bin/python -m bench.fleet_convergence --nodes 1,3,10 --changes 100

Starts a three-server NATS cluster (JetStream, loopback ports) and, for each
fleet size N, N edge nodes: one HAProxy in master-worker mode and one
`momus-haproxy run` process in sidecar mode each, every sidecar given the
three servers (`--nats-url a,b,c`, `--replicas 3`), its own server first.

Each change puts a document that routes a host no earlier revision routed.
Three kinds of change are timed for each fleet size N:

- `nats`, before any edge node starts: put until the last of N plain KV
  watchers (watcher i on server i mod 3) has the revision. NATS alone.
- `map`: the new host goes to an existing cluster (a map entry, which the
  sidecar may apply through HAProxy's runtime API, without a reload).
- `reload`: the new host goes to a new cluster (a new backend: a reload).

For `map` and `reload` the time runs from just before the put until the
last node's HAProxy answers that host from the backend; every node is
probed every `--probe-interval` seconds over a new connection. Changes are
made one at a time, `--pause` seconds after the previous one converged.

Beside the percentiles the table shows the fastest node's median, the p99 of
NATS delivery to the N watchers while the nodes run, and the CPU time each
change cost: of all sidecars and HAProxy processes (checks and reloads
included), of the three nats-servers, and of this process (probes,
watchers, backend). All of it shares one machine's cores.

Prints one table row per kind and fleet size, and with `--out FILE` writes
the table and the command that produced it as Markdown. Everything runs on
loopback and is stopped, by pid, at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue

from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.render import RenderSettings
from momus_haproxy.sidecar import SidecarSettings, initial_files
from tests.support.cluster import NatsCluster
from tests.support.echo import free_port

__all__ = ["FleetResult", "main", "measure", "parse_args", "report"]

BUCKET = "momus"
KEY = "route-config"
SUBJECT = f"$KV.{BUCKET}.{KEY}"
KINDS = ("nats", "map", "reload")
TARGET_RATIO = 1.5
"""The target: p99 at the largest fleet within this factor of p99 at one node."""

BACKGROUND_SITES = 20
"""Hosts every revision routes besides its own, so each render is not trivial."""


def percentile(values: Sequence[float], share: float) -> float:
    """Return the nearest-rank percentile (`share` in 0..1) of `values`."""
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


@dataclass
class FleetResult:
    """The times of one kind of change on one fleet size, in seconds."""

    kind: str
    nodes: int
    times: list[float] = field(default_factory=list)
    """Put until the last node serves the change, one per change."""
    fastest: list[float] = field(default_factory=list)
    """Put until the first node serves it."""
    delivery: list[float] = field(default_factory=list)
    """Put until the last plain KV watcher has the revision."""
    node_cpu: float = 0.0
    """CPU seconds per change of every sidecar and HAProxy (checks included)."""
    nats_cpu: float = 0.0
    """CPU seconds per change of the three nats-servers."""
    bench_cpu: float = 0.0
    """CPU seconds per change of this process: probes, watchers, backend."""

    def row(self, baseline: float | None) -> str:
        """Return this result as a Markdown table row, in milliseconds."""
        p99 = percentile(self.times, 0.99)
        cells = [
            self.kind,
            str(self.nodes),
            str(len(self.times)),
            *(_ms(percentile(self.times, p)) for p in (0.5, 0.9, 0.99)),
            _ms(max(self.times)),
            _ms(percentile(self.fastest, 0.5)),
            _ms(percentile(self.delivery, 0.99)),
            _ms(self.node_cpu),
            _ms(self.nats_cpu),
            _ms(self.bench_cpu),
            f"{p99 / baseline:.2f}x" if baseline else "-",
        ]
        return "| " + " | ".join(cells) + " |"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


TABLE_HEAD = (
    "| change | edge nodes | changes | p50 ms | p90 ms | p99 ms | max ms "
    "| fastest node p50 ms | NATS delivery p99 ms | CPU ms/change: nodes "
    "| NATS | probes | p99 vs 1 node |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def cpu_seconds(pid: int | None) -> float:
    """Return the CPU time of `pid` and of its children it has reaped (Linux)."""
    if pid is None:
        return 0.0
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the command name: utime, stime, cutime, cstime are 12-15.
    fields = text.rpartition(")")[2].split()
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """Return this process's CPU time, threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def document(kind: str, host: str, port: int) -> bytes:
    """Route `host` (to a cluster of its own for `reload`) and the background sites."""
    own = f"web-{host}" if kind == "reload" else "web"
    routes = [{"RouteId": host, "ClusterId": own, "Match": {"Hosts": [host]}}]
    routes += [
        {
            "RouteId": f"site{i}",
            "ClusterId": "web",
            "Match": {"Hosts": [f"site{i}.test"]},
        }
        for i in range(BACKGROUND_SITES)
    ]
    destinations = {"d": {"Address": f"http://127.0.0.1:{port}"}}
    clusters = [
        {"ClusterId": name, "Destinations": destinations} for name in {own, "web"}
    ]
    return json.dumps({"Routes": routes, "Clusters": clusters}).encode()


async def serves(port: int, host: str) -> bool:
    """Say whether HAProxy on `port` answers `host` with 200 from the backend."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        writer.write(request.encode())
        await writer.drain()
        status = await reader.readline()
    except OSError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return status.startswith(b"HTTP/1.1 200")


def _sidecar_binary() -> str:
    """Return the `momus-haproxy` console script of this environment."""
    beside = Path(sys.executable).parent / "momus-haproxy"
    found = str(beside) if beside.exists() else shutil.which("momus-haproxy")
    if found is None:
        raise SystemExit("momus-haproxy is not installed; run ./scripts/bootstrap")
    return found


def _haproxy_binary() -> str:
    """Return the haproxy binary, Debian's when it is not on PATH."""
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(found, os.X_OK):
        raise SystemExit("HAProxy is not installed: apt-get install haproxy")
    return found


class EdgeNode:
    """One HAProxy and the `momus-haproxy run` process that feeds it."""

    def __init__(
        self, base: Path, servers: list[str], haproxy_bin: str, log_level: str
    ) -> None:
        self.base = base
        self.servers = servers
        self.log_level = log_level
        self.port = free_port()
        self.settings = SidecarSettings(
            config_dir=base / "conf",
            master_socket=base / "run" / "master.sock",
            data_dir=base / "data",
            haproxy_bin=haproxy_bin,
            render=RenderSettings(http_bind=f"127.0.0.1:{self.port}", stats_bind=None),
        )
        self.haproxy = HAProxyProcess(
            self.settings.config_dir, base / "run", haproxy_bin=haproxy_bin
        )
        self.log_path = base / "sidecar.log"
        self._sidecar: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        """Return the sidecar's command line: sidecar mode, three servers."""
        settings = self.settings
        return [
            _sidecar_binary(),
            "run",
            "--nats-url", ",".join(self.servers),
            "--replicas", "3",
            "--config-dir", str(settings.config_dir),
            "--master-socket", str(settings.master_socket),
            "--data-dir", str(settings.data_dir),
            "--http-bind", settings.render.http_bind,
            "--stats-bind", "",
            "--health-bind", "",
            "--haproxy-bin", settings.haproxy_bin,
            "--log-level", self.log_level,
        ]  # fmt: skip

    async def start(self) -> None:
        """Start HAProxy on the initial files, then the sidecar next to it."""
        install(initial_files(self.settings).files, self.settings.config_dir)
        await self.haproxy.start()
        # Set through the environment: a flag this version lacks is not an error.
        environment = {**os.environ, "MOMUS_INSTANCE_ID": self.base.name}
        with self.log_path.open("ab") as log:
            self._sidecar = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=environment,
            )

    def check_alive(self) -> None:
        """Raise with the end of the sidecar's log if it has exited."""
        process = self._sidecar
        if process is not None and process.returncode is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-10:]
            lines = "\n".join(tail)
            raise RuntimeError(
                f"{self.base.name}: sidecar exited with {process.returncode}:\n{lines}"
            )

    async def wait_served(self, host: str, interval: float, within: float) -> float:
        """Probe until this node serves `host`; return when (monotonic clock)."""
        deadline = time.monotonic() + within
        while not await serves(self.port, host):
            self.check_alive()
            if time.monotonic() > deadline:
                message = f"{self.base.name} did not serve {host!r} in {within:g} s"
                raise TimeoutError(message)
            await asyncio.sleep(interval)
        return time.monotonic()

    def cpu_seconds(self) -> float:
        """Return the CPU time of the sidecar and of HAProxy so far."""
        sidecar = self._sidecar.pid if self._sidecar else None
        haproxy = self.haproxy.pid if self.haproxy.returncode is None else None
        return cpu_seconds(sidecar) + cpu_seconds(haproxy)

    async def aclose(self) -> None:
        """Stop the sidecar (SIGTERM, by pid), then HAProxy."""
        process, self._sidecar = self._sidecar, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await process.wait()
        await self.haproxy.aclose()


class Watchers:
    """Plain KV watchers, one per node on that node's server: NATS delivery alone."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.subscriptions: list[Any] = []
        self.seen: dict[int, list[float]] = {}

    async def start(self, urls: Sequence[str]) -> None:
        """Connect one client per URL and follow the key with new revisions only."""
        for url in urls:
            client = await nats.connect(url, max_reconnect_attempts=5)
            self.clients.append(client)
            subscription = await client.jetstream().subscribe(
                SUBJECT,
                cb=self._deliver,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.NEW,
            )
            self.subscriptions.append(subscription)

    async def _deliver(self, msg: Msg) -> None:
        revision = msg.metadata.sequence.stream
        self.seen.setdefault(revision, []).append(time.monotonic())

    async def delivered(self, revision: int, within: float) -> list[float]:
        """Return when each watcher had `revision` (monotonic clock)."""
        deadline = time.monotonic() + within
        while len(self.seen.get(revision, [])) < len(self.clients):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"revision {revision} not delivered to every watcher"
                )
            await asyncio.sleep(0.005)
        return self.seen.pop(revision)

    async def aclose(self) -> None:
        """End every subscription (and its heartbeat check), then every client."""
        for subscription in self.subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        for client in self.clients:
            await client.close()


@contextlib.asynccontextmanager
async def running_watchers(cluster: NatsCluster, count: int) -> AsyncIterator[Watchers]:
    """Follow the key with `count` plain watchers, watcher i on server i mod 3."""
    size = len(cluster.servers)
    watchers = Watchers()
    try:
        await watchers.start([cluster.urls[i % size] for i in range(count)])
        yield watchers
    finally:
        await watchers.aclose()


@contextlib.asynccontextmanager
async def running_fleet(
    base: Path, cluster: NatsCluster, count: int, args: Any
) -> AsyncIterator[list[EdgeNode]]:
    """Start `count` edge nodes, node i listing server i mod 3 first."""
    size = len(cluster.servers)
    haproxy_bin = _haproxy_binary()
    nodes = [
        EdgeNode(
            base / f"edge-{i}",
            cluster.servers_from(i % size),
            haproxy_bin,
            args.sidecar_log_level,
        )
        for i in range(count)
    ]
    try:
        for node in nodes:
            await node.start()
        yield nodes
    finally:
        for node in nodes:
            await node.aclose()


async def change(
    result: FleetResult,
    nodes: Sequence[EdgeNode],
    watchers: Watchers,
    kv: KeyValue,
    host: str,
    args: Any,
) -> None:
    """Put the document for `host` and record how long the fleet took to serve it.

    Without nodes, the time is the watchers' alone: NATS delivery.
    """
    within = args.timeout
    started = time.monotonic()
    revision = await kv.put(KEY, document(result.kind, host, args.backend_port))
    probes = [node.wait_served(host, args.probe_interval, within) for node in nodes]
    served, delivered = await asyncio.gather(
        asyncio.gather(*probes), watchers.delivered(revision, within)
    )
    served = served or list(delivered)
    result.times.append(max(served) - started)
    result.fastest.append(min(served) - started)
    result.delivery.append(max(delivered) - started)


async def measure_fleet(
    base: Path, cluster: NatsCluster, kv: KeyValue, count: int, args: Any
) -> list[FleetResult]:
    """Run one fleet size: NATS alone, then the edge nodes for each kind of change."""
    results = []
    async with running_watchers(cluster, count) as watchers:
        if "nats" in args.kinds:
            results.append(await measure_kind("nats", [], watchers, kv, cluster, args))
        kinds = [kind for kind in args.kinds if kind != "nats"]
        if not kinds:
            return results
        async with running_fleet(
            base / f"fleet-{count}", cluster, count, args
        ) as nodes:
            warmup = FleetResult("warmup", count)
            await change(warmup, nodes, watchers, kv, f"warmup-{count}.test", args)
            for kind in kinds:
                result = await measure_kind(kind, nodes, watchers, kv, cluster, args)
                results.append(result)
    return results


async def measure_kind(
    kind: str,
    nodes: Sequence[EdgeNode],
    watchers: Watchers,
    kv: KeyValue,
    cluster: NatsCluster,
    args: Any,
) -> FleetResult:
    """Time `args.changes` changes of one kind, and the CPU they cost."""
    count = len(watchers.clients)
    result = FleetResult(kind, count)
    before = _cpu(nodes, cluster)
    for number in range(args.changes):
        host = f"{kind}-n{count}-c{number}.test"
        await change(result, nodes, watchers, kv, host, args)
        await asyncio.sleep(args.pause)
    spent = _cpu(nodes, cluster) - before
    result.node_cpu, result.nats_cpu, result.bench_cpu = spent / args.changes
    return result


@dataclass(frozen=True)
class _Cpu:
    """CPU seconds of the nodes, of the NATS servers and of this process."""

    nodes: float
    nats: float
    bench: float

    def __sub__(self, other: _Cpu) -> _Cpu:
        return _Cpu(
            self.nodes - other.nodes, self.nats - other.nats, self.bench - other.bench
        )

    def __truediv__(self, count: int) -> tuple[float, float, float]:
        return self.nodes / count, self.nats / count, self.bench / count


def _cpu(nodes: Sequence[EdgeNode], cluster: NatsCluster) -> _Cpu:
    """Return the CPU seconds so far of the nodes, the NATS servers and us."""
    node = sum(each.cpu_seconds() for each in nodes)
    nats_servers = sum(cpu_seconds(server.pid) for server in cluster.servers)
    return _Cpu(node, nats_servers, own_cpu_seconds())


async def measure(args: Any) -> list[FleetResult]:
    """Start the cluster and a backend, and measure each fleet size in turn."""
    results: list[FleetResult] = []
    async with running_backend() as port, _running_cluster(args) as (base, cluster):
        args.backend_port = port
        client = await nats.connect(cluster.urls, max_reconnect_attempts=5)
        try:
            kv = await _bucket(client)
            for count in args.nodes:
                done = await measure_fleet(base, cluster, kv, count, args)
                for result in done:
                    _progress(result, results)
                    results.append(result)
        finally:
            await client.close()
    return results


@contextlib.asynccontextmanager
async def running_backend() -> AsyncIterator[int]:
    """Serve 200 to every request on a loopback port, and yield the port.

    Its listen backlog is large: ten HAProxy instances forward their probes at
    the same moment, and a dropped SYN would cost a one-second retransmit.
    """
    server = await asyncio.start_server(_answer, "127.0.0.1", 0, backlog=1024)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one request head and answer it, closing the connection."""
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def _running_cluster(args: Any) -> AsyncIterator[tuple[Path, NatsCluster]]:
    """Start the three-server cluster in the work directory; stop it at the end."""
    with _work_dir(args.work_dir) as base:
        cluster = NatsCluster.create(base / "cluster")
        try:
            await cluster.start()
            yield base, cluster
        finally:
            await cluster.aclose()


@contextlib.contextmanager
def _work_dir(given: Path | None) -> Any:
    """Yield `given` (kept afterwards), or a scratch directory removed at the end."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.absolute()
        return
    with tempfile.TemporaryDirectory(prefix="momus-fleet-") as scratch:
        yield Path(scratch)


async def _bucket(client: Client) -> KeyValue:
    """Create the bucket with three replicas, as `--replicas 3` would."""
    js = client.jetstream(timeout=5.0)
    kv: KeyValue = await js.create_key_value(bucket=BUCKET, history=16, replicas=3)
    return kv


def _baseline(result: FleetResult, results: Sequence[FleetResult]) -> float | None:
    """Return the p99 of the same kind on one node, unless `result` is that one."""
    for other in results:
        if other.kind == result.kind and other.nodes == 1 and other is not result:
            return percentile(other.times, 0.99)
    return None


def _progress(result: FleetResult, earlier: Sequence[FleetResult]) -> None:
    """Print one row as soon as it is measured."""
    print(result.row(_baseline(result, earlier)), file=sys.stderr, flush=True)


def report(
    results: Sequence[FleetResult],
    command: str,
    load: tuple[float, float] | None = None,
) -> str:
    """Return the Markdown report: how it was measured, the table, the verdicts.

    `load` is the machine's one-minute load average before the run (other work
    that shares the cores with the fleet) and after it (the run's own too).
    """
    ordered = sorted(results, key=lambda r: (KINDS.index(r.kind), r.nodes))
    lines = [
        "# Fleet convergence",
        "",
        "Time from a put until every edge node's HAProxy serves the new",
        "document (a host only that revision routes answers 200 from the",
        "backend). One HAProxy and one `momus-haproxy run` per node, on a",
        "three-server NATS cluster with the bucket replicated three times,",
        "all on one machine. `map` changes route the new host to an existing",
        "cluster; `reload` changes route it to a new cluster, which needs a",
        "reload; `nats` is NATS delivery alone, to N plain KV watchers before",
        "any edge node runs.",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}{_load(load)}.",
        "",
        TABLE_HEAD,
        *(result.row(_baseline(result, results)) for result in ordered),
        "",
    ]
    largest = max(result.nodes for result in results)
    for result in ordered:
        baseline = _baseline(result, results)
        if baseline is not None and result.nodes == largest:
            lines.append(_verdict(result, baseline))
    return "\n".join([*lines, ""])


def _load(load: tuple[float, float] | None) -> str:
    """Name the load average before and after the run, when known."""
    if load is None:
        return ""
    return f"; load average {load[0]:.1f} before the run, {load[1]:.1f} after"


def _verdict(result: FleetResult, baseline: float) -> str:
    """Say whether the target is met, and what the machine's cores allow."""
    p99 = percentile(result.times, 0.99)
    if result.kind == "nats":
        return (
            f"- `nats`: NATS alone delivered a change to {result.nodes} watchers "
            f"in {_ms(p99)} ms at p99 ({_ms(baseline)} ms to one)."
        )
    ratio = p99 / baseline
    verdict = "met" if ratio <= TARGET_RATIO else "not met"
    text = (
        f"- `{result.kind}`: p99 at {result.nodes} nodes within "
        f"{TARGET_RATIO}x of one node: {verdict} ({ratio:.2f}x)."
    )
    if not result.node_cpu:
        return text
    cores = os.cpu_count() or 1
    return text + (
        f" Each change cost the nodes {_ms(result.node_cpu)} ms of CPU "
        f"({_ms(result.node_cpu / result.nodes)} ms per node), so on {cores} "
        f"shared cores the last node cannot be done before about "
        f"{_ms(result.node_cpu / cores)} ms even with perfect sharing."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description="Time a put until every edge node of a fleet serves it."
    )
    parser.add_argument(
        "--nodes",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 3, 10],
        help="fleet sizes, comma-separated (default 1,3,10)",
    )
    parser.add_argument(
        "--kinds",
        type=lambda text: [kind for kind in text.split(",") if kind in KINDS],
        default=list(KINDS),
        help="kinds of change, comma-separated (default nats,map,reload)",
    )
    parser.add_argument("--changes", type=int, default=100, help="per kind and size")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between")
    parser.add_argument("--probe-interval", type=float, default=0.01)
    parser.add_argument("--timeout", type=float, default=60.0, help="per change")
    parser.add_argument("--sidecar-log-level", default="warning")
    parser.add_argument("--work-dir", type=Path, help="keep files and logs here")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, stream: IO[str] = sys.stdout) -> None:
    """Run the benchmark and print (or write) its report."""
    args = parse_args(argv)
    before = os.getloadavg()[0]
    results = asyncio.run(measure(args))
    shown = " ".join(sys.argv[1:] if argv is None else argv)
    command = f".venv/bin/python -m bench.fleet_convergence {shown}".rstrip()
    text = report(results, command, (before, os.getloadavg()[0]))
    if args.out is not None:
        args.out.write_text(text)
    stream.write(text)


if __name__ == "__main__":
    main()
