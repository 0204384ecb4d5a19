"""Tests of the embedded nats-server, started for real on loopback ports."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import nats
import pytest

from momus_haproxy.errors import ProcessError
from momus_haproxy.nats_server import EmbeddedNats, find_nats_server, free_port
from tests.support.nats import OperatorFactory


def _alive(pid: int) -> bool:
    """Say whether a process with `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_find_nats_server_prefers_the_venv_binary() -> None:
    """The binary next to the running Python wins over anything on PATH."""
    expected = Path(sys.executable).parent / "nats-server"

    assert find_nats_server() == str(expected)


def test_free_port_can_be_bound() -> None:
    """A port from free_port() can be listened on right away."""
    port = free_port()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:4222", "nats://", "nats://127.0.0.1:port"],
    ids=["wrong-scheme", "no-host", "bad-port"],
)
def test_a_url_that_is_not_nats_is_refused(url: str, tmp_path: Path) -> None:
    """A listen URL that nats-server could not use is a ProcessError quoting it."""
    with pytest.raises(ProcessError, match="nats://"):
        EmbeddedNats(url, tmp_path)


async def test_start_serves_jetstream_and_aclose_stops_the_pid(tmp_path: Path) -> None:
    """The started server answers JetStream requests and is gone after aclose()."""
    url = f"nats://127.0.0.1:{free_port()}"

    async with EmbeddedNats(url, tmp_path) as server:
        pid = server.pid
        assert pid is not None
        assert _alive(pid)
        client = await nats.connect(url)
        info = await client.jetstream().account_info()
        await client.close()

    assert info.limits is not None
    assert not _alive(pid)
    assert server.pid is None
    assert b"Server is ready" in (tmp_path / "nats-server.log").read_bytes()


async def test_restart_keeps_streams_and_port(
    nats_server: EmbeddedNats, operator_kv: OperatorFactory
) -> None:
    """A restarted server listens on the same URL and still holds its buckets."""
    async with operator_kv(nats_server.url) as operator:
        await operator.put(b"kept")
    old_pid = nats_server.pid

    await nats_server.stop()
    await nats_server.start()

    assert nats_server.pid != old_pid
    async with operator_kv(nats_server.url) as operator:
        entry = await (await operator.kv()).get("route-config")
    assert entry.value == b"kept"


async def test_a_busy_port_fails_naming_the_log_file(tmp_path: Path) -> None:
    """A server that cannot listen raises a ProcessError that names its log."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = EmbeddedNats(f"nats://127.0.0.1:{port}", tmp_path)

        with pytest.raises(ProcessError, match=r"nats-server\.log") as caught:
            await server.start()

    assert "address already in use" in str(caught.value)
    assert not server.running


async def test_a_server_that_is_never_ready_is_stopped(tmp_path: Path) -> None:
    """When the ready line does not come in time, start() fails and stops it."""
    url = f"nats://127.0.0.1:{free_port()}"
    server = EmbeddedNats(url, tmp_path, ready_timeout=0.0)

    with pytest.raises(ProcessError, match="was not ready within 0 s"):
        await server.start()

    await asyncio.sleep(0)
    assert not server.running
