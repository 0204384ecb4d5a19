"""Changes applied through HAProxy's runtime API, without a reload."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from momus_haproxy.document import parse_document
from momus_haproxy.install import read_installed
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.render import Rendered, RenderSettings, render
from momus_haproxy.runtime import (
    LoadedMap,
    loaded_maps,
    runtime_changes,
    server_args,
)
from tests.support.echo import EchoBackends, Response
from tests.support.nats import OperatorFactory
from tests.support.sidecar import SidecarStack, SidecarStackFactory

SETTINGS = RenderSettings(stats_bind=None, server_state_file="/run/state")


def _route(name: str, cluster: str, *hosts: str, path: str = "") -> dict[str, Any]:
    match: dict[str, Any] = {"Hosts": list(hosts)}
    if path:
        match["Path"] = path
    return {"RouteId": name, "ClusterId": cluster, "Match": match}


def _cluster(name: str, *ports: int, **extra: Any) -> dict[str, Any]:
    destinations = {
        f"d{port}": {"Address": f"http://127.0.0.1:{port}"} for port in ports
    }
    return {
        "ClusterId": name,
        "LoadBalancingPolicy": "RoundRobin",
        "Destinations": destinations,
        **extra,
    }


def _document(routes: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> bytes:
    return json.dumps({"Routes": routes, "Clusters": clusters}).encode()


def _render(routes: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> Rendered:
    return render(parse_document(_document(routes, clusters)), SETTINGS)


def _sites(a: tuple[int, ...], b: tuple[int, ...], **moves: str) -> Rendered:
    """Two sites, a.test on cluster a and b.test on cluster b; `moves` re-home hosts."""
    hosts = {"a": ["a.test"], "b": ["b.test", "c.test"]}
    for host, cluster in moves.items():
        for listed in hosts.values():
            if f"{host}.test" in listed:
                listed.remove(f"{host}.test")
        hosts[cluster].append(f"{host}.test")
    routes = [_route(name, name, *names) for name, names in hosts.items()]
    return _render(routes, [_cluster("a", *a), _cluster("b", *b)])


class TestRuntimeChanges:
    def test_identical_renders_need_no_command(self) -> None:
        """Two equal renders differ in nothing: an empty list, not None."""
        assert runtime_changes(_sites((1,), (2,)), _sites((1,), (2,))) == []

    def test_added_and_removed_destinations_become_server_commands(self) -> None:
        """New servers are added and enabled; gone ones are disabled, then deleted."""
        commands = runtime_changes(_sites((1,), (2,)), _sites((3,), (2,)))
        assert commands is not None
        backend = commands[0].split()[2].split("/")[0]
        assert commands == [
            f"add server {backend}/127.0.0.1:3 127.0.0.1:3",
            f"enable server {backend}/127.0.0.1:3",
            f"disable server {backend}/127.0.0.1:1",
            f"del server {backend}/127.0.0.1:1",
        ]

    def test_moved_host_is_one_map_entry(self) -> None:
        """A host moved to another route's cluster changes one entry of the host map."""
        live = _sites((1,), (2,))
        commands = runtime_changes(live, _sites((1,), (2,), c="a"))
        assert commands is not None
        hosts = next(name for name in live.files if name.startswith("maps/hosts-"))
        assert len(commands) == 1
        assert commands[0].startswith(f"set map {hosts} c.test s")

    def test_new_route_on_existing_cluster_fills_maps_backends_first(self) -> None:
        """A route's map entries are added before the host that leads to them."""
        live = _sites((1,), (2,))
        routes = [_route("a", "a", "a.test"), _route("b", "b", "b.test", "c.test")]
        routes.append(_route("x", "a", "x.test", path="/api/{**rest}"))
        commands = runtime_changes(
            live, _render(routes, [_cluster("a", 1), _cluster("b", 2)])
        )
        assert commands is not None
        kinds = [command.split()[2].split("-")[0] for command in commands]
        assert kinds == ["maps/backends", "maps/paths", "maps/prefixes", "maps/hosts"]

    def test_changes_beyond_maps_and_servers_need_a_reload(self) -> None:
        """New clusters, checks, cookies and DNS names are left to a reload."""
        live = _sites((1,), (2,))
        routes = [_route("a", "a", "a.test"), _route("b", "b", "b.test", "c.test")]
        checked = {"Active": {"Enabled": True}}
        named = {"ClusterId": "b", "Destinations": {"x": {"Address": "http://web:80"}}}
        refused = [
            [_cluster("a", 1), _cluster("b", 2), _cluster("c", 4)],
            [_cluster("a", 1, 3, HealthCheck=checked), _cluster("b", 2)],
            [_cluster("a", 1, 3, SessionAffinity={"Enabled": True}), _cluster("b", 2)],
            [_cluster("a", 1), named],
        ]
        for clusters in refused:
            assert runtime_changes(live, _render(routes, clusters)) is None, clusters

    def test_checked_server_gets_backend_defaults_and_health(self) -> None:
        """A dynamic server takes no default-server line: its settings are spelt out."""
        checked = {"Active": {"Enabled": True, "Interval": "00:00:02"}}
        routes = [_route("a", "a", "a.test")]
        live = _render(routes, [_cluster("a", 1, HealthCheck=checked)])
        new = _render(routes, [_cluster("a", 1, 3, HealthCheck=checked)])
        commands = runtime_changes(live, new)
        assert commands is not None
        assert commands[0].endswith("127.0.0.1:3 check inter 2000 fall 2 rise 1")
        assert commands[2].startswith("enable health ")

    def test_maps_are_addressed_as_the_worker_loaded_them(self) -> None:
        """Map names come from `show map`; a worker out of step means reload."""
        live = _sites((1,), (2,))
        new = _sites((1,), (2,), c="a")
        loaded = {
            _logical(name): LoadedMap(f"maps/old-{index}.map", _count(text))
            for index, (name, text) in enumerate(sorted(live.files.items()))
            if name != "haproxy.cfg"
        }
        commands = runtime_changes(live, new, loaded=loaded)
        assert commands is not None
        assert commands[0].split()[2].startswith("maps/old-")
        hosts = loaded["maps/hosts.map"]
        loaded["maps/hosts.map"] = LoadedMap(hosts.name, hosts.entries + 1)
        assert runtime_changes(live, new, loaded=loaded) is None

    def test_show_map_is_read_by_logical_name(self) -> None:
        """`loaded_maps` keys the worker's maps by name without the content hash."""
        text = (
            "# id (file) description\n"
            "0 (maps/hosts-3fa4303989b1.map) pattern loaded from file "
            "'maps/hosts-3fa4303989b1.map' used by map at file 'haproxy.cfg' line 29. "
            "curr_ver=0 next_ver=0 entry_cnt=3\n"
        )
        assert loaded_maps(text) == {
            "maps/hosts.map": LoadedMap("maps/hosts-3fa4303989b1.map", 3)
        }

    def test_semicolon_in_a_path_is_escaped(self) -> None:
        """A `;` in a map key cannot end the command: it is written `\\;`."""
        live = _render([_route("a", "a", "a.test")], [_cluster("a", 1)])
        routes = [_route("a", "a", "a.test"), _route("x", "a", "a.test", path="/x;y")]
        commands = runtime_changes(live, _render(routes, [_cluster("a", 1)]))
        assert commands is not None
        assert any("/x\\;y " in command for command in commands), commands

    def test_parked_server_coming_back_is_enabled_again(self) -> None:
        """A removed server still draining is enabled, not added, when it returns."""
        live, new = _sites((1,), (2,)), _sites((1, 3), (2,))
        added = runtime_changes(live, new)
        assert added is not None
        path = added[0].split()[2]
        parked = server_args(new, [path, "no-such/server"])
        assert parked == {path: "127.0.0.1:3"}
        commands = runtime_changes(live, new, parked=parked)
        assert commands == [f"enable server {path}"]
        assert runtime_changes(live, new, parked={path: "127.0.0.1:3 weight 9"}) is None


def _named(address: str, **destination: Any) -> dict[str, Any]:
    """Cluster `a` with one destination named `api.test` at `address`."""
    value = {"Address": address, "Host": "api.test", **destination}
    return {"ClusterId": "a", "Destinations": {"d": value}}


class TestRuntimeEdges:
    def test_address_between_host_name_and_ip_needs_a_reload(self) -> None:
        """A server whose address turns into a DNS name, or back, is reloaded."""
        routes = [_route("a", "a", "a.test")]
        by_ip = _render(routes, [_named("http://127.0.0.1:80")])
        by_name = _render(routes, [_named("http://web:80")])
        assert runtime_changes(by_ip, by_name) is None
        assert runtime_changes(by_name, by_ip) is None

    def test_server_tls_and_check_settings_need_a_reload(self) -> None:
        """TLS, a health address or check timings of a kept server mean a reload."""
        routes = [_route("a", "a", "a.test")]
        live = _render(routes, [_named("http://127.0.0.1:80")])
        checked = {"Active": {"Enabled": True, "Interval": "00:00:05"}}
        changed = [
            _named("https://127.0.0.1:80"),
            _named("http://127.0.0.1:80", Health="http://127.0.0.1:81"),
            {**_named("http://127.0.0.1:80"), "HealthCheck": checked},
        ]
        for cluster in changed:
            assert runtime_changes(live, _render(routes, [cluster])) is None, cluster

    def test_new_server_checked_against_system_cas_needs_a_reload(self) -> None:
        """HAProxy 2.6 cannot load `@system-ca` at runtime; without verify it can."""
        routes = [_route("a", "a", "a.test")]
        live = _render(routes, [_named("http://127.0.0.1:80")])
        verified = _named("http://127.0.0.1:80")
        verified["Destinations"]["e"] = {"Address": "https://127.0.0.1:443"}
        assert runtime_changes(live, _render(routes, [verified])) is None
        trust = {"HttpClient": {"DangerousAcceptAnyServerCertificate": True}}
        live = _render(routes, [{**_named("http://127.0.0.1:80"), **trust}])
        commands = runtime_changes(live, _render(routes, [{**verified, **trust}]))
        assert commands is not None
        assert "ssl verify none" in commands[0], commands

    def test_same_address_twice_is_two_servers(self) -> None:
        """Two destinations on one address, told apart by Host, are two servers."""
        routes = [_route("a", "a", "a.test")]
        live = _render(routes, [_named("http://127.0.0.1:80")])
        both = _named("http://127.0.0.1:80")
        both["Destinations"]["e"] = {"Address": "http://127.0.0.1:80", "Host": "b.io"}
        commands = runtime_changes(live, _render(routes, [both]))
        assert commands is not None
        assert [command.split()[:3] for command in commands] == [
            ["add", "server", commands[0].split()[2]],
            ["enable", "server", commands[0].split()[2]],
        ]
        assert commands[0].endswith("/b.io 127.0.0.1:80")

    def test_last_destination_removed_leaves_the_backend_empty(self) -> None:
        """A cluster's last destination is removed at runtime; its backend stays."""
        live, new = _sites((1,), (2,)), _sites((), (2,))
        commands = runtime_changes(live, new)
        assert commands is not None
        assert [command.split()[0] for command in commands] == ["disable", "del"]

    def test_renamed_cluster_needs_a_reload(self) -> None:
        """A cluster under a new id is a new backend: a reload."""
        routes = [_route("a", "a", "a.test")]
        renamed = [_route("a", "b", "a.test")]
        live = _render(routes, [_cluster("a", 1)])
        assert runtime_changes(live, _render(renamed, [_cluster("b", 1)])) is None

    def test_thousands_of_hosts_moved_are_compared_quickly(self) -> None:
        """1,500 hosts moved between clusters are 1,500 `set map` commands."""
        hosts = [f"h{index}.test" for index in range(1500)]
        clusters = [_cluster("a", 1), _cluster("b", 2)]
        live = _render(
            [_route("a", "a", "a.test", *hosts), _route("b", "b", "b.test")], clusters
        )
        new = _render(
            [_route("a", "a", "a.test"), _route("b", "b", "b.test", *hosts)], clusters
        )
        commands = runtime_changes(live, new)
        assert commands is not None
        assert len(commands) == 1500
        assert {command.split()[0] for command in commands} == {"set"}


def _logical(name: str) -> str:
    stem, _, _ = name.rpartition("-")
    return f"{stem}.map"


def _count(text: str) -> int:
    return len([line for line in text.splitlines() if line.strip()])


# Against a real HAProxy and nats-server ---------------------------------------


async def _backends_seen(stack: SidecarStack, host: str, requests: int = 6) -> set[str]:
    seen = set()
    for _ in range(requests):
        answer = await stack.get(host)
        assert answer.status == 200, answer.text
        seen.add(answer.json["backend"])
    return seen


async def _put(stack: SidecarStack, operator: Any, document: bytes) -> str:
    revision = await operator.put(document)
    return (await stack.wait_revision(revision)).outcome


async def _slow_requests(
    stack: SidecarStack, host: str, count: int
) -> asyncio.Future[list[Response]]:
    """Start `count` requests that the echo backends hold for two seconds.

    With round robin each server gets one, so every server has a connection
    in use (which `del server` refuses to cut) until they end.
    """
    requests = [stack.get(host, "/?sleep=2", timeout=10) for _ in range(count)]
    gathered = asyncio.gather(*requests)
    await asyncio.sleep(0.5)
    return gathered


async def _map_entries(stack: SidecarStack) -> dict[str, set[str]]:
    """Every map of the current worker, by logical name, as `key value` lines."""
    loaded = loaded_maps(await stack.master.worker_command("show map"))
    entries = {}
    for logical, held in loaded.items():
        text = await stack.master.worker_command(f"show map {held.name}")
        lines = (line.split(" ", 1)[1] for line in text.splitlines() if line.strip())
        entries[logical] = set(lines)
    return entries


async def _servers(stack: SidecarStack) -> dict[str, tuple[str, str]]:
    """Each server of the current worker: (address, admin state)."""
    text = await stack.master.worker_command("show servers state")
    servers = {}
    for line in text.splitlines()[2:]:
        fields = line.split()
        if len(fields) > 18:
            servers[f"{fields[1]}/{fields[3]}"] = (
                f"{fields[4]}:{fields[18]}",
                fields[6],
            )
    return servers


class TestSidecarRuntime:
    async def test_destinations_change_without_a_reload(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Destinations added and removed reload nothing and are routed at once."""
        one, two, three = (
            echo_backends.start(name) for name in ("one", "two", "three")
        )
        stack = await sidecar_stack()
        routes = [_route("a", "a", "a.test")]
        async with operator_kv(nats_server.url) as operator:
            document = _document(routes, [_cluster("a", one.port)])
            assert await _put(stack, operator, document) == "applied"
            reloads = await stack.reloads()
            steps = [
                ((one.port, two.port), {"one", "two"}),
                ((two.port,), {"two"}),
                ((two.port, three.port), {"two", "three"}),
                ((three.port,), {"three"}),
            ]
            for ports, expected in steps:
                document = _document(routes, [_cluster("a", *ports)])
                assert await _put(stack, operator, document) == "runtime"
                assert await _backends_seen(stack, "a.test") == expected
            assert await stack.reloads() == reloads
        live = read_installed(stack.settings.config_dir)
        assert live == render(parse_document(document), stack.settings.rendering).files

    async def test_hosts_move_between_clusters_without_a_reload(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Hosts moved between existing clusters are routed anew, with no reload."""
        one, two = echo_backends.start("one"), echo_backends.start("two")
        clusters = [_cluster("one", one.port), _cluster("two", two.port)]
        stack = await sidecar_stack()

        def homes(first: list[str], second: list[str]) -> bytes:
            routes = [_route("r1", "one", *first), _route("r2", "two", *second)]
            return _document(routes, clusters)

        async with operator_kv(nats_server.url) as operator:
            document = homes(["a.test", "b.test"], ["c.test"])
            assert await _put(stack, operator, document) == "applied"
            reloads = await stack.reloads()
            assert await _put(
                stack, operator, homes(["a.test"], ["b.test", "c.test"])
            ) == ("runtime")
            assert await _backends_seen(stack, "b.test", 2) == {"two"}
            assert await _put(
                stack, operator, homes(["c.test"], ["a.test", "b.test"])
            ) == ("runtime")
            assert await _backends_seen(stack, "a.test", 2) == {"two"}
            assert await _backends_seen(stack, "c.test", 2) == {"one"}
            assert (await stack.get("d.test")).status == 404
            assert await stack.reloads() == reloads

    async def test_a_later_reload_keeps_the_runtime_state(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """After runtime changes, a reload from the live files changes nothing seen."""
        one, two = echo_backends.start("one"), echo_backends.start("two")
        stack = await sidecar_stack()
        first = [_route("a", "a", "a.test"), _route("b", "b", "b.test")]
        second = [_route("a", "a", "a.test"), _route("b", "a", "b.test", "c.test")]
        async with operator_kv(nats_server.url) as operator:
            clusters = [_cluster("a", one.port), _cluster("b", two.port)]
            assert await _put(stack, operator, _document(first, clusters)) == "applied"
            clusters = [_cluster("a", two.port), _cluster("b", one.port, two.port)]
            assert await _put(stack, operator, _document(second, clusters)) == "runtime"
        maps, servers = await _map_entries(stack), await _servers(stack)
        # Servers removed at runtime may still be draining, in maintenance.
        enabled = {path: state for path, state in servers.items() if state[1] == "0"}
        await stack.master.reload()
        assert await _map_entries(stack) == maps
        assert await _servers(stack) == enabled
        for host in ("a.test", "b.test", "c.test"):
            assert await _backends_seen(stack, host, 2) == {"two"}

    async def test_a_refused_command_falls_back_to_a_reload(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """When HAProxy refuses a runtime command, a reload applies the change."""
        one, two = echo_backends.start("one"), echo_backends.start("two")
        stack = await sidecar_stack()
        routes = [_route("a", "a", "a.test")]
        async with operator_kv(nats_server.url) as operator:
            document = _document(routes, [_cluster("a", one.port)])
            assert await _put(stack, operator, document) == "applied"
            (path,) = await _servers(stack)
            backend = path.split("/")[0]
            # A server of that name already exists, so `add server` is refused.
            squatter = f"{backend}/127.0.0.1:{two.port} 127.0.0.1:{one.port} disabled"
            answer = await stack.master.worker_command(f"add server {squatter}")
            assert "New server registered" in answer
            reloads = await stack.reloads()
            document = _document(routes, [_cluster("a", one.port, two.port)])
            assert await _put(stack, operator, document) == "applied"
            assert await stack.reloads() == reloads + 1
            assert await _backends_seen(stack, "a.test") == {"one", "two"}
            document = _document(routes, [_cluster("a", two.port)])
            assert await _put(stack, operator, document) == "runtime"
            assert await _backends_seen(stack, "a.test") == {"two"}

    async def test_draining_server_is_enabled_again(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A removed server still draining is enabled again when it comes back."""
        one, two = echo_backends.start("one"), echo_backends.start("two")
        stack = await sidecar_stack(drain_interval=600)
        routes = [_route("a", "a", "a.test")]
        both = _document(routes, [_cluster("a", one.port, two.port)])
        async with operator_kv(nats_server.url) as operator:
            assert await _put(stack, operator, both) == "applied"
            reloads = await stack.reloads()
            slow = await _slow_requests(stack, "a.test", 2)
            alone = _document(routes, [_cluster("a", one.port)])
            assert await _put(stack, operator, alone) == "runtime"
            assert await _backends_seen(stack, "a.test") == {"one"}
            assert list(_in_maintenance(await _servers(stack))) == [two.port]
            assert await _put(stack, operator, both) == "runtime"
            assert await _backends_seen(stack, "a.test") == {"one", "two"}
            assert _in_maintenance(await _servers(stack)) == []
            assert await stack.reloads() == reloads
        assert sorted(answer.status for answer in await slow) == [200, 200]

    @pytest.mark.slow
    async def test_drained_server_is_deleted(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A removed server is deleted from the worker once its connections end."""
        one, two = echo_backends.start("one"), echo_backends.start("two")
        stack = await sidecar_stack(drain_interval=0.2)
        routes = [_route("a", "a", "a.test")]
        both = _document(routes, [_cluster("a", one.port, two.port)])
        async with operator_kv(nats_server.url) as operator:
            assert await _put(stack, operator, both) == "applied"
            slow = await _slow_requests(stack, "a.test", 2)
            alone = _document(routes, [_cluster("a", one.port)])
            assert await _put(stack, operator, alone) == "runtime"
            assert list(_in_maintenance(await _servers(stack))) == [two.port]
        await slow
        deadline = time.monotonic() + 30
        while len(await _servers(stack)) > 1:
            assert time.monotonic() < deadline, await _servers(stack)
            await asyncio.sleep(0.2)

    async def test_parked_server_does_not_return_in_maintenance(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A server still draining when a reload brings it back starts enabled."""
        one, two = echo_backends.start("one"), echo_backends.start("two")
        stack = await sidecar_stack(drain_interval=600)
        routes = [_route("a", "a", "a.test")]
        both = _document(routes, [_cluster("a", one.port, two.port)])
        async with operator_kv(nats_server.url) as operator:
            assert await _put(stack, operator, both) == "applied"
            slow = await _slow_requests(stack, "a.test", 2)
            alone = _document(routes, [_cluster("a", one.port)])
            assert await _put(stack, operator, alone) == "runtime"
            assert list(_in_maintenance(await _servers(stack))) == [two.port]
            extra = _cluster("spare", one.port)
            document = _document(routes, [_cluster("a", one.port, two.port), extra])
            assert await _put(stack, operator, document) == "applied"
        assert await _backends_seen(stack, "a.test") == {"one", "two"}
        assert sorted(answer.status for answer in await slow) == [200, 200]

    async def test_many_hosts_at_once_go_in_batches(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Hundreds of hosts added at once are sent in batches, all taken."""
        one = echo_backends.start("one")
        stack = await sidecar_stack()
        clusters = [_cluster("a", one.port)]
        hosts = [f"h{index}.test" for index in range(250)]
        async with operator_kv(nats_server.url) as operator:
            document = _document([_route("a", "a", "a.test")], clusters)
            assert await _put(stack, operator, document) == "applied"
            document = _document([_route("a", "a", "a.test", *hosts)], clusters)
            assert await _put(stack, operator, document) == "runtime"
        for host in ("h0.test", "h137.test", "h249.test"):
            assert await _backends_seen(stack, host, 1) == {"one"}
        assert len((await _map_entries(stack))["maps/hosts.map"]) == 251

    async def test_destination_moved_to_another_port_keeps_its_name(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A named destination's new port is used, at runtime and after a reload.

        The server keeps its name (the destination's Host), so the state saved
        before a reload must not bring its old port back.
        """
        one, two, three = (echo_backends.start(n) for n in ("one", "two", "three"))
        stack = await sidecar_stack()
        routes = [_route("a", "a", "a.test")]

        def named(port: int, *more: dict[str, Any]) -> bytes:
            destination = {"Address": f"http://127.0.0.1:{port}", "Host": "api.test"}
            cluster = {"ClusterId": "a", "Destinations": {"d": destination}}
            return _document(routes, [cluster, *more])

        async with operator_kv(nats_server.url) as operator:
            assert await _put(stack, operator, named(one.port)) == "applied"
            assert await _put(stack, operator, named(two.port)) == "runtime"
            assert await _backends_seen(stack, "a.test", 2) == {"two"}
            spare = _cluster("spare", one.port)
            assert await _put(stack, operator, named(three.port, spare)) == "applied"
            assert await _backends_seen(stack, "a.test", 2) == {"three"}

    async def test_runtime_api_can_be_turned_off(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """With `runtime_api` off every change reloads, as before."""
        one, two = echo_backends.start("one"), echo_backends.start("two")
        stack = await sidecar_stack(runtime_api=False)
        routes = [_route("a", "a", "a.test")]
        async with operator_kv(nats_server.url) as operator:
            document = _document(routes, [_cluster("a", one.port)])
            assert await _put(stack, operator, document) == "applied"
            document = _document(routes, [_cluster("a", one.port, two.port)])
            assert await _put(stack, operator, document) == "applied"


def _in_maintenance(servers: dict[str, tuple[str, str]]) -> list[int]:
    """The ports of the servers in maintenance (admin state not 0)."""
    return [
        int(address.split(":")[1])
        for address, admin in servers.values()
        if admin != "0"
    ]
