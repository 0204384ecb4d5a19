"""A three-server NATS cluster and a fleet of edge nodes that follow it.

`NatsCluster` runs nats-server processes with JetStream and cluster routes
between them, each with its own `server_name`, store directory, client port
and route port, all on loopback. Any one of them can be stopped and started
again on the same ports and store, as a failed machine would come back::

    cluster = NatsCluster.create(tmp_path / "cluster")
    await cluster.start()
    leader = await cluster.leader("KV_momus")   # index of the stream's leader
    await cluster.stop(leader)

An edge node is one HAProxy plus one sidecar (a `SidecarStack`) whose server
list starts with its own server and goes on with the others, so a fleet
spreads over the cluster and each node has somewhere to fail over to.

Each node of `edge_fleet` also writes its status record (instance id
`edge-N`), as `momus-haproxy run` does, so that `fleet_status()` can read the
fleet through `momus-haproxy status`.

Fixtures: `nats_cluster`, a started three-server cluster; `edge_fleet`, a
factory, `await edge_fleet(3)`, that starts that many edge nodes on it and
returns once the bucket exists and every node is connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from click.testing import CliRunner
from nats.aio.client import Client
from nats.js import api

from momus_haproxy.cli import main
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.render import RenderSettings
from momus_haproxy.sidecar import ApplyResult, SidecarSettings, initial_files
from momus_haproxy.status import Heartbeat, StatusSettings, Tracker
from momus_haproxy.watch import NatsOptions
from tests.support.echo import free_port
from tests.support.haproxy import HAProxyRunner
from tests.support.sidecar import SidecarStack

__all__ = [
    "FLEET_NATS",
    "EdgeFleet",
    "NatsCluster",
    "connected_url",
    "edge_fleet",
    "fleet_status",
    "nats_cluster",
    "put_through",
    "report_status",
    "start_edge_node",
    "stream_info",
    "wait_connected",
]

CLUSTER_NAME = "momus-test"
STREAM = "KV_momus"

FLEET_NATS: dict[str, Any] = {"replicas": 3, "randomize": False}
"""NatsOptions for fleet nodes: a replicated bucket, the node's server tried first.

Everything else is the product's default, so the failover the tests see is
the one an operator gets.
"""

STATUS_INTERVAL = 0.5
"""Seconds between status records; three missed ones make a node `lost`."""

EdgeFleet = Callable[..., Awaitable[list[SidecarStack]]]


def _config(name: str, route_port: int, route_ports: list[int]) -> str:
    """Return the configuration file of one cluster member."""
    routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in route_ports)
    return (
        f"server_name: {name}\n"
        "cluster {\n"
        f"  name: {CLUSTER_NAME}\n"
        f"  listen: 127.0.0.1:{route_port}\n"
        f"  routes: [{routes}]\n"
        "}\n"
    )


class NatsCluster:
    """Several nats-servers with JetStream, routed to each other on loopback."""

    def __init__(self, servers: list[EmbeddedNats], names: list[str]) -> None:
        self.servers = servers
        self.names = names

    @classmethod
    def create(cls, base: Path, size: int = 3) -> NatsCluster:
        """Write the configuration of `size` members under `base`; start none."""
        route_ports = [free_port() for _ in range(size)]
        servers, names = [], []
        for index, route_port in enumerate(route_ports):
            name = f"n{index}"
            data_dir = base / name
            data_dir.mkdir(parents=True, exist_ok=True)
            config = data_dir / "nats.conf"
            config.write_text(_config(name, route_port, route_ports))
            url = f"nats://127.0.0.1:{free_port()}"
            servers.append(EmbeddedNats(url, data_dir, config_file=config))
            names.append(name)
        return cls(servers, names)

    @property
    def urls(self) -> list[str]:
        """The client URL of every member, in order."""
        return [server.url for server in self.servers]

    def servers_from(self, index: int) -> list[str]:
        """Return the client URLs starting with member `index`'s, then the rest."""
        urls = self.urls
        return urls[index:] + urls[:index]

    def running(self) -> list[int]:
        """Return the indexes of the members that run now."""
        return [i for i, server in enumerate(self.servers) if server.running]

    async def start(self, within: float = 30.0) -> None:
        """Start every member, then wait until JetStream answers on each."""
        await asyncio.gather(*(server.start() for server in self.servers))
        await self.wait_jetstream(within)

    async def stop(self, index: int) -> None:
        """Stop member `index` (SIGTERM); its store stays for a restart."""
        await self.servers[index].stop()

    async def restart(self, index: int, within: float = 30.0) -> None:
        """Start member `index` again, on its ports and store."""
        await self.servers[index].start()
        await self.wait_jetstream(within)

    async def aclose(self) -> None:
        """Stop every member that still runs."""
        for server in self.servers:
            await server.aclose()

    async def wait_jetstream(self, within: float = 30.0) -> None:
        """Wait until every running member answers JetStream API requests."""
        deadline = time.monotonic() + within
        for index in self.running():
            async with _client(self.urls[index]) as client:
                js = client.jetstream(timeout=1.0)
                while True:
                    try:
                        await js.account_info()
                        break
                    except (nats.errors.Error, TimeoutError):
                        if time.monotonic() > deadline:
                            raise
                    await asyncio.sleep(0.1)

    async def leader(self, stream: str = STREAM, within: float = 30.0) -> int:
        """Return the index of the member that leads `stream`, once it has one."""
        deadline = time.monotonic() + within
        while True:
            info = await self._stream_info(stream)
            cluster = info.cluster if info else None
            if cluster is not None and cluster.leader in self.names:
                index = self.names.index(cluster.leader)
                if self.servers[index].running:
                    return index
            assert time.monotonic() < deadline, f"{stream} has no leader: {info}"
            await asyncio.sleep(0.1)

    async def wait_rejoined(
        self, index: int, stream: str = STREAM, within: float = 30.0
    ) -> None:
        """Wait until member `index` is a current replica of `stream` again."""
        name = self.names[index]
        deadline = time.monotonic() + within
        while True:
            info = await self._stream_info(stream)
            if info is not None and _is_current(info, name):
                return
            assert time.monotonic() < deadline, f"{name} did not rejoin: {info}"
            await asyncio.sleep(0.1)

    async def _stream_info(self, stream: str) -> api.StreamInfo | None:
        """Ask any running member for the stream's info; None when none answers."""
        for index in self.running():
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                return await stream_info(self.urls[index], stream)
        return None


def _is_current(info: api.StreamInfo, name: str) -> bool:
    """Say whether `name` leads the stream or follows it with nothing missing."""
    cluster = info.cluster
    if cluster is None:
        return False
    if cluster.leader == name:
        return True
    for peer in cluster.replicas or []:
        if peer.name == name:
            return bool(peer.current) and not peer.offline and not peer.lag
    return False


@contextlib.asynccontextmanager
async def _client(url: str) -> AsyncIterator[Client]:
    """Connect a short-lived client to one server, without reconnecting."""
    client = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        yield client
    finally:
        await client.close()


async def stream_info(url: str, stream: str = STREAM) -> api.StreamInfo:
    """Return a stream's info as seen through the server at `url`."""
    async with _client(url) as client:
        info: api.StreamInfo = await client.jetstream(timeout=2.0).stream_info(stream)
    return info


async def put_through(
    url: str, value: bytes, *, key: str = "route-config", within: float = 30.0
) -> tuple[int, float]:
    """Put `value` through the server at `url`, retrying while JetStream cannot.

    Returns the revision and the seconds it took, retries included: a put
    made while the stream elects a new leader fails until one is elected.
    """
    started = time.monotonic()
    while True:
        try:
            async with _client(url) as client:
                kv = await client.jetstream(timeout=2.0).key_value("momus")
                revision = await kv.put(key, value)
            return revision, time.monotonic() - started
        except (nats.errors.Error, OSError, TimeoutError):
            if time.monotonic() - started > within:
                raise
        await asyncio.sleep(0.1)


def connected_url(node: SidecarStack) -> str | None:
    """Return the URL of the server the node's store is connected to now."""
    store = node.sidecar.source if node.sidecar else None
    # `Store` keeps its client to itself; the client knows where it is.
    client = getattr(store, "_client", None)
    url = client.connected_url if client is not None else None
    return None if url is None else f"nats://{url.hostname}:{url.port}"


async def wait_connected(node: SidecarStack, within: float = 30.0) -> str:
    """Wait until the node's store is connected, and return to which server."""
    deadline = time.monotonic() + within
    while (url := connected_url(node)) is None:
        assert time.monotonic() < deadline, "the node did not connect to NATS"
        await asyncio.sleep(0.05)
    return url


async def start_edge_node(
    base: Path,
    servers: list[str],
    start_haproxy: Callable[[Path], Awaitable[HAProxyProcess]],
    **nats_options: Any,
) -> SidecarStack:
    """Start HAProxy on the initial files, then a sidecar following `servers`."""
    port = free_port()
    settings = SidecarSettings(
        config_dir=base / "conf",
        master_socket=base / "unused.sock",
        data_dir=base / "data",
        render=RenderSettings(http_bind=f"127.0.0.1:{port}", stats_bind=None),
        retry_delay=0.5,
    )
    install(initial_files(settings).files, settings.config_dir)
    haproxy = await start_haproxy(settings.config_dir)
    settings = replace(settings, master_socket=haproxy.master_socket)
    nats_settings = NatsOptions(servers=servers, **{**FLEET_NATS, **nats_options})
    stack = SidecarStack(settings, nats_settings, haproxy, port)
    await stack.start_sidecar()
    return stack


def report_status(node: SidecarStack, instance_id: str) -> Heartbeat:
    """Have `node` write its status record after each result, as `run` does.

    Enter the returned heartbeat (`async with`) to start writing.
    """
    sidecar = node.sidecar
    assert sidecar is not None, "start the sidecar first"
    tracker = Tracker(sidecar)
    settings = StatusSettings(
        instance_id=instance_id, interval=STATUS_INTERVAL, ttl=60.0
    )
    heartbeat = Heartbeat(settings, node.nats, tracker)
    collect = sidecar.on_result

    def on_result(result: ApplyResult) -> None:
        if collect is not None:
            collect(result)
        tracker.on_result(result)
        heartbeat.wake()

    sidecar.on_result = on_result
    return heartbeat


async def fleet_status(urls: list[str]) -> dict[str, Any] | None:
    """Return what `momus-haproxy status --json` says, or None if it failed."""
    args = ["status", f"--nats-url={','.join(urls)}", "--json"]
    # In a thread: the command runs its own event loop.
    result = await asyncio.to_thread(CliRunner().invoke, main, args)
    if result.exit_code not in (0, 1):
        return None
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def wait_for_bucket(url: str, within: float = 30.0) -> api.StreamInfo:
    """Wait until the bucket's stream exists (a node created it) and return it."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await stream_info(url)
        except (nats.errors.Error, TimeoutError):
            assert time.monotonic() < deadline, "no node created the bucket"
        await asyncio.sleep(0.05)


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """Start a three-server NATS cluster with JetStream on loopback ports."""
    cluster = NatsCluster.create(tmp_path / "cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.aclose()


@pytest.fixture
async def edge_fleet(
    tmp_path: Path, nats_cluster: NatsCluster, haproxy_runner: HAProxyRunner
) -> AsyncIterator[EdgeFleet]:
    """Return a factory that starts edge nodes, node i listing server i first."""
    nodes: list[SidecarStack] = []
    heartbeats = contextlib.AsyncExitStack()

    async def start(count: int, **nats_options: Any) -> list[SidecarStack]:
        size = len(nats_cluster.servers)
        started = []
        for _ in range(count):
            index = len(nodes)
            servers = nats_cluster.servers_from(index % size)
            base = tmp_path / f"edge-{index}"
            node = await start_edge_node(base, servers, haproxy_runner, **nats_options)
            await heartbeats.enter_async_context(report_status(node, f"edge-{index}"))
            nodes.append(node)
            started.append(node)
        await wait_for_bucket(nats_cluster.urls[0])
        for node in started:
            await wait_connected(node)
        return started

    async with heartbeats:
        yield start

        for node in nodes:
            await node.stop_sidecar()
