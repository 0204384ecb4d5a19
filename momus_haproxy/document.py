"""Parse and validate a Momus routing document (YARP's route/cluster shape).

`parse_document` turns the bytes stored under the watched key into a
`Document`, or raises `DocumentError` listing every problem by field path
(`Routes[0].Match.Hosts[1]: ...`). Keys are accepted in any letter case, as
YARP's own loader does. Every string that reaches the HAProxy configuration is
held to a character set that cannot end a line, start a comment or split an
argument; fields momus-haproxy does not support are refused by path rather
than dropped.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import idna
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .errors import QUOTE_LIMIT, SUMMARY_ISSUES, DocumentError, Issue, quoted

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "Cluster",
    "Destination",
    "Document",
    "Route",
    "described",
    "format_location",
    "load_json",
    "parse_document",
    "parse_timespan",
    "path_step",
]

MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MAX_VALUE_LENGTH = 1024
MAX_NAME_LENGTH = 256
"""Longest header, query parameter or cookie name; HAProxy reads a name that
goes into a sample fetch, such as `req.fhdr(NAME)`, into one small buffer."""
MAX_HOST_LENGTH = 253
MAX_NUMBER_DIGITS = 4300
"""Digits of the longest integer read, Python's own default limit."""
MAX_TIMER_MS = 2**31 - 1
"""HAProxy refuses a timeout or check interval longer than this (~24.8 days)."""
# HAProxy 2.6 reads at most 64 words on a line. A route that matches on methods,
# headers or query parameters becomes one `http-request` rule holding every
# condition; the rule's own words and its path test take up to 23 of the 64.
MAX_MATCH_WORDS = 40

_HOST_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_RE = re.compile(rf"^(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*\Z")
_AUTHORITY_RE = re.compile(rf"^{_HOST_LABEL}(\.{_HOST_LABEL})*(:[0-9]{{1,5}})?\Z")
_PATH_CHARS_RE = re.compile(r"^[A-Za-z0-9\-._~!$&()*+,;=:@%/{}]*\Z")
_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SEGMENT_PARAM_RE = re.compile(r"^\{(\*{1,2})?([A-Za-z_][A-Za-z0-9_-]*)\}\Z")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_METHOD_RE = re.compile(r"^[A-Za-z]+\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_NUMERIC_HOST_RE = re.compile(r"^[0-9.]+\Z")
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_TIMESPAN_RE = re.compile(
    r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,7}))?\Z"
)


def format_location(loc: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as `Routes[0].Match.Hosts[1]`.

    A key longer than `QUOTE_LIMIT` (a hostile destination or metadata name)
    shows its start and its length, so that the path stays short.
    """
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif len(part) > QUOTE_LIMIT:
            text += f"[{json.dumps(part[:QUOTE_LIMIT])}... ({len(part)} characters)]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


def path_step(key: str) -> str:
    """Render an object key as the next step of a field path.

    A plain name reads `.Name`; any other key (a newline, a quote, a long
    name chosen by a hostile document) is escaped and cut short by
    `format_location`, so that a path never breaks a log line.
    """
    if len(key) <= QUOTE_LIMIT and _PLAIN_KEY_RE.match(key):
        return f".{key}"
    return format_location((key,))


def described(value: object) -> str:
    """Name a JSON value in a message: `null`, `true`, `the string 'x'`..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {quoted(value)}"
    if isinstance(value, int | float):
        return f"the number {quoted(value)}"
    return "a list" if isinstance(value, list) else "an object"


def parse_timespan(value: str) -> int:
    """Return a .NET TimeSpan text such as `00:00:15` or `1.00:00:00` in ms."""
    match = _TIMESPAN_RE.match(value.strip())
    if match is None:
        raise ValueError(f"{quoted(value)} is not a time span such as '00:00:30'")
    days, hours, minutes, seconds, fraction = match.groups()
    total = int(days or 0) * 86400 + int(hours) * 3600
    total += int(minutes) * 60 + int(seconds)
    millis = total * 1000 + int((fraction or "0").ljust(7, "0")[:3])
    if millis <= 0:
        raise ValueError(f"{quoted(value)} must be longer than zero")
    return millis


def _check_text(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise ValueError(f"{quoted(value)} contains a control character")
    if len(value) > MAX_VALUE_LENGTH:
        raise ValueError(f"is longer than {MAX_VALUE_LENGTH} characters")
    return value


def _check_host(value: str) -> str:
    host = value.strip().lower()
    if ":" in host:
        raise ValueError(f"{quoted(value)}: a port in a host match is not supported")
    try:
        host = _ascii_host(host)
    except UnicodeError as exc:
        raise ValueError(f"{quoted(value)} is not a valid host name") from exc
    if len(host) > MAX_HOST_LENGTH or not _HOST_RE.match(host):
        raise ValueError(
            f"{quoted(value)} is not a host name or a '*.' wildcard such as "
            "'*.example.com'"
        )
    return host


def _ascii_host(host: str) -> str:
    """Return `host` in the ASCII form clients send (IDNA 2008 with UTS #46).

    Python's own `idna` codec follows IDNA 2003, which maps `ß` to `ss` where
    browsers and curl send `xn--...`. Raises UnicodeError for a bad name.
    """
    if host.isascii():
        return host
    wildcard = host.startswith("*.")
    name = host.removeprefix("*.")
    ascii_name = idna.encode(name, uts46=True).decode("ascii")
    return f"*.{ascii_name}" if wildcard else ascii_name


def _check_token(value: str) -> str:
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{quoted(value)} is longer than {MAX_NAME_LENGTH} characters")
    if not _TOKEN_RE.match(value):
        raise ValueError(
            f"{quoted(value)} may hold only letters, digits, '-', '_' and '.'"
        )
    return value


def _check_method(value: str) -> str:
    if not _METHOD_RE.match(value) or len(value) > 32:
        raise ValueError(f"{quoted(value)} is not an HTTP method such as 'GET'")
    return value.upper()


def _check_timespan(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError(f"{quoted(value)} must be a time span text such as '00:00:30'")
    return parse_timespan(value)


def _check_timer(value: object) -> int:
    millis = _check_timespan(value)
    if millis > MAX_TIMER_MS:
        raise ValueError(
            f"{quoted(value)} is longer than HAProxy's longest timer, '24.20:31:23.647'"
        )
    return millis


def _check_match_value(value: str) -> str:
    # HAProxy ends a line's arguments at the first empty word, so an empty
    # pattern would silently drop the rest of the condition.
    if not value:
        raise ValueError("an empty value cannot be matched; use a non-empty value")
    # Quotes do not help: HAProxy ends an inline `{ ... }` condition at the
    # first word that reads `}` once its quotes are removed.
    if value == "}":
        raise ValueError(
            "'}' cannot be matched: HAProxy reads a lone '}' as the end of the "
            "condition"
        )
    return _check_text(value)


def _check_flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{quoted(value)} must be 'true' or 'false'")


Text = Annotated[str, AfterValidator(_check_text)]
HostName = Annotated[str, AfterValidator(_check_host)]
Token = Annotated[str, AfterValidator(_check_token)]
Method = Annotated[str, AfterValidator(_check_method)]
Millis = Annotated[int, BeforeValidator(_check_timespan)]
Timer = Annotated[int, BeforeValidator(_check_timer)]
MatchValue = Annotated[str, AfterValidator(_check_match_value)]
Flag = Annotated[bool, BeforeValidator(_check_flag)]


def _reject_unsupported(value: object) -> None:
    if value is not None:
        raise ValueError("is a YARP setting that momus-haproxy does not support")
    return None


Unsupported = Annotated[Any, AfterValidator(_reject_unsupported)]


class _Model(BaseModel):
    """Base of the document's models: frozen, no unknown keys, any key case."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _match_key_case(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        names = _field_names(cls)
        result: dict[str, Any] = {}
        for key, value in data.items():
            name = names.get(str(key).lower(), str(key))
            if name in result:
                raise ValueError(f"key {quoted(key)} is given twice in different case")
            result[name] = value
        return result


class PathTemplate(BaseModel):
    """A route's `Match.Path`, split into what HAProxy can match on.

    `kind` is `prefix` (`/api/{**rest}`; the root catch-all has prefix ``""``),
    `exact` (a literal path) or `pattern` (`{name}` segments, matched by the
    anchored case-insensitive regular expression in `regex`).
    """

    model_config = ConfigDict(frozen=True)

    template: str
    kind: Literal["prefix", "exact", "pattern"]
    prefix: str = ""
    regex: str = ""
    rank: tuple[int, ...] = ()


def _parse_path(value: object) -> PathTemplate:
    if not isinstance(value, str):
        raise ValueError(
            f"{quoted(value)} must be a path text such as '/api/{{**rest}}'"
        )
    if not _PATH_CHARS_RE.match(value) or _PERCENT_RE.search(value):
        raise ValueError(
            f"{quoted(value)} may hold only URL path characters (no spaces, quotes, "
            "'#', '?' or '\\', and '%' only as %XX)"
        )
    if len(value) > MAX_VALUE_LENGTH:
        raise ValueError(f"is longer than {MAX_VALUE_LENGTH} characters")
    template = value if value.startswith("/") else "/" + value
    segments = [s for s in template.split("/")[1:] if s]
    rank: list[int] = []
    literal: list[str] = []
    regex: list[str] = []
    for index, segment in enumerate(segments):
        param = _SEGMENT_PARAM_RE.match(segment)
        if param is None and ("{" in segment or "}" in segment):
            raise ValueError(
                f"segment {quoted(segment)}: only whole-segment '{{name}}' and "
                "'{**name}' parameters are supported"
            )
        if param is not None and param.group(1):
            if index != len(segments) - 1:
                raise ValueError(
                    f"catch-all {quoted(segment)} must be the last segment"
                )
            rank.append(2)
            break
        rank.append(1 if param else 0)
        literal.append(segment)
        regex.append("[^/]+" if param else re.escape(segment.lower()))
    has_catch_all = rank[-1:] == [2]
    joined = "/" + "/".join(literal) if literal else ""
    if 1 in rank:
        tail = "(/.*)?" if has_catch_all else "/?"
        pattern = "^" + "".join("/" + part for part in regex) + tail + "$"
        return PathTemplate(
            template=template, kind="pattern", regex=pattern, rank=tuple(rank)
        )
    if has_catch_all:
        return PathTemplate(
            template=template, kind="prefix", prefix=joined.lower(), rank=tuple(rank)
        )
    return PathTemplate(
        template=template, kind="exact", prefix=joined.lower() or "/", rank=tuple(rank)
    )


class HeaderMatch(_Model):
    """One entry of `Match.Headers`."""

    Name: Token
    Values: list[MatchValue] = Field(default_factory=list)
    Mode: Literal[
        "ExactHeader", "HeaderPrefix", "Contains", "NotContains", "Exists", "NotExists"
    ] = "ExactHeader"
    IsCaseSensitive: bool = False

    @model_validator(mode="after")
    def _values_fit_mode(self) -> HeaderMatch:
        needs_values = self.Mode not in ("Exists", "NotExists")
        if needs_values and not self.Values:
            raise ValueError(
                f"mode {quoted(self.Mode)} needs at least one value in Values"
            )
        return self


class QueryMatch(_Model):
    """One entry of `Match.QueryParameters`."""

    Name: Token
    Values: list[MatchValue] = Field(default_factory=list)
    Mode: Literal["Exact", "Contains", "NotContains", "Prefix", "Exists"] = "Exact"
    IsCaseSensitive: bool = False

    @model_validator(mode="after")
    def _values_fit_mode(self) -> QueryMatch:
        if self.Mode != "Exists" and not self.Values:
            raise ValueError(
                f"mode {quoted(self.Mode)} needs at least one value in Values"
            )
        return self


class RouteMatch(_Model):
    """A route's `Match`: which requests the route takes."""

    Hosts: list[HostName] | None = None
    Path: Annotated[PathTemplate, BeforeValidator(_parse_path)] | None = None
    Methods: list[Method] | None = None
    Headers: list[HeaderMatch] | None = None
    QueryParameters: list[QueryMatch] | None = None


class Route(_Model):
    """One entry of `Routes`."""

    RouteId: Annotated[str, Field(min_length=1, max_length=MAX_VALUE_LENGTH)]
    ClusterId: Annotated[str, Field(min_length=1, max_length=MAX_VALUE_LENGTH)]
    Order: int = 0
    Match: RouteMatch
    Transforms: list[dict[str, Any]] = Field(default_factory=list)
    Metadata: dict[str, Any] = Field(default_factory=dict)
    AuthorizationPolicy: Unsupported = None
    CorsPolicy: Unsupported = None
    RateLimiterPolicy: Unsupported = None
    OutputCachePolicy: Unsupported = None
    TimeoutPolicy: Unsupported = None
    Timeout: Unsupported = None
    MaxRequestBodySize: Unsupported = None

    @model_validator(mode="before")
    @classmethod
    def _null_order(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {
                key: 0 if str(key).lower() == "order" and value is None else value
                for key, value in data.items()
            }
        return data


def _check_address(value: str) -> str:
    _split_address(value)
    return value


def _check_health(value: str) -> str:
    url = _split_address(value)
    if url.path not in ("", "/"):
        raise ValueError(
            f"{quoted(value)}: a path in the health address is not supported; "
            "use HealthCheck.Active.Path"
        )
    # A check `addr` is resolved once, when HAProxy reads its configuration,
    # without the resolvers that let a server's own name resolve later.
    if not url.is_ip:
        raise ValueError(
            f"{quoted(value)}: a health address needs an IPv4 address such as "
            "'http://10.0.0.2:8080', as HAProxy resolves a check address only "
            "at start-up and refuses the whole configuration if that fails"
        )
    return value


class Destination(_Model):
    """One destination (server) of a cluster."""

    Address: Annotated[str, AfterValidator(_check_address)]
    Health: Annotated[str, AfterValidator(_check_health)] | None = None
    Host: Annotated[str, AfterValidator(lambda v: _check_authority(v))] | None = None
    Metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def url(self) -> DestinationAddress:
        """The parsed `Address`."""
        return _split_address(self.Address)

    @property
    def health_url(self) -> DestinationAddress | None:
        """The parsed `Health` address, when one is given."""
        return _split_address(self.Health) if self.Health else None


@dataclass(frozen=True)
class DestinationAddress:
    """A destination URL reduced to what HAProxy needs."""

    scheme: Literal["http", "https"]
    host: str
    port: int
    authority: str
    path: str

    @property
    def is_ip(self) -> bool:
        """Whether the host is an IPv4 literal (no SNI, no DNS)."""
        return re.fullmatch(r"[0-9]+(\.[0-9]+){3}", self.host) is not None


def _check_authority(value: str) -> str:
    _check_host_length(value.split(":")[0], value)
    if not _AUTHORITY_RE.match(value.lower()):
        raise ValueError(f"{quoted(value)} is not a host name with an optional :port")
    return value.lower()


def _check_host_length(host: str, value: str) -> None:
    """Refuse a host name longer than DNS allows; HAProxy's check fails on it."""
    if len(host) > MAX_HOST_LENGTH:
        raise ValueError(
            f"{quoted(value)}: the host name is longer than {MAX_HOST_LENGTH} "
            "characters"
        )


def _check_ipv4(host: str, value: str) -> None:
    """Refuse a host of digits and dots that is not a dotted IPv4 address.

    libc would read `1234` or `010.0.0.1` as some other address, and HAProxy
    would try to resolve `999.999.999.999` as a name.
    """
    if not _NUMERIC_HOST_RE.match(host):
        return
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(
            f"{quoted(value)}: {quoted(host)} is not a valid IPv4 address "
            "(four numbers from 0 to 255, without leading zeros)"
        ) from None


@functools.cache
def _field_names(model: type[BaseModel]) -> dict[str, str]:
    """`model`'s field names by their lower-case form."""
    return {name.lower(): name for name in model.model_fields}


# A destination's address is read several times per render (validation,
# servers, checks): parse each distinct string once. Bad ones raise, and an
# exception is not cached.
@functools.lru_cache(maxsize=65536)
def _split_address(value: str) -> DestinationAddress:
    if _CONTROL_RE.search(value) or " " in value or "\\" in value:
        raise ValueError(f"{quoted(value)} must be one URL without spaces")
    parts = urlsplit(value.strip())
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{quoted(value)} must be an http:// or https:// URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(
            f"{quoted(value)} must not carry user info, a query or a fragment"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{quoted(value)} has a port outside 1-65535") from exc
    host = (parts.hostname or "").lower()
    authority = parts.netloc.lower()
    _check_host_length(host, value)
    if not _AUTHORITY_RE.match(authority) or port == 0:
        raise ValueError(
            f"{quoted(value)} needs a host name or IPv4 address and a port in 1-65535"
        )
    _check_ipv4(host, value)
    if parts.path not in ("", "/"):
        raise ValueError(
            f"{quoted(value)}: a path in a destination address is not supported"
        )
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    default = 443 if scheme == "https" else 80
    return DestinationAddress(scheme, host, port or default, authority, parts.path)


class ActiveHealthCheck(_Model):
    """`HealthCheck.Active`: periodic probes of every destination."""

    Enabled: bool = False
    Interval: Timer | None = None
    Timeout: Timer | None = None
    Policy: Literal["ConsecutiveFailures"] | None = None
    Path: Annotated[str, AfterValidator(lambda v: _check_probe_path(v))] | None = None
    Query: Unsupported = None


def _check_probe_path(value: str) -> str:
    template = _parse_path(value)
    if template.kind != "exact":
        raise ValueError(f"{quoted(value)} must be a literal path such as '/health'")
    return template.template


class PassiveHealthCheck(_Model):
    """`HealthCheck.Passive`: mark a destination down after failed requests."""

    Enabled: bool = False
    Policy: Literal["TransportFailureRate"] | None = None
    ReactivationPeriod: Timer | None = None


class HealthCheckConfig(_Model):
    """A cluster's `HealthCheck`."""

    Active: ActiveHealthCheck | None = None
    Passive: PassiveHealthCheck | None = None
    AvailableDestinationsPolicy: Unsupported = None


class AffinityCookie(_Model):
    """`SessionAffinity.Cookie`: attributes of the affinity cookie."""

    Domain: Annotated[str, AfterValidator(lambda v: _check_domain(v))] | None = None
    HttpOnly: bool = True
    SecurePolicy: Literal["SameAsRequest", "Always", "None"] = "SameAsRequest"
    SameSite: Literal["Unspecified", "Lax", "Strict", "None"] = "Unspecified"
    MaxAge: Millis | None = None
    Path: Unsupported = None
    Expiration: Unsupported = None
    IsEssential: bool | None = None


def _check_domain(value: str) -> str:
    host = _check_host(value)
    if host.startswith("*."):
        raise ValueError(
            f"{quoted(value)}: a cookie domain is a host name such as 'example.com', "
            "not a wildcard"
        )
    return host


class AffinityConfig(_Model):
    """A cluster's `SessionAffinity`, supported with cookies."""

    Enabled: bool = False
    Policy: Literal["Cookie", "HashCookie", "ArrCookie"] = "HashCookie"
    FailurePolicy: Literal["Redistribute", "Return503Error"] = "Redistribute"
    AffinityKeyName: Token = ".Yarp.Affinity"
    Cookie: AffinityCookie | None = None


class HttpRequestConfig(_Model):
    """A cluster's `HttpRequest` settings."""

    ActivityTimeout: Timer | None = None
    Version: Literal["1.0", "1.1"] | None = None
    VersionPolicy: Unsupported = None
    AllowResponseBuffering: Unsupported = None


class HttpClientConfig(_Model):
    """A cluster's `HttpClient` settings."""

    MaxConnectionsPerServer: Annotated[int, Field(ge=1, le=100000)] | None = None
    DangerousAcceptAnyServerCertificate: bool = False
    SslProtocols: Unsupported = None
    EnableMultipleHttp2Connections: Unsupported = None
    RequestHeaderEncoding: Unsupported = None
    ResponseHeaderEncoding: Unsupported = None
    WebProxy: Unsupported = None


LoadBalancing = Literal[
    "PowerOfTwoChoices", "FirstAlphabetical", "Random", "RoundRobin", "LeastRequests"
]


class Cluster(_Model):
    """One entry of `Clusters`."""

    ClusterId: Annotated[str, Field(min_length=1, max_length=MAX_VALUE_LENGTH)]
    Destinations: dict[str, Destination] = Field(default_factory=dict)
    LoadBalancingPolicy: LoadBalancing = "PowerOfTwoChoices"
    SessionAffinity: AffinityConfig | None = None
    HealthCheck: HealthCheckConfig | None = None
    HttpRequest: HttpRequestConfig | None = None
    HttpClient: HttpClientConfig | None = None
    Metadata: dict[str, Any] = Field(default_factory=dict)


class _DocumentModel(_Model):
    Routes: list[Route] = Field(default_factory=list)
    Clusters: list[Cluster] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_empty(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: [] if value is None else value for key, value in data.items()}
        return data


@dataclass(frozen=True)
class Document:
    """A validated routing document, with any warnings found on the way."""

    routes: tuple[Route, ...]
    clusters: tuple[Cluster, ...]
    warnings: tuple[Issue, ...] = field(default=())

    def cluster(self, cluster_id: str) -> Cluster:
        """Return the cluster with this id (validation made sure it exists)."""
        return next(c for c in self.clusters if c.ClusterId == cluster_id)


def parse_document(data: bytes | str) -> Document:
    """Parse and validate a routing document, raising `DocumentError` if refused."""
    value = load_json(data)
    if not isinstance(value, dict):
        raise DocumentError(
            [Issue("", f"the document must be a JSON object, not {described(value)}")]
        )
    references = _reference_issues(value)
    try:
        model = _DocumentModel.model_validate(value)
    except ValidationError as exc:
        issues = _issues_from(exc)
        raise DocumentError(sorted(issues + references, key=_issue_order)) from None
    issues, warnings = _cross_check(model)
    issues = sorted(issues + references, key=_issue_order)
    if issues:
        raise DocumentError(issues)
    return Document(tuple(model.Routes), tuple(model.Clusters), _collapsed(warnings))


def _collapsed(warnings: list[Issue]) -> tuple[Issue, ...]:
    """Keep the first `SUMMARY_ISSUES` warnings and count the rest in one more.

    A document with thousands of unknown metadata keys would otherwise log a
    line for each of them, at every revision.
    """
    more = len(warnings) - SUMMARY_ISSUES
    if more <= 0:
        return tuple(warnings)
    return (*warnings[:SUMMARY_ISSUES], Issue("", f"and {more} more warnings"))


def load_json(data: bytes | str) -> Any:
    """Read a document's JSON text, refusing it with `DocumentError` if malformed."""
    if len(data) > MAX_DOCUMENT_BYTES:
        limit = MAX_DOCUMENT_BYTES // (1024 * 1024)
        raise DocumentError(
            [Issue("", f"the document is {len(data)} bytes; the limit is {limit} MiB")]
        )
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(
            text,
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
            parse_int=_whole_number,
            parse_float=_finite_number,
        )
    except UnicodeDecodeError as exc:
        problem = f"the document is not UTF-8 text (byte {exc.start})"
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        problem = f"the document is not valid JSON: {exc.msg} at {where}"
        if not exc.doc.strip():
            problem = "the document is empty; an empty routing table is " + (
                '{"Routes": [], "Clusters": []}'
            )
    except RecursionError:
        problem = "the document is not valid JSON: it is nested too deeply"
    except _NumberTooLargeError as exc:
        problem = f"the document holds {exc}"
    except ValueError as exc:
        problem = f"the document is not valid JSON: {exc}"
    raise DocumentError([Issue("", problem)])


class _NumberTooLargeError(ValueError):
    """A JSON number too large to be read as a number."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value; write a number or a string")


def _whole_number(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_NUMBER_DIGITS:
        raise _NumberTooLargeError(
            f"a number of {digits} digits, too large to read; "
            f"the limit is {MAX_NUMBER_DIGITS} digits"
        )
    return int(text)


def _finite_number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NumberTooLargeError(f"the number {quoted(text)}, too large to read")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {quoted(key)} appears twice in one object")
        result[key] = value
    return result


def _issues_from(exc: ValidationError) -> list[Issue]:
    issues = []
    for error in exc.errors(include_url=False):
        path = format_location(tuple(error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "is required"
        elif error["type"] == "extra_forbidden":
            message = "is not a field momus-haproxy knows; remove it or fix its name"
        elif error["type"] == "literal_error":
            message = f"{quoted(error['input'])} is not one of: {_expected(error)}"
        elif error["type"] in _JSON_TYPES:
            wanted = _JSON_TYPES[error["type"]]
            message = f"must be {wanted}, not {described(error['input'])}"
        elif "input" in error and not isinstance(error["input"], dict | list):
            message = _with_input(message, quoted(error["input"]))
        issues.append(Issue(path, message))
    return issues


def _with_input(message: str, shown: str) -> str:
    """Start a message with the value at fault, unless it already does."""
    if message.startswith(shown):
        return message
    return f"{shown}: {message[:1].lower()}{message[1:]}"


_JSON_TYPES = {
    "int_type": "a whole number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
}
"""Pydantic's type errors, and the JSON value each field wanted."""


def _expected(error: Any) -> str:
    return str(error.get("ctx", {}).get("expected", "")).replace("'", "")


def _issue_order(issue: Issue) -> tuple[Any, ...]:
    parts = re.split(r"\[(\d+)\]", issue.path)
    return tuple((int(p), "") if p.isdigit() else (-1, p) for p in parts)


def _field(item: Any, name: str) -> Any:
    if not isinstance(item, dict):
        return None
    return next((v for k, v in item.items() if str(k).lower() == name.lower()), None)


def _reference_issues(value: dict[str, Any]) -> list[Issue]:
    """Check ids and cluster references on the raw JSON, so they are reported
    together with any field errors."""
    routes = _field(value, "Routes")
    clusters = _field(value, "Clusters")
    routes = routes if isinstance(routes, list) else []
    clusters = clusters if isinstance(clusters, list) else []
    issues: list[Issue] = []
    cluster_ids = _unique(clusters, "ClusterId", "Clusters", issues)
    _unique(routes, "RouteId", "Routes", issues)
    for index, route in enumerate(routes):
        cluster_id = _field(route, "ClusterId")
        if isinstance(cluster_id, str) and cluster_id not in cluster_ids:
            issues.append(
                Issue(f"Routes[{index}].ClusterId", f"no cluster {quoted(cluster_id)}")
            )
    return issues


def _cross_check(model: _DocumentModel) -> tuple[list[Issue], list[Issue]]:
    from .transforms import check_transforms

    issues: list[Issue] = []
    warnings: list[Issue] = []
    for index, route in enumerate(model.Routes):
        where = f"Routes[{index}]"
        if not route.Match.Hosts and route.Match.Path is None:
            issues.append(Issue(f"{where}.Match", "needs Hosts or Path, or both"))
        if (words := _match_words(route.Match)) > MAX_MATCH_WORDS:
            issues.append(
                Issue(
                    f"{where}.Match",
                    f"its Methods, Headers and QueryParameters take {words} words "
                    f"in one HAProxy rule, where {MAX_MATCH_WORDS} fit; use fewer "
                    "values or split the route",
                )
            )
        issues += check_transforms(route.Transforms, f"{where}.Transforms")
        warnings += _route_metadata(route, where, issues)
    for index, cluster in enumerate(model.Clusters):
        issues += _cluster_problems(cluster, f"Clusters[{index}]")
        warnings += _unknown_metadata(cluster.Metadata, f"Clusters[{index}]", set())
    return issues, warnings


def _unique(items: list[Any], key: str, where: str, issues: list[Issue]) -> set[str]:
    seen: set[str] = set()
    for index, item in enumerate(items):
        value = _field(item, key)
        if not isinstance(value, str):
            continue
        if value in seen:
            issues.append(
                Issue(f"{where}[{index}].{key}", f"{quoted(value)} is used twice")
            )
        seen.add(value)
    return seen


ROUTE_METADATA = {"RedirectWww", "UseOriginalHostHeader"}
CLUSTER_METADATA = {"ConsecutiveFailuresHealthPolicy.Threshold"}


def _route_metadata(route: Route, where: str, issues: list[Issue]) -> list[Issue]:
    for name in ROUTE_METADATA:
        value = route_flag(route, name)
        if value is None:
            issues.append(
                Issue(f"{where}.Metadata.{name}", "must be 'true' or 'false'")
            )
    return _unknown_metadata(route.Metadata, where, ROUTE_METADATA)


def _unknown_metadata(
    metadata: dict[str, Any], where: str, known: set[str]
) -> list[Issue]:
    known = known | CLUSTER_METADATA
    return [
        Issue(f"{where}.Metadata{path_step(name)}", "is not used by momus-haproxy")
        for name in sorted(metadata)
        if name not in known
    ]


def route_flag(route: Route, name: str) -> bool | None:
    """Read a true/false metadata flag of a route; None when it is malformed."""
    value = route.Metadata.get(name, "false")
    try:
        return _check_flag(value)
    except ValueError:
        return None


def _cluster_problems(cluster: Cluster, where: str) -> list[Issue]:
    issues: list[Issue] = []
    servers: dict[str, str] = {}
    for name, destination in sorted(cluster.Destinations.items()):
        path = f"{where}.Destinations{format_location((name,))}"
        if not name or len(name) > MAX_VALUE_LENGTH:
            issues.append(Issue(path, "a destination needs a name"))
        server = destination.Host or destination.url.authority
        if server in servers:
            issues.append(
                Issue(
                    f"{path}.Address",
                    f"{quoted(server)} is also the address of destination "
                    f"{quoted(servers[server])}; give each destination its own address",
                )
            )
        servers[server] = name
    issues += _threshold_problems(cluster, where)
    return issues


def _threshold_problems(cluster: Cluster, where: str) -> list[Issue]:
    # A key given as null is given: the renderer reads it, not its default.
    name = "ConsecutiveFailuresHealthPolicy.Threshold"
    if name not in cluster.Metadata or _is_threshold(cluster.Metadata[name]):
        return []
    shown = described(cluster.Metadata[name])
    return [
        Issue(
            f"{where}.Metadata.{name}",
            f"must be a whole number from 1 to 999999999, not {shown}",
        )
    ]


def _is_threshold(value: object) -> bool:
    # str.isdigit() also takes digits such as '²' that int() refuses.
    text = str(value)
    return re.fullmatch(r"[0-9]{1,9}", text) is not None and int(text) >= 1


def _match_words(match: RouteMatch) -> int:
    """Count the words a route's methods, headers and query tests take in its rule."""
    words = 3 + len(set(match.Methods)) if match.Methods else 0
    for item in (*(match.Headers or ()), *(match.QueryParameters or ())):
        words += 7 + len(item.Values)
    return words
