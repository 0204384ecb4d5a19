"""Change to traffic: from a NATS put to the first request routed by the new document.

One run starts nats-server, HAProxy, the sidecar (`momus-haproxy run`, its
default settings) and an origin HAProxy on loopback, puts a document with
`--routes` routes, then makes `--changes` changes one after the other. Each
change puts the document with a probe route on a host never seen before, and
a client polls HAProxy (a new connection every 2 ms) until that host answers
from the right destination. The time from just before the put to the start
of that first good request is one sample.

`--kind cluster` (default) gives each change a new cluster too, which needs a
reload; `--kind host` only adds the host to an existing cluster, which the
sidecar applies through HAProxy's runtime API.

    .venv/bin/python bench/change_to_traffic.py --routes 1000 --changes 200
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


def _probe(base: dict[str, Any], index: int, kind: str, ports: list[int]) -> bytes:
    name = f"probe-{index}.bench.test"
    port = ports[index % len(ports)]
    if kind == "cluster":
        routes = [route("probe", f"probe-{index}", name)]
        clusters = [cluster(f"probe-{index}", port)]
    else:
        routes = [route("probe", f"probe-port-{index % len(ports)}", name)]
        clusters = [cluster(f"probe-port-{i}", p) for i, p in enumerate(ports)]
    return encode(
        {"Routes": base["Routes"] + routes, "Clusters": base["Clusters"] + clusters}
    )


async def measure(routes: int, changes: int, kind: str, gap: float) -> dict[str, Any]:
    """Run the benchmark once and return its raw figures."""
    async with (
        scratch_dir("c2t") as base,
        Origin(base, 4) as origin,
        Stack(base) as stack,
    ):
        base_doc = document(routes, origin.ports)
        answers = {port: origin.index(port) for port in origin.ports}
        first = await stack.put(_probe(base_doc, 0, kind, origin.ports))
        started = await stack.result(first, 300)
        samples, outcomes, stages = [], {}, []
        reloads = (await stack.proc()).reloads
        for index in range(1, changes + 1):
            value = _probe(base_doc, index, kind, origin.ports)
            wanted = {answers[origin.ports[index % len(origin.ports)]]}
            t0 = time.perf_counter()
            revision = await stack.put(value)
            seconds = await wait_for_answer(
                stack.http_port,
                f"probe-{index}.bench.test",
                wanted,
                after=t0,
                within=120,
            )
            result = await stack.result(revision, 120)
            samples.append(seconds * 1000)
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
            stages.append(result.stages)
            await asyncio.sleep(gap + random.uniform(0, gap))
        reloads = (await stack.proc()).reloads - reloads
    return {
        "routes": routes,
        "changes": changes,
        "kind": kind,
        "first_apply": started.stages,
        "latency_ms": summary(samples),
        "samples_ms": samples,
        "outcomes": outcomes,
        "reloads": reloads,
        "stage_medians_ms": {
            name: statistics.median(s[name] for s in stages if name in s)
            for name in ("render", "check", "reload", "runtime")
            if any(name in s for s in stages)
        },
    }


def main() -> None:
    """Parse the options, run, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--kind", choices=("cluster", "host"), default="cluster")
    parser.add_argument(
        "--gap", type=float, default=0.05, help="seconds between changes"
    )
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    options = parser.parse_args()
    figures = asyncio.run(
        measure(options.routes, options.changes, options.kind, options.gap)
    )
    figures["machine"] = machine_note()
    write_json(options.json, figures)
    latency = figures["latency_ms"]
    print(
        table(
            [
                "routes",
                "change",
                "n",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "outcomes",
            ],
            [
                [
                    options.routes,
                    options.kind,
                    latency["n"],
                    f"{latency['p50']:.0f}",
                    f"{latency['p95']:.0f}",
                    f"{latency['p99']:.0f}",
                    f"{latency['max']:.0f}",
                    ", ".join(
                        f"{k} {v}" for k, v in sorted(figures["outcomes"].items())
                    ),
                ]
            ],
        )
    )
    print(f"sidecar stage medians (ms): {figures['stage_medians_ms']}")
    print(f"measured {figures['machine']}")


if __name__ == "__main__":
    main()
