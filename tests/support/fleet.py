"""A fleet for tests: several `momus-haproxy run` processes, each with its HAProxy.

`fleet` is a factory: `await fleet.start("edge-1", "edge-2")` starts, for each
name, a real HAProxy (through `haproxy_runner`) and a real `momus-haproxy run`
process in sidecar mode next to it, all following the `nats_server` fixture,
with a short status interval and time-to-live so that lost instances age out
within seconds. `member.stop()` ends one with SIGTERM, `member.kill()` with
SIGKILL; teardown stops the rest, each by the pid it was started with.

`cli(*args)` runs a `momus-haproxy` command in-process (click's CliRunner, in
a thread so that the test's event loop keeps running).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from momus_haproxy.cli import main
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.render import RenderSettings
from momus_haproxy.sidecar import SidecarSettings, initial_files
from tests.support.echo import free_port, http_request
from tests.support.haproxy import HAProxyRunner

__all__ = ["Fleet", "Member", "cli", "fleet"]

STATUS_INTERVAL = 0.5
STATUS_TTL = 3.0
READY_MAX_LAG = 1.0


async def cli(*args: str, input: str | None = None) -> Result:
    """Run `momus-haproxy ARGS` in a thread and return click's result."""
    runner = CliRunner()
    return await asyncio.to_thread(runner.invoke, main, list(args), input=input)


@dataclass
class Member:
    """One instance of the fleet: its HAProxy and its `momus-haproxy run`."""

    name: str
    haproxy: HAProxyProcess
    process: subprocess.Popen[bytes]
    http_port: int
    health_port: int
    log: Path

    async def stop(self) -> int:
        """End the process with SIGTERM, as a clean stop; return its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 15)

    async def kill(self) -> None:
        """End the process with SIGKILL: it writes nothing more."""
        self.process.kill()
        await asyncio.to_thread(self.process.wait, 15)

    async def probe(self, path: str) -> tuple[int, str]:
        """GET `path` on the health listener; return status and body."""
        answer = await asyncio.to_thread(
            http_request, self.health_port, "GET", "127.0.0.1", path
        )
        return answer.status, answer.text

    def log_lines(self) -> list[dict[str, Any]]:
        """The process's log, one JSON object per line."""
        text = self.log.read_text(errors="replace")
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass
class Fleet:
    """The `fleet` fixture: starts members and stops them all at teardown."""

    tmp_path: Path
    nats: EmbeddedNats
    haproxy_runner: HAProxyRunner
    members: dict[str, Member] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The NATS URL every member follows."""
        return self.nats.url

    async def start(self, *names: str, extra: tuple[str, ...] = ()) -> list[Member]:
        """Start one member per name, all at once."""
        members = await asyncio.gather(*(self._start(name, extra) for name in names))
        return list(members)

    async def _start(self, name: str, extra: tuple[str, ...]) -> Member:
        base = self.tmp_path / name
        http_port, health_port = free_port(), free_port()
        render = RenderSettings(http_bind=f"127.0.0.1:{http_port}", stats_bind=None)
        settings = SidecarSettings(
            config_dir=base / "conf",
            master_socket=base / "unused.sock",
            data_dir=base / "data",
            render=render,
        )
        install(initial_files(settings).files, settings.config_dir)
        haproxy = await self.haproxy_runner(settings.config_dir)
        log = base / "momus.log"
        args = [
            "run",
            f"--nats-url={self.url}",
            f"--config-dir={settings.config_dir}",
            f"--data-dir={settings.data_dir}",
            f"--master-socket={haproxy.master_socket}",
            f"--http-bind=127.0.0.1:{http_port}",
            "--stats-bind=",
            f"--health-bind=127.0.0.1:{health_port}",
            f"--instance-id={name}",
            f"--status-interval={STATUS_INTERVAL}",
            f"--status-ttl={STATUS_TTL}",
            f"--ready-max-lag={READY_MAX_LAG}",
            "--quiet-period=0.01",
            "--log-format=json",
            *extra,
        ]
        process = spawn(args, log)
        member = Member(name, haproxy, process, http_port, health_port, log)
        self.members[name] = member
        return member

    async def aclose(self) -> None:
        """Stop every member still running, by its pid."""
        for member in self.members.values():
            if member.process.poll() is None:
                member.process.kill()
                await asyncio.to_thread(member.process.wait, 15)


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start `momus-haproxy ARGS` with its output in `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "from momus_haproxy.cli import main; main()"]
    with log.open("wb") as stream:
        return subprocess.Popen(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=stream,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.fixture
async def fleet(
    tmp_path: Path, nats_server: EmbeddedNats, haproxy_runner: HAProxyRunner
) -> AsyncIterator[Fleet]:
    """Start fleet members on demand; stop them all after the test."""
    members = Fleet(tmp_path, nats_server, haproxy_runner)
    try:
        yield members
    finally:
        await members.aclose()
