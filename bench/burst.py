"""Bursts: `--rate` puts a second for `--seconds` seconds, each needing a reload.

A stack (nats-server, HAProxy, `momus-haproxy run` with its default quiet
period) serves `--routes` routes while `wrk` keeps `--connections`
keep-alive connections busy on one of them for the whole burst (wrk never
retries, so a request lost to a reload shows as an error). Then every put
adds a new cluster and a route to it. `show proc` is read every 50 ms.

Reported: puts, revisions the sidecar applied, HAProxy reloads, the most old
workers seen at once and how many are left `--settle` s after the burst, whether
HAProxy ends on the last revision and how long after the last put it served
it, and wrk's errors.

    .venv/bin/python bench/burst.py --rate 100 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import time
from pathlib import Path
from typing import Any

from _harness import (
    Origin,
    Stack,
    cluster,
    document,
    encode,
    host,
    machine_note,
    route,
    scratch_dir,
    table,
    wait_for_answer,
    write_json,
)


def _with_probe(base: dict[str, Any], index: int, port: int) -> bytes:
    routes = [
        *base["Routes"],
        route(f"burst-{index}", f"burst-{index}", f"burst-{index}.test"),
    ]
    clusters = [*base["Clusters"], cluster(f"burst-{index}", port)]
    return encode({"Routes": routes, "Clusters": clusters})


async def _sample(
    stack: Stack, samples: list[tuple[float, int, int]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        with contextlib.suppress(Exception):
            state = await stack.proc()
            samples.append((time.monotonic(), state.reloads, len(state.old_workers)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.05)


async def measure(options: argparse.Namespace) -> dict[str, Any]:
    """Run one burst and return its figures."""
    async with (
        scratch_dir("burst") as base,
        Origin(base, 4) as origin,
        Stack(base) as stack,
    ):
        base_doc = document(options.routes, origin.ports)
        first = await stack.put(encode(base_doc))
        await stack.result(first, 120)
        reloads_before = (await stack.proc()).reloads
        wrk = await asyncio.create_subprocess_exec(
            "wrk", "-t1", f"-c{options.connections}",
            f"-d{options.seconds + 2}s", "--timeout", "5s",
            "-H", f"Host: {host(0)}", f"http://127.0.0.1:{stack.http_port}/",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        samples: list[tuple[float, int, int]] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample(stack, samples, stop))
        await asyncio.sleep(1)
        docs = [
            _with_probe(base_doc, i, origin.ports[i % 4])
            for i in range(options.rate * options.seconds)
        ]
        started = time.monotonic()
        revisions = []
        for index, value in enumerate(docs):
            await asyncio.sleep(
                max(0.0, started + index / options.rate - time.monotonic())
            )
            revisions.append(await stack.put(value))
        last_put = time.perf_counter()
        put_seconds = time.monotonic() - started
        last = len(docs) - 1
        wanted = {origin.index(origin.ports[last % 4])}
        served = await wait_for_answer(
            stack.http_port, f"burst-{last}.test", wanted, after=last_put, within=60
        )
        result = await stack.result(revisions[-1], 60)
        out = (await asyncio.wait_for(wrk.communicate(), 60))[0].decode()
        await asyncio.sleep(options.settle)
        stop.set()
        await sampler
        state = await stack.proc()
        results = stack.results()
    applied = [
        r
        for r in revisions
        if r in results and results[r].outcome in ("applied", "runtime")
    ]
    return {
        "routes": options.routes,
        "rate": options.rate,
        "seconds": options.seconds,
        "puts": len(revisions),
        "put_seconds": put_seconds,
        "revisions_applied": len(applied),
        "reloads": state.reloads - reloads_before,
        "max_old_workers": max((s[2] for s in samples), default=0),
        "old_workers_after_settle": len(state.old_workers),
        "last_revision_outcome": result.outcome,
        # The probe above saw the last revision's route answered.
        "ends_on_last_revision": result.outcome == "applied",
        "last_put_to_served_ms": served * 1000,
        "wrk": _wrk_figures(out),
    }


def _wrk_figures(text: str) -> dict[str, Any]:
    figures: dict[str, Any] = {"text": text}
    found = re.search(r"(\d+) requests in", text)
    figures["requests"] = int(found[1]) if found else 0
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: (.*)"):
        match = re.search(pattern, text)
        if match:
            errors += sum(int(n) for n in re.findall(r"\d+", match[1]))
    figures["errors"] = errors
    return figures


def main() -> None:
    """Parse the options, run, print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=100, help="puts per second")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--routes", type=int, default=100)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--settle", type=float, default=5, help="seconds to wait before counting"
    )
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    options = parser.parse_args()
    figures = asyncio.run(measure(options))
    figures["machine"] = machine_note()
    write_json(options.json, figures)
    wrk = figures["wrk"]
    headers = [
        "puts",
        "over s",
        "revisions applied",
        "reloads",
        "max old workers",
        f"old workers {options.settle:g} s later",
        "ends on last revision",
        "last put to served ms",
        "wrk requests",
        "wrk errors",
    ]
    row = [
        figures["puts"],
        f"{figures['put_seconds']:.1f}",
        figures["revisions_applied"],
        figures["reloads"],
        figures["max_old_workers"],
        figures["old_workers_after_settle"],
        "yes" if figures["ends_on_last_revision"] else "no",
        f"{figures['last_put_to_served_ms']:.0f}",
        wrk["requests"],
        wrk["errors"],
    ]
    print(table(headers, [row]))
    print(f"measured {figures['machine']}")


if __name__ == "__main__":
    main()
