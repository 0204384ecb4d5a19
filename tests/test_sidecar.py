"""The sidecar against a real nats-server and a real HAProxy."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from momus_haproxy.install import read_installed
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.render import DEFAULT_TEMPLATES
from tests.support.cases import SERVED_CASES, check_requests, prepare_case
from tests.support.echo import EchoBackends, http_request
from tests.support.nats import OperatorFactory
from tests.support.sidecar import SidecarStack, SidecarStackFactory, sites_document

APPLY_BOUND = 5.0
"""Seconds within which a put must be served (generous for a loaded CI box)."""


async def _served(stack: SidecarStack, host: str, backend: str | None) -> None:
    """Wait until `host` is answered by `backend` (None: answered 404)."""
    deadline = time.monotonic() + APPLY_BOUND
    while True:
        answer = await stack.get(host)
        body = answer.json if isinstance(answer.json, dict) else {}
        if (backend is None and answer.status == 404) or body.get("backend") == backend:
            return
        assert time.monotonic() < deadline, f"{host}: {answer.status} {answer.text}"
        await asyncio.sleep(0.02)


class TestCases:
    @pytest.mark.parametrize("name", SERVED_CASES)
    async def test_case_served_after_put(
        self,
        name: str,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A case put by another NATS client is served as its expect.json says."""
        stack = await sidecar_stack()
        case = prepare_case(name, echo_backends)
        async with operator_kv(nats_server.url) as operator:
            started = time.monotonic()
            revision = await operator.put(case.document)
            result = await stack.wait_revision(revision)
            assert result.outcome == "applied"
            assert time.monotonic() - started < APPLY_BOUND
        deadline = time.monotonic() + APPLY_BOUND + 5
        await asyncio.to_thread(check_requests, case, stack.port, deadline=deadline)


class TestChanges:
    async def test_update_identical_delete_purge_empty(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Updates apply, identical puts and deletes keep HAProxy as is."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack()
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            await _served(stack, "a.test", "a")
            rev = await operator.put(
                sites_document(("a.test", a.port), ("b.test", b.port))
            )
            await stack.wait_revision(rev)
            await _served(stack, "b.test", "b")

            reloads = await stack.reloads()
            rev = await operator.put(
                sites_document(("a.test", a.port), ("b.test", b.port))
            )
            assert (await stack.wait_revision(rev)).outcome == "unchanged"
            assert await stack.reloads() == reloads

            await operator.delete()
            kept = await stack.wait_for(lambda r: r.outcome == "kept")
            await operator.purge()
            await stack.wait_for(lambda r: r.outcome == "kept" and r is not kept)
            await _served(stack, "b.test", "b")
            assert await stack.reloads() == reloads

            rev = await operator.put(b'{"Routes": [], "Clusters": []}')
            assert (await stack.wait_revision(rev)).outcome == "applied"
            await _served(stack, "a.test", None)

    async def test_refused_document_keeps_last_good(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Every rejected case is refused whole; the last good keeps serving."""
        a = echo_backends.start("a")
        stack = await sidecar_stack()
        cases = json.loads(
            (Path(__file__).parent / "cases/rejected-documents/expect.json").read_text()
        )["cases"]
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            files = read_installed(stack.settings.config_dir)
            for case in cases:
                revision = await operator.put(case["value"].encode())
                result = await stack.wait_revision(revision)
                assert result.outcome == "refused"
                assert case["error_contains"] in result.error
        await _served(stack, "a.test", "a")
        assert read_installed(stack.settings.config_dir) == files
        for text in files.values():
            assert "evil" not in text
            assert "weight 0" not in text

    async def test_check_failure_keeps_last_good(
        self,
        tmp_path: Path,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A valid document whose render `haproxy -c` refuses is never installed."""
        templates = tmp_path / "templates"
        shutil.copytree(DEFAULT_TEMPLATES, templates)
        template = templates / "haproxy.cfg.j2"
        broken = "{% if backends | length > 1 %}    no-such-directive\n{% endif %}"
        template.write_text(
            template.read_text().replace(
                "{% for backend in", broken + "{% for backend in", 1
            )
        )
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack()
        await stack.stop_sidecar()
        settings = stack.settings
        render = settings.render.__class__(
            http_bind=settings.render.http_bind,
            stats_bind=None,
            templates_dir=templates,
        )
        await stack.start_sidecar(render=render)
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            files = read_installed(settings.config_dir)
            revision = await operator.put(
                sites_document(("a.test", a.port), ("b.test", b.port))
            )
            result = await stack.wait_revision(revision)
        assert result.outcome == "check_failed"
        assert "no-such-directive" in result.error
        assert read_installed(settings.config_dir) == files
        await _served(stack, "a.test", "a")

    async def test_reload_failure_restores_files(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A reload HAProxy refuses after a passing check leaves all as it was."""
        a = echo_backends.start("a")
        stack = await sidecar_stack()
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            files = read_installed(stack.settings.config_dir)
            taken = echo_backends.start("taken")
            document = json.loads(sites_document(("a.test", a.port)))
            # Point HAProxy's listener at a port another process holds: the
            # check passes, but the new worker cannot bind.
            await stack.stop_sidecar()
            render = stack.settings.render.__class__(
                http_bind=f"127.0.0.1:{taken.port}", stats_bind=None
            )
            await stack.start_sidecar(render=render, retry_delay=30)
            document["Routes"][0]["Order"] = 1
            revision = await operator.put(json.dumps(document).encode())
            result = await stack.wait_for(
                lambda r: r.revision == revision and r.outcome != "applied", 20
            )
        assert result.outcome == "reload_failed"
        assert read_installed(stack.settings.config_dir) == files
        await _served(stack, "a.test", "a")

    async def test_burst_is_coalesced(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A burst of puts causes few reloads and ends on the newest revision."""
        backends = [echo_backends.start(f"b{i}") for i in range(30)]
        stack = await sidecar_stack()
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(await operator.put(sites_document()))
            reloads = await stack.reloads()
            last = 0
            for index in range(len(backends)):
                sites = [
                    (f"h{i}.test", b.port) for i, b in enumerate(backends[: index + 1])
                ]
                last = await operator.put(sites_document(*sites))
            result = await stack.wait_revision(last)
        assert result.outcome == "applied"
        assert await stack.reloads() - reloads < 10
        await _served(stack, "h29.test", "b29")


class TestRecovery:
    async def test_nats_restart(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """After nats-server restarts with the same store, puts apply again quickly."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack()
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
        await nats_server.stop()
        await _served(stack, "a.test", "a")
        await nats_server.start()
        async with operator_kv(nats_server.url) as operator:
            started = time.monotonic()
            revision = await operator.put(sites_document(("b.test", b.port)))
            await stack.wait_revision(revision, within=10)
        assert time.monotonic() - started < 6
        await _served(stack, "b.test", "b")

    async def test_sidecar_restart_while_nats_down(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A sidecar started while NATS is down keeps the last good and catches up."""
        a, b = echo_backends.start("a"), echo_backends.start("b")
        stack = await sidecar_stack()
        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
        await stack.stop_sidecar()
        await nats_server.stop()
        stack.results.clear()
        await stack.start_sidecar()
        await asyncio.sleep(0.5)
        await _served(stack, "a.test", "a")
        await nats_server.start()
        async with operator_kv(nats_server.url) as operator:
            revision = await operator.put(sites_document(("b.test", b.port)))
            await stack.wait_revision(revision, within=15)
        await _served(stack, "b.test", "b")

    async def test_requests_survive_reloads(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """Requests keep succeeding while a series of changes reload HAProxy."""
        a = echo_backends.start("a")
        stack = await sidecar_stack()
        failures: list[str] = []
        sent = 0
        stop = threading.Event()

        def load() -> None:
            nonlocal sent
            while not stop.is_set():
                try:
                    answer = http_request(stack.port, "GET", "a.test", "/")
                    if answer.status != 200:
                        failures.append(str(answer.status))
                except OSError as exc:
                    failures.append(repr(exc))
                sent += 1

        async with operator_kv(nats_server.url) as operator:
            await stack.wait_revision(
                await operator.put(sites_document(("a.test", a.port)))
            )
            thread = threading.Thread(target=load)
            thread.start()
            try:
                for index in range(10):
                    sites: list[Any] = [("a.test", a.port), (f"x{index}.test", a.port)]
                    revision = await operator.put(sites_document(*sites))
                    result = await stack.wait_revision(revision)
                    assert result.outcome == "applied"
            finally:
                stop.set()
                await asyncio.to_thread(thread.join)
        assert sent > 20
        assert failures == []


class TestServerState:
    async def test_down_server_stays_down_across_reload(
        self,
        sidecar_stack: SidecarStackFactory,
        nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
        echo_backends: EchoBackends,
    ) -> None:
        """A server checks marked DOWN is DOWN in the new worker from its start.

        The dead server accepts connections and never answers, so a worker
        without the saved state would take a whole check timeout to find out.
        """
        up = echo_backends.start("up")
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        active = {"Enabled": True, "Interval": "00:00:01", "Timeout": "00:00:03"}
        cluster = {
            "ClusterId": "c",
            "LoadBalancingPolicy": "RoundRobin",
            "HealthCheck": {"Active": {**active, "Path": "/"}},
            "Metadata": {"ConsecutiveFailuresHealthPolicy.Threshold": "1"},
            "Destinations": {
                "up": {"Address": f"http://127.0.0.1:{up.port}"},
                "down": {"Address": f"http://127.0.0.1:{port}"},
            },
        }

        def document(*hosts: str, more: tuple[Any, ...] = ()) -> bytes:
            route = {"RouteId": "c", "ClusterId": "c", "Match": {"Hosts": list(hosts)}}
            clusters = [cluster, *more]
            return json.dumps({"Routes": [route], "Clusters": clusters}).encode()

        stack = await sidecar_stack()
        try:
            async with operator_kv(nats_server.url) as operator:
                await stack.wait_revision(await operator.put(document("a.test")))
                dead = f"127.0.0.1:{port}"
                await _wait_state(stack, dead, "0", within=10)
                # A new cluster needs a reload (more hosts would not: runtime API).
                up_only = {"up": {"Address": f"http://127.0.0.1:{up.port}"}}
                spare = {"ClusterId": "spare", "Destinations": up_only}
                revision = await operator.put(document("a.test", more=(spare,)))
                assert (await stack.wait_revision(revision)).outcome == "applied"
                states = await _server_states(stack)
        finally:
            silent.close()
        assert states[dead] == "0", states


async def _server_states(stack: SidecarStack) -> dict[str, str]:
    """Map server name to operational state (0 down, 2 up) in the current worker."""
    text = await stack.master.worker_command("show servers state")
    states = {}
    for line in text.splitlines()[2:]:
        fields = line.split()
        if len(fields) > 5:
            states[fields[3]] = fields[5]
    return states


async def _wait_state(
    stack: SidecarStack, server: str, state: str, within: float
) -> None:
    deadline = time.monotonic() + within
    while (await _server_states(stack)).get(server) != state:
        assert time.monotonic() < deadline, await _server_states(stack)
        await asyncio.sleep(0.2)
