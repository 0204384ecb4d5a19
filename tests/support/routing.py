"""Sequences of routing documents for the runtime tests, and a model of a worker.

`Site` is a small routing document kept as plain data, with `mutations`
that each change one thing an operator changes: a destination added,
removed, moved to another port or given TLS, a health address or a Host; a
host moved between routes; a path, a policy, a health check, affinity or a
cluster's name changed. `change_strategy()` draws one of them, so that a
hypothesis test can walk a sequence of documents.

`Worker` models what an HAProxy worker holds that the runtime API can
change: the servers of each backend and the entries of each map. It is
built from a render the way HAProxy reads one at start (`Worker.fresh`), and
takes runtime commands the way HAProxy 2.6 does (`Worker.run`), refusing
what HAProxy refuses. Two workers are compared with `Worker.routing()`.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from momus_haproxy.document import parse_document
from momus_haproxy.errors import DocumentError
from momus_haproxy.render import Rendered, RenderSettings, render

__all__ = [
    "HOSTS",
    "Change",
    "Refused",
    "Site",
    "Worker",
    "change_strategy",
    "frame",
    "unescape",
]

HOSTS = ("a.test", "b.test", "c.test", "d.test", "*.w.test", "*.x.w.test")
"""Every host a route may list; wildcards at two depths."""

PATHS = (None, "/api/{**rest}", "/x;y", "/exact", "/a%2Cb/{**rest}", "/{id}/z")
"""Route paths: none, prefixes, exact ones (one with `;`), a `{name}` pattern."""

DESTINATION_HOSTS = ("127.0.0.1", "127.0.0.2", "localhost")
"""IP literals and a name HAProxy resolves."""

SERVER_NAMES = (None, "api.test", "web.test")
"""A destination's `Host`, which names its server; None names it by address."""

_MAP_NAME = re.compile(r"maps/[a-z0-9]+-[0-9a-f]{12}\.map")


@dataclass
class Destination:
    """One destination of a cluster."""

    port: int
    host: str = "127.0.0.1"
    scheme: str = "http"
    health: int | None = None
    name: str | None = None

    def document(self) -> dict[str, Any]:
        """The destination as the document writes it."""
        value: dict[str, Any] = {"Address": f"{self.scheme}://{self.host}:{self.port}"}
        if self.health is not None:
            value["Health"] = f"http://127.0.0.1:{self.health}"
        if self.name is not None:
            value["Host"] = self.name
        return value


@dataclass
class Cluster:
    """One cluster: its destinations and the settings a reload is needed for."""

    destinations: dict[str, Destination] = field(default_factory=dict)
    policy: str = "RoundRobin"
    check: str | None = None
    affinity: bool = False
    maxconn: int | None = None

    def document(self, cluster_id: str) -> dict[str, Any]:
        """The cluster as the document writes it."""
        value: dict[str, Any] = {
            "ClusterId": cluster_id,
            "LoadBalancingPolicy": self.policy,
            "Destinations": {
                name: destination.document()
                for name, destination in self.destinations.items()
            },
        }
        if self.check is not None:
            value["HealthCheck"] = {self.check: {"Enabled": True}}
        if self.affinity:
            value["SessionAffinity"] = {"Enabled": True}
        if self.maxconn is not None:
            value["HttpClient"] = {"MaxConnectionsPerServer": self.maxconn}
        return value


@dataclass
class Route:
    """One route: its cluster, hosts and path."""

    cluster: str
    hosts: list[str] = field(default_factory=list)
    path: str | None = None
    www: bool = False
    original_host: bool = False

    def document(self, route_id: str) -> dict[str, Any]:
        """The route as the document writes it."""
        match: dict[str, Any] = {}
        if self.hosts:
            match["Hosts"] = list(self.hosts)
        if self.path is not None:
            match["Path"] = self.path
        value: dict[str, Any] = {
            "RouteId": route_id,
            "ClusterId": self.cluster,
            "Match": match,
        }
        metadata = {
            "RedirectWww": self.www,
            "UseOriginalHostHeader": self.original_host,
        }
        value["Metadata"] = {key: "true" for key, on in metadata.items() if on}
        return value


@dataclass
class Site:
    """A routing document as plain data, changed one step at a time."""

    routes: dict[str, Route]
    clusters: dict[str, Cluster]

    @classmethod
    def start(cls, ports: tuple[int, ...]) -> Site:
        """Three clusters on `ports`, three routes sharing four hosts."""
        one, two, three = (ports * 3)[:3]
        clusters = {
            "a": Cluster({"d1": Destination(one)}),
            "b": Cluster({"d1": Destination(two), "d2": Destination(three)}),
            "c": Cluster({"d1": Destination(three, name="api.test")}),
        }
        routes = {
            "r1": Route("a", ["a.test", "*.w.test"]),
            "r2": Route("b", ["b.test", "c.test"]),
            "r3": Route("c", ["d.test"], path="/api/{**rest}"),
        }
        return cls(routes, clusters)

    def document(self) -> bytes:
        """The routing document's JSON text."""
        routes = [route.document(rid) for rid, route in sorted(self.routes.items())]
        clusters = [
            cluster.document(cid) for cid, cluster in sorted(self.clusters.items())
        ]
        return json.dumps({"Routes": routes, "Clusters": clusters}).encode()

    def render(self, settings: RenderSettings) -> Rendered:
        """Render the document."""
        return render(parse_document(self.document()), settings)

    def valid(self) -> bool:
        """Whether the document passes validation."""
        try:
            parse_document(self.document())
        except DocumentError:
            return False
        return True


Change = Callable[[Site], None]


def change_strategy(ports: tuple[int, ...]) -> st.SearchStrategy[Change]:
    """Draw one change of a `Site`, with destinations on `ports`."""
    port = st.sampled_from(ports)
    destination = st.builds(
        Destination,
        port=port,
        host=st.sampled_from(DESTINATION_HOSTS[:1] * 4 + DESTINATION_HOSTS[1:]),
        scheme=st.sampled_from(("http", "http", "http", "https")),
        health=st.one_of(st.none(), st.none(), port),
        name=st.sampled_from((*SERVER_NAMES, None, None)),
    )
    name = st.sampled_from(("d1", "d2", "d3", "d4"))
    cluster = st.sampled_from(("a", "b", "c", "e"))
    route = st.sampled_from(("r1", "r2", "r3", "r4"))
    host = st.sampled_from(HOSTS)
    changes = [
        st.builds(_add_destination, cluster, name, destination),
        st.builds(_remove_destination, cluster, name),
        st.builds(_move_destination, cluster, name, port),
        st.builds(_move_host, host, route),
        st.builds(_move_host, host, route),
        st.builds(_drop_host, host),
        st.builds(_set_path, route, st.sampled_from(PATHS)),
        st.builds(_toggle, route, st.sampled_from(("www", "original_host"))),
        st.builds(_set_route_cluster, route, cluster),
        st.builds(_add_route, route, cluster, host),
        st.builds(_remove_route, route),
        st.builds(_set_cluster, cluster, st.sampled_from(_CLUSTER_SETTINGS)),
        st.builds(_add_cluster, cluster, destination),
        st.builds(_remove_cluster, cluster),
        st.builds(_rename_cluster, cluster, cluster),
    ]
    return st.one_of(changes)


def _add_destination(cluster: str, name: str, destination: Destination) -> Change:
    def change(site: Site) -> None:
        if cluster in site.clusters:
            site.clusters[cluster].destinations[name] = copy.copy(destination)

    change.__name__ = f"add {cluster}/{name} {destination}"
    return change


def _remove_destination(cluster: str, name: str) -> Change:
    def change(site: Site) -> None:
        if cluster in site.clusters:
            site.clusters[cluster].destinations.pop(name, None)

    change.__name__ = f"remove {cluster}/{name}"
    return change


def _move_destination(cluster: str, name: str, port: int) -> Change:
    def change(site: Site) -> None:
        found = site.clusters.get(cluster, Cluster()).destinations.get(name)
        if found is not None:
            found.port = port

    change.__name__ = f"move {cluster}/{name} to port {port}"
    return change


def _move_host(host: str, route: str) -> Change:
    def change(site: Site) -> None:
        if route not in site.routes:
            return
        for other in site.routes.values():
            if host in other.hosts and (other.hosts != [host] or other.path):
                other.hosts.remove(host)
        if host not in site.routes[route].hosts:
            site.routes[route].hosts.append(host)

    change.__name__ = f"move {host} to {route}"
    return change


def _drop_host(host: str) -> Change:
    def change(site: Site) -> None:
        for route in site.routes.values():
            if host in route.hosts and (len(route.hosts) > 1 or route.path):
                route.hosts.remove(host)

    change.__name__ = f"drop {host}"
    return change


def _set_path(route: str, path: str | None) -> Change:
    def change(site: Site) -> None:
        if route in site.routes and (path or site.routes[route].hosts):
            site.routes[route].path = path

    change.__name__ = f"{route} path {path}"
    return change


def _toggle(route: str, flag: str) -> Change:
    def change(site: Site) -> None:
        if route in site.routes:
            setattr(site.routes[route], flag, not getattr(site.routes[route], flag))

    change.__name__ = f"toggle {flag} on {route}"
    return change


def _set_route_cluster(route: str, cluster: str) -> Change:
    def change(site: Site) -> None:
        if route in site.routes and cluster in site.clusters:
            site.routes[route].cluster = cluster

    change.__name__ = f"{route} to cluster {cluster}"
    return change


def _add_route(route: str, cluster: str, host: str) -> Change:
    def change(site: Site) -> None:
        if route not in site.routes and cluster in site.clusters:
            site.routes[route] = Route(cluster, [host], path="/new/{**rest}")

    change.__name__ = f"add {route} on {cluster} for {host}"
    return change


def _remove_route(route: str) -> Change:
    def change(site: Site) -> None:
        if len(site.routes) > 1:
            site.routes.pop(route, None)

    change.__name__ = f"remove {route}"
    return change


_CLUSTER_SETTINGS: tuple[tuple[str, Any], ...] = (
    ("policy", "LeastRequests"),
    ("policy", "RoundRobin"),
    ("policy", "FirstAlphabetical"),
    ("check", "Active"),
    ("check", "Passive"),
    ("check", None),
    ("affinity", True),
    ("affinity", False),
    ("maxconn", 50),
    ("maxconn", None),
)


def _set_cluster(cluster: str, setting: tuple[str, Any]) -> Change:
    def change(site: Site) -> None:
        if cluster in site.clusters:
            setattr(site.clusters[cluster], *setting)

    change.__name__ = f"{cluster} {setting[0]} {setting[1]}"
    return change


def _add_cluster(cluster: str, destination: Destination) -> Change:
    def change(site: Site) -> None:
        site.clusters.setdefault(cluster, Cluster({"d1": copy.copy(destination)}))

    change.__name__ = f"add cluster {cluster}"
    return change


def _remove_cluster(cluster: str) -> Change:
    def change(site: Site) -> None:
        if cluster in site.clusters and len(site.clusters) > 1:
            del site.clusters[cluster]
            rest = sorted(site.clusters)[0]
            for route in site.routes.values():
                if route.cluster == cluster:
                    route.cluster = rest

    change.__name__ = f"remove cluster {cluster}"
    return change


def _rename_cluster(cluster: str, new: str) -> Change:
    def change(site: Site) -> None:
        if cluster in site.clusters and new not in site.clusters:
            site.clusters[new] = site.clusters.pop(cluster)
            for route in site.routes.values():
                if route.cluster == cluster:
                    route.cluster = new

    change.__name__ = f"rename cluster {cluster} to {new}"
    return change


# A model of the worker ---------------------------------------------------------


class Refused(Exception):
    """HAProxy would refuse this runtime command."""


@dataclass
class Server:
    """A server as the worker holds it: address, settings, admin state."""

    address: str
    settings: tuple[str, ...]
    enabled: bool = True


@dataclass
class Worker:
    """The servers and map entries an HAProxy worker holds."""

    backends: dict[str, dict[str, Server]]
    maps: dict[str, list[tuple[str, str]]]
    loaded: dict[str, str]

    @classmethod
    def fresh(cls, rendered: Rendered) -> Worker:
        """The worker HAProxy starts from `rendered`."""
        backends: dict[str, dict[str, Server]] = {}
        inherited: list[str] = []
        current: dict[str, Server] | None = None
        backend_defaults: list[str] = []
        for line in rendered.config.splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if not line[0].isspace():
                current = None
                if words[0] == "backend":
                    current = backends.setdefault(words[1], {})
                    backend_defaults = []
            elif words[0] == "default-server" and current is None:
                inherited = _without_init_addr(words[1:])
            elif words[0] == "default-server":
                backend_defaults += words[1:]
            elif words[0] == "server" and current is not None:
                own = words[3:] + backend_defaults + inherited
                current[words[1]] = Server(words[2], tuple(sorted(own)))
        maps = {
            name: _map_entries(text)
            for name, text in rendered.files.items()
            if name.endswith(".map")
        }
        loaded = {logical(name): name for name in maps}
        return cls(backends, maps, loaded)

    def run(self, command: str) -> bool:
        """Apply one runtime command; False for a `del server` left draining."""
        words = [unescape(word) for word in command.split()]
        verb = " ".join(words[:2])
        handlers: dict[str, Callable[[list[str]], None]] = {
            "add server": self._add_server,
            "enable server": lambda args: self._set_enabled(args[0], True),
            "disable server": lambda args: self._set_enabled(args[0], False),
            "enable health": lambda args: self._server(args[0]) and None,
            "set server": self._set_server,
            "add map": lambda args: self._map(args[0]).append((args[1], args[2])),
            "set map": self._set_map,
            "del map": self._del_map,
        }
        if verb == "del server":
            return False
        if verb not in handlers:
            raise Refused(f"unknown command {command!r}")
        handlers[verb](words[2:])
        return True

    def delete(self, path: str) -> None:
        """Delete a server, as `del server` does once it has drained."""
        backend, _, name = path.partition("/")
        if self._server(path).enabled:
            raise Refused(f"{path} is not in maintenance")
        del self.backends[backend][name]

    def routing(self) -> dict[str, Any]:
        """What decides where requests go: enabled servers and map entries."""
        servers = {
            backend: {
                name: (server.address, server.settings)
                for name, server in held.items()
                if server.enabled
            }
            for backend, held in self.backends.items()
        }
        maps = {logical(name): sorted(entries) for name, entries in self.maps.items()}
        return {"servers": servers, "maps": maps}

    def _server(self, path: str) -> Server:
        backend, _, name = path.partition("/")
        if name not in self.backends.get(backend, {}):
            raise Refused(f"no server {path}")
        return self.backends[backend][name]

    def _add_server(self, args: list[str]) -> None:
        backend, _, name = args[0].partition("/")
        if backend not in self.backends or name in self.backends[backend]:
            raise Refused(f"cannot add server {args[0]}")
        if not re.fullmatch(r"[0-9.]+:[0-9]+", args[1]):
            raise Refused(f"dynamic server address {args[1]!r} is not an IP")
        refused = {"cookie", "resolvers", "init-addr", "track", "resolve-prefer"}
        if refused & set(args[2:]):
            raise Refused(f"a dynamic server takes none of {sorted(refused)}")
        self.backends[backend][name] = Server(args[1], tuple(sorted(args[2:])), False)

    def _set_enabled(self, path: str, enabled: bool) -> None:
        self._server(path).enabled = enabled

    def _set_server(self, args: list[str]) -> None:
        server = self._server(args[0])
        if args[1:2] == ["addr"] and args[3:4] == ["port"]:
            server.address = f"{args[2]}:{args[4]}"
            return
        raise Refused(f"set server {args!r} is not modelled")

    def _map(self, name: str) -> list[tuple[str, str]]:
        if name not in self.maps:
            raise Refused(f"no map {name!r}")
        return self.maps[name]

    def _set_map(self, args: list[str]) -> None:
        entries = self._map(args[0])
        if not any(key == args[1] for key, _ in entries):
            raise Refused(f"no entry {args[1]!r} in {args[0]}")
        entries[:] = [(k, args[2] if k == args[1] else v) for k, v in entries]

    def _del_map(self, args: list[str]) -> None:
        entries = self._map(args[0])
        if not any(key == args[1] for key, _ in entries):
            raise Refused(f"no entry {args[1]!r} in {args[0]}")
        entries[:] = [(k, v) for k, v in entries if k != args[1]]


def _without_init_addr(words: list[str]) -> list[str]:
    if "init-addr" not in words:
        return words
    at = words.index("init-addr")
    return words[:at] + words[at + 2 :]


def _map_entries(text: str) -> list[tuple[str, str]]:
    entries = []
    for line in text.splitlines():
        if line.strip():
            key, value = line.split(None, 1)
            entries.append((key, value.strip()))
    return entries


def logical(name: str) -> str:
    """A map file's name without its content hash."""
    return re.sub(r"-[0-9a-f]{12}\.map$", ".map", name)


def unescape(word: str) -> str:
    """Read one word of a runtime command as HAProxy's CLI does (`\\x` is `x`)."""
    return re.sub(r"\\(.)", r"\1", word)


def frame(rendered: Rendered) -> str:
    """haproxy.cfg without server lines and comments, maps named without hashes.

    Where two renders' frames differ, only a reload can apply the change.
    """
    text = _MAP_NAME.sub(lambda match: logical(match.group()), rendered.config)
    kept = [
        line
        for line in text.splitlines()
        if line.split()[:1] not in (["server"],) and not line.lstrip().startswith("#")
    ]
    return "\n".join(kept)
