"""The NATS side: connection options, and the key-value store we follow.

`Store` owns one NATS connection and the bucket that holds the routing
document::

    async with Store(options, wait=True) as store:
        async for change in store.watch():
            ...  # change.revision, change.operation, change.value

`Store.watch()` yields the key's current value, then every later put, delete
and purge of that key. It survives what a long-running sidecar meets: NATS
restarts (the watch is re-opened as soon as the client reconnects, rather than
after the consumer's missed heartbeats), a bucket deleted under it (the bucket
is created again, as at start-up, unless the store may not create it), and
long idle periods (idle heartbeats and a periodic check of the stream and
consumer). It never yields a revision it has already passed, unless the
bucket itself was re-created, in which case revisions start again and the
current value is yielded again.

Opening the store either fails fast (`wait=False`, the default: `open()` gives up
with a StoreError after `connect_timeout` seconds) or waits for NATS for as long
as it takes (`wait=True`, what the sidecar uses so that it can start while NATS
is down, keep its last good configuration, and catch up once NATS answers).
After the first connection the client reconnects forever in both modes.
Commands that only read open it with `create=False`, so that reading never
leaves a bucket behind on a server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import logging
import random
import re
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Final, Literal, Self, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client, Server
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from momus_haproxy.errors import StoreError

__all__ = [
    "Change",
    "ConnectionEvents",
    "Entry",
    "NatsOptions",
    "Operation",
    "Store",
    "redact_url",
]

logger = logging.getLogger(__name__)

DEFAULT_SERVER: Final = "nats://127.0.0.1:4222"
SECRET_FIELDS: Final = frozenset({"password", "token", "jwt", "nkey_seed"})
URL_SCHEMES: Final = frozenset({"nats", "tls", "ws", "wss"})
BUCKET_RE: Final = re.compile(r"^[a-zA-Z0-9_-]+$")
KEY_RE: Final = re.compile(r"^[-/_=.a-zA-Z0-9]+$")

Operation: TypeAlias = Literal["PUT", "DEL", "PURGE"]

KV_OPERATION: Final = "KV-Operation"
MARKER_REASON: Final = "Nats-Marker-Reason"
# KV-Operation values, and the reasons nats-server 2.11+ gives on its own markers.
MARKERS: Final[dict[str, Operation]] = {
    "DEL": "DEL",
    "PURGE": "PURGE",
    "MaxAge": "PURGE",
    "Purge": "PURGE",
    "Remove": "DEL",
}

# The first reconnect attempt is immediate; later ones back off from here.
RECONNECT_WAIT_MIN: Final = 0.25
PING_INTERVAL: Final = 15
OUTAGE_REPORT_FIRST: Final = 30.0
OUTAGE_REPORT_MAX: Final = 300.0
MAX_OUTSTANDING_PINGS: Final = 2
CONSUMER_DELETE_TIMEOUT: Final = 1.0
NKEYS_HINT: Final = "install it with: pip install 'nats-py[nkeys]'"


@dataclass(frozen=True)
class Entry:
    """One revision of the key: a value (PUT), or a delete or purge marker."""

    revision: int
    operation: Operation
    value: bytes | None
    created: datetime | None


Change: TypeAlias = Entry
"""What `Store.watch()` yields: the revision of the key that is now current."""


def redact_url(url: str) -> str:
    """Return `url` with any user name and password in it replaced by `***`."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url

    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


class NatsOptions(BaseModel):
    """How to reach NATS, and which bucket and key hold the routing document.

    `servers` also accepts one comma-separated string; the client tries them
    in a random order, as NATS clients do, unless `randomize` is False, when it
    tries the first one first. Authentication follows
    NATS: `user` and `password`, or `token`, or a `creds_file`, or a user `jwt`
    signed with an NKey seed (`nkey_seed` or `nkey_seed_file`), or an NKey seed
    alone. NKey, JWT and creds-file authentication need the `nkeys` package
    (`pip install 'nats-py[nkeys]'`). Secrets never appear in `repr()` or `str()`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: list[str] = Field(default_factory=lambda: [DEFAULT_SERVER], min_length=1)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = None
    jwt: str | None = None
    nkey_seed: str | None = None
    nkey_seed_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    bucket: str = "momus"
    key: str = "route-config"
    history: int = Field(default=16, ge=1, le=64)
    replicas: int = Field(default=1, ge=1, le=5)
    name: str = "momus-haproxy"
    connect_timeout: float = Field(default=5.0, gt=0)
    request_timeout: float = Field(default=5.0, gt=0)
    reconnect_wait_max: float = Field(default=2.0, gt=0)
    # On a cluster, a watch whose consumer lived on a server that stopped hears
    # nothing until two heartbeats are missed: 1 s keeps that to about 2 s.
    heartbeat: float = Field(default=1.0, gt=0)
    randomize: bool = True

    @field_validator("servers", mode="before")
    @classmethod
    def _split_servers(cls, value: object) -> object:
        """Accept `"nats://a:4222,nats://b:4222"` as well as a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("servers")
    @classmethod
    def _check_servers(cls, servers: list[str]) -> list[str]:
        """Refuse a server that is not a nats://, tls://, ws:// or wss:// URL."""
        for url in servers:
            parts = urlsplit(url)
            try:
                parts.port  # noqa: B018 (reading it checks the port's range)
            except ValueError:
                shown = redact_url(url)
                raise ValueError(f"{shown!r} has a port outside 1-65535") from None
            if parts.scheme not in URL_SCHEMES or not parts.hostname:
                shown = redact_url(url)
                message = f"{shown!r} is not a NATS URL such as {DEFAULT_SERVER}"
                raise ValueError(message)
        return servers

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, bucket: str) -> str:
        """Refuse a bucket name that JetStream would refuse."""
        if not BUCKET_RE.match(bucket):
            message = f"bucket name {bucket!r} may only hold letters, digits, - and _"
            raise ValueError(message)
        return bucket

    @field_validator("key")
    @classmethod
    def _check_key(cls, key: str) -> str:
        """Refuse a key that the key-value store would refuse."""
        if not KEY_RE.match(key) or key.startswith(".") or key.endswith("."):
            message = (
                f"key {key!r} may only hold letters, digits and - / _ = . "
                "and may not start or end with a dot"
            )
            raise ValueError(message)
        return key

    @model_validator(mode="after")
    def _check_pairs(self) -> Self:
        """Refuse options that only work together when one of them is missing."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.nkey_seed is not None and self.nkey_seed_file is not None:
            raise ValueError("give nkey_seed or nkey_seed_file, not both")
        has_seed = self.nkey_seed is not None or self.nkey_seed_file is not None
        if self.jwt is not None and not has_seed:
            raise ValueError("a user jwt needs the NKey seed that signs for it")
        if self.creds_file is not None and (self.jwt is not None or has_seed):
            raise ValueError("give creds_file, or jwt and an NKey seed, not both")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """List the fields for repr() and str(), with every secret masked."""
        for name, value in super().__repr_args__():
            if name in SECRET_FIELDS and value is not None:
                yield name, "***"
            elif name == "servers":
                yield name, [redact_url(url) for url in value]
            else:
                yield name, value

    @property
    def stream(self) -> str:
        """The JetStream stream behind the bucket."""
        return f"KV_{self.bucket}"

    @property
    def subject(self) -> str:
        """The subject the key's revisions are stored under."""
        return f"$KV.{self.bucket}.{self.key}"

    @property
    def where(self) -> str:
        """Name the key and bucket for messages and log lines."""
        return f"key {self.key!r} in bucket {self.bucket!r}"

    def shown_servers(self) -> str:
        """Return the server URLs for a message, without credentials."""
        return ", ".join(redact_url(url) for url in self.servers)

    def connect_kwargs(self, events: ConnectionEvents | None = None) -> dict[str, Any]:
        """Return the keyword arguments for `nats.connect()` or `Client.connect()`.

        The client reconnects forever, with a backoff up to `reconnect_wait_max`
        seconds; `events` (a fresh `ConnectionEvents` by default) logs what
        happens to the connection.
        """
        events = events or ConnectionEvents(self)
        kwargs: dict[str, Any] = {
            "servers": list(self.servers),
            "dont_randomize": not self.randomize,
            "name": self.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": self.reconnect_wait_max,
            "reconnect_to_server_handler": events.pick_server,
            "connect_timeout": min(self.connect_timeout, 2.0),
            "ping_interval": PING_INTERVAL,
            "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
            "error_cb": events.error,
            "disconnected_cb": events.disconnected,
            "reconnected_cb": events.reconnected,
            "closed_cb": events.closed,
        }
        kwargs.update(self._auth_kwargs())
        tls = self.tls_context()
        if tls is not None:
            kwargs["tls"] = tls
        return kwargs

    def _auth_kwargs(self) -> dict[str, Any]:
        """Return the credentials part of the connect arguments."""
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs["user"] = self.user
        if self.password is not None:
            kwargs["password"] = self.password
        if self.token is not None:
            kwargs["token"] = self.token

        if self.creds_file is not None:
            _import_nkeys("a creds file")
            kwargs["user_credentials"] = str(self.creds_file)
        elif self.jwt is not None:
            kwargs["user_jwt_cb"], kwargs["signature_cb"] = self._jwt_callbacks()
        elif self.nkey_seed is not None:
            _import_nkeys("an NKey seed")
            kwargs["nkeys_seed_str"] = self.nkey_seed
        elif self.nkey_seed_file is not None:
            _import_nkeys("an NKey seed file")
            kwargs["nkeys_seed"] = str(self.nkey_seed_file)
        return kwargs

    def _jwt_callbacks(
        self,
    ) -> tuple[Callable[[], bytes], Callable[[str], bytes]]:
        """Return the callbacks that present the user JWT and sign the nonce."""
        nkeys = _import_nkeys("a user JWT")
        user_jwt = (self.jwt or "").strip().encode()

        def present() -> bytes:
            return user_jwt

        def sign(nonce: str) -> bytes:
            keypair = nkeys.from_seed(bytearray(self._read_seed()))
            try:
                return base64.b64encode(keypair.sign(nonce.encode()))
            finally:
                keypair.wipe()

        return present, sign

    def _read_seed(self) -> bytes:
        """Return the NKey seed, read from its file when it was given as one."""
        if self.nkey_seed is not None:
            return self.nkey_seed.strip().encode()

        assert self.nkey_seed_file is not None  # the validators pair jwt and seed
        try:
            return self.nkey_seed_file.read_bytes().strip()
        except OSError as exc:
            path = str(self.nkey_seed_file)
            raise StoreError(f"cannot read the NKey seed file {path!r}: {exc}") from exc

    def tls_context(self) -> ssl.SSLContext | None:
        """Return the TLS context for a CA or a client certificate, if one is set."""
        if self.tls_ca is None and self.tls_cert is None:
            return None

        try:
            context = ssl.create_default_context(
                cafile=str(self.tls_ca) if self.tls_ca else None
            )
            if self.tls_cert is not None and self.tls_key is not None:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        except (OSError, ssl.SSLError) as exc:
            files = [str(p) for p in (self.tls_ca, self.tls_cert, self.tls_key) if p]
            raise StoreError(f"cannot load the TLS files {files!r}: {exc}") from exc
        return context


def _import_nkeys(purpose: str) -> ModuleType:
    """Return the `nkeys` module, or say how to install it."""
    try:
        return importlib.import_module("nkeys")
    except ImportError as exc:
        message = f"NATS authentication with {purpose} needs the nkeys package; "
        raise StoreError(message + NKEYS_HINT) from exc


class ConnectionEvents:
    """The connection callbacks: log what happens, then tell the store.

    A lost connection is one WARNING line naming its cause, and its return one
    INFO line. While NATS stays out of reach, the failed attempts are logged at
    DEBUG, with a WARNING after 30 s, 60 s, 120 s and so on (at most every
    5 minutes). Other errors are logged at WARNING once, and at DEBUG while they
    repeat. `errors` keeps the last few distinct ones for a failed `open()`.
    """

    def __init__(
        self,
        options: NatsOptions,
        *,
        on_reconnected: Callable[[], None] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        self.options = options
        self.client: Client | None = None
        self.errors: list[str] = []
        self._on_reconnected = on_reconnected
        self._on_closed = on_closed
        # When NATS went out of reach (time.monotonic()); None while connected.
        self.down_since: float | None = time.monotonic()
        self._next_report = OUTAGE_REPORT_FIRST
        self._last_server: str | None = None

    def server(self) -> str:
        """Name the server the client is (or was last) connected to."""
        url = self.client.connected_url if self.client else None
        if url is not None and url.hostname is not None:
            self._last_server = f"{url.hostname}:{url.port}"
        return self._last_server or self.options.shown_servers()

    def pick_server(
        self, servers: list[Server], info: dict[str, Any]
    ) -> tuple[Server | None, float]:
        """Choose the server tried least since it last worked, and a backoff."""
        server = min(servers, key=lambda candidate: candidate.reconnects)
        if server.reconnects == 0:
            return server, 0.0

        wait = RECONNECT_WAIT_MIN * 2 ** min(server.reconnects, 10)
        jitter = random.uniform(0.8, 1.0)  # noqa: S311 spreads a fleet's retries
        return server, min(wait, self.options.reconnect_wait_max) * jitter

    def reasons(self) -> str:
        """Return the distinct errors seen since the last connection, in order."""
        return "; ".join(self.errors) or "no answer"

    def connected(self) -> None:
        """Note that the client is connected: the outage, if any, is over."""
        self.errors = []
        self.down_since = None
        self.server()

    async def error(self, exc: Exception) -> None:
        """Log an error of the connection at the level it deserves."""
        text = str(exc) or type(exc).__name__
        new = text not in self.errors
        if new:
            self.errors = [*self.errors[-2:], text]

        reconnecting = self.client is not None and self.client.is_reconnecting
        if reconnecting or isinstance(exc, nats.errors.StaleConnectionError):
            # The disconnect line names the cause; retries are only news when
            # they have been failing for a while.
            logger.debug("NATS connection error: %s", text)
            self._report_outage(text)
            return
        logger.log(logging.WARNING if new else logging.DEBUG, "NATS error: %s", text)
        self._report_outage(text)

    def _report_outage(self, text: str) -> None:
        """Say, now and then, that NATS has been out of reach for a while."""
        if self.down_since is None:
            return
        down = time.monotonic() - self.down_since
        if down < self._next_report:
            return

        logger.warning(
            "NATS at %s is still out of reach after %.0f s: %s",
            self.server(),
            down,
            text,
        )
        self._next_report = min(self._next_report * 2, down + OUTAGE_REPORT_MAX)

    async def disconnected(self) -> None:
        """Log that the connection was lost, and why."""
        if self.client is not None and self.client.is_closed:
            return
        cause = self.errors[-1] if self.errors else "closed by the server"
        self.down_since = time.monotonic()
        self._next_report = OUTAGE_REPORT_FIRST
        logger.warning(
            "lost the connection to NATS at %s (%s); reconnecting",
            self.server(),
            cause,
        )

    async def reconnected(self) -> None:
        """Log that the connection is back, and let the watches catch up."""
        down = time.monotonic() - (self.down_since or time.monotonic())
        self.connected()
        logger.info("reconnected to NATS at %s after %.1f s", self.server(), down)
        if self._on_reconnected is not None:
            self._on_reconnected()

    async def closed(self) -> None:
        """Log that the connection is closed for good."""
        logger.debug("closed the connection to NATS")
        if self._on_closed is not None:
            self._on_closed()


class _Signal:
    """A wake-up for a watch: re-open after a reconnect, or end on close."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


REOPEN: Final = _Signal("reopen")
CLOSED: Final = _Signal("closed")


@dataclass(frozen=True)
class _Delivery:
    """An entry delivered by the subscription of one watcher generation."""

    generation: int
    entry: Entry


_Item: TypeAlias = _Signal | _Delivery


@dataclass
class _Cursor:
    """What one watch has yielded: the last revision, in which bucket instance."""

    revision: int = 0
    created: datetime | None = None
    opened: bool = False

    def rebase(self, created: datetime | None, last_seq: int, where: str) -> None:
        """Start over when the stream is not the one the revisions came from."""
        replaced = self.created is not None and created != self.created
        if replaced or last_seq < self.revision:
            logger.warning(
                "the bucket of %s was re-created; following it from the start",
                where,
            )
            self.revision = 0
        self.created = created

    def advance(self, entry: Entry) -> bool:
        """Take `entry` if it is newer than anything yielded; say whether it was."""
        if entry.revision <= self.revision:
            return False
        self.revision = entry.revision
        return True


class Store:
    """The NATS connection and the key-value bucket holding the document.

    Use it as an async context manager, or call `open()` and `aclose()`. With
    `wait=False`, `open()` raises StoreError when NATS does not answer within
    `options.connect_timeout` seconds; with `wait=True` it waits for NATS (and
    for the bucket to be usable) as long as it takes. The bucket is created
    with `options.history` and `options.replicas` when missing; it is never
    deleted. With `create=False` (what read-only commands use) a missing
    bucket is a StoreError naming it instead, and nothing is created.
    """

    def __init__(
        self, options: NatsOptions, *, wait: bool = False, create: bool = True
    ) -> None:
        self.options = options
        self.wait = wait
        self.create = create
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._inboxes: set[asyncio.Queue[_Item]] = set()
        self._watchers: set[_Watcher] = set()
        self._generation = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"Store(servers={self.options.shown_servers()!r}, {self.options.where})"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def connected(self) -> bool:
        """Whether the client is connected to a NATS server right now."""
        return self._client is not None and self._client.is_connected

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the open connection."""
        if self._js is None:
            raise StoreError(f"the store for {self.options.where} is not open")
        return self._js

    async def open(self) -> None:
        """Connect to NATS and find (or create) the bucket; once is enough."""
        if self._client is not None:
            return

        self._closed = False
        events = ConnectionEvents(
            self.options,
            on_reconnected=lambda: self._signal(REOPEN),
            on_closed=lambda: self._signal(CLOSED),
        )
        client = Client()
        events.client = client
        try:
            await self._connect(client, events)
            self._client = client
            self._js = client.jetstream(timeout=self.options.request_timeout)
            await self._open_bucket()
        except BaseException:
            await self.aclose()
            with contextlib.suppress(Exception):
                await client.close()
            raise

    async def _connect(self, client: Client, events: ConnectionEvents) -> None:
        """Connect, giving up after `connect_timeout` unless told to wait."""
        servers = self.options.shown_servers()
        kwargs = self.options.connect_kwargs(events)
        if self.wait:
            logger.info("connecting to NATS at %s (waiting until it answers)", servers)
            await client.connect(**kwargs)
        else:
            await self._connect_or_fail(client, kwargs, events)
        events.connected()
        logger.info("connected to NATS at %s as %r", events.server(), self.options.name)

    async def _connect_or_fail(
        self, client: Client, kwargs: dict[str, Any], events: ConnectionEvents
    ) -> None:
        """Connect within `connect_timeout` seconds or raise StoreError."""
        timeout = self.options.connect_timeout
        try:
            await asyncio.wait_for(client.connect(**kwargs), timeout)
        except TimeoutError as exc:
            message = (
                f"could not connect to NATS at {self.options.shown_servers()} "
                f"within {timeout:g} s ({events.reasons()}); "
                "check the URL and credentials"
            )
            raise StoreError(message) from exc

    async def _open_bucket(self) -> None:
        """Find or create the bucket, retrying when waiting for NATS."""
        delay, last = RECONNECT_WAIT_MIN, ""
        while True:
            try:
                await self._usable_bucket()
                return
            except StoreError as exc:
                if not self.wait:
                    raise
                level = logging.DEBUG if str(exc) == last else logging.WARNING
                logger.log(level, "%s; retrying", exc)
                last = str(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.options.reconnect_wait_max)

    async def _usable_bucket(self) -> KeyValue:
        """Return the bucket; create it when missing, if this store may."""
        options = self.options
        try:
            return await self.js.key_value(options.bucket)
        except nats.js.errors.BucketNotFoundError as exc:
            if not self.create:
                raise StoreError(
                    f"bucket {options.bucket!r} does not exist on NATS at "
                    f"{options.shown_servers()}; put a document first, or check "
                    "the bucket name and the server URL"
                ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise _store_error(f"cannot open bucket {options.bucket!r}", exc) from exc

        logger.info(
            "creating bucket %r with history %d and %d replicas",
            options.bucket,
            options.history,
            options.replicas,
        )
        try:
            return await self.js.create_key_value(
                bucket=options.bucket,
                history=options.history,
                replicas=options.replicas,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            return await self._bucket_created_elsewhere(exc)

    async def _bucket_created_elsewhere(self, exc: Exception) -> KeyValue:
        """Return the bucket another client created first, or raise StoreError."""
        try:
            return await self.js.key_value(self.options.bucket)
        except (nats.errors.Error, TimeoutError):
            action = f"cannot create bucket {self.options.bucket!r}"
            raise _store_error(action, exc) from exc

    async def aclose(self) -> None:
        """Stop every watch, then close the connection."""
        self._closed = True
        self._signal(CLOSED)
        for watcher in list(self._watchers):
            await watcher.stop()

        client, self._client, self._js = self._client, None, None
        if client is not None and not client.is_closed:
            await client.close()

    def _signal(self, signal: _Signal) -> None:
        """Wake every running watch with `signal`."""
        for inbox in self._inboxes:
            inbox.put_nowait(signal)

    async def get(self) -> Entry | None:
        """Return the current value of the key, or None if it has none."""
        try:
            raw = await self.js.get_last_msg(self.options.stream, self.options.subject)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise _store_error(f"cannot read {self.options.where}", exc) from exc

        entry = _entry_from_raw(raw)
        return entry if entry is not None and entry.operation == "PUT" else None

    async def _why_missing(self, revision: int) -> str:
        """Say why `revision` is not in the stream, as far as its state tells."""
        try:
            state = (await self.js.stream_info(self.options.stream)).state
        except (nats.errors.Error, TimeoutError):
            return ""
        if revision > state.last_seq:
            return f"; the latest revision is {state.last_seq}"
        return "; it is older than the history the bucket keeps, or another key's"

    async def get_revision(self, revision: int) -> Entry:
        """Return one revision of the key, a value or a delete or purge marker."""
        where = self.options.where
        try:
            raw = await self.js.get_msg(self.options.stream, seq=revision)
        except nats.js.errors.NotFoundError as exc:
            message = f"revision {revision!r} of {where} is not in the bucket"
            raise StoreError(message + await self._why_missing(revision)) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise _store_error(f"cannot read revision {revision!r}", exc) from exc

        entry = _entry_from_raw(raw)
        if raw.subject != self.options.subject or entry is None:
            raise StoreError(f"revision {revision!r} is not a revision of {where}")
        return entry

    async def history(self) -> list[Entry]:
        """Return the revisions of the key the bucket still holds, oldest first."""
        entries: list[Entry] = []
        sequence = 1
        while True:
            raw = await self._next_revision(sequence)
            if raw is None:
                return entries
            entry = _entry_from_raw(raw)
            if entry is not None:
                entries.append(entry)
            sequence = (raw.seq or sequence) + 1

    async def _next_revision(self, sequence: int) -> api.RawStreamMsg | None:
        """Return the key's first revision at or after `sequence`, if any."""
        options = self.options
        try:
            return await self.js.get_msg(
                options.stream, seq=sequence, subject=options.subject, next=True
            )
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise _store_error(
                f"cannot read the history of {options.where}", exc
            ) from exc

    async def put(self, value: bytes, *, expected_revision: int | None = None) -> int:
        """Store `value` as the key's new revision and return that revision.

        With `expected_revision`, the put only succeeds while the key is still at
        that revision (0: the key was never written); otherwise StoreError.
        """
        kv = await self._bucket()
        key = self.options.key
        try:
            if expected_revision is None:
                return await kv.put(key, value)
            return await kv.update(key, value, last=expected_revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise await self._conflict(expected_revision) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise _store_error(f"cannot write {self.options.where}", exc) from exc

    async def _conflict(self, expected: int | None) -> StoreError:
        """Build the error for a put whose expected revision is out of date."""
        latest = await self._latest_revision()
        current = "has no revision" if latest is None else f"is at revision {latest}"
        message = (
            f"{self.options.where} {current}, not {expected!r} as expected; "
            "read it again and retry"
        )
        return StoreError(message)

    async def _latest_revision(self) -> int | None:
        """Return the key's latest revision, marker or value, or None."""
        try:
            raw = await self.js.get_last_msg(self.options.stream, self.options.subject)
        except (nats.errors.Error, TimeoutError):
            return None
        return raw.seq

    async def delete(self) -> None:
        """Mark the key deleted; its history stays."""
        kv = await self._bucket()
        try:
            await kv.delete(self.options.key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _store_error(f"cannot delete {self.options.where}", exc) from exc

    async def purge(self) -> None:
        """Drop every revision of the key, leaving one purge marker."""
        kv = await self._bucket()
        try:
            await kv.purge(self.options.key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _store_error(f"cannot purge {self.options.where}", exc) from exc

    async def _bucket(self) -> KeyValue:
        """Return the bucket, which must exist."""
        try:
            return await self.js.key_value(self.options.bucket)
        except (nats.errors.Error, TimeoutError) as exc:
            action = f"cannot open bucket {self.options.bucket!r}"
            raise _store_error(action, exc) from exc

    async def watch(self) -> AsyncGenerator[Change, None]:
        """Yield the key's current revision, then each later one, until closed.

        Deletes and purges come as entries with no value. Only the store's key
        is followed; other keys in the bucket are ignored.
        """
        if self._client is None:
            raise StoreError(f"open the store before watching {self.options.where}")

        inbox: asyncio.Queue[_Item] = asyncio.Queue()
        cursor = _Cursor()
        self._inboxes.add(inbox)
        try:
            while not self._closed:
                watcher = await self._open_watcher(inbox, cursor)
                if watcher is None:
                    return
                try:
                    async for entry in watcher.entries():
                        if cursor.advance(entry):
                            yield entry
                finally:
                    await watcher.stop()
        finally:
            self._inboxes.discard(inbox)

    async def _open_watcher(
        self, inbox: asyncio.Queue[_Item], cursor: _Cursor
    ) -> _Watcher | None:
        """Subscribe to the key, retrying until it works or the store closes."""
        delay, last = RECONNECT_WAIT_MIN, ""
        while not self._closed:
            try:
                return await self._subscribe(inbox, cursor)
            except (StoreError, nats.errors.Error, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
                level = logging.DEBUG if reason == last else logging.WARNING
                where = self.options.where
                logger.log(level, "cannot watch %s yet: %s; retrying", where, reason)
                last = reason
            if await _pause(inbox, delay) is CLOSED:
                return None
            delay = min(delay * 2, self.options.reconnect_wait_max)
        return None

    async def _subscribe(
        self, inbox: asyncio.Queue[_Item], cursor: _Cursor
    ) -> _Watcher:
        """Open one generation of the watch: an ordered consumer on the key."""
        options = self.options
        await self._usable_bucket()
        info = await self.js.stream_info(options.stream)
        cursor.rebase(info.created, info.state.last_seq, options.where)
        self._generation += 1
        generation = self._generation

        async def deliver(msg: Msg) -> None:
            entry = _entry_from_msg(msg)
            if entry is not None:
                inbox.put_nowait(_Delivery(generation, entry))

        subscription = await self.js.subscribe(
            options.subject,
            stream=options.stream,
            cb=deliver,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            idle_heartbeat=options.heartbeat,
            inactive_threshold=max(10.0, 4 * options.heartbeat),
        )
        watcher = _Watcher(self, subscription, generation, info.created, inbox)
        self._watchers.add(watcher)
        # A re-open was announced by the line that said why; one line is enough.
        level = logging.DEBUG if cursor.opened else logging.INFO
        logger.log(
            level, "watching %s after revision %d", options.where, cursor.revision
        )
        cursor.opened = True
        return watcher

    async def _check(self, watcher: _Watcher) -> bool:
        """Say whether `watcher`'s stream and consumer are still the ones it had."""
        where = self.options.where
        try:
            info = await self.js.stream_info(self.options.stream)
            await watcher.subscription.consumer_info()
        except nats.js.errors.NotFoundError as exc:
            logger.warning(
                "the watch on %s lost its stream or consumer: %s", where, exc
            )
            return False
        except (nats.errors.Error, TimeoutError):
            # NATS is out of reach; the reconnect callback re-opens the watch.
            return True

        if info.created != watcher.created:
            logger.warning("the bucket of %s was replaced; re-opening the watch", where)
            return False
        return True


class _Watcher:
    """One generation of a watch: a subscription and the entries it delivers."""

    def __init__(
        self,
        store: Store,
        subscription: JetStreamContext.PushSubscription,
        generation: int,
        created: datetime | None,
        inbox: asyncio.Queue[_Item],
    ) -> None:
        self.store = store
        self.subscription = subscription
        self.generation = generation
        self.created = created
        self.inbox = inbox
        self.stopped = False

    async def entries(self) -> AsyncIterator[Entry]:
        """Yield what this generation delivers; return when it must be re-opened."""
        every = 2 * self.store.options.heartbeat
        while True:
            try:
                # Not `wait_for`: on 3.11 it loses a cancellation that arrives
                # with an item, and the watch would outlive its sidecar.
                async with asyncio.timeout(every):
                    item = await self.inbox.get()
            except TimeoutError:
                if await self.store._check(self):
                    continue
                return

            if item is REOPEN:
                where = self.store.options.where
                logger.info("re-opening the watch on %s to catch up", where)
                return
            if item is CLOSED:
                return
            if isinstance(item, _Delivery) and item.generation == self.generation:
                yield item.entry

    async def stop(self) -> None:
        """Unsubscribe and delete the consumer, so none are left behind."""
        if self.stopped:
            return
        self.stopped = True
        self.store._watchers.discard(self)

        subscription = self.subscription
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
        if not self.store.connected:
            return
        # The ordered consumer may have replaced its consumer; `_consumer` is
        # the one it uses now, and nats-py offers no public name for it.
        consumer = subscription._consumer
        # A consumer on a server that has just stopped answers nothing; the
        # cluster drops it after `inactive_threshold`, so do not hold a re-open.
        stream = self.store.options.stream
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            async with asyncio.timeout(CONSUMER_DELETE_TIMEOUT):
                await self.store.js.delete_consumer(stream, consumer)


async def _pause(inbox: asyncio.Queue[_Item], seconds: float) -> _Item | None:
    """Wait up to `seconds`, returning early with a signal from `inbox`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            async with asyncio.timeout(left):  # not `wait_for`; see entries()
                item = await inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, _Signal):
            return item
    return None


def _operation(headers: dict[str, str] | None) -> Operation | None:
    """Read the operation of a stored message; None for an unknown marker."""
    if not headers:
        return "PUT"
    operation = headers.get(KV_OPERATION)
    if operation is not None:
        return MARKERS.get(operation)
    reason = headers.get(MARKER_REASON)
    return "PUT" if reason is None else MARKERS.get(reason)


def _entry(
    revision: int,
    headers: dict[str, str] | None,
    data: bytes | None,
    created: datetime | None,
) -> Entry | None:
    """Build an entry, or None for a marker this version does not know."""
    operation = _operation(headers)
    if operation is None:
        return None
    value = (data or b"") if operation == "PUT" else None
    return Entry(revision, operation, value, created)


def _entry_from_msg(msg: Msg) -> Entry | None:
    """Build an entry from a message delivered by the watch's consumer."""
    meta = msg.metadata
    return _entry(meta.sequence.stream, msg.headers, msg.data, meta.timestamp)


def _entry_from_raw(raw: api.RawStreamMsg) -> Entry | None:
    """Build an entry from a message read directly from the stream."""
    return _entry(raw.seq or 0, raw.headers, raw.data, raw.time)


def _store_error(action: str, exc: BaseException) -> StoreError:
    """Turn a NATS error into a StoreError that says what we were doing."""
    if isinstance(exc, nats.errors.NoRespondersError):
        reason = "no JetStream answered; is JetStream enabled on the server?"
    elif isinstance(exc, TimeoutError):
        reason = "NATS did not answer in time"
    else:
        reason = str(exc) or type(exc).__name__
    return StoreError(f"{action}: {reason}")
