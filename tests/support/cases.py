"""Run the shared cases (`tests/cases/*`) against a real HAProxy.

A case is a routing document plus `expect.json`: the echo backends to start,
and requests with what their answers must show (see `tests/cases/README.md`).
`prepare_case` starts the backends and rewrites the document's ports;
`check_requests` sends the requests and asserts the expectations.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.echo import EchoBackend, EchoBackends, Response, http_request

CASES = Path(__file__).parent.parent / "cases"
SERVED_CASES = sorted(
    p.name for p in CASES.iterdir() if p.is_dir() and p.name != "rejected-documents"
)

__all__ = ["CASES", "SERVED_CASES", "Case", "check_requests", "prepare_case"]


@dataclass
class Case:
    """A case ready to run: its document with real ports, and its backends."""

    name: str
    document: bytes
    expect: dict[str, Any]
    backends: dict[str, EchoBackend]


def prepare_case(name: str, echo_backends: EchoBackends) -> Case:
    """Start the case's echo backends and point its document at them."""
    expect = json.loads((CASES / name / "expect.json").read_text())
    text = (CASES / name / "route-config.json").read_text()
    rules = expect.get("backend_rules", {})
    backends = {}
    for port, backend_name in expect.get("backends", {}).items():
        backend = echo_backends.start(backend_name, rules=rules.get(backend_name))
        backends[backend_name] = backend
        text = re.sub(
            rf"(127\.0\.0\.1|localhost):{port}\b", rf"\g<1>:{backend.port}", text
        )
    return Case(name, text.encode(), expect, backends)


def check_requests(case: Case, port: int, *, deadline: float = 0.0) -> None:
    """Send every request of the case to HAProxy on `port` and check the answers.

    With `deadline` (a `time.monotonic()` value), each request is retried
    until it passes or the deadline is reached, for use right after an apply.
    """
    seen: dict[str, set[str]] = {}
    started = time.monotonic()
    for number, item in enumerate(case.expect["requests"]):
        wait = item.get("after_seconds", 0) - (time.monotonic() - started)
        if wait > 0:
            time.sleep(wait)
        while True:
            try:
                answer = _send(item["request"], port)
                _assert_answer(case, item["expect"], answer, seen)
                break
            except AssertionError as exc:
                if time.monotonic() >= deadline:
                    raise AssertionError(
                        f"{case.name} request {number}: {exc}"
                    ) from exc
                time.sleep(0.05)
    if case.name == "multi-site":
        assert seen.get("/cart", set()) == {"s1", "s2"}, "round robin missed one"


def _send(request: dict[str, Any], port: int) -> Response:
    return http_request(
        port, request["method"], request["host"], request["path"], timeout=5
    )


def _assert_answer(
    case: Case, expect: dict[str, Any], answer: Response, seen: dict[str, set[str]]
) -> None:
    body = answer.json if isinstance(answer.json, dict) else {}
    assert answer.status == expect.get("status", answer.status), answer.text
    if "backend" in expect:
        assert body.get("backend") == expect["backend"], body
    if "backend_in" in expect:
        assert body.get("backend") in expect["backend_in"], body
        seen.setdefault(body.get("path", "").split("?")[0], set()).add(body["backend"])
    if "location" in expect:
        assert answer.headers.get("location") == expect["location"]
    for name, value in expect.get("headers", {}).items():
        assert answer.headers.get(name) == value, answer.headers
    upstream = expect.get("upstream", {})
    if "path" in upstream:
        assert body.get("path") == upstream["path"], body
    for name, value in upstream.get("headers", {}).items():
        assert body.get("headers", {}).get(name) == value, body
    for backend_name, host in expect.get("upstream_host_by_backend", {}).items():
        if body.get("backend") == backend_name:
            port = case.backends[backend_name].port
            wanted = re.sub(r":\d+$", f":{port}", host)
            assert body["headers"]["host"] == wanted, body
