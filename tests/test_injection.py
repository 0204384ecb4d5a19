"""No value from a routing document can add a line, a directive or an argument.

The proof is by comparison. Every string field of a rich, valid document gets
hostile text (line breaks, quotes, backslashes, `#`, `%[...]`, `${VAR}`,
template syntax, control and non-ASCII characters, very long runs), one field
at a time. Each such document is either refused with a `DocumentError` that
names the field, or its haproxy.cfg has the same *structure* as the render of
the same document with a benign placeholder in that field: as many lines, and
on each line the same first word, the same number of words as HAProxy's own
tokenizer reads them, and as many `${...}` expansions and log-format tags.
Map files keep two words a line. Accepted hostile renders pass `haproxy -c`.

`MOMUS_FUZZ_EXAMPLES` sets how many examples each fuzz test draws (200).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from momus_haproxy.check import check
from momus_haproxy.document import (
    Cluster,
    Destination,
    Document,
    PathTemplate,
    Route,
    parse_document,
    parse_timespan,
)
from momus_haproxy.errors import DocumentError
from momus_haproxy.install import install
from momus_haproxy.render import DEFAULT_TEMPLATES, Rendered, RenderSettings, render
from tests.support.echo import EchoBackends, free_port, http_request
from tests.support.haproxy import HAProxyRunner

FUZZ_EXAMPLES = int(os.environ.get("MOMUS_FUZZ_EXAMPLES", "200"))
FUZZ_CHECK_EVERY = 25
"""Every this many accepted fuzz examples, one also goes through `haproxy -c`."""
HAPROXY_LINE_WORDS = 64
SETTINGS = RenderSettings(http_bind="127.0.0.1:8080", stats_bind="127.0.0.1:8404")
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# HAProxy's tokenizer -----------------------------------------------------------


@dataclass(frozen=True)
class Words:
    """One configuration line as HAProxy's parser splits it into arguments.

    `words` ends before the first empty word, as HAProxy's arguments do;
    `dropped` counts that word and the ones after it, which HAProxy ignores.
    `expansions` counts the `${...}` HAProxy would replace from its
    environment.
    """

    words: tuple[str, ...]
    dropped: int
    expansions: int


_UNQUOTED = re.compile(
    r"(?P<space>[ \t]+)|'(?P<single>[^']*)(?P<closed>'?)|(?P<double>\")"
    r"|\\x(?P<hex>[0-9A-Fa-f]{2})|\\(?P<escaped>.)|(?P<comment>#)"
    r"|(?P<env>\$\{)|(?P<text>[^ \t'\"\\#$]+|.)",
    re.DOTALL,
)
_DOUBLE = re.compile(
    r"(?P<end>\")|\\x(?P<hex>[0-9A-Fa-f]{2})|\\(?P<escaped>.)"
    r"|(?P<env>\$\{)|(?P<text>[^\"\\$]+|.)",
    re.DOTALL,
)


def haproxy_words(line: str) -> Words:
    """Split `line` the way HAProxy 2.6 reads a configuration line.

    Single quotes keep everything literal; double quotes keep spaces and `#`
    but honour backslash escapes and `${VAR}`; outside quotes a backslash
    escapes the next character and `#` starts a comment.
    """
    words: list[str] = []
    current: list[str] | None = None
    expansions = 0
    pattern = _UNQUOTED
    position = len(line) - len(line.lstrip(" \t"))
    while position < len(line):
        match = pattern.match(line, position)
        assert match is not None
        position = match.end()
        kind = match.lastgroup or "text"
        if kind == "space":
            if current is not None:
                words.append("".join(current))
            current = None
            continue
        if kind == "comment":
            break
        current = current if current is not None else []
        if kind == "closed":
            assert match["closed"], f"unterminated ' quote in {line!r}"
            current.append(match["single"])
        elif kind in ("double", "end"):
            pattern = _DOUBLE if pattern is _UNQUOTED else _UNQUOTED
        elif kind == "hex":
            current.append(chr(int(match["hex"], 16)))
        else:
            expansions += kind == "env"
            current.append(match[kind])
    assert pattern is _UNQUOTED, f'unterminated " quote in {line!r}'
    if current is not None:
        words.append("".join(current))
    kept = words.index("") if "" in words else len(words)
    return Words(tuple(words[:kept]), len(words) - kept, expansions)


_LOG_FORMAT_ACTIONS = {"set-header", "add-header", "set-path", "redirect"}


def log_format_tags(words: tuple[str, ...]) -> int:
    """Count the `%` tags (`%[...]`, `%{...}`, `%ci`) of a log-format action.

    Only `http-request`/`http-response` actions whose arguments HAProxy reads
    as log-format are counted, up to their condition; `%%` is a literal `%`.
    """
    if len(words) < 2 or words[0] not in ("http-request", "http-response"):
        return 0
    if words[1] not in _LOG_FORMAT_ACTIONS:
        return 0
    tags = 0
    for word in words[2:]:
        if word in ("if", "unless"):
            break
        tags += word.replace("%%", "").count("%")
    return tags


LineShape = tuple[str, int, int, int, int]


def structure(config: str) -> tuple[LineShape, ...]:
    """Describe every line of a configuration by what HAProxy reads from it."""
    return tuple(line_shape(line) for line in config.split("\n"))


@functools.lru_cache(maxsize=8192)
def line_shape(line: str) -> LineShape:
    """First word, word count, dropped words, expansions and log-format tags."""
    words = haproxy_words(line)
    first = words.words[0] if words.words else ""
    tags = log_format_tags(words.words)
    return (first, len(words.words), words.dropped, words.expansions, tags)


def _template_first_words() -> set[str]:
    text = (DEFAULT_TEMPLATES / "haproxy.cfg.j2").read_text()
    text = re.sub(r"\{#.*?#\}", "", text, flags=re.DOTALL)
    firsts = set()
    for line in text.split("\n"):
        word = line.strip().split(" ")[0]
        if word and not word.startswith(("{%", "#")):
            firsts.add(word)
    return firsts


TEMPLATE_FIRST_WORDS = _template_first_words()


def assert_plain_config(config: str) -> None:
    """Each line starts with a word the template writes, and HAProxy reads it whole.

    No empty word cuts a line short, no `${...}` reads the environment, and
    no line has more words than HAProxy reads.
    """
    for line in config.split("\n"):
        first, count, dropped, expansions, _ = line_shape(line)
        assert dropped == 0, f"an empty word cuts {line!r}"
        assert expansions == 0, f"an environment variable in {line!r}"
        assert count <= HAPROXY_LINE_WORDS, f"too many words: {line!r}"
        assert count == 0 or first in TEMPLATE_FIRST_WORDS, line


def assert_safe_maps(rendered: Rendered) -> None:
    """Every map line is exactly `key value`: ASCII, two words, no comment."""
    for name, text in rendered.files.items():
        if not name.startswith("maps/"):
            continue
        assert text.isascii(), f"{name} holds non-ASCII text: {text!r}"
        assert text == "" or text.endswith("\n"), name
        for line in text.split("\n")[:-1]:
            assert re.fullmatch(r"[^\s#]\S* \S+", line), f"{name}: {line!r}"


class TestTokenizer:
    """The test's tokenizer reads lines as HAProxy does."""

    @pytest.mark.parametrize(
        ("line", "words"),
        [
            ("  a b\tc", ("a", "b", "c")),
            ("a 'b c' d", ("a", "b c", "d")),
            ("a 'it'\"'\"'s' b", ("a", "it's", "b")),
            ('a "x\\"y" b', ("a", 'x"y', "b")),
            ("a 'x\\' b", ("a", "x\\", "b")),
            ("a b\\ c", ("a", "b c")),
            ("a b # c d", ("a", "b")),
            ("a b#c d", ("a", "b")),
            ("a 'b # c' d", ("a", "b # c", "d")),
            ("a\\x41 b", ("aA", "b")),
            ("a '' b", ("a",)),
        ],
        ids=[
            "spaces",
            "single",
            "quote-in-single",
            "double-escape",
            "backslash-in-single",
            "escaped-space",
            "comment",
            "comment-in-word",
            "hash-in-single",
            "hex",
            "empty-word",
        ],
    )
    def test_words(self, line: str, words: tuple[str, ...]) -> None:
        """Quotes, escapes, comments and empty words split lines as in HAProxy."""
        assert haproxy_words(line).words == words

    def test_empty_word_ends_the_arguments(self) -> None:
        """An empty word and the words after it are dropped, as HAProxy drops them."""
        assert haproxy_words("acl a path -m str -- '' '/b'").dropped == 2

    def test_expansions_outside_single_quotes(self) -> None:
        """`${VAR}` counts outside single quotes only."""
        assert haproxy_words("a ${A} \"${B}\" '${C}' \\${D}").expansions == 2

    @pytest.mark.parametrize("line", ["a 'b", 'a "b', "a 'b' \"c\\\""])
    def test_unterminated_quote_is_an_error(self, line: str) -> None:
        """A quote left open is reported, not read as a word."""
        with pytest.raises(AssertionError, match="unterminated"):
            haproxy_words(line)

    def test_log_format_tags(self) -> None:
        """`%%` is literal; `%[...]` is a tag, in log-format actions only."""
        line = "http-request set-header X '100%%'%[src] if { path -m str -- '%[x]' }"
        assert log_format_tags(haproxy_words(line).words) == 1


# The base document and its fields ----------------------------------------------

HOSTS = ["app.test", "*.wild.test"]
BASE: dict[str, Any] = {
    "Routes": [
        {
            "RouteId": "route-rich",
            "ClusterId": "a-rich",
            "Order": 1,
            "Match": {
                "Hosts": HOSTS,
                "Path": "/api/{id}/{**rest}",
                "Methods": ["GET", "post"],
                "Headers": [
                    {
                        "Name": "X-Exact",
                        "Values": ["one", "two"],
                        "Mode": "ExactHeader",
                    },
                    {
                        "Name": "X-Prefix",
                        "Values": ["pre"],
                        "Mode": "HeaderPrefix",
                        "IsCaseSensitive": True,
                    },
                ],
            },
            "Transforms": [
                {"PathRemovePrefix": "/api"},
                {"PathPrefix": "/v2"},
                {"RequestHeader": "X-Set", "Set": "set-value"},
                {"RequestHeader": "X-Append", "Append": "append-value"},
                {"RequestHeaderRemove": "X-Drop"},
                {"ResponseHeader": "X-Out", "Set": "out-value", "When": "Always"},
                {"ResponseHeader": "X-Fail", "Append": "fail", "When": "Failure"},
                {"ResponseHeaderRemove": "Server", "When": "Success"},
                {
                    "X-Forwarded": "Set",
                    "For": "Remove",
                    "Proto": "Append",
                    "Prefix": "Off",
                    "HeaderPrefix": "X-Fwd-",
                },
                {"PathSet": "/fixed"},
                {"RequestHeaderOriginalHost": "true"},
            ],
            "Metadata": {"RedirectWww": "true", "Owner": "team-a"},
        },
        {
            "RouteId": "route-exact",
            "ClusterId": "b-plain",
            "Order": 2,
            "Match": {
                "Hosts": HOSTS,
                "Path": "/exact/Path",
                "Headers": [
                    {"Name": "X-Contains", "Values": ["sub"], "Mode": "Contains"},
                    {"Name": "X-Not", "Values": ["bad"], "Mode": "NotContains"},
                    {"Name": "X-Exists", "Mode": "Exists"},
                    {"Name": "X-Absent", "Mode": "NotExists"},
                ],
            },
        },
        {
            "RouteId": "route-prefix",
            "ClusterId": "b-plain",
            "Order": 3,
            "Match": {
                "Hosts": HOSTS,
                "Path": "/static/{**rest}",
                "QueryParameters": [
                    {"Name": "q-exact", "Values": ["1"]},
                    {"Name": "q-prefix", "Values": ["p"], "Mode": "Prefix"},
                    {"Name": "q-contains", "Values": ["c"], "Mode": "Contains"},
                ],
            },
            "Metadata": {"UseOriginalHostHeader": "true"},
        },
        {
            "RouteId": "route-query",
            "ClusterId": "c-tls",
            "Order": 4,
            "Match": {
                "Hosts": HOSTS,
                "Path": "/q/{**rest}",
                "QueryParameters": [
                    {"Name": "q-not", "Values": ["n"], "Mode": "NotContains"},
                    {"Name": "q-exists", "Mode": "Exists"},
                ],
            },
        },
        {
            "RouteId": "route-default",
            "ClusterId": "c-tls",
            "Order": 5,
            "Match": {"Path": "{**catch-all}"},
        },
    ],
    "Clusters": [
        {
            "ClusterId": "a-rich",
            "LoadBalancingPolicy": "LeastRequests",
            "SessionAffinity": {
                "Enabled": True,
                "Policy": "Cookie",
                "FailurePolicy": "Return503Error",
                "AffinityKeyName": "Aff.Key",
                "Cookie": {
                    "Domain": "app.test",
                    "SecurePolicy": "Always",
                    "SameSite": "Lax",
                    "MaxAge": "01:00:00",
                },
            },
            "HealthCheck": {
                "Active": {
                    "Enabled": True,
                    "Interval": "00:00:05",
                    "Timeout": "00:00:02",
                    "Policy": "ConsecutiveFailures",
                    "Path": "/health",
                },
                "Passive": {
                    "Enabled": True,
                    "Policy": "TransportFailureRate",
                    "ReactivationPeriod": "00:01:00",
                },
            },
            "HttpRequest": {"ActivityTimeout": "00:01:40", "Version": "1.1"},
            "HttpClient": {"MaxConnectionsPerServer": 50},
            "Metadata": {"ConsecutiveFailuresHealthPolicy.Threshold": "3", "Note": "n"},
            "Destinations": {
                "rich-d": {
                    "Address": "https://backend.test:8443",
                    "Host": "virtual.test:8443",
                    "Health": "http://10.0.0.2:9000",
                    "Metadata": {"Zone": "z1"},
                }
            },
        },
        {
            "ClusterId": "b-plain",
            "HealthCheck": {
                "Passive": {"Enabled": True, "ReactivationPeriod": "00:00:30"}
            },
            "Destinations": {"plain-d": {"Address": "http://127.0.0.1:9001"}},
        },
        {
            "ClusterId": "c-tls",
            "LoadBalancingPolicy": "FirstAlphabetical",
            "HttpClient": {"DangerousAcceptAnyServerCertificate": True},
            "Destinations": {"tls-d": {"Address": "https://tls.test"}},
        },
    ],
}

Placeholder = Callable[[str, Document], str]


def benign(value: str, document: Document | None = None) -> str:
    """Keep what can carry meaning in a validated field; the rest becomes 'x'.

    Letters, digits and `./*{}:_-` decide what a host, path, token or literal
    means; everything else is what an attack would use. An empty value becomes
    'x', so that an empty word in a hostile render cannot go unnoticed.
    """
    return re.sub(r"[^A-Za-z0-9./*{}:_-]", "x", value) or "x"


@dataclass(frozen=True)
class Target:
    """A string field of the base document that hostile text is put into.

    `put` writes a value into a copy of the document; `placeholder` returns
    the benign value of the same kind as an accepted one (for a host, the
    host as validation normalised it); a refusal must name a field path that
    starts with `where`.
    """

    name: str
    put: Callable[[dict[str, Any], str], None]
    base: str
    where: str
    placeholder: Placeholder = benign

    def document(self, value: str) -> bytes:
        """The base document with `value` in this field, as UTF-8 JSON."""
        document = copy.deepcopy(BASE)
        self.put(document, value)
        return json.dumps(document, ensure_ascii=False).encode()


Step = str | int


def _walk(document: dict[str, Any], path: tuple[Step, ...]) -> Any:
    node: Any = document
    for part in path:
        node = node[part]
    return node


def _location(path: tuple[Step, ...]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    return text.lstrip(".")


def field(*path: Step, placeholder: Placeholder = benign, where: str = "") -> Target:
    """A target that replaces the value at `path`."""

    def put(document: dict[str, Any], value: str) -> None:
        _walk(document, path[:-1])[path[-1]] = value

    location = _location(path)
    return Target(location, put, _walk(BASE, path), where or location, placeholder)


def key(*path: Step, old: str) -> Target:
    """A target that renames the key `old` of the object at `path`."""

    def put(document: dict[str, Any], value: str) -> None:
        mapping = _walk(document, path)
        items = [(value if k == old else k, v) for k, v in mapping.items()]
        mapping.clear()
        mapping.update(items)

    location = _location(path)
    return Target(f"{location}:{old}", put, old, location)


def cluster_id() -> Target:
    """Rename cluster `c-tls`, in the cluster and in the routes that use it.

    The new id keeps the prefix `c-`, so the backends stay in the same order:
    the renderer writes them sorted by id, and their order is not under test.
    """

    def put(document: dict[str, Any], value: str) -> None:
        for item in (*document["Routes"], *document["Clusters"]):
            if item["ClusterId"] == "c-tls":
                item["ClusterId"] = "c-" + value

    return Target("ClusterId", put, "tls", "")


def _host(route: int, index: int) -> Placeholder:
    def placeholder(value: str, document: Document) -> str:
        hosts = document.routes[route].Match.Hosts
        assert hosts is not None
        return hosts[index]

    return placeholder


def _route_path(route: int) -> Placeholder:
    def placeholder(value: str, document: Document) -> str:
        template = document.routes[route].Match.Path
        assert template is not None
        return benign(template.template)

    return placeholder


def _timespan(value: str, document: Document) -> str:
    millis = parse_timespan(value)
    days, rest = divmod(millis, 86_400_000)
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{days}.{hours:02}:{minutes:02}:{seconds:02}.{millis:03}"


def _flag(value: str, document: Document) -> str:
    return value.strip().lower()


def _address(cluster: int, name: str, health: bool = False) -> Placeholder:
    def placeholder(value: str, document: Document) -> str:
        destination = document.clusters[cluster].Destinations[name]
        url = destination.health_url if health else destination.url
        assert url is not None
        return f"{url.scheme}://{url.authority}"

    return placeholder


def _destination_host(value: str, document: Document) -> str:
    host = document.clusters[0].Destinations["rich-d"].Host
    assert host is not None
    return host


def _probe_path(value: str, document: Document) -> str:
    health = document.clusters[0].HealthCheck
    assert health is not None
    assert health.Active is not None
    assert health.Active.Path is not None
    return benign(health.Active.Path)


def _cookie_domain(value: str, document: Document) -> str:
    affinity = document.clusters[0].SessionAffinity
    assert affinity is not None
    assert affinity.Cookie is not None
    assert affinity.Cookie.Domain is not None
    return affinity.Cookie.Domain


R0, R1, R2, R3, R4 = (("Routes", i) for i in range(5))
C0, C1, C2 = (("Clusters", i) for i in range(3))
AFFINITY = (*C0, "SessionAffinity")
ACTIVE = (*C0, "HealthCheck", "Active")
RICH_D = (*C0, "Destinations", "rich-d")
PLAIN_D = (*C1, "Destinations", "plain-d")
TLS_D = (*C2, "Destinations", "tls-d")
# Address and Health are checked together, so a refusal names the destination
# (`Clusters[0].Destinations.rich-d`) and starts its message with the field.
RICH, PLAIN, TLS = (_location(path) for path in (RICH_D, PLAIN_D, TLS_D))

TARGETS = [
    field(*R0, "RouteId"),
    field(*R0, "Match", "Hosts", 0, placeholder=_host(0, 0)),
    field(*R0, "Match", "Hosts", 1, placeholder=_host(0, 1)),
    field(*R0, "Match", "Path", placeholder=_route_path(0)),
    field(*R0, "Match", "Methods", 1),
    field(*R0, "Match", "Headers", 0, "Name"),
    field(*R0, "Match", "Headers", 0, "Values", 1),
    field(*R0, "Match", "Headers", 0, "Mode"),
    field(*R0, "Match", "Headers", 1, "Values", 0),
    field(*R0, "Transforms", 0, "PathRemovePrefix"),
    field(*R0, "Transforms", 1, "PathPrefix"),
    field(*R0, "Transforms", 2, "RequestHeader"),
    field(*R0, "Transforms", 2, "Set"),
    field(*R0, "Transforms", 3, "Append"),
    key(*R0, "Transforms", 3, old="Append"),
    field(*R0, "Transforms", 4, "RequestHeaderRemove"),
    field(*R0, "Transforms", 5, "ResponseHeader"),
    field(*R0, "Transforms", 5, "Set"),
    field(*R0, "Transforms", 5, "When"),
    field(*R0, "Transforms", 6, "Append"),
    field(*R0, "Transforms", 7, "ResponseHeaderRemove"),
    field(*R0, "Transforms", 8, "X-Forwarded"),
    field(*R0, "Transforms", 8, "For"),
    field(*R0, "Transforms", 8, "HeaderPrefix"),
    field(*R0, "Transforms", 9, "PathSet"),
    field(*R0, "Transforms", 10, "RequestHeaderOriginalHost"),
    field(*R0, "Metadata", "RedirectWww", placeholder=_flag),
    field(*R0, "Metadata", "Owner"),
    key(*R0, "Metadata", old="Owner"),
    field(*R1, "Match", "Path", placeholder=_route_path(1)),
    field(*R1, "Match", "Headers", 0, "Values", 0),
    field(*R1, "Match", "Headers", 1, "Values", 0),
    field(*R1, "Match", "Headers", 2, "Name"),
    field(*R2, "Match", "Path", placeholder=_route_path(2)),
    field(*R2, "Match", "QueryParameters", 0, "Name"),
    field(*R2, "Match", "QueryParameters", 1, "Values", 0),
    field(*R2, "Match", "QueryParameters", 2, "Mode"),
    field(*R2, "Metadata", "UseOriginalHostHeader", placeholder=_flag),
    field(*R3, "Match", "QueryParameters", 0, "Values", 0),
    field(*R3, "Match", "QueryParameters", 1, "Name"),
    field(*R4, "Match", "Path", placeholder=_route_path(4)),
    cluster_id(),
    field(*C0, "LoadBalancingPolicy"),
    field(*AFFINITY, "Policy"),
    field(*AFFINITY, "FailurePolicy"),
    field(*AFFINITY, "AffinityKeyName"),
    field(*AFFINITY, "Cookie", "Domain", placeholder=_cookie_domain),
    field(*AFFINITY, "Cookie", "SecurePolicy"),
    field(*AFFINITY, "Cookie", "SameSite"),
    field(*AFFINITY, "Cookie", "MaxAge", placeholder=_timespan),
    field(*ACTIVE, "Interval", placeholder=_timespan),
    field(*ACTIVE, "Timeout", placeholder=_timespan),
    field(*ACTIVE, "Policy"),
    field(*ACTIVE, "Path", placeholder=_probe_path),
    field(*C0, "HealthCheck", "Passive", "ReactivationPeriod", placeholder=_timespan),
    field(*C0, "HttpRequest", "ActivityTimeout", placeholder=_timespan),
    field(*C0, "HttpRequest", "Version"),
    field(*C0, "Metadata", "ConsecutiveFailuresHealthPolicy.Threshold"),
    field(*C0, "Metadata", "Note"),
    key(*C0, "Metadata", old="Note"),
    key(*C0, "Destinations", old="rich-d"),
    field(*RICH_D, "Address", placeholder=_address(0, "rich-d"), where=RICH),
    field(*RICH_D, "Host", placeholder=_destination_host),
    field(*RICH_D, "Health", placeholder=_address(0, "rich-d", True), where=RICH),
    field(*RICH_D, "Metadata", "Zone"),
    field(*PLAIN_D, "Address", placeholder=_address(1, "plain-d"), where=PLAIN),
    field(*TLS_D, "Address", placeholder=_address(2, "tls-d"), where=TLS),
    key(*C2, "Destinations", old="tls-d"),
]
RENAMES = {target.name for target in TARGETS if ":" in target.name}
"""Targets that rename a key; put last, so the other targets' paths still work."""

# Hostile text ----------------------------------------------------------------

NASTY = [
    "\n",
    "\r",
    "\r\n",
    "\n    http-request deny if TRUE\n",
    "\nuse_backend evil",
    " if TRUE",
    " check weight 0",
    "#",
    " # comment",
    "'",
    '"',
    "'\"'\"'",
    "\\",
    "\\'",
    '\\"',
    "\\x41",
    "\\n",
    "%",
    "%%",
    "%[src]",
    "%{+Q}o",
    "%ci",
    "${HOME}",
    '"${HOME}"',
    "$HOME",
    "{{ settings }}",
    "{% if true %}x{% endif %}",
    "{#",
    "}",
    " }",
    "{",
    "!",
    " -- ",
    " -m reg .* ",
    " ",
    "\t",
    "",
    "''",
    '""',
    "\x00",
    "\x0b",
    "\x0c",
    "\x1b",
    "\x7f",
    "\x85",
    "\u2028",
    "\u00a0",
    "\ufeff",
    "é",
    "ß",
    "\u212a",
    "\u3002",
    "😀",
    "²",
    "٣",
    "/",
    "*.",
    ":",
    "/{**x}",
    "/{x}",
    "a" * 1100,
]


KNOWN = [
    "\n",
    "\r",
    "\n    http-request deny if TRUE\n",
    " if TRUE",
    "#",
    "'",
    '"',
    "\\",
    "%[src]",
    "${HOME}",
    "{{ settings }}",
    " ",
    "",
    "\x00",
    "\x85",
    "\u2028",
    "\u00a0",
    "\u212a",
    "é",
    "²",
    "a" * 1100,
]
"""The payloads every field gets in the default run, alone and spliced in."""

SAMPLE = ("'", '"', "\\", "%[src]", "${HOME}", "#", " ", "é", "}", "!$&()+,;=@~")
"""Payloads put into every field that takes them at once, for `haproxy -c`."""


def _splice(base: str, nasty: str, at: int) -> str:
    at %= len(base) + 1
    return base[:at] + nasty + base[at:]


def hostile(target: Target) -> st.SearchStrategy[str]:
    """Hostile text for one field: raw, or spliced into the field's own value."""
    pieces = st.sampled_from(NASTY) | st.text(max_size=3)
    return st.one_of(
        st.sampled_from(NASTY),
        st.lists(pieces, max_size=6).map("".join),
        st.text(max_size=40),
        st.builds(_splice, st.just(target.base), st.sampled_from(NASTY), st.integers()),
        st.builds(
            _splice, st.just(target.base), st.lists(pieces).map("".join), st.integers()
        ),
    )


@st.composite
def target_and_value(draw: st.DrawFn) -> tuple[Target, str]:
    """A field of the base document and hostile text for it."""
    target = draw(st.sampled_from(TARGETS))
    return target, draw(hostile(target))


# Checking one value ------------------------------------------------------------


def accepted_render(target: Target, value: str) -> Rendered | None:
    """Render the base document with `value` in `target`, or None if refused.

    A refusal must name the field. An accepted value must leave the
    configuration plain and with the structure of its placeholder's render.
    """
    try:
        document = parse_document(target.document(value))
    except DocumentError as exc:
        paths = [issue.path for issue in exc.issues]
        assert any(path.startswith(target.where) for path in paths), paths
        return None
    rendered = render(document, SETTINGS)
    placeholder = _placeholder_render(target, target.placeholder(value, document))
    assert_safe_maps(rendered)
    assert_plain_config(rendered.config)
    assert structure(rendered.config) == structure(placeholder.config), (
        f"{target.name} = {value!r} changes the configuration's structure:\n"
        + _first_difference(rendered.config, placeholder.config)
    )
    assert _map_kinds(rendered) == _map_kinds(placeholder)
    return rendered


@functools.lru_cache(maxsize=1024)
def _placeholder_render(target: Target, value: str) -> Rendered:
    try:
        return render(parse_document(target.document(value)), SETTINGS)
    except DocumentError as exc:
        raise AssertionError(f"placeholder {value!r} is refused: {exc}") from exc


def _first_difference(config: str, other: str) -> str:
    pairs = zip(config.split("\n"), other.split("\n"), strict=False)
    for number, (line, calm) in enumerate(pairs, 1):
        if line_shape(line) != line_shape(calm):
            return f"line {number}:\n  {line!r}\n  {calm!r}"
    return f"{config.count(chr(10))} lines, not {other.count(chr(10))}"


def _map_kinds(rendered: Rendered) -> list[str]:
    return sorted(re.sub(r"-[0-9a-f]{12}\.map$", "", n) for n in rendered.files)


def haproxy_check(rendered: Rendered, haproxy_bin: str) -> None:
    """Install a render into a scratch directory and run `haproxy -c` on it."""
    with tempfile.TemporaryDirectory(prefix="momus-inject-") as scratch:
        install(rendered.files, Path(scratch))
        asyncio.run(check(Path(scratch), haproxy_bin=haproxy_bin))


def _base() -> Rendered:
    return render(parse_document(json.dumps(BASE).encode()), SETTINGS)


class TestBaseDocument:
    """The base document the hostile values go into is itself sound."""

    def test_base_document_renders_and_passes_haproxy(self, haproxy_bin: str) -> None:
        """The base document is accepted, renders plain, and passes `haproxy -c`."""
        document = parse_document(json.dumps(BASE).encode())
        assert [str(w) for w in document.warnings] == [
            "Routes[0].Metadata.Owner: is not used by momus-haproxy",
            "Clusters[0].Metadata.Note: is not used by momus-haproxy",
        ]
        rendered = _base()
        assert_safe_maps(rendered)
        assert_plain_config(rendered.config)
        haproxy_check(rendered, haproxy_bin)

    @pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
    def test_placeholder_keeps_the_structure(self, target: Target) -> None:
        """A target holds a string of the base document; its placeholder is benign."""
        assert json.loads(target.document(target.base)) == BASE
        rendered = accepted_render(target, target.base)
        assert rendered is not None
        assert structure(rendered.config) == structure(_base().config)


class TestHostileValues:
    """Hostile text in any field is refused or changes no structure."""

    @pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
    def test_known_payloads(self, target: Target) -> None:
        """Each known payload, alone and inside the field's value, is harmless."""
        for nasty in KNOWN:
            for value in (nasty, _splice(target.base, nasty, 1), target.base + nasty):
                accepted_render(target, value)

    @FUZZ
    @given(case=target_and_value())
    def test_fuzzed_values(self, case: tuple[Target, str], haproxy_bin: str) -> None:
        """Random hostile text in a random field is refused or harmless."""
        target, value = case
        rendered = accepted_render(target, value)
        if rendered is not None and next(_ACCEPTED) % FUZZ_CHECK_EVERY == 0:
            haproxy_check(rendered, haproxy_bin)

    @pytest.mark.parametrize("nasty", SAMPLE)
    def test_accepted_payloads_pass_haproxy(self, nasty: str, haproxy_bin: str) -> None:
        """Every field that takes a payload holds it at once, and HAProxy agrees."""
        document = copy.deepcopy(BASE)
        taken = []
        for target in sorted(TARGETS, key=lambda t: t.name in RENAMES):
            value = _splice(target.base, nasty, 1)
            if accepted_render(target, value) is not None:
                target.put(document, value)
                taken.append(target.name)
        assert len(taken) >= 10, taken
        data = json.dumps(document, ensure_ascii=False).encode()
        rendered = render(parse_document(data), SETTINGS)
        assert_safe_maps(rendered)
        assert_plain_config(rendered.config)
        haproxy_check(rendered, haproxy_bin)


_ACCEPTED = itertools.count()
"""Counts accepted fuzz examples, to send every FUZZ_CHECK_EVERY-th to HAProxy."""

# Whole documents --------------------------------------------------------------

PLAUSIBLE = [
    "a",
    "app.test",
    "*.wild.test",
    "/x",
    "/api/{**rest}",
    "http://127.0.0.1:9001",
    "h.test:80",
    "00:00:05",
    "true",
    "GET",
    "X-A",
    "3",
    *("RequestHeader", "ResponseHeader", "Set", "Append", "When", "Always"),
    *("PathPrefix", "X-Forwarded", "For", "Off", "HeaderPrefix", "RedirectWww"),
]
"""Strings that fit some field, for fields and keys the generator knows no hint for."""

_STRINGS = st.one_of(
    st.sampled_from(PLAUSIBLE), st.sampled_from(NASTY), st.text(max_size=12)
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(_STRINGS, inner, max_size=3)


# Python's json writes and reads NaN and Infinity; documents may carry them.
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | _STRINGS
_JSON: st.SearchStrategy[Any] = st.recursive(_SCALARS, _containers, max_leaves=6)
_KEY_CASES: list[Callable[[str], str]] = [str, str.lower, str.upper]


def _one_of(*choices: Any) -> st.SearchStrategy[Any]:
    """Mostly one of `choices`, sometimes any string from `_STRINGS`."""
    picks = st.sampled_from([*choices, None])
    return picks.flatmap(lambda pick: _STRINGS if pick is None else st.just(pick))


_HOSTS = _one_of("app.test", "*.wild.test", "WWW.App.Test", "b.test", "bücher.test")
_PATHS = _one_of("/x", "/api/{**rest}", "{**catch-all}", "/u/{id}/x", "/", "/A/B/")
_URLS = _one_of("http://127.0.0.1:9001", "https://h.test:8443/", "http://h.test")
_TIMESPANS = _one_of("00:00:05", "1.00:00:00", "00:00:00.5", "30.00:00:00")
_NAMES = _one_of("X-A", "q", "X-B.c_d")
_TRANSFORMS = st.one_of(
    st.builds(lambda v: {"PathPrefix": v}, _PATHS),
    st.builds(lambda v: {"PathRemovePrefix": v}, _PATHS),
    st.builds(lambda v: {"PathSet": v}, _PATHS),
    st.builds(lambda n, v: {"RequestHeader": n, "Set": v}, _NAMES, _STRINGS),
    st.builds(lambda n: {"RequestHeaderRemove": n}, _NAMES),
    st.builds(
        lambda n, v, w: {"ResponseHeader": n, "Append": v, "When": w},
        _NAMES,
        _STRINGS,
        _one_of("Always", "Success", "Failure"),
    ),
    st.builds(
        lambda a, f, p: {"X-Forwarded": a, "For": f, "HeaderPrefix": p},
        _one_of("Set", "Off", "Append", "Remove"),
        _one_of("Set", "Remove"),
        _NAMES,
    ),
    st.builds(lambda v: {"RequestHeaderOriginalHost": v}, _one_of("true", "false")),
    st.dictionaries(_STRINGS, _JSON, max_size=3),
)
_METADATA = st.dictionaries(
    _one_of(
        "RedirectWww",
        "UseOriginalHostHeader",
        "ConsecutiveFailuresHealthPolicy.Threshold",
        "Owner",
    ),
    _one_of("true", "false", "3") | _JSON,
    max_size=2,
)
HINTS: dict[str, st.SearchStrategy[Any]] = {
    "RouteId": _one_of("r1", "r2", "r3"),
    "ClusterId": st.sampled_from(["a", "b"]),
    "Order": st.integers(-1, 2),
    "Hosts": st.lists(_HOSTS, min_size=1, max_size=3),
    "Path": _PATHS,
    "Methods": st.lists(_one_of("GET", "post", "PUT"), max_size=3),
    "Name": _NAMES,
    "Values": st.lists(_STRINGS, min_size=1, max_size=3),
    "Transforms": st.lists(_TRANSFORMS, max_size=4),
    "Metadata": _METADATA,
    "Address": _URLS,
    "Health": _URLS,
    "Host": _one_of("h.test:80", "v.test"),
    "Domain": _HOSTS,
    "AffinityKeyName": _NAMES,
    **dict.fromkeys(
        ["Interval", "Timeout", "ReactivationPeriod", "ActivityTimeout", "MaxAge"],
        _TIMESPANS,
    ),
}
"""Plausible values by field name, so that many generated documents are valid."""


def _field(name: str, info: FieldInfo) -> st.SearchStrategy[Any]:
    """A value for one field: mostly plausible, one time in 32 any JSON."""
    if info.annotation is Any and info.metadata:  # a YARP setting refused by name
        return st.none()
    typed = HINTS[name] if name in HINTS else _typed(info.annotation)
    # Hypothesis favours small integers, so the rare choice is the last one.
    return st.sampled_from(range(32)).flatmap(lambda n: _JSON if n == 31 else typed)


def _typed(annotation: Any) -> st.SearchStrategy[Any]:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _typed(args[0])
    if origin in (Union, UnionType):
        return st.one_of(*(_typed(arg) for arg in args))
    if origin is list:
        return st.lists(_typed(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(_STRINGS, _typed(args[1]), min_size=1, max_size=2)
    if origin is Literal:
        return st.sampled_from(args)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        NoneType: st.none(),
        Any: _JSON,
        bool: st.booleans(),
        int: st.integers(-1, 100_001),
        str: _STRINGS,
        PathTemplate: _PATHS,
    }
    if annotation in simple:
        return simple[annotation]
    assert issubclass(annotation, BaseModel), annotation
    return _model(annotation)


_NEEDED = {"RouteId", "ClusterId", "Match", "Path", "Address", "Name", "Values"}
"""Fields always generated, so that most routes and matches can be valid."""


@functools.cache
def _model(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects of one of the document's models, with keys in any letter case."""
    fields = {name: _field(name, info) for name, info in model.model_fields.items()}
    required = {name: fields.pop(name) for name in _NEEDED if name in fields}
    objects = st.fixed_dictionaries(required, optional=fields)
    return st.builds(_recase, objects, st.sampled_from(_KEY_CASES))


def _recase(value: dict[str, Any], case: Callable[[str], str]) -> dict[str, Any]:
    return {case(key): item for key, item in value.items()}


# One destination per cluster (so addresses rarely clash), set once `_model` runs.
HINTS["Destinations"] = st.dictionaries(
    _one_of("d1", "d2"), _model(Destination), min_size=1, max_size=1
)


def _id_of(name: str) -> Callable[[dict[str, Any]], str]:
    def key(item: dict[str, Any]) -> str:
        return repr({k.lower(): v for k, v in item.items()}.get(name))

    return key


DOCUMENTS = st.fixed_dictionaries(
    {
        "Routes": st.lists(
            _model(Route), min_size=1, max_size=4, unique_by=_id_of("routeid")
        ),
        "Clusters": st.lists(
            _model(Cluster), min_size=2, max_size=2, unique_by=_id_of("clusterid")
        ),
    }
)
"""Documents built from the model's shape, often valid, sometimes not."""


def _parsed(data: bytes) -> Document | None:
    """Parse `data`; None when it is refused, which must list a problem."""
    try:
        return parse_document(data)
    except DocumentError as exc:
        refusal = exc
    assert refusal.issues
    return None


class TestWholeDocuments:
    """Documents of any shape are parsed or refused, never crash the parser."""

    @FUZZ
    @given(document=DOCUMENTS | _JSON)
    def test_model_shaped_documents(self, document: Any) -> None:
        """A document built from the model's shape is refused or renders plain."""
        parsed = _parsed(json.dumps(document, ensure_ascii=False).encode())
        if parsed is None:
            return
        rendered = render(parsed, SETTINGS)
        assert_safe_maps(rendered)
        assert_plain_config(rendered.config)

    @FUZZ
    @given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
    def test_any_bytes(self, data: bytes) -> None:
        """Arbitrary bytes give a document or a DocumentError, nothing else."""
        _parsed(data)


# Regressions --------------------------------------------------------------------


def _document(
    match: dict[str, Any] | None = None,
    route: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
) -> bytes:
    """A one-route document with extra `Match`, route and cluster fields."""
    destination = {"d": {"Address": "http://127.0.0.1:9001"}}
    document = {
        "Routes": [
            {
                "RouteId": "r",
                "ClusterId": "c",
                "Match": {"Hosts": ["a.test"], **(match or {})},
                **(route or {}),
            }
        ],
        "Clusters": [
            {"ClusterId": "c", "Destinations": destination, **(cluster or {})}
        ],
    }
    return json.dumps(document).encode()


def _refused(data: bytes) -> list[str]:
    with pytest.raises(DocumentError) as info:
        parse_document(data)
    return [str(issue) for issue in info.value.issues]


TIMERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "activity-timeout": lambda v: {"HttpRequest": {"ActivityTimeout": v}},
    "check-interval": lambda v: {
        "HealthCheck": {"Active": {"Enabled": True, "Interval": v}}
    },
    "check-timeout": lambda v: {
        "HealthCheck": {"Active": {"Enabled": True, "Timeout": v}}
    },
    "reactivation": lambda v: {
        "HealthCheck": {"Passive": {"Enabled": True, "ReactivationPeriod": v}}
    },
}
"""Cluster fields that become HAProxy timers, each with a given time span."""


class TestRegressions:
    """Values that once broke a configuration line or the parser."""

    @pytest.mark.parametrize(
        ("data", "where"),
        [
            (_document({"Path": "/x\n"}), "Routes[0].Match.Path"),
            (_document({"Methods": ["GET\n"]}), "Routes[0].Match.Methods[0]"),
            (
                _document({"Headers": [{"Name": "X-A\n", "Mode": "Exists"}]}),
                "Routes[0].Match.Headers[0].Name",
            ),
            (
                _document({"QueryParameters": [{"Name": "q\n", "Mode": "Exists"}]}),
                "Routes[0].Match.QueryParameters[0].Name",
            ),
            (
                _document(
                    cluster={"SessionAffinity": {"AffinityKeyName": "k\n"}},
                ),
                "Clusters[0].SessionAffinity.AffinityKeyName",
            ),
            (
                _document(
                    cluster={
                        "Destinations": {
                            "d": {"Address": "http://a.test:1", "Host": "b.test\n"}
                        }
                    }
                ),
                "Clusters[0].Destinations.d.Host",
            ),
        ],
        ids=["path", "method", "header", "query", "cookie", "destination-host"],
    )
    def test_trailing_newline_is_refused(self, data: bytes, where: str) -> None:
        """A value ending in a line break is refused (`$` also matched before it)."""
        assert any(issue.startswith(where + ":") for issue in _refused(data))

    @pytest.mark.parametrize(
        ("data", "where"),
        [
            (
                _document({"Headers": [{"Name": "X-A", "Values": ["a", ""]}]}),
                "Routes[0].Match.Headers[0].Values[1]",
            ),
            (
                _document({"QueryParameters": [{"Name": "q", "Values": [""]}]}),
                "Routes[0].Match.QueryParameters[0].Values[0]",
            ),
            (
                _document(route={"Transforms": [{"RequestHeader": "X", "Set": ""}]}),
                "Routes[0].Transforms[0].Set",
            ),
            (
                _document(
                    route={"Transforms": [{"ResponseHeader": "X", "Append": ""}]}
                ),
                "Routes[0].Transforms[0].Append",
            ),
        ],
        ids=["header-value", "query-value", "request-header", "response-header"],
    )
    def test_empty_value_is_refused(self, data: bytes, where: str) -> None:
        """An empty value is refused: HAProxy would stop reading the line there."""
        assert any(issue.startswith(where + ":") for issue in _refused(data))

    @pytest.mark.parametrize(
        ("data", "where"),
        [
            (_document({"Path": 5}), "Routes[0].Match.Path"),
            (
                _document(cluster={"HealthCheck": {"Active": {"Interval": 5}}}),
                "Clusters[0].HealthCheck.Active.Interval",
            ),
            (
                _document(
                    cluster={"SessionAffinity": {"Cookie": {"MaxAge": [1]}}},
                ),
                "Clusters[0].SessionAffinity.Cookie.MaxAge",
            ),
        ],
        ids=["path", "interval", "max-age"],
    )
    def test_value_of_another_type_is_refused(self, data: bytes, where: str) -> None:
        """A number where text is read is a DocumentError, not a crash."""
        assert any(issue.startswith(where + ":") for issue in _refused(data))

    @pytest.mark.parametrize("threshold", ["²", "٣", "0", "-1", "1e3", True])
    def test_threshold_is_a_whole_number_from_one(self, threshold: object) -> None:
        """Unicode digits and zero are refused before they reach `fall`."""
        metadata = {"ConsecutiveFailuresHealthPolicy.Threshold": threshold}
        issues = _refused(_document(cluster={"Metadata": metadata}))
        assert "ConsecutiveFailuresHealthPolicy.Threshold" in issues[0]

    @pytest.mark.parametrize("timer", sorted(TIMERS))
    def test_timer_longer_than_haproxy_allows_is_refused(
        self, timer: str, haproxy_bin: str
    ) -> None:
        """Timers past 24.8 days are refused; the longest one passes `haproxy -c`."""
        cluster = TIMERS[timer]
        assert len(_refused(_document(cluster=cluster("24.20:31:23.648")))) == 1
        longest = parse_document(_document(cluster=cluster("24.20:31:23.647")))
        haproxy_check(render(longest, SETTINGS), haproxy_bin)

    def test_match_fits_one_haproxy_line(self, haproxy_bin: str) -> None:
        """The most a route may match on fits HAProxy's line; one more is refused."""
        values = [f"v{i}" for i in range(21)]
        header = {"Name": "X-A", "Values": values}
        query = {"Name": "q", "Values": ["a"]}
        match = {
            "Path": "/exact/path",
            "Methods": ["GET"],
            "Headers": [header],
            "QueryParameters": [query],
        }
        rendered = render(parse_document(_document(match)), SETTINGS)
        assert_plain_config(rendered.config)
        haproxy_check(rendered, haproxy_bin)
        header["Values"] = [*values, "one-more"]
        assert "Routes[0].Match: " in _refused(_document(match))[0]

    def test_wildcard_cookie_domain_is_refused(self) -> None:
        """HAProxy refuses `domain *.example.com`; validation says so first."""
        cookie = {"Domain": "*.app.test"}
        data = _document(cluster={"SessionAffinity": {"Cookie": cookie}})
        assert "SessionAffinity.Cookie.Domain" in _refused(data)[0]

    def test_transform_key_given_twice_in_different_case_is_refused(self) -> None:
        """`Set` and `set` in one transform are refused, not silently merged."""
        transform = {"RequestHeader": "X-A", "Set": "1", "set": "2"}
        data = _document(route={"Transforms": [transform]})
        assert "Routes[0].Transforms[0].set" in _refused(data)[0]

    @pytest.mark.parametrize("name", ["Order", "order", "ORDER"])
    def test_null_order_in_any_letter_case(self, name: str) -> None:
        """`Order: null` means 0 whatever the key's letter case."""
        document = parse_document(_document(route={name: None}))
        assert document.routes[0].Order == 0


# Values reach HAProxy literally -------------------------------------------------

LITERAL = 'it\'s "q" \\back\\slash %[src] %% ${HOME} #not {{ x }} {% y %} }'


async def test_hostile_values_reach_the_backend_literally(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """Header values with quotes, `%`, `${}` and `#` are matched and sent as written."""
    echo = echo_backends.start("e")
    route = {
        "RouteId": "r",
        "ClusterId": "c",
        "Match": {
            "Hosts": ["lit.test"],
            "Headers": [{"Name": "X-In", "Values": [LITERAL], "IsCaseSensitive": True}],
        },
        "Transforms": [
            {"RequestHeader": "X-Set", "Set": LITERAL},
            {"ResponseHeader": "X-Out", "Set": LITERAL, "When": "Always"},
        ],
    }
    destination = {"d": {"Address": f"http://127.0.0.1:{echo.port}"}}
    document = {
        "Routes": [route],
        "Clusters": [{"ClusterId": "c", "Destinations": destination}],
    }
    port = free_port()
    settings = RenderSettings(http_bind=f"127.0.0.1:{port}", stats_bind=None)
    rendered = render(parse_document(json.dumps(document).encode()), settings)
    install(rendered.files, tmp_path / "conf")
    await haproxy_runner(tmp_path / "conf")

    answer = http_request(port, "GET", "lit.test", "/", headers={"X-In": LITERAL})
    assert answer.json["headers"]["x-set"] == LITERAL
    assert answer.headers["x-out"] == LITERAL
    other = http_request(port, "GET", "lit.test", "/", headers={"X-In": "it's"})
    assert other.status == 404
