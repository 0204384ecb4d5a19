"""Run the sidecar in one of its two modes, with one code path.

- Sidecar mode: HAProxy runs elsewhere in master-worker mode; we are given
  its config directory and master socket.
- Standalone mode: we start an embedded nats-server and HAProxy ourselves,
  then run exactly the same sidecar against them, and stop both on the way
  out (HAProxy finishing the requests in flight). HAProxy 2.6 exits as a
  whole when its worker dies; standalone mode then starts it again on the
  installed files, as Docker's restart policy does in sidecar mode.

Around the sidecar in both modes: the health listener (`/healthz`, `/readyz`,
`/metrics`) and the heartbeat that writes this instance's status record.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from .check import haproxy_version
from .errors import (
    CheckError,
    DocumentError,
    InstallError,
    MomusError,
    ProcessError,
    ReloadError,
)
from .haproxy import HAProxyProcess
from .health import HealthServer, check_bind
from .install import install, read_installed
from .metrics import Metrics
from .nats_server import EmbeddedNats
from .reload import MasterSocket
from .sidecar import ApplyResult, Sidecar, SidecarSettings, starting_files
from .status import Heartbeat, StatusSettings, Tracker
from .watch import NatsOptions, Store

__all__ = ["Instance", "RunOptions", "run", "serve"]

log = logging.getLogger(__name__)

RESTART_DELAY = 0.5
"""Seconds before standalone mode starts an exited HAProxy again, at first."""

MAX_RESTART_DELAY = 30.0
"""The restart delay doubles while HAProxy keeps exiting, up to this."""

STABLE_AFTER = 60.0
"""Seconds HAProxy must run for the restart delay to go back to the first one."""


@dataclass(frozen=True)
class RunOptions:
    """Everything `momus-haproxy run` needs."""

    sidecar: SidecarSettings
    nats: NatsOptions
    standalone: bool = False
    health_bind: str | None = "127.0.0.1:8081"
    once: bool = False
    status: StatusSettings = field(default_factory=StatusSettings)
    ready_max_lag: float = 60.0
    """Seconds the store's latest revision may wait before /readyz fails (0: never)."""


async def run(options: RunOptions) -> None:
    """Run until cancelled (SIGTERM, Ctrl-C), in the mode `options` asks for."""
    if not options.standalone:
        await _serve(options)
        return
    if options.health_bind:
        check_bind(*_health_address(options.health_bind))
    async with _standalone(options) as settings:
        await _serve(replace(options, sidecar=settings))


@contextlib.asynccontextmanager
async def _standalone(options: RunOptions) -> AsyncIterator[SidecarSettings]:
    settings = options.sidecar
    data = settings.data_dir
    url = options.nats.servers[0]
    nats = EmbeddedNats(url, data / "nats")
    async with nats, _restarted(nats, "nats-server", "the same store"):
        installed = await asyncio.to_thread(read_installed, settings.config_dir)
        rendered, _ = starting_files(settings, installed)
        if rendered.files != installed:
            await asyncio.to_thread(install, rendered.files, settings.config_dir)
        haproxy = HAProxyProcess(
            settings.config_dir, data / "run", haproxy_bin=settings.haproxy_bin
        )
        async with haproxy, _restarted(haproxy, "HAProxy", "the installed files"):
            _banner(options, haproxy)
            yield replace(settings, master_socket=haproxy.master_socket)


class _Child(Protocol):
    """A process standalone mode starts and keeps running."""

    @property
    def returncode(self) -> int | None: ...

    async def start(self) -> object: ...


@contextlib.asynccontextmanager
async def _restarted(child: _Child, name: str, on: str) -> AsyncIterator[None]:
    """Keep `child` running for the duration: start it again when it exits."""
    task = asyncio.create_task(_keep_running(child, name, on))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _keep_running(child: _Child, name: str, on: str) -> None:
    """Start `child` again (on `on`, for the log) each time it exits.

    The delay before a start doubles while it keeps exiting (or failing to
    start), and goes back to `RESTART_DELAY` once it has run for
    `STABLE_AFTER` seconds.
    """
    delay = RESTART_DELAY
    while True:
        started = time.monotonic()
        # HAProxy runs as a `subprocess.Popen`, whose exit nothing signals to
        # the event loop; reading a status ten times a second costs nothing.
        while (status := child.returncode) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        if time.monotonic() - started >= STABLE_AFTER:
            delay = RESTART_DELAY
        log.warning(
            "%s exited with status %s; starting it again on %s in %.1f s",
            name,
            status,
            on,
            delay,
        )
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RESTART_DELAY)
        try:
            await child.start()
        except ProcessError as exc:
            log.error("could not start %s again: %s", name, " ".join(str(exc).split()))


def _command() -> str:
    """How this program was started, so the banner's example runs as printed."""
    name = Path(sys.argv[0])
    return str(name) if name.name == "momus-haproxy" else "momus-haproxy"


def _banner(options: RunOptions, haproxy: HAProxyProcess) -> None:
    nats = options.nats
    lines = [
        f"HAProxy (pid {haproxy.pid}) serves http://{options.sidecar.render.http_bind}/",
        f"NATS listens on {nats.servers[0]}; bucket {nats.bucket!r}, key {nats.key!r}",
        "Put a routing document with any NATS client, for example:",
        f"  nats --server {nats.servers[0]} kv put {nats.bucket} {nats.key} "
        '"$(cat route-config.json)"',
        f"  {_command()} config put route-config.json --nats-url {nats.servers[0]}",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


@dataclass
class Instance:
    """The sidecar and what watches it: progress, metrics and status record."""

    sidecar: Sidecar
    store: Store
    tracker: Tracker
    metrics: Metrics
    heartbeat: Heartbeat

    @classmethod
    def build(cls, options: RunOptions) -> Instance:
        """Wire a sidecar, its store and its observers from `options`."""
        # `--once` gives up on an unreachable NATS, as the one-shot commands do.
        store = Store(options.nats, wait=not options.once)
        sidecar = Sidecar(options.sidecar, store)
        tracker = Tracker(sidecar)
        metrics = Metrics(options.status.instance_id)
        metrics.follow(
            sidecar,
            latest=lambda: tracker.latest_revision,
            lag=tracker.lag,
            connected=lambda: store.connected,
        )
        version = functools.partial(_haproxy_version, sidecar)
        heartbeat = Heartbeat(options.status, options.nats, tracker, version)
        instance = cls(sidecar, store, tracker, metrics, heartbeat)
        sidecar.on_result = instance.on_result
        return instance

    def on_result(self, result: ApplyResult) -> None:
        """Pass one result of the sidecar to each observer."""
        self.tracker.on_result(result)
        self.metrics.observe(result)
        self.heartbeat.wake()


async def _haproxy_version(sidecar: Sidecar) -> str:
    """The running HAProxy's version, else the one of the check binary."""
    with contextlib.suppress(ReloadError):
        state = await sidecar.master.show_proc()
        if state.master.version:
            return state.master.version
    return await asyncio.to_thread(haproxy_version, sidecar.settings.haproxy_bin)


async def _serve(options: RunOptions) -> None:
    await serve(options, Instance.build(options))


async def serve(options: RunOptions, instance: Instance) -> None:
    """Run `instance` with its health listener and heartbeat, until cancelled."""
    health = _health(options, instance)
    async with contextlib.AsyncExitStack() as stack:
        if health is not None:
            await stack.enter_async_context(health)
        await stack.enter_async_context(instance.heartbeat)
        if options.once:
            await _apply_once(instance.sidecar, instance.store)
            return
        await instance.sidecar.run()


async def _apply_once(sidecar: Sidecar, store: Store) -> None:
    await sidecar.ensure_served()
    async with store:
        entry = await store.get()
    if entry is None:
        log.info("the key holds no document; nothing to apply")
        return
    result = await sidecar.apply(entry)
    if result.outcome in _ONCE_EXIT:
        error = _OnceError(f"revision {result.revision}: {result.error}")
        error.exit_code = _ONCE_EXIT[result.outcome]
        raise error


class _OnceError(MomusError):
    """`run --once` could not apply the current value; exit as the stage did."""


_ONCE_EXIT = {
    "refused": DocumentError.exit_code,
    "check_failed": CheckError.exit_code,
    "check_unavailable": CheckError.exit_code,
    "install_failed": InstallError.exit_code,
    "reload_failed": ReloadError.exit_code,
    "internal_error": MomusError.exit_code,
}


def _health_address(bind: str) -> tuple[str, int]:
    """Split `--health-bind` (`ADDR:PORT`, `[::1]:PORT`) into host and port."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _health(options: RunOptions, instance: Instance) -> HealthServer | None:
    if not options.health_bind:
        return None
    host, port = _health_address(options.health_bind)
    sidecar, tracker = instance.sidecar, instance.tracker
    master = MasterSocket(sidecar.settings.master_socket, retry_for=0.5)

    async def ready() -> tuple[bool, str]:
        revision = sidecar.applied_revision
        if revision is None:
            return False, "no revision applied yet"
        lag = tracker.lag()
        if options.ready_max_lag and lag > options.ready_max_lag:
            return False, (
                f"revision {tracker.latest_revision} of the store has waited "
                f"{lag:.0f} s (more than --ready-max-lag {options.ready_max_lag:g}); "
                f"serving revision {revision}"
            )
        try:
            state = await master.show_proc()
        except ReloadError as exc:
            return False, f"HAProxy's master does not answer: {exc}"
        return True, f"revision {revision} served by master pid {state.master_pid}"

    return HealthServer(host, port, ready, instance.metrics.render)


def default_paths(data_dir: Path) -> tuple[Path, Path]:
    """Config directory and master socket used by standalone mode by default."""
    return data_dir / "haproxy", data_dir / "run" / "master.sock"
