"""Read a route's `Transforms` list into typed steps the renderer can write.

YARP keeps each transform as a small dictionary whose keys say what it is
(`{"PathRemovePrefix": "/api"}`, `{"RequestHeader": "X-A", "Set": "1"}`).
`parse_transforms` turns the list into `Transform` values; `check_transforms`
lists the problems by field path so that validation refuses the document
before anything is rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .document import described, path_step
from .errors import Issue, quoted

__all__ = ["Transform", "check_transforms", "parse_transforms"]

_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}\Z")
_PATH_RE = re.compile(r"^/[A-Za-z0-9\-._~!$&()*+,;=:@%/]{0,1023}\Z")
_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_FORWARDED_ACTIONS = ("Set", "Append", "Remove", "Off")
_FORWARDED_PARTS = ("For", "Proto", "Host", "Prefix")

SUPPORTED = {
    "PathPrefix": set(),
    "PathRemovePrefix": set(),
    "PathSet": set(),
    "RequestHeader": {"Set", "Append"},
    "RequestHeaderRemove": set(),
    "ResponseHeader": {"Set", "Append", "When"},
    "ResponseHeaderRemove": {"When"},
    "RequestHeaderOriginalHost": set(),
    "X-Forwarded": {*_FORWARDED_PARTS, "HeaderPrefix"},
}
UNSUPPORTED = {
    "PathPattern",
    "QueryValueParameter",
    "QueryRouteParameter",
    "QueryRemoveParameter",
    "HttpMethodChange",
    "RequestHeadersCopy",
    "RequestHeaderRouteValue",
    "RequestHeadersAllowed",
    "ResponseHeadersCopy",
    "ResponseHeadersAllowed",
    "ResponseTrailersCopy",
    "ResponseTrailer",
    "ResponseTrailerRemove",
    "ResponseTrailersAllowed",
    "ClientCert",
    "Forwarded",
}


@dataclass(frozen=True)
class Transform:
    """One transform step.

    `kind` is the YARP name (`RequestHeader`, ...); `name` the header or path
    it works on; `value` the value to set; `action` `Set`/`Append` for header
    writes, or the X-Forwarded action; `when` `Success`/`Always`/`Failure`
    for response headers; `parts` the per-header X-Forwarded actions.
    """

    kind: str
    name: str = ""
    value: str = ""
    action: str = ""
    when: str = "Success"
    parts: dict[str, str] = field(default_factory=dict)
    header_prefix: str = "X-Forwarded-"


def check_transforms(items: list[dict[str, Any]], where: str) -> list[Issue]:
    """Return every problem of a `Transforms` list, each with its field path."""
    issues: list[Issue] = []
    for index, item in enumerate(items):
        try:
            _parse_one(item)
        except _TransformError as exc:
            path = f"{where}[{index}]" + (path_step(exc.key) if exc.key else "")
            issues.append(Issue(path, exc.message))
    return issues


def parse_transforms(items: list[dict[str, Any]]) -> list[Transform]:
    """Parse a `Transforms` list that `check_transforms` found no problem in."""
    return [_parse_one(item) for item in items]


class _TransformError(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _canonical(item: dict[str, Any]) -> tuple[str, dict[str, str]]:
    names = {n.lower(): n for n in (*SUPPORTED, *UNSUPPORTED)}
    extras = {e.lower(): e for keys in SUPPORTED.values() for e in keys}
    kinds = [names[k.lower()] for k in item if k.lower() in names]
    if len(kinds) != 1:
        found = quoted(list(item)) if item else "nothing"
        raise _TransformError("", f"names no single known transform (found {found})")
    kind = kinds[0]
    if kind in UNSUPPORTED:
        raise _TransformError(
            kind, "is a YARP transform momus-haproxy does not support"
        )
    values: dict[str, str] = {}
    for key, value in item.items():
        name = names.get(key.lower()) or extras.get(key.lower())
        if name is None or (name != kind and name not in SUPPORTED[kind]):
            raise _TransformError(key, f"is not a key of a {kind} transform")
        if name in values:
            raise _TransformError(key, "is given twice in different letter case")
        if not isinstance(value, str):
            raise _TransformError(name, f"must be a string, not {described(value)}")
        if _CONTROL_RE.search(value) or len(value) > 1024:
            raise _TransformError(
                name, f"{quoted(value)} has a control character or is too long"
            )
        values[name] = value
    return kind, values


def _parse_one(item: Any) -> Transform:
    if not isinstance(item, dict):
        raise _TransformError("", f"must be an object, not {described(item)}")
    kind, values = _canonical(item)
    subject = values[kind]
    if kind in ("PathPrefix", "PathRemovePrefix", "PathSet"):
        return Transform(kind, name=_path(kind, subject))
    if kind == "RequestHeaderOriginalHost":
        if subject.lower() not in ("true", "false"):
            raise _TransformError(kind, f"{quoted(subject)} must be 'true' or 'false'")
        return Transform(kind, value=subject.lower())
    if kind == "X-Forwarded":
        return _forwarded(values)
    name = _header(kind, subject)
    if kind.endswith("Remove"):
        return Transform(kind, name=name, when=_when(values))
    return _header_write(kind, name, values)


def _header_write(kind: str, name: str, values: dict[str, str]) -> Transform:
    actions = [a for a in ("Set", "Append") if a in values]
    if len(actions) != 1:
        raise _TransformError(kind, "needs exactly one of 'Set' or 'Append'")
    action = actions[0]
    if not values[action]:
        # HAProxy ends a line's arguments at the first empty word.
        raise _TransformError(
            action, f"an empty value is not supported; use {kind}Remove instead"
        )
    return Transform(
        kind, name=name, value=values[action], action=action, when=_when(values)
    )


def _forwarded(values: dict[str, str]) -> Transform:
    action = _forwarded_action("X-Forwarded", values["X-Forwarded"])
    parts = {
        part: _forwarded_action(part, values.get(part, action))
        for part in _FORWARDED_PARTS
    }
    prefix = _header("HeaderPrefix", values.get("HeaderPrefix", "X-Forwarded-"))
    return Transform("X-Forwarded", action=action, parts=parts, header_prefix=prefix)


def _forwarded_action(key: str, value: str) -> str:
    for action in _FORWARDED_ACTIONS:
        if value.lower() == action.lower():
            return action
    raise _TransformError(
        key, f"{quoted(value)} is not one of: {', '.join(_FORWARDED_ACTIONS)}"
    )


def _when(values: dict[str, str]) -> str:
    when = values.get("When", "Success")
    for choice in ("Success", "Always", "Failure"):
        if when.lower() == choice.lower():
            return choice
    raise _TransformError(
        "When", f"{quoted(when)} is not one of: Success, Always, Failure"
    )


def _header(key: str, name: str) -> str:
    if not _HEADER_NAME_RE.match(name):
        raise _TransformError(
            key, f"{quoted(name)} is not a header name (letters, digits, '-', '_', '.')"
        )
    return name


def _path(key: str, value: str) -> str:
    if not _PATH_RE.match(value) or _PERCENT_RE.search(value):
        raise _TransformError(
            key,
            f"{quoted(value)} must be a literal path starting with '/' (no spaces, "
            "quotes, '#', '?', braces, and '%' only as %XX)",
        )
    return value
