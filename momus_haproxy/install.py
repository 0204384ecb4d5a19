"""Put a checked set of configuration files into the live directory.

HAProxy reads the live directory only when it starts or reloads, but a reload
can come from elsewhere at any moment (an operator, a restart of its
container), so every file there must always be whole. `install` therefore
works in two phases:

1. write every new file to a temporary file next to its destination, with
   mode 0644, and fsync it; any failure here removes the temporary files and
   leaves the live directory exactly as it was;
2. rename the temporary files over their destinations, map files and other
   companions first and `haproxy.cfg` last, so that a configuration never
   names a map that is not there yet; then fsync the directory.

The names written are recorded in a manifest (`.momus-files`), so that the
next install can remove the files the new set no longer has. Nothing else in
the directory is touched: an operator's own files there stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from momus_haproxy.errors import InstallError

__all__ = ["DIR_MODE", "FILE_MODE", "MANIFEST", "install", "read_installed"]

logger = logging.getLogger(__name__)

MANIFEST = ".momus-files"
"""Name of the file, in the live directory, that lists the files we installed."""

FILE_MODE = 0o644
"""Installed files are readable by HAProxy running as another, unprivileged user."""

DIR_MODE = 0o755
"""Directories we create are searchable by that user too."""

_MANIFEST_HEADER = "# Files written by momus-haproxy; it removes them when unused.\n"


def install(
    files: Mapping[str, str], live_dir: Path, *, config_name: str = "haproxy.cfg"
) -> None:
    """Write `files` (relative name to text) into `live_dir`, each one atomically.

    Files the previous install wrote and `files` no longer has are removed;
    files we did not write are left alone.

    Raises:
        InstallError: a name is not a plain relative path, or the directory
            or a file cannot be written (the message names the path and the
            operating system's reason).
    """
    names = _ordered_names(files, config_name)
    previous = _read_manifest(live_dir)
    staged = _stage(files, names, live_dir)

    try:
        # Record the union first: if we stop half-way, the next install still
        # knows every file that may be ours.
        _write_manifest(live_dir, sorted(set(previous) | set(names)))
        _rename(staged, names, live_dir)
    except OSError as exc:
        raise _unwritten(exc, live_dir) from exc
    finally:
        _discard(staged.values())

    stale = sorted(set(previous) - set(names))
    _remove(live_dir, stale)
    _write_manifest_quietly(live_dir, names)
    for directory in {(live_dir / name).parent for name in names} | {live_dir}:
        _sync_directory(directory)
    logger.debug(
        "installed %d files in %s, removed %d", len(names), live_dir, len(stale)
    )


def read_installed(live_dir: Path) -> dict[str, str]:
    """Return the files the last install wrote, by relative name.

    A directory without a manifest reads as empty; a listed file that has
    since disappeared is left out.

    Raises:
        InstallError: a listed file exists but cannot be read.
    """
    result: dict[str, str] = {}
    for name in _read_manifest(live_dir):
        path = live_dir / name
        try:
            result[name] = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            message = f"cannot read installed file {str(path)!r}: {exc}."
            raise InstallError(message) from exc
    return result


def _ordered_names(files: Mapping[str, str], config_name: str) -> list[str]:
    """Return the names to write, checked, companions first and config last."""
    for name in files:
        _check_name(name)
    return sorted(files, key=lambda name: (name == config_name, name))


def _check_name(name: str) -> None:
    """Refuse a name that could escape the live directory or hit the manifest."""
    path = PurePosixPath(name)
    bad = (
        not name
        or path.is_absolute()
        or ".." in path.parts
        or "\n" in name
        or "\\" in name
        or path.as_posix() != name
        or name == MANIFEST
    )
    if bad:
        message = (
            f"refusing to install {name!r}: file names must be plain relative "
            f"paths inside the live directory, other than {MANIFEST!r}."
        )
        raise InstallError(message)


def _stage(
    files: Mapping[str, str], names: list[str], live_dir: Path
) -> dict[str, Path]:
    """Write each file to a synced temporary file beside its destination."""
    staged: dict[str, Path] = {}
    try:
        for name in names:
            staged[name] = _write_temporary(live_dir / name, files[name])
    except OSError as exc:
        _discard(staged.values())
        raise _unwritten(exc, live_dir) from exc
    return staged


def _unwritten(exc: OSError, live_dir: Path) -> InstallError:
    """Build the error for a write that failed before any live file changed."""
    path = exc.filename if exc.filename is not None else live_dir
    message = (
        f"could not write {str(path)!r}: {exc.strerror or exc}; "
        "the live files were left as they were."
    )
    return InstallError(message)


def _rename(staged: dict[str, Path], names: list[str], live_dir: Path) -> None:
    """Move the staged files over their destinations, in the order given."""
    done = 0
    try:
        for name in names:
            os.replace(staged[name], live_dir / name)
            del staged[name]
            done += 1
    except OSError as exc:
        path = exc.filename if exc.filename is not None else live_dir
        message = (
            f"could not put {str(path)!r} in place: {exc.strerror or exc}; "
            f"{done} of {len(names)} files were already replaced."
        )
        raise InstallError(message) from exc


def _write_temporary(target: Path, text: str) -> Path:
    """Write `text` to a new temporary file in `target`'s directory; return it."""
    _make_directories(target.parent)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    temporary = Path(name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fchmod(stream.fileno(), FILE_MODE)
            os.fsync(stream.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _make_directories(directory: Path) -> None:
    """Create `directory` and its missing parents with mode 0755."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir()
        path.chmod(DIR_MODE)


def _read_manifest(live_dir: Path) -> list[str]:
    """Return the names the previous install recorded, or none."""
    path = live_dir / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise InstallError(f"cannot read the manifest {str(path)!r}: {exc}.") from exc

    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _write_manifest(live_dir: Path, names: Iterable[str]) -> None:
    """Replace the manifest atomically with `names`, one per line."""
    text = _MANIFEST_HEADER + "".join(f"{name}\n" for name in names)
    temporary = _write_temporary(live_dir / MANIFEST, text)
    os.replace(temporary, live_dir / MANIFEST)


def _write_manifest_quietly(live_dir: Path, names: Iterable[str]) -> None:
    """Record the final set; on failure the wider set already recorded stays."""
    try:
        _write_manifest(live_dir, names)
    except OSError as exc:
        logger.warning("could not update %s: %s", live_dir / MANIFEST, exc)


def _remove(live_dir: Path, names: Iterable[str]) -> None:
    """Remove the files of a previous install that the new set no longer has."""
    for name in names:
        path = live_dir / name
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove the unused file %s: %s", path, exc)


def _discard(paths: Iterable[Path]) -> None:
    """Remove temporary files, ignoring those already gone."""
    for path in list(paths):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _sync_directory(directory: Path) -> None:
    """Flush the directory's entries, so the renames survive a power cut."""
    try:
        handle = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as exc:
        logger.debug("fsync of %s failed: %s", directory, exc)
    finally:
        os.close(handle)
