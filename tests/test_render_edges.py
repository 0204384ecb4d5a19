"""Edge cases of host, header and query matching, served by a real HAProxy.

Each test renders a small document, starts HAProxy on it and sends requests
that YARP (through ASP.NET Core's host matching and its own header and query
matchers) takes or refuses, checking that HAProxy routes them the same way.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from momus_haproxy.document import parse_document
from momus_haproxy.install import install
from momus_haproxy.render import RenderSettings, render
from tests.support.echo import EchoBackends, Response, free_port, read_response
from tests.support.haproxy import HAProxyRunner

Headers = Iterable[tuple[str, str]]


async def _serve(
    routes: list[dict[str, Any]],
    names: Iterable[str],
    tmp_path: Path,
    echo_backends: EchoBackends,
    haproxy_runner: HAProxyRunner,
) -> int:
    """Start one echo backend per cluster name and HAProxy on the routes."""
    clusters = []
    for name in names:
        address = f"http://127.0.0.1:{echo_backends.start(name).port}"
        clusters.append(
            {"ClusterId": name, "Destinations": {name: {"Address": address}}}
        )
    document = json.dumps({"Routes": routes, "Clusters": clusters}).encode()
    port = free_port()
    settings = RenderSettings(http_bind=f"127.0.0.1:{port}", stats_bind=None)
    install(render(parse_document(document), settings).files, tmp_path / "conf")
    await haproxy_runner(tmp_path / "conf")
    return port


def _route(name: str, **match: Any) -> dict[str, Any]:
    return {"RouteId": name, "ClusterId": name, "Match": match}


def _query(values: list[str], mode: str = "Exact") -> dict[str, Any]:
    return {"Name": "q", "Values": values, "Mode": mode}


def _get(port: int, host: str, path: str = "/", headers: Headers = ()) -> Response:
    """Send a GET whose headers may repeat a name, each pair on its own line."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        return read_response(connection.getresponse())
    finally:
        connection.close()


def _backend(answer: Response) -> str | None:
    """The echo backend that answered, or None for HAProxy's own 404."""
    if answer.status == 404:
        return None
    assert answer.status == 200, answer.text
    return str(answer.json["backend"])


class TestWildcardHosts:
    async def test_wildcard_needs_a_non_empty_label(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """A `*.` wildcard takes a host only with non-empty labels before its suffix."""
        routes = [
            _route("w", Hosts=["*.w.test"]),
            _route("x", Hosts=["*.x.w.test"]),
        ]
        port = await _serve(routes, ["w", "x"], tmp_path, echo_backends, haproxy_runner)
        cases = {
            "a.w.test": "w",
            "A.B.w.test:8080": "w",
            "a.x.w.test": "x",
            "x.w.test": "w",
            ".w.test": None,
            ".w.test:80": None,
            "w.test": None,
            "..w.test": None,
            "a..w.test": None,
            ".a.w.test": None,
            ".x.w.test": None,
            "a.w.test.": None,
        }
        for host, backend in cases.items():
            assert _backend(_get(port, host)) == backend, host


class TestQueryParameters:
    async def test_values_are_compared_decoded(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """Query values are percent-decoded, `+` read as a space, before comparing."""
        routes = [
            _route("exact", Path="/e", QueryParameters=[_query(["a b"])]),
            _route("plus", Path="/p", QueryParameters=[_query(["1+1"])]),
            _route("pct", Path="/c", QueryParameters=[_query(["100%"])]),
            _route("pre", Path="/x", QueryParameters=[_query(["a&"], "Prefix")]),
            _route("not", Path="/n", QueryParameters=[_query(["x y"], "NotContains")]),
            _route("rest", Path="{**catch-all}"),
        ]
        names = ["exact", "plus", "pct", "pre", "not", "rest"]
        port = await _serve(routes, names, tmp_path, echo_backends, haproxy_runner)
        cases = {
            "/e?q=a%20b": "exact",
            "/e?q=a+b": "exact",
            "/e?q=A%20B": "exact",
            "/e?x=1&q=z&q=a+b": "exact",
            "/e?q=a%2520b": "rest",
            "/e?q=ab": "rest",
            "/p?q=1%2B1": "plus",
            "/p?q=1+1": "rest",
            "/c?q=100%": "pct",
            "/c?q=100%25": "pct",
            "/c?q=100%2": "rest",
            "/x?q=a%26b": "pre",
            "/x?q=a&b": "rest",
            "/n?q=x+y": "rest",
            "/n?q=x%20yz": "rest",
            "/n?q=xy": "not",
            "/n": "not",
        }
        for path, backend in cases.items():
            assert _backend(_get(port, "q.test", path)) == backend, path

    async def test_exists_needs_a_value(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """Mode Exists takes a parameter only when some occurrence has a value."""
        exists = [{"Name": "e", "Mode": "Exists"}]
        routes = [
            _route("e", Path="{**catch-all}", QueryParameters=exists),
            _route("rest", Path="{**catch-all}"),
        ]
        port = await _serve(
            routes, ["e", "rest"], tmp_path, echo_backends, haproxy_runner
        )
        cases = {"/?e=1": "e", "/?e=&e=2": "e", "/?e=": "rest", "/?e": "rest"}
        for path, backend in cases.items():
            assert _backend(_get(port, "q.test", path)) == backend, path


class TestHeaders:
    async def test_exact_and_prefix_split_the_list(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """ExactHeader and HeaderPrefix match any item of a comma-separated list."""
        prefix = {"Name": "X-P", "Values": ["pre"], "Mode": "HeaderPrefix"}
        contains = {"Name": "X-C", "Values": ["a, b"], "Mode": "Contains"}
        host = ["h.test"]
        routes = [
            _route("exact", Hosts=host, Headers=[{"Name": "X-T", "Values": ["a"]}]),
            _route("prefix", Hosts=host, Headers=[prefix]),
            _route("contains", Hosts=host, Headers=[contains]),
            _route("rest", Hosts=host),
        ]
        names = ["exact", "prefix", "contains", "rest"]
        port = await _serve(routes, names, tmp_path, echo_backends, haproxy_runner)
        cases: list[tuple[Headers, str]] = [
            ([("X-T", "a, b")], "exact"),
            ([("X-T", "b,A")], "exact"),
            ([("X-T", 'b, "a"')], "exact"),
            ([("X-T", "b"), ("X-T", "c, a")], "exact"),
            ([("X-T", '"a, b"')], "rest"),
            ([("X-T", '"a')], "rest"),
            ([("X-T", "ab, ba")], "rest"),
            ([("X-P", "x, prefix")], "prefix"),
            ([("X-P", 'x, "prefix"')], "prefix"),
            ([("X-P", 'x, "prefix')], "rest"),
            ([("X-C", "z, a, b")], "contains"),
            ([("X-C", "a,b")], "rest"),
        ]
        for headers, backend in cases:
            assert _backend(_get(port, "h.test", headers=headers)) == backend, headers

    async def test_cookie_items_are_split_at_semicolons(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """On Cookie, ExactHeader and HeaderPrefix match one `;`-separated cookie."""
        literal = "s=(1).*+?[a]{2}|^$'\\\"%[src]${HOME}#"
        exact = {"Name": "Cookie", "Values": ["s=1", literal]}
        prefix = {"Name": "cookie", "Values": ["tok="], "Mode": "HeaderPrefix"}
        routes = [
            _route("exact", Path="/e", Headers=[exact]),
            _route("prefix", Path="/p", Headers=[prefix]),
            _route("rest", Path="{**catch-all}"),
        ]
        names = ["exact", "prefix", "rest"]
        port = await _serve(routes, names, tmp_path, echo_backends, haproxy_runner)
        cases: list[tuple[str, str, str]] = [
            ("/e", "a=2; s=1", "exact"),
            ("/e", "S=1;b=2", "exact"),
            ("/e", 'a=2; "s=1"', "exact"),
            ("/e", f"a=2; {literal}", "exact"),
            ("/e", f"a=2; {literal}x", "rest"),
            ("/e", "s=(1)xx'\\", "rest"),
            ("/e", "s=10", "rest"),
            ("/e", "as=1", "rest"),
            ("/e", "a=s=1", "rest"),
            ("/p", "a=1; tok=xyz", "prefix"),
            ("/p", 'a=1; "tok=xyz"', "prefix"),
            ("/p", "a=1; xtok=1", "rest"),
        ]
        for path, cookie, backend in cases:
            answer = _get(port, "c.test", path, [("Cookie", cookie)])
            assert _backend(answer) == backend, cookie

    async def test_exists_needs_a_value(
        self, tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
    ) -> None:
        """Exists takes a header only with a non-empty value; NotExists the others."""
        routes = [
            _route("e", Path="/e", Headers=[{"Name": "X-E", "Mode": "Exists"}]),
            _route("n", Path="/n", Headers=[{"Name": "X-E", "Mode": "NotExists"}]),
            _route("rest", Path="{**catch-all}"),
        ]
        names = ["e", "n", "rest"]
        port = await _serve(routes, names, tmp_path, echo_backends, haproxy_runner)
        cases: list[tuple[str, Headers, str]] = [
            ("/e", [("X-E", "1")], "e"),
            ("/e", [("X-E", ""), ("X-E", "1")], "e"),
            ("/e", [("X-E", "")], "rest"),
            ("/e", [], "rest"),
            ("/n", [], "n"),
            ("/n", [("X-E", "")], "n"),
            ("/n", [("X-E", "1")], "rest"),
        ]
        for path, headers, backend in cases:
            answer = _get(port, "x.test", path, headers)
            assert _backend(answer) == backend, (path, headers)
