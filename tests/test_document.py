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
        """A value of the wrong type is named in JSON's words next to its path."""
        route = {**_route(Hosts=["a.test"]), "Order": "first"}
        message = _refusal(_doc([route]))
        assert "Routes[0].Order: must be a whole number, not the string 'first'" in (
            message
        )

    @pytest.mark.parametrize(
        ("value", "kind"),
        [
            ("null", "null"),
            ('"x"', "the string 'x'"),
            ("1.5", "the number 1.5"),
            ("[]", "a list"),
            ("true", "true"),
        ],
        ids=["null", "string", "number", "list", "boolean"],
    )
    def test_document_of_another_type_names_it(self, value: str, kind: str) -> None:
        """A document that is not an object says what it is, not a Python type."""
        message = _refusal(value.encode())
        assert f"the document must be a JSON object, not {kind}" in message

    def test_null_where_an_object_belongs_says_null(self) -> None:
        """A null field is called null, not None."""
        message = _refusal(_doc([{**_route(), "Match": None}]))
        assert "Routes[0].Match: must be an object, not null" in message

    def test_huge_integer_is_called_too_large(self) -> None:
        """An integer past Python's digit limit is refused as too large."""
        message = _refusal(
            b'{"Routes": [], "Clusters": [], "X": 1' + b"0" * 5000 + b"}"
        )
        assert "a number of 5001 digits, too large to read" in message
        assert "set_int_max_str_digits" not in message

    @pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
    def test_non_finite_numbers_are_refused(self, constant: str) -> None:
        """NaN, the infinities and numbers that overflow to them are refused."""
        data = f'{{"Routes": [], "Clusters": [], "X": {constant}}}'.encode()
        message = _refusal(data)
        assert constant in message
        assert "is not a field" not in message


class TestFields:
    def test_wildcard_and_idn_hosts(self) -> None:
        """Wildcards stay, upper case is folded and IDN hosts become punycode."""
        document = parse_document(_doc([_route(Hosts=["*.Shop.test", "bücher.test"])]))
        assert document.routes[0].Match.Hosts == ["*.shop.test", "xn--bcher-kva.test"]

    def test_idn_hosts_follow_idna_2008(self) -> None:
        """`ß` is kept as clients encode it (IDNA 2008), also behind a wildcard."""
        hosts = ["straße.de", "*.straße.de"]
        document = parse_document(_doc([_route(Hosts=hosts)]))
        assert document.routes[0].Match.Hosts == [
            "xn--strae-oqa.de",
            "*.xn--strae-oqa.de",
        ]

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


def _cluster(**fields: object) -> dict:
    destination = fields.pop("destination", {"Address": "http://127.0.0.1:9001"})
    return {"ClusterId": "app", "Destinations": {"d": destination}, **fields}


def _issues(data: bytes) -> list[str]:
    with pytest.raises(DocumentError) as info:
        parse_document(data)
    return [str(issue) for issue in info.value.issues]


class TestHostileValues:
    """Values a hostile or careless writer can store, refused before rendering."""

    THRESHOLD = "Clusters[0].Metadata.ConsecutiveFailuresHealthPolicy.Threshold"

    def test_null_threshold_is_refused(self) -> None:
        """A null failure threshold is refused by path rather than crash the render."""
        metadata = {"ConsecutiveFailuresHealthPolicy.Threshold": None}
        data = _doc([_route(Hosts=["a.test"])], [_cluster(Metadata=metadata)])
        with pytest.raises(DocumentError) as info:
            parse_document(data)
        assert info.value.exit_code == 2
        assert [str(issue) for issue in info.value.issues] == [
            f"{self.THRESHOLD}: must be a whole number from 1 to 999999999, not null"
        ]

    def test_numeric_threshold_is_accepted(self) -> None:
        """A threshold given as a JSON number is still taken."""
        metadata = {"ConsecutiveFailuresHealthPolicy.Threshold": 3}
        data = _doc([_route(Hosts=["a.test"])], [_cluster(Metadata=metadata)])
        assert parse_document(data).warnings == ()

    @pytest.mark.parametrize(
        "host", ["999.999.999.999", "256.0.0.1", "1.2.3", "1234", "010.0.0.1"]
    )
    def test_host_of_digits_must_be_a_valid_ipv4(self, host: str) -> None:
        """A dotted-number host that is not a valid IPv4 address is refused."""
        cluster = _cluster(destination={"Address": f"http://{host}:80"})
        issues = _issues(_doc([_route(Hosts=["a.test"])], [cluster]))
        assert issues == [
            f"Clusters[0].Destinations.d.Address: 'http://{host}:80': '{host}' is "
            "not a valid IPv4 address (four numbers from 0 to 255, without leading "
            "zeros)"
        ]

    def test_valid_ipv4_address_is_an_ip(self) -> None:
        """A valid IPv4 destination is read as an IP literal."""
        cluster = _cluster(destination={"Address": "http://10.255.0.1:80"})
        document = parse_document(_doc([_route(Hosts=["a.test"])], [cluster]))
        assert document.clusters[0].Destinations["d"].url.is_ip

    def test_health_address_must_be_an_ip(self) -> None:
        """A health address naming a host is refused, saying HAProxy needs an IP."""
        destination = {"Address": "http://web:80", "Health": "http://web:8081"}
        cluster = _cluster(destination=destination)
        issues = _issues(_doc([_route(Hosts=["a.test"])], [cluster]))
        assert len(issues) == 1
        assert issues[0].startswith(
            "Clusters[0].Destinations.d.Health: 'http://web:8081': a health address "
            "needs an IPv4 address"
        )
        assert "only at start-up" in issues[0]

    def test_health_address_with_an_ip_is_accepted(self) -> None:
        """A health address given as an IPv4 address is kept."""
        destination = {"Address": "http://web:80", "Health": "http://10.0.0.2:8081"}
        document = parse_document(
            _doc([_route(Hosts=["a.test"])], [_cluster(destination=destination)])
        )
        health = document.clusters[0].Destinations["d"].health_url
        assert health is not None
        assert (health.host, health.port) == ("10.0.0.2", 8081)

    @pytest.mark.parametrize("field", ["Headers", "QueryParameters"])
    def test_lone_closing_brace_value_is_refused(self, field: str) -> None:
        """A match value of '}' would end HAProxy's inline condition; it is refused."""
        match = {"Hosts": ["a.test"], field: [{"Name": "x", "Values": ["a", "}"]}]}
        issues = _issues(_doc([_route(**match)]))
        assert issues == [
            f"Routes[0].Match.{field}[0].Values[1]: '}}' cannot be matched: HAProxy "
            "reads a lone '}' as the end of the condition"
        ]

    def test_braces_inside_a_value_are_accepted(self) -> None:
        """Braces that are not a whole '}' word stay matchable."""
        values = ["a}", "{", "}b", "{ }"]
        match = {"Hosts": ["a.test"], "Headers": [{"Name": "x", "Values": values}]}
        headers = parse_document(_doc([_route(**match)])).routes[0].Match.Headers
        assert headers is not None
        assert headers[0].Values == values

    @pytest.mark.parametrize("field", ["Headers", "QueryParameters"])
    def test_long_match_name_is_refused(self, field: str) -> None:
        """A header or query name past 256 characters is refused with its path."""
        match = {
            "Hosts": ["a.test"],
            field: [{"Name": "n" * 200_000, "Mode": "Exists"}],
        }
        issues = _issues(_doc([_route(**match)]))
        assert len(issues) == 1
        assert issues[0].startswith(f"Routes[0].Match.{field}[0].Name: 'nnn")
        assert issues[0].endswith("is longer than 256 characters")
        assert len(issues[0]) < 200

    def test_name_of_256_characters_is_accepted(self) -> None:
        """A name at the limit is still taken."""
        header = {"Name": "n" * 256, "Mode": "Exists"}
        match = {"Hosts": ["a.test"], "Headers": [header]}
        assert parse_document(_doc([_route(**match)])).routes[0].Match.Headers

    def test_long_cookie_name_is_refused(self) -> None:
        """An affinity cookie name past 256 characters is refused with its path."""
        affinity = {"Enabled": True, "AffinityKeyName": "k" * 300}
        cluster = _cluster(SessionAffinity=affinity)
        issues = _issues(_doc([_route(Hosts=["a.test"])], [cluster]))
        assert len(issues) == 1
        assert issues[0].startswith("Clusters[0].SessionAffinity.AffinityKeyName:")

    @pytest.mark.parametrize("field", ["Address", "Host"])
    def test_long_destination_host_is_refused(self, field: str) -> None:
        """A destination host name past 253 characters is refused with its path."""
        host = ".".join(["a" * 60] * 1000)
        destination = {"Address": "http://127.0.0.1:80"}
        destination[field] = f"http://{host}:80" if field == "Address" else host
        cluster = _cluster(destination=destination)
        issues = _issues(_doc([_route(Hosts=["a.test"])], [cluster]))
        assert len(issues) == 1
        assert issues[0].startswith(f"Clusters[0].Destinations.d.{field}:")
        assert issues[0].endswith("the host name is longer than 253 characters")

    def test_transform_key_cannot_forge_a_log_line(self) -> None:
        """A transform key holding a newline is escaped in the problem's path."""
        route = _route(Hosts=["a.test"])
        route["Transforms"] = [
            {"RequestHeader": "X-A", "Set": "v", "k\nINFO forged": "x"}
        ]
        issues = _issues(_doc([route]))
        assert issues == [
            'Routes[0].Transforms[0]["k\\nINFO forged"]: is not a key of a '
            "RequestHeader transform"
        ]

    def test_transform_value_of_another_type_is_named(self) -> None:
        """A transform value that is not a string is named in JSON's words."""
        route = _route(Hosts=["a.test"])
        route["Transforms"] = [{"RequestHeader": "X-A", "Set": None}]
        assert _issues(_doc([route])) == [
            "Routes[0].Transforms[0].Set: must be a string, not null"
        ]

    def test_metadata_key_cannot_forge_a_log_line(self) -> None:
        """An unknown metadata key holding a newline is escaped in its warning."""
        route = _route(Hosts=["a.test"])
        route["Metadata"] = {"k\nINFO forged": "x", "Team.Name": "a"}
        warnings = [str(w) for w in parse_document(_doc([route])).warnings]
        assert warnings == [
            "Routes[0].Metadata.Team.Name: is not used by momus-haproxy",
            'Routes[0].Metadata["k\\nINFO forged"]: is not used by momus-haproxy',
        ]

    def test_many_warnings_are_collapsed(self) -> None:
        """Past 20 warnings, the rest are counted in one last warning."""
        route = _route(Hosts=["a.test"])
        route["Metadata"] = {f"k{index:05}": "x" for index in range(20_000)}
        warnings = [str(w) for w in parse_document(_doc([route])).warnings]
        assert len(warnings) == 21
        assert warnings[0] == "Routes[0].Metadata.k00000: is not used by momus-haproxy"
        assert warnings[-1] == "and 19980 more warnings"

    def test_twenty_warnings_are_all_kept(self) -> None:
        """Up to 20 warnings are listed one by one."""
        route = _route(Hosts=["a.test"])
        route["Metadata"] = {f"k{index:02}": "x" for index in range(20)}
        warnings = parse_document(_doc([route])).warnings
        assert [w.path for w in warnings][-1] == "Routes[0].Metadata.k19"
