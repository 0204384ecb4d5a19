"""Rendered configurations served by a real HAProxy, checked by requests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from momus_haproxy.document import parse_document
from momus_haproxy.install import install
from momus_haproxy.render import RenderSettings, render
from tests.support.cases import SERVED_CASES, check_requests, prepare_case
from tests.support.echo import EchoBackends, free_port, http_request
from tests.support.haproxy import HAProxyRunner


async def _serve(document: bytes, tmp_path: Path, haproxy_runner: HAProxyRunner) -> int:
    port = free_port()
    settings = RenderSettings(http_bind=f"127.0.0.1:{port}", stats_bind=None)
    install(render(parse_document(document), settings).files, tmp_path / "conf")
    await haproxy_runner(tmp_path / "conf")
    return port


@pytest.mark.parametrize("name", SERVED_CASES)
async def test_shared_case(
    name: str,
    tmp_path: Path,
    echo_backends: EchoBackends,
    haproxy_runner: HAProxyRunner,
) -> None:
    """Each shared case is served as its expect.json says."""
    case = prepare_case(name, echo_backends)
    port = await _serve(case.document, tmp_path, haproxy_runner)
    check_requests(case, port, deadline=time.monotonic() + 8)
    if name == "health-host":
        backend = case.backends["d1"]
        backend.stop()
        _wait_status(port, "app.example.test", 503)
        backend.start()
        _wait_status(port, "app.example.test", 200)


def _wait_status(port: int, host: str, status: int, timeout: float = 8) -> None:
    deadline = time.monotonic() + timeout
    while True:
        answer = http_request(port, "GET", host, "/")
        if answer.status == status:
            return
        assert time.monotonic() < deadline, f"still {answer.status}, not {status}"
        time.sleep(0.2)


def _document(routes: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> bytes:
    return json.dumps({"Routes": routes, "Clusters": clusters}).encode()


def _cluster(name: str, port: int, **extra: Any) -> dict[str, Any]:
    address = {"Address": f"http://127.0.0.1:{port}"}
    return {"ClusterId": name, "Destinations": {name: address}, **extra}


class TestHosts:
    async def test_exact_wildcard_and_lookalikes(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """Hosts match case-insensitively, ignore the port, and never look-alikes."""
        a = echo_backends.start("a")
        w = echo_backends.start("w")
        routes = [
            {
                "RouteId": "a",
                "ClusterId": "a",
                "Match": {"Hosts": ["app.example.test"]},
            },
            {"RouteId": "w", "ClusterId": "w", "Match": {"Hosts": ["*.wild.test"]}},
        ]
        clusters = [_cluster("a", a.port), _cluster("w", w.port)]
        port = await _serve(_document(routes, clusters), tmp_path, haproxy_runner)
        cases = {
            "APP.Example.Test:8080": "a",
            "x.wild.test": "w",
            "a.b.wild.test": "w",
            "wild.test": None,
            "xapp.example.test": None,
            "app.example.test.evil.test": None,
            "x.wild.test.evil": None,
        }
        for host, backend in cases.items():
            answer = http_request(port, "GET", host, "/")
            if backend is None:
                assert answer.status == 404, host
            else:
                assert answer.json["backend"] == backend, host

    async def test_exact_host_beats_wildcard(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """An exact host wins over a wildcard covering it; paths fall through."""
        a = echo_backends.start("a")
        w = echo_backends.start("w")
        routes = [
            {
                "RouteId": "a",
                "ClusterId": "a",
                "Match": {"Hosts": ["x.wild.test"], "Path": "/api/{**rest}"},
            },
            {"RouteId": "w", "ClusterId": "w", "Match": {"Hosts": ["*.wild.test"]}},
        ]
        clusters = [_cluster("a", a.port), _cluster("w", w.port)]
        port = await _serve(_document(routes, clusters), tmp_path, haproxy_runner)
        assert http_request(port, "GET", "x.wild.test", "/api/1").json["backend"] == "a"
        assert http_request(port, "GET", "x.wild.test", "/other").json["backend"] == "w"


class TestPaths:
    async def test_segments_params_methods_headers_query(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """Path segments, {name} parameters, methods, headers and query match."""
        names = ["lit", "param", "post", "hdr", "qry", "rest"]
        started = {n: echo_backends.start(n) for n in names}
        host = {"Hosts": ["p.test"]}
        routes = [
            {"RouteId": "lit", "ClusterId": "lit", "Match": {**host, "Path": "/a/b"}},
            {
                "RouteId": "param",
                "ClusterId": "param",
                "Match": {**host, "Path": "/users/{id}/posts"},
            },
            {
                "RouteId": "post",
                "ClusterId": "post",
                "Match": {**host, "Path": "/a/{**r}", "Methods": ["post"]},
            },
            {
                "RouteId": "hdr",
                "ClusterId": "hdr",
                "Match": {
                    **host,
                    "Path": "/a/{**r}",
                    "Headers": [{"Name": "X-Beta", "Values": ["on"]}],
                },
            },
            {
                "RouteId": "qry",
                "ClusterId": "qry",
                "Match": {
                    **host,
                    "Path": "/a/{**r}",
                    "QueryParameters": [
                        {"Name": "v", "Values": ["2"], "Mode": "Exact"}
                    ],
                },
            },
            {"RouteId": "rest", "ClusterId": "rest", "Match": {**host}},
        ]
        clusters = [_cluster(n, started[n].port) for n in names]
        port = await _serve(_document(routes, clusters), tmp_path, haproxy_runner)

        def backend(path: str, method: str = "GET", **headers: str) -> str:
            answer = http_request(port, method, "p.test", path, headers=headers)
            return str(answer.json["backend"])

        assert backend("/a/b") == "lit"
        assert backend("/A/B/") == "lit"
        assert backend("/a/bc") == "rest"
        assert backend("/users/7/posts") == "param"
        assert backend("/users/7/8/posts") == "rest"
        assert backend("/a/x", "POST") == "post"
        assert backend("/a/x", **{"X-Beta": "ON"}) == "hdr"
        assert backend("/a/x?v=2") == "qry"
        assert backend("/a/x?v=3") == "rest"
        assert backend("/a/x") == "rest"

    async def test_prefix_matches_whole_segments(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """`/api/{**rest}` takes /api and /api/x but not /apix."""
        api = echo_backends.start("api")
        web = echo_backends.start("web")
        routes = [
            {"RouteId": "api", "ClusterId": "api", "Match": {"Path": "/api/{**rest}"}},
            {"RouteId": "web", "ClusterId": "web", "Match": {"Path": "{**catch-all}"}},
        ]
        clusters = [_cluster("api", api.port), _cluster("web", web.port)]
        port = await _serve(_document(routes, clusters), tmp_path, haproxy_runner)
        for path, name in [("/api", "api"), ("/api/x", "api"), ("/apix", "web")]:
            assert http_request(port, "GET", "any.test", path).json["backend"] == name

    async def test_order_overrides_specificity(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """A lower Order wins even over a more specific path, as in YARP."""
        api = echo_backends.start("api")
        web = echo_backends.start("web")
        routes = [
            {
                "RouteId": "api",
                "ClusterId": "api",
                "Order": 5,
                "Match": {"Hosts": ["o.test"], "Path": "/api/{**rest}"},
            },
            {
                "RouteId": "web",
                "ClusterId": "web",
                "Order": 1,
                "Match": {"Hosts": ["o.test"]},
            },
        ]
        clusters = [_cluster("api", api.port), _cluster("web", web.port)]
        port = await _serve(_document(routes, clusters), tmp_path, haproxy_runner)
        assert http_request(port, "GET", "o.test", "/api/x").json["backend"] == "web"


class TestTransforms:
    async def test_path_and_header_transforms(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """Path and header transforms reach the upstream and the client."""
        echo = echo_backends.start("e")
        transforms = [
            {"PathPrefix": "/v2"},
            {"RequestHeader": "X-Quote", "Set": 'it\'s 100% ${HOME} "q"'},
            {"RequestHeaderRemove": "X-Drop"},
            {"ResponseHeader": "X-Out", "Append": "yes", "When": "Always"},
            {"X-Forwarded": "Off", "For": "Set"},
        ]
        routes = [
            {
                "RouteId": "t",
                "ClusterId": "e",
                "Match": {"Hosts": ["t.test"]},
                "Transforms": transforms,
            }
        ]
        port = await _serve(
            _document(routes, [_cluster("e", echo.port)]), tmp_path, haproxy_runner
        )
        answer = http_request(
            port,
            "GET",
            "t.test",
            "/x?q=1",
            headers={"X-Drop": "1", "X-Forwarded-Host": "client"},
        )
        upstream = answer.json
        assert upstream["path"] == "/v2/x?q=1"
        assert upstream["headers"]["x-quote"] == 'it\'s 100% ${HOME} "q"'
        assert "x-drop" not in upstream["headers"]
        assert upstream["headers"]["x-forwarded-host"] == "client"
        assert upstream["headers"]["x-forwarded-for"] == "127.0.0.1"
        assert "x-forwarded-proto" not in upstream["headers"]
        assert answer.headers["x-out"] == "yes"

    async def test_path_set_and_remove_prefix_to_root(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """PathRemovePrefix leaves '/' for the bare prefix; PathSet replaces."""
        echo = echo_backends.start("e")
        routes = [
            {
                "RouteId": "rm",
                "ClusterId": "e",
                "Match": {"Hosts": ["rm.test"], "Path": "/api/{**r}"},
                "Transforms": [{"PathRemovePrefix": "/api"}],
            },
            {
                "RouteId": "set",
                "ClusterId": "e",
                "Match": {"Hosts": ["set.test"]},
                "Transforms": [{"PathSet": "/fixed"}],
            },
        ]
        port = await _serve(
            _document(routes, [_cluster("e", echo.port)]), tmp_path, haproxy_runner
        )
        assert http_request(port, "GET", "rm.test", "/api").json["path"] == "/"
        assert http_request(port, "GET", "rm.test", "/api/api").json["path"] == "/api"
        assert (
            http_request(port, "GET", "set.test", "/a?b=1").json["path"] == "/fixed?b=1"
        )


class TestClusters:
    async def test_unresolvable_destination_gives_503(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """A destination name that does not resolve lets HAProxy start; 503 for it."""
        routes = [{"RouteId": "a", "ClusterId": "a", "Match": {"Hosts": ["a.test"]}}]
        clusters = [
            {
                "ClusterId": "a",
                "Destinations": {"d": {"Address": "http://no-such-host.invalid:8000"}},
            }
        ]
        port = await _serve(_document(routes, clusters), tmp_path, haproxy_runner)
        assert http_request(port, "GET", "a.test", "/").status == 503
        assert http_request(port, "GET", "b.test", "/").status == 404

    async def test_session_affinity_cookie(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """With cookie affinity, a client holding the cookie stays on one server."""
        one = echo_backends.start("one")
        two = echo_backends.start("two")
        cluster = {
            "ClusterId": "a",
            "LoadBalancingPolicy": "RoundRobin",
            "SessionAffinity": {"Enabled": True, "AffinityKeyName": "aff"},
            "Destinations": {
                "one": {"Address": f"http://127.0.0.1:{one.port}"},
                "two": {"Address": f"http://127.0.0.1:{two.port}"},
            },
        }
        routes = [{"RouteId": "a", "ClusterId": "a", "Match": {"Hosts": ["a.test"]}}]
        port = await _serve(_document(routes, [cluster]), tmp_path, haproxy_runner)
        first = http_request(port, "GET", "a.test", "/")
        cookie = first.headers["set-cookie"].split(";")[0]
        assert cookie.startswith("aff=")
        for _ in range(4):
            again = http_request(port, "GET", "a.test", "/", headers={"Cookie": cookie})
            assert again.json["backend"] == first.json["backend"]

    async def test_first_alphabetical_uses_first_destination(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """FirstAlphabetical sends every request to the first destination by name."""
        b = echo_backends.start("b")
        a = echo_backends.start("a")
        cluster = {
            "ClusterId": "c",
            "LoadBalancingPolicy": "FirstAlphabetical",
            "Destinations": {
                "b": {"Address": f"http://127.0.0.1:{b.port}"},
                "a": {"Address": f"http://127.0.0.1:{a.port}"},
            },
        }
        routes = [{"RouteId": "c", "ClusterId": "c", "Match": {"Hosts": ["c.test"]}}]
        port = await _serve(_document(routes, [cluster]), tmp_path, haproxy_runner)
        seen = {
            http_request(port, "GET", "c.test", "/").json["backend"] for _ in range(4)
        }
        assert seen == {"a"}
