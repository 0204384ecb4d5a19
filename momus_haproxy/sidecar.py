"""The apply loop: follow the key, and turn each new revision into HAProxy's state.

For each change: validate, render, `haproxy -c` in a scratch directory,
install into the live directory, reload through the master socket and confirm
a new worker took over, then record the revision as the last good one. Every
step can fail; a failure leaves the live files and the running HAProxy as they
were, and is told in one log line naming the revision.

Bursts are coalesced: the applier waits for a short quiet period after a
change (bounded by `max_delay`) and then applies only the newest revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

from .check import check
from .document import Document, parse_document
from .errors import (
    CheckError,
    DocumentError,
    InstallError,
    MomusError,
    ReloadError,
)
from .install import install, read_installed
from .reload import MasterSocket
from .render import Rendered, RenderSettings, render
from .watch import Entry

__all__ = [
    "EMPTY_DOCUMENT",
    "ApplyResult",
    "LastGood",
    "Sidecar",
    "SidecarSettings",
    "initial_files",
]

log = logging.getLogger(__name__)

EMPTY_DOCUMENT = b'{"Routes": [], "Clusters": []}'

Outcome = Literal[
    "applied",
    "unchanged",
    "refused",
    "check_failed",
    "install_failed",
    "reload_failed",
    "kept",
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
        return self.outcome in ("install_failed", "reload_failed")


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
    last = LastGood.load(settings.data_dir)
    value = last.value if last else EMPTY_DOCUMENT
    try:
        return render(parse_document(value), settings.rendering)
    except DocumentError as exc:
        log.warning("last good document no longer renders (%s); starting empty", exc)
        return render(parse_document(EMPTY_DOCUMENT), settings.rendering)


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

    async def ensure_served(self) -> None:
        """Install the last good render if the live files differ, then reload once.

        A reload at start-up makes sure the running HAProxy serves the files on
        disk, whoever wrote them; it is hitless, so it costs nothing to clients.
        """
        rendered = initial_files(self.settings)
        installed = read_installed(self.settings.config_dir)
        try:
            if installed != rendered.files:
                await self._install_and_reload(rendered)
            else:
                await self.master.reload(timeout=self.settings.reload_timeout)
        except (InstallError, ReloadError) as exc:
            log.error("could not confirm HAProxy serves the installed files: %s", exc)

    async def _follow(self) -> None:
        async for entry in self.source.watch():
            self.latest_revision = entry.revision
            self._pending = entry
            self._changed.set()

    async def _apply_forever(self) -> None:
        while True:
            await self._changed.wait()
            await self._settle()
            entry, self._pending = self._pending, None
            if entry is None:
                continue
            result = await self.apply(entry)
            if result.retryable and self._pending is None:
                await asyncio.sleep(self.settings.retry_delay)
                if self._pending is None:
                    self._pending = entry
                    self._changed.set()

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
            result = await self._apply(entry, started)
        except MomusError as exc:
            result = ApplyResult(entry.revision, _outcome(exc), _one_line(exc))
        self._report(result, started)
        return result

    async def _apply(self, entry: Entry, started: float) -> ApplyResult:
        if entry.operation != "PUT" or entry.value is None:
            return ApplyResult(entry.revision, "kept", f"key {entry.operation.lower()}")
        durations: dict[str, float] = {}
        document = parse_document(entry.value)
        _warn(entry.revision, document)
        rendered = render(document, self.settings.rendering)
        durations["render"] = time.monotonic() - started
        if self._is_live(rendered):
            self._remember(entry, rendered)
            return ApplyResult(entry.revision, "unchanged", durations=durations)
        step = time.monotonic()
        await self._check(rendered)
        durations["check"] = time.monotonic() - step
        step = time.monotonic()
        worker = await self._install_and_reload(rendered)
        durations["reload"] = time.monotonic() - step
        self._remember(entry, rendered)
        return ApplyResult(entry.revision, "applied", "", durations, worker)

    def _is_live(self, rendered: Rendered) -> bool:
        good = self.last_good
        if good is None or good.digest != rendered.digest:
            return False
        return read_installed(self.settings.config_dir) == rendered.files

    async def _check(self, rendered: Rendered) -> None:
        scratch_root = self.settings.data_dir / "scratch"
        scratch_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
            await asyncio.to_thread(install, rendered.files, Path(scratch))
            await check(Path(scratch), haproxy_bin=self.settings.haproxy_bin)

    async def _install_and_reload(self, rendered: Rendered) -> int | None:
        live = self.settings.config_dir
        previous = await asyncio.to_thread(read_installed, live)
        await asyncio.to_thread(install, rendered.files, live)
        await self._save_server_state()
        try:
            result = await self.master.reload(timeout=self.settings.reload_timeout)
        except ReloadError:
            with contextlib.suppress(InstallError):
                if previous:
                    await asyncio.to_thread(install, previous, live)
            raise
        return result.new_pids[0] if result.new_pids else None

    async def _save_server_state(self) -> None:
        """Save the servers' health and weights, for the new worker to start from.

        Without it a new worker assumes every server is up, and sends requests
        to a server that checks had marked down until its own checks catch up.
        """
        if not self.settings.keep_server_state:
            return
        try:
            text = await self.master.worker_command("show servers state")
            await asyncio.to_thread(_write_atomically, self.settings.state_file, text)
        except (MomusError, OSError) as exc:
            log.warning("could not save server state before the reload: %s", exc)

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
                result.error,
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


def _outcome(exc: MomusError) -> Outcome:
    if isinstance(exc, DocumentError):
        return "refused"
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
