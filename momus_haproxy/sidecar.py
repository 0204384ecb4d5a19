"""The apply loop: follow the key, and turn each new revision into HAProxy's state.

For each change: validate, render, `haproxy -c` in a scratch directory,
install into the live directory, reload through the master socket and confirm
a new worker took over, then record the revision as the last good one. Every
step can fail; a failure leaves the live files and the running HAProxy as they
were, and is told in one log line naming the revision.

A change that only touches map entries and the servers of existing backends
(a host moved, a destination added, removed or re-weighted) is applied
through HAProxy's runtime API instead of a reload, after the same check and
install (see `runtime`); if HAProxy refuses any of its commands, the reload
follows as for any other change.

Bursts are coalesced: a change that comes after a quiet spell is applied at
once, and the changes that follow it closely wait for a quiet period (bounded
by `max_delay`), after which only the newest revision is applied.

A failure that may pass later (a check that gave no verdict, an install or a
reload that failed) is tried again after `retry_delay`, then after twice as
long each time, up to `MAX_RETRY_DELAY`; a newer revision ends the wait. A
reload HAProxy refused is retried only a few times (`RELOAD_ATTEMPTS`), and
never when one more refusal would cost the serving worker its life: HAProxy
2.6 counts failed reloads on that worker, and past `mworker-max-reloads` it
ends the worker at the next good reload, connections and all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Literal, Protocol

from .check import check
from .document import Document, parse_document
from .errors import (
    CheckError,
    CheckUnavailableError,
    DocumentError,
    InstallError,
    MomusError,
    ReloadError,
    quoted,
)
from .install import install, read_installed
from .reload import MasterSocket, ProcState
from .render import Rendered, RenderSettings, render
from .runtime import (
    CONFIG,
    SendResult,
    changed_servers,
    loaded_maps,
    runtime_changes,
    send,
    server_args,
    touched_servers,
)
from .watch import Entry

__all__ = [
    "EMPTY_DOCUMENT",
    "MAX_RETRY_DELAY",
    "RELOAD_ATTEMPTS",
    "ApplyResult",
    "LastGood",
    "Sidecar",
    "SidecarSettings",
    "initial_files",
    "starting_files",
]

log = logging.getLogger(__name__)

EMPTY_DOCUMENT = b'{"Routes": [], "Clusters": []}'

MAX_RETRY_DELAY = 8.0
"""Longest wait, in seconds, between two attempts at the same revision."""

RELOAD_ATTEMPTS = 4
"""Failed reloads in a row after which a revision waits for a newer one."""

Outcome = Literal[
    "applied",
    "unchanged",
    "runtime",
    "refused",
    "check_failed",
    "check_unavailable",
    "install_failed",
    "reload_failed",
    "kept",
    "internal_error",
]


class ChangeSource(Protocol):
    """Anything that yields the key's changes in order (a `watch.Store`)."""

    async def __aenter__(self) -> Any:
        """Connect."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Disconnect."""
        ...

    def watch(self) -> AsyncIterator[Entry]:
        """Yield the current value, then every change of the key."""
        ...


@dataclass(frozen=True)
class SidecarSettings:
    """Where the sidecar writes, what it runs, and how it paces applies."""

    config_dir: Path
    master_socket: Path
    data_dir: Path
    haproxy_bin: str = "haproxy"
    render: RenderSettings = field(default_factory=RenderSettings)
    quiet_period: float = 0.03
    max_delay: float = 1.0
    retry_delay: float = 2.0
    reload_timeout: float = 15.0
    keep_server_state: bool = True
    runtime_api: bool = True
    drain_interval: float = 1.0

    @property
    def state_file(self) -> Path:
        """Where HAProxy's server states are saved before each reload."""
        return self.config_dir / "server-state"

    @property
    def rendering(self) -> RenderSettings:
        """The render settings, pointing HAProxy at the server-state file."""
        if not self.keep_server_state:
            return self.render
        return replace(self.render, server_state_file=str(self.state_file))


@dataclass(frozen=True)
class ApplyResult:
    """What became of one revision."""

    revision: int
    outcome: Outcome
    error: str = ""
    durations: dict[str, float] = field(default_factory=dict)
    worker_pid: int | None = None

    @property
    def retryable(self) -> bool:
        """Whether trying the same revision again later may succeed."""
        return self.outcome in ("check_unavailable", "install_failed", "reload_failed")


@dataclass(frozen=True)
class LastGood:
    """The last document HAProxy was confirmed to serve, kept on disk."""

    revision: int
    value: bytes
    digest: str

    @classmethod
    def load(cls, data_dir: Path) -> LastGood | None:
        """Read the record from `data_dir`, or None when there is none yet."""
        path = data_dir / "last-good.json"
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                int(record["revision"]),
                record["value"].encode(),
                str(record["digest"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    def save(self, data_dir: Path) -> None:
        """Write the record atomically into `data_dir`."""
        data_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "revision": self.revision,
            "value": self.value.decode(),
            "digest": self.digest,
            "saved_at": time.time(),
        }
        _write_atomically(data_dir / "last-good.json", json.dumps(record))


def initial_files(settings: SidecarSettings) -> Rendered:
    """Render what HAProxy should start with: the last good document, or none."""
    return starting_files(settings, {})[0]


def starting_files(
    settings: SidecarSettings, installed: Mapping[str, str]
) -> tuple[Rendered, str]:
    """Choose what HAProxy serves at start-up; say which, for the log.

    The last good record, rendered with the current settings, comes first.
    Without one (a data directory that was not kept, a sidecar killed before
    it recorded a reload), the `installed` files stay: they passed `haproxy
    -c` when they were installed, and are all there is until NATS answers.
    Only when nothing is installed does HAProxy start from the empty document.
    """
    last = LastGood.load(settings.data_dir)
    if last is not None:
        try:
            rendered = render(parse_document(last.value), settings.rendering)
            return rendered, f"revision {last.revision} from the last good record"
        except DocumentError as exc:
            log.warning("the last good document no longer renders: %s", _one_line(exc))
    if installed:
        return Rendered(dict(installed)), "the installed files, no last good record"
    empty = render(parse_document(EMPTY_DOCUMENT), settings.rendering)
    return empty, "the empty document, no last good record"


@dataclass
class _WorkerState:
    """What the sidecar knows of the running worker beyond the live files.

    `dirty` is set when runtime commands may have been applied in part: the
    worker then matches no render, and only a reload brings it back in line;
    `untrusted` names the servers those commands touched. `parked` holds the
    servers removed at runtime that are in maintenance until their
    connections drain, with the `add server` arguments they had. `lock` keeps
    the deletion of drained servers out of an apply's way.
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    untrusted: set[str] = field(default_factory=set)
    parked: dict[str, str] = field(default_factory=dict)

    @property
    def stateless(self) -> set[str]:
        """Servers whose runtime state must not be carried into a new worker."""
        return self.untrusted | set(self.parked)

    def failed(self, commands: Sequence[str]) -> None:
        """Note commands that may have run in part."""
        self.dirty = True
        self.untrusted |= touched_servers(commands)

    def reloaded(self) -> None:
        """Forget the runtime changes: a new worker has read the files."""
        self.dirty = False
        self.untrusted.clear()
        self.parked.clear()

    def sent(
        self, commands: Sequence[str], result: SendResult, args: Mapping[str, str]
    ) -> None:
        """Record the servers enabled again and those left draining."""
        for command in commands:
            if command.startswith("enable server "):
                self.parked.pop(command.removeprefix("enable server "), None)
        for path in result.draining:
            self.parked[path] = args.get(path, "")


class Sidecar:
    """Follows a change source and keeps HAProxy serving the newest good revision.

    `on_result` is called with every `ApplyResult`, for status and metrics.
    """

    def __init__(
        self,
        settings: SidecarSettings,
        source: ChangeSource,
        *,
        master: MasterSocket | None = None,
        on_result: Callable[[ApplyResult], None] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.master = master or MasterSocket(settings.master_socket)
        self.on_result = on_result
        self.last_good = LastGood.load(settings.data_dir)
        self.latest_revision: int | None = None
        self.last_result: ApplyResult | None = None
        self._pending: Entry | None = None
        self._changed = asyncio.Event()
        self._idle_since = -math.inf
        self._worker = _WorkerState()

    @property
    def applied_revision(self) -> int | None:
        """The revision HAProxy serves now, if any."""
        return self.last_good.revision if self.last_good else None

    async def run(self) -> None:
        """Make sure HAProxy serves the installed files, then follow the source."""
        await self.ensure_served()
        async with self.source, asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow())
            tasks.create_task(self._apply_forever())
            tasks.create_task(self._delete_drained_forever())

    async def ensure_served(self) -> None:
        """Install the start-up files (`starting_files`) if need be, then reload once.

        A reload at start-up makes sure the running HAProxy serves the files on
        disk, whoever wrote them; it is hitless, so it costs nothing to clients.
        When nothing is installed yet, the files go in before anything else:
        an HAProxy that waits for its first configuration (as in the compose
        setup) can then start while the sidecar waits for its master socket.
        """
        live = self.settings.config_dir
        try:
            installed = await asyncio.to_thread(read_installed, live)
            rendered, source = starting_files(self.settings, installed)
            if not installed:
                await asyncio.to_thread(install, rendered.files, live)
                installed = rendered.files
            await self._await_master()
            async with self._worker.lock:
                if installed != rendered.files:
                    await self._install_and_reload(rendered, installed)
                else:
                    await self.master.reload(timeout=self.settings.reload_timeout)
                    self._worker.reloaded()
        except (InstallError, ReloadError) as exc:
            log.error("could not confirm HAProxy serves the installed files: %s", exc)
            return
        log.info("HAProxy serves %s", source)

    async def _await_master(self) -> None:
        """Wait, up to `reload_timeout`, until HAProxy's master socket answers.

        The sidecar may start before HAProxy does. If the socket still does
        not answer, the reload that follows says so.
        """
        path, bound = self.master.path, self.settings.reload_timeout
        try:
            await MasterSocket(path, retry_for=0).show_proc()
            return
        except ReloadError as exc:
            reason = getattr(exc.__cause__, "strerror", None) or "no answer"
            log.info(
                "HAProxy's master socket %s does not answer yet (%s); "
                "waiting up to %g s",
                path,
                reason,
                bound,
            )
        started = time.monotonic()
        with contextlib.suppress(ReloadError):
            await MasterSocket(path, retry_for=bound).show_proc()
            log.info(
                "HAProxy's master answered after %.1f s", time.monotonic() - started
            )

    async def _follow(self) -> None:
        async for entry in self.source.watch():
            self.latest_revision = entry.revision
            self._pending = entry
            self._changed.set()

    async def _apply_forever(self) -> None:
        retrying: Entry | None = None
        failures = 0
        while True:
            await self._changed.wait()
            if time.monotonic() - self._idle_since < self.settings.quiet_period:
                await self._settle()
            self._changed.clear()
            entry, self._pending = self._pending, None
            if entry is None:
                continue
            result = await self.apply(entry)
            self._idle_since = time.monotonic()
            failures = failures + 1 if entry is retrying else 1
            retrying = None
            retry = result.retryable and self._pending is None
            if retry and await self._may_retry(result):
                await self._retry_later(entry, failures)
                retrying = entry

    async def _retry_later(self, entry: Entry, failures: int) -> None:
        """Queue `entry` again after a delay that doubles with each failure.

        A newer revision arriving meanwhile ends the wait and is applied
        instead; the failed one is then left behind, as newer always wins.
        """
        delay = min(self.settings.retry_delay * 2 ** (failures - 1), MAX_RETRY_DELAY)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._changed.wait()
        if self._pending is None:
            self._pending = entry
            self._changed.set()

    async def _may_retry(self, result: ApplyResult) -> bool:
        """Whether trying the reload of `result` again is safe; say so when not.

        Only a reload HAProxy refused has a cost: each one pauses the serving
        worker's listeners while HAProxy retries the bind, and counts against
        that worker's `mworker-max-reloads`. A master that does not answer
        counts nothing, and is always tried again.
        """
        if result.outcome != "reload_failed":
            return True
        try:
            state = await self.master.show_proc()
        except ReloadError:
            return True
        reason = _no_retry_reason(state, self.settings.render.max_reloads)
        if reason:
            log.error(
                "revision %d: not retrying the reload: %s; waiting for a new "
                "revision, still serving revision %s",
                result.revision,
                reason,
                self.applied_revision,
            )
        return not reason

    async def _settle(self) -> None:
        """Wait until changes pause for the quiet period, or `max_delay` passed."""
        started = time.monotonic()
        while True:
            self._changed.clear()
            await asyncio.sleep(self.settings.quiet_period)
            waited = time.monotonic() - started
            if not self._changed.is_set() or waited >= self.settings.max_delay:
                self._changed.clear()
                return

    async def apply(self, entry: Entry) -> ApplyResult:
        """Apply one revision of the key; never raises for an expected failure."""
        started = time.monotonic()
        try:
            async with self._worker.lock:
                result = await self._apply(entry, started)
        except MomusError as exc:
            result = ApplyResult(entry.revision, _outcome(exc), _one_line(exc))
        except Exception as exc:
            # A bug of ours must cost this revision only, never the process
            # (in standalone mode, HAProxy and NATS with it).
            log.exception("revision %d: unexpected error", entry.revision)
            reason = f"unexpected {type(exc).__name__}: {quoted(str(exc))}"
            result = ApplyResult(entry.revision, "internal_error", reason)
        self._report(result, started)
        return result

    async def _apply(self, entry: Entry, started: float) -> ApplyResult:
        if entry.operation != "PUT" or entry.value is None:
            return ApplyResult(entry.revision, "kept", f"key {entry.operation.lower()}")
        durations: dict[str, float] = {}
        with _collector_paused():
            document = parse_document(entry.value)
            _warn(entry.revision, document)
            rendered = render(document, self.settings.rendering)
        durations["render"] = time.monotonic() - started
        installed = await asyncio.to_thread(read_installed, self.settings.config_dir)
        if self._is_live(rendered, installed):
            self._remember(entry, rendered)
            return ApplyResult(entry.revision, "unchanged", durations=durations)
        step = time.monotonic()
        commands = await self._check_and_plan(rendered, installed)
        durations["check"] = time.monotonic() - step
        step = time.monotonic()
        if await self._apply_at_runtime(entry.revision, rendered, installed, commands):
            durations["runtime"] = time.monotonic() - step
            self._remember(entry, rendered)
            return ApplyResult(entry.revision, "runtime", "", durations)
        step = time.monotonic()
        worker = await self._install_and_reload(rendered, installed)
        durations["reload"] = time.monotonic() - step
        self._remember(entry, rendered)
        return ApplyResult(entry.revision, "applied", "", durations, worker)

    def _is_live(self, rendered: Rendered, installed: dict[str, str]) -> bool:
        good = self.last_good
        if good is None or good.digest != rendered.digest or self._worker.dirty:
            return False
        return installed == rendered.files

    async def _check(self, rendered: Rendered) -> None:
        scratch_root = self.settings.data_dir / "scratch"
        try:
            scratch_root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
                await asyncio.to_thread(_write_scratch, rendered.files, Path(scratch))
                await check(Path(scratch), haproxy_bin=self.settings.haproxy_bin)
        except OSError as exc:
            raise CheckUnavailableError(
                f"cannot write the files to check into {str(scratch_root)!r}: "
                f"{exc.strerror or exc}; nothing was installed."
            ) from exc

    async def _check_and_plan(
        self, rendered: Rendered, installed: dict[str, str]
    ) -> list[str] | None:
        """Check `rendered`; meanwhile, work out its runtime commands, if any.

        `haproxy -c` runs in a process of its own, so comparing the renders
        (in a thread) costs no time of its own. A failed check raises.
        """
        checking = asyncio.create_task(self._check(rendered))
        try:
            commands = await self._runtime_commands(installed, rendered)
        except BaseException:
            checking.cancel()
            raise
        await checking
        return commands

    async def _apply_at_runtime(
        self,
        revision: int,
        rendered: Rendered,
        installed: dict[str, str],
        commands: list[str] | None,
    ) -> bool:
        """Install `rendered` and send `commands` through the runtime API.

        Returns False, with nothing installed, when there are no commands (a
        reload is needed); and False after installing when HAProxy refused a
        command, in which case the reload that follows brings the worker in
        line with the files.
        """
        if commands is None:
            return False
        await asyncio.to_thread(install, rendered.files, self.settings.config_dir)
        try:
            sent = await send(self.master, commands)
        except ReloadError as exc:
            self._worker.failed(commands)
            log.warning("revision %d: %s; reloading instead", revision, exc)
            return False
        drained = server_args(Rendered(installed), sent.draining)
        self._worker.sent(commands, sent, drained)
        return True

    async def _runtime_commands(
        self, installed: dict[str, str], rendered: Rendered
    ) -> list[str] | None:
        if not self.settings.runtime_api or self._worker.dirty or not installed:
            return None
        try:
            loaded = loaded_maps(await self.master.worker_command("show map"))
        except ReloadError as exc:
            log.debug("cannot list the worker's maps (%s); reloading", exc)
            return None
        live, parked = Rendered(installed), dict(self._worker.parked)

        def compare() -> list[str] | None:
            with _collector_paused():
                return runtime_changes(live, rendered, loaded=loaded, parked=parked)

        return await asyncio.to_thread(compare)

    async def _install_and_reload(
        self, rendered: Rendered, previous: dict[str, str]
    ) -> int | None:
        """Install `rendered` and reload; on failure put `previous` back."""
        live = self.settings.config_dir
        done = await asyncio.gather(
            asyncio.to_thread(install, rendered.files, live),
            self._save_server_state(rendered, previous),
            return_exceptions=True,
        )
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        try:
            result = await self.master.reload(timeout=self.settings.reload_timeout)
        except ReloadError:
            with contextlib.suppress(InstallError):
                if previous:
                    await asyncio.to_thread(install, previous, live)
            raise
        self._worker.reloaded()
        return result.new_pids[0] if result.new_pids else None

    async def _save_server_state(
        self, rendered: Rendered, previous: dict[str, str]
    ) -> None:
        """Save the servers' health and weights, for the new worker to start from.

        Without it a new worker assumes every server is up, and sends requests
        to a server that checks had marked down until its own checks catch up.
        Left out, so that the new worker starts them as the files say: servers
        whose line changes (HAProxy would keep the old port over the new one),
        servers removed at runtime and still draining (one that comes back
        must not come back in maintenance), and those a refused batch of
        runtime commands touched.
        """
        if not self.settings.keep_server_state:
            return
        try:
            text = await self.master.worker_command("show servers state")
            changed = set()
            if CONFIG in previous:
                live = Rendered(previous)
                changed = await asyncio.to_thread(changed_servers, live, rendered)
            text = _without_servers(text, self._worker.stateless | changed)
            await asyncio.to_thread(_write_atomically, self.settings.state_file, text)
        except (MomusError, OSError) as exc:
            log.warning("could not save server state before the reload: %s", exc)

    async def _delete_drained_forever(self) -> None:
        """Delete the servers removed at runtime once their connections are gone."""
        while True:
            await asyncio.sleep(self.settings.drain_interval)
            if self._worker.parked:
                async with self._worker.lock:
                    await self._delete_drained()

    async def _delete_drained(self) -> None:
        for path in sorted(self._worker.parked):
            try:
                answer = await self.master.worker_command(f"del server {path}")
            except ReloadError as exc:
                log.debug("cannot delete drained server %s yet: %s", path, exc)
                return
            if not answer.strip().startswith("Server still has connections"):
                log.debug("deleting drained server %s: %s", path, answer.strip())
                self._worker.parked.pop(path, None)

    def _remember(self, entry: Entry, rendered: Rendered) -> None:
        assert entry.value is not None
        self.last_good = LastGood(entry.revision, entry.value, rendered.digest)
        try:
            self.last_good.save(self.settings.data_dir)
        except OSError as exc:
            log.error("cannot save the last good revision: %s", exc)

    def _report(self, result: ApplyResult, started: float) -> None:
        self.last_result = result
        total = (time.monotonic() - started) * 1000
        if result.outcome == "applied":
            log.info(
                "revision %d applied in %.0f ms (render %.0f, check %.0f, "
                "reload %.0f ms); worker %s",
                result.revision,
                total,
                *(
                    result.durations.get(k, 0) * 1000
                    for k in ("render", "check", "reload")
                ),
                result.worker_pid,
            )
        elif result.outcome == "runtime":
            log.info(
                "revision %d applied at runtime in %.0f ms (render %.0f, check %.0f, "
                "runtime %.0f ms); no reload",
                result.revision,
                total,
                *(
                    result.durations.get(k, 0) * 1000
                    for k in ("render", "check", "runtime")
                ),
            )
        elif result.outcome == "unchanged":
            log.info("revision %d renders what is live; no reload", result.revision)
        elif result.outcome == "kept":
            log.info(
                "revision %d: %s; keeping revision %s",
                result.revision,
                result.error,
                self.applied_revision,
            )
        else:
            level = logging.WARNING if result.outcome == "refused" else logging.ERROR
            log.log(
                level,
                "revision %d %s: %s; still serving revision %s",
                result.revision,
                result.outcome.replace("_", " "),
                result.error.rstrip("."),
                self.applied_revision,
            )
        if self.on_result is not None:
            self.on_result(result)


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector around a burst of allocations.

    Parsing and rendering a large document make hundreds of thousands of
    objects that all live until the render is done; each full collection on
    the way walks them all again, which took about a third of the time at
    10,000 routes. Reference counting frees them as usual; the collector
    resumes afterwards.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _write_scratch(files: Mapping[str, str], directory: Path) -> None:
    """Write files for `haproxy -c` only: no fsync, the directory is thrown away."""
    for name, text in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise InstallError(f"refusing to write {name!r} outside {directory}.")
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _without_servers(state: str, servers: Collection[str]) -> str:
    """Drop the lines of `servers` (`backend/server`) from `show servers state`."""
    if not servers:
        return state
    kept = []
    for line in state.splitlines(keepends=True):
        fields = line.split()
        if len(fields) > 3 and f"{fields[1]}/{fields[3]}" in servers:
            continue
        kept.append(line)
    return "".join(kept)


def _no_retry_reason(state: ProcState, max_reloads: int) -> str:
    """Why another reload attempt must wait for a new revision, or "" if not.

    A failed reload adds one to the serving worker's reload count; the next
    good reload adds one more, and HAProxy ends a worker whose count then
    exceeds `mworker-max-reloads`.
    """
    if state.failed_reloads >= RELOAD_ATTEMPTS:
        return f"HAProxy refused the last {state.failed_reloads} reloads"
    worker = state.workers[0] if state.workers else None
    if worker is not None and 0 < max_reloads <= worker.reloads + 1:
        return (
            f"worker {worker.pid} has lived through {worker.reloads} reloads, and "
            f"one more failed reload would make HAProxy end it at the next good "
            f"one (mworker-max-reloads {max_reloads})"
        )
    return ""


def _outcome(exc: MomusError) -> Outcome:
    if isinstance(exc, DocumentError):
        return "refused"
    if isinstance(exc, CheckUnavailableError):
        return "check_unavailable"
    if isinstance(exc, CheckError):
        return "check_failed"
    if isinstance(exc, InstallError):
        return "install_failed"
    if isinstance(exc, ReloadError):
        return "reload_failed"
    return "refused"


def _one_line(exc: MomusError) -> str:
    if isinstance(exc, DocumentError):
        return exc.summary()
    return " ".join(str(exc).split())


def _warn(revision: int, document: Document) -> None:
    for warning in document.warnings:
        log.warning("revision %d: %s", revision, warning)


def describe(result: ApplyResult) -> dict[str, Any]:
    """A JSON-ready summary of a result, for status records."""
    return {
        "revision": result.revision,
        "result": result.outcome,
        "error": result.error,
        "durations_ms": {k: round(v * 1000, 1) for k, v in result.durations.items()},
    }
