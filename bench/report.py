"""Run every benchmark one after the other and write BENCHMARKS.md from the run.

Each benchmark runs as its own command (the one printed above its table),
with `--json` so that this script can judge its figures against the targets.
The machine should be otherwise idle: the benchmarks share its two cores.

    .venv/bin/python bench/report.py --out BENCHMARKS.md

`--only NAME[,NAME]` runs some of them (names as in `BENCHMARKS`), and
`--quick` runs each at a tiny size, which the smoke tests use. With
`--out`, only the part of the file between the run markers is replaced, so
the reading of the figures written around them stays.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import machine_note

ROOT = Path(__file__).resolve().parent.parent

Verdict = Callable[[list[dict[str, Any]]], list[str]]


@dataclass(frozen=True)
class Benchmark:
    """One table of BENCHMARKS.md: a title, its runs and how to judge them."""

    name: str
    title: str
    script: str
    runs: Sequence[Sequence[str]]
    quick: Sequence[Sequence[str]]
    verdict: Verdict

    def command(self, args: Sequence[str]) -> str:
        """The command line an operator types to reproduce one run."""
        return shlex.join([".venv/bin/python", f"bench/{self.script}", *args])


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _change_to_traffic(figures: list[dict[str, Any]]) -> list[str]:
    lines = []
    targets = {1000: 200.0, 10000: 1000.0}
    for run in figures:
        bound = targets.get(run["routes"])
        if bound is None or run["kind"] != "cluster":
            continue
        p99 = run["latency_ms"]["p99"]
        lines.append(
            f"p99 at {run['routes']:,} routes under {bound:.0f} ms: "
            f"{_met(p99 < bound)} ({p99:.0f} ms)"
        )
    return lines


def _apply_scale(figures: list[dict[str, Any]]) -> list[str]:
    sizes = [size for run in figures for size in run["sizes"]]
    largest = max(sizes, key=lambda size: (size["routes"], not size["mix"]))
    total = sorted(largest["total_ms"])[len(largest["total_ms"]) // 2]
    return [
        f"whole apply at {largest['routes']:,} routes under 2 s: "
        f"{_met(total < 2000)} (median {total:.0f} ms)"
    ]


def _data_plane(figures: list[dict[str, Any]]) -> list[str]:
    lines = []
    for run in figures:
        for name, ratio in run["ratios"].items():
            if name.startswith("rendered / minimal,") or name.startswith("rendered: "):
                lines.append(
                    f"{name} at least 0.95: {_met(ratio['rps'] >= 0.95)} "
                    f"(req/s {ratio['rps']:.3f}, CPU {ratio['cpu']:.3f})"
                )
    return lines


def _burst(figures: list[dict[str, Any]]) -> list[str]:
    lines = []
    for run in figures:
        lines.append(
            f"{run['puts']} puts caused {run['reloads']} reloads; ends on the last "
            f"revision: {'yes' if run['ends_on_last_revision'] else 'no'}; most old "
            f"workers at once {run['max_old_workers']}, "
            f"{run['old_workers_after_settle']} left after settling; "
            f"wrk errors {run['wrk']['errors']}"
        )
    return lines


def _reloads_avoided(figures: list[dict[str, Any]]) -> list[str]:
    lines = []
    for run in figures:
        for kind, kind_figures in run["kinds"].items():
            count = kind_figures["latency_ms"]["n"]
            per_change = kind_figures["reloads"] / count
            p99 = kind_figures["latency_ms"]["p99"]
            lines.append(
                f"{kind}: reloads per change under 0.05: {_met(per_change < 0.05)} "
                f"({per_change:.3f}); p99 under 50 ms: {_met(p99 < 50)} "
                f"({p99:.0f} ms)"
            )
    return lines


BENCHMARKS = (
    Benchmark(
        "change",
        "1. Change to traffic",
        "change_to_traffic.py",
        runs=(
            ("--routes", "10", "--changes", "200"),
            ("--routes", "1000", "--changes", "200"),
            ("--routes", "10000", "--changes", "200"),
            ("--routes", "1000", "--changes", "200", "--kind", "host"),
        ),
        quick=(("--routes", "5", "--changes", "2"),),
        verdict=_change_to_traffic,
    ),
    Benchmark(
        "scale",
        "2. Scale of one apply",
        "apply_scale.py",
        runs=(("--sizes", "10,100,1000,10000", "--mix-sizes", "1000,10000"),),
        quick=(("--sizes", "5", "--mix-sizes", "", "--repeats", "1"),),
        verdict=_apply_scale,
    ),
    Benchmark(
        "data",
        "3. Data plane",
        "data_plane.py",
        runs=(("--routes", "10000", "--duration", "5", "--rounds", "7"),),
        quick=(("--routes", "20", "--duration", "1", "--rounds", "1"),),
        verdict=_data_plane,
    ),
    Benchmark(
        "burst",
        "4. Bursts",
        "burst.py",
        runs=(("--rate", "100", "--seconds", "10"),),
        quick=(("--rate", "20", "--seconds", "1", "--routes", "5", "--settle", "1"),),
        verdict=_burst,
    ),
    Benchmark(
        "avoided",
        "5. Reloads avoided",
        "reloads_avoided.py",
        runs=(("--routes", "1000", "--changes", "210"),),
        quick=(("--routes", "5", "--changes", "3"),),
        verdict=_reloads_avoided,
    ),
)


def run_one(
    benchmark: Benchmark, args: Sequence[str], scratch: Path
) -> tuple[str, dict[str, Any]]:
    """Run one command; return what it printed and the figures it wrote."""
    figures = scratch / f"{benchmark.name}-{time.monotonic_ns()}.json"
    command = [sys.executable, str(ROOT / "bench" / benchmark.script), *args]
    print(f"running: {benchmark.command(args)}", file=sys.stderr, flush=True)
    done = subprocess.run(
        [*command, "--json", str(figures)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            f"{benchmark.command(args)} failed with status {done.returncode}:\n"
            f"{done.stdout}{done.stderr}"
        )
    return done.stdout.strip(), json.loads(figures.read_text())


def section(benchmark: Benchmark, quick: bool, scratch: Path) -> str:
    """Run every command of `benchmark`; return its part of BENCHMARKS.md."""
    parts = [f"## {benchmark.title}", ""]
    figures = []
    for args in benchmark.quick if quick else benchmark.runs:
        printed, run_figures = run_one(benchmark, args, scratch)
        figures.append(run_figures)
        parts += [f"    {benchmark.command(args)}", "", printed, ""]
    parts += ["Targets:", ""]
    parts += [f"- {line}" for line in benchmark.verdict(figures)]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the chosen benchmarks and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the report here")
    parser.add_argument("--only", default="", help="comma-separated names")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    options = parser.parse_args(argv)
    chosen = {name for name in options.only.split(",") if name}
    unknown = chosen - {b.name for b in BENCHMARKS}
    if unknown:
        parser.error(f"no benchmark named {', '.join(sorted(unknown))}")

    started = machine_note()
    with tempfile.TemporaryDirectory(prefix="momus-bench-") as scratch:
        sections = [
            section(benchmark, options.quick, Path(scratch))
            for benchmark in BENCHMARKS
            if not chosen or benchmark.name in chosen
        ]
    header = (
        f"Run started {started}; ended {machine_note()}.\n\n"
        "Reproduce the whole run with `.venv/bin/python bench/report.py "
        "--out BENCHMARKS.md`, or one table with the command above it.\n"
    )
    text = "\n".join([header, *sections])
    if options.out is not None:
        options.out.write_text(_merged(options.out, text))
    print(text)


START, END = "<!-- run starts -->", "<!-- run ends -->"


def _merged(path: Path, run: str) -> str:
    """`path`'s text with the part between the run markers replaced by `run`.

    What stands around the markers (the reading of the figures) is kept; a
    file without them gets the run alone, between new markers.
    """
    old = path.read_text() if path.exists() else ""
    if START in old and END in old:
        before, _, rest = old.partition(START)
        _, _, after = rest.partition(END)
        return f"{before}{START}\n\n{run}\n{END}{after}"
    return f"{START}\n\n{run}\n{END}\n"


if __name__ == "__main__":
    main()
