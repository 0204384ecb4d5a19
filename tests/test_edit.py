"""Document commands: history, diff, rollback, import, export, plan, routes..."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from momus_haproxy.edit import (
    ConflictError,
    diff_documents,
    document_schema,
    dump_raw,
    load_raw,
    merge_documents,
    plan_changes,
    snapshot,
    update_document,
)
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.render import RenderSettings
from momus_haproxy.watch import NatsOptions, Store
from tests.support.cases import CASES, SERVED_CASES
from tests.support.fleet import cli, spawn
from tests.support.nats import OperatorFactory, open_operator

DOCUMENTS = [CASES / name / "route-config.json" for name in SERVED_CASES]
REJECTED = json.loads((CASES / "rejected-documents" / "expect.json").read_text())
SETTINGS = RenderSettings(stats_bind=None)


def _route(route_id: str, cluster: str = "web", host: str = "a.example.test") -> Any:
    return {"RouteId": route_id, "ClusterId": cluster, "Match": {"Hosts": [host]}}


def _cluster(cluster_id: str, port: int = 9001) -> Any:
    address = f"http://127.0.0.1:{port}"
    return {"ClusterId": cluster_id, "Destinations": {"d1": {"Address": address}}}


BASE = {"Routes": [_route("site")], "Clusters": [_cluster("web")]}


class TestDiff:
    """Documents are compared route by route and cluster by cluster."""

    def test_added_removed_changed(self) -> None:
        """Each change names its id; a changed one, each field's old and new value."""
        new = {
            "Routes": [_route("site", host="b.example.test"), _route("api")],
            "Clusters": [_cluster("web", 9002)],
        }
        old = {**BASE, "Clusters": [*BASE["Clusters"], _cluster("old")]}
        lines = diff_documents(old, new).lines()
        assert lines == [
            "~ route site",
            '    Match.Hosts: ["a.example.test"] -> ["b.example.test"]',
            "+ route api",
            "~ cluster web",
            '    Destinations.d1.Address: "http://127.0.0.1:9001" -> '
            '"http://127.0.0.1:9002"',
            "- cluster old",
        ]

    def test_fields_set_and_unset(self) -> None:
        """A field set on one side only shows `(unset)` on the other, JSON null."""
        old = {**BASE, "Routes": [{**_route("site"), "Order": 5}]}
        new = {
            **BASE,
            "Routes": [{**_route("site"), "Metadata": {"RedirectWww": "true"}}],
        }
        diff = diff_documents(old, new)
        assert diff.lines() == [
            "~ route site",
            '    Metadata: (unset) -> {"RedirectWww": "true"}',
            "    Order: 5 -> (unset)",
        ]
        assert diff.as_json() == [
            {
                "change": "changed",
                "type": "route",
                "id": "site",
                "fields": [
                    {"path": "Metadata", "old": None, "new": {"RedirectWww": "true"}},
                    {"path": "Order", "old": 5, "new": None},
                ],
            }
        ]

    def test_long_values_are_cut_on_one_line(self) -> None:
        """A long or multi-line value is one line of at most 60 characters a side."""
        hosts = [f"h{n}.example.test" for n in range(40)]
        header = {"Name": "X-Note", "Values": ["line one\nline two " + "x" * 60]}
        old = {**BASE, "Routes": [_route("site")]}
        route = _route("site")
        route["Match"] = {"Hosts": hosts, "Headers": [header]}
        lines = diff_documents(old, {**BASE, "Routes": [route]}).lines()
        assert lines[0] == "~ route site"
        assert lines[1].startswith("    Match.Headers: (unset) -> [{")
        assert lines[2].startswith('    Match.Hosts: ["a.example.test"] -> ["h0.')
        for line in lines[1:]:
            assert "\n" not in line
            assert len(line.split(" -> ")[1]) == 60
            assert line.endswith("...")
        as_json = diff_documents(old, {**BASE, "Routes": [route]}).as_json()
        assert as_json[0]["fields"][1]["new"] == hosts

    def test_key_and_host_case_are_not_changes(self) -> None:
        """Keys in another letter case and upper-case hosts mean the same route."""
        same = {
            "routes": [
                {
                    "routeid": "site",
                    "CLUSTERID": "web",
                    "match": {"hosts": ["A.Example.Test"]},
                }
            ],
            "Clusters": [_cluster("web")],
        }
        assert diff_documents(BASE, same).empty

    def test_merge_by_id(self) -> None:
        """A merge replaces items with the same id, appends new ones, keeps the rest."""
        current = {
            "routes": [_route("site"), _route("keep")],
            "Clusters": [_cluster("web")],
        }
        incoming = {"Routes": [_route("site", host="new.example.test"), _route("api")]}
        merged = merge_documents(current, incoming)
        assert [r["RouteId"] for r in merged["routes"]] == ["site", "keep", "api"]
        assert merged["routes"][0]["Match"]["Hosts"] == ["new.example.test"]
        assert "Routes" not in merged


class TestSchema:
    """`momus-haproxy schema` describes what an author writes."""

    def test_text_fields_and_refused_fields(self) -> None:
        """Paths and time spans are strings; refused YARP fields are marked."""
        schema = document_schema()
        defs = schema["$defs"]
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == {"Routes", "Clusters"}
        path = defs["RouteMatch"]["properties"]["Path"]["anyOf"][0]
        assert path["type"] == "string"
        interval = defs["ActiveHealthCheck"]["properties"]["Interval"]["anyOf"][0]
        assert interval["type"] == "string"
        assert defs["Route"]["properties"]["CorsPolicy"]["not"] == {}

    @pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.parent.name)
    def test_cases_use_known_fields(self, path: Path) -> None:
        """Every field of the shared cases' routes and clusters is in the schema."""
        defs = document_schema()["$defs"]
        raw = load_raw(path.read_bytes())
        for section, name in (("Routes", "Route"), ("Clusters", "Cluster")):
            known = set(defs[name]["properties"])
            for item in raw.get(section, []):
                assert set(item) <= known, set(item) - known


class TestPlan:
    """`plan` tells each change and whether it needs a reload."""

    def test_same_document_needs_nothing(self) -> None:
        """A document that renders what is live needs nothing."""
        raw = load_raw(DOCUMENTS[0].read_bytes())
        assert plan_changes(raw, raw, SETTINGS).mode == "none"

    def test_new_destination_and_new_policy(self) -> None:
        """A new destination can go through the runtime API; a new policy reloads."""
        more = {**BASE, "Clusters": [_cluster("web")]}
        more["Clusters"][0]["Destinations"]["d2"] = {"Address": "http://127.0.0.1:9002"}
        assert plan_changes(BASE, more, SETTINGS).mode in ("runtime", "reload")
        policy = {
            **BASE,
            "Clusters": [{**_cluster("web"), "LoadBalancingPolicy": "Random"}],
        }
        plan = plan_changes(BASE, policy, SETTINGS)
        assert plan.mode == "reload"
        assert [str(step.change) for step in plan.steps] == [
            "~ cluster web: LoadBalancingPolicy"
        ]


async def _store(url: str) -> Store:
    store = Store(NatsOptions(servers=[url]))
    await store.open()
    return store


class TestRevisionCheck:
    """Two writers never overwrite each other's change unseen."""

    async def test_racing_route_adds_are_all_kept(
        self, nats_server: EmbeddedNats
    ) -> None:
        """Writers that read the same revision all land: the later ones merge again."""
        store = await _store(nats_server.url)
        try:
            await store.put(dump_raw(BASE))
            start = await snapshot(store)

            def add(route_id: str) -> Any:
                return lambda raw: merge_documents(raw, {"Routes": [_route(route_id)]})

            updates = await asyncio.gather(
                *(update_document(store, add(f"r{n}"), start=start) for n in range(6))
            )
            assert max(update.attempts for update in updates) > 1
            final = (await snapshot(store)).raw
            ids = {route["RouteId"] for route in final["Routes"]}
            assert ids == {"site", *(f"r{n}" for n in range(6))}
        finally:
            await store.aclose()

    async def test_replace_over_a_newer_revision_is_refused(
        self, nats_server: EmbeddedNats
    ) -> None:
        """A replace written against a stale revision is refused, naming revisions."""
        store = await _store(nats_server.url)
        try:
            first = await store.put(dump_raw(BASE))
            stale = await snapshot(store)
            newer = await store.put(dump_raw({**BASE, "Routes": [_route("x")]}))
            with pytest.raises(ConflictError, match=f"since revision {first}.*{newer}"):
                await update_document(store, lambda _: BASE, merge=False, start=stale)
            assert (await snapshot(store)).revision == newer
        finally:
            await store.aclose()

    async def test_two_processes_racing_routes_add(
        self, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """Two `routes add` processes started together both keep their route."""
        store = await _store(nats_server.url)
        try:
            await store.put(dump_raw(BASE))
            processes = [
                spawn(
                    [
                        "routes",
                        "add",
                        f"p{n}",
                        "--cluster",
                        "web",
                        "--host",
                        f"p{n}.example.test",
                        f"--nats-url={nats_server.url}",
                    ],
                    tmp_path / f"add-{n}.log",
                )
                for n in range(2)
            ]  # fmt: skip
            codes = [await asyncio.to_thread(p.wait, 30) for p in processes]
            assert codes == [0, 0], [
                (tmp_path / f"add-{n}.log").read_text() for n in range(2)
            ]
            ids = {r["RouteId"] for r in (await snapshot(store)).raw["Routes"]}
            assert ids == {"site", "p0", "p1"}
        finally:
            await store.aclose()


class TestCommands:
    """The commands against a real nats-server, on the shared cases."""

    async def test_history_diff_export_rollback_plan(
        self, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """Imported cases round-trip through history, diff, export, rollback, plan."""
        url = f"--nats-url={nats_server.url}"
        revisions = []
        for path in DOCUMENTS:
            result = await cli(
                "config", "import", str(path), "--strategy", "replace", "--yes", url
            )
            assert result.exit_code == 0, result.output
            revisions.append(int(result.stderr.split("put revision ")[1].split()[0]))

        result = await cli("config", "history", "--json", url)
        history = json.loads(result.stdout)
        assert [h["revision"] for h in history] == revisions
        for number, (path, revision) in enumerate(
            zip(DOCUMENTS, revisions, strict=True)
        ):
            exported = tmp_path / f"{number}.json"
            result = await cli(
                "config",
                "export",
                "--revision",
                str(revision),
                "-o",
                str(exported),
                url,
            )
            assert result.exit_code == 0, result.output
            digest = hashlib.sha256(exported.read_bytes()).hexdigest()
            assert history[number]["sha256"] == digest
            same = await cli("config", "diff", str(path), str(exported), url)
            assert same.stdout == "no route or cluster changes\n"

        by_revision = await cli(
            "config", "diff", str(revisions[0]), str(revisions[1]), "--json", url
        )
        by_file = await cli(
            "config", "diff", str(DOCUMENTS[0]), str(DOCUMENTS[1]), "--json"
        )
        assert json.loads(by_revision.stdout) == json.loads(by_file.stdout)
        assert json.loads(by_file.stdout)

        plan = await cli("plan", str(DOCUMENTS[0]), "--json", "--stats-bind=", url)
        assert plan.exit_code == 0, plan.output
        planned = json.loads(plan.stdout)
        last = load_raw((tmp_path / f"{len(DOCUMENTS) - 1}.json").read_bytes())
        expected = diff_documents(last, load_raw(DOCUMENTS[0].read_bytes())).as_json()
        assert [
            {k: c[k] for k in ("change", "type", "id", "fields")}
            for c in planned["changes"]
        ] == expected
        assert planned["mode"] == "reload"

        rollback = await cli("config", "rollback", str(revisions[0]), url)
        assert rollback.exit_code == 0, rollback.output
        current = await cli("config", "export", url)
        assert current.stdout_bytes == (tmp_path / "0.json").read_bytes()
        unchanged = await cli("plan", str(DOCUMENTS[0]), "--stats-bind=", url)
        assert "nothing to apply" in unchanged.stdout

    async def test_rollback_over_a_value_that_is_not_json(
        self, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """A broken newest value blocks merges with advice but not a rollback."""
        url = f"--nats-url={nats_server.url}"
        good = tmp_path / "good.json"
        good.write_text(json.dumps(BASE))
        assert (await cli("config", "put", str(good), url)).exit_code == 0
        broken = await cli("config", "put", "-", "--force", url, input='{"Routes": [')
        assert "warning" in broken.stderr
        add = await cli(
            "routes", "add", "two", "--cluster", "web", "--host", "b.test", url
        )
        assert add.exit_code == 1
        assert "config rollback" in add.stderr
        rollback = await cli("config", "rollback", "1", url)
        assert rollback.exit_code == 0, rollback.output
        current = await cli("config", "get", url)
        assert json.loads(current.stdout) == BASE

    async def test_import_merge_preview_and_refusals(
        self, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """An import previews and asks; refused documents write nothing."""
        url = f"--nats-url={nats_server.url}"
        base = tmp_path / "base.json"
        base.write_bytes(dump_raw(BASE))
        assert (await cli("config", "import", str(base), "--yes", url)).exit_code == 0
        extra = tmp_path / "extra.json"
        extra.write_bytes(dump_raw({"Routes": [_route("api")], "Clusters": []}))

        declined = await cli("config", "import", str(extra), url, input="n\n")
        assert declined.exit_code == 1
        assert declined.stdout.startswith("+ route api\n")
        accepted = await cli("config", "import", str(extra), url, input="y\n")
        assert accepted.exit_code == 0, accepted.output
        listed = json.loads((await cli("routes", "list", "--json", url)).stdout)
        assert [route["RouteId"] for route in listed] == ["site", "api"]

        for case in REJECTED["cases"]:
            bad = tmp_path / f"{case['name']}.json"
            bad.write_text(case["value"])
            for strategy in ("merge", "replace"):
                result = await cli(
                    "config", "import", str(bad), "--strategy", strategy, "--yes", url
                )
                assert result.exit_code == 2, (case["name"], result.output)
                assert case["error_contains"] in result.stderr, case["name"]
        history = json.loads((await cli("config", "history", "--json", url)).stdout)
        assert len(history) == 2

    async def test_routes_and_clusters(self, nats_server: EmbeddedNats) -> None:
        """Routes and clusters are added, listed and removed; a used cluster stays."""
        url = f"--nats-url={nats_server.url}"
        added = await cli(
            "clusters",
            "add",
            "api",
            "--destination",
            "a1=http://127.0.0.1:9003",
            "--policy",
            "RoundRobin",
            url,
        )
        assert added.exit_code == 0, added.output
        added = await cli(
            "routes",
            "add",
            "api",
            "--cluster",
            "api",
            "--host",
            "api.example.test",
            "--path",
            "/api/{**rest}",
            url,
        )
        assert added.exit_code == 0, added.output
        again = await cli(
            "routes", "add", "api", "--cluster", "api", "--host", "x.example.test", url
        )
        assert again.exit_code == 1
        assert "--replace" in again.stderr

        table = (await cli("clusters", "list", url)).stdout.splitlines()
        assert table[0].split() == ["CLUSTER", "POLICY", "DESTINATIONS", "ROUTES"]
        assert table[1].split() == [
            "api",
            "RoundRobin",
            "a1=http://127.0.0.1:9003",
            "api",
        ]
        routes = (await cli("routes", "list", url)).stdout.splitlines()
        assert routes[1].split() == [
            "api",
            "api",
            "0",
            "api.example.test",
            "/api/{**rest}",
        ]

        refused = await cli("clusters", "remove", "api", url)
        assert refused.exit_code == 1
        assert "used by route(s) 'api'" in refused.stderr
        missing = await cli("routes", "remove", "nope", url)
        assert missing.exit_code == 1
        assert "no route 'nope'" in missing.stderr

        assert (await cli("routes", "remove", "api", url)).exit_code == 0
        assert (await cli("clusters", "remove", "api", url)).exit_code == 0
        assert json.loads((await cli("clusters", "list", "--json", url)).stdout) == []

    async def test_diff_shows_old_and_new_values(
        self, nats_server: EmbeddedNats, tmp_path: Path
    ) -> None:
        """`config diff` of two revisions prints each changed field's two values."""
        url = f"--nats-url={nats_server.url}"
        first, second = tmp_path / "first.json", tmp_path / "second.json"
        first.write_bytes(dump_raw(BASE))
        second.write_bytes(dump_raw({**BASE, "Clusters": [_cluster("web", 9002)]}))
        for path in (first, second):
            assert (await cli("config", "put", str(path), url)).exit_code == 0

        table = await cli("config", "diff", "1", "2", url)
        assert table.exit_code == 0, table.output
        assert table.stdout.splitlines() == [
            "~ cluster web",
            '    Destinations.d1.Address: "http://127.0.0.1:9001" -> '
            '"http://127.0.0.1:9002"',
        ]
        as_json = await cli("config", "diff", "1", "2", "--json", url)
        assert json.loads(as_json.stdout)[0]["fields"] == [
            {
                "path": "Destinations.d1.Address",
                "old": "http://127.0.0.1:9001",
                "new": "http://127.0.0.1:9002",
            }
        ]

    async def test_diff_names_a_revision_that_is_not_a_document(
        self, nats_server: EmbeddedNats, tmp_path: Path, operator_kv: OperatorFactory
    ) -> None:
        """A stored revision that is not JSON is named in `config diff`'s refusal."""
        url = f"--nats-url={nats_server.url}"
        first = tmp_path / "first.json"
        first.write_bytes(dump_raw(BASE))
        assert (await cli("config", "put", str(first), url)).exit_code == 0
        async with operator_kv(nats_server.url) as operator:
            broken = await operator.put(b"{not json")

        refused = await cli("config", "diff", "1", str(broken), url)
        assert refused.exit_code == 2
        assert f"revision {broken}: the document is not valid JSON" in refused.output


async def _streams(url: str) -> list[str]:
    """Return the names of the streams on the server at `url`."""
    async with open_operator(url) as operator:
        return sorted(
            info.config.name or "" for info in await operator.js.streams_info()
        )


READ_ONLY = {
    "config get": ["config", "get"],
    "config history": ["config", "history"],
    "config diff": ["config", "diff", "1", "2"],
    "config export": ["config", "export"],
    "config export --revision": ["config", "export", "--revision", "1"],
    "routes list": ["routes", "list", "--json"],
    "clusters list": ["clusters", "list"],
    "status": ["status", "--json"],
    "plan": ["plan", "{file}", "--stats-bind="],
    "render --dry-run": ["render", "--dry-run", "--stats-bind="],
}


class TestReadOnly:
    """Commands that only read never create a bucket."""

    @pytest.mark.parametrize("args", READ_ONLY.values(), ids=READ_ONLY.keys())
    async def test_missing_bucket_is_one_line_and_creates_nothing(
        self, nats_server: EmbeddedNats, tmp_path: Path, args: list[str]
    ) -> None:
        """On a fresh server the command fails in one line naming bucket and server."""
        document = tmp_path / "route-config.json"
        document.write_bytes(dump_raw(BASE))
        args = [arg.replace("{file}", str(document)) for arg in args]
        result = await cli(*args, f"--nats-url={nats_server.url}")
        assert result.exit_code == 6, result.output
        assert result.stderr == (
            f"error: bucket 'momus' does not exist on NATS at {nats_server.url}; "
            "put a document first, or check the bucket name and the server URL\n"
        )
        assert result.stdout == ""
        assert await _streams(nats_server.url) == []

    async def test_other_bucket_and_status_bucket(
        self, nats_server: EmbeddedNats
    ) -> None:
        """A wrong --bucket is named, an empty key exits 1, status lists no one."""
        url = f"--nats-url={nats_server.url}"
        put = await cli("config", "put", "-", url, input=json.dumps(BASE))
        assert put.exit_code == 0, put.output

        other = await cli("config", "get", "--bucket", "momsu", url)
        assert other.exit_code == 6
        assert "bucket 'momsu' does not exist" in other.stderr
        empty = await cli("render", "--dry-run", "--key", "other", url)
        assert empty.exit_code == 1
        assert empty.stderr == "error: momus/other holds no document\n"
        status = await cli("status", url)
        assert status.exit_code == 1
        assert "no live instance follows 'route-config'" in status.stdout
        assert await _streams(nats_server.url) == ["KV_momus"]

    async def test_writing_commands_create_the_bucket(
        self, nats_server: EmbeddedNats
    ) -> None:
        """`clusters add` on a fresh server creates the bucket and writes."""
        result = await cli(
            "clusters",
            "add",
            "web",
            "--destination",
            "http://127.0.0.1:9001",
            f"--nats-url={nats_server.url}",
        )
        assert result.exit_code == 0, result.output
        assert await _streams(nats_server.url) == ["KV_momus"]
