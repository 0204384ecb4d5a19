"""Apply a change through HAProxy's runtime API when it needs no reload.

Many changes of a routing document touch only two things in the rendered
files: the entries of map files (a host moved to another route or cluster)
and the servers of existing backends (destinations added, removed, moved to
another address or re-weighted). The running worker can take both without a
reload, through the runtime API (`@1 <command>` on the master socket):

- `add map`, `set map`, `del map` for map entries;
- `add server` (then `enable server`, and `enable health` when the server is
  checked), `set server ... addr` and `set server ... weight`;
- `disable server` then `del server` for a server that goes away.

`runtime_changes(live, new)` compares two renders and returns those commands,
or None when anything else differs and a reload is needed. Map files are
named after a hash of their content, so their names are compared normalised,
and the commands address each map by the name the running worker loaded it
under (read from `show map`, see `loaded_maps`).

What HAProxy 2.6 allows decides the rest, as measured against Debian's
2.6.12:

- A dynamic server takes none of the backend's `default-server` settings, so
  they are written out on `add server`. It refuses `cookie`, `resolvers` and
  `init-addr`; it may `track` only a server of the configuration. A change
  that adds a server with such settings (cookie affinity, a destination named
  by a host name) is left to a reload, as is any add or removal in a backend
  that tracks or is tracked, and in a `balance first` backend, where the
  order of the servers in the file matters.
- `del server` refuses a server that still has connections, idle ones
  included (2.6 keeps idle server connections for `pool-purge-delay`, 5 s by
  default). A removed server is therefore put in maintenance first, which
  stops new traffic at once, and deleted when it has drained; `send`
  reports the servers still draining and the caller deletes them later.
- Several commands go on one line, separated by `;`, which the master CLI
  forwards one by one; `;` and `\\` in a map key are escaped with `\\`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import ReloadError
from .reload import MasterSocket
from .render import Rendered

__all__ = [
    "CONFIG",
    "MAX_COMMANDS",
    "LoadedMap",
    "SendResult",
    "changed_servers",
    "loaded_maps",
    "runtime_changes",
    "send",
    "server_args",
    "touched_servers",
]

log = logging.getLogger(__name__)

MAX_COMMANDS = 2000
"""Beyond this many commands a reload is used: sending them takes about as long."""

CONFIG = "haproxy.cfg"
"""The name of the configuration among a render's files; the rest are maps."""

_BATCH_COMMANDS = 100
_BATCH_BYTES = 8192
_MAP_FILE = re.compile(r"^(?P<logical>.+)-[0-9a-f]{12}(?P<ext>\.map)$")
_SHOW_MAP = re.compile(r"^-?\d+ \((?P<name>[^)]+)\) .*\bentry_cnt=(?P<count>\d+)")
_IPV4_PORT = re.compile(r"^(?P<ip>[0-9]{1,3}(?:\.[0-9]{1,3}){3}):(?P<port>[0-9]{1,5})$")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_WORD = re.compile(r"^[^\s'\"\\;#]+$")
_SECTION = re.compile(r"^(?=[A-Za-z])", re.MULTILINE)
_TRACK = re.compile(r"\btrack\s+(\S+)")

# Server keywords HAProxy 2.6 accepts on `add server`, with how many values
# each takes. Anything else (`cookie`, `track`, `resolvers`, ...) means reload.
_FLAGS = frozenset(
    """
    agent-check allow-0rtt backup check check-send-proxy check-ssl check-via-socks4
    disabled enabled no-ssl-reuse no-tls-tickets send-proxy send-proxy-v2
    send-proxy-v2-ssl send-proxy-v2-ssl-cn ssl tfo tls-tickets
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
_VALUED = frozenset(
    """
    addr agent-addr agent-inter agent-port agent-send alpn ca-file check-alpn
    check-proto check-sni ciphers ciphersuites crl-file crt downinter error-limit
    fall fastinter inter maxconn maxqueue minconn npn observe on-error
    on-marked-down on-marked-up pool-low-conn pool-max-conn pool-purge-delay port
    proto proxy-v2-options rise slowstart sni source ssl-max-ver ssl-min-ver verify
    verifyhost weight ws
    """.split()  # noqa: SIM905 (a word list reads better as text)
)
# Settings a dynamic server refuses but that change nothing for a server whose
# address is an IP literal; inherited from `default-server`, they are dropped.
_MOOT_FOR_IP = frozenset({"init-addr"})

# Maps that others point into come first when entries are added, last when
# they are removed, so a lookup never lands on a name that is not there yet.
_MAP_RANK = {"maps/backends.map": 0, "maps/hosts.map": 3}

_OK_ANSWERS = re.compile(
    r"^(New server registered\.|Server deleted\.|(IP|port) changed from .*"
    r"|no need to change the (addr|port).*)$"
)
_DRAINING = "Server still has connections attached to it, cannot remove it."


class _NeedsReload(Exception):
    """Raised while comparing renders: this difference needs a reload."""


@dataclass(frozen=True)
class LoadedMap:
    """A map as the running worker holds it: its reference and entry count."""

    name: str
    entries: int


@dataclass(frozen=True)
class SendResult:
    """What became of a list of runtime commands.

    `draining` lists the servers (`backend/server`) put in maintenance whose
    deletion HAProxy refused because they still have connections.
    """

    commands: int
    draining: tuple[str, ...] = ()


@dataclass
class _Backend:
    """The lines of one backend section: its servers apart from the rest."""

    settings: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    servers: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class _Config:
    """A render cut into sections, with map names stripped of their hash.

    Sections are compared as whole strings first; only those that differ
    are read line by line, which keeps a small change to 10,000 backends
    cheap to compare.
    """

    rendered: Rendered
    headers: list[str]
    bodies: list[str]
    maps: dict[str, str]
    others: dict[str, str]
    _defaults: list[list[str]] | None = None

    def backend(self, index: int) -> _Backend:
        """Read the backend section at `index`."""
        return _read_backend(self.bodies[index])

    def defaults_for(self, index: int) -> list[str]:
        """The `default-server` words of the defaults section before `index`."""
        if self._defaults is None:
            self._defaults = []
            current: list[str] = []
            for header, body in zip(self.headers, self.bodies, strict=True):
                if header.split()[0] == "defaults":
                    current = _default_words(body)
                self._defaults.append(current)
        return self._defaults[index]


def runtime_changes(
    live: Rendered,
    new: Rendered,
    *,
    loaded: Mapping[str, LoadedMap] | None = None,
    parked: Mapping[str, str] | None = None,
) -> list[str] | None:
    """Return the runtime API commands that turn `live` into `new`, or None.

    None means the renders differ in something the runtime API cannot change
    (anything but map entries and the servers of existing backends), so a
    reload is needed. An empty list means they differ in nothing HAProxy sees.

    `loaded` is `loaded_maps()` of the running worker: maps are addressed by
    the names it loaded them under, and a worker whose entry counts differ
    from `live` is not trusted to match it (None). Without it, `live`'s own
    map names are used, which is right just after a reload of `live`.

    `parked` holds the servers put in maintenance by an earlier removal and
    not deleted yet, with their `server_args()`: one that comes back with the
    same settings is enabled again rather than added.
    """
    try:
        before, after = _read(live), _read(new)
        _check_same_frame(before, after)
        names = _map_names(before, loaded)
        servers = _server_commands(before, after, parked or {})
        maps = _map_commands(before, after, names)
    except _NeedsReload as exc:
        log.debug("a reload is needed: %s", exc)
        return None

    commands = servers.adds + maps.adds + maps.removals + servers.removals
    if len(commands) > MAX_COMMANDS:
        log.debug("%d runtime commands; a reload is quicker", len(commands))
        return None
    return commands


def server_args(rendered: Rendered, paths: Iterable[str]) -> dict[str, str]:
    """Return the `add server` arguments of each server of `paths` in `rendered`.

    `paths` are `backend/server`; a server that is not in `rendered`, or that
    cannot be added at runtime, is left out.
    """
    config = _read(rendered)
    where = {header: index for index, header in enumerate(config.headers)}
    found = {}
    for path in paths:
        backend_name, _, server = path.partition("/")
        index = where.get(f"backend {backend_name}")
        if index is None:
            continue
        backend = config.backend(index)
        if server not in backend.servers:
            continue
        try:
            defaults = config.defaults_for(index)
            found[path] = _add_args(defaults, backend, backend.servers[server])
        except _NeedsReload:
            continue
    return found


def changed_servers(live: Rendered, new: Rendered) -> set[str]:
    """Return the servers (`backend/server`) in both renders whose line differs.

    Their saved state must not outlive a reload: HAProxy 2.6 would restore
    the old port, for one, over the one the new configuration gives.
    """
    before, after = _read(live), _read(new)
    bodies = dict(zip(after.headers, after.bodies, strict=True))
    found = set()
    for index, header in enumerate(before.headers):
        words = header.split()
        body = bodies.get(header)
        if words[0] != "backend" or body is None or body == before.bodies[index]:
            continue
        old, now = before.backend(index), _read_backend(body)
        for server in old.servers.keys() & now.servers.keys():
            if old.servers[server] != now.servers[server]:
                found.add(f"{words[1]}/{server}")
    return found


def loaded_maps(show_map: str) -> dict[str, LoadedMap]:
    """Read the running worker's answer to `show map`, keyed by logical name.

    The logical name drops the content hash (`maps/hosts.map`). A logical
    name loaded twice is left out, as it cannot be addressed by name.
    """
    found: dict[str, LoadedMap] = {}
    seen: set[str] = set()
    for line in show_map.splitlines():
        match = _SHOW_MAP.match(line.strip())
        if match is None:
            continue
        logical = _logical(match["name"])
        if logical in seen:
            found.pop(logical, None)
            continue
        seen.add(logical)
        found[logical] = LoadedMap(match["name"], int(match["count"]))
    return found


def touched_servers(commands: Iterable[str]) -> set[str]:
    """Return the servers (`backend/server`) that `commands` add, change or remove."""
    found = set()
    for command in commands:
        words = command.split()
        if len(words) > 2 and words[1] in ("server", "health"):
            found.add(words[2])
    return found


async def send(master: MasterSocket, commands: Sequence[str]) -> SendResult:
    """Send `commands` to the current worker, in order, and check every answer.

    Commands go several to a line; each `del server` goes alone, so that a
    server still draining its connections can be told apart and reported.

    Raises:
        ReloadError: HAProxy refused a command (its answer is quoted), or the
            master socket failed; some of the commands may have run.
    """
    draining = []
    batch: list[str] = []
    for command in commands:
        if command.startswith("del server "):
            await _send_batch(master, batch)
            batch = []
            if not await _delete_server(master, command):
                draining.append(command.removeprefix("del server "))
            continue
        batch.append(command)
        if len(batch) >= _BATCH_COMMANDS or sum(map(len, batch)) >= _BATCH_BYTES:
            await _send_batch(master, batch)
            batch = []
    await _send_batch(master, batch)
    return SendResult(len(commands), tuple(draining))


async def _send_batch(master: MasterSocket, batch: list[str]) -> None:
    if not batch:
        return
    answer = await master.command("; ".join(f"@1 {command}" for command in batch))
    for line in answer.splitlines():
        text = line.strip()
        if text and not _OK_ANSWERS.match(text):
            shown = batch[0] if len(batch) == 1 else f"{batch[0]!r} and the rest"
            message = (
                f"HAProxy's runtime API refused a change: {text!r} "
                f"(in a batch of {len(batch)} commands starting with {shown})."
            )
            raise ReloadError(message)


async def _delete_server(master: MasterSocket, command: str) -> bool:
    """Delete one server; False when it still has connections to drain."""
    answer = (await master.worker_command(command)).strip()
    if answer == _DRAINING:
        return False
    if answer in ("Server deleted.", "No such server."):
        return True
    raise ReloadError(f"HAProxy refused {command!r}: {answer!r}.")


# Reading a render ------------------------------------------------------------


def _logical(name: str) -> str:
    match = _MAP_FILE.match(name)
    return match["logical"] + match["ext"] if match else name


def _read(rendered: Rendered) -> _Config:
    maps, others = {}, {}
    for name, text in rendered.files.items():
        if name == CONFIG:
            continue
        if _MAP_FILE.match(name):
            maps[_logical(name)] = name
        else:
            others[name] = text
    text = rendered.config
    for logical, name in maps.items():
        text = text.replace(name, logical)
    headers, bodies = [], []
    for section in _SECTION.split(text):
        header, _, body = section.partition("\n")
        headers.append(header.strip())
        bodies.append(body)
    return _Config(rendered, headers, bodies, maps, others)


def _read_backend(body: str) -> _Backend:
    backend = _Backend()
    for line in body.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "server" and len(words) > 2:
            backend.servers[words[1]] = words[2:]
            continue
        if words[0] == "default-server":
            backend.defaults += words[1:]
        backend.settings.append(" ".join(words))
    return backend


def _default_words(body: str) -> list[str]:
    words: list[str] = []
    for line in body.splitlines():
        parts = line.split()
        if parts and parts[0] == "default-server":
            words += parts[1:]
    return words


def _check_same_frame(before: _Config, after: _Config) -> None:
    if before.headers != after.headers:
        raise _NeedsReload("the configuration's sections differ")
    if before.others != after.others:
        raise _NeedsReload("a file other than a map differs")
    if before.maps.keys() != after.maps.keys():
        raise _NeedsReload("the set of map files differs")


def _map_names(
    before: _Config, loaded: Mapping[str, LoadedMap] | None
) -> dict[str, str]:
    if loaded is None:
        return dict(before.maps)
    names = {}
    for logical, name in before.maps.items():
        held = loaded.get(logical)
        if held is None:
            raise _NeedsReload(f"the worker has no map {logical!r} loaded")
        if held.entries != _count(before.rendered.files[name]):
            raise _NeedsReload(f"the worker's {logical!r} differs from the live file")
        names[logical] = held.name
    return names


def _count(text: str) -> int:
    lines = text.splitlines()
    return sum(
        1 for line in lines if line.strip() and not line.lstrip().startswith("#")
    )


def _entries(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split(None, 1)
        if len(parts) != 2 or parts[0] in entries:
            raise _NeedsReload(f"map line {stripped!r} is not one unique key and value")
        entries[parts[0]] = parts[1].strip()
    return entries


# Commands --------------------------------------------------------------------


@dataclass
class _Commands:
    adds: list[str] = field(default_factory=list)
    removals: list[str] = field(default_factory=list)


def _map_commands(
    before: _Config, after: _Config, names: Mapping[str, str]
) -> _Commands:
    result = _Commands()
    order = sorted(
        before.maps, key=lambda logical: (_MAP_RANK.get(logical, 1), logical)
    )
    changed = []
    for logical in order:
        was, now = before.maps[logical], after.maps[logical]
        if was != now:  # the name carries a hash of the content
            old = _entries(before.rendered.files[was])
            new = _entries(after.rendered.files[now])
            changed.append((_cli_word(names[logical]), old, new))
    for target, old, new in changed:
        for key in sorted(new.keys() - old.keys()):
            result.adds.append(
                f"add map {target} {_cli_word(key)} {_cli_word(new[key])}"
            )
        for key in sorted(k for k in new.keys() & old.keys() if new[k] != old[k]):
            result.adds.append(
                f"set map {target} {_cli_word(key)} {_cli_word(new[key])}"
            )
    for target, old, new in reversed(changed):
        for key in sorted(old.keys() - new.keys()):
            result.removals.append(f"del map {target} {_cli_word(key)}")
    return result


def _cli_word(value: str) -> str:
    """Write `value` as one word of a runtime API command line."""
    if not value or any(char.isspace() or ord(char) < 32 for char in value):
        raise _NeedsReload(f"{value!r} cannot be one word of a runtime command")
    return value.replace("\\", "\\\\").replace(";", "\\;")


def _server_commands(
    before: _Config, after: _Config, parked: Mapping[str, str]
) -> _Commands:
    result = _Commands()
    tracked: set[str] | None = None
    for index, header in enumerate(before.headers):
        if before.bodies[index] == after.bodies[index]:
            continue
        words = header.split()
        if words[0] != "backend" or len(words) != 2:
            raise _NeedsReload(f"section {header!r} differs")
        old, new = before.backend(index), after.backend(index)
        if old.settings != new.settings:
            raise _NeedsReload(f"{header!r} differs beyond its servers")
        if old.servers == new.servers:
            continue
        if tracked is None:
            tracked = _tracked(before) | _tracked(after)
        defaults = after.defaults_for(index)
        _backend_commands(words[1], old, new, defaults, tracked, parked, result)
    return result


def _backend_commands(
    name: str,
    old: _Backend,
    new: _Backend,
    defaults: list[str],
    tracked: set[str],
    parked: Mapping[str, str],
    result: _Commands,
) -> None:
    weight = _weight(defaults + new.defaults, "1")
    for server in sorted(new.servers.keys() - old.servers.keys()):
        path = _movable(name, server, old, tracked)
        args = _add_args(defaults, new, new.servers[server])
        result.adds += _add_server(path, args, parked)
    for server in sorted(new.servers.keys() & old.servers.keys()):
        was, now = old.servers[server], new.servers[server]
        if was != now:
            path = _server_path(name, server)
            result.adds += _changed_server(path, was, now, tracked, weight)
    for server in sorted(old.servers.keys() - new.servers.keys()):
        if "track" in old.servers[server]:
            raise _NeedsReload(f"server {name}/{server} tracks another")
        path = _movable(name, server, old, tracked)
        result.removals += [f"disable server {path}", f"del server {path}"]


def _tracked(config: _Config) -> set[str]:
    """The servers that another server tracks (`track backend/server`)."""
    text = config.rendered.config
    return set(_TRACK.findall(text)) if " track " in text else set()


def _movable(
    backend_name: str, server: str, backend: _Backend, tracked: set[str]
) -> str:
    """Return the server's path if it may be added or deleted at runtime."""
    path = _server_path(backend_name, server)
    if path in tracked:
        raise _NeedsReload(f"server {path} tracks or is tracked")
    if any(line.split()[:2] == ["balance", "first"] for line in backend.settings):
        raise _NeedsReload(f"backend {backend_name} balances by server order")
    return path


def _server_path(backend_name: str, server: str) -> str:
    if not (_NAME.match(backend_name) and _NAME.match(server)):
        raise _NeedsReload(f"{backend_name}/{server} is not a plain server name")
    return f"{backend_name}/{server}"


def _add_server(path: str, args: str, parked: Mapping[str, str]) -> list[str]:
    if path in parked:
        if parked[path] != args:
            raise _NeedsReload(f"server {path} is still draining with other settings")
        return [f"enable server {path}"]
    commands = [f"add server {path} {args}"]
    words = args.split()
    if "disabled" not in words:
        commands.append(f"enable server {path}")
    if "check" in words:
        commands.append(f"enable health {path}")
    return commands


def _add_args(defaults: list[str], backend: _Backend, words: list[str]) -> str:
    address, own = words[0], _pairs(words[1:])
    if not _IPV4_PORT.match(address):
        raise _NeedsReload(f"{address!r} is not an IPv4 address and port")
    inherited = _pairs(defaults + backend.defaults, drop=_MOOT_FOR_IP)
    keys = {key for key, _ in own}
    merged = own + [(key, value) for key, value in inherited if key not in keys]
    args = [address]
    for key, value in merged:
        args += [key] if value is None else [key, value]
    for word in args:
        if not _WORD.match(word):
            raise _NeedsReload(f"server argument {word!r} needs quoting")
    if ("ca-file", "@system-ca") in merged:
        # HAProxy 2.6 loads the system CA store only while it parses its
        # configuration; `add server ... ca-file @system-ca` fails.
        raise _NeedsReload("a server verifying against the system CAs")
    return " ".join(args)


def _pairs(words: list[str], drop: Iterable[str] = ()) -> list[tuple[str, str | None]]:
    """Split server words into (keyword, value) pairs, refusing unknown ones."""
    pairs: list[tuple[str, str | None]] = []
    skip = set(drop)
    index = 0
    while index < len(words):
        key = words[index]
        if key in _FLAGS:
            value, index = None, index + 1
        elif key in _VALUED and index + 1 < len(words):
            value, index = words[index + 1], index + 2
        elif key in skip and index + 1 < len(words):
            index += 2
            continue
        else:
            raise _NeedsReload(f"server setting {key!r} cannot be set at runtime")
        pairs.append((key, value))
    return pairs


def _changed_server(
    path: str, old: list[str], new: list[str], tracked: set[str], default: str
) -> list[str]:
    if _without(old) != _without(new):
        raise _NeedsReload(f"server {path} changed beyond its address and weight")
    commands = []
    if old[0] != new[0]:
        address = _IPV4_PORT.match(new[0])
        if address is None or path in tracked:
            raise _NeedsReload(f"server {path} cannot move to {new[0]!r} at runtime")
        ip, port = address["ip"], address["port"]
        commands.append(f"set server {path} addr {ip} port {port}")
    weight = _weight(new[1:], default)
    if _weight(old[1:], default) != weight:
        commands.append(f"set server {path} weight {weight}")
    return commands


def _without(words: list[str]) -> list[str]:
    """A server's words without its address and weight."""
    rest = words[1:]
    if "weight" in rest:
        at = rest.index("weight")
        rest = rest[:at] + rest[at + 2 :]
    return rest


def _weight(words: list[str], default: str) -> str:
    """The value of the last `weight` among server settings, or `default`."""
    for at in range(len(words) - 2, -1, -1):
        if words[at] == "weight":
            return words[at + 1]
    return default
