"""The exceptions of momus-haproxy, one per stage of the pipeline.

Every error carries the exit code the command line uses for it::

    MomusError (1)
    +-- DocumentError (2)      the routing document was refused
    +-- RenderError (2)        the templates could not render the document
    +-- CheckError (3)         `haproxy -c` refused the rendered configuration
    +-- InstallError (4)       the configuration could not be put in place
    +-- ReloadError (5)        HAProxy did not take the new configuration
    +-- StoreError (6)         NATS or the key-value bucket failed
    +-- ProcessError (7)       a process we start (haproxy, nats-server) failed
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CheckError",
    "DocumentError",
    "InstallError",
    "Issue",
    "MomusError",
    "ProcessError",
    "ReloadError",
    "RenderError",
    "StoreError",
]


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
        """Return the problems on one line, for a log line or a status record."""
        return "; ".join(str(issue) for issue in self.issues)


class RenderError(MomusError):
    """The templates failed to render a document that passed validation."""

    exit_code = 2


class CheckError(MomusError):
    """`haproxy -c` refused the candidate configuration; holds HAProxy's output."""

    exit_code = 3

    def __init__(self, message: str, output: str = "") -> None:
        self.output = output
        super().__init__(message)


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
