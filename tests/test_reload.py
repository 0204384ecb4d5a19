"""Reloading HAProxy through its master socket, against a real HAProxy 2.6."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from momus_haproxy.check import check
from momus_haproxy.errors import ReloadError
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.reload import MasterSocket, ProcState
from tests.support.echo import EchoBackends, free_port, http_request, read_response
from tests.support.haproxy import HAProxyRunner, simple_config

SHOW_PROC = """\
#<PID>          <type>          <reloads>       <uptime>        <version>      
3075            master          2 [failed: 1]   1d02h03m04s     2.6.12-1+deb12u4
# workers
3200            worker          0               0d00h00m00s     2.6.12-1+deb12u4
# old workers
3078            worker          1               0d00h00m05s     2.6.12-1+deb12u4
3077            worker          2               0d00h00m09s     2.6.12-1+deb12u4
# programs

"""  # noqa: W291 - HAProxy pads the header line with spaces


class TestShowProc:
    """Reading the master's `show proc` answer."""

    def test_master_line_gives_pid_reloads_and_failed_count(self) -> None:
        """The master line yields its pid, reload count and failed-reload count."""
        state = ProcState.parse(SHOW_PROC)

        assert (state.master_pid, state.reloads, state.failed_reloads) == (3075, 2, 1)
        assert state.master.version == "2.6.12-1+deb12u4"
        assert state.master.uptime_seconds == 93784

    def test_workers_and_old_workers_are_told_apart(self) -> None:
        """Current and old workers come from their own sections."""
        state = ProcState.parse(SHOW_PROC)

        assert state.worker_pids == (3200,)
        assert state.old_worker_pids == (3078, 3077)
        assert [worker.reloads for worker in state.old_workers] == [1, 2]

    def test_an_answer_without_master_is_an_error(self) -> None:
        """An answer with no master line raises ReloadError quoting it."""
        with pytest.raises(ReloadError, match="Unknown command"):
            ProcState.parse("Unknown command.\n")


async def start_haproxy(
    config_dir: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> tuple[int, HAProxyProcess]:
    """Start an echo backend and HAProxy in front of it; return port and process."""
    backend = echo_backends.start("app")
    port = free_port()
    simple_config(config_dir, listen_port=port, server_port=backend.port)
    process = await haproxy_runner(config_dir)
    return port, process


async def get(port: int, path: str = "/") -> int:
    """Send a GET through HAProxy from a thread; return the status."""
    response = await asyncio.to_thread(http_request, port, "GET", "app.test", path)
    return response.status


async def test_reload_is_confirmed_by_a_new_worker(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """A reload returns once a worker that did not exist before is current."""
    port, process = await start_haproxy(tmp_path, echo_backends, haproxy_runner)
    master = process.master()

    async with master:
        before = await master.show_proc()
        result = await master.reload()
        after = await master.show_proc()

    assert result.old_pids == before.worker_pids
    assert result.new_pids == after.worker_pids
    assert not set(result.new_pids) & set(result.old_pids)
    assert after.reloads == before.reloads + 1
    assert result.duration < 5
    assert await get(port) == 200


async def test_reload_that_cannot_bind_keeps_the_old_worker(
    tmp_path: Path,
    echo_backends: EchoBackends,
    haproxy_runner: HAProxyRunner,
    haproxy_bin: str,
) -> None:
    """A taken port fails a reload that `-c` passed; the old worker serves on."""
    config_dir = tmp_path / "live"
    port, process = await start_haproxy(config_dir, echo_backends, haproxy_runner)
    master = process.master()
    before = await master.show_proc()
    good = (config_dir / "haproxy.cfg").read_text(encoding="utf-8")

    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        bad = good.replace(
            f"bind 127.0.0.1:{port}\n",
            f"bind 127.0.0.1:{port}\n    bind 127.0.0.1:{taken}\n",
        )
        (config_dir / "haproxy.cfg").write_text(bad, encoding="utf-8")
        await check(config_dir, haproxy_bin=haproxy_bin)

        with pytest.raises(
            ReloadError, match=r"counted the reload as failed \(failed reloads 0 -> 1\)"
        ):
            await master.reload()

    after = await master.show_proc()
    assert after.worker_pids == before.worker_pids
    assert after.failed_reloads == 1
    assert await get(port) == 200
    assert "cannot bind socket" in process.log_tail()

    (config_dir / "haproxy.cfg").write_text(good, encoding="utf-8")
    await master.reload()
    assert (await master.show_proc()).failed_reloads == 0


class Traffic:
    """Two client threads sending requests until stopped, counting every failure.

    One keeps a keep-alive connection open and never retries a request; the
    other opens a new connection for every request.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.done = threading.Event()
        self.successes = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._keep_alive, daemon=True),
            threading.Thread(target=self._new_connections, daemon=True),
        ]

    @contextlib.contextmanager
    def running(self) -> Iterator[Traffic]:
        """Run both clients for the duration of the `with` block."""
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self.done.set()
            for thread in self._threads:
                thread.join(timeout=10)

    def _count(self, status: int | None, error: str = "") -> None:
        """Count one request's outcome."""
        with self._lock:
            if status == 200:
                self.successes += 1
            else:
                self.failures.append(error or f"status {status}")

    def _keep_alive(self) -> None:
        """Send requests over one connection, reopened only when HAProxy closes it."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.done.is_set():
            try:
                connection.request("GET", "/keep-alive", headers={"Host": "app.test"})
                self._count(read_response(connection.getresponse()).status)
            except (OSError, http.client.HTTPException) as exc:
                self._count(None, f"keep-alive: {exc!r}")
                connection.close()
        connection.close()

    def _new_connections(self) -> None:
        """Send requests, each on a new connection."""
        while not self.done.is_set():
            try:
                self._count(http_request(self.port, "GET", "app.test", "/new").status)
            except (OSError, http.client.HTTPException) as exc:
                self._count(None, f"new connection: {exc!r}")


@pytest.mark.slow
async def test_requests_keep_succeeding_across_reloads(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """Twenty reloads under keep-alive and new-connection traffic lose no request."""
    port, process = await start_haproxy(tmp_path, echo_backends, haproxy_runner)
    master = process.master()
    workers: set[int] = set()

    with Traffic(port).running() as traffic:
        for _ in range(20):
            result = await master.reload()
            workers.update(result.new_pids)
            await asyncio.sleep(0.05)

    assert traffic.failures == []
    assert traffic.successes > 100
    assert len(workers) == 20


async def test_worker_command_reaches_the_current_worker(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """`worker_command` talks to the current worker's runtime API."""
    _, process = await start_haproxy(tmp_path, echo_backends, haproxy_runner)
    master = process.master()

    state = await master.show_proc()
    info = await master.worker_command("show info")
    servers = await master.worker_command("show servers state app")

    assert f"Pid: {state.worker_pids[0]}" in info
    assert " app 1 s1 127.0.0.1 " in servers


async def test_command_retries_until_the_socket_answers(tmp_path: Path) -> None:
    """A command sent before the socket exists is retried until it answers."""
    path = tmp_path / "master.sock"

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer like the master: only after the client has half-closed."""
        line = await reader.read()
        writer.write(b"got " + line)
        await writer.drain()
        writer.close()

    async def serve_later() -> asyncio.Server:
        """Start listening after a moment, as a re-executing master does."""
        await asyncio.sleep(0.3)
        return await asyncio.start_unix_server(answer, path)

    server_task = asyncio.create_task(serve_later())
    answer_text = await MasterSocket(path, retry_for=5).command("show proc")
    server = await server_task
    server.close()
    await server.wait_closed()

    assert answer_text == "got show proc\n"


async def test_unreachable_socket_fails_within_the_retry_bound(tmp_path: Path) -> None:
    """A socket that never answers raises ReloadError naming it, after `retry_for`."""
    path = tmp_path / "absent.sock"
    started = time.monotonic()

    with pytest.raises(
        ReloadError, match=r"cannot reach HAProxy's master socket '.*absent\.sock'"
    ):
        await MasterSocket(path, retry_for=0.3).show_proc()

    assert 0.3 <= time.monotonic() - started < 2


async def test_closed_client_and_multi_line_commands_are_refused(
    tmp_path: Path,
) -> None:
    """A two-line command is refused, and so is any command to a closed client."""
    master = MasterSocket(tmp_path / "master.sock")

    with pytest.raises(ReloadError, match="one line"):
        await master.command("show proc\nreload")
    await master.aclose()
    with pytest.raises(ReloadError, match="is closed"):
        await master.command("show proc")
