"""Reload HAProxy through its master CLI socket and confirm the new worker.

HAProxy in master-worker mode (`haproxy -W -S <socket>`) keeps one master
process that forks the workers. Its CLI socket behaves as follows in 2.6, as
measured against Debian's 2.6.12:

- One command per connection: the master answers only after the client has
  shut down its side for writing, then closes the connection.
- `reload` prints nothing. The master re-executes itself: it resets the open
  connections, or closes them without an answer, and refuses new ones until
  it has read the configuration again (about 0.1 s; about 2 s when a listener
  cannot be bound, because HAProxy retries the bind). `MasterSocket` retries
  for a bounded time; measured with four clients asking `show proc` in a loop
  through 30 reloads, 48 of 3,172 connections that got through were closed
  without an answer.
- `show proc` reads::

      #<PID>          <type>          <reloads>       <uptime>        <version>
      3075            master          1 [failed: 0]   0d00h00m05s     2.6.12-1+deb12u4
      # workers
      3200            worker          0               0d00h00m00s     2.6.12-1+deb12u4
      # old workers
      3078            worker          1               0d00h00m05s     2.6.12-1+deb12u4
      # programs

  The master's reload counter counts every reload, good or failed. `failed:`
  counts the failed reloads since the last good one: it goes back to 0 when a
  reload succeeds. A worker's counter is how many reloads it has lived
  through; old workers are the ones finishing their connections.
- A reload that fails after `haproxy -c` passed (a port taken by another
  process, too few file descriptors) leaves the old worker serving, listed
  under `# workers` with its reload counter one higher, and raises `failed:`
  by one. HAProxy's own log has the reason (`[ALERT] ... cannot bind
  socket`); the CLI does not.

A reload is therefore confirmed by reading `show proc` until the master's
reload counter has moved and a worker that did not exist before is current.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from momus_haproxy.errors import ReloadError

__all__ = ["MasterSocket", "ProcInfo", "ProcState", "ReloadResult"]

logger = logging.getLogger(__name__)

_RETRIED = (
    ConnectionRefusedError,
    ConnectionResetError,
    FileNotFoundError,
    BrokenPipeError,
)
_PROC_LINE = re.compile(
    r"^(?P<pid>\d+)\s+(?P<kind>\S+)\s+(?P<reloads>\d+)"
    r"(?:\s+\[failed:\s*(?P<failed>\d+)\])?"
    r"\s+(?P<uptime>\S+)(?:\s+(?P<version>\S+))?\s*$"
)
_UPTIME = re.compile(r"^(\d+)d(\d+)h(\d+)m(\d+)s$")
_POLL_INTERVAL = 0.05

_AfterCut = Literal["resend", "raise", "accept"]


@dataclass(frozen=True)
class ProcInfo:
    """One process line of `show proc`: the master, a worker or a program."""

    pid: int
    kind: str
    reloads: int
    uptime: str
    version: str

    @property
    def uptime_seconds(self) -> int:
        """Return the uptime, printed as `0d00h00m05s`, in seconds (0 if odd)."""
        match = _UPTIME.match(self.uptime)
        if match is None:
            return 0
        days, hours, minutes, seconds = (int(part) for part in match.groups())
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class ProcState:
    """What the master reports about itself and its workers (`show proc`)."""

    master: ProcInfo
    failed_reloads: int
    workers: tuple[ProcInfo, ...]
    old_workers: tuple[ProcInfo, ...]
    programs: tuple[ProcInfo, ...] = ()

    @property
    def master_pid(self) -> int:
        """Return the master's process id."""
        return self.master.pid

    @property
    def reloads(self) -> int:
        """Return how many reloads, good or failed, the master has done."""
        return self.master.reloads

    @property
    def worker_pids(self) -> tuple[int, ...]:
        """Return the process ids of the current workers."""
        return tuple(worker.pid for worker in self.workers)

    @property
    def old_worker_pids(self) -> tuple[int, ...]:
        """Return the process ids of the workers still finishing connections."""
        return tuple(worker.pid for worker in self.old_workers)

    @classmethod
    def parse(cls, text: str) -> ProcState:
        """Read the answer to `show proc`.

        Raises:
            ReloadError: the text has no master line.
        """
        sections: dict[str, list[ProcInfo]] = {}
        section = "master"
        failed: int | None = None
        for line in text.splitlines():
            if line.startswith("# "):
                section = line[2:].strip()
                continue
            match = _PROC_LINE.match(line.strip())
            if match is None:
                continue
            if match["failed"] is not None:
                failed = int(match["failed"])
            sections.setdefault(section, []).append(_proc_info(match))

        masters = [p for p in sections.get("master", []) if p.kind == "master"]
        if not masters:
            message = f"the master CLI's answer to 'show proc' has no master: {text!r}"
            raise ReloadError(message)
        return cls(
            master=masters[0],
            failed_reloads=failed or 0,
            workers=tuple(sections.get("workers", [])),
            old_workers=tuple(sections.get("old workers", [])),
            programs=tuple(sections.get("programs", [])),
        )


def _proc_info(match: re.Match[str]) -> ProcInfo:
    """Build a `ProcInfo` from one matched `show proc` line."""
    return ProcInfo(
        pid=int(match["pid"]),
        kind=match["kind"],
        reloads=int(match["reloads"]),
        uptime=match["uptime"],
        version=match["version"] or "",
    )


@dataclass(frozen=True)
class ReloadResult:
    """A confirmed reload: the workers before and after, and how long it took."""

    old_pids: tuple[int, ...]
    new_pids: tuple[int, ...]
    duration: float
    reloads: int


class MasterSocket:
    """A client for HAProxy's master CLI socket, one connection per command.

    Use it as an async context manager, or call `aclose()` when done. No
    connection is held between commands; closing only stops further use.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        retry_for: float = 5.0,
        answer_timeout: float = 10.0,
    ) -> None:
        """Talk to the socket at `path`.

        `retry_for` bounds how long a command keeps retrying while the socket
        is missing, refuses or resets (the master re-executing); and
        `answer_timeout` bounds the wait for one answer.
        """
        self.path = Path(path)
        self.retry_for = retry_for
        self.answer_timeout = answer_timeout
        self._closed = False

    async def __aenter__(self) -> MasterSocket:
        """Return the client itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the client."""
        await self.aclose()

    async def aclose(self) -> None:
        """Refuse further commands; no connection stays open between commands."""
        self._closed = True

    async def command(self, line: str) -> str:
        """Send one command line to the master and return its whole answer.

        While the socket is missing or refuses connections (the master
        re-executing) the command is tried again until `retry_for` has
        passed; a connection reset after sending is an error, as the command
        may have run.

        Raises:
            ReloadError: the socket could not be used, or the answer was cut.
        """
        return await self._exchange(line, after_cut="raise")

    async def show_proc(self) -> ProcState:
        """Return the master's view of its processes (`show proc`).

        Raises:
            ReloadError: the socket could not be used or the answer is odd.
        """
        text = await self._exchange("show proc", after_cut="resend")
        return ProcState.parse(text)

    async def worker_command(self, line: str) -> str:
        """Send `line` to the current worker's runtime API through the master.

        This is HAProxy's `@1 <command>`, for instance `show servers state` or
        `add map <file> <key> <value>`.

        Raises:
            ReloadError: the socket could not be used, or the answer was cut.
        """
        return await self.command(f"@1 {line}")

    async def reload(
        self,
        # The bound spans several exchanges and the polling between them, and
        # its expiry must say what was (not) seen, which a cancellation cannot.
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> ReloadResult:
        """Ask the master to reload and wait until a new worker is current.

        Raises:
            ReloadError: the master counted the reload as failed (the old
                workers keep serving; HAProxy's log says why), or no new
                worker appeared within `timeout` seconds.
        """
        started = time.monotonic()
        deadline = started + timeout
        before = await self.show_proc()
        answer = await self._exchange("reload", after_cut="accept")
        if answer.startswith("Success=0"):
            # HAProxy 2.7 and later answer `reload` with its outcome and logs.
            message = f"HAProxy's master refused the reload: {answer.strip()!r}"
            raise ReloadError(message)

        state = await self._await_new_worker(before, deadline, timeout)
        result = ReloadResult(
            old_pids=before.worker_pids,
            new_pids=_new_pids(before, state),
            duration=time.monotonic() - started,
            reloads=state.reloads,
        )
        logger.debug("reload confirmed: %s -> %s", result.old_pids, result.new_pids)
        return result

    async def _await_new_worker(
        self, before: ProcState, deadline: float, limit: float
    ) -> ProcState:
        """Poll `show proc` until the reload shows as done or as failed.

        A master with another pid was started anew (a supervisor restarted
        HAProxy after it exited): it read the configuration on disk, which
        was installed before the reload, so its first worker counts too.
        """
        while True:
            state = await self._show_proc_until(deadline)
            if state.master_pid != before.master_pid and state.worker_pids:
                return state
            if state.reloads > before.reloads:
                if _new_pids(before, state):
                    return state
                if state.failed_reloads > before.failed_reloads:
                    raise ReloadError(_failed_message(before, state))
            if time.monotonic() >= deadline:
                raise ReloadError(_timeout_message(before, state, limit))
            await asyncio.sleep(_POLL_INTERVAL)

    async def _show_proc_until(self, deadline: float) -> ProcState:
        """Read `show proc`, retrying no later than `deadline`."""
        retry_until = max(deadline, time.monotonic() + _POLL_INTERVAL)
        text = await self._exchange("show proc", after_cut="resend", until=retry_until)
        return ProcState.parse(text)

    async def _exchange(
        self, line: str, *, after_cut: _AfterCut, until: float | None = None
    ) -> str:
        """Send `line` and return the answer, retrying while the master is away.

        `after_cut` says what a reset after connecting means: `resend` for a
        command safe to repeat (an empty answer counts as a reset then, as no
        such command answers nothing), `raise` for one that may have run,
        `accept` for `reload`, whose own re-execution resets the connection.
        """
        self._check_usable(line)
        began = time.monotonic()
        deadline = began + self.retry_for if until is None else until
        while True:
            try:
                # Not `wait_for`: on 3.11 it loses a cancellation that arrives
                # as the answer does, and a cancelled sidecar would never stop.
                async with asyncio.timeout(self.answer_timeout):
                    answer = await self._converse(line)
                if answer or after_cut != "resend":
                    return answer
                # A re-executing master may also close the connection unanswered.
                raise ConnectionResetError(errno.ECONNRESET, "closed unanswered")
            except _RETRIED as exc:
                cut = isinstance(exc, ConnectionResetError | BrokenPipeError)
                if cut and after_cut == "accept":
                    return ""
                if cut and after_cut == "raise":
                    raise ReloadError(_cut_message(self.path, line)) from exc
                if time.monotonic() >= deadline:
                    waited = time.monotonic() - began
                    message = _unreachable_message(self.path, waited, exc)
                    raise ReloadError(message) from exc
            except PermissionError as exc:
                raise ReloadError(_permission_message(self.path)) from exc
            except TimeoutError as exc:
                message = (
                    f"the master socket {str(self.path)!r} gave no answer to "
                    f"{line!r} within {self.answer_timeout:g} s."
                )
                raise ReloadError(message) from exc
            await asyncio.sleep(_POLL_INTERVAL)

    def _check_usable(self, line: str) -> None:
        """Refuse a closed client or a command that is not one line."""
        if self._closed:
            message = f"the client for the master socket {str(self.path)!r} is closed."
            raise ReloadError(message)
        if "\n" in line or "\r" in line:
            raise ReloadError(f"a master CLI command is one line, not {line!r}.")

    async def _converse(self, line: str) -> str:
        """Connect, send `line`, half-close, and read the answer to the end."""
        reader, writer = await asyncio.open_unix_connection(self.path)
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            writer.write_eof()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return data.decode(errors="replace")


def _new_pids(before: ProcState, after: ProcState) -> tuple[int, ...]:
    """Return the current workers of `after` that `before` did not know."""
    known = set(before.worker_pids) | set(before.old_worker_pids)
    return tuple(pid for pid in after.worker_pids if pid not in known)


def _failed_message(before: ProcState, after: ProcState) -> str:
    """Explain a reload that the master counted as failed."""
    return (
        "HAProxy could not load the new configuration: the master counted the "
        f"reload as failed (failed reloads {before.failed_reloads} -> "
        f"{after.failed_reloads}) and worker(s) {list(after.worker_pids)} keep "
        "serving the previous one. HAProxy's own log says why, for instance a "
        "port already in use."
    )


def _timeout_message(before: ProcState, after: ProcState, timeout: float) -> str:
    """Explain a reload that showed no new worker in time."""
    return (
        f"no new HAProxy worker appeared within {timeout:g} s of the reload: the "
        f"master's reload count went {before.reloads} -> {after.reloads} and its "
        f"current worker(s) are {list(after.worker_pids)}."
    )


def _cut_message(path: Path, line: str) -> str:
    """Explain a connection reset after a command that must not be repeated."""
    return (
        f"the master socket {str(path)!r} reset the connection after {line!r} "
        "was sent (HAProxy reloading?); the command may or may not have run."
    )


def _unreachable_message(path: Path, waited: float, exc: OSError) -> str:
    """Explain a master socket that stayed unreachable."""
    return (
        f"cannot reach HAProxy's master socket {str(path)!r} after {waited:.1f} s "
        f"of retries ({exc.strerror or exc}); is HAProxy running in master-worker "
        "mode with -W -S on that path?"
    )


def _permission_message(path: Path) -> str:
    """Explain a master socket that this user may not open."""
    return (
        f"permission denied on HAProxy's master socket {str(path)!r}; give this "
        "user access with the socket's mode, user or group options of -S "
        "(for instance -S /path/master.sock,mode,660,gid,<gid>)."
    )
