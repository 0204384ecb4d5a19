"""Render a validated document into HAProxy's configuration and map files.

Routing is looked up, not scanned, so its per-request cost does not grow with
the number of routes:

1. The lower-cased Host (without port) is looked up in `hosts.map`, then in
   one wildcard map per wildcard depth, to find the request's *site*: the set
   of routes that can take requests for that host.
2. For a site whose routes match on path alone (a literal path or a prefix
   ending in `{**catch-all}`), `site + path` is looked up in `paths.map`
   (exact) and then `prefixes.map` (longest prefix, a tree in HAProxy).
3. Sites with routes that match on methods, headers, query parameters or
   `{name}` segments get one rule per route, in YARP's order of precedence.

Each route's transforms are written as rules guarded by the route's name; a
cluster becomes a backend. Map files carry a hash of their content in their
name, so a configuration always refers to exactly the maps it was rendered
with, whatever happens between writing the files and the reload.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from .document import Cluster, Document, Route, route_flag
from .errors import RenderError
from .transforms import Transform, parse_transforms

__all__ = [
    "DEFAULT_TEMPLATES",
    "RenderSettings",
    "Rendered",
    "config_quote",
    "log_format_quote",
    "render",
]

DEFAULT_TEMPLATES = Path(__file__).parent / "templates"
if not DEFAULT_TEMPLATES.is_dir():  # running from a source checkout
    DEFAULT_TEMPLATES = Path(__file__).parent.parent / "templates"

_BIND_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]*):[0-9]{1,5}\Z")


@dataclass(frozen=True)
class RenderSettings:
    """The parts of haproxy.cfg that do not come from the document."""

    http_bind: str = "127.0.0.1:8080"
    stats_bind: str | None = "127.0.0.1:8404"
    maxconn: int = 4096
    timeout_connect: str = "5s"
    timeout_client: str = "60s"
    timeout_server: str = "100s"
    timeout_http_request: str = "10s"
    timeout_keep_alive: str = "10s"
    timeout_tunnel: str = "1h"
    hard_stop_after: str = "5m"
    max_reloads: int = 50
    server_state_file: str | None = None
    templates_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("http_bind", "stats_bind"):
            value = getattr(self, name)
            if value is not None and not _BIND_RE.match(value):
                raise RenderError(
                    f"{name.replace('_', '-')} {value!r} must look like "
                    "'ADDRESS:PORT', for example '0.0.0.0:80'"
                )


@dataclass(frozen=True)
class Rendered:
    """A rendered configuration: file names relative to the config directory."""

    files: dict[str, str]

    @property
    def config(self) -> str:
        """The text of haproxy.cfg."""
        return self.files["haproxy.cfg"]

    @property
    def digest(self) -> str:
        """A hash of every file, to tell whether two renders differ."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name].encode() + b"\0")
        return digest.hexdigest()


def config_quote(value: str) -> str:
    """Quote a string as one HAProxy configuration word, with nothing expanded.

    Single quotes turn off every escape and variable in HAProxy's parser; a
    single quote inside the value is written as a double-quoted `'`.
    """
    return "'" + value.replace("'", "'\"'\"'") + "'"


def log_format_quote(value: str) -> str:
    """Quote a literal for an argument HAProxy reads as a log-format string."""
    return config_quote(value.replace("%", "%%"))


@functools.lru_cache(maxsize=65536)  # the same ids come back with every render
def safe_name(prefix: str, ident: str) -> str:
    """Derive an HAProxy object name from a document id of any content."""
    slug = re.sub(r"[^a-z0-9]+", "-", ident.lower()).strip("-")[:24]
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    return f"{prefix}{slug}-{digest}" if slug else f"{prefix}{digest}"


def unique_names(prefix: str, idents: list[str]) -> dict[str, str]:
    """Name each id with `safe_name`, lengthening the digest where two clash.

    Ids that share their first 24 letters and digits differ only by 32 bits
    of digest, and among 100,000 such ids a clash is likely; two routes with
    one name would silently share their rules and their backend.
    """
    names = {ident: safe_name(prefix, ident) for ident in idents}
    counts = Counter(names.values())
    for ident, name in names.items():
        if counts[name] > 1:
            longer = hashlib.sha256(ident.encode()).hexdigest()[8:24]
            names[ident] = f"{name}-{longer}"
    return names


@dataclass
class _Site:
    name: str
    routes: list[Route]
    simple: bool = False


@dataclass
class _Plan:
    hosts: dict[str, str] = field(default_factory=dict)
    wildcards: dict[int, dict[str, str]] = field(default_factory=dict)
    default_site: str | None = None
    paths: dict[str, str] = field(default_factory=dict)
    prefixes: dict[str, str] = field(default_factory=dict)
    rules: list[dict[str, Any]] = field(default_factory=list)
    acls: dict[str, str] = field(default_factory=dict)
    backends_map: dict[str, str] = field(default_factory=dict)


def render(document: Document, settings: RenderSettings | None = None) -> Rendered:
    """Render `document` into haproxy.cfg and its map files."""
    settings = settings or RenderSettings()
    routes = sorted(document.routes, key=lambda r: r.RouteId)
    names = unique_names("r-", [route.RouteId for route in routes])
    plan = _Plan()
    _plan_sites(routes, names, plan)
    backends = _plan_backends(document, routes, names, plan)
    maps = {
        "hosts": _map_text(plan.hosts),
        "paths": _map_text(plan.paths),
        "prefixes": _map_text(plan.prefixes),
        "backends": _map_text(plan.backends_map),
    }
    for depth, entries in plan.wildcards.items():
        maps[f"wildcards{depth}"] = _map_text(entries)
    files = {_map_file(name, text): text for name, text in maps.items()}
    map_paths = {name: _map_file(name, text) for name, text in maps.items()}
    context = {
        "settings": settings,
        "maps": map_paths,
        "wildcard_depths": sorted(plan.wildcards, reverse=True),
        "default_site": plan.default_site,
        "rules": plan.rules,
        "acls": plan.acls,
        "actions": _route_actions(routes, names),
        "backends": backends,
    }
    files["haproxy.cfg"] = _template(settings).render(context)
    return Rendered(files)


def _map_file(name: str, text: str) -> str:
    return f"maps/{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.map"


def _map_text(entries: dict[str, str]) -> str:
    return "".join(f"{key} {entries[key]}\n" for key in sorted(entries))


def _template(settings: RenderSettings) -> jinja2.Template:
    return _load_template(settings.templates_dir or DEFAULT_TEMPLATES)


class _Environment(jinja2.Environment):
    """Reads `a.b` on a plain dict as the key `b` first.

    The template reads its context (plain dicts) about 20 times per route;
    Jinja's own order, attribute first, pays for an AttributeError on each,
    which was a quarter of the render at 10,000 routes.
    """

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


@functools.lru_cache(maxsize=8)
def _load_template(directory: Path) -> jinja2.Template:
    environment = _Environment(
        loader=jinja2.FileSystemLoader(str(directory)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # the output is HAProxy configuration, not HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["q"] = config_quote
    environment.filters["lf"] = log_format_quote
    try:
        return environment.get_template("haproxy.cfg.j2")
    except jinja2.TemplateError as exc:
        raise RenderError(
            f"cannot load template from {str(directory)!r}: {exc}"
        ) from exc


# Sites ---------------------------------------------------------------------


def _plan_sites(routes: list[Route], names: dict[str, str], plan: _Plan) -> None:
    exact: set[str] = set()
    wild: set[str] = set()
    for route in routes:
        for host in route.Match.Hosts or ():
            (wild if host.startswith("*.") else exact).add(host.removeprefix("*"))
    sites: dict[tuple[str, ...], _Site] = {}

    def site_for(members: list[Route], host: str) -> str:
        key = tuple(sorted(names[r.RouteId] for r in members))
        if key not in sites:
            digest = hashlib.sha256(" ".join(key).encode()).hexdigest()[:10]
            ordered = sorted(members, key=lambda r: _precedence(r, host))
            sites[key] = _Site(f"s{digest}", ordered)
        return sites[key].name

    index = _host_index(routes)
    for host in sorted(exact):
        if members := _routes_for(routes, index, host):
            plan.hosts[host] = site_for(members, host)
    for suffix in sorted(wild):
        depth = suffix.count(".")
        plan.wildcards.setdefault(depth, {})[suffix] = site_for(
            _routes_for(routes, index, "*" + suffix), "*" + suffix
        )
    hostless = [r for r in routes if not r.Match.Hosts]
    if hostless:
        plan.default_site = site_for(hostless, "")
    _plan_redirects(routes, exact, plan)
    for site in sorted(sites.values(), key=lambda s: s.name):
        _plan_site(site, names, plan)


def _host_index(routes: list[Route]) -> dict[str, set[int]]:
    """Map each host pattern to the positions of the routes that list it.

    Hostless routes are filed under ``""``. Looking hosts up here keeps
    planning linear in the number of routes; scanning every route for every
    host took minutes at 10,000 routes.
    """
    index: dict[str, set[int]] = {}
    for position, route in enumerate(routes):
        for pattern in route.Match.Hosts or ("",):
            index.setdefault(pattern, set()).add(position)
    return index


def _routes_for(
    routes: list[Route], index: dict[str, set[int]], host: str
) -> list[Route]:
    """The routes that take `host`: hostless ones, its own, and wildcards over it."""
    positions = index.get("", set()) | index.get(host, set())
    for dot, char in enumerate(host):
        if char == "." and dot > 0:
            positions |= index.get("*" + host[dot:], set())
    return [routes[position] for position in sorted(positions)]


def _host_rank(route: Route, host: str) -> int:
    """0 for an exact match of `host`, 1 for a wildcard covering it, 9 for none."""
    best = 9
    for pattern in route.Match.Hosts or ():
        if pattern == host:
            return 0
        suffix = pattern.removeprefix("*")
        if pattern.startswith("*.") and host.endswith(suffix) and host != suffix:
            best = min(best, 1)
    return best


def _wildcard_length(route: Route, host: str) -> int:
    lengths = [
        len(p)
        for p in route.Match.Hosts or ()
        if p.startswith("*.") and host.endswith(p[1:]) and host != p[1:]
    ]
    return max(lengths, default=0)


def _precedence(route: Route, host: str) -> tuple[Any, ...]:
    match = route.Match
    rank = match.Path.rank if match.Path else (2,)
    host_rank = _host_rank(route, host) if match.Hosts else 2
    return (
        route.Order,
        rank,
        host_rank,
        -_wildcard_length(route, host),
        0 if match.Methods else 1,
        -len(match.Headers or ()),
        -len(match.QueryParameters or ()),
        route.RouteId,
    )


def _plan_redirects(routes: list[Route], exact: set[str], plan: _Plan) -> None:
    for route in routes:
        if not route_flag(route, "RedirectWww"):
            continue
        for host in route.Match.Hosts or ():
            www = "www." + host
            if host.startswith(("*.", "www.")) or www in exact:
                continue
            plan.hosts[www] = "@www"


def _is_simple(route: Route) -> bool:
    match = route.Match
    kind = match.Path.kind if match.Path else "prefix"
    plain = not (match.Methods or match.Headers or match.QueryParameters)
    return plain and kind != "pattern"


def _plan_site(site: _Site, names: dict[str, str], plan: _Plan) -> None:
    orders = {route.Order for route in site.routes}
    site.simple = len(orders) == 1 and all(_is_simple(r) for r in site.routes)
    if not site.simple:
        for route in site.routes:
            plan.rules.append(_rule(site.name, route, names[route.RouteId], plan))
        return
    for route in site.routes:
        name = names[route.RouteId]
        path = route.Match.Path
        prefix = path.prefix if path else ""
        if path is not None and path.kind == "exact":
            keys = {prefix, prefix.rstrip("/") + "/"}
            starts: set[str] = set()
        else:
            keys = {prefix} if prefix else set()
            starts = {prefix + "/"}
        for key in keys:
            plan.paths.setdefault(site.name + key, name)
        for key in starts:
            plan.prefixes.setdefault(site.name + key, name)


def _rule(site: str, route: Route, name: str, plan: _Plan) -> dict[str, Any]:
    conditions = [f"{{ var(txn.site) -m str {site} }}"]
    path = route.Match.Path
    if path is not None and path.kind == "prefix" and path.prefix:
        plan.acls[f"{name}-path"] = path.prefix
        conditions.append(f"{name}-path")
    conditions += _route_conditions(route)
    return {"route": name, "conditions": conditions}


def _route_conditions(route: Route) -> list[str]:
    match = route.Match
    conditions = []
    path = match.Path
    if path is not None and path.kind == "pattern":
        conditions.append(f"{{ var(txn.path) -m reg {config_quote(path.regex)} }}")
    elif path is not None and path.kind == "exact":
        values = _words({path.prefix, path.prefix.rstrip("/") + "/"})
        conditions.append(f"{{ var(txn.path) -m str -- {values} }}")
    if match.Methods:
        conditions.append(f"{{ method {' '.join(sorted(set(match.Methods)))} }}")
    for header in match.Headers or ():
        conditions.append(_header_condition(header))
    for query in match.QueryParameters or ():
        conditions.append(_query_condition(query))
    return conditions


def _words(values: Iterable[str]) -> str:
    return " ".join(config_quote(v) for v in sorted(values))


_MATCH_METHODS = {
    "ExactHeader": "str",
    "HeaderPrefix": "beg",
    "Exact": "str",
    "Prefix": "beg",
    "Contains": "sub",
    "NotContains": "sub",
}
# One pair of double quotes around an item of a header's list.
_UNQUOTE = r'regsub("^\"(.*)\"$","\\1")'
# ASP.NET Core decodes a query value leniently: a `%` that starts no escape
# stays as it is. HAProxy's url_dec refuses such a value, so those `%` are
# escaped first, in two steps that need no look-ahead (POSIX regex too), and
# the value is then decoded as a form, `+` being a space.
_QUERY_DECODE = r'regsub(%,%25,g),regsub("%25([0-9A-Fa-f]{2})","%\\1",g),url_dec(1)'
# What is special in a regular expression, PCRE's or POSIX's, outside brackets.
_REGEX_SPECIAL_RE = re.compile(r"([.\[\]{}()\\*+?^$|])")


def _header_condition(header: Any) -> str:
    """One ACL test for a `Match.Headers` entry, with YARP's semantics.

    YARP reads Contains and NotContains on each whole header line, and
    ExactHeader and HeaderPrefix on each item of the comma-separated list
    (`;`-separated for Cookie), each item without its leading spaces or one
    pair of surrounding quotes. Exists needs a non-empty value and NotExists
    is its opposite; NotContains also takes a request without the header.
    """
    name = header.Name
    if header.Mode in ("Exists", "NotExists"):
        negate = "!" if header.Mode == "NotExists" else ""
        return f"{negate}{{ req.fhdr({name}) -m len 1: }}"
    if header.Mode in ("Contains", "NotContains"):
        return _test(f"req.fhdr({name})", "sub", header, header.Values)
    if name.lower() == "cookie":
        patterns = _cookie_patterns(header.Values, header.Mode == "HeaderPrefix")
        return _test("req.fhdr(cookie)", "reg", header, patterns)
    # Without an occurrence, req.hdr gives each item of the list in turn.
    fetch = config_quote(f"req.hdr({name}),{_UNQUOTE}")
    return _test(fetch, _MATCH_METHODS[header.Mode], header, header.Values)


def _cookie_patterns(values: Iterable[str], prefix: bool) -> list[str]:
    """Regular expressions that find a value among the `;`-separated cookies.

    HAProxy splits header values at commas only, so the Cookie line is
    searched for an item that equals (or starts with) the value, bare or
    between quotes. The value is escaped to match literally.
    """
    patterns = []
    for value in values:
        text = _REGEX_SPECIAL_RE.sub(r"\\\1", value)
        if prefix:
            patterns.append(f'(^|;) *({text}|"{text}[^;]*"(;|$))')
        else:
            patterns.append(f'(^|;) *({text}|"{text}")(;|$)')
    return patterns


def _query_condition(query: Any) -> str:
    """One ACL test for a `Match.QueryParameters` entry, on decoded values.

    As in YARP, any occurrence of the parameter may match; Exists needs a
    non-empty value, and NotContains also takes a request without one.
    """
    if query.Mode == "Exists":
        return f"{{ url_param({query.Name}) -m len 1: }}"
    fetch = config_quote(f"url_param({query.Name}),{_QUERY_DECODE}")
    return _test(fetch, _MATCH_METHODS[query.Mode], query, query.Values)


def _test(fetch: str, method: str, item: Any, values: Iterable[str]) -> str:
    """`{ FETCH -m METHOD [-i] -- VALUES }`, negated for NotContains."""
    flags = "" if item.IsCaseSensitive else " -i"
    test = f"{fetch} -m {method}{flags} -- {_words(values)}"
    return ("!" if item.Mode == "NotContains" else "") + f"{{ {test} }}"


# Route actions ---------------------------------------------------------------


def _original_host(route: Route) -> bool:
    steps = parse_transforms(route.Transforms)
    for step in reversed(steps):
        if step.kind == "RequestHeaderOriginalHost":
            return step.value == "true"
    return bool(route_flag(route, "UseOriginalHostHeader"))


def _route_actions(routes: list[Route], names: dict[str, str]) -> list[dict[str, Any]]:
    actions = []
    for route in routes:
        steps = [
            s
            for s in parse_transforms(route.Transforms)
            if s.kind != "RequestHeaderOriginalHost"
        ]
        if steps:
            actions.append(
                {
                    "route": names[route.RouteId],
                    "steps": [_step(step) for step in steps],
                    "forwarded": next(
                        (s for s in steps if s.kind == "X-Forwarded"), None
                    ),
                }
            )
    return actions


def _step(step: Transform) -> dict[str, Any]:
    text = {"kind": step.kind, "name": step.name, "when": step.when}
    if step.kind == "PathRemovePrefix":
        prefix = step.name.rstrip("/").lower()
        text.update(prefix=prefix, length=str(len(prefix)))
    text["value"] = step.value
    text["action"] = step.action
    return {**text, "step": step}


# Backends --------------------------------------------------------------------

_BALANCE = {
    "PowerOfTwoChoices": "random(2)",
    "Random": "random(1)",
    "RoundRobin": "roundrobin",
    "LeastRequests": "leastconn",
    "FirstAlphabetical": "first",
}


def _plan_backends(
    document: Document, routes: list[Route], names: dict[str, str], plan: _Plan
) -> list[dict[str, Any]]:
    original = {route.RouteId: _original_host(route) for route in routes}
    modes: dict[str, set[bool]] = {}
    for route in routes:
        modes.setdefault(route.ClusterId, set()).add(original[route.RouteId])
    bases = unique_names("c-", [cluster.ClusterId for cluster in document.clusters])
    check_hosts = _original_check_hosts(routes, original)
    backends = []
    for cluster in sorted(document.clusters, key=lambda c: c.ClusterId):
        base = bases[cluster.ClusterId]
        used = modes.get(cluster.ClusterId, {False})
        primary_original = used == {True}
        check_host = _check_host(cluster, check_hosts)
        backends.append(_backend(cluster, base, primary_original, check_host, None))
        if len(used) == 2:
            backends.append(_backend(cluster, base + "-oh", True, check_host, base))
    for route in routes:
        base = bases[route.ClusterId]
        used = modes[route.ClusterId]
        suffix = "-oh" if len(used) == 2 and original[route.RouteId] else ""
        plan.backends_map[names[route.RouteId]] = base + suffix
    return backends


def _backend(
    cluster: Cluster,
    name: str,
    original_host: bool,
    check_host: str,
    tracks: str | None,
) -> dict[str, Any]:
    active = cluster.HealthCheck.Active if cluster.HealthCheck else None
    passive = cluster.HealthCheck.Passive if cluster.HealthCheck else None
    checks = bool(active and active.Enabled)
    passive_on = bool(passive and passive.Enabled)
    threshold = cluster.Metadata.get("ConsecutiveFailuresHealthPolicy.Threshold", 2)
    servers = _servers(cluster, checks, passive_on, tracks)
    return {
        "name": name,
        "comment": json.dumps(cluster.ClusterId),
        "balance": _BALANCE[cluster.LoadBalancingPolicy],
        "send_host": not original_host,
        "checks": checks and tracks is None,
        "check_path": (active.Path if active and active.Path else "/"),
        "check_host": check_host,
        "check_interval": active.Interval if active and active.Interval else 15000,
        "check_timeout": active.Timeout if active and active.Timeout else 10000,
        "fall": int(threshold),
        "passive_period": (passive.ReactivationPeriod or 120000) if passive else 0,
        "passive": passive_on,
        "affinity": _affinity(cluster),
        "server_timeout": (
            cluster.HttpRequest.ActivityTimeout if cluster.HttpRequest else None
        ),
        "maxconn": (
            cluster.HttpClient.MaxConnectionsPerServer if cluster.HttpClient else None
        ),
        "servers": servers,
    }


def _servers(
    cluster: Cluster, checks: bool, passive: bool, tracks: str | None
) -> list[dict[str, Any]]:
    insecure = bool(
        cluster.HttpClient and cluster.HttpClient.DangerousAcceptAnyServerCertificate
    )
    first = cluster.LoadBalancingPolicy == "FirstAlphabetical"
    servers = []
    for index, (dest_name, destination) in enumerate(
        sorted(cluster.Destinations.items())
    ):
        url = destination.url
        health = destination.health_url
        name = destination.Host or url.authority
        servers.append(
            {
                "name": name,
                "comment": json.dumps(dest_name),
                "address": f"{url.host}:{url.port}",
                "resolve": not url.is_ip,
                "tls": url.scheme == "https",
                "verify": not insecure,
                "sni": None if url.is_ip else url.host,
                "check": checks or passive,
                "track": f"{tracks}/{name}" if tracks and (checks or passive) else None,
                "health": health,
                "cookie": hashlib.sha256(dest_name.encode()).hexdigest()[:12],
                "backup": first and index > 0,
            }
        )
    return servers


def _original_check_hosts(
    routes: list[Route], original: dict[str, bool]
) -> dict[str, str]:
    """Per cluster, the first exact host of its first route keeping the Host."""
    found: dict[str, str] = {}
    for route in routes:
        if route.ClusterId in found or not original[route.RouteId]:
            continue
        exact = sorted(h for h in route.Match.Hosts or () if not h.startswith("*."))
        if exact:
            found[route.ClusterId] = exact[0]
    return found


def _check_host(cluster: Cluster, original: dict[str, str]) -> str:
    if cluster.ClusterId in original:
        return original[cluster.ClusterId]
    for _name, destination in sorted(cluster.Destinations.items()):
        return destination.Host or destination.url.authority
    return "localhost"


def _affinity(cluster: Cluster) -> dict[str, Any] | None:
    affinity = cluster.SessionAffinity
    if affinity is None or not affinity.Enabled:
        return None
    cookie = affinity.Cookie
    words = [affinity.AffinityKeyName, "insert", "indirect", "nocache"]
    if cookie is None or cookie.HttpOnly:
        words.append("httponly")
    if cookie is not None and cookie.SecurePolicy == "Always":
        words.append("secure")
    if cookie is not None and cookie.Domain:
        words += ["domain", cookie.Domain]
    if cookie is not None and cookie.SameSite != "Unspecified":
        words += ["attr", f"SameSite={cookie.SameSite}"]
    if cookie is not None and cookie.MaxAge:
        words += ["attr", f"Max-Age={cookie.MaxAge // 1000}"]
    return {
        "cookie": " ".join(words),
        "redispatch": affinity.FailurePolicy == "Redistribute",
    }
