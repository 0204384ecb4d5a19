"""Reloads under load: the scaled-down load check, and connections across a reload.

The full check is `bench/load_check.py` (see RELIABILITY.md); here it runs
with fewer changes and a small `mworker-max-reloads`, so that the bound on old
workers is reached within the run too.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from momus_haproxy.document import parse_document
from momus_haproxy.nats_server import EmbeddedNats, free_port
from momus_haproxy.render import RenderSettings, render
from tests.support.nats import OperatorFactory
from tests.support.sidecar import SidecarStack, SidecarStackFactory

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "load_check.py"


def _bench() -> ModuleType:
    """Import bench/load_check.py, which is a script rather than a package module."""
    spec = importlib.util.spec_from_file_location("load_check", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("load_check", module)
    spec.loader.exec_module(module)
    return module


load_check = _bench()


@pytest.fixture
async def backend_port() -> AsyncIterator[int]:
    """Run the load check's echo backend (plain, slow and websocket) on a port."""
    port = free_port()
    process = await load_check.start_backend("ws", port)
    try:
        yield port
    finally:
        await load_check.stop_process(process)


def test_scaled_down_load_check(tmp_path: Path) -> None:
    """Route changes under wrk, hey, slow requests and websockets cost no request."""
    figures = tmp_path / "figures.json"
    command = [
        sys.executable, str(BENCH), "--changes", "32", "--slow", "3",
        "--slow-seconds", "0.8", "--ws-lifetime", "2", "--max-reloads", "16",
        "--wrk-connections", "8", "--hey-rate", "25", "--max-seconds", "120",
        "--json", str(figures),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(figures.read_text())
    assert report["requests_failed"] == 0
    assert report["wrk_requests"] > 0
    assert report["hey_requests"] > 0
    assert report["slow_ok"] == 3
    assert report["reloads"] >= report["changes_needing_reload"] >= 20
    assert len(report["master_pids"]) == 1
    assert report["ws_ended_on_old_worker"] == report["ws_spanning_reload"] > 0
    assert report["max_old_workers"] <= 16
    assert report["pinned_cut"] > 0
    assert not report["pinned_unexpected"]


def test_old_workers_are_bounded_by_default() -> None:
    """The rendered global section bounds old workers, by reloads and by time."""
    empty = parse_document(b'{"Routes": [], "Clusters": []}')
    config = render(empty, RenderSettings()).config
    assert "\n    mworker-max-reloads 50\n" in config
    assert "\n    hard-stop-after 5m\n" in config
    bounded = render(empty, RenderSettings(max_reloads=7)).config
    assert "\n    mworker-max-reloads 7\n" in bounded


def _document(port: int, policy: str) -> bytes:
    route = {
        "RouteId": "ws",
        "ClusterId": "ws",
        "Match": {"Hosts": [load_check.HOST], "Path": "{**catch-all}"},
    }
    cluster = {
        "ClusterId": "ws",
        "LoadBalancingPolicy": policy,
        "Destinations": {"d": {"Address": f"http://127.0.0.1:{port}"}},
    }
    return json.dumps({"Routes": [route], "Clusters": [cluster]}).encode()


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[str, dict[str, str]]:
    """Send a GET on an open keep-alive connection; return status line and headers."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {load_check.HOST}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0], headers


async def _old_workers(stack: SidecarStack) -> tuple[int, ...]:
    return (await stack.master.show_proc()).old_worker_pids


async def test_connections_survive_a_reload_and_end_on_the_old_worker(
    sidecar_stack: SidecarStackFactory,
    nats_server: EmbeddedNats,
    operator_kv: OperatorFactory,
    backend_port: int,
) -> None:
    """A keep-alive connection and a websocket open at a reload stay on the old worker.

    The keep-alive connection's next request is answered by the old worker,
    with `Connection: close`; the websocket keeps echoing through it; once both
    end, the old worker exits.
    """
    stack = await sidecar_stack()
    async with operator_kv(nats_server.url) as operator:
        revision = await operator.put(_document(backend_port, "RoundRobin"))
        assert (await stack.wait_revision(revision)).outcome == "applied"
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        status, _ = await _get(reader, writer, "/first")
        assert status.startswith("HTTP/1.1 200")
        client_port = writer.get_extra_info("sockname")[1]
        websocket = await load_check.WebSocket.connect(stack.port)
        await websocket.echo("before")
        worker = load_check.connection_owner(stack.port, client_port)
        assert worker in (await stack.master.show_proc()).worker_pids

        revision = await operator.put(_document(backend_port, "LeastRequests"))
        assert (await stack.wait_revision(revision)).outcome == "applied"

    assert worker in await _old_workers(stack)
    assert load_check.connection_owner(stack.port, websocket.local_port) == worker
    await websocket.echo("after")
    status, headers = await _get(reader, writer, "/second")
    assert status.startswith("HTTP/1.1 200")
    assert headers.get("connection") == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await websocket.close()
    deadline = time.monotonic() + 10
    while worker in await _old_workers(stack):
        assert time.monotonic() < deadline, "the old worker did not exit"
        await asyncio.sleep(0.1)
