"""Hostile and broken values put under the key of a running sidecar.

Whatever the value, the sidecar must not crash, must answer within a bounded
time and memory, and must never install a
configuration that `haproxy -c` refused: every value either is refused (the
live files stay exactly as they were) or is applied, and then the live files
pass `haproxy -c`. The last good routes keep being served throughout.

The renderer's own guarantee (no value adds a line, a directive or an
argument) is proven field by field, with a property-based fuzz, in
test_injection.py; here the same kinds of values go through NATS, the watch,
the check, the install and the reload.

The nats-server of this module allows messages of 32 MiB, so that values
beyond NATS's default 1 MiB reach the sidecar.
"""

from __future__ import annotations

import copy
import json
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from momus_haproxy.check import check
from momus_haproxy.document import MAX_DOCUMENT_BYTES
from momus_haproxy.install import read_installed
from momus_haproxy.nats_server import EmbeddedNats, free_port
from momus_haproxy.sidecar import ApplyResult
from tests.support.echo import EchoBackends
from tests.support.nats import Operator, OperatorFactory
from tests.support.sidecar import SidecarStack, SidecarStackFactory

CASES = Path(__file__).parent / "cases"
REJECTED = json.loads((CASES / "rejected-documents" / "expect.json").read_text())
OUTCOMES = {"refused", "check_failed", "applied", "runtime", "unchanged"}
CHANGED = {"applied", "runtime"}
MAX_ERROR = 4096
"""Longest error (and so log line) a refused value should produce, in characters."""

HOSTILE = [
    "\n    http-request deny if TRUE",
    "\r\nuse_backend evil",
    "# comment",
    "'\"`",
    "%[src]%[env(HOME)]",
    "{{ 7 * 7 }}{% raw %}",
    "${HOME}$(id)",
    "\\",
    " if TRUE",
    "\x00\x01\x07\x1b[31m\x7f\u2028\ufeff",
    "x" * 5000,
]
NASTY = "v\n  http-request deny # '\"` %[src] {{ 7*7 }} ${HOME} \\ \x01\x1b\x7f"
"""Every hostile piece at once, appended to one field at a time."""

FREE_KEYS = {"Destinations", "Metadata"}
"""Objects whose keys are names chosen by the user, and so hostile too."""


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server that takes messages of up to 32 MiB."""
    directory = tmp_path / "nats"
    directory.mkdir()
    config = directory / "nats.conf"
    config.write_text("max_payload: 33554432\n")
    server = EmbeddedNats(
        f"nats://127.0.0.1:{free_port()}", directory, config_file=config
    )
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


def _base(port: int) -> dict[str, Any]:
    """A valid document that uses most fields, served by the backend on `port`."""
    return {
        "Routes": [
            {
                "RouteId": "site",
                "ClusterId": "web",
                "Order": 1,
                "Match": {"Hosts": ["a.test"], "Path": "/{**catch-all}"},
                "Transforms": [
                    {"RequestHeader": "X-Tag", "Set": "tag"},
                    {"ResponseHeader": "X-Served", "Append": "yes", "When": "Always"},
                    {"PathPrefix": "/pre"},
                ],
                "Metadata": {"UseOriginalHostHeader": "true", "Note": "n"},
            },
            {
                "RouteId": "api",
                "ClusterId": "web",
                "Match": {
                    "Hosts": ["api.a.test"],
                    "Path": "/api/{id}",
                    "Methods": ["GET"],
                    "Headers": [{"Name": "X-Key", "Values": ["k1"]}],
                    "QueryParameters": [{"Name": "q", "Values": ["v"]}],
                },
            },
        ],
        "Clusters": [
            {
                "ClusterId": "web",
                "LoadBalancingPolicy": "RoundRobin",
                "SessionAffinity": {
                    "Enabled": True,
                    "Policy": "Cookie",
                    "AffinityKeyName": "aff",
                },
                "HealthCheck": {"Active": {"Enabled": True, "Path": "/health"}},
                "Destinations": {
                    "d1": {"Address": f"http://127.0.0.1:{port}", "Host": "web.test"}
                },
                "Metadata": {"Note": "n"},
            }
        ],
    }


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Yield the path of every string in `value`, and of every user-chosen key.

    A key's path ends with `("key", name)`.
    """
    if isinstance(value, str):
        yield path
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    elif isinstance(value, dict):
        for name, item in value.items():
            if path and path[-1] in FREE_KEYS:
                yield (*path, ("key", name))
            yield from _leaves(item, (*path, name))


def _change(
    document: dict[str, Any], path: tuple[Any, ...], how: Callable[[str], str]
) -> dict[str, Any]:
    """Return a copy of `document` with the string (or key) at `path` changed."""
    changed = copy.deepcopy(document)
    parent: Any = changed
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if isinstance(last, tuple):
        name = last[1]
        parent[how(name)] = parent.pop(name)
    else:
        parent[last] = how(parent[last])
    return changed


def _every_string(value: Any, how: Callable[[str], str]) -> Any:
    """Return `value` with every string, and every user-chosen key, changed."""
    if isinstance(value, str):
        return how(value)
    if isinstance(value, list):
        return [_every_string(item, how) for item in value]
    if isinstance(value, dict):
        return {key: _every_string(item, how) for key, item in value.items()}
    return value


class Hostile:
    """Puts values under the key and checks what the sidecar made of each."""

    def __init__(
        self, stack: SidecarStack, operator: Operator, base: dict[str, Any]
    ) -> None:
        self.stack = stack
        self.operator = operator
        self.base = base
        self.outcomes: dict[str, int] = {}
        self.slowest = 0.0

    async def put(self, value: bytes, within: float = 30) -> ApplyResult:
        """Put `value`, wait for its result, and check the invariants."""
        config_dir = self.stack.settings.config_dir
        before = read_installed(config_dir)
        started = time.monotonic()
        revision = await self.operator.put(value)
        result = await self.stack.wait_revision(revision, within=within)
        took = time.monotonic() - started
        self.slowest = max(self.slowest, took)
        self.outcomes[result.outcome] = self.outcomes.get(result.outcome, 0) + 1
        assert result.outcome in OUTCOMES, result
        if result.outcome in CHANGED:
            await check(config_dir)
        else:
            assert read_installed(config_dir) == before, result
        assert self.stack.task is not None
        assert not self.stack.task.done()
        return result

    async def served(self) -> None:
        """a.test is still answered by backend a."""
        answer = await self.stack.get("a.test")
        assert answer.status == 200, answer.text
        assert answer.json["backend"] == "a"


@pytest.fixture
async def hostile(
    sidecar_stack: SidecarStackFactory,
    nats_server: EmbeddedNats,
    operator_kv: OperatorFactory,
    echo_backends: EchoBackends,
) -> AsyncIterator[Hostile]:
    """A sidecar serving the base document, and a way to put values at it."""
    backend = echo_backends.start("a")
    stack = await sidecar_stack()
    async with operator_kv(nats_server.url) as operator:
        checker = Hostile(stack, operator, _base(backend.port))
        result = await checker.put(json.dumps(checker.base).encode())
        assert result.outcome == "applied", result
        yield checker
        await checker.served()


async def test_rejected_documents_are_refused_whole(hostile: Hostile) -> None:
    """Every shared rejected document is refused, naming the field at fault."""
    for case in REJECTED["cases"]:
        result = await hostile.put(case["value"].encode())
        assert result.outcome == "refused", case["name"]
        assert case["error_contains"] in result.error, case["name"]
    assert hostile.slowest < 10


async def test_large_values_cost_bounded_time_and_memory(hostile: Hostile) -> None:
    """Values of 1 MiB and more are refused or applied in bounded time and memory."""
    memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    megabyte = 1024 * 1024
    await hostile.put(b"\xff" * megabyte)
    await hostile.put(b"[" * (4 * megabyte))
    long_id = copy.deepcopy(hostile.base)
    long_id["Routes"][0]["RouteId"] = "r" * (4 * megabyte)
    assert (await hostile.put(json.dumps(long_id).encode())).outcome == "refused"
    started = time.monotonic()
    result = await hostile.put(b" " * (MAX_DOCUMENT_BYTES + 1))
    assert result.outcome == "refused"
    assert time.monotonic() - started < 5
    many = _many_routes(hostile.base, megabyte)
    assert (await hostile.put(many, within=60)).outcome == "applied"
    answer = await hostile.stack.get("h7.example.test")
    assert answer.json["backend"] == "a"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory_before
    assert grown < 600 * 1024, f"the test process grew by {grown // 1024} MiB"
    assert hostile.slowest < 60


def _many_routes(base: dict[str, Any], size: int) -> bytes:
    """A valid document of at least `size` bytes: the base plus many host routes."""
    document = copy.deepcopy(base)
    routes = document["Routes"]
    index = 0
    while len(json.dumps(document)) < size:
        for _ in range(500):
            routes.append(
                {
                    "RouteId": f"h{index}",
                    "ClusterId": "web",
                    "Match": {"Hosts": [f"h{index}.example.test"]},
                }
            )
            index += 1
    return json.dumps(document).encode()


async def test_deep_nesting_and_invalid_utf8_are_refused(hostile: Hostile) -> None:
    """Deeply nested JSON and bytes that are not UTF-8 are refused, quickly."""
    deep = 200_000
    assert (await hostile.put(b"[" * deep + b"]" * deep)).outcome == "refused"
    nested: Any = "leaf"
    for _ in range(900):
        nested = {"n": nested}
    document = copy.deepcopy(hostile.base)
    document["Routes"][0]["Metadata"]["Deep"] = nested
    await hostile.put(json.dumps(document).encode())
    text = json.dumps(hostile.base).encode()
    for broken in (b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"):
        value = text.replace(b'"site"', b'"si' + broken + b'te"')
        result = await hostile.put(value)
        assert result.outcome == "refused"
        assert "UTF-8" in result.error
    assert hostile.slowest < 10


@pytest.mark.parametrize("how", ["replace", "append"])
async def test_every_string_field_at_once(hostile: Hostile, how: str) -> None:
    """Each hostile text in every string field and name at once never gets past -c."""
    base = hostile.base
    for text in HOSTILE:

        def change(value: str, text: str = text) -> str:
            return text if how == "replace" else value + text

        await hostile.put(json.dumps(_every_string(base, change)).encode())
    assert hostile.slowest < 10


async def test_each_string_field_in_turn(hostile: Hostile) -> None:
    """Every hostile piece appended to one field at a time never gets past -c."""
    base = hostile.base
    paths = list(_leaves(base))
    assert len(paths) > 20
    for path in paths:
        changed = _change(base, path, lambda value: value + NASTY)
        await hostile.put(json.dumps(changed).encode())
    assert hostile.outcomes.get("refused", 0) > 0
    assert hostile.outcomes.get("applied", 0) > 1  # the base, and some changes
    assert hostile.slowest < 10


async def test_refusal_of_a_huge_value_is_a_short_line(hostile: Hostile) -> None:
    """The error (and log line) for a refused 1 MiB host name stays under 4 KiB."""
    document = copy.deepcopy(hostile.base)
    document["Routes"][0]["Match"]["Hosts"] = ["a.test\n" + "b" * 1024 * 1024]
    result = await hostile.put(json.dumps(document).encode())
    assert result.outcome == "refused"
    assert len(result.error) <= MAX_ERROR, f"{len(result.error)} characters"
    assert "Routes[0].Match.Hosts[0]" in result.error
    assert "(1048583 characters)" in result.error


async def test_refusal_of_huge_names_and_many_values_is_a_short_line(
    hostile: Hostile,
) -> None:
    """Huge user-chosen names and thousands of bad values still make a short line."""
    document = copy.deepcopy(hostile.base)
    cluster = document["Clusters"][0]
    cluster["Destinations"]["d" * 1024 * 1024] = {"Address": "ftp://x"}
    cluster["Metadata"]["m" * 1024 * 1024] = "v"
    document["Routes"][1]["Match"]["Methods"] = ["G E T"] * 10_000
    result = await hostile.put(json.dumps(document).encode())
    assert result.outcome == "refused"
    assert len(result.error) <= MAX_ERROR, f"{len(result.error)} characters"
    assert "more problems" in result.error
