"""The exceptions of momus-haproxy, one per stage of the pipeline.

Every error carries the exit code the command line uses for it::

    MomusError (1)
    +-- DocumentError (2)      the routing document was refused
    +-- RenderError (2)        the templates could not render the document
    +-- CheckError (3)         `haproxy -c` refused the rendered configuration
    |   +-- CheckUnavailableError (3)  `haproxy -c` gave no verdict at all
    +-- InstallError (4)       the configuration could not be put in place
    +-- ReloadError (5)        HAProxy did not take the new configuration
    +-- StoreError (6)         NATS or the key-value bucket failed
    +-- ProcessError (7)       a process we start (haproxy, nats-server) failed

Messages quote the value at fault through `quoted`, which shortens a long one:
a megabyte of hostile input makes a short line, not a megabyte of log.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

__all__ = [
    "QUOTE_LIMIT",
    "SUMMARY_ISSUES",
    "CheckError",
    "CheckUnavailableError",
    "DocumentError",
    "InstallError",
    "Issue",
    "MomusError",
    "ProcessError",
    "ReloadError",
    "RenderError",
    "StoreError",
    "quoted",
]

QUOTE_LIMIT = 60
"""Characters of a quoted string shown in a message before it is cut short."""

SUMMARY_ISSUES = 20
"""Problems a refusal's one-line summary lists before it counts the rest."""

_SHORT = reprlib.Repr()
_SHORT.maxlevel = 2
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 4
_SHORT.maxstring = _SHORT.maxother = 40


def quoted(value: object) -> str:
    """Return `value` quoted as `!r` would, cut short when it is long.

    A string longer than `QUOTE_LIMIT` characters shows its start and its
    length; other values (lists, objects) show their first items only.
    """
    if not isinstance(value, str):
        return _SHORT.repr(value)
    if len(value) <= QUOTE_LIMIT:
        return repr(value)
    return f"{value[:QUOTE_LIMIT]!r}... ({len(value)} characters)"


class MomusError(Exception):
    """Base of every error momus-haproxy raises on purpose."""

    exit_code = 1


@dataclass(frozen=True)
class Issue:
    """One problem found in a document, at a field path such as `Routes[0].Path`."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class DocumentError(MomusError):
    """The routing document was refused; `issues` lists every problem found."""

    exit_code = 2

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        lines = "\n".join(f"  {issue}" for issue in issues)
        count = len(issues)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"document refused, {count} {noun}:\n{lines}")

    def summary(self) -> str:
        """Return the problems on one line, for a log line or a status record.

        Past `SUMMARY_ISSUES` problems, the line says how many more there are.
        """
        shown = "; ".join(str(issue) for issue in self.issues[:SUMMARY_ISSUES])
        more = len(self.issues) - SUMMARY_ISSUES
        return f"{shown}; and {more} more problems" if more > 0 else shown


class RenderError(MomusError):
    """The templates failed to render a document that passed validation."""

    exit_code = 2


class CheckError(MomusError):
    """`haproxy -c` refused the candidate configuration; holds HAProxy's output."""

    exit_code = 3

    def __init__(self, message: str, output: str = "") -> None:
        self.output = output
        super().__init__(message)


class CheckUnavailableError(CheckError):
    """`haproxy -c` gave no verdict: it could not start, was killed or timed out.

    Unlike a refusal, the same configuration may pass once the check can run.
    """


class InstallError(MomusError):
    """The checked configuration could not be written into the live directory."""

    exit_code = 4


class ReloadError(MomusError):
    """HAProxy's master did not confirm that a new worker took the configuration."""

    exit_code = 5


class StoreError(MomusError):
    """NATS could not be reached, or the bucket or key could not be used."""

    exit_code = 6


class ProcessError(MomusError):
    """A process momus-haproxy starts itself (haproxy, nats-server) failed."""

    exit_code = 7
