"""A fleet of edge nodes on a three-server NATS cluster: convergence and failover.

Each step puts a document that routes one new host, then waits until every
node has applied that revision and serves that host, and until
`momus-haproxy status` shows the whole fleet on it. At the end every node
must have seen the revisions in increasing order and serve the last one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from tests.support.cluster import (
    EdgeFleet,
    NatsCluster,
    connected_url,
    fleet_status,
    put_through,
    stream_info,
)
from tests.support.echo import EchoBackend, EchoBackends
from tests.support.sidecar import SidecarStack

log = logging.getLogger(__name__)

CONVERGE_WITHIN = 20.0
"""Seconds a step may take to reach every node (failovers included, on a busy box)."""

FLEET_SIZE = 3
SERVED = frozenset({"applied", "unchanged", "runtime"})
"""Outcomes after which a node serves the revision it was given."""


def _document(host: str, port: int) -> bytes:
    """Route `host`, and only it, to the echo backend on `port`."""
    return json.dumps(
        {
            "Routes": [
                {"RouteId": host, "ClusterId": "web", "Match": {"Hosts": [host]}}
            ],
            "Clusters": [
                {
                    "ClusterId": "web",
                    "Destinations": {"d": {"Address": f"http://127.0.0.1:{port}"}},
                }
            ],
        }
    ).encode()


class Fleet:
    """The nodes under test, the puts made so far, and the backend they route to."""

    def __init__(
        self, cluster: NatsCluster, nodes: list[SidecarStack], backend: EchoBackend
    ) -> None:
        self.cluster = cluster
        self.nodes = nodes
        self.backend = backend
        self.puts: list[int] = []

    async def step(self, through: int, name: str) -> float:
        """Put a document routing `name` through server `through`; converge."""
        host = f"{name}.fleet.test"
        url = self.cluster.urls[through]
        revision, took = await put_through(url, _document(host, self.backend.port))
        self.puts.append(revision)
        converged = await self.converge(revision, host)
        log.info("%s: put %.2f s, converged %.2f s", name, took, converged)
        return took

    async def converge(self, revision: int, host: str) -> float:
        """Wait until every node applied `revision` and serves `host`."""
        started = time.monotonic()
        for node in self.nodes:
            result = await node.wait_for(
                lambda r: r.revision >= revision, CONVERGE_WITHIN
            )
            assert result.revision == revision, result
            assert result.outcome in SERVED, result
            await self._served(node, host)
        await self._status_converged(revision)
        return time.monotonic() - started

    async def _served(self, node: SidecarStack, host: str) -> None:
        """Wait until `node`'s HAProxy sends `host` to the backend."""
        deadline = time.monotonic() + CONVERGE_WITHIN
        while True:
            answer = await node.get(host)
            body = answer.json if isinstance(answer.json, dict) else {}
            if answer.status == 200 and body.get("backend") == self.backend.name:
                return
            assert time.monotonic() < deadline, f"{host}: {answer.status}"
            await asyncio.sleep(0.05)

    async def _status_converged(self, revision: int) -> None:
        """Wait until `status` shows every node live and serving `revision`."""
        names = {f"edge-{index}" for index in range(len(self.nodes))}
        deadline = time.monotonic() + CONVERGE_WITHIN
        while True:
            urls = [self.cluster.urls[i] for i in self.cluster.running()]
            report = await fleet_status(urls)
            if report is not None and _fleet_on(report, names, revision):
                return
            assert time.monotonic() < deadline, f"status: {report}"
            await asyncio.sleep(0.2)

    def assert_in_order(self) -> None:
        """Every node saw increasing revisions, and the last put is the last result."""
        for number, node in enumerate(self.nodes):
            revisions = [result.revision for result in node.results]
            assert revisions == sorted(set(revisions)), (number, revisions)
            assert revisions[-1] == self.puts[-1], (number, revisions, self.puts)
            assert node.sidecar is not None
            assert node.sidecar.applied_revision == self.puts[-1]


def _fleet_on(report: dict[str, Any], names: set[str], revision: int) -> bool:
    """Say whether a `status --json` report has all `names` live on `revision`."""
    live = {
        instance["instance"]: instance["applied_revision"]
        for instance in report["instances"]
        if instance["condition"] == "live"
    }
    converged = report["converged"] and report["latest_revision"] == revision
    return converged and live == dict.fromkeys(names, revision)


async def _fleet(
    cluster: NatsCluster, edge_fleet: EdgeFleet, echo_backends: EchoBackends
) -> Fleet:
    """Start the fleet, one node per server, and check where each one connected."""
    nodes = await edge_fleet(FLEET_SIZE)
    for index, node in enumerate(nodes):
        assert connected_url(node) == cluster.urls[index]
    return Fleet(cluster, nodes, echo_backends.start("web"))


async def test_a_put_through_any_server_reaches_every_node(
    nats_cluster: NatsCluster, edge_fleet: EdgeFleet, echo_backends: EchoBackends
) -> None:
    """A put through each server in turn is served by every node of the fleet."""
    fleet = await _fleet(nats_cluster, edge_fleet, echo_backends)

    info = await stream_info(nats_cluster.urls[0])
    assert info.config.num_replicas == 3
    for index in range(len(nats_cluster.servers)):
        await fleet.step(index, f"through-{index}")

    fleet.assert_in_order()


async def test_a_node_fails_over_when_its_server_stops(
    nats_cluster: NatsCluster, edge_fleet: EdgeFleet, echo_backends: EchoBackends
) -> None:
    """A node whose server stops moves to another one, and misses nothing."""
    fleet = await _fleet(nats_cluster, edge_fleet, echo_backends)
    await fleet.step(0, "before")
    # Stop a server that does not lead the stream: this is the node's loss only.
    victim = (await nats_cluster.leader() + 1) % FLEET_SIZE

    await nats_cluster.stop(victim)
    await fleet.step((victim + 1) % FLEET_SIZE, "server-down")
    assert connected_url(fleet.nodes[victim]) != nats_cluster.urls[victim]
    await fleet.step((victim + 2) % FLEET_SIZE, "still-down")

    await nats_cluster.restart(victim)
    await nats_cluster.wait_rejoined(victim)
    await fleet.step(victim, "rejoined")
    fleet.assert_in_order()


async def test_losing_the_stream_leader_keeps_the_fleet_applying(
    nats_cluster: NatsCluster, edge_fleet: EdgeFleet, echo_backends: EchoBackends
) -> None:
    """Puts succeed after a new leader is elected, and every node keeps applying."""
    fleet = await _fleet(nats_cluster, edge_fleet, echo_backends)
    await fleet.step(0, "before")
    leader = await nats_cluster.leader()

    await nats_cluster.stop(leader)
    took = await fleet.step((leader + 1) % FLEET_SIZE, "leader-down")
    elected = await nats_cluster.leader()
    assert elected != leader
    log.info("first put after the leader stopped took %.2f s", took)
    await fleet.step((leader + 2) % FLEET_SIZE, "new-leader")

    await nats_cluster.restart(leader)
    await nats_cluster.wait_rejoined(leader)
    await fleet.step(leader, "old-leader-back")
    fleet.assert_in_order()
