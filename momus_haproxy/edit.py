"""Commands that read and change the routing document, and the logic under them.

Every change is a read-modify-write with a revision check: the document is read
with its revision, changed, validated whole, and put only if the key is still
at that revision. When another writer got there first:

- a merge (`routes add|remove`, `clusters add|remove`, `config import
  --strategy merge`) is done again on the newer document, so both changes
  are kept; an import is written only if its changes are still the ones
  previewed;
- anything that replaces the document (`config import --strategy replace`,
  `config rollback`) is refused, saying which revision came in between.

Documents are handled as the JSON their authors wrote (keys in any letter
case are found, and kept as written); only the routes and clusters a command
touches are rewritten. Diffs compare routes by `RouteId` and clusters by
`ClusterId`, on their validated form, so a change of key case or of
host-name case is not a change.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib
import json
import random
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

import click
import nats.errors
import nats.js.errors
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from . import document as document_module
from .cli import (
    build_nats_options,
    config_group,
    fail,
    main,
    nats_options,
    read_input,
    render_options,
    render_settings,
)
from .document import Cluster, LoadBalancing, Route, load_json, parse_document
from .errors import DocumentError, Issue, MomusError, StoreError
from .render import Rendered, RenderSettings, render
from .status import format_table
from .watch import KV_OPERATION, MARKER_REASON, NatsOptions, Store

__all__ = [
    "ConflictError",
    "DocumentDiff",
    "EditError",
    "FieldChange",
    "ItemChange",
    "Snapshot",
    "diff_documents",
    "document_schema",
    "load_raw",
    "merge_documents",
    "plan_changes",
    "snapshot",
    "update_document",
]

Raw = dict[str, Any]
Section = Literal["route", "cluster"]

SECTIONS: Final[dict[Section, tuple[str, str]]] = {
    "route": ("Routes", "RouteId"),
    "cluster": ("Clusters", "ClusterId"),
}
ATTEMPTS: Final = 10
"""How many times a merge is tried against a document other writers change."""


class EditError(MomusError):
    """A change to the document was refused before it reached the store."""

    exit_code = 1


class ConflictError(EditError):
    """Another writer changed the document in a way this change cannot merge."""

    exit_code = 8


# ---- the document as written ---------------------------------------------


def load_raw(data: bytes | str) -> Raw:
    """Read a document's JSON object as written, without validating it."""
    value = load_json(data)
    if not isinstance(value, dict):
        raise DocumentError([Issue("", "the document must be a JSON object")])
    return value


def dump_raw(raw: Raw) -> bytes:
    """Write a document as indented JSON, the way the commands store it."""
    return (json.dumps(raw, indent=2, ensure_ascii=False) + "\n").encode()


def _key(mapping: Raw, name: str) -> str | None:
    """Return the key of `mapping` that is `name` in any letter case."""
    return next((k for k in mapping if str(k).lower() == name.lower()), None)


def _get(mapping: Any, name: str) -> Any:
    """Return the value of `mapping` under `name` in any letter case."""
    if not isinstance(mapping, dict):
        return None
    key = _key(mapping, name)
    return None if key is None else mapping[key]


def section_items(raw: Raw, section: Section) -> list[Any]:
    """Return the routes or clusters of a document as written."""
    items = _get(raw, SECTIONS[section][0])
    return list(items) if isinstance(items, list) else []


def item_id(item: Any, section: Section) -> str | None:
    """Return a route's `RouteId` or a cluster's `ClusterId`, if it has one."""
    value = _get(item, SECTIONS[section][1])
    return value if isinstance(value, str) else None


def with_items(raw: Raw, section: Section, items: list[Any]) -> Raw:
    """Return the document with its routes or clusters replaced."""
    name = SECTIONS[section][0]
    return {**raw, _key(raw, name) or name: items}


def _by_id(raw: Raw, section: Section) -> dict[str, Any]:
    """Index routes or clusters by id; items without one by their position."""
    items: dict[str, Any] = {}
    for index, item in enumerate(section_items(raw, section)):
        items.setdefault(item_id(item, section) or f"#{index}", item)
    return items


def routes_using(raw: Raw, cluster_id: str) -> list[str]:
    """Return the ids of the routes that send to `cluster_id`."""
    return [
        item_id(route, "route") or "?"
        for route in section_items(raw, "route")
        if _get(route, "ClusterId") == cluster_id
    ]


def duplicate_ids(raw: Raw) -> list[Issue]:
    """Return an issue for each RouteId or ClusterId given twice in `raw`."""
    issues = []
    for section, (name, id_field) in SECTIONS.items():
        seen: set[str] = set()
        for index, item in enumerate(section_items(raw, section)):
            ident = item_id(item, section)
            if ident in seen:
                where = f"{name}[{index}].{id_field}"
                issues.append(Issue(where, f"{ident!r} is used twice"))
            if ident is not None:
                seen.add(ident)
    return issues


def merge_documents(current: Raw, incoming: Raw) -> Raw:
    """Merge `incoming` into `current` by RouteId and ClusterId; incoming wins.

    Raises DocumentError when `incoming` gives an id twice.
    """
    issues = duplicate_ids(incoming)
    if issues:
        raise DocumentError(issues)
    result = copy.deepcopy(current)
    for section in SECTIONS:
        items = section_items(result, section)
        index = {item_id(item, section): i for i, item in enumerate(items)}
        for item in section_items(incoming, section):
            ident = item_id(item, section)
            if ident is not None and ident in index:
                items[index[ident]] = item
            else:
                index[ident] = len(items)
                items.append(item)
        result = with_items(result, section, items)
    return result


# ---- diffs ----------------------------------------------------------------


VALUE_WIDTH: Final = 60
"""Characters of a field's value shown in a diff line before it is cut short."""


def shown_value(value: Any) -> str:
    """Write a field's value as compact JSON on one line, cut short when long.

    None stands for a field that is not set (or set to its default).
    """
    if value is None:
        return "(unset)"
    text = json.dumps(value)
    if len(text) <= VALUE_WIDTH:
        return text
    return f"{text[: VALUE_WIDTH - 3]}..."


@dataclass(frozen=True)
class FieldChange:
    """One field of a changed route or cluster: its path, old and new value.

    Values are in their validated JSON form; None where the field is not set
    on that side (or is set to its default).
    """

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {shown_value(self.old)} -> {shown_value(self.new)}"

    def as_json(self) -> dict[str, Any]:
        """The field change as a JSON object, with whole values."""
        return {"path": self.path, "old": self.old, "new": self.new}


@dataclass(frozen=True)
class ItemChange:
    """One route or cluster added, removed or changed (with the fields that did)."""

    kind: Literal["added", "removed", "changed"]
    section: Section
    id: str
    fields: tuple[FieldChange, ...] = ()

    @property
    def sign(self) -> str:
        """`+`, `-` or `~`."""
        return {"added": "+", "removed": "-", "changed": "~"}[self.kind]

    @property
    def paths(self) -> tuple[str, ...]:
        """The paths of the changed fields."""
        return tuple(field.path for field in self.fields)

    def __str__(self) -> str:
        fields = f": {', '.join(self.paths)}" if self.fields else ""
        return f"{self.sign} {self.section} {self.id}{fields}"

    def lines(self) -> list[str]:
        """The change, then one indented line per field with its old and new value."""
        head = f"{self.sign} {self.section} {self.id}"
        return [head, *(f"    {field}" for field in self.fields)]

    def as_json(self) -> dict[str, Any]:
        """The change as a JSON object."""
        return {
            "change": self.kind,
            "type": self.section,
            "id": self.id,
            "fields": [field.as_json() for field in self.fields],
        }


@dataclass(frozen=True)
class DocumentDiff:
    """The routes and clusters that differ between two documents."""

    changes: tuple[ItemChange, ...] = ()

    @property
    def empty(self) -> bool:
        """Whether no route or cluster differs."""
        return not self.changes

    def lines(self) -> list[str]:
        """Each change with its changed fields' values, or one line saying none."""
        if self.empty:
            return ["no route or cluster changes"]
        return [line for change in self.changes for line in change.lines()]

    def as_json(self) -> list[dict[str, Any]]:
        """The changes as a JSON array."""
        return [change.as_json() for change in self.changes]


_MODELS: Final[dict[Section, type[BaseModel]]] = {"route": Route, "cluster": Cluster}


def canonical(item: Any, section: Section) -> Any:
    """Return an item's validated form, or the item itself when it is invalid."""
    try:
        model = _MODELS[section].model_validate(item)
    except ValidationError:
        return item
    data = model.model_dump(mode="json", exclude_defaults=True)
    path = data.get("Match", {}).get("Path")
    if isinstance(path, dict):
        data["Match"]["Path"] = path.get("template")
    return data


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[FieldChange]:
    """List the fields, by dotted path, at which two JSON values differ.

    Objects are compared key by key; any other value (a list, a string) is
    one field. A key missing on one side has the value None there.
    """
    if old == new:
        return []
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [FieldChange(prefix or "(whole)", old, new)]
    fields: list[FieldChange] = []
    for key in sorted({*old, *new}, key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        fields += _changed_fields(old.get(key), new.get(key), path)
    return fields


def diff_documents(old: Raw, new: Raw) -> DocumentDiff:
    """Compare two documents route by route and cluster by cluster."""
    changes: list[ItemChange] = []
    for section in SECTIONS:
        before, after = _by_id(old, section), _by_id(new, section)
        for ident, item in after.items():
            if ident not in before:
                changes.append(ItemChange("added", section, ident))
                continue
            fields = _changed_fields(
                canonical(before[ident], section), canonical(item, section)
            )
            if fields:
                changes.append(ItemChange("changed", section, ident, tuple(fields)))
        changes += [
            ItemChange("removed", section, ident)
            for ident in before
            if ident not in after
        ]
    return DocumentDiff(tuple(changes))


# ---- reading and writing with a revision check ----------------------------


@dataclass(frozen=True)
class Snapshot:
    """The key at one revision: the document there, if the key holds one.

    `revision` is the key's latest revision, a value or a delete marker (0
    when it was never written); a put expecting it fails if anyone wrote since.
    """

    revision: int
    value: bytes | None

    @property
    def raw(self) -> Raw:
        """The document as written; an empty one when the key holds none.

        Raises:
            EditError: the stored value is not a JSON object, so nothing can be
                merged into it (a replacing command can still be used).
        """
        if self.value is None:
            return {"Routes": [], "Clusters": []}
        try:
            return load_raw(self.value)
        except DocumentError as exc:
            raise EditError(
                f"the stored revision {self.revision} is not a JSON document "
                f"({exc.summary()}); replace it with `config rollback REV`, "
                "`config import FILE --strategy replace` or `config put FILE`"
            ) from None

    def raw_or_empty(self) -> Raw:
        """The document as written, or an empty one when it cannot be read."""
        try:
            return self.raw
        except EditError:
            return {"Routes": [], "Clusters": []}


async def snapshot(store: Store) -> Snapshot:
    """Read the key's latest revision and its value in one request."""
    options = store.options
    try:
        raw = await store.js.get_last_msg(options.stream, options.subject)
    except nats.js.errors.NotFoundError:
        return Snapshot(0, None)
    except (nats.errors.Error, TimeoutError) as exc:
        raise StoreError(f"cannot read {options.where}: {exc}") from exc
    headers = raw.headers or {}
    marker = KV_OPERATION in headers or MARKER_REASON in headers
    if marker and headers.get(KV_OPERATION, "PUT") != "PUT":
        return Snapshot(raw.seq or 0, None)
    return Snapshot(raw.seq or 0, raw.data or b"")


@dataclass(frozen=True)
class Update:
    """What `update_document` did: the revision now current, and the change."""

    revision: int
    diff: DocumentDiff
    written: bool
    attempts: int = 1


def _is_conflict(exc: StoreError) -> bool:
    # `Store.put` raises StoreError from the NATS error for a stale revision.
    """Whether a StoreError is a put refused for a stale revision."""
    return isinstance(exc.__cause__, nats.js.errors.KeyWrongLastSequenceError)


def _validated(raw: Raw) -> bytes:
    """Write a document as JSON and refuse it if it does not validate."""
    data = dump_raw(raw)
    parse_document(data)
    return data


async def update_document(
    store: Store,
    change: Callable[[Raw], Raw],
    *,
    merge: bool = True,
    start: Snapshot | None = None,
    expect: DocumentDiff | None = None,
) -> Update:
    """Apply `change` to the stored document and put it with a revision check.

    `change` gets a copy of the document and returns the new one; it may raise
    EditError. The result is validated whole before it is put. On a conflict
    a merge is done again on the newer document (up to `ATTEMPTS` times);
    otherwise ConflictError. With `expect`, the change is put only while its
    diff is still that one (what a user confirmed).
    """
    current = start or await snapshot(store)
    for attempt in range(1, ATTEMPTS + 1):
        base = current.raw if merge else current.raw_or_empty()
        new_raw = change(copy.deepcopy(base))
        diff = diff_documents(base, new_raw)
        if expect is not None and diff != expect:
            raise ConflictError(_changed_since(store, current.revision, "previewed"))
        written = await _put_unless_changed(store, current, new_raw, diff)
        if written is not None:
            return Update(written, diff, written != current.revision, attempt)
        latest = await snapshot(store)
        if not merge:
            message = _changed_since(store, current.revision, "read")
            raise ConflictError(f"{message} (now revision {latest.revision})")
        current = latest
        await asyncio.sleep(random.uniform(0.005, 0.05) * attempt)  # noqa: S311
    raise ConflictError(
        f"{store.options.where} kept changing under {ATTEMPTS} attempts; try again"
    )


async def _put_unless_changed(
    store: Store, current: Snapshot, new_raw: Raw, diff: DocumentDiff
) -> int | None:
    """Put `new_raw` over `current`; return the revision now current, or None
    when the key moved past `current` first."""
    if diff.empty and current.value is not None:
        latest = await snapshot(store)
        return current.revision if latest.revision == current.revision else None
    data = _validated(new_raw)
    try:
        return await store.put(data, expected_revision=current.revision)
    except StoreError as exc:
        if _is_conflict(exc):
            return None
        raise


def _changed_since(store: Store, revision: int, when: str) -> str:
    """The message for a change refused because the key moved on."""
    return (
        f"{store.options.where} changed since revision {revision} was {when}; "
        "nothing was written. Look at `config history` and run the command again"
    )


# ---- plan -----------------------------------------------------------------

Mode = Literal["none", "runtime", "reload"]
MAX_PLAN_STEPS: Final = 50
"""Past this many changes, each is not rendered on its own to plan it."""


def runtime_plan(live: Rendered, new: Rendered) -> list[str] | None:
    """Return the runtime API commands that turn `live` into `new`, or None.

    None means a reload is needed, which is also the answer when this build
    has no runtime module.
    """
    try:
        module = importlib.import_module("momus_haproxy.runtime")
    except ModuleNotFoundError as exc:
        if exc.name != "momus_haproxy.runtime":
            raise
        return None
    changes = getattr(module, "runtime_changes", None)
    if changes is None:
        return None
    commands: list[str] | None = changes(live, new)
    return commands


def _mode(live: Rendered | None, new: Rendered) -> tuple[Mode, int]:
    """How the sidecar would go from `live` to `new`, and how many commands."""
    if live is not None and live.digest == new.digest:
        return "none", 0
    commands = runtime_plan(live, new) if live is not None else None
    if commands is None:
        return "reload", 0
    return ("runtime", len(commands)) if commands else ("none", 0)


def _render(raw: Raw, settings: RenderSettings) -> Rendered | None:
    """Render a document, or None when it is refused."""
    try:
        return render(parse_document(dump_raw(raw)), settings)
    except MomusError:
        return None


@dataclass(frozen=True)
class PlanStep:
    """One change of a plan, and how the sidecar would apply it alone."""

    change: ItemChange
    mode: Mode | Literal["with the rest"]


@dataclass(frozen=True)
class Plan:
    """What putting a document would change, and how it would be applied."""

    steps: tuple[PlanStep, ...]
    mode: Mode
    commands: int
    warnings: tuple[Issue, ...] = ()

    def summary(self) -> str:
        """One line on the whole change."""
        if self.mode == "none":
            return "nothing to apply: it renders what is live"
        if self.mode == "runtime":
            return f"applied through HAProxy's runtime API ({self.commands} commands)"
        return "needs a reload of HAProxy"

    def as_json(self) -> dict[str, Any]:
        """The plan as a JSON object."""
        return {
            "mode": self.mode,
            "runtime_commands": self.commands,
            "summary": self.summary(),
            "changes": [
                {**step.change.as_json(), "mode": step.mode} for step in self.steps
            ],
            "warnings": [str(issue) for issue in self.warnings],
        }


def plan_changes(current: Raw, new: Raw, settings: RenderSettings) -> Plan:
    """Plan putting `new` over `current`: each change alone, then all of them.

    Raises DocumentError when `new` would be refused.
    """
    document = parse_document(dump_raw(new))
    target = render(document, settings)
    live = _render(current, settings)
    changes = diff_documents(current, new).changes
    mode, commands = _mode(live, target)
    if len(changes) == 1 or len(changes) > MAX_PLAN_STEPS:
        steps = [PlanStep(change, mode) for change in changes]
    else:
        steps = [
            PlanStep(change, _mode_alone(current, new, change, live, settings))
            for change in changes
        ]
    return Plan(tuple(steps), mode, commands, document.warnings)


def _mode_alone(
    current: Raw,
    new: Raw,
    change: ItemChange,
    live: Rendered | None,
    settings: RenderSettings,
) -> Mode | Literal["with the rest"]:
    """How one change would be applied if it were put on its own."""
    alone = _render(_apply_one(current, new, change), settings)
    return "with the rest" if alone is None else _mode(live, alone)[0]


def _apply_one(current: Raw, new: Raw, change: ItemChange) -> Raw:
    """Return `current` with only `change` (and the clusters it needs) made."""
    section = change.section
    items = [
        i for i in section_items(current, section) if item_id(i, section) != change.id
    ]
    result = with_items(current, section, items)
    if change.kind != "removed":
        item = _by_id(new, section)[change.id]
        result = merge_documents(result, with_items({}, section, [item]))
        cluster = _get(item, "ClusterId") if section == "route" else None
        needed = _by_id(new, "cluster").get(cluster) if cluster else None
        if needed is not None and cluster not in _by_id(result, "cluster"):
            result = merge_documents(result, {"Clusters": [needed]})
    elif section == "cluster":
        kept = [
            r
            for r in section_items(result, "route")
            if _get(r, "ClusterId") != change.id
        ]
        result = with_items(result, "route", kept)
    return result


# ---- the JSON Schema ------------------------------------------------------


_TIMESPAN: Final[JsonSchemaValue] = {
    "type": "string",
    "pattern": r"^\s*(\d+\.)?\d{1,2}:\d{1,2}:\d{1,2}(\.\d{1,7})?\s*$",
    "description": "a .NET TimeSpan such as '00:00:30'",
}
_TEXT_INPUTS: Final[dict[str, JsonSchemaValue]] = {
    "_parse_path": {
        "type": "string",
        "description": "'{**catch-all}', '/prefix/{**rest}', a literal path "
        "or '{name}' segments",
    },
    "_check_timespan": _TIMESPAN,
    "_check_timer": _TIMESPAN,
    "_check_flag": {"anyOf": [{"type": "boolean"}, {"enum": ["true", "false"]}]},
}
"""What the author writes for the document's fields that are parsed from text,
by the name of the validator that parses them."""


class _Schema(GenerateJsonSchema):
    """Describe what a document's author writes, not what validation makes of it.

    A few fields are parsed from text (`Match.Path` becomes a path template,
    time spans become milliseconds, flags may be `"true"`), and fields that
    momus-haproxy refuses are declared only so that it can name them. Their
    validators in the document module are recognised by name.
    """

    def function_before_schema(
        self, schema: core_schema.BeforeValidatorFunctionSchema
    ) -> JsonSchemaValue:
        """Show the input type of the validators that parse text."""
        known = _TEXT_INPUTS.get(_document_function(schema["function"]["function"]))
        if known is not None:
            return copy.deepcopy(known)
        return super().function_before_schema(schema)

    def function_after_schema(
        self, schema: core_schema.AfterValidatorFunctionSchema
    ) -> JsonSchemaValue:
        """Mark the YARP fields that momus-haproxy refuses."""
        name = _document_function(schema["function"]["function"])
        if name == "_reject_unsupported":
            return {"not": {}, "description": "not supported by momus-haproxy"}
        return super().function_after_schema(schema)


def _document_function(function: Any) -> str:
    """Name a function of the document module; '' for any other."""
    if getattr(function, "__module__", None) != document_module.__name__:
        return ""
    return str(getattr(function, "__name__", ""))


class _SchemaDocument(BaseModel):
    """A Momus routing document: YARP's Routes and Clusters."""

    model_config = ConfigDict(extra="forbid", title="Momus routing document")

    Routes: list[Route] = Field(default_factory=list)
    Clusters: list[Cluster] = Field(default_factory=list)


def document_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of a routing document."""
    schema = _SchemaDocument.model_json_schema(schema_generator=_Schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# ---- command helpers ------------------------------------------------------


def _run(work: Any) -> Any:
    """Run a coroutine, turning a MomusError into its message and exit code."""
    try:
        return asyncio.run(work)
    except MomusError as exc:
        fail(exc)


async def _with_store(
    nats: NatsOptions, action: Callable[[Store], Any], *, create: bool
) -> Any:
    """Open the store, run `action` with it and close it.

    Commands that only read pass `create=False`: a missing bucket is then an
    error naming it, rather than a new empty bucket left on the server.
    """
    async with Store(nats, create=create) as store:
        return await action(store)


def _echo_json(value: Any) -> None:
    """Print a value as indented JSON."""
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _report(update: Update, nats: NatsOptions) -> None:
    """Print a change and the revision it was put as."""
    for line in update.diff.lines():
        click.echo(line)
    where = f"{nats.bucket}/{nats.key}"
    if not update.written:
        click.echo(f"nothing to write; {where} stays at revision {update.revision}")
        return
    retried = f" (after {update.attempts - 1} retries)" if update.attempts > 1 else ""
    click.echo(f"put revision {update.revision} under {where}{retried}", err=True)


async def _stored_raw(store: Store) -> Raw:
    """Return the stored document, refusing when the key holds none."""
    current = await snapshot(store)
    if current.value is None:
        raise EditError(f"{store.options.where} holds no document")
    return current.raw


# ---- config history | diff | rollback | import | export --------------------


@config_group.command("history")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@nats_options
def history_command(as_json: bool, **options: Any) -> None:
    """List the revisions of the document the bucket keeps, oldest first."""
    nats = build_nats_options(options)
    entries = _run(_with_store(nats, lambda store: store.history(), create=False))
    rows = []
    for entry in entries:
        value = entry.value
        rows.append(
            {
                "revision": entry.revision,
                "time": entry.created.isoformat() if entry.created else None,
                "operation": entry.operation,
                "bytes": len(value) if value is not None else None,
                "sha256": _digest(value) if value is not None else None,
            }
        )
    if as_json:
        _echo_json(rows)
        return
    table = [
        (
            str(row["revision"]),
            (row["time"] or "-")[:19].replace("T", " "),
            str(row["operation"]),
            "-" if row["bytes"] is None else str(row["bytes"]),
            (row["sha256"] or "-")[:12],
        )
        for row in rows
    ]
    click.echo(format_table(("REVISION", "TIME", "OP", "BYTES", "SHA256"), table))


def _digest(value: bytes) -> str:
    """Return the hex SHA-256 of `value`."""
    return hashlib.sha256(value).hexdigest()


def _is_revision(text: str) -> bool:
    """Whether a diff argument names a revision rather than a file."""
    return re.fullmatch(r"[0-9]+", text) is not None and not Path(text).exists()


async def _load_side(store: Store | None, spec: str) -> bytes:
    """Read one side of a diff: a revision's value, or a file."""
    if not _is_revision(spec):
        return read_input(spec)
    assert store is not None
    entry = await store.get_revision(int(spec))
    if entry.value is None:
        raise EditError(f"revision {spec} is a {entry.operation.lower()}, not a value")
    return entry.value


def _raw_side(value: bytes, spec: str) -> Raw:
    """`load_raw` of one side of a diff; a refusal names the side."""
    try:
        return load_raw(value)
    except DocumentError as exc:
        side = f"revision {spec}" if _is_revision(spec) else spec
        issues = [
            Issue(f"{side} {issue.path}" if issue.path else side, issue.message)
            for issue in exc.issues
        ]
        raise DocumentError(issues) from exc


@config_group.command("diff")
@click.argument("old", metavar="A")
@click.argument("new", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@nats_options
def diff_command(old: str, new: str, as_json: bool, **options: Any) -> None:
    """Show the routes and clusters added, removed or changed from A to B.

    A and B are revisions of the key (numbers) or files ('-': standard input).
    """
    nats = build_nats_options(options)

    async def both() -> tuple[bytes, bytes]:
        if not (_is_revision(old) or _is_revision(new)):
            return read_input(old), read_input(new)
        async with Store(nats, create=False) as store:
            return await _load_side(store, old), await _load_side(store, new)

    before, after = _run(both())
    try:
        diff = diff_documents(_raw_side(before, old), _raw_side(after, new))
    except MomusError as exc:
        fail(exc)
    if as_json:
        _echo_json(diff.as_json())
    else:
        click.echo("\n".join(diff.lines()))


@config_group.command("rollback")
@click.argument("revision", type=click.IntRange(1))
@nats_options
def rollback_command(revision: int, **options: Any) -> None:
    """Put revision REVISION's document back as the newest revision.

    Refused when the key changes between reading and writing it.
    """
    nats = build_nats_options(options)

    async def roll(store: Store) -> Update:
        entry = await store.get_revision(revision)
        if entry.value is None:
            raise EditError(
                f"revision {revision} is a {entry.operation.lower()}; pick a "
                "revision with a value (see `config history`)"
            )
        parse_document(entry.value)
        old = load_raw(entry.value)
        return await update_document(store, lambda _: old, merge=False)

    update = _run(_with_store(nats, roll, create=True))
    _report(update, nats)


@config_group.command("export")
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    help="File to write ('-': standard output).",
)
@click.option("--revision", type=click.IntRange(1), help="Export this revision.")
@nats_options
def export_command(output: str, revision: int | None, **options: Any) -> None:
    """Write the stored document (or one revision of it) exactly as stored."""
    nats = build_nats_options(options)

    async def read(store: Store) -> bytes:
        if revision is not None:
            return await _load_side(store, str(revision))
        current = await snapshot(store)
        if current.value is None:
            raise EditError(f"{store.options.where} holds no document")
        return current.value

    value = _run(_with_store(nats, read, create=False))
    if output == "-":
        sys.stdout.buffer.write(value)
        sys.stdout.flush()
    else:
        Path(output).write_bytes(value)
        click.echo(f"wrote {len(value)} bytes to {output}", err=True)


@config_group.command("import")
@click.argument("file")
@click.option(
    "--strategy",
    type=click.Choice(["merge", "replace"]),
    default="merge",
    show_default=True,
    help="merge: add or replace by RouteId and ClusterId; replace: the whole.",
)
@click.option("--yes", "-y", is_flag=True, help="Put it without asking.")
@nats_options
def import_command(file: str, strategy: str, yes: bool, **options: Any) -> None:
    """Preview, then put FILE's routes and clusters ('-': standard input).

    With `merge`, FILE may hold only some routes and clusters; the merged
    document is what must be valid.
    """
    nats = build_nats_options(options)
    try:
        incoming = load_raw(read_input(file))
    except MomusError as exc:
        fail(exc)

    def change(raw: Raw) -> Raw:
        return merge_documents(raw, incoming) if strategy == "merge" else incoming

    start: Snapshot = _run(_with_store(nats, snapshot, create=True))
    try:
        base = start.raw if strategy == "merge" else start.raw_or_empty()
        result = change(copy.deepcopy(base))
        for warning in parse_document(dump_raw(result)).warnings:
            click.echo(f"warning: {warning}", err=True)
    except MomusError as exc:
        fail(exc)
    preview = diff_documents(base, result)
    click.echo("\n".join(preview.lines()))
    if preview.empty and start.value is not None:
        click.echo(f"nothing to write; revision {start.revision} stays", err=True)
        return
    if not yes:
        click.confirm(f"Put this over revision {start.revision}?", abort=True, err=True)

    async def put(store: Store) -> Update:
        return await update_document(
            store, change, merge=strategy == "merge", start=start, expect=preview
        )

    update = _run(_with_store(nats, put, create=True))
    where = f"{nats.bucket}/{nats.key}"
    click.echo(f"put revision {update.revision} under {where}", err=True)


# ---- plan -----------------------------------------------------------------


@main.command("plan")
@click.argument("file")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@nats_options
@render_options
def plan_command(file: str, as_json: bool, **options: Any) -> None:
    """Show what putting FILE would change, and whether it needs a reload.

    Each route and cluster change is shown with how the sidecar would apply
    it alone (HAProxy's runtime API or a reload); the last line says how the
    whole change would be applied.
    """
    nats = build_nats_options(options)
    try:
        new = load_raw(read_input(file))
        settings = render_settings(**options)
    except MomusError as exc:
        fail(exc)
    current: Snapshot = _run(_with_store(nats, snapshot, create=False))
    try:
        plan = plan_changes(current.raw_or_empty(), new, settings)
    except MomusError as exc:
        fail(exc)
    if as_json:
        _echo_json({"revision": current.revision, **plan.as_json()})
        return
    for warning in plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    rows = [
        (step.change.sign, step.change.section, step.change.id,
         ", ".join(step.change.paths), step.mode)
        for step in plan.steps
    ]  # fmt: skip
    if rows:
        click.echo(format_table(("", "TYPE", "ID", "FIELDS", "APPLIED BY"), rows))
    else:
        click.echo("no route or cluster changes")
    click.echo(f"against revision {current.revision}: {plan.summary()}")


# ---- schema ---------------------------------------------------------------


@main.command("schema")
@click.option(
    "--output", "-o", default="-", show_default=True, help="File ('-': stdout)."
)
def schema_command(output: str) -> None:
    """Print the JSON Schema of the routing document, for editors."""
    text = json.dumps(document_schema(), indent=2) + "\n"
    if output == "-":
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote the schema to {output}", err=True)


# ---- routes and clusters --------------------------------------------------


def _list_command(section: Section, as_json: bool, nats: NatsOptions) -> None:
    """Print the routes or clusters of the stored document."""
    raw = _run(_with_store(nats, _stored_raw, create=False))
    items = section_items(raw, section)
    if as_json:
        _echo_json(items)
        return
    if section == "route":
        headers: Sequence[str] = ("ROUTE", "CLUSTER", "ORDER", "HOSTS", "PATH")
        rows = [_route_row(item) for item in items]
    else:
        headers = ("CLUSTER", "POLICY", "DESTINATIONS", "ROUTES")
        rows = [_cluster_row(item, raw) for item in items]
    click.echo(format_table(headers, rows))


def _route_row(route: Any) -> tuple[str, ...]:
    """One table row for a route."""
    match = _get(route, "Match") or {}
    hosts = _get(match, "Hosts") or []
    return (
        item_id(route, "route") or "?",
        str(_get(route, "ClusterId")),
        str(_get(route, "Order") or 0),
        ",".join(str(host) for host in hosts) or "*",
        str(_get(match, "Path") or "-"),
    )


def _cluster_row(cluster: Any, raw: Raw) -> tuple[str, ...]:
    """One table row for a cluster, with the routes using it."""
    ident = item_id(cluster, "cluster") or "?"
    destinations = _get(cluster, "Destinations") or {}
    text = ",".join(
        f"{name}={_get(value, 'Address')}" for name, value in destinations.items()
    )
    return (
        ident,
        str(_get(cluster, "LoadBalancingPolicy") or "PowerOfTwoChoices"),
        text or "-",
        ",".join(routes_using(raw, ident)) or "-",
    )


def _edit(nats: NatsOptions, change: Callable[[Raw], Raw]) -> None:
    """Apply a change to the stored document and report it."""

    async def run(store: Store) -> Update:
        return await update_document(store, change)

    _report(_run(_with_store(nats, run, create=True)), nats)


def _add(section: Section, item: Raw, replace: bool) -> Callable[[Raw], Raw]:
    """A change that adds (or with `replace` overwrites) one item."""
    ident = item_id(item, section)

    def change(raw: Raw) -> Raw:
        exists = ident in _by_id(raw, section)
        if exists and not replace:
            raise EditError(
                f"{section} {ident!r} already exists; add --replace to overwrite it"
            )
        return merge_documents(raw, with_items({}, section, [item]))

    return change


def _remove(section: Section, ids: Iterable[str]) -> Callable[[Raw], Raw]:
    """A change that removes items, refusing unknown ids and used clusters."""
    wanted = set(ids)

    def change(raw: Raw) -> Raw:
        missing = sorted(wanted - set(_by_id(raw, section)))
        if missing:
            raise EditError(f"no {section} {', '.join(map(repr, missing))}")
        kept = [
            i for i in section_items(raw, section) if item_id(i, section) not in wanted
        ]
        result = with_items(raw, section, kept)
        if section == "cluster":
            _refuse_used_clusters(result, sorted(wanted))
        return result

    return change


def _refuse_used_clusters(raw: Raw, removed: list[str]) -> None:
    """Refuse removing clusters that routes still send to."""
    for cluster in removed:
        users = routes_using(raw, cluster)
        if users:
            names = ", ".join(map(repr, users))
            raise EditError(
                f"cluster {cluster!r} is used by route(s) {names}; remove them "
                "or point them at another cluster first"
            )


@main.group("routes")
def routes_group() -> None:
    """List, add and remove routes of the stored document."""


@routes_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@nats_options
def routes_list(as_json: bool, **options: Any) -> None:
    """List the routes of the stored document."""
    _list_command("route", as_json, build_nats_options(options))


@routes_group.command("add")
@click.argument("route_id")
@click.option("--cluster", required=True, help="ClusterId the route sends to.")
@click.option("--host", "hosts", multiple=True, help="A host to match (repeat).")
@click.option("--path", help="Match.Path, such as '/api/{**rest}'.")
@click.option("--order", type=int, help="Order (lower first).")
@click.option("--method", "methods", multiple=True, help="An HTTP method (repeat).")
@click.option("--redirect-www", is_flag=True, help="Metadata.RedirectWww = true.")
@click.option(
    "--original-host", is_flag=True, help="Metadata.UseOriginalHostHeader = true."
)
@click.option("--replace", is_flag=True, help="Overwrite a route with this id.")
@nats_options
def routes_add(
    route_id: str,
    cluster: str,
    hosts: tuple[str, ...],
    path: str | None,
    order: int | None,
    methods: tuple[str, ...],
    redirect_www: bool,
    original_host: bool,
    replace: bool,
    **options: Any,
) -> None:
    """Add route ROUTE_ID to the stored document (kept with others' changes)."""
    nats = build_nats_options(options)
    match: Raw = {}
    if hosts:
        match["Hosts"] = list(hosts)
    if path is not None:
        match["Path"] = path
    if methods:
        match["Methods"] = list(methods)
    route: Raw = {"RouteId": route_id, "ClusterId": cluster, "Match": match}
    if order is not None:
        route["Order"] = order
    metadata = {
        name: "true"
        for name, wanted in (
            ("RedirectWww", redirect_www),
            ("UseOriginalHostHeader", original_host),
        )
        if wanted
    }
    if metadata:
        route["Metadata"] = metadata
    _edit(nats, _add("route", route, replace))


@routes_group.command("remove")
@click.argument("route_ids", nargs=-1, required=True)
@nats_options
def routes_remove(route_ids: tuple[str, ...], **options: Any) -> None:
    """Remove the routes ROUTE_IDS from the stored document."""
    _edit(build_nats_options(options), _remove("route", route_ids))


@main.group("clusters")
def clusters_group() -> None:
    """List, add and remove clusters of the stored document."""


@clusters_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@nats_options
def clusters_list(as_json: bool, **options: Any) -> None:
    """List the clusters of the stored document and the routes using each."""
    _list_command("cluster", as_json, build_nats_options(options))


@clusters_group.command("add")
@click.argument("cluster_id")
@click.option(
    "--destination",
    "destinations",
    multiple=True,
    required=True,
    metavar="[NAME=]URL",
    help="A destination address (repeat); named d1, d2, ... unless NAME= is given.",
)
@click.option(
    "--policy",
    type=click.Choice(list(get_args(LoadBalancing))),
    help="LoadBalancingPolicy.",
)
@click.option("--health-path", help="Turn active health checks on, probing PATH.")
@click.option("--replace", is_flag=True, help="Overwrite a cluster with this id.")
@nats_options
def clusters_add(
    cluster_id: str,
    destinations: tuple[str, ...],
    policy: str | None,
    health_path: str | None,
    replace: bool,
    **options: Any,
) -> None:
    """Add cluster CLUSTER_ID to the stored document (kept with others' changes)."""
    nats = build_nats_options(options)
    cluster: Raw = {
        "ClusterId": cluster_id,
        "Destinations": _destinations(destinations),
    }
    if policy is not None:
        cluster["LoadBalancingPolicy"] = policy
    if health_path is not None:
        cluster["HealthCheck"] = {"Active": {"Enabled": True, "Path": health_path}}
    _edit(nats, _add("cluster", cluster, replace))


def _destinations(specs: tuple[str, ...]) -> Raw:
    """Build `Destinations` from `[NAME=]URL` options."""
    result: Raw = {}
    for number, spec in enumerate(specs, start=1):
        name, sep, address = spec.partition("=")
        if not sep or "://" in name:
            name, address = f"d{number}", spec
        if name in result:
            raise click.BadParameter(f"destination {name!r} is given twice")
        result[name] = {"Address": address}
    return result


@clusters_group.command("remove")
@click.argument("cluster_ids", nargs=-1, required=True)
@nats_options
def clusters_remove(cluster_ids: tuple[str, ...], **options: Any) -> None:
    """Remove clusters; refused while a route still uses one, naming the routes."""
    _edit(build_nats_options(options), _remove("cluster", cluster_ids))
