"""What `render` writes: golden files, stable order, scale, and the CLI around it.

Golden outputs live in `tests/golden/<case>/` (haproxy.cfg and its maps). After
a deliberate change to the output, rewrite them with::

    MOMUS_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_render.py

and review the difference in version control before committing it.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from momus_haproxy import render as render_module
from momus_haproxy.check import check
from momus_haproxy.cli import main
from momus_haproxy.document import parse_document
from momus_haproxy.install import install
from momus_haproxy.render import DEFAULT_TEMPLATES, Rendered, RenderSettings, render
from tests.support.cases import CASES, SERVED_CASES

GOLDEN = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("MOMUS_UPDATE_GOLDEN") == "1"
HTTP_BIND = "127.0.0.1:8080"
STATS_BIND = "127.0.0.1:8404"
SETTINGS = RenderSettings(http_bind=HTTP_BIND, stats_bind=STATS_BIND)
REJECTED = json.loads((CASES / "rejected-documents" / "expect.json").read_text())


def _case_bytes(name: str) -> bytes:
    return (CASES / name / "route-config.json").read_bytes()


def _render(data: bytes | dict[str, Any]) -> Rendered:
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    return render(parse_document(data), SETTINGS)


def _read_tree(directory: Path) -> dict[str, str]:
    """Every file under `directory`, by its relative POSIX name."""
    return {
        path.relative_to(directory).as_posix(): path.read_bytes().decode()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _write_golden(directory: Path, files: dict[str, str]) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode())


def _diff(name: str, expected: str, actual: str) -> str:
    lines = difflib.unified_diff(
        expected.splitlines(keepends=True),
        actual.splitlines(keepends=True),
        f"golden/{name}",
        f"rendered/{name}",
    )
    return "".join(lines)


class TestGolden:
    """Each shared case renders exactly to its golden files."""

    @pytest.mark.parametrize("name", SERVED_CASES)
    def test_render_matches_golden(self, name: str) -> None:
        """haproxy.cfg and every map file equal tests/golden/<case>/ byte for byte."""
        rendered = _render(_case_bytes(name))
        if UPDATE_GOLDEN:
            _write_golden(GOLDEN / name, rendered.files)
        expected = _read_tree(GOLDEN / name)
        assert expected, f"no golden files for {name}: run with MOMUS_UPDATE_GOLDEN=1"
        assert sorted(rendered.files) == sorted(expected), "the set of files differs"
        diffs = [
            _diff(file, expected[file], text)
            for file, text in sorted(rendered.files.items())
            if text != expected[file]
        ]
        if diffs:
            pytest.fail(
                f"{name} renders differently from its golden files "
                "(MOMUS_UPDATE_GOLDEN=1 rewrites them):\n" + "\n".join(diffs)
            )

    def test_every_golden_has_a_case(self) -> None:
        """No golden directory outlives its case."""
        assert sorted(p.name for p in GOLDEN.iterdir()) == SERVED_CASES

    @pytest.mark.parametrize("name", SERVED_CASES)
    async def test_golden_passes_haproxy(
        self, name: str, tmp_path: Path, haproxy_bin: str
    ) -> None:
        """The golden files, installed as they are, pass a real `haproxy -c`."""
        install(_read_tree(GOLDEN / name), tmp_path)
        output = await check(tmp_path, haproxy_bin=haproxy_bin)
        assert "[ALERT]" not in output


# Order -------------------------------------------------------------------------


def _shuffled(document: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Reorder routes, clusters, each route's hosts and each cluster's destinations."""
    document = json.loads(json.dumps(document))
    rng.shuffle(document["Routes"])
    rng.shuffle(document["Clusters"])
    for route in document["Routes"]:
        rng.shuffle(route["Match"].get("Hosts", []))
    for cluster in document["Clusters"]:
        items = list(cluster.get("Destinations", {}).items())
        rng.shuffle(items)
        cluster["Destinations"] = dict(items)
    return document


def _reversed(document: dict[str, Any]) -> dict[str, Any]:
    document = json.loads(json.dumps(document))
    document["Routes"].reverse()
    document["Clusters"].reverse()
    for route in document["Routes"]:
        route["Match"].get("Hosts", []).reverse()
    for cluster in document["Clusters"]:
        cluster["Destinations"] = dict(reversed(cluster["Destinations"].items()))
    return document


class TestOrder:
    """The order of a document's lists and objects does not change the output."""

    @pytest.mark.parametrize("name", ["multi-site", "catch-all-first", "original-host"])
    def test_reordered_document_renders_byte_identical(self, name: str) -> None:
        """Routes, clusters, hosts and destinations in any order give the same files."""
        document = json.loads(_case_bytes(name))
        expected = _render(document).files
        orders = [_reversed(document)]
        orders += [_shuffled(document, random.Random(seed)) for seed in range(6)]
        assert len({json.dumps(order) for order in orders}) > 2, "shuffles reorder"
        for order in orders:
            assert _render(order).files == expected


# Scale -------------------------------------------------------------------------


def _many_routes(count: int, *, shared_cluster: bool = False) -> dict[str, Any]:
    """`count` routes, one host each; a few share a host or match on a path.

    Of every 50 routes, the second adds `/api/{**rest}` to the first one's
    host, the third has a literal path, the fourth a wildcard host and the
    fifth redirects www.
    """
    routes, clusters = [], []
    for index in range(count):
        kind = index % 50
        host = f"site{index - (kind == 1)}.example.test"
        match: dict[str, Any] = {"Hosts": ["*." + host if kind == 3 else host]}
        if kind == 1:
            match["Path"] = "/api/{**rest}"
        elif kind == 2:
            match["Path"] = "/exact/page"
        cluster = "shared" if shared_cluster else f"c{index}"
        route = {"RouteId": f"r{index}", "ClusterId": cluster, "Match": match}
        if kind == 4:
            route["Metadata"] = {"RedirectWww": "true"}
        routes.append(route)
        if not shared_cluster:
            address = f"http://127.0.0.1:{10000 + index}"
            destination = {"d": {"Address": address}}
            clusters.append({"ClusterId": cluster, "Destinations": destination})
    if shared_cluster:
        destination = {"d": {"Address": "http://127.0.0.1:9001"}}
        clusters.append({"ClusterId": "shared", "Destinations": destination})
    return {"Routes": routes, "Clusters": clusters}


@functools.cache
def _large_render() -> tuple[Rendered, float]:
    """The 10,000-route render, made once for the tests that read it; its time."""
    document = _many_routes(10_000)
    started = time.monotonic()
    rendered = _render(document)
    return rendered, time.monotonic() - started


def _sections(config: str) -> tuple[str, list[str]]:
    """Split haproxy.cfg into everything before the backends, and each backend."""
    head, *backends = re.split(r"\n(?=# cluster )", config)
    return _without_map_hashes(head), backends


def _without_map_hashes(text: str) -> str:
    return re.sub(r"-[0-9a-f]{12}\.map", ".map", text)


class TestScale:
    """Simple routes live in map files, so haproxy.cfg does not grow with them."""

    def test_ten_thousand_routes_keep_the_frontend(self) -> None:
        """10 and 10,000 routes give one frontend; only the backends grow."""
        small_head, small_backends = _sections(_render(_many_routes(10)).config)
        rendered, elapsed = _large_render()
        head, backends = _sections(rendered.config)

        # Matching hosts to routes once scanned every route for every host,
        # which took minutes here; it is linear now.
        assert elapsed < 20, f"10,000 routes took {elapsed:.1f} s to parse and render"
        assert head == small_head
        assert len(backends) == 10_000
        shapes = {backend.count("\n") for backend in backends + small_backends}
        assert len(shapes) == 1, "every one-destination backend has the same lines"
        hosts = next(t for n, t in rendered.files.items() if n.startswith("maps/hosts"))
        exact, wildcard, www = 10_000 - 2 * 200, 200, 200  # see _many_routes
        assert hosts.count("\n") == exact + www
        assert sum(t.count("\n") for n, t in rendered.files.items() if "wild" in n) == (
            wildcard
        )

    def test_ten_thousand_routes_on_one_cluster_give_one_config(self) -> None:
        """With one shared cluster, haproxy.cfg is the same for 10 and 10,000 routes."""
        small = _render(_many_routes(10, shared_cluster=True))
        large = _render(_many_routes(10_000, shared_cluster=True))
        assert _without_map_hashes(large.config) == _without_map_hashes(small.config)
        assert len(large.config.splitlines()) == len(small.config.splitlines())

    async def test_ten_thousand_routes_pass_haproxy(
        self, tmp_path: Path, haproxy_bin: str
    ) -> None:
        """The 10,000-route render, with its backends and maps, passes `haproxy -c`."""
        install(_large_render()[0].files, tmp_path)
        await check(tmp_path, haproxy_bin=haproxy_bin)


# Names -------------------------------------------------------------------------


class TestNames:
    """Routes and clusters keep distinct HAProxy names."""

    async def test_clashing_names_are_lengthened(
        self, tmp_path: Path, haproxy_bin: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two ids whose short names clash get distinct, longer names."""
        monkeypatch.setattr(render_module, "safe_name", lambda prefix, _: prefix + "x")
        document = {
            "Routes": [
                {"RouteId": f"r{i}", "ClusterId": f"c{i}", "Match": {"Hosts": [h]}}
                for i, h in enumerate(["a.test", "b.test"])
            ],
            "Clusters": [
                {"ClusterId": f"c{i}", "Destinations": {"d": {"Address": a}}}
                for i, a in enumerate(["http://127.0.0.1:1", "http://127.0.0.1:2"])
            ],
        }
        rendered = _render(document)
        backends = next(t for n, t in rendered.files.items() if "backends" in n)
        pairs = [line.split() for line in backends.splitlines()]
        assert len({route for route, _ in pairs}) == 2
        assert len({backend for _, backend in pairs}) == 2
        assert all(name.startswith(("r-x-", "c-x-")) for pair in pairs for name in pair)
        install(rendered.files, tmp_path)
        await check(tmp_path, haproxy_bin=haproxy_bin)


# The command line ----------------------------------------------------------------


def _run(*args: str, stdin: str | None = None) -> Result:
    """Run `momus-haproxy ARGS` in-process, with fixed listen addresses.

    `MOMUS_*` variables of the environment running the tests are hidden, so
    that a developer's own settings cannot change what is rendered.
    """
    binds = ["--http-bind", HTTP_BIND, "--stats-bind", STATS_BIND]
    hidden = {name: None for name in os.environ if name.startswith("MOMUS_")}
    runner = CliRunner(env=hidden)
    return runner.invoke(main, [*args, *binds], input=stdin, catch_exceptions=False)


def _validate(path: Path | str, haproxy_bin: str, *extra: str) -> Result:
    return _run(
        "validate", "--from-file", str(path), "--haproxy-bin", haproxy_bin, *extra
    )


class TestCommandLine:
    """`validate` and `render` exit 0, 2 or 3 and say why."""

    @pytest.mark.parametrize("name", SERVED_CASES)
    def test_validate_accepts_good_documents(self, name: str, haproxy_bin: str) -> None:
        """`validate` exits 0 for every shared case."""
        result = _validate(CASES / name / "route-config.json", haproxy_bin)
        assert result.exit_code == 0, result.stderr
        assert "configuration is valid" in result.stderr

    @pytest.mark.parametrize(
        "case", REJECTED["cases"], ids=[case["name"] for case in REJECTED["cases"]]
    )
    @pytest.mark.parametrize("command", ["validate", "render"])
    def test_rejected_documents_exit_2(
        self, command: str, case: dict[str, str], tmp_path: Path, haproxy_bin: str
    ) -> None:
        """Each rejected document exits 2 with its fragment on stderr, stdout empty."""
        path = tmp_path / "route-config.json"
        path.write_text(case["value"])
        if command == "validate":
            result = _validate(path, haproxy_bin)
        else:
            result = _run("render", "--from-file", str(path))
        assert result.exit_code == 2, result.stderr
        assert case["error_contains"] in result.stderr
        assert result.stdout == ""

    def test_rejected_document_from_stdin_exits_2(self) -> None:
        """`render --from-file -` reads standard input and refuses it the same way."""
        case = REJECTED["cases"][0]
        result = _run("render", "--from-file", "-", stdin=case["value"])
        assert result.exit_code == 2
        assert case["error_contains"] in result.stderr

    def test_haproxy_refusal_exits_3_with_its_message(
        self, tmp_path: Path, haproxy_bin: str
    ) -> None:
        """A template HAProxy refuses makes `validate` exit 3 quoting HAProxy."""
        template = (DEFAULT_TEMPLATES / "haproxy.cfg.j2").read_text()
        broken = template.replace(
            "    option redispatch\n",
            "    option redispatch\n    no-such-directive on\n",
            1,
        )
        assert broken != template
        (tmp_path / "haproxy.cfg.j2").write_text(broken)
        seed = CASES / "seed-devsite" / "route-config.json"
        result = _validate(seed, haproxy_bin, "--templates-dir", str(tmp_path))
        assert result.exit_code == 3, result.stderr
        assert "haproxy -c refused the configuration" in result.stderr
        assert "no-such-directive" in result.stderr

    @pytest.mark.parametrize("name", SERVED_CASES)
    def test_render_out_passes_haproxy_from_anywhere(
        self, name: str, tmp_path: Path, haproxy_bin: str
    ) -> None:
        """`render --out DIR` writes what `haproxy -c -f DIR/haproxy.cfg` accepts."""
        out = tmp_path / "out"
        source = CASES / name / "route-config.json"
        result = _run("render", "--from-file", str(source), "--out", str(out))
        assert result.exit_code == 0, result.stderr
        assert _read_tree(out).keys() >= _read_tree(GOLDEN / name).keys()
        # From another directory: maps are found next to haproxy.cfg.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        checked = subprocess.run(
            [haproxy_bin, "-c", "-f", str(out / "haproxy.cfg")],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr

    async def test_printed_seed_config_passes_haproxy(
        self, tmp_path: Path, haproxy_bin: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`render --from-file` prints a haproxy.cfg that passes `-c` on its own.

        Its map files go to the cache directory, named by their content, and
        the printed configuration points at them by absolute path.
        """
        cache = tmp_path / "cache"
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
        seed = CASES / "seed-devsite" / "route-config.json"
        result = _run("render", "--from-file", str(seed))
        assert result.exit_code == 0, result.stderr
        golden = _read_tree(GOLDEN / "seed-devsite")
        maps = {name: text for name, text in golden.items() if name != "haproxy.cfg"}
        expected = golden["haproxy.cfg"]
        for name in maps:
            expected = expected.replace(f"({name})", f"({cache}/momus-haproxy/{name})")
        assert result.stdout == expected
        assert _read_tree(cache / "momus-haproxy") == maps
        alone = tmp_path / "elsewhere"
        alone.mkdir()
        (alone / "haproxy.cfg").write_text(result.stdout)
        output = await check(alone, haproxy_bin=haproxy_bin)
        assert "[ALERT]" not in output


def test_a_bad_nats_url_names_the_option() -> None:
    """A URL that is not a NATS URL is refused in one line naming --nats-url."""
    result = CliRunner().invoke(main, ["config", "get", "--nats-url", "127.0.0.1:4222"])
    assert result.exit_code == 2
    assert "--nats-url: '127.0.0.1:4222' is not a NATS URL" in result.output
    assert "pydantic" not in result.output
