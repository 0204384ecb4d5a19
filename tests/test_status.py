"""Fleet status: the records instances write, and what `status` makes of them."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from momus_haproxy.errors import MomusError
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.install import install
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.render import RenderSettings
from momus_haproxy.sidecar import ApplyResult, LastGood, SidecarSettings, initial_files
from momus_haproxy.status import (
    Attempt,
    Fleet,
    InstanceView,
    StatusRecord,
    Tracker,
    format_table,
    read_fleet,
)
from momus_haproxy.watch import NatsOptions, Store
from tests.support.echo import free_port as _free_port
from tests.support.fleet import STATUS_INTERVAL, STATUS_TTL, cli, spawn
from tests.support.fleet import Fleet as FleetFixture
from tests.support.haproxy import HAProxyRunner
from tests.support.nats import OperatorFactory

GOOD = json.dumps(
    {
        "Routes": [
            {
                "RouteId": "site",
                "ClusterId": "web",
                "Match": {"Hosts": ["site.example.test"], "Path": "{**catch-all}"},
            }
        ],
        "Clusters": [
            {
                "ClusterId": "web",
                "Destinations": {"d1": {"Address": "http://127.0.0.1:9"}},
            }
        ],
    }
).encode()
REFUSED = GOOD.replace(b'"ClusterId": "web", "Match"', b'"ClusterId": "nope", "Match"')
FIXED = GOOD.replace(b"site.example.test", b"www2.example.test")


class _FakeSidecar:
    """The attributes of a Sidecar that a Tracker reads."""

    def __init__(self) -> None:
        self.latest_revision: int | None = None
        self.last_good: LastGood | None = None

    @property
    def applied_revision(self) -> int | None:
        """The revision of the last good document."""
        return self.last_good.revision if self.last_good else None


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """Return the current time."""
        return self.now


def _tracker() -> tuple[Tracker, _FakeSidecar, _Clock]:
    sidecar, clock = _FakeSidecar(), _Clock()
    return Tracker(sidecar, clock=clock), sidecar, clock  # type: ignore[arg-type]


class TestTracker:
    """How long the store's latest revision waits for this instance."""

    def test_no_lag_when_in_step(self) -> None:
        """An instance that settled the latest revision has no lag."""
        tracker, sidecar, clock = _tracker()
        sidecar.latest_revision = 3
        tracker.on_result(ApplyResult(3, "applied"))
        clock.now += 50
        assert tracker.lag() == 0

    def test_lag_grows_while_a_newer_revision_waits(self) -> None:
        """A revision seen in the store but not handled counts as lag from then."""
        tracker, sidecar, clock = _tracker()
        sidecar.last_good = LastGood(3, GOOD, "x")
        tracker.observe_store(4)
        clock.now += 7
        assert tracker.lag() == 7
        assert tracker.latest_revision == 4

    def test_refused_revision_is_settled(self) -> None:
        """A refused revision is not lag: the instance is done with it."""
        tracker, sidecar, clock = _tracker()
        sidecar.last_good = LastGood(3, GOOD, "x")
        tracker.observe_store(4)
        clock.now += 5
        tracker.on_result(ApplyResult(4, "refused", "Routes[0].ClusterId: no"))
        assert tracker.lag() == 0

    def test_reload_failure_is_lag(self) -> None:
        """A reload failure is retried, so the revision keeps waiting."""
        tracker, sidecar, clock = _tracker()
        sidecar.last_good = LastGood(3, GOOD, "x")
        tracker.observe_store(4)
        tracker.on_result(ApplyResult(4, "reload_failed", "master gone"))
        clock.now += 9
        assert tracker.lag() == 9

    def test_unknown_store_means_no_lag(self) -> None:
        """Without any revision seen (NATS down at start) there is no lag."""
        tracker, _, clock = _tracker()
        clock.now += 100
        assert tracker.lag() == 0


def _record(name: str, applied: int | None, **changes: Any) -> StatusRecord:
    values: dict[str, Any] = {
        "instance": name,
        "state": "running",
        "bucket": "momus",
        "key": "route-config",
        "applied_revision": applied,
        "started_at": "2030-01-01T00:00:00Z",
        "updated_at": "2030-01-01T00:00:00Z",
        "interval": 10.0,
    }
    values.update(changes)
    return StatusRecord(**values)


def _view(record: StatusRecord, lag: int = 0, condition: str = "live") -> InstanceView:
    return InstanceView(record, 1.0, condition, lag)  # type: ignore[arg-type]


class TestFleetSummary:
    """The summary line and exit status of `status`, from given records."""

    def test_all_on_latest(self) -> None:
        """Every live instance on the latest revision is convergence."""
        fleet = Fleet("momus", "route-config", 42, (_view(_record("a", 42)),))
        assert fleet.converged
        assert fleet.summary() == "1 of 1 on revision 42"

    def test_refusal_is_named_with_its_error(self) -> None:
        """An instance that refused the latest revision is named with the error."""
        refused = Attempt(
            revision=42, result="refused", error="Routes[3].ClusterId: x", at=""
        )
        views = (
            _view(_record("edge-1", 42)),
            _view(_record("edge-2", 41, last_attempt=refused), lag=1),
            _view(_record("edge-3", 40, state="stopped"), condition="stopped"),
        )
        fleet = Fleet("momus", "route-config", 42, views)
        assert not fleet.converged
        assert fleet.summary() == (
            "1 of 2 on revision 42; edge-2 refused it: Routes[3].ClusterId: x; "
            "edge-3 stopped"
        )
        assert "refused (r42)" in fleet.table()

    def test_no_live_instance_is_not_convergence(self) -> None:
        """A fleet with no live instance does not pass a deploy pipeline."""
        fleet = Fleet("momus", "route-config", 1, ())
        assert not fleet.converged
        assert "no live instance" in fleet.summary()

    def test_table_layout(self) -> None:
        """Columns line up under their headers."""
        text = format_table(("A", "BB"), [("xxx", "y")])
        assert text.splitlines() == ["A    BB", "xxx  y"]


async def _fleet_view(url: str) -> Any:
    async with Store(NatsOptions(servers=[url])) as store:
        return await read_fleet(store)


async def _until(check: Any, within: float = 15.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


def _attempts_at(url: str, revision: int, count: int) -> Any:
    async def check() -> bool:
        fleet = await _fleet_view(url)
        attempts = [v.record.last_attempt for v in fleet.live]
        done = [a for a in attempts if a is not None and a.revision == revision]
        return len(done) == count

    return check


@pytest.mark.slow
class TestFleet:
    """Three real sidecars, one nats-server: put, refuse, fix, stop, kill."""

    async def test_put_refuse_fix_stop_kill(
        self, fleet: FleetFixture, operator_kv: OperatorFactory
    ) -> None:
        """`status` follows each stage, `--wait` returns on convergence, and
        stopped and killed instances are marked and aged out."""
        url = fleet.url
        edge1, edge2, edge3 = await fleet.start("edge-1", "edge-2", "edge-3")

        async def three_live() -> bool:
            try:
                return len((await _fleet_view(url)).live) == 3
            except MomusError:
                return False  # no status bucket yet

        assert await _until(three_live), [
            m.log.read_text() for m in fleet.members.values()
        ]
        async with operator_kv(url) as operator:
            good = await operator.put(GOOD)
            waited = await cli("status", "--nats-url", url, "--wait", "20")
            assert waited.exit_code == 0, waited.output
            assert f"3 of 3 on revision {good}" in waited.output

            refused = await operator.put(REFUSED)
            assert await _until(_attempts_at(url, refused, 3))
            result = await cli("status", "--nats-url", url)
            assert result.exit_code == 1
            assert result.output.splitlines()[-1] == (
                f"0 of 3 on revision {refused}; edge-1, edge-2, edge-3 refused it: "
                "Routes[0].ClusterId: no cluster 'nope'"
            )
            assert f"refused (r{refused})" in result.output
            await asyncio.sleep(1.2)  # past --ready-max-lag: a refusal is not lag
            assert (await edge1.probe("/readyz"))[0] == 200

            started = time.monotonic()
            timed_out = await cli("status", "--nats-url", url, "--wait", "0.6")
            assert timed_out.exit_code == 1
            assert time.monotonic() - started >= 0.6

            fixed = await operator.put(FIXED)
            waited = await cli("status", "--nats-url", url, "--wait", "20", "--json")
            assert waited.exit_code == 0, waited.output
            report = json.loads(waited.output)
            assert report["converged"]
            assert report["latest_revision"] == fixed
            assert {i["applied_revision"] for i in report["instances"]} == {fixed}
            record = report["instances"][0]
            assert record["last_attempt"]["result"] in ("applied", "runtime")
            assert record["config_sha256"]
            assert record["document_sha256"]
            assert record["haproxy_version"].startswith("2.")

        assert await edge3.stop() == 0
        result = await cli("status", "--nats-url", url)
        assert result.exit_code == 0, result.output
        assert result.output.splitlines()[-1] == (
            f"2 of 2 on revision {fixed}; edge-3 stopped"
        )

        await edge2.kill()
        await asyncio.sleep(3 * STATUS_INTERVAL + 0.3)
        result = await cli("status", "--nats-url", url, "--json")
        conditions = {
            i["instance"]: i["condition"]
            for i in json.loads(result.output)["instances"]
        }
        assert conditions["edge-2"] == "lost"
        assert result.exit_code == 0

        async def edge2_gone() -> bool:
            names = {v.record.instance for v in (await _fleet_view(url)).instances}
            return "edge-2" not in names

        assert await _until(edge2_gone, within=STATUS_TTL + 5)
        assert (await edge1.probe("/readyz"))[0] == 200


@pytest.mark.slow
class TestRunOnce:
    """`run --once` applies the current value, reports it, and exits."""

    async def test_once_applies_and_exits(
        self,
        tmp_path: Path,
        nats_server: EmbeddedNats,
        haproxy_runner: HAProxyRunner,
        operator_kv: OperatorFactory,
    ) -> None:
        """A good document is applied and exits 0; a refused one exits 2."""
        settings, haproxy = await _served_empty(tmp_path, haproxy_runner)
        render = settings.render
        args = [
            "run", "--once", f"--nats-url={nats_server.url}",
            f"--config-dir={settings.config_dir}", f"--data-dir={settings.data_dir}",
            f"--master-socket={haproxy.master_socket}",
            f"--http-bind={render.http_bind}",
            "--stats-bind=", "--health-bind=", "--instance-id=once",
            "--log-format=json",
        ]  # fmt: skip
        async with operator_kv(nats_server.url) as operator:
            revision = await operator.put(GOOD)
            process = spawn(args, tmp_path / "once.log")
            assert await asyncio.to_thread(process.wait, 30) == 0
            lines = (tmp_path / "once.log").read_text().splitlines()
            logs = [json.loads(line) for line in lines]
            assert any(f"revision {revision} applied" in e["message"] for e in logs)
            last_good = LastGood.load(settings.data_dir)
            assert last_good is not None
            assert last_good.revision == revision

            view = await _fleet_view(nats_server.url)
            (once,) = view.instances
            assert once.record.state == "stopped"
            assert once.record.applied_revision == revision

            await operator.put(REFUSED)
            process = spawn(args, tmp_path / "refused.log")
            assert await asyncio.to_thread(process.wait, 30) == 2
            assert "no cluster 'nope'" in (tmp_path / "refused.log").read_text()

    async def test_once_gives_up_on_nats_and_names_a_busy_health_port(
        self,
        tmp_path: Path,
        haproxy_runner: HAProxyRunner,
    ) -> None:
        """Unreachable NATS exits 6 within bounds; a taken --health-bind exits 7."""
        settings, haproxy = await _served_empty(tmp_path, haproxy_runner)
        render = settings.render
        args = [
            "run", "--once", f"--nats-url=nats://127.0.0.1:{_free_port()}",
            f"--config-dir={settings.config_dir}", f"--data-dir={settings.data_dir}",
            f"--master-socket={haproxy.master_socket}",
            f"--http-bind={render.http_bind}", "--stats-bind=", "--log-format=text",
        ]  # fmt: skip
        process = spawn([*args, "--health-bind="], tmp_path / "nats.log")
        assert await asyncio.to_thread(process.wait, 30) == 6
        assert "could not connect to NATS" in (tmp_path / "nats.log").read_text()

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            bind = f"--health-bind=127.0.0.1:{port}"
            process = spawn([*args, bind], tmp_path / "health.log")
            assert await asyncio.to_thread(process.wait, 30) == 7
        text = (tmp_path / "health.log").read_text()
        assert "--health-bind" in text
        assert "Traceback" not in text


async def _served_empty(
    tmp_path: Path, haproxy_runner: HAProxyRunner
) -> tuple[SidecarSettings, HAProxyProcess]:
    """Settings in `tmp_path`, and an HAProxy serving their empty document."""
    render = RenderSettings(http_bind=f"127.0.0.1:{_free_port()}", stats_bind=None)
    settings = SidecarSettings(
        config_dir=tmp_path / "conf",
        master_socket=tmp_path / "x.sock",
        data_dir=tmp_path / "data",
        render=render,
    )
    install(initial_files(settings).files, settings.config_dir)
    return settings, await haproxy_runner(settings.config_dir)
