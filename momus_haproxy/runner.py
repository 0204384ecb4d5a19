"""Run the sidecar in one of its two modes, with one code path.

- Sidecar mode: HAProxy runs elsewhere in master-worker mode; we are given
  its config directory and master socket.
- Standalone mode: we start an embedded nats-server and HAProxy ourselves,
  then run exactly the same sidecar against them, and stop both on the way
  out (HAProxy finishing the requests in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import MomusError, ReloadError
from .haproxy import HAProxyProcess
from .health import HealthServer
from .install import install
from .nats_server import EmbeddedNats
from .reload import MasterSocket
from .sidecar import Sidecar, SidecarSettings, initial_files
from .watch import NatsOptions, Store

__all__ = ["RunOptions", "run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Everything `momus-haproxy run` needs."""

    sidecar: SidecarSettings
    nats: NatsOptions
    standalone: bool = False
    health_bind: str | None = "127.0.0.1:8081"
    once: bool = False


async def run(options: RunOptions) -> None:
    """Run until cancelled (SIGTERM, Ctrl-C), in the mode `options` asks for."""
    if not options.standalone:
        await _serve(options)
        return
    async with _standalone(options) as settings:
        await _serve(replace(options, sidecar=settings))


@contextlib.asynccontextmanager
async def _standalone(options: RunOptions) -> AsyncIterator[SidecarSettings]:
    settings = options.sidecar
    data = settings.data_dir
    url = options.nats.servers[0]
    async with EmbeddedNats(url, data / "nats"):
        files = initial_files(settings).files
        await asyncio.to_thread(install, files, settings.config_dir)
        haproxy = HAProxyProcess(
            settings.config_dir, data / "run", haproxy_bin=settings.haproxy_bin
        )
        async with haproxy:
            _banner(options, haproxy)
            yield replace(settings, master_socket=haproxy.master_socket)


def _banner(options: RunOptions, haproxy: HAProxyProcess) -> None:
    nats = options.nats
    lines = [
        f"HAProxy (pid {haproxy.pid}) serves http://{options.sidecar.render.http_bind}/",
        f"NATS listens on {nats.servers[0]}; bucket {nats.bucket!r}, key {nats.key!r}",
        "Put a routing document with any NATS client, for example:",
        f"  nats --server {nats.servers[0]} kv put {nats.bucket} {nats.key} "
        '"$(cat route-config.json)"',
        f"  momus-haproxy config put route-config.json --nats-url {nats.servers[0]}",
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


async def _serve(options: RunOptions) -> None:
    store = Store(options.nats, wait=True)
    sidecar = Sidecar(options.sidecar, store)
    health = _health(options, sidecar)
    async with contextlib.AsyncExitStack() as stack:
        if health is not None:
            await stack.enter_async_context(health)
        if options.once:
            await _apply_once(sidecar, store)
            return
        await sidecar.run()


async def _apply_once(sidecar: Sidecar, store: Store) -> None:
    await sidecar.ensure_served()
    async with store:
        entry = await store.get()
    if entry is None:
        log.info("the key holds no document; nothing to apply")
        return
    result = await sidecar.apply(entry)
    if result.outcome not in ("applied", "unchanged", "kept"):
        raise _OnceError(result.error)


class _OnceError(MomusError):
    exit_code = 2


def _health(options: RunOptions, sidecar: Sidecar) -> HealthServer | None:
    if not options.health_bind:
        return None
    host, _, port = options.health_bind.rpartition(":")
    master = MasterSocket(sidecar.settings.master_socket, retry_for=0.5)

    async def ready() -> tuple[bool, str]:
        if sidecar.applied_revision is None:
            return False, "no revision applied yet"
        try:
            state = await master.show_proc()
        except ReloadError as exc:
            return False, f"HAProxy's master does not answer: {exc}"
        revision = sidecar.applied_revision
        return True, f"revision {revision} served by master pid {state.master_pid}"

    return HealthServer(host.strip("[]") or "127.0.0.1", int(port), ready)


def default_paths(data_dir: Path) -> tuple[Path, Path]:
    """Config directory and master socket used by standalone mode by default."""
    return data_dir / "haproxy", data_dir / "run" / "master.sock"
