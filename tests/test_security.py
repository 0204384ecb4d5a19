"""Security defaults: private control sockets, loopback listeners, quiet secrets.

- HAProxy's master socket is a Unix socket of mode 0600: another user cannot
  connect to it, and no control socket of HAProxy listens on TCP.
- HAProxy's stats listener, the HTTP listener and the sidecar's health
  listener bind to loopback unless told otherwise.
- NATS passwords, tokens, seeds and JWTs never appear in what the commands
  print, whether they succeed or fail, at any log level.
- NATS over TLS with a client certificate works end to end through
  `momus-haproxy run`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from momus_haproxy.cli import main
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.render import RenderSettings
from momus_haproxy.runner import RunOptions
from momus_haproxy.sidecar import SidecarSettings, initial_files
from tests.support.echo import EchoBackends, free_port, http_request
from tests.support.haproxy import HAProxyRunner
from tests.support.nats import (
    StartNats,
    TlsFiles,
    jwt_auth,
    open_operator,
    tls_config,
)

PASSWORD = "pw-Zq81-n0t-4-l0g"
TOKEN = "tok-Vx27-n0t-4-l0g"
NOBODY = 65534
DOCUMENT = Path(__file__).parent / "cases" / "seed-devsite" / "route-config.json"


def _cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `momus-haproxy ARGS` as a process; return what it printed."""
    command = [sys.executable, "-c", "from momus_haproxy.cli import main; main()"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _assert_quiet(done: subprocess.CompletedProcess[str], *secrets: str) -> None:
    """Neither a secret nor a 12-character piece of one is in the output."""
    output = done.stdout + done.stderr
    for secret in secrets:
        pieces = {secret} | {secret[i : i + 12] for i in range(0, len(secret) - 11, 6)}
        for piece in pieces:
            assert piece not in output, f"{piece!r} printed:\n{output}"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A scratch directory that every user may enter, for the socket test."""
    directory = Path(tempfile.mkdtemp(prefix="momus-sec-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def haproxy(tmp_path: Path, haproxy_runner: HAProxyRunner) -> HAProxyProcess:
    """HAProxy on the default rendered configuration, stats listener included."""
    render = RenderSettings(
        http_bind=f"127.0.0.1:{free_port()}", stats_bind=f"127.0.0.1:{free_port()}"
    )
    settings = SidecarSettings(
        config_dir=tmp_path / "conf",
        master_socket=tmp_path / "unused.sock",
        data_dir=tmp_path / "data",
        render=render,
    )
    install(initial_files(settings).files, settings.config_dir)
    return await haproxy_runner(settings.config_dir)


class TestSockets:
    """HAProxy's control sockets."""

    async def test_master_socket_is_private(
        self, public_dir: Path, haproxy_bin: str
    ) -> None:
        """The master socket is mode 0600, and another user is refused by it."""
        config = public_dir / "conf"
        config.mkdir()
        config.chmod(0o755)
        render = RenderSettings(http_bind=f"127.0.0.1:{free_port()}", stats_bind=None)
        settings = SidecarSettings(
            config, public_dir / "x.sock", public_dir, render=render
        )
        install(initial_files(settings).files, config)
        process = HAProxyProcess(config, public_dir / "run", haproxy_bin=haproxy_bin)
        (public_dir / "run").mkdir(mode=0o755)
        async with process:
            mode = process.master_socket.stat()
            assert stat.S_ISSOCK(mode.st_mode)
            assert stat.S_IMODE(mode.st_mode) == 0o600
            assert mode.st_uid == os.getuid()
            probe = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n    s.connect(sys.argv[1])\n"
                "except PermissionError:\n    sys.exit(13)\n"
            )
            command = [
                "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                "--clear-groups", sys.executable, "-c", probe,
                str(process.master_socket),
            ]  # fmt: skip
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, text=True, timeout=30
            )
            assert done.returncode == 13, done.stderr

    async def test_no_control_socket_on_tcp(self, haproxy: HAProxyProcess) -> None:
        """HAProxy listens on TCP only for the HTTP and stats listeners."""
        config = (haproxy.config_dir / "haproxy.cfg").read_text()
        assert "stats socket" not in config
        binds = {
            line.split()[1]
            for line in config.splitlines()
            if line.strip().startswith("bind ")
        }
        state = await haproxy.master().show_proc()
        pids = {state.master_pid, *state.worker_pids}
        assert _tcp_listeners(pids) == binds
        assert all(bind.startswith("127.0.0.1:") for bind in binds)


def _tcp_listeners(pids: set[int]) -> set[str]:
    """The `address:port` of every TCP socket the processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.add(_address(fields[1]))
    return found


def _address(hex_address: str) -> str:
    """Turn /proc/net/tcp's `0100007F:1F90` into `127.0.0.1:8080`."""
    host, port = hex_address.split(":")
    if len(host) == 8:
        octets = bytes.fromhex(host)[::-1]
        return f"{'.'.join(map(str, octets))}:{int(port, 16)}"
    return f"[{host}]:{int(port, 16)}"


class TestDefaults:
    """What binds where when nothing is said."""

    def test_listeners_bind_to_loopback_by_default(self) -> None:
        """The HTTP, stats and health listeners default to 127.0.0.1."""
        defaults = RenderSettings()
        assert defaults.http_bind.startswith("127.0.0.1:")
        assert (defaults.stats_bind or "").startswith("127.0.0.1:")
        assert (RunOptions.health_bind or "").startswith("127.0.0.1:")
        run = main.commands["run"]
        assert isinstance(run, click.Command)
        options = {param.name: param.default for param in run.params}
        for name in ("http_bind", "stats_bind", "health_bind"):
            assert str(options[name]).startswith("127.0.0.1:"), name

    def test_rendered_listeners_are_loopback(self) -> None:
        """`render` with no bind options writes loopback listeners only."""
        done = _cli("render", "--from-file", str(DOCUMENT))
        assert done.returncode == 0, done.stderr
        binds = [
            line.split()[1] for line in done.stdout.splitlines() if "bind " in line
        ]
        assert binds
        assert all(bind.startswith("127.0.0.1:") for bind in binds), binds


class TestSecrets:
    """Credentials stay out of everything the commands print."""

    def test_render_and_help_never_print_secrets(self) -> None:
        """`render` and `--help` print no secret given by flag or by variable."""
        auth = jwt_auth()
        flags = [
            "--user", "momus", "--password", PASSWORD, "--token", TOKEN,
            "--jwt", auth.user_jwt, "--seed", auth.user_seed,
        ]  # fmt: skip
        done = _cli("render", "--from-file", str(DOCUMENT), *flags)
        assert done.returncode == 0, done.stderr
        _assert_quiet(done, PASSWORD, TOKEN, auth.user_jwt, auth.user_seed)
        env = {
            "MOMUS_Pass": PASSWORD, "MOMUS_Token": TOKEN,
            "MOMUS_Jwt": auth.user_jwt, "MOMUS_Seed": auth.user_seed,
        }  # fmt: skip
        for command in (["run", "--help"], ["config", "put", "--help"]):
            _assert_quiet(_cli(*command, env=env), PASSWORD, TOKEN, auth.user_seed)

    async def test_failed_connections_never_print_secrets(
        self, start_nats: StartNats, tmp_path: Path
    ) -> None:
        """Refused credentials are reported without the credentials."""
        token_server = await start_nats(f'authorization {{ token: "{TOKEN}x" }}\n')
        user_server = await start_nats(
            f'authorization {{ user: momus, password: "{PASSWORD}x" }}\n'
        )
        auth = jwt_auth()
        other = jwt_auth()
        jwt_server = await start_nats(auth.config)
        attempts = [
            ("config", "get", f"--nats-url={token_server.url}", f"--token={TOKEN}"),
            ("config", "put", str(DOCUMENT), f"--nats-url={user_server.url}",
             "--user=momus", f"--password={PASSWORD}"),
            ("config", "get", f"--nats-url=nats://momus:{PASSWORD}@127.0.0.1:"
             f"{user_server.port}"),
            ("config", "get", f"--nats-url={jwt_server.url}",
             f"--jwt={other.user_jwt}", f"--seed={other.user_seed}"),
            ("render", "--dry-run", f"--nats-url={token_server.url}",
             f"--token={TOKEN}"),
        ]  # fmt: skip
        outputs = await asyncio.gather(
            *(asyncio.to_thread(_cli, *args) for args in attempts)
        )
        for args, done in zip(attempts, outputs, strict=True):
            assert done.returncode != 0, (args, done.stdout, done.stderr)
            assert "Authorization Violation" in done.stderr, (args, done.stderr)
            _assert_quiet(done, PASSWORD, TOKEN, other.user_jwt, other.user_seed)

    async def test_running_sidecar_never_logs_secrets(
        self,
        start_nats: StartNats,
        haproxy: HAProxyProcess,
        tmp_path: Path,
    ) -> None:
        """`run --log-level debug` logs connections and applies, but no secret."""
        auth = jwt_auth()
        jwt_server = await start_nats(auth.config)
        token_server = await start_nats(f'authorization {{ token: "{TOKEN}" }}\n')
        async with open_operator(token_server.url, token=TOKEN) as operator:
            await operator.put(DOCUMENT.read_bytes())
        common = [
            "run", "--once", "--log-level=debug", "--log-format=text",
            f"--config-dir={haproxy.config_dir}",
            f"--master-socket={haproxy.master_socket}",
            "--stats-bind=", "--health-bind=", "--status-bucket=",
        ]  # fmt: skip
        runs = [
            [*common, f"--data-dir={tmp_path / 'a'}", f"--nats-url={token_server.url}",
             f"--token={TOKEN}"],
            [*common, f"--data-dir={tmp_path / 'b'}", f"--nats-url={jwt_server.url}",
             f"--jwt={auth.user_jwt}", f"--seed={auth.user_seed}"],
        ]  # fmt: skip
        for args in runs:
            done = await asyncio.to_thread(_cli, *args)
            assert "connected to NATS" in done.stderr, done.stderr
            _assert_quiet(done, TOKEN, auth.user_jwt, auth.user_seed)


class TestTls:
    """NATS over TLS with client certificates."""

    async def test_run_follows_nats_over_tls_with_a_client_certificate(
        self,
        start_nats: StartNats,
        tls_files: TlsFiles,
        haproxy_runner: HAProxyRunner,
        echo_backends: EchoBackends,
        tmp_path: Path,
    ) -> None:
        """`momus-haproxy run` with a CA, a certificate and its key applies puts."""
        server = await start_nats(tls_config(tls_files), scheme="tls")
        backend = echo_backends.start("a")
        port = free_port()
        render = RenderSettings(http_bind=f"127.0.0.1:{port}", stats_bind=None)
        settings = SidecarSettings(
            tmp_path / "conf", tmp_path / "x.sock", tmp_path / "data", render=render
        )
        install(initial_files(settings).files, settings.config_dir)
        haproxy = await haproxy_runner(settings.config_dir)
        args = [
            "run", f"--nats-url={server.url}", f"--tls-ca={tls_files.ca}",
            f"--tls-cert={tls_files.client_cert}", f"--tls-key={tls_files.client_key}",
            f"--config-dir={settings.config_dir}", f"--data-dir={settings.data_dir}",
            f"--master-socket={haproxy.master_socket}",
            f"--http-bind={render.http_bind}", "--stats-bind=", "--health-bind=",
        ]  # fmt: skip
        log = tmp_path / "run.log"
        process = await _start_cli(args, log)
        try:
            context = ssl.create_default_context(cafile=str(tls_files.ca))
            context.load_cert_chain(tls_files.client_cert, tls_files.client_key)
            route = {"RouteId": "a", "ClusterId": "a", "Match": {"Hosts": ["a.test"]}}
            address = f"http://127.0.0.1:{backend.port}"
            cluster = {"ClusterId": "a", "Destinations": {"d": {"Address": address}}}
            document = {"Routes": [route], "Clusters": [cluster]}
            async with open_operator(server.url, tls=context) as operator:
                await operator.put(json.dumps(document).encode())
            await _served(port, "a.test", "a", process, log)
        finally:
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 15)


async def _start_cli(args: list[str], log: Path) -> asyncio.subprocess.Process:
    """Start `momus-haproxy ARGS` with its output in `log`."""
    command = [sys.executable, "-c", "from momus_haproxy.cli import main; main()"]
    with log.open("wb") as stream:
        return await asyncio.create_subprocess_exec(
            *command, *args, stdout=stream, stderr=stream
        )


async def _served(
    port: int, host: str, backend: str, process: asyncio.subprocess.Process, log: Path
) -> None:
    """Wait up to 10 s for `host` to be answered by `backend`."""
    deadline = time.monotonic() + 10
    while True:
        answer = await asyncio.to_thread(http_request, port, "GET", host, "/")
        body = answer.json if isinstance(answer.json, dict) else {}
        if body.get("backend") == backend:
            return
        assert process.returncode is None, _text(log)
        assert time.monotonic() < deadline, _text(log)
        await asyncio.sleep(0.1)


def _text(log: Path) -> str:
    """What a process wrote to its log."""
    return log.read_text(errors="replace")
