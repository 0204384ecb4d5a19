"""Data plane: requests per second and p99 through the rendered configuration.

Side by side in one run, on loopback, each HAProxy under test pinned to CPU 0
(so it runs one thread) and `wrk` plus the origin pinned to CPU 1:

- rendered: what the sidecar writes, for 1 route and for `--routes` routes
  (one host and one destination each), and for `--routes` routes sharing
  eight clusters, which keeps the number of backends requests touch apart
  from the number of routes looked up;
- minimal: a hand-written configuration for the same routes, as an operator
  would write it (the host looked up in one map that names the backend);
- minimal with the same headers: the minimal one plus what the rendered one
  also does for each request (X-Forwarded-For/-Proto/-Host, the destination's
  Host header, closing idle connections on reload).

Each `wrk` run (keep-alive, `--connections` connections, `--duration`
seconds) cycles over every host of its configuration. The variants are
measured in turn, `--rounds` times, in a rotating order; a ratio is the
median of its per-round ratios, which the machine's drifting load affects
less than a ratio of medians. Reported: requests per second, p99 latency, and
the CPU time HAProxy's worker spent per request (its cost, whichever side of
the loopback is the bottleneck).

    .venv/bin/python bench/data_plane.py --routes 10000 --duration 5 --rounds 7
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    Origin,
    cpu_seconds,
    document,
    encode,
    host,
    machine_note,
    pinned_haproxy,
    scratch_dir,
    table,
    write_json,
)

from momus_haproxy.document import parse_document
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.nats_server import free_port
from momus_haproxy.render import RenderSettings, render

LUA = """
local hosts = {}
for line in io.lines(os.getenv("MOMUS_BENCH_HOSTS")) do hosts[#hosts + 1] = line end
local counter = math.random(#hosts)
request = function()
  counter = counter % #hosts + 1
  return wrk.format("GET", "/", {["Host"] = hosts[counter]})
end
"""

SHARED = 8


@dataclass
class Variant:
    """One HAProxy configuration under test and what `wrk` measured on it."""

    key: str
    config: str
    routes: int
    clusters: int
    files: dict[str, str] = field(default_factory=dict)
    port: int = 0
    rps: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    process: HAProxyProcess | None = None


def variants(routes: int) -> list[Variant]:
    """The configurations compared, keyed for the ratios."""
    return [
        Variant("rendered-1", "rendered", 1, 1),
        Variant("rendered-n", "rendered", routes, routes),
        Variant("rendered-n-shared", "rendered", routes, SHARED),
        Variant("minimal-1", "minimal", 1, 1),
        Variant("minimal-n", "minimal", routes, routes),
        Variant("minimal-n-shared", "minimal", routes, SHARED),
        Variant("headers-n", "minimal + same headers", routes, routes),
    ]


def rendered(variant: Variant, ports: list[int]) -> dict[str, str]:
    """The files the sidecar would install for the variant's routes."""
    settings = RenderSettings(http_bind=f"127.0.0.1:{variant.port}", stats_bind=None)
    shared = variant.clusters if variant.clusters < variant.routes else 0
    doc = document(variant.routes, ports, shared=shared)
    return render(parse_document(encode(doc)), settings).files


def minimal(variant: Variant, ports: list[int]) -> dict[str, str]:
    """A hand-written configuration for the same routes: one map, a backend each."""
    same_headers = variant.key.startswith("headers")
    front = [
        "global",
        "    maxconn 4096",
        "defaults",
        "    mode http",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 100s",
    ]
    if same_headers:
        front += ["    option idle-close-on-response", "    option forwardfor"]
    front += ["frontend http", f"    bind 127.0.0.1:{variant.port}"]
    if same_headers:
        front += [
            "    http-request set-header X-Forwarded-Proto http",
            "    http-request set-header X-Forwarded-Host %[req.hdr(host)]",
        ]
    front += [
        "    use_backend %[req.hdr(host),field(1,:),lower,map_str(hosts.map,unknown)]",
        "backend unknown",
        "    http-request return status 404",
    ]
    entries = [f"{host(i)} b{i % variant.clusters}\n" for i in range(variant.routes)]
    backends = []
    for index in range(variant.clusters):
        backends.append(f"backend b{index}")
        if same_headers:
            backends.append("    http-send-name-header Host")
        address = f"127.0.0.1:{ports[index % len(ports)]}"
        backends.append(f"    server {address} {address}")
    config = "\n".join(front + backends) + "\n"
    return {"haproxy.cfg": config, "hosts.map": "".join(entries)}


def _wrk(port: int, hosts_file: Path, script: Path, options: argparse.Namespace) -> str:
    command = [
        "taskset", "-c", "1",
        "wrk", "-t1", f"-c{options.connections}", f"-d{options.duration}s",
        "--latency", "--timeout", "5s", "-s", str(script),
        f"http://127.0.0.1:{port}/",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=options.duration + 30,
        env={"MOMUS_BENCH_HOSTS": str(hosts_file), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return done.stdout


def _read_wrk(text: str) -> tuple[float, float, int]:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)\b", text)
    if rate is None or p99 is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99[2]]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: (.*)"):
        found = re.search(pattern, text)
        if found:
            errors += sum(int(n) for n in re.findall(r"\d+", found[1]))
    return float(rate[1]), float(p99[1]) * scale, errors


async def measure(options: argparse.Namespace) -> list[Variant]:
    """Start every variant, then run `wrk` on each in turn, `rounds` times."""
    async with scratch_dir("data") as base, Origin(base, 8, cpus="1") as origin:
        tested = variants(options.routes)
        script = base / "hosts.lua"
        script.write_text(LUA)
        try:
            for index, variant in enumerate(tested):
                variant.port = free_port()
                make = rendered if variant.config == "rendered" else minimal
                variant.files = make(variant, origin.ports)
                install(variant.files, base / f"v{index}")
                variant.process = HAProxyProcess(
                    base / f"v{index}",
                    base / f"run{index}",
                    haproxy_bin=pinned_haproxy(base, "0"),
                )
                await variant.process.start()
            for number in range(options.rounds):
                shift = number % len(tested)
                for variant in tested[shift:] + tested[:shift]:
                    await _run_one(variant, base, script, options)
        finally:
            for variant in tested:
                if variant.process is not None:
                    await variant.process.aclose()
    return tested


async def _run_one(
    variant: Variant, base: Path, script: Path, options: argparse.Namespace
) -> None:
    hosts = [host(i) for i in range(variant.routes)]
    random.Random(7).shuffle(hosts)
    hosts_file = base / f"hosts-{variant.routes}.txt"
    hosts_file.write_text("\n".join(hosts) + "\n")
    assert variant.process is not None
    worker = (await variant.process.master().show_proc()).worker_pids[0]
    before = cpu_seconds(worker)
    text = await asyncio.to_thread(_wrk, variant.port, hosts_file, script, options)
    used = cpu_seconds(worker) - before
    rps, p99, errors = _read_wrk(text)
    variant.rps.append(rps)
    variant.p99_ms.append(p99)
    variant.errors.append(errors)
    variant.cpu_us.append(used / max(1.0, rps * options.duration) * 1e6)


def _ratio(top: Variant, bottom: Variant, what: str) -> float:
    """Median over rounds of the per-round ratio (requests/s, or CPU cost inverted)."""
    if what == "rps":
        pairs = zip(top.rps, bottom.rps, strict=True)
    else:  # efficiency: the bottom's CPU per request over the top's
        pairs = zip(bottom.cpu_us, top.cpu_us, strict=True)
    return statistics.median(a / b for a, b in pairs)


RATIOS = [
    ("rendered / minimal, N routes", "rendered-n", "minimal-n"),
    (
        "rendered / minimal, N routes on 8 clusters",
        "rendered-n-shared",
        "minimal-n-shared",
    ),
    ("rendered / minimal + same headers, N routes", "rendered-n", "headers-n"),
    ("rendered / minimal, 1 route", "rendered-1", "minimal-1"),
    ("rendered: N hosts / 1 host", "rendered-n", "rendered-1"),
    ("rendered: N hosts on 8 clusters / 1 host", "rendered-n-shared", "rendered-1"),
    ("minimal: N hosts / 1 host", "minimal-n", "minimal-1"),
    ("minimal: N hosts on 8 clusters / 1 host", "minimal-n-shared", "minimal-1"),
]


def report(tested: list[Variant], options: argparse.Namespace) -> dict[str, Any]:
    """Print the tables; return the raw figures."""
    rows = [
        [
            v.config,
            f"{v.routes:,}",
            f"{v.clusters:,}",
            f"{statistics.median(v.rps):,.0f} ({min(v.rps):,.0f}-{max(v.rps):,.0f})",
            f"{statistics.median(v.p99_ms):.1f}",
            f"{statistics.median(v.cpu_us):.1f}",
            sum(v.errors),
        ]
        for v in tested
    ]
    headers = [
        "config",
        "routes",
        "clusters",
        "req/s median (min-max)",
        "p99 ms",
        "HAProxy CPU µs/req",
        "errors",
    ]
    print(table(headers, rows))
    by = {v.key: v for v in tested}
    ratios = {}
    for label, top, bottom in RATIOS:
        name = label.replace("N", f"{options.routes:,}")
        ratios[name] = {
            "rps": _ratio(by[top], by[bottom], "rps"),
            "cpu": _ratio(by[top], by[bottom], "cpu"),
        }
    print()
    print(
        table(
            ["ratio", "req/s", "CPU per request (inverted)"],
            [[n, f"{r['rps']:.3f}", f"{r['cpu']:.3f}"] for n, r in ratios.items()],
        )
    )
    return {
        "variants": [
            {
                "key": v.key,
                "config": v.config,
                "routes": v.routes,
                "clusters": v.clusters,
                "rps": v.rps,
                "p99_ms": v.p99_ms,
                "cpu_us": v.cpu_us,
                "errors": v.errors,
            }
            for v in tested
        ],
        "ratios": ratios,
    }


def main() -> None:
    """Parse the options, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--routes", type=int, default=10000)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    options = parser.parse_args()
    tested = asyncio.run(measure(options))
    figures = report(tested, options)
    figures["machine"] = machine_note()
    write_json(options.json, figures)
    print(f"measured {figures['machine']}")


if __name__ == "__main__":
    main()
