"""Reloads avoided: destination and host changes applied through the runtime API.

A stack (nats-server, HAProxy, `momus-haproxy run` with its defaults) serves
`--routes` routes plus a pool cluster (round robin) on `pool.bench.test` and
two one-destination clusters with `mover.bench.test` on one of them. Then
`--changes` changes are put one after the other, in turn:

- add: the pool gets the next origin port as a destination; served when a
  request is answered by it;
- remove: the pool drops its older destination; served when two requests
  in a row are answered by the one left (round robin alternated before);
- move: `mover.bench.test` moves to the other cluster; served when it is
  answered from there.

Ports come back after eight changes of their kind, often while their old
server is still draining connections in the worker.

A client polls HAProxy (a new connection every 2 ms) from just before each
put. Reported per kind: put-to-served p50/p95/p99, the sidecar's outcomes,
and HAProxy reloads per change (its master's reload counter).

    .venv/bin/python bench/reloads_avoided.py --routes 1000 --changes 210
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from _harness import (
    Origin,
    Stack,
    cluster,
    document,
    encode,
    machine_note,
    route,
    scratch_dir,
    summary,
    table,
    wait_for_answer,
    write_json,
)

KINDS = ("add", "remove", "move")


class Scenario:
    """The state of the pool and the mover, and the document that says it."""

    def __init__(self, base: dict[str, Any], ports: list[int]) -> None:
        self.base = base
        self.ports = ports
        self.pool = [0]
        self.next_port = 1
        self.mover_on = "a"

    def value(self) -> bytes:
        """The document for the current state."""
        pool_ports = [self.ports[i] for i in self.pool]
        mover = "mover.bench.test"
        routes = [
            route("pool", "pool", "pool.bench.test"),
            route(
                "ra", "ca", "a.bench.test", *([mover] if self.mover_on == "a" else [])
            ),
            route(
                "rb", "cb", "b.bench.test", *([mover] if self.mover_on == "b" else [])
            ),
        ]
        clusters = [
            cluster("pool", *pool_ports),
            cluster("ca", self.ports[-1]),
            cluster("cb", self.ports[-2]),
        ]
        return encode(
            {
                "Routes": self.base["Routes"] + routes,
                "Clusters": self.base["Clusters"] + clusters,
            }
        )

    def change(self, kind: str) -> tuple[str, set[int], int]:
        """Make one change; return the host to probe, the ports to expect, the run."""
        if kind == "add":
            added = self.next_port
            self.next_port = (added + 1) % (len(self.ports) - 2)
            self.pool.append(added)
            return "pool.bench.test", {self.ports[added]}, 1
        if kind == "remove":
            self.pool.pop(0)
            return "pool.bench.test", {self.ports[i] for i in self.pool}, 2
        self.mover_on = "b" if self.mover_on == "a" else "a"
        port = self.ports[-1] if self.mover_on == "a" else self.ports[-2]
        return "mover.bench.test", {port}, 1


async def measure(routes: int, changes: int, gap: float) -> dict[str, Any]:
    """Run the changes and return the figures, per kind."""
    async with (
        scratch_dir("runtime") as base,
        Origin(base, 10) as origin,
        Stack(base) as stack,
    ):
        scenario = Scenario(document(routes, origin.ports[:4]), origin.ports)
        first = await stack.result(await stack.put(scenario.value()), 300)
        per_kind: dict[str, dict[str, Any]] = {
            kind: {"samples": [], "outcomes": {}, "reloads": 0, "stages": []}
            for kind in KINDS
        }
        for index in range(changes):
            kind = KINDS[index % len(KINDS)]
            probe, ports, run = scenario.change(kind)
            wanted = {origin.index(port) for port in ports}
            value = scenario.value()
            reloads = (await stack.proc()).reloads
            t0 = time.perf_counter()
            revision = await stack.put(value)
            seconds = await wait_for_answer(
                stack.http_port, probe, wanted, after=t0, within=60, run=run
            )
            result = await stack.result(revision, 60)
            figures = per_kind[kind]
            figures["samples"].append(seconds * 1000)
            figures["outcomes"][result.outcome] = (
                figures["outcomes"].get(result.outcome, 0) + 1
            )
            figures["reloads"] += (await stack.proc()).reloads - reloads
            figures["stages"].append({"total": result.total, **result.stages})
            await asyncio.sleep(gap + random.uniform(0, gap))
    return {
        "routes": routes,
        "changes": changes,
        "first_apply": first.outcome,
        "kinds": {
            kind: {
                **figures,
                "latency_ms": summary(figures["samples"]),
                "stage_medians_ms": _stage_medians(figures["stages"]),
            }
            for kind, figures in per_kind.items()
        },
    }


def _stage_medians(stages: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({name for stage in stages for name in stage})
    return {
        name: statistics.median(s[name] for s in stages if name in s) for name in names
    }


def main() -> None:
    """Parse the options, run, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=210)
    parser.add_argument(
        "--gap", type=float, default=0.05, help="seconds between changes"
    )
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    options = parser.parse_args()
    figures = asyncio.run(measure(options.routes, options.changes, options.gap))
    figures["machine"] = machine_note()
    write_json(options.json, figures)
    rows = []
    total_changes = total_reloads = 0
    for kind, kind_figures in figures["kinds"].items():
        latency = kind_figures["latency_ms"]
        count = latency["n"]
        total_changes += count
        total_reloads += kind_figures["reloads"]
        rows.append(
            [
                options.routes,
                kind,
                count,
                f"{latency['p50']:.0f}",
                f"{latency['p95']:.0f}",
                f"{latency['p99']:.0f}",
                f"{latency['max']:.0f}",
                f"{kind_figures['reloads'] / count:.3f}",
                ", ".join(
                    f"{k} {v}" for k, v in sorted(kind_figures["outcomes"].items())
                ),
            ]
        )
    headers = [
        "routes",
        "change",
        "n",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "reloads per change",
        "outcomes",
    ]
    print(table(headers, rows))
    print(f"all kinds: {total_reloads} reloads for {total_changes} changes")
    for kind, kind_figures in figures["kinds"].items():
        print(f"sidecar stage medians, {kind} (ms): {kind_figures['stage_medians_ms']}")
    print(f"measured {figures['machine']}")


if __name__ == "__main__":
    main()
