"""Faults: the last good routes keep serving, and the sidecar recovers by itself.

Each test breaks one thing under a running sidecar and a real HAProxy, with a
client sending a request every 20 ms to a host of the last good document:

- while the fault lasts, HAProxy keeps serving that document (no failed
  request, except where HAProxy itself is down);
- once the fault clears, the newest revision is served within `RECOVERY`
  seconds, with nobody's help.

With `MOMUS_RELIABILITY_REPORT=FILE` set, each test appends its figures
(requests sent and failed, recovery time) to FILE as one JSON line; the table
in RELIABILITY.md is made from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from momus_haproxy import sidecar as sidecar_module
from momus_haproxy.errors import ReloadError
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install, read_installed
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.reload import MasterSocket, ProcState
from momus_haproxy.render import RenderSettings
from momus_haproxy.sidecar import (
    RELOAD_ATTEMPTS,
    LastGood,
    SidecarSettings,
    initial_files,
)
from momus_haproxy.watch import CLOSED, _pause
from tests.support.echo import EchoBackends, free_port, http_request
from tests.support.haproxy import HAProxyRunner, simple_config
from tests.support.nats import OperatorFactory, open_operator
from tests.support.sidecar import SidecarStack, SidecarStackFactory, sites_document

RECOVERY = 10.0
"""Seconds within which the newest revision must be served after a fault clears."""

PRODUCTION = {"retry_delay": 2.0}
"""The sidecar's own retry delay, rather than the shorter one of the fixture."""


def _record(scenario: str, **figures: Any) -> None:
    """Append this scenario's figures to the report file, when one is asked for."""
    path = os.environ.get("MOMUS_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as report:
            report.write(json.dumps({"scenario": scenario, **figures}) + "\n")


class Prober:
    """Sends a GET through HAProxy every 20 ms from a thread, and counts failures.

    A request fails when it errors or is not answered 200 by `backend`.
    `pause()` marks the start of a period when failures are expected (HAProxy
    itself down); those are counted apart.
    """

    def __init__(self, port: int, host: str, backend: str) -> None:
        self.port, self.host, self.backend = port, host, backend
        self.sent = 0
        self.failures: list[str] = []
        self.expected_failures = 0
        self.expecting = False
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            problem = self._probe()
            if problem:
                problem = f"{time.monotonic() - self.started:.2f} s: {problem}"
            self.sent += 1
            if problem and self.expecting:
                self.expected_failures += 1
            elif problem:
                self.failures.append(problem)
            self._stop.wait(0.02)

    def _probe(self) -> str:
        try:
            answer = http_request(self.port, "GET", self.host, "/", timeout=5)
        except OSError as exc:
            return repr(exc)
        body = answer.json if isinstance(answer.json, dict) else {}
        if answer.status != 200 or body.get("backend") != self.backend:
            return f"{answer.status} {answer.text[:80]!r}"
        return ""


async def _served_within(
    port: int, host: str, backend: str, within: float = RECOVERY
) -> float:
    """Wait until `host` is answered by `backend`; return how long it took."""
    started = time.monotonic()
    while True:
        with contextlib.suppress(OSError):
            answer = await asyncio.to_thread(
                http_request, port, "GET", host, "/", timeout=2
            )
            body = answer.json if isinstance(answer.json, dict) else {}
            if answer.status == 200 and body.get("backend") == backend:
                return time.monotonic() - started
        waited = time.monotonic() - started
        assert waited < within, f"{host} not served by {backend} within {within} s"
        await asyncio.sleep(0.05)


async def _status(port: int, host: str) -> int:
    """The status HAProxy answers for `host` now."""
    answer = await asyncio.to_thread(http_request, port, "GET", host, "/")
    return answer.status


async def _consumers_settle(operator: Any, within: float = RECOVERY) -> int:
    """Wait until the bucket's stream has at most one consumer; return the count."""
    deadline = time.monotonic() + within
    count = await operator.consumer_count()
    while count > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        count = await operator.consumer_count()
    return int(count)


class SidecarProcess:
    """`momus-haproxy run` in sidecar mode as a process of its own."""

    def __init__(self, args: list[str], log: Path) -> None:
        command = [sys.executable, "-c", "from momus_haproxy.cli import main; main()"]
        self.log = log
        with log.open("ab") as stream:
            self.process = subprocess.Popen(
                [*command, "run", *args],
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=stream,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, then reap."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(15)

    def stop(self) -> None:
        """SIGTERM, then reap (SIGKILL if it does not end)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def text(self) -> str:
        """What the process logged so far."""
        return self.log.read_text(errors="replace")


SidecarProcessFactory = Callable[..., SidecarProcess]


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[SidecarProcessFactory]:
    """Start `momus-haproxy run` processes; stop each by its pid afterwards."""
    started: list[SidecarProcess] = []

    def start(
        nats_url: str, settings: SidecarSettings, master_socket: Path | str
    ) -> SidecarProcess:
        args = [
            f"--nats-url={nats_url}",
            f"--config-dir={settings.config_dir}",
            f"--data-dir={settings.data_dir}",
            f"--master-socket={master_socket}",
            f"--http-bind={settings.render.http_bind}",
            "--stats-bind=",
            "--health-bind=",
        ]
        process = SidecarProcess(args, tmp_path / f"sidecar-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


class TestNats:
    """NATS goes away and comes back."""

    async def test_nats_restarted_five_times_in_a_row(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """After each of five restarts a put is served in time; one consumer is left."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack(**PRODUCTION)
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
        recoveries = []
        with Prober(stack.port, "a.test", "a") as prober:
            for cycle in range(5):
                await nats_server.stop()
                await asyncio.sleep(0.3)
                await nats_server.start()
                started = time.monotonic()
                host = f"b{cycle}.test"
                async with operator_kv(nats_server.url) as operator:
                    await operator.put(
                        sites_document(("a.test", a.port), (host, b.port))
                    )
                    await _served_within(stack.port, host, "b")
                    recoveries.append(time.monotonic() - started)
            async with operator_kv(nats_server.url) as operator:
                consumers = await _consumers_settle(operator)
        _record(
            "NATS stopped and restarted 5 times",
            sent=prober.sent,
            failed=len(prober.failures),
            recovery_s=round(max(recoveries), 2),
            consumers=consumers,
        )
        assert prober.failures == []
        assert max(recoveries) < RECOVERY
        assert consumers <= 1

    async def test_nats_unreachable_at_start_up(
        self,
        tmp_path: Path,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
        haproxy_runner: HAProxyRunner,
        sidecar_process: SidecarProcessFactory,
    ) -> None:
        """`run` started while NATS is down serves the last good, then catches up."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        settings = _settings(tmp_path)
        haproxy = await _haproxy(settings, haproxy_runner)
        first = sidecar_process(nats_server.url, settings, haproxy.master_socket)
        async with operator_kv(nats_server.url) as operator:
            revision = await operator.put(sites_document(("a.test", a.port)))
        await _recorded(settings, revision)
        first.stop()
        await nats_server.stop()

        with Prober(_port(settings), "a.test", "a") as prober:
            second = sidecar_process(nats_server.url, settings, haproxy.master_socket)
            await asyncio.sleep(2)
            assert second.process.poll() is None, second.text()
            await nats_server.start()
            started = time.monotonic()
            async with operator_kv(nats_server.url) as operator:
                await operator.put(
                    sites_document(("a.test", a.port), ("b.test", b.port))
                )
            recovery = await _served_within(_port(settings), "b.test", "b")
        _record(
            "NATS unreachable when the sidecar starts",
            sent=prober.sent,
            failed=len(prober.failures),
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert prober.failures == []
        assert recovery < RECOVERY

    async def test_start_up_without_record_keeps_the_served_routes(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Started with NATS down and no last good record, HAProxy keeps its routes.

        This is a sidecar whose data directory is not kept across restarts,
        or one killed after a reload and before it recorded the revision: the
        live files passed `haproxy -c` when they were installed, and are all
        there is to serve until NATS answers.
        """
        a = echo_backends.start("a")
        stack = await sidecar_stack(**PRODUCTION)
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
        await stack.stop_sidecar()
        await nats_server.stop()
        (stack.settings.data_dir / "last-good.json").unlink()
        with Prober(stack.port, "a.test", "a") as prober:
            await stack.start_sidecar()
            await asyncio.sleep(2)
        assert prober.failures == []

    async def test_embedded_nats_killed_in_standalone_mode(
        self, echo_backends: EchoBackends
    ) -> None:
        """Standalone mode starts its nats-server again after SIGKILL and follows on."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        async with _standalone() as (port, nats_url, _, process):
            async with open_operator(nats_url) as operator:
                await operator.put(sites_document(("a.test", a.port)))
            await _served_within(port, "a.test", "a")
            (nats_pid,) = _children(process.pid, named="nats-server")
            os.kill(nats_pid, signal.SIGKILL)
            started = time.monotonic()
            second = sites_document(("a.test", a.port), ("b.test", b.port))
            await _put_when_nats_answers(nats_url, second)
            recovery = await _served_within(port, "b.test", "b")
            assert await _status(port, "a.test") == 200
        _record(
            "embedded nats-server killed (standalone mode)",
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert recovery < RECOVERY

    async def test_bucket_deleted_and_created_again(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A deleted bucket keeps the routes; its new first revision is served."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack(**PRODUCTION)
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
        with Prober(stack.port, "a.test", "a") as prober:
            async with operator_kv(nats_server.url) as operator:
                await operator.delete_bucket()
                await asyncio.sleep(1)
                await operator.kv(create=True)
                started = time.monotonic()
                revision = await operator.put(
                    sites_document(("a.test", a.port), ("b.test", b.port))
                )
                recovery = await _served_within(stack.port, "b.test", "b")
                consumers = await _consumers_settle(operator)
        _record(
            "bucket deleted and created again",
            sent=prober.sent,
            failed=len(prober.failures),
            recovery_s=round(time.monotonic() - started, 2),
            consumers=consumers,
        )
        assert revision == 1
        assert prober.failures == []
        assert recovery < RECOVERY
        assert consumers <= 1


class TestCancellation:
    """A sidecar told to stop stops, whatever it was waiting for.

    On Python 3.11 `asyncio.wait_for` returns the result of an awaitable that
    completes as the task is cancelled, and the cancellation is lost: a
    sidecar's loop then goes on, and its shutdown waits forever. Both waits
    below once went through `wait_for`; the cancellation is made to arrive
    exactly as the awaited thing completes.
    """

    async def test_master_command_cancelled_as_its_answer_arrives(self) -> None:
        """A master command cancelled as its answer arrives ends cancelled."""
        master = MasterSocket("/nonexistent/master.sock")
        task: asyncio.Task[Any] | None = None

        async def answer(line: str) -> str:
            assert task is not None
            task.cancel()
            return "1 master 0 [failed: 0] 0d00h00m01s 2.6\n"

        master._converse = answer  # type: ignore[method-assign]
        task = asyncio.create_task(master.show_proc())
        with pytest.raises(asyncio.CancelledError):
            await task

    async def test_watch_pause_cancelled_as_a_signal_arrives(self) -> None:
        """The watch's pause, cancelled as a signal arrives, ends cancelled."""
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        task = asyncio.create_task(_pause(inbox, 5))
        await asyncio.sleep(0)

        def signal_and_cancel() -> None:
            inbox.put_nowait(CLOSED)
            task.cancel()

        asyncio.get_running_loop().call_soon(signal_and_cancel)
        with pytest.raises(asyncio.CancelledError):
            await task


class TestSidecarKilled:
    """The sidecar dies at the worst moment."""

    async def test_standalone_children_end_with_it(self) -> None:
        """SIGKILL of `run --standalone` leaves no nats-server or HAProxy behind.

        Orphans would hold the ports and the NATS store, and the next start
        would fail on them or open the store twice.
        """
        async with _standalone() as (_, _, _, process):
            children = _children(process.pid)
            assert len(children) == 2, children
            process.kill()
            deadline = time.monotonic() + RECOVERY
            while alive := [pid for pid in children if _alive(pid)]:
                assert time.monotonic() < deadline, f"children outlived it: {alive}"
                await asyncio.sleep(0.1)

    async def test_sigkill_between_install_and_reload(
        self,
        tmp_path: Path,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
        haproxy_runner: HAProxyRunner,
        sidecar_process: SidecarProcessFactory,
    ) -> None:
        """Killed after installing, before reloading: restarted, the sidecar catches up.

        The sidecar reaches HAProxy through a socket of the test, which kills
        it with SIGKILL as it sends `reload`: the new files are in place, and
        HAProxy still runs the previous ones.
        """
        a, b = echo_backends.start("a"), echo_backends.start("b")
        settings = _settings(tmp_path)
        haproxy = await _haproxy(settings, haproxy_runner)
        master_pid = haproxy.pid
        async with _KillOnReload(tmp_path / "trap.sock", haproxy.master_socket) as trap:
            first = sidecar_process(nats_server.url, settings, trap.path)
            async with operator_kv(nats_server.url) as operator:
                await operator.put(sites_document(("a.test", a.port)))
                await _served_within(_port(settings), "a.test", "a")
                trap.arm(first.pid)
                with Prober(_port(settings), "a.test", "a") as prober:
                    await operator.put(
                        sites_document(("a.test", a.port), ("b.test", b.port))
                    )
                    await asyncio.wait_for(trap.fired.wait(), RECOVERY)
                    first.process.wait(10)
                    assert first.process.returncode == -signal.SIGKILL
                    files = read_installed(settings.config_dir)
                    assert any("b.test" in text for text in files.values())
                    assert await _status(_port(settings), "b.test") == 404

                    started = time.monotonic()
                    sidecar_process(nats_server.url, settings, haproxy.master_socket)
                    recovery = await _served_within(_port(settings), "b.test", "b")
        _record(
            "sidecar SIGKILLed between install and reload",
            sent=prober.sent,
            failed=len(prober.failures),
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert prober.failures == []
        assert recovery < RECOVERY
        assert haproxy.pid == master_pid
        assert haproxy.returncode is None


class TestStartUp:
    """The sidecar started before HAProxy, as compose may start them."""

    async def test_waits_for_a_master_socket_that_is_not_there_yet(
        self,
        tmp_path: Path,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
        haproxy_bin: str,
        sidecar_process: SidecarProcessFactory,
    ) -> None:
        """Files go in first, HAProxy starts on them, and the sidecar then applies.

        The sidecar installs the start-up files into the empty config
        directory before waiting for the master socket, logs the wait at INFO
        (no ERROR), and applies a put once HAProxy answers.
        """
        a = echo_backends.start("a")
        settings = _settings(tmp_path)
        run_dir = Path(tempfile.mkdtemp(prefix="momus-"))
        haproxy = HAProxyProcess(settings.config_dir, run_dir, haproxy_bin=haproxy_bin)
        sidecar = sidecar_process(nats_server.url, settings, haproxy.master_socket)
        config = settings.config_dir / "haproxy.cfg"
        deadline = time.monotonic() + RECOVERY
        while not config.exists():
            assert time.monotonic() < deadline, sidecar.text()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        try:
            async with haproxy:
                async with operator_kv(nats_server.url) as operator:
                    await operator.put(sites_document(("a.test", a.port)))
                await _served_within(_port(settings), "a.test", "a")
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        text = sidecar.text()
        assert "does not answer yet" in text, text
        assert "ERROR" not in text, text


class TestStandaloneStartAndStop:
    """`run --standalone` refuses early and stops cleanly."""

    def test_taken_health_port_stops_it_before_anything_starts(
        self, tmp_path: Path
    ) -> None:
        """A taken --health-bind is one error line, before NATS or HAProxy run."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            health = f"127.0.0.1:{taken.getsockname()[1]}"
            process = SidecarProcess(
                _standalone_args(tmp_path / "d", health=health), tmp_path / "log"
            )
            assert process.process.wait(30) == 7
        text = process.text()
        assert "--health-bind" in text
        assert "started nats-server" not in text
        assert "Traceback" not in text

    def test_ctrl_c_to_the_process_group_stops_it_cleanly(self, tmp_path: Path) -> None:
        """Ctrl-C reaches the whole group; nats-server waits to be stopped last."""
        log = tmp_path / "log"
        command = [sys.executable, "-c", "from momus_haproxy.cli import main; main()"]
        with log.open("ab") as stream:
            process = subprocess.Popen(
                [*command, "run", *_standalone_args(tmp_path / "d")],
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=stream,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 20
            while "watching key" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            children = _children(process.pid)
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(30) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = log.read_text(errors="replace")
        assert "exited with status" not in text, text
        assert "stopped nats-server" in text
        assert not [pid for pid in children if _alive(pid)]


def _standalone_args(
    data: Path, *, nats_url: str = "", port: int = 0, health: str = ""
) -> list[str]:
    """`run --standalone` options on loopback (free ports unless given)."""
    nats_url = nats_url or f"nats://127.0.0.1:{free_port()}"
    return [
        "--standalone", f"--data-dir={data}", f"--nats-url={nats_url}",
        f"--http-bind=127.0.0.1:{port or free_port()}", "--stats-bind=",
        f"--health-bind={health}", "--status-bucket=",
    ]  # fmt: skip


class TestRetryPolicy:
    """How often a revision that may pass later is tried again."""

    async def test_refused_reloads_are_retried_a_few_times_with_growing_delay(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A refused reload is tried again after 0.5, 1 and 2 s, then no more.

        Each refused reload counts against the serving worker and pauses its
        listeners, so the sidecar gives up after `RELOAD_ATTEMPTS` in a row
        and waits for a newer revision, which the old worker serves meanwhile.
        """
        a = echo_backends.start("a")
        stack, taken, files = await _moved_to_taken_port(
            stack_factory=sidecar_stack,
            nats_server=nats_server,
            operator_kv=operator_kv,
            backend=a,
            echo_backends=echo_backends,
            retry_delay=0.5,
        )
        seen: list[float] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            failed = [r for r in stack.results if r.outcome == "reload_failed"]
            seen += [time.monotonic()] * (len(failed) - len(seen))
            if seen and time.monotonic() - seen[-1] > 5:
                break
            await asyncio.sleep(0.02)
        gaps = [later - earlier for earlier, later in itertools.pairwise(seen)]
        state = await stack.master.show_proc()
        _record(
            "refused reload retried with a growing delay",
            attempts=len(seen),
            gaps_s=[round(gap, 2) for gap in gaps],
            failed_reloads=state.failed_reloads,
        )
        assert 2 <= len(seen) <= RELOAD_ATTEMPTS
        assert gaps == sorted(gaps)
        assert state.failed_reloads <= RELOAD_ATTEMPTS
        assert read_installed(stack.settings.config_dir) == files
        await _served_within(stack.port, "a.test", "a", within=5)
        taken.stop()


class TestHAProxy:
    """HAProxy loses a worker, refuses a check or a reload."""

    async def test_show_proc_answers_while_the_master_reloads(
        self, tmp_path: Path, haproxy_runner: HAProxyRunner
    ) -> None:
        """`show proc` never fails while reloads re-execute the master under it.

        A re-executing master refuses connections, resets them, or closes them
        without an answer; each is retried, or reload confirmations and
        readiness probes would report failures that did not happen.
        """
        simple_config(tmp_path / "live", listen_port=free_port(), server_port=1)
        haproxy = await haproxy_runner(tmp_path / "live")
        master = haproxy.master()
        done = asyncio.Event()

        async def ask() -> int:
            count = 0
            while not done.is_set():
                await master.show_proc()
                count += 1
            return count

        askers = [asyncio.create_task(ask()) for _ in range(4)]
        try:
            for _ in range(15):
                await master.reload()
        finally:
            done.set()
            answers = await asyncio.gather(*askers)
        # Every asker kept getting answers through the reloads; none raised.
        assert min(answers) >= 5, answers
        assert (await master.show_proc()).reloads == 15

    async def test_worker_killed_in_sidecar_mode(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A killed worker takes HAProxy 2.6 down; restarted, it serves and catches up.

        HAProxy 2.6's master ends every process when its current worker dies
        (`exit-on-failure`), so its supervisor (Docker's restart policy in
        sidecar mode, played here by the test) starts it again from the
        installed files: the last good routes. A put made while it was down
        is applied once it is back.
        """
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack(**PRODUCTION)
        assert stack.haproxy is not None
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            with Prober(stack.port, "a.test", "a") as prober:
                worker = (await stack.master.show_proc()).worker_pids[0]
                prober.expecting = True
                os.kill(worker, signal.SIGKILL)
                await _exited(stack)
                await operator.put(
                    sites_document(("a.test", a.port), ("b.test", b.port))
                )
                await asyncio.sleep(1)
                await stack.haproxy.start()
                started = time.monotonic()
                await _served_within(stack.port, "a.test", "a", within=2)
                prober.expecting = False
                recovery = await _served_within(stack.port, "b.test", "b")
        _record(
            "HAProxy worker killed (sidecar mode, HAProxy restarted by its supervisor)",
            sent=prober.sent,
            failed=len(prober.failures),
            failed_while_down=prober.expected_failures,
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert prober.failures == []
        assert recovery < RECOVERY

    async def test_worker_killed_in_standalone_mode(
        self, echo_backends: EchoBackends
    ) -> None:
        """In standalone mode HAProxy serves again within the bound after a worker dies.

        HAProxy 2.6 exits as a whole when its worker is killed; standalone
        mode started it, so standalone mode starts it again, on the installed
        files, and a put made afterwards is applied as usual. The worker is
        killed as soon as it serves, often before the sidecar has confirmed
        the reload that started it: the confirmation must accept the new
        master's worker instead of waiting for a reload count that restarted.
        """
        a, b = echo_backends.start("a"), echo_backends.start("b")
        async with (
            _standalone() as (port, nats_url, master, _),
            open_operator(nats_url) as operator,
        ):
            await operator.put(sites_document(("a.test", a.port)))
            await _served_within(port, "a.test", "a")
            before = await master.show_proc()
            os.kill(before.worker_pids[0], signal.SIGKILL)
            started = time.monotonic()
            after = await _new_master(master, before.master_pid)
            await _served_within(port, "a.test", "a")
            recovery = time.monotonic() - started
            await operator.put(sites_document(("a.test", a.port), ("b.test", b.port)))
            applied = await _served_within(port, "b.test", "b")
        _record(
            "HAProxy worker killed (standalone mode, HAProxy restarted by it)",
            recovery_s=round(recovery, 2),
            next_put_served_s=round(applied, 2),
        )
        assert after.workers
        assert recovery < RECOVERY
        assert applied < 5

    async def test_config_dir_not_writable(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """An unwritable config directory keeps the live files; writable, it applies.

        The directory is made immutable (`chattr +i`), which stops even root
        from creating or renaming files in it.
        """
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack(**PRODUCTION)
        config_dir = stack.settings.config_dir
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            files = read_installed(config_dir)
            with Prober(stack.port, "a.test", "a") as prober, _immutable(config_dir):
                revision = await operator.put(
                    sites_document(("a.test", a.port), ("b.test", b.port))
                )
                result = await stack.wait_revision(revision)
                assert result.outcome == "install_failed", result
                assert read_installed(config_dir) == files
                await asyncio.sleep(1)
                assert await _status(stack.port, "b.test") == 404
            started = time.monotonic()
            with Prober(stack.port, "a.test", "a") as after:
                recovery = await _served_within(stack.port, "b.test", "b")
        _record(
            "config directory not writable",
            sent=prober.sent + after.sent,
            failed=len(prober.failures) + len(after.failures),
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert prober.failures == after.failures == []
        assert recovery < RECOVERY

    @pytest.mark.parametrize(
        ("verdict", "outcome"),
        [(True, "check_failed"), (False, "check_unavailable")],
        ids=["refused", "no-verdict"],
    )
    async def test_check_failing_keeps_last_good(
        self,
        verdict: bool,
        outcome: str,
        tmp_path: Path,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
        haproxy_bin: str,
    ) -> None:
        """While `haproxy -c` fails nothing is installed; once it works, puts apply.

        The check runs a wrapper that fails while a flag file exists: refusing
        with an `[ALERT]`, a verdict, after which the revision waits for a
        newer one; or killed by SIGKILL (the OOM killer, say), no verdict,
        after which the same revision is tried again without a new put.
        """
        a, b = echo_backends.start("a"), echo_backends.start("b")
        wrapper, flag = _failing_check(tmp_path, haproxy_bin, verdict=verdict)
        stack = await sidecar_stack(haproxy_bin=str(wrapper), **PRODUCTION)
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            files = read_installed(stack.settings.config_dir)
            with Prober(stack.port, "a.test", "a") as prober:
                flag.touch()
                revision = await operator.put(
                    sites_document(("a.test", a.port), ("b.test", b.port))
                )
                result = await stack.wait_revision(revision)
                assert result.outcome == outcome, result
                assert read_installed(stack.settings.config_dir) == files
                assert await _status(stack.port, "b.test") == 404
                flag.unlink()
                started = time.monotonic()
                if verdict:
                    await operator.put(
                        sites_document(
                            ("a.test", a.port), ("b.test", b.port), ("c.test", b.port)
                        )
                    )
                recovery = await _served_within(stack.port, "b.test", "b")
        _record(
            f"haproxy -c failing ({outcome})",
            sent=prober.sent,
            failed=len(prober.failures),
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert prober.failures == []
        assert recovery < RECOVERY

    async def test_an_unexpected_error_costs_one_revision(
        self,
        monkeypatch: pytest.MonkeyPatch,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A bug met while applying refuses that revision; the sidecar goes on.

        In standalone mode an exception escaping the apply loop would stop
        HAProxy and nats-server with the sidecar.
        """
        a, b = echo_backends.start("a"), echo_backends.start("b")
        real = sidecar_module.parse_document

        def broken(value: bytes) -> Any:
            if b"boom.test" in value:
                raise TypeError("a bug")
            return real(value)

        monkeypatch.setattr(sidecar_module, "parse_document", broken)
        stack = await sidecar_stack(**PRODUCTION)
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            bad = await operator.put(
                sites_document(("a.test", a.port), ("boom.test", b.port))
            )
            result = await stack.wait_revision(bad)
            assert result.outcome == "internal_error", result
            assert "TypeError" in result.error
            assert await _status(stack.port, "a.test") == 200
            await operator.put(sites_document(("a.test", a.port), ("b.test", b.port)))
            await _served_within(stack.port, "b.test", "b")
        assert stack.task is not None
        assert not stack.task.done()

    async def test_scratch_directory_not_writable(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Files that cannot be written for `haproxy -c` are a check without verdict."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack(**PRODUCTION)
        scratch = stack.settings.data_dir / "scratch"
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            with Prober(stack.port, "a.test", "a") as prober, _immutable(scratch):
                revision = await operator.put(
                    sites_document(("a.test", a.port), ("b.test", b.port))
                )
                result = await stack.wait_revision(revision)
                assert result.outcome == "check_unavailable", result
                assert "cannot write the files to check" in result.error
            started = time.monotonic()
            recovery = await _served_within(stack.port, "b.test", "b")
        _record(
            "scratch directory not writable",
            sent=prober.sent,
            failed=len(prober.failures),
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert prober.failures == []
        assert recovery < RECOVERY

    async def test_reload_refused_after_check_passed(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A reload refused for a taken port keeps the last good; freed, it applies.

        The sidecar is restarted with its listener on a port another process
        holds: `haproxy -c` passes, the new worker cannot bind, the old one
        keeps serving the last good routes and the files are put back. No
        request gets a wrong answer, but connections are refused while HAProxy
        retries the bind: 2.6 pauses the serving worker's listeners for about
        2 s at each such attempt, and the sidecar tries again every 2 s. Once
        the port is free a retry succeeds.
        """
        a = echo_backends.start("a")
        stack, taken, files = await _moved_to_taken_port(
            stack_factory=sidecar_stack,
            nats_server=nats_server,
            operator_kv=operator_kv,
            backend=a,
            echo_backends=echo_backends,
        )
        with Prober(stack.port, "a.test", "a") as prober:
            await stack.wait_for(lambda r: r.outcome == "reload_failed", 20)
            assert read_installed(stack.settings.config_dir) == files
            await _served_within(stack.port, "a.test", "a", within=5)
            master_pid = (await stack.master.show_proc()).master_pid
            await asyncio.sleep(3)
        # The listener moves to the freed port, and the old one closes.
        taken.stop()
        started = time.monotonic()
        recovery = await _served_within(taken.port, "a.test", "a")
        _record(
            "reload refused after the check passed (port taken)",
            sent=prober.sent,
            failed=len(prober.failures),
            recovery_s=round(time.monotonic() - started, 2),
        )
        assert all("ConnectionRefusedError" in f for f in prober.failures)
        assert recovery < RECOVERY
        assert (await stack.master.show_proc()).master_pid == master_pid

    async def test_retried_failed_reloads_do_not_cut_requests(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Refused reloads stop before HAProxy would end the serving worker.

        HAProxy counts failed reloads on the worker that keeps serving; once
        it has lived through more than `mworker-max-reloads` (3 here), the
        first good reload ends it with SIGTERM, connections and all. With the
        port taken and a short retry delay, the sidecar stops retrying while
        one more good reload is still safe; a request in flight when the port
        is freed and a new revision is put completes.
        """
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack()
        await stack.stop_sidecar()
        bounded = replace(stack.settings.render, max_reloads=3)
        await stack.start_sidecar(render=bounded)
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            taken = echo_backends.start("taken")
            await stack.stop_sidecar()
            moved = replace(bounded, http_bind=f"127.0.0.1:{taken.port}")
            await stack.start_sidecar(render=moved, retry_delay=0.3)
            await stack.wait_for(lambda r: r.outcome == "reload_failed", 20)
            await asyncio.sleep(4)
            settled = await stack.master.show_proc()
            await asyncio.sleep(2)
            later = await stack.master.show_proc()
            assert later.failed_reloads == settled.failed_reloads
            assert later.workers[0].reloads < bounded.max_reloads
            slow = asyncio.create_task(
                asyncio.to_thread(
                    http_request, stack.port, "GET", "a.test", "/?sleep=3", timeout=10
                )
            )
            await asyncio.sleep(0.5)
            taken.stop()
            await operator.put(sites_document(("a.test", a.port), ("b.test", b.port)))
            await _served_within(taken.port, "b.test", "b")
            assert (await slow).status == 200
        _record(
            "refused reloads retried, bounded by mworker-max-reloads",
            failed_reloads=settled.failed_reloads,
            serving_worker_reloads=later.workers[0].reloads,
        )


async def _moved_to_taken_port(
    *,
    stack_factory: SidecarStackFactory,
    nats_server: EmbeddedNats,
    operator_kv: OperatorFactory,
    backend: Any,
    echo_backends: EchoBackends,
    retry_delay: float = PRODUCTION["retry_delay"],
) -> tuple[SidecarStack, Any, dict[str, str]]:
    """Serve a.test, then restart the sidecar with its listener on a taken port.

    Returns the stack, the backend holding the port, and the files installed
    before the move.
    """
    stack = await stack_factory(**PRODUCTION)
    async with operator_kv(nats_server.url) as operator:
        await stack.wait_revision(
            await operator.put(sites_document(("a.test", backend.port)))
        )
    files = read_installed(stack.settings.config_dir)
    taken = echo_backends.start("taken")
    await stack.stop_sidecar()
    moved = replace(stack.settings.render, http_bind=f"127.0.0.1:{taken.port}")
    await stack.start_sidecar(render=moved, retry_delay=retry_delay)
    return stack, taken, files


def _render() -> RenderSettings:
    """Render settings on a free loopback port."""
    return RenderSettings(http_bind=f"127.0.0.1:{free_port()}", stats_bind=None)


def _settings(tmp_path: Path) -> SidecarSettings:
    """Settings for a sidecar run as a process, in `tmp_path`."""
    return SidecarSettings(
        config_dir=tmp_path / "conf",
        master_socket=tmp_path / "unused.sock",
        data_dir=tmp_path / "data",
        render=_render(),
    )


def _port(settings: SidecarSettings) -> int:
    """The port of HAProxy's HTTP listener."""
    return int(settings.render.http_bind.rpartition(":")[2])


async def _haproxy(settings: SidecarSettings, runner: HAProxyRunner) -> HAProxyProcess:
    """Install the empty configuration and start HAProxy on it."""
    install(initial_files(settings).files, settings.config_dir)
    return await runner(settings.config_dir)


async def _recorded(settings: SidecarSettings, revision: int) -> None:
    """Wait until the sidecar has recorded `revision` as its last good one."""
    deadline = time.monotonic() + RECOVERY
    while (last := LastGood.load(settings.data_dir)) is None or (
        last.revision != revision
    ):
        assert time.monotonic() < deadline, f"revision {revision} not recorded"
        await asyncio.sleep(0.05)


async def _exited(stack: SidecarStack, within: float = 5) -> None:
    """Wait until the stack's HAProxy master has exited."""
    assert stack.haproxy is not None
    deadline = time.monotonic() + within
    while stack.haproxy.returncode is None:
        assert time.monotonic() < deadline, "HAProxy's master did not exit"
        await asyncio.sleep(0.05)


@contextlib.contextmanager
def _immutable(directory: Path) -> Iterator[None]:
    """Make `directory` immutable for the duration; skip where chattr cannot."""
    done = subprocess.run(["chattr", "+i", str(directory)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not supported here: {done.stderr.decode()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def _failing_check(
    tmp_path: Path, haproxy_bin: str, *, verdict: bool = False
) -> tuple[Path, Path]:
    """Write a haproxy wrapper whose `-c` fails while the returned flag file exists.

    By default the check dies by SIGKILL, as one killed by the kernel's OOM
    killer would, and gives no verdict; with `verdict`, it refuses the
    configuration with an `[ALERT]` and status 1, as HAProxy does.
    """
    flag = tmp_path / "check-fails"
    wrapper = tmp_path / "haproxy-wrapper"
    fail = (
        'echo "[ALERT]    (1) : config : refused while the flag exists"; exit 1'
        if verdict
        else "kill -KILL $$"
    )
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-c" ] && [ -e "{flag}" ]; then {fail}; fi\n'
        f'exec "{haproxy_bin}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper, flag


class _KillOnReload:
    """A master socket in front of HAProxy's that SIGKILLs a pid on `reload`.

    Until armed, every command is passed through. Once armed, the first
    `reload` is not passed on: the process is killed instead.
    """

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.pid: int | None = None
        self.fired = asyncio.Event()
        self._server: asyncio.Server | None = None

    def arm(self, pid: int) -> None:
        """Kill `pid` at the next `reload`."""
        self.pid = pid

    async def __aenter__(self) -> _KillOnReload:
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            request = await reader.read()
            if request.strip() == b"reload" and self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)
                self.pid = None
                self.fired.set()
                return
            writer.write(await self._forward(request))
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _forward(self, request: bytes) -> bytes:
        """Pass `request` on, waiting while the master re-executes (it refuses)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.target)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        try:
            writer.write(request)
            writer.write_eof()
            return await reader.read()
        except ConnectionResetError:
            return b""  # `reload` re-executes the master, which cuts the line
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def _standalone() -> AsyncIterator[tuple[int, str, MasterSocket, SidecarProcess]]:
    """Run `momus-haproxy run --standalone` in a short scratch directory.

    Yields HAProxy's HTTP port, the NATS URL, a client for the master socket
    and the process. The process is stopped with SIGTERM; its nats-server and HAProxy
    are found by parent pid and killed if they outlive it.
    """
    data = Path(tempfile.mkdtemp(prefix="momus-"))
    port, nats_url = free_port(), f"nats://127.0.0.1:{free_port()}"
    args = _standalone_args(data, nats_url=nats_url, port=port)
    process = SidecarProcess(args, data / "momus.log")
    master = MasterSocket(data / "run" / "master.sock", retry_for=10)
    try:
        await _wait_for(lambda: _answers(port), 20, process)
        yield port, nats_url, master, process
    finally:
        children = _children(process.pid)
        process.stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)


async def _new_master(
    master: MasterSocket, old_pid: int, within: float = RECOVERY
) -> ProcState:
    """Wait until a master other than `old_pid` answers with a current worker."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(ReloadError):
            state = await master.show_proc()
            if state.master_pid != old_pid and state.workers:
                return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"no new HAProxy master within {within} s")


async def _answers(port: int) -> bool:
    """Whether something answers HTTP on `port`."""
    try:
        await asyncio.to_thread(http_request, port, "GET", "none.test", "/", timeout=1)
    except OSError:
        return False
    return True


async def _wait_for(
    test: Callable[[], Awaitable[bool]], within: float, process: SidecarProcess
) -> None:
    """Wait until `test()` holds, failing with the process's log if it does not."""
    deadline = time.monotonic() + within
    while not await test():
        assert process.process.poll() is None, process.text()
        assert time.monotonic() < deadline, process.text()
        await asyncio.sleep(0.1)


def _children(pid: int, named: str = "") -> list[int]:
    """The pids of the live processes whose parent is `pid` (and name `named`)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                name, _, rest = stat.partition(" (")[2].rpartition(")")
                state, parent = rest.split()[:2]
                if int(parent) == pid and state != "Z" and name.startswith(named):
                    found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def _put_when_nats_answers(url: str, value: bytes) -> int:
    """Put `value` as soon as NATS at `url` takes it again; return the revision."""
    deadline = time.monotonic() + RECOVERY
    while True:
        try:
            async with open_operator(url) as operator:
                return await operator.put(value)
        except Exception:
            assert time.monotonic() < deadline, f"NATS at {url} did not come back"
            await asyncio.sleep(0.2)
