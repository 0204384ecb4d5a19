"""Run HAProxy ourselves, in master-worker mode, for standalone mode and tests.

`HAProxyProcess` starts::

    haproxy -W -S <run_dir>/master.sock,mode,600 -f <config_dir>/haproxy.cfg
            -p <run_dir>/haproxy.pid

in the foreground (not `-D`), so the process we start is the master and its
pid is ours to signal. Its output goes to `<run_dir>/haproxy.log`; HAProxy
says there why a start or a reload failed. It runs in its own session, so a
Ctrl-C in the terminal reaches only momus-haproxy, which then stops HAProxy
gracefully; and its working directory is the configuration directory, as for
`haproxy -c`, so relative paths resolve the same way in both.

How HAProxy 2.6 ends workers, as measured with Debian's 2.6.12:

- SIGUSR1 to the master is a soft stop: listeners close at once, workers
  finish the requests in flight, and the master exits when the last worker
  has. SIGTERM is a hard stop: every connection is cut.
- After a reload the previous worker becomes an "old worker" and soft-stops
  the same way. Nothing bounds how long it lingers unless the configuration
  says so. `hard-stop-after <time>` (global) does: once a soft stop has run
  that long, the worker closes its remaining connections and exits.
- `mworker-max-reloads <n>` (global) makes the master send SIGTERM to an old
  worker that has lived through more than `n` reloads, so at most `n` old
  workers remain. Failed reloads count too: a worker that stayed current
  through `n` failed reloads is killed outright, connections and all, by the
  first good reload after them.
- If the master is killed (SIGKILL), its workers notice and exit.

Both bounds belong in the rendered global section: `hard-stop-after` a little
longer than the longest request timeout, so a request in flight during a
reload always finishes (60s with 30s timeouts), and `mworker-max-reloads`
well above the reloads expected within that time (10), as a backstop on the
memory old workers hold during a burst of reloads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from momus_haproxy.check import missing_binary_message
from momus_haproxy.children import ending_with_parent
from momus_haproxy.errors import ProcessError, ReloadError
from momus_haproxy.reload import MasterSocket, ProcState

__all__ = ["MAX_SOCKET_PATH", "HAProxyProcess"]

logger = logging.getLogger(__name__)

MAX_SOCKET_PATH = 97
"""Longest master socket path, in bytes, that HAProxy 2.6 accepts."""

_POLL_INTERVAL = 0.05
_TERM_GRACE = 5.0


class HAProxyProcess:
    """An HAProxy master and its workers, started and stopped by us.

    Use it as an async context manager, or call `start()` and then `aclose()`.
    """

    def __init__(
        self,
        config_dir: Path,
        run_dir: Path,
        *,
        haproxy_bin: str = "haproxy",
        config_name: str = "haproxy.cfg",
        socket_mode: str = "600",
        start_timeout: float = 10.0,
        stop_timeout: float = 30.0,
    ) -> None:
        """Prepare to run `config_dir/config_name`, keeping socket and log in `run_dir`.

        `stop_timeout` bounds the graceful stop in `aclose()`; after it HAProxy
        gets SIGTERM, and SIGKILL if that does not end it either.
        """
        self.config_dir = config_dir
        self.run_dir = run_dir
        self.haproxy_bin = haproxy_bin
        self.config_name = config_name
        self.socket_mode = socket_mode
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def master_socket(self) -> Path:
        """Return the path of the master CLI socket."""
        return self.run_dir / "master.sock"

    @property
    def log_path(self) -> Path:
        """Return the file that receives HAProxy's output."""
        return self.run_dir / "haproxy.log"

    @property
    def pid_file(self) -> Path:
        """Return the file where HAProxy writes the master's pid."""
        return self.run_dir / "haproxy.pid"

    @property
    def pid(self) -> int:
        """Return the master's pid.

        Raises:
            ProcessError: HAProxy has not been started.
        """
        return self._require_process().pid

    @property
    def returncode(self) -> int | None:
        """Return the master's exit status, or None while it runs."""
        return None if self._process is None else self._process.poll()

    def master(self) -> MasterSocket:
        """Return a client for this HAProxy's master socket."""
        return MasterSocket(self.master_socket)

    def log_tail(self, lines: int = 20) -> str:
        """Return the last `lines` lines HAProxy wrote to its log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def __aenter__(self) -> HAProxyProcess:
        """Start HAProxy and return this object."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop HAProxy gracefully."""
        await self.aclose()

    async def start(self) -> ProcState:
        """Start HAProxy and wait until its master reports a worker.

        Returns the master's first `show proc`.

        Raises:
            ProcessError: HAProxy could not be run, exited while starting, or
                showed no worker within `start_timeout` seconds (the message
                ends with the tail of its log).
        """
        if self._process is not None and self.returncode is None:
            raise ProcessError(f"HAProxy is already running here (pid {self.pid}).")
        self._prepare_run_dir()
        self._process = self._spawn()

        try:
            state = await self._await_ready()
        except BaseException:
            await self._stop(graceful=False)
            raise

        logger.info(
            "haproxy started: master %d, worker(s) %s", self.pid, state.worker_pids
        )
        return state

    async def aclose(self) -> None:
        """Stop HAProxy gracefully: SIGUSR1, then SIGTERM, then SIGKILL.

        SIGUSR1 lets the workers finish the requests in flight; SIGTERM is
        sent only if they have not after `stop_timeout` seconds. Signals go to
        our own master pid only, and never once it has exited.
        """
        if self._process is None:
            return
        was_running = self.returncode is None
        status = await self._stop(graceful=True)
        if was_running:
            logger.info("haproxy stopped: master %d exited with %s", self.pid, status)

    def _prepare_run_dir(self) -> None:
        """Create the run directory and clear a stale socket from a past run."""
        self._check_socket_path()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.master_socket.unlink(missing_ok=True)
        except OSError as exc:
            message = f"cannot prepare the run directory {str(self.run_dir)!r}: {exc}."
            raise ProcessError(message) from exc

    def _check_socket_path(self) -> None:
        """Refuse a master socket path that HAProxy's -S option cannot take."""
        if "," in str(self.master_socket):
            message = (
                f"the master socket path {str(self.master_socket)!r} has a comma, "
                "which HAProxy's -S option reads as a separator."
            )
            raise ProcessError(message)
        size = len(os.fsencode(self.master_socket))
        if size > MAX_SOCKET_PATH:
            message = (
                f"the master socket path {str(self.master_socket)!r} is {size} bytes "
                f"long; HAProxy accepts at most {MAX_SOCKET_PATH}. Choose a shorter "
                "run directory."
            )
            raise ProcessError(message)

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Start the master process, its output appended to the log file."""
        command = [
            self.haproxy_bin,
            "-W",
            "-S",
            f"{self.master_socket},mode,{self.socket_mode}",
            "-f",
            str((self.config_dir / self.config_name).absolute()),
            "-p",
            str(self.pid_file),
        ]
        if shutil.which(self.haproxy_bin) is None:
            raise ProcessError(missing_binary_message(self.haproxy_bin))
        # If we die (SIGKILL), HAProxy stops too, at once: a soft stop can
        # be lost while the master re-executes for a reload.
        command = ending_with_parent(command, "TERM")
        try:
            with self.log_path.open("ab") as log:
                return subprocess.Popen(
                    command,
                    cwd=self.config_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except (FileNotFoundError, PermissionError) as exc:
            if exc.filename == self.haproxy_bin:
                raise ProcessError(missing_binary_message(self.haproxy_bin)) from exc
            message = f"cannot start HAProxy: {exc}."
            raise ProcessError(message) from exc

    async def _await_ready(self) -> ProcState:
        """Wait until the master socket answers and shows one of our workers."""
        deadline = time.monotonic() + self.start_timeout
        master = MasterSocket(self.master_socket, retry_for=0.0)
        while True:
            status = self.returncode
            if status is not None:
                raise ProcessError(self._failure(f"exited with status {status}"))
            try:
                state = await master.show_proc()
            except ReloadError:
                state = None
            if state is not None and state.master_pid == self.pid and state.workers:
                return state
            if time.monotonic() >= deadline:
                reason = f"showed no worker within {self.start_timeout:g} s"
                raise ProcessError(self._failure(reason))
            await asyncio.sleep(_POLL_INTERVAL)

    def _failure(self, reason: str) -> str:
        """Describe a failed start, ending with the tail of HAProxy's log."""
        tail = self.log_tail() or "(HAProxy wrote nothing)"
        return (
            f"HAProxy {reason} while starting with "
            f"{str(self.config_dir / self.config_name)!r}; its log "
            f"{str(self.log_path)!r} ends with:\n{tail}"
        )

    async def _stop(self, *, graceful: bool) -> int:
        """Signal our master until it exits; return its exit status."""
        process = self._require_process()
        steps = [(signal.SIGTERM, _TERM_GRACE), (signal.SIGKILL, _TERM_GRACE)]
        if graceful:
            steps.insert(0, (signal.SIGUSR1, self.stop_timeout))

        for number, wait in steps:
            status = process.poll()
            if status is not None:
                return status
            logger.debug("sending %s to haproxy master %d", number.name, process.pid)
            process.send_signal(number)
            status = await self._wait(wait)
            if status is not None:
                return status
        raise ProcessError(f"HAProxy master {process.pid} survived SIGKILL.")

    async def _wait(self, seconds: float) -> int | None:
        """Wait up to `seconds` for our master to exit; return its status."""
        process = self._require_process()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status = process.poll()
            if status is not None:
                return status
            await asyncio.sleep(_POLL_INTERVAL)
        return process.poll()

    def _require_process(self) -> subprocess.Popen[bytes]:
        """Return the master process, or fail if HAProxy was never started."""
        if self._process is None:
            raise ProcessError("HAProxy has not been started, so it has no pid yet.")
        return self._process
