"""Parsing and validation of routing documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from momus_haproxy.document import parse_document, parse_timespan
from momus_haproxy.errors import DocumentError

CASES = Path(__file__).parent / "cases"


def _doc(routes: list[dict], clusters: list[dict] | None = None) -> bytes:
    clusters = clusters or [
        {
            "ClusterId": "app",
            "Destinations": {"d1": {"Address": "http://127.0.0.1:9001"}},
        }
    ]
    return json.dumps({"Routes": routes, "Clusters": clusters}).encode()


def _route(**match: object) -> dict:
    return {"RouteId": "app", "ClusterId": "app", "Match": match}


def _refusal(data: bytes) -> str:
    with pytest.raises(DocumentError) as info:
        parse_document(data)
    return str(info.value)


class TestSeed:
    def test_seed_document_loads_byte_for_byte(self) -> None:
        """The original Momus example parses unchanged."""
        data = (CASES / "seed-devsite" / "route-config.json").read_bytes()
        document = parse_document(data)
        assert document.routes[0].Match.Hosts == ["devsite.in"]
        assert document.clusters[0].Destinations["devsite"].url.host == "web-test"
        assert document.warnings == ()

    def test_keys_in_any_letter_case(self) -> None:
        """Keys are matched without regard to case, as YARP's loader does."""
        data = json.dumps(
            {
                "routes": [
                    {"routeid": "a", "CLUSTERID": "c", "match": {"hosts": ["A.test"]}}
                ],
                "clusters": [
                    {"clusterId": "c", "destinations": {"d": {"address": "http://x:1"}}}
                ],
            }
        ).encode()
        document = parse_document(data)
        assert document.routes[0].Match.Hosts == ["a.test"]

    def test_same_key_twice_in_different_case_is_refused(self) -> None:
        """Two spellings of one key are ambiguous and refused."""
        data = b'{"Routes": [], "routes": [], "Clusters": []}'
        assert "twice" in _refusal(data)


class TestRejectedCases:
    @pytest.mark.parametrize(
        "case",
        json.loads((CASES / "rejected-documents" / "expect.json").read_text())["cases"],
        ids=lambda case: case["name"],
    )
    def test_rejected_document_names_the_field(self, case: dict) -> None:
        """Every shared rejected document is refused with its fragment."""
        assert case["error_contains"] in _refusal(case["value"].encode())

    def test_last_good_document_parses(self) -> None:
        """The rejected-documents case's own good document is accepted."""
        data = (CASES / "rejected-documents" / "route-config.json").read_bytes()
        assert parse_document(data).routes[0].RouteId == "app"


class TestRefusals:
    def test_every_problem_is_listed_with_its_path(self) -> None:
        """A document with several problems lists each one by field path."""
        routes = [
            {"RouteId": "a", "ClusterId": "nope", "Match": {"Hosts": ["a b"]}},
            {"RouteId": "a", "ClusterId": "app", "Match": {"Path": "/x y"}},
        ]
        text = _refusal(_doc(routes))
        assert "Routes[0].ClusterId: no cluster 'nope'" in text
        assert "Routes[0].Match.Hosts[0]" in text
        assert "Routes[1].RouteId" in text
        assert "Routes[1].Match.Path" in text

    def test_unknown_field_is_reported_by_path(self) -> None:
        """A misspelled field is refused, not dropped."""
        route = _route(Hosts=["a.test"])
        route["Match"]["Hots"] = ["b.test"]
        assert "Routes[0].Match.Hots" in _refusal(_doc([route]))

    def test_unsupported_yarp_field_is_reported(self) -> None:
        """A YARP field momus-haproxy cannot honour is refused by path."""
        route = _route(Hosts=["a.test"])
        route["AuthorizationPolicy"] = "admins"
        text = _refusal(_doc([route]))
        assert "Routes[0].AuthorizationPolicy" in text
        assert "does not support" in text

    def test_unsupported_transform_is_reported(self) -> None:
        """An unsupported transform is refused with its index and key."""
        route = _route(Hosts=["a.test"])
        route["Transforms"] = [{"PathPattern": "/x/{**rest}"}]
        assert "Routes[0].Transforms[0].PathPattern" in _refusal(_doc([route]))

    def test_route_needs_hosts_or_path(self) -> None:
        """A route that matches on nothing is refused."""
        assert "Routes[0].Match" in _refusal(_doc([_route()]))

    def test_host_with_port_is_refused(self) -> None:
        """Ports in host matches are refused rather than silently ignored."""
        assert "port" in _refusal(_doc([_route(Hosts=["a.test:8080"])]))

    @pytest.mark.parametrize(
        "path",
        ["/a b", "/a\nb", "/a'b", "/a#b", "/a?b", "/a/{x}y", "/{**a}/b", "/%zz"],
    )
    def test_unsafe_paths_are_refused(self, path: str) -> None:
        """Paths that could escape their place in the configuration are refused."""
        assert "Routes[0].Match.Path" in _refusal(_doc([_route(Path=path)]))

    def test_destination_path_is_refused(self) -> None:
        """A base path in a destination address is not silently ignored."""
        clusters = [
            {"ClusterId": "app", "Destinations": {"d": {"Address": "http://a:1/base"}}}
        ]
        text = _refusal(_doc([_route(Hosts=["a.test"])], clusters))
        assert "Destinations.d" in text

    def test_duplicate_server_address_is_refused(self) -> None:
        """Two destinations with one address are refused naming both."""
        clusters = [
            {
                "ClusterId": "app",
                "Destinations": {
                    "d1": {"Address": "http://a:1"},
                    "d2": {"Address": "http://a:1/"},
                },
            }
        ]
        text = _refusal(_doc([_route(Hosts=["a.test"])], clusters))
        assert "'d1'" in text

    def test_not_utf8_is_refused(self) -> None:
        """Bytes that are not UTF-8 are refused with a clear cause."""
        assert "UTF-8" in _refusal(b'{"Routes": ["\xff"]}')

    def test_deep_nesting_is_refused(self) -> None:
        """Deeply nested JSON is refused without a crash."""
        data = b"[" * 100000 + b"]" * 100000
        assert "JSON" in _refusal(data)

    def test_duplicate_keys_are_refused(self) -> None:
        """A key given twice in one JSON object is refused."""
        assert "twice" in _refusal(b'{"Routes": [], "Routes": []}')


class TestSyntaxMessages:
    """Broken JSON and wrong types are explained in words an operator acts on."""

    def test_json_error_gives_line_and_column(self) -> None:
        """A syntax error says where, as a line and a column."""
        message = _refusal(b'{"Routes": [\n')
        assert "at line 2, column 1" in message

    def test_empty_value_says_so(self) -> None:
        """An empty value is called empty, with the empty document to use instead."""
        message = _refusal(b"  \n")
        assert "the document is empty" in message
        assert '{"Routes": [], "Clusters": []}' in message

    def test_wrong_type_quotes_the_value(self) -> None:
        """A value of the wrong type is quoted next to its field path."""
        route = {**_route(Hosts=["a.test"]), "Order": "first"}
        message = _refusal(_doc([route]))
        assert "Routes[0].Order: 'first': input should be a valid integer" in message


class TestFields:
    def test_wildcard_and_idn_hosts(self) -> None:
        """Wildcards stay, upper case is folded and IDN hosts become punycode."""
        document = parse_document(_doc([_route(Hosts=["*.Shop.test", "bücher.test"])]))
        assert document.routes[0].Match.Hosts == ["*.shop.test", "xn--bcher-kva.test"]

    @pytest.mark.parametrize(
        ("path", "kind", "prefix"),
        [
            ("{**catch-all}", "prefix", ""),
            ("/{**catch-all}", "prefix", ""),
            ("/api/{**rest}", "prefix", "/api"),
            ("/API/V1", "exact", "/api/v1"),
            ("/", "exact", "/"),
            ("/users/{id}", "pattern", ""),
        ],
        ids=["catch-all", "slash-catch-all", "prefix", "literal", "root", "param"],
    )
    def test_path_kinds(self, path: str, kind: str, prefix: str) -> None:
        """Each path template is classified for matching."""
        document = parse_document(_doc([_route(Path=path)]))
        template = document.routes[0].Match.Path
        assert template is not None
        assert (template.kind, template.prefix) == (kind, prefix)

    def test_timespan(self) -> None:
        """.NET time spans are read into milliseconds."""
        assert parse_timespan("00:00:15") == 15000
        assert parse_timespan("1.00:00:00.5") == 86400500
        with pytest.raises(ValueError, match="time span"):
            parse_timespan("15s")

    def test_unknown_metadata_is_a_warning(self) -> None:
        """Metadata momus-haproxy does not use is kept as a warning, not an error."""
        route = _route(Hosts=["a.test"])
        route["Metadata"] = {"Owner": "team-a"}
        document = parse_document(_doc([route]))
        assert [str(w) for w in document.warnings] == [
            "Routes[0].Metadata.Owner: is not used by momus-haproxy"
        ]

    def test_bad_flag_is_refused(self) -> None:
        """RedirectWww must be 'true' or 'false'."""
        route = _route(Hosts=["a.test"])
        route["Metadata"] = {"RedirectWww": "yes"}
        assert "Routes[0].Metadata.RedirectWww" in _refusal(_doc([route]))
