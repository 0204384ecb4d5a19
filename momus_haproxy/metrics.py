"""Prometheus metrics of one momus-haproxy process, for `/metrics`.

The metrics live in a registry of their own (not the library's global one),
so that several sidecars in one process, as in the tests, never share one.
HAProxy's own exporter is on its stats listener (`--stats-bind`); these
describe the sidecar:

| metric | type | what |
|---|---|---|
| `momus_applied_revision` | gauge | revision HAProxy serves (0: none yet) |
| `momus_store_latest_revision` | gauge | newest revision of the key seen (0: none) |
| `momus_revision_lag_seconds` | gauge | how long the latest revision has waited |
| `momus_applies_total{result}` | counter | revisions handled, by result |
| `momus_reloads_total` | counter | reloads of HAProxy caused by a revision |
| `momus_runtime_updates_total` | counter | revisions applied through the runtime API |
| `momus_stage_duration_seconds{stage}` | histogram | render, check, reload, ... |
| `momus_nats_connected` | gauge | 1 while the watch's NATS connection is up |
| `momus_document_bytes` | gauge | size of the document HAProxy serves |
| `momus_info{version, instance}` | info | the momus-haproxy version and instance id |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from . import __version__
from .sidecar import ApplyResult, Outcome, Sidecar

__all__ = ["RESULTS", "Metrics"]

RESULTS = get_args(Outcome)
STAGES = ("render", "check", "reload")
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one sidecar; `observe` each result, `render` for a scrape."""

    def __init__(self, instance: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.applies = Counter(
            "momus_applies",
            "Revisions handled, by result.",
            ["result"],
            registry=registry,
        )
        self.reloads = Counter(
            "momus_reloads",
            "Reloads of HAProxy caused by a revision.",
            registry=registry,
        )
        self.runtime_updates = Counter(
            "momus_runtime_updates",
            "Revisions applied through HAProxy's runtime API, without a reload.",
            registry=registry,
        )
        self.durations = Histogram(
            "momus_stage_duration_seconds",
            "Time spent in each stage of an apply.",
            ["stage"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.applied_revision = self._gauge(
            "momus_applied_revision", "Revision HAProxy serves (0: none yet)."
        )
        self.latest_revision = self._gauge(
            "momus_store_latest_revision", "Newest revision of the key seen (0: none)."
        )
        self.lag = self._gauge(
            "momus_revision_lag_seconds",
            "How long the latest revision has waited to be settled here.",
        )
        self.nats_connected = self._gauge(
            "momus_nats_connected", "1 while the watch's NATS connection is up."
        )
        self.document_bytes = self._gauge(
            "momus_document_bytes", "Size of the document HAProxy serves (bytes)."
        )
        info = Info("momus", "momus-haproxy version and instance.", registry=registry)
        info.info({"version": __version__, "instance": instance})
        for result in RESULTS:
            self.applies.labels(result)
        for stage in STAGES:
            self.durations.labels(stage)

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, registry=self.registry)

    def observe(self, result: ApplyResult) -> None:
        """Count one result of the sidecar and its stage durations."""
        # A string, not the Outcome literal: the sidecar may grow outcomes
        # (a runtime update) before this module learns their names.
        outcome: str = result.outcome
        self.applies.labels(outcome).inc()
        if outcome == "applied":
            self.reloads.inc()
        elif outcome == "runtime":
            self.runtime_updates.inc()
        for stage, seconds in result.durations.items():
            self.durations.labels(stage).observe(seconds)

    def follow(
        self,
        sidecar: Sidecar,
        *,
        latest: Callable[[], int | None],
        lag: Callable[[], float],
        connected: Callable[[], bool],
    ) -> None:
        """Read the gauges from the sidecar and these callables at each scrape."""
        self.applied_revision.set_function(lambda: sidecar.applied_revision or 0)
        self.latest_revision.set_function(lambda: latest() or 0)
        self.lag.set_function(lag)
        self.nats_connected.set_function(lambda: 1.0 if connected() else 0.0)
        self.document_bytes.set_function(
            lambda: len(sidecar.last_good.value) if sidecar.last_good else 0
        )

    def render(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)
