"""Fleet status: each instance reports what it serves; `status` reads them all.

Every running momus-haproxy keeps one key in a status bucket (`momus-status`
by default; the key is its instance id, the host name by default). The value
is a `StatusRecord`: the revision it serves with the hashes of that document
and of the rendered configuration, the result of its last attempt with the
error text, timestamps, and the HAProxy and momus-haproxy versions.

How records stay true:

- `Heartbeat` rewrites the record after every attempt and every `interval`
  seconds. On each beat it also reads the key's latest revision straight from
  the store, over its own connection, so that a watch that died silently
  shows up as lag (in `/readyz`, `/metrics` and `status`).
- On a clean stop the record is written one last time with state `stopped`.
- A record not rewritten for `LOST_AFTER` intervals belongs to an instance
  that vanished (killed, host gone): `status` shows it as `lost` and leaves
  it out of the fleet. The bucket is created with a maximum age (`ttl`), so
  the keys of lost and stopped instances disappear from it after that time.

`read_fleet` reads every record and the key's history into a `Fleet`, which
says whether every live instance is on the latest revision, and why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, ValidationError

from . import __version__
from .errors import StoreError
from .sidecar import ApplyResult, Sidecar
from .watch import KEY_RE, Entry, NatsOptions, Store

__all__ = [
    "DEFAULT_BUCKET",
    "SETTLED",
    "Attempt",
    "Fleet",
    "Heartbeat",
    "InstanceView",
    "StatusRecord",
    "StatusSettings",
    "Tracker",
    "check_instance_id",
    "default_instance_id",
    "find_status_bucket",
    "format_table",
    "latest_revision",
    "open_status_bucket",
    "read_fleet",
]

log = logging.getLogger(__name__)

DEFAULT_BUCKET: Final = "momus-status"
STOP_TIMEOUT: Final = 2.0
"""Seconds a stopping instance spends at most on writing its last record."""
LOST_AFTER: Final = 3
"""A record older than this many of its instance's intervals is `lost`."""

SETTLED: Final = frozenset(
    {
        "applied",
        "unchanged",
        "runtime",
        "refused",
        "check_failed",
        "kept",
        "internal_error",
    }
)
"""Results after which an instance is done with a revision.

A revision that every instance refuses is settled: the instances keep serving
the last good one, and nothing more will happen until an operator acts. An
install or reload failure is not settled: it is retried, and it is lag.
"""

SERVED: Final = frozenset({"applied", "unchanged", "runtime"})
"""Results after which an instance serves the revision it tried."""

State = Literal["running", "stopped"]


def default_instance_id() -> str:
    """Return the host name, as the instance id when none is given."""
    return socket.gethostname() or "momus-haproxy"


def check_instance_id(value: str) -> str:
    """Refuse an instance id the key-value store cannot hold as a key."""
    if not KEY_RE.match(value) or value.startswith(".") or value.endswith("."):
        raise ValueError(
            f"instance id {value!r} may only hold letters, digits and - / _ = . "
            "and may not start or end with a dot"
        )
    return value


def _now() -> str:
    """Return the current UTC time as ISO 8601 with milliseconds and a Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sha256(data: bytes | str) -> str:
    """Return the hex SHA-256 of `data`."""
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()


class Attempt(BaseModel):
    """The last revision an instance tried, and what became of it."""

    model_config = ConfigDict(extra="ignore")

    revision: int
    result: str
    error: str = ""
    at: str
    durations_ms: dict[str, float] = {}


class StatusRecord(BaseModel):
    """What one instance writes under its key in the status bucket."""

    model_config = ConfigDict(extra="ignore")

    instance: str
    state: State
    bucket: str
    key: str
    applied_revision: int | None = None
    applied_at: str | None = None
    document_sha256: str | None = None
    config_sha256: str | None = None
    document_bytes: int | None = None
    latest_revision: int | None = None
    last_attempt: Attempt | None = None
    started_at: str
    updated_at: str
    interval: float
    haproxy_version: str = ""
    version: str = ""
    hostname: str = ""
    pid: int = 0


@dataclass(frozen=True)
class StatusSettings:
    """Where and how often an instance reports its status.

    An empty `bucket` turns the write-back off; the heartbeat still reads the
    store's latest revision for readiness and metrics.
    """

    bucket: str = DEFAULT_BUCKET
    instance_id: str = field(default_factory=default_instance_id)
    interval: float = 10.0
    ttl: float = 3600.0


class Tracker:
    """This instance's progress: the revisions it settled and the store's latest.

    `lag()` is how long the store's latest revision has waited for this
    instance to settle it (see `SETTLED`); 0 when it is in step.
    """

    def __init__(
        self, sidecar: Sidecar, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.sidecar = sidecar
        self.clock = clock
        self.store_revision: int | None = None
        self.settled_revision: int | None = None
        self.attempt: Attempt | None = None
        self.applied_at: str | None = None
        self._behind_since: float | None = None

    @property
    def latest_revision(self) -> int | None:
        """The newest revision of the key seen by the watch or the heartbeat."""
        seen = [r for r in (self.sidecar.latest_revision, self.store_revision) if r]
        return max(seen) if seen else None

    def on_result(self, result: ApplyResult) -> None:
        """Record one result of the sidecar."""
        self.attempt = Attempt(
            revision=result.revision,
            result=result.outcome,
            error=result.error,
            at=_now(),
            durations_ms={k: round(v * 1000, 1) for k, v in result.durations.items()},
        )
        if result.outcome in SERVED:
            self.applied_at = self.attempt.at
        if result.outcome in SETTLED:
            self.settled_revision = max(self.settled_revision or 0, result.revision)
        self._update()

    def observe_store(self, revision: int | None) -> None:
        """Record the key's latest revision as read from the store."""
        self.store_revision = revision
        self._update()

    def lag(self) -> float:
        """Seconds the store's latest revision has waited to be settled here."""
        self._update()
        if self._behind_since is None:
            return 0.0
        return self.clock() - self._behind_since

    def _update(self) -> None:
        """Start or stop the lag clock as the instance falls behind or catches up."""
        latest = self.latest_revision
        done = max(self.settled_revision or 0, self.sidecar.applied_revision or 0)
        if latest is None or done >= latest:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = self.clock()

    def record(
        self, settings: StatusSettings, state: State, **fields: Any
    ) -> StatusRecord:
        """Build the status record of this instance as it is now."""
        good = self.sidecar.last_good
        return StatusRecord(
            instance=settings.instance_id,
            state=state,
            applied_revision=good.revision if good else None,
            applied_at=self.applied_at,
            document_sha256=_sha256(good.value) if good else None,
            config_sha256=good.digest if good else None,
            document_bytes=len(good.value) if good else None,
            latest_revision=self.latest_revision,
            last_attempt=self.attempt,
            updated_at=_now(),
            interval=settings.interval,
            version=__version__,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            **fields,
        )


async def latest_revision(store: Store) -> int | None:
    """Return the latest revision of the store's key, value or marker, or None."""
    options = store.options
    try:
        raw = await store.js.get_last_msg(options.stream, options.subject)
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        message = f"cannot read the latest revision of {options.where}: {exc}"
        raise StoreError(message) from exc
    return raw.seq


async def find_status_bucket(store: Store, bucket: str) -> KeyValue | None:
    """Return the status bucket, or None when no instance has created it yet."""
    try:
        return await store.js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return None
    except (nats.errors.Error, TimeoutError) as exc:
        raise StoreError(f"cannot open status bucket {bucket!r}: {exc}") from exc


async def open_status_bucket(
    store: Store, bucket: str, *, ttl: float, replicas: int = 1
) -> KeyValue:
    """Return the status bucket, creating it (history 1, maximum age `ttl`)."""
    found = await find_status_bucket(store, bucket)
    if found is not None:
        return found
    log.info("creating status bucket %r with a maximum age of %g s", bucket, ttl)
    try:
        return await store.js.create_key_value(
            bucket=bucket, history=1, ttl=ttl, replicas=replicas
        )
    except (nats.errors.Error, TimeoutError) as exc:
        # Another instance may have created it first.
        found = await find_status_bucket(store, bucket)
        if found is None:
            message = f"cannot create status bucket {bucket!r}: {exc}"
            raise StoreError(message) from exc
        return found


class Heartbeat:
    """Writes this instance's status record and reads the store's latest revision.

    Use it as an async context manager around the sidecar: it connects in the
    background (NATS may be down at start), writes after every attempt (call
    `wake()`) and every `interval` seconds, and writes state `stopped` on
    the way out.
    """

    def __init__(
        self,
        settings: StatusSettings,
        nats: NatsOptions,
        tracker: Tracker,
        haproxy_version: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.tracker = tracker
        options = nats.model_copy(update={"name": "momus-haproxy-status"})
        self.store = Store(options, wait=True)
        self.haproxy_version = haproxy_version
        self.started_at = _now()
        self._version = ""
        self._kv: KeyValue | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def __aenter__(self) -> Heartbeat:
        """Start beating in the background."""
        self._task = asyncio.create_task(self._beat(), name="momus-status")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop; see `aclose`."""
        await self.aclose()

    def wake(self) -> None:
        """Have the record written now (after an attempt)."""
        self._wake.set()

    async def aclose(self) -> None:
        """Stop beating, write state `stopped` (within 2 s), and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.settings.bucket:
            with contextlib.suppress(StoreError, TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.store.open()
                    await self._write("stopped")
        await self.store.aclose()

    async def _beat(self) -> None:
        """Connect, then write the record on every wake-up and interval."""
        await self._connect()
        if self.haproxy_version is not None:
            with contextlib.suppress(Exception):
                self._version = await self.haproxy_version()
        while True:
            self._wake.clear()
            await self._once()
            # Not `wait_for`: on 3.11 it loses a cancellation that arrives
            # as the event is set, and the heartbeat would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.interval):
                    await self._wake.wait()

    async def _connect(self) -> None:
        """Open the connection, retrying while the bucket cannot be opened."""
        while True:
            try:
                await self.store.open()
                return
            except StoreError as exc:
                log.warning("cannot report status yet: %s", exc)
            await asyncio.sleep(self.settings.interval)

    async def _once(self) -> None:
        """Read the store's latest revision and write the record once."""
        try:
            self.tracker.observe_store(await latest_revision(self.store))
            if self.settings.bucket:
                await self._write("running")
        except StoreError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "cannot report status: %s", exc)
            self._failing = True
            return
        self._failing = False

    async def _write(self, state: State) -> None:
        """Write the record in `state`, opening the status bucket first."""
        if self._kv is None:
            self._kv = await open_status_bucket(
                self.store,
                self.settings.bucket,
                ttl=self.settings.ttl,
                replicas=self.store.options.replicas,
            )
        record = self.tracker.record(
            self.settings,
            state,
            bucket=self.store.options.bucket,
            key=self.store.options.key,
            started_at=self.started_at,
            haproxy_version=self._version,
        )
        try:
            await self._kv.put(
                self.settings.instance_id, record.model_dump_json().encode()
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(
                f"cannot write {self.settings.instance_id!r}: {exc}"
            ) from exc


@dataclass(frozen=True)
class InstanceView:
    """One instance as `status` shows it: its record and how it stands."""

    record: StatusRecord
    age: float
    condition: Literal["live", "stopped", "lost"]
    lag: int | None
    """Revisions of the key with a value between the one it serves and the latest."""

    @property
    def live(self) -> bool:
        """Whether the instance runs and reports."""
        return self.condition == "live"

    def as_json(self) -> dict[str, Any]:
        """The record plus what `status` concluded, for `--json`."""
        data = self.record.model_dump()
        data.update(
            age_seconds=round(self.age, 1), condition=self.condition, lag=self.lag
        )
        return data


@dataclass(frozen=True)
class Fleet:
    """Every instance following one key, and the key's latest revision."""

    bucket: str
    key: str
    latest: int | None
    instances: tuple[InstanceView, ...]
    elsewhere: int = 0
    """Instances in the status bucket that follow another bucket or key."""

    @property
    def live(self) -> list[InstanceView]:
        """The instances that run and report."""
        return [view for view in self.instances if view.live]

    @property
    def converged(self) -> bool:
        """Whether there are live instances and all serve the latest revision."""
        live = self.live
        if not live:
            return False
        return all(_on_latest(view, self.latest) for view in live)

    def summary(self) -> str:
        """One line: how many are on the latest revision, and why the rest are not."""
        live = self.live
        if not live:
            return f"no live instance follows {self.key!r} in bucket {self.bucket!r}"
        if self.latest is None:
            text = f"{len(live)} live; {self.key!r} holds no document"
        else:
            on = [view for view in live if _on_latest(view, self.latest)]
            text = f"{len(on)} of {len(live)} on revision {self.latest}"
            text += "".join(f"; {reason}" for reason in self._reasons())
        return text + self._absent()

    def _reasons(self) -> list[str]:
        """Why each live instance not on the latest revision is not, grouped."""
        groups: dict[str, list[str]] = {}
        for view in self.live:
            if not _on_latest(view, self.latest):
                reason = _why_behind(view, self.latest)
                groups.setdefault(reason, []).append(view.record.instance)
        return [f"{', '.join(names)} {reason}" for reason, names in groups.items()]

    def _absent(self) -> str:
        """The stopped and lost instances, and those following other keys."""
        text = ""
        for condition in ("stopped", "lost"):
            names = [
                v.record.instance for v in self.instances if v.condition == condition
            ]
            if names:
                text += f"; {', '.join(names)} {condition}"
        if self.elsewhere:
            text += f"; {self.elsewhere} more follow another key"
        return text

    def as_json(self) -> dict[str, Any]:
        """The whole view, for `status --json`."""
        return {
            "bucket": self.bucket,
            "key": self.key,
            "latest_revision": self.latest,
            "converged": self.converged,
            "summary": self.summary(),
            "instances": [view.as_json() for view in self.instances],
        }

    def table(self) -> str:
        """The instances as a text table."""
        rows = [_row(view, self.latest) for view in self.instances]
        headers = ("INSTANCE", "STATE", "REVISION", "RESULT", "AGE", "LAG")
        return format_table(headers, rows)


def _on_latest(view: InstanceView, latest: int | None) -> bool:
    """Whether the instance serves the latest revision with a value."""
    if latest is None:
        return True
    return view.record.applied_revision == latest or view.lag == 0


def _why_behind(view: InstanceView, latest: int | None) -> str:
    """Say in a few words why an instance is not on the latest revision."""
    attempt = view.record.last_attempt
    served = view.record.applied_revision
    if attempt is not None and attempt.revision == latest:
        verb = attempt.result.replace("_", " ")
        if attempt.result == "refused":
            return f"refused it: {attempt.error}"
        return f"{verb} on it: {attempt.error}" if attempt.error else verb
    if served is None:
        return "serves no revision yet"
    return f"still on revision {served}"


def _row(view: InstanceView, latest: int | None) -> tuple[str, ...]:
    """One table row for an instance."""
    record = view.record
    attempt = record.last_attempt
    result = attempt.result.replace("_", " ") if attempt else "-"
    if attempt is not None and attempt.revision != record.applied_revision:
        result += f" (r{attempt.revision})"
    state = record.state if view.condition != "lost" else "lost"
    lag = "-" if not view.live or view.lag is None else str(view.lag)
    revision = str(record.applied_revision) if record.applied_revision else "-"
    return (record.instance, state, revision, result, _age(view.age), lag)


def _age(seconds: float) -> str:
    """Write an age in seconds, minutes or hours."""
    if seconds < 120:
        return f"{max(seconds, 0):.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Lay out rows under headers in left-aligned columns, two spaces apart."""
    lines = [tuple(headers), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) for cell, width in zip(line, widths, strict=True)
        ).rstrip()
        for line in lines
    )


async def read_fleet(store: Store, bucket: str = DEFAULT_BUCKET) -> Fleet:
    """Read every status record and the key's history into a `Fleet`."""
    options = store.options
    kv = await find_status_bucket(store, bucket)
    records = await _read_records(kv) if kv is not None else []
    history = await store.history()
    latest = next((e.revision for e in reversed(history) if e.operation == "PUT"), None)
    now = time.time()
    views = []
    elsewhere = 0
    for record, written in records:
        if (record.bucket, record.key) != (options.bucket, options.key):
            elsewhere += 1
            continue
        views.append(_view(record, now - written, history, latest))
    views.sort(key=lambda view: view.record.instance)
    return Fleet(options.bucket, options.key, latest, tuple(views), elsewhere)


async def _read_records(kv: KeyValue) -> list[tuple[StatusRecord, float]]:
    """Read every record of the status bucket, with when it was written."""
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    except (nats.errors.Error, TimeoutError) as exc:
        raise StoreError(f"cannot list the status bucket: {exc}") from exc
    records = []
    for key in keys:
        try:
            entry = await kv.get(key)
            record = StatusRecord.model_validate_json(entry.value or b"")
        except nats.js.errors.KeyNotFoundError:
            continue  # aged out between the listing and the read
        except ValidationError as exc:
            log.warning("ignoring unreadable status record %r: %s", key, exc)
            continue
        except (nats.errors.Error, TimeoutError) as exc:
            raise StoreError(f"cannot read status record {key!r}: {exc}") from exc
        records.append((record, _written(record)))
    return records


def _written(record: StatusRecord) -> float:
    """When the record was written, by the writer's clock (keep clocks in sync)."""
    stamp = record.updated_at.replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


def _view(
    record: StatusRecord, age: float, history: list[Entry], latest: int | None
) -> InstanceView:
    """Decide whether a record's instance is live, stopped or lost."""
    if record.state == "stopped":
        condition: Literal["live", "stopped", "lost"] = "stopped"
    elif age > LOST_AFTER * record.interval:
        condition = "lost"
    else:
        condition = "live"
    return InstanceView(record, age, condition, _lag(record, history, latest))


def _lag(record: StatusRecord, history: list[Entry], latest: int | None) -> int | None:
    """Count the key's revisions with a value that the instance has not served."""
    if latest is None:
        return 0
    served = record.applied_revision or 0
    if served >= latest:
        return 0
    puts = [e.revision for e in history if e.operation == "PUT"]
    if served and puts and served < puts[0]:
        return None  # older than the history the bucket keeps
    return sum(1 for revision in puts if served < revision <= latest)
