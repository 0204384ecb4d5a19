"""Shared fixtures: real nats-server and haproxy processes, echo backends."""

from __future__ import annotations

pytest_plugins = [
    "tests.support.echo",
    "tests.support.nats",
    "tests.support.haproxy",
    "tests.support.sidecar",
    "tests.support.cluster",
    "tests.support.fleet",
]
