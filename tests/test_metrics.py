"""`/metrics`, lag-aware `/readyz` and JSON logs of a running sidecar."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from momus_haproxy import __version__
from momus_haproxy.cli import JsonFormatter
from momus_haproxy.install import install
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.render import RenderSettings
from momus_haproxy.runner import Instance, RunOptions, serve
from momus_haproxy.sidecar import SidecarSettings, initial_files
from momus_haproxy.status import StatusSettings
from momus_haproxy.watch import Entry, NatsOptions, Store
from tests.support.echo import free_port, http_request
from tests.support.haproxy import HAProxyRunner
from tests.support.nats import OperatorFactory
from tests.test_status import GOOD, REFUSED

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


@dataclass
class Running:
    """A sidecar run in the test's event loop, with its health port."""

    instance: Instance
    health_port: int

    async def get(self, path: str) -> tuple[int, str]:
        """GET `path` on the health listener."""
        answer = await asyncio.to_thread(
            http_request, self.health_port, "GET", "127.0.0.1", path
        )
        return answer.status, answer.text

    async def metrics(self) -> Samples:
        """Scrape and parse `/metrics`."""
        status, text = await self.get("/metrics")
        assert status == 200
        return parse_metrics(text)

    async def until(
        self, check: Callable[[Samples], bool], within: float = 10
    ) -> Samples:
        """Scrape until `check` passes."""
        deadline = time.monotonic() + within
        while True:
            samples = await self.metrics()
            if check(samples) or time.monotonic() > deadline:
                return samples
            await asyncio.sleep(0.05)


class _DeadAfterFirst:
    """A change source whose watch delivers one entry, then nothing: a dead watch."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def __aenter__(self) -> _DeadAfterFirst:
        await self.store.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.store.aclose()

    async def watch(self) -> AsyncIterator[Entry]:
        """Yield the current value, then hang without a word."""
        async for entry in self.store.watch():
            yield entry
            await asyncio.Event().wait()


@pytest.fixture
async def start_sidecar(
    tmp_path: Path, nats_server: EmbeddedNats, haproxy_runner: HAProxyRunner
) -> AsyncIterator[Callable[..., Any]]:
    """Start `serve()` as a task against a real HAProxy; cancel it afterwards."""
    tasks: list[asyncio.Task[None]] = []

    async def start(*, dead_watch: bool = False) -> Running:
        render = RenderSettings(http_bind=f"127.0.0.1:{free_port()}", stats_bind=None)
        settings = SidecarSettings(
            config_dir=tmp_path / "conf",
            master_socket=tmp_path / "x.sock",
            data_dir=tmp_path / "data",
            render=render,
            quiet_period=0.01,
        )
        install(initial_files(settings).files, settings.config_dir)
        haproxy = await haproxy_runner(settings.config_dir)
        port = free_port()
        options = RunOptions(
            sidecar=replace(settings, master_socket=haproxy.master_socket),
            nats=NatsOptions(servers=[nats_server.url]),
            health_bind=f"127.0.0.1:{port}",
            status=StatusSettings(instance_id="metrics", interval=0.2, ttl=5),
            ready_max_lag=0.5,
        )
        instance = Instance.build(options)
        if dead_watch:
            instance.sidecar.source = _DeadAfterFirst(instance.store)
        tasks.append(asyncio.create_task(serve(options, instance)))
        running = Running(instance, port)
        await _until_listening(running)
        return running

    yield start

    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until_listening(running: Running) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            await running.get("/healthz")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.slow
class TestMetrics:
    """The counters and gauges on `/metrics` follow what the sidecar does."""

    async def test_counters_move(
        self, start_sidecar: Callable[..., Any], nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
    ) -> None:  # fmt: skip
        """Applies, refusals, reloads, durations and revisions show as they happen."""
        running = await start_sidecar()
        before = await running.metrics()
        assert _value(before, "momus_applies_total", result="applied") == 0
        assert _value(before, "momus_applied_revision") == 0
        info = ("momus_info", (("instance", "metrics"), ("version", __version__)))
        assert info in before

        async with operator_kv(nats_server.url) as operator:
            good = await operator.put(GOOD)
            after = await running.until(
                lambda s: _value(s, "momus_applied_revision") == good
            )
            assert _value(after, "momus_applies_total", result="applied") == 1
            assert _value(after, "momus_reloads_total") == 1
            assert _value(after, "momus_store_latest_revision") == good
            assert _value(after, "momus_document_bytes") == len(GOOD)
            assert _value(after, "momus_nats_connected") == 1
            for stage in ("render", "check", "reload"):
                count = "momus_stage_duration_seconds_count"
                assert _value(after, count, stage=stage) == 1, stage

            refused = await operator.put(REFUSED)
            after = await running.until(
                lambda s: _value(s, "momus_applies_total", result="refused") == 1
            )
            assert _value(after, "momus_applied_revision") == good
            assert _value(after, "momus_store_latest_revision") == refused
            assert _value(after, "momus_revision_lag_seconds") == 0

            await operator.put(GOOD)
            after = await running.until(
                lambda s: _value(s, "momus_applies_total", result="unchanged") == 1
            )
            assert _value(after, "momus_reloads_total") == 1
        assert (await running.get("/readyz"))[0] == 200

    async def test_dead_watch_fails_readiness(
        self, start_sidecar: Callable[..., Any], nats_server: EmbeddedNats,
        operator_kv: OperatorFactory,
    ) -> None:  # fmt: skip
        """A watch that stops delivering shows as lag; past the limit /readyz fails."""
        async with operator_kv(nats_server.url) as operator:
            first = await operator.put(GOOD)
            running = await start_sidecar(dead_watch=True)
            await running.until(lambda s: _value(s, "momus_applied_revision") == first)
            assert (await running.get("/readyz"))[0] == 200

            newer = await operator.put(GOOD.replace(b"site.", b"other."))
            samples = await running.until(
                lambda s: _value(s, "momus_revision_lag_seconds") > 0.5
            )
            assert _value(samples, "momus_store_latest_revision") == newer
            assert _value(samples, "momus_applied_revision") == first
            status, reason = await running.get("/readyz")
            assert status == 503
            assert f"revision {newer} of the store has waited" in reason


class TestJsonLogs:
    """`--log-format json` writes one JSON object per line."""

    def test_record_is_one_json_line(self) -> None:
        """A log record with an exception becomes one line of JSON with its fields."""
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.LogRecord(
                "momus_haproxy.sidecar", logging.WARNING, __file__, 1,
                "revision %d refused", (7,), sys.exc_info(),
            )  # fmt: skip
        line = JsonFormatter().format(record)
        assert "\n" not in line
        data = json.loads(line)
        assert data["level"] == "WARNING"
        assert data["logger"] == "momus_haproxy.sidecar"
        assert data["message"] == "revision 7 refused"
        assert "ValueError: boom" in data["exception"]
        assert data["time"].endswith("Z")
