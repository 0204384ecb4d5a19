"""Scale of one apply: render, check and reload times, and memory, by route count.

For each size a fresh stack (nats-server, HAProxy, `momus-haproxy run`) is
started and given a document with that many routes (one host and one
destination each; `--mix` adds sizes where hosts take several routes by path).
Then `--repeats` changes that each need a reload (a new cluster) are put one
after the other, and the sidecar's own log line gives each stage:

- render: parse and render (in the sidecar), and, separately, parse and
  render timed in this process from the same bytes;
- check: writing the scratch files and `haproxy -c`;
- reload: install, saving server state, `reload` and its confirmation;
- whole apply: from the sidecar taking the revision to its log line.

Memory is the resident size of the sidecar and of HAProxy's master and
current worker once the old workers are gone.

    .venv/bin/python bench/apply_scale.py \
        --sizes 10,100,1000,10000 --mix-sizes 1000,10000
"""

from __future__ import annotations

import argparse
import asyncio
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
    spread,
    table,
    write_json,
)

from momus_haproxy.document import parse_document
from momus_haproxy.render import RenderSettings, render


def _variant(base: dict[str, Any], index: int, port: int) -> bytes:
    extra_route = route("extra", f"extra-{index}", "extra.bench.test")
    extra = {
        "Routes": [*base["Routes"], extra_route],
        "Clusters": [*base["Clusters"], cluster(f"extra-{index}", port)],
    }
    return encode(extra)


def _in_process(value: bytes, repeats: int) -> tuple[list[float], list[float]]:
    """Parse and render `value` here, `repeats` times; milliseconds each."""
    parses, renders = [], []
    settings = RenderSettings(stats_bind=None, server_state_file="/run/state")
    for _ in range(repeats):
        started = time.perf_counter()
        parsed = parse_document(value)
        parsed_at = time.perf_counter()
        render(parsed, settings)
        parses.append((parsed_at - started) * 1000)
        renders.append((time.perf_counter() - parsed_at) * 1000)
    return parses, renders


async def measure_size(routes: int, mix: bool, repeats: int) -> dict[str, Any]:
    """One fresh stack, one size: the figures of each apply and the memory."""
    async with (
        scratch_dir("scale") as base,
        Origin(base, 4) as origin,
        Stack(base) as stack,
    ):
        doc = document(routes, origin.ports, mix=mix)
        first = await stack.result(
            await stack.put(_variant(doc, 0, origin.ports[0])), 600
        )
        results = []
        for index in range(1, repeats + 1):
            revision = await stack.put(_variant(doc, index, origin.ports[index % 4]))
            results.append(await stack.result(revision, 600))
            await asyncio.sleep(0.1)
        await stack.wait_old_workers_gone()
        master, worker = await stack.haproxy_rss()
        sidecar = stack.sidecar_rss()
        value = _variant(doc, 0, origin.ports[0])
    parses, renders = _in_process(value, max(1, min(repeats, 3)))
    return {
        "routes": routes,
        "mix": mix,
        "document_bytes": len(value),
        "first_apply": {"outcome": first.outcome, "total": first.total, **first.stages},
        "outcomes": [r.outcome for r in results],
        "total_ms": [r.total for r in results],
        "render_ms": [r.stages.get("render", 0) for r in results],
        "check_ms": [r.stages.get("check", 0) for r in results],
        "reload_ms": [r.stages.get("reload", 0) for r in results],
        "parse_here_ms": parses,
        "render_here_ms": renders,
        "sidecar_rss_kib": sidecar,
        "haproxy_master_rss_kib": master,
        "haproxy_worker_rss_kib": worker,
    }


def _row(figures: dict[str, Any]) -> list[Any]:
    return [
        f"{figures['routes']:,}" + (" mix" if figures["mix"] else ""),
        f"{figures['document_bytes'] / 1024:,.0f}",
        spread(figures["parse_here_ms"]),
        spread(figures["render_here_ms"]),
        spread(figures["render_ms"]),
        spread(figures["check_ms"]),
        spread(figures["reload_ms"]),
        spread(figures["total_ms"]),
        f"{figures['sidecar_rss_kib'] / 1024:.0f}",
        f"{figures['haproxy_worker_rss_kib'] / 1024:.0f}",
        f"{figures['haproxy_master_rss_kib'] / 1024:.0f}",
    ]


HEADERS = [
    "routes",
    "doc KiB",
    "parse ms",
    "render ms",
    "sidecar parse+render ms",
    "check ms",
    "reload ms",
    "whole apply ms",
    "sidecar RSS MiB",
    "HAProxy worker RSS MiB",
    "master RSS MiB",
]


def _sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    """Parse the options, run every size, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=_sizes, default=_sizes("10,100,1000,10000"))
    parser.add_argument("--mix-sizes", type=_sizes, default=_sizes("1000,10000"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    options = parser.parse_args()
    runs = [(size, False) for size in options.sizes]
    runs += [(size, True) for size in options.mix_sizes]
    figures = []
    for size, mix in runs:
        figures.append(asyncio.run(measure_size(size, mix, options.repeats)))
    write_json(options.json, {"machine": machine_note(), "sizes": figures})
    print(table(HEADERS, [_row(f) for f in figures]))
    print("cells: median (min-max) over the repeated applies; parse and render")
    print("also timed in the benchmark process; memory after the last apply.")
    print(f"measured {machine_note()}")
    slowest = max(figures, key=lambda f: f["routes"])
    print(
        f"whole apply at {slowest['routes']:,} routes: median "
        f"{statistics.median(slowest['total_ms']):.0f} ms"
    )


if __name__ == "__main__":
    main()
