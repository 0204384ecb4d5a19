"""A whole sidecar stack for tests: real nats-server, real HAProxy, our loop.

`sidecar_stack` starts HAProxy on the sidecar's initial files, then runs
`Sidecar` as a task of the test's event loop against the `nats_server`
fixture. `stack.results` collects every `ApplyResult`; `stack.wait_for(...)`
waits for one to match. Requests go through `stack.get(...)`, which runs the
blocking HTTP client in a thread so that the sidecar keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.reload import MasterSocket
from momus_haproxy.render import RenderSettings
from momus_haproxy.sidecar import ApplyResult, Sidecar, SidecarSettings, initial_files
from momus_haproxy.watch import NatsOptions, Store
from tests.support.echo import Response, free_port, http_request
from tests.support.haproxy import HAProxyRunner

__all__ = ["SidecarStack", "sidecar_stack", "sites_document"]


@dataclass
class SidecarStack:
    """HAProxy plus a running sidecar that follows `nats_server`."""

    settings: SidecarSettings
    nats: NatsOptions
    haproxy: HAProxyProcess | None = None
    port: int = 0
    results: list[ApplyResult] = field(default_factory=list)
    sidecar: Sidecar | None = None
    task: asyncio.Task[None] | None = None

    @property
    def master(self) -> MasterSocket:
        """A client for HAProxy's master socket."""
        return MasterSocket(self.settings.master_socket)

    async def start_sidecar(self, **changes: Any) -> Sidecar:
        """Start (or start again) the sidecar task."""
        settings = replace(self.settings, **changes)
        self.sidecar = Sidecar(
            settings, Store(self.nats, wait=True), on_result=self.results.append
        )
        self.task = asyncio.create_task(self.sidecar.run())
        return self.sidecar

    async def stop_sidecar(self) -> None:
        """Cancel the sidecar task and wait for it to end."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def wait_for(
        self, test: Callable[[ApplyResult], bool], within: float = 10
    ) -> ApplyResult:
        """Wait for a result that passes `test` (among all results so far)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for result in self.results:
                if test(result):
                    return result
            if self.task is not None and self.task.done():
                self.task.result()
            await asyncio.sleep(0.02)
        raise AssertionError(f"no matching result in {within} s: {self.results}")

    async def wait_revision(self, revision: int, within: float = 10) -> ApplyResult:
        """Wait until `revision` has a result."""
        return await self.wait_for(lambda r: r.revision == revision, within)

    async def get(self, host: str, path: str = "/", **kwargs: Any) -> Response:
        """Send a GET through HAProxy from a thread."""
        return await asyncio.to_thread(
            http_request, self.port, "GET", host, path, **kwargs
        )

    async def reloads(self) -> int:
        """How many times HAProxy's master has reloaded."""
        return (await self.master.show_proc()).reloads


SidecarStackFactory = Callable[..., Awaitable[SidecarStack]]


@pytest.fixture
async def sidecar_stack(
    tmp_path: Path, nats_server: EmbeddedNats, haproxy_runner: HAProxyRunner
) -> AsyncIterator[SidecarStackFactory]:
    """Return a factory that starts HAProxy and a sidecar following `nats_server`."""
    stacks: list[SidecarStack] = []

    async def start(**changes: Any) -> SidecarStack:
        port = free_port()
        render = RenderSettings(http_bind=f"127.0.0.1:{port}", stats_bind=None)
        base = tmp_path / f"stack-{len(stacks)}"
        settings = SidecarSettings(
            config_dir=base / "conf",
            master_socket=base / "unused.sock",
            data_dir=base / "data",
            render=render,
            retry_delay=0.5,
        )
        settings = replace(settings, **changes)
        install(initial_files(settings).files, settings.config_dir)
        haproxy = await haproxy_runner(settings.config_dir)
        settings = replace(settings, master_socket=haproxy.master_socket)
        stack = SidecarStack(settings, NatsOptions(servers=[nats_server.url]), haproxy)
        stack.port = port
        stacks.append(stack)
        await stack.start_sidecar()
        return stack

    yield start

    for stack in stacks:
        await stack.stop_sidecar()


def sites_document(*sites: tuple[str, int]) -> bytes:
    """A document routing each `(host, port)` to a cluster of its own."""
    routes = [
        {"RouteId": host, "ClusterId": host, "Match": {"Hosts": [host]}}
        for host, _ in sites
    ]
    clusters = [
        {
            "ClusterId": host,
            "Destinations": {"d": {"Address": f"http://127.0.0.1:{port}"}},
        }
        for host, port in sites
    ]
    return json.dumps({"Routes": routes, "Clusters": clusters}).encode()
