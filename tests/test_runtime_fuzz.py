"""Sequences of routing changes applied at runtime route as a fresh start would.

Hypothesis walks sequences of documents (`tests.support.routing`): destinations
added, removed, moved, given TLS, a health address or a Host; hosts and
wildcards moved between routes; paths, policies, checks, affinity and
clusters changed. After each step the worker, changed by the runtime
commands (or reloaded when there are none), must hold what a worker started
from the new render holds.

`MOMUS_FUZZ_EXAMPLES` sets how many sequences each test draws (25).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install, read_installed
from momus_haproxy.reload import MasterSocket
from momus_haproxy.render import Rendered, RenderSettings
from momus_haproxy.runtime import (
    LoadedMap,
    loaded_maps,
    runtime_changes,
    server_args,
)
from momus_haproxy.sidecar import ApplyResult, Sidecar, SidecarSettings, initial_files
from momus_haproxy.watch import Entry
from tests.support.echo import EchoBackends, free_port, http_request
from tests.support.routing import Change, Site, Worker, change_strategy, frame

FUZZ_EXAMPLES = int(os.environ.get("MOMUS_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SETTINGS = RenderSettings(stats_bind=None, server_state_file="/run/state")
PORTS = (9001, 9002, 9003, 9004)


class _Walk:
    """The sidecar's view of one worker across a sequence of documents."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.live = site.render(SETTINGS)
        self.worker = Worker.fresh(self.live)
        self.parked: dict[str, str] = {}
        self.runtime = 0
        self.reloads = 0

    def loaded(self) -> dict[str, LoadedMap]:
        return {
            logical: LoadedMap(name, len(self.worker.maps[name]))
            for logical, name in self.worker.loaded.items()
        }

    def apply(self, new: Rendered, draining: st.DataObject) -> list[str] | None:
        commands = runtime_changes(
            self.live, new, loaded=self.loaded(), parked=self.parked
        )
        if commands is None:
            self.worker, self.parked = Worker.fresh(new), {}
            self.reloads += 1
        else:
            self._send(commands, draining)
            self.runtime += 1
        self.live = new
        return commands

    def _send(self, commands: list[str], data: st.DataObject) -> None:
        left = []
        for command in commands:
            if self.worker.run(command):
                continue
            path = command.split()[2]
            if data.draw(st.booleans(), label=f"{path} still has connections"):
                left.append(path)
            else:
                self.worker.delete(path)
        for command in commands:
            if command.startswith("enable server "):
                self.parked.pop(command.split()[2], None)
        self.parked.update(server_args(self.live, left))

    def drain(self, data: st.DataObject) -> None:
        for path in sorted(self.parked):
            if data.draw(st.booleans(), label=f"{path} drained"):
                self.worker.delete(path)
                del self.parked[path]


class TestRuntimeModel:
    @FUZZ
    @given(data=st.data())
    def test_commands_give_the_worker_a_fresh_start_would(
        self, data: st.DataObject
    ) -> None:
        """After each change the worker routes as one started from the new files."""
        walk = _Walk(Site.start(PORTS))
        for _ in range(data.draw(st.integers(1, 10), label="steps")):
            site = copy.deepcopy(walk.site)
            data.draw(change_strategy(PORTS), label="change")(site)
            if not site.valid():
                continue
            walk.site = site
            before, new = walk.live, site.render(SETTINGS)
            commands = walk.apply(new, data)
            if frame(before) != frame(new):
                assert commands is None, commands
            assert walk.worker.routing() == Worker.fresh(new).routing(), commands
            walk.drain(data)


# Against real HAProxy processes -----------------------------------------------

# Each example starts HAProxy processes for every step: a few go a long way.
HAPROXY_EXAMPLES = max(1, FUZZ_EXAMPLES // 6)
HAPROXY_FUZZ = settings(
    FUZZ,
    max_examples=HAPROXY_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TARGETS = (
    *(
        (host, path)
        for host in ("a.test", "b.test", "c.test", "d.test", "www.a.test", "x.w.test")
        for path in ("/", "/api/v", "/x;y", "/exact/", "/a%2Cb/q", "/7/z", "/new/q")
    ),
    ("y.x.w.test", "/"),
    ("e.test", "/"),
)
"""Requests whose routing is compared: every host and path the documents use."""

# Columns of `show servers state` (version 1) that the files decide.
_STATE_COLUMNS = {
    "addr": 4,
    "admin": 6,
    "uweight": 7,
    "iweight": 8,
    "fqdn": 17,
    "port": 18,
    "use_ssl": 20,
    "check_port": 21,
    "check_addr": 22,
}


class _Source:
    """A change source fed by the test: each `put` is the key's next revision."""

    def __init__(self) -> None:
        self.entries: asyncio.Queue[Entry] = asyncio.Queue()
        self.revision = 0

    async def __aenter__(self) -> _Source:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    async def watch(self) -> AsyncIterator[Entry]:
        while True:
            yield await self.entries.get()

    def put(self, value: bytes) -> int:
        self.revision += 1
        self.entries.put_nowait(Entry(self.revision, "PUT", value, None))
        return self.revision


class _Stack:
    """A sidecar following a `_Source`, and the HAProxy it keeps in line."""

    def __init__(self, base: Path, haproxy_bin: str) -> None:
        self.port = free_port()
        render = RenderSettings(http_bind=f"127.0.0.1:{self.port}", stats_bind=None)
        self.settings = SidecarSettings(
            config_dir=base / "conf",
            master_socket=base / "master.sock",
            data_dir=base / "data",
            haproxy_bin=haproxy_bin,
            render=render,
            drain_interval=0.2,
        )
        self.base = base
        self.source = _Source()
        self.results: dict[int, ApplyResult] = {}
        self.arrived = asyncio.Event()

    async def run(self, exits: contextlib.AsyncExitStack) -> None:
        """Start HAProxy on the initial files, then the sidecar."""
        install(initial_files(self.settings).files, self.settings.config_dir)
        self.haproxy = await _haproxy(self.settings, self.settings.config_dir, exits)
        settings = SidecarSettings(
            **{**vars(self.settings), "master_socket": self.haproxy.master_socket}
        )
        sidecar = Sidecar(
            settings,
            self.source,
            on_result=self._record,
        )
        task = asyncio.create_task(sidecar.run())
        exits.push_async_callback(_cancel, task)

    async def put(self, site: Site) -> ApplyResult:
        """Put `site`'s document and wait for the sidecar's result."""
        revision = self.source.put(site.document())
        async with asyncio.timeout(20):
            while revision not in self.results:
                self.arrived.clear()
                await self.arrived.wait()
        return self.results[revision]

    def _record(self, result: ApplyResult) -> None:
        self.results[result.revision] = result
        self.arrived.set()


async def _haproxy(
    settings: SidecarSettings, config_dir: Path, exits: contextlib.AsyncExitStack
) -> HAProxyProcess:
    """Start HAProxy on `config_dir`; `exits` stops it, by pid, and cleans up."""
    run_dir = Path(tempfile.mkdtemp(prefix="momus-"))
    exits.callback(shutil.rmtree, run_dir, ignore_errors=True)
    haproxy = HAProxyProcess(
        config_dir, run_dir, haproxy_bin=settings.haproxy_bin, stop_timeout=3
    )
    exits.push_async_callback(haproxy.aclose)
    await haproxy.start()
    return haproxy


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _fresh(stack: _Stack, exits: contextlib.AsyncExitStack) -> tuple[Any, int]:
    """Start a throw-away HAProxy on a copy of the installed files, no state file."""
    directory = Path(tempfile.mkdtemp(prefix="momus-fresh-", dir=stack.base))
    files = read_installed(stack.settings.config_dir)
    port = free_port()
    config = files["haproxy.cfg"]
    config = config.replace(str(stack.settings.state_file), str(directory / "none"))
    files["haproxy.cfg"] = config.replace(f":{stack.port}\n", f":{port}\n")
    install(files, directory / "conf")
    haproxy = await _haproxy(stack.settings, directory / "conf", exits)
    return haproxy, port


async def _held(master: MasterSocket) -> dict[str, Any]:
    """The servers (with the columns the files decide) and map entries of a worker."""
    servers = {}
    for line in (await master.worker_command("show servers state")).splitlines()[2:]:
        fields = line.split()
        if len(fields) > max(_STATE_COLUMNS.values()):
            path = f"{fields[1]}/{fields[3]}"
            servers[path] = {key: fields[at] for key, at in _STATE_COLUMNS.items()}
    maps = {}
    for logical, held in loaded_maps(await master.worker_command("show map")).items():
        text = await master.worker_command(f"show map {held.name}")
        # Each entry is `<ref> <key> [<value>]`; an empty map answers a blank line.
        entries = (line.split(" ", 1) for line in text.splitlines() if line.strip())
        maps[logical] = sorted(entry[1] for entry in entries if len(entry) == 2)
    return {"servers": servers, "maps": maps}


def _in_service(servers: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {path: held for path, held in servers.items() if held["admin"] == "0"}


def _routing(port: int) -> list[tuple[int, str]]:
    """Where each target goes: 404 (no route), a redirect, or a backend's answer."""
    answers = []
    for host, path in TARGETS:
        answer = http_request(port, "GET", host, path)
        kind = answer.status if answer.status in (301, 404) else 200
        answers.append((kind, answer.headers.get("location", "")))
    return answers


async def _compare(stack: _Stack) -> None:
    """The live worker holds and routes as a fresh HAProxy on the same files."""
    async with contextlib.AsyncExitStack() as exits:
        fresh, port = await _fresh(stack, exits)
        live, new = await _held(stack.haproxy.master()), await _held(fresh.master())
        assert live["maps"] == new["maps"]
        assert _in_service(live["servers"]) == new["servers"]
        live_routing = await asyncio.to_thread(_routing, stack.port)
        assert live_routing == await asyncio.to_thread(_routing, port)


async def _walk_haproxy(
    stack: _Stack, ports: tuple[int, ...], changes: list[Change]
) -> None:
    site = Site.start(ports)
    async with contextlib.AsyncExitStack() as exits:
        await stack.run(exits)
        assert (await stack.put(site)).outcome == "applied"
        for change in changes:
            candidate = copy.deepcopy(site)
            change(candidate)
            if not candidate.valid():
                continue
            before, site = site.render(stack.settings.rendering), candidate
            result = await stack.put(site)
            new = site.render(stack.settings.rendering)
            assert result.outcome in ("runtime", "applied", "unchanged"), result
            assert read_installed(stack.settings.config_dir) == new.files
            if result.outcome == "runtime":
                assert frame(before) == frame(new)
            await _compare(stack)
        # A reload the sidecar does not make (an operator's) reads the files
        # and the server-state file as they are.
        await stack.haproxy.master().reload()
        await _compare(stack)
        site.clusters["spare"] = copy.deepcopy(site.clusters[sorted(site.clusters)[0]])
        assert (await stack.put(site)).outcome == "applied"
        await _compare(stack)


class TestRuntimeOnHAProxy:
    @pytest.mark.timeout(900)
    @HAPROXY_FUZZ
    @given(data=st.data())
    def test_live_worker_matches_a_fresh_start(
        self,
        data: st.DataObject,
        echo_backends: EchoBackends,
        haproxy_bin: str,
        tmp_path: Path,
    ) -> None:
        """After each change the worker holds and routes as a fresh HAProxy would."""
        if not echo_backends.started:
            for name in ("one", "two", "three"):
                echo_backends.start(name)
        ports = tuple(backend.port for backend in echo_backends.started)
        changes = data.draw(st.lists(change_strategy(ports), min_size=1, max_size=6))
        stack = _Stack(Path(tempfile.mkdtemp(dir=tmp_path)), haproxy_bin)
        asyncio.run(_walk_haproxy(stack, ports, changes))
