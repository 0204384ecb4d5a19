"""Fixtures for tests against a real HAProxy in master-worker mode.

- `haproxy_bin`: the path of the haproxy binary; a missing one fails the
  test with the command that installs it (HAProxy is required, never skipped).
- `haproxy_runner`: a factory, `await haproxy_runner(config_dir)`, that starts
  `HAProxyProcess` on `config_dir/haproxy.cfg` with its master socket and log
  under the test's `tmp_path`, and stops every HAProxy it started, by pid, at
  teardown.

`simple_config()` writes the small hand-made configuration most tests need:
one HTTP frontend on a loopback port and one backend server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

import pytest

from momus_haproxy.haproxy import MAX_SOCKET_PATH, HAProxyProcess

__all__ = ["HAProxyRunner", "haproxy_bin", "haproxy_runner", "simple_config"]

HAProxyRunner = Callable[..., Awaitable[HAProxyProcess]]

_DEBIAN_HAPROXY = "/usr/sbin/haproxy"


@pytest.fixture(scope="session")
def haproxy_bin() -> str:
    """Return the haproxy binary the tests run."""
    found = shutil.which("haproxy")
    if found is None and os.access(_DEBIAN_HAPROXY, os.X_OK):
        found = _DEBIAN_HAPROXY
    if found is None:
        pytest.fail("these tests need HAProxy 2.6 or later: apt-get install haproxy")
    return found


@pytest.fixture
async def haproxy_runner(
    tmp_path: Path, haproxy_bin: str
) -> AsyncIterator[HAProxyRunner]:
    """Start real HAProxy processes on demand; stop each one by pid afterwards."""
    started: list[HAProxyProcess] = []
    short_dirs: list[Path] = []

    async def run(
        config_dir: Path, *, stop_timeout: float = 10.0, start_timeout: float = 10.0
    ) -> HAProxyProcess:
        run_dir = tmp_path / f"haproxy-{len(started)}"
        if len(os.fsencode(run_dir / "master.sock")) > MAX_SOCKET_PATH:
            run_dir = Path(tempfile.mkdtemp(prefix="momus-"))
            short_dirs.append(run_dir)
        process = HAProxyProcess(
            config_dir,
            run_dir,
            haproxy_bin=haproxy_bin,
            stop_timeout=stop_timeout,
            start_timeout=start_timeout,
        )
        started.append(process)
        await process.start()
        return process

    yield run

    for process in reversed(started):
        await process.aclose()
    for directory in short_dirs:
        shutil.rmtree(directory, ignore_errors=True)


def simple_config(
    config_dir: Path,
    *,
    listen_port: int,
    server_port: int,
    global_lines: Iterable[str] = (),
    frontend_lines: Iterable[str] = (),
) -> Path:
    """Write a haproxy.cfg with one frontend and one backend server; return its path.

    The defaults hold `option idle-close-on-response`, which keeps keep-alive
    clients from losing a request when a reload retires their worker.
    """
    lines = [
        "global",
        *(f"    {line}" for line in global_lines),
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 10s",
        "    timeout server 10s",
        "    option idle-close-on-response",
        "frontend web",
        f"    bind 127.0.0.1:{listen_port}",
        *(f"    {line}" for line in frontend_lines),
        "    default_backend app",
        "backend app",
        f"    server s1 127.0.0.1:{server_port}",
        "",
    ]
    config_dir.mkdir(parents=True, exist_ok=True)
    path = config_dir / "haproxy.cfg"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
