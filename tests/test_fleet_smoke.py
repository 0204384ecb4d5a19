"""A small run of the fleet convergence benchmark, so that it keeps working."""

from __future__ import annotations

from bench.fleet_convergence import measure, parse_args, report


async def test_the_fleet_benchmark_measures_every_change() -> None:
    """Two edge nodes on a cluster converge on each change, and the report says so."""
    args = parse_args(["--nodes", "2", "--changes", "3", "--pause", "0.05"])

    results = await measure(args)

    assert [(result.kind, result.nodes) for result in results] == [
        ("nats", 2),
        ("map", 2),
        ("reload", 2),
    ]
    for result in results:
        assert len(result.times) == len(result.fastest) == len(result.delivery) == 3
        for slowest, fastest in zip(result.times, result.fastest, strict=True):
            assert 0 < fastest <= slowest < args.timeout
    text = report(results, "fleet_convergence --nodes 2")
    assert "| map | 2 | 3 |" in text
    assert "| reload | 2 | 3 |" in text
