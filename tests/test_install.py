"""Installing a checked set of files into the live configuration directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from momus_haproxy.errors import InstallError
from momus_haproxy.install import MANIFEST, install, read_installed

FILES = {
    "haproxy.cfg": "global\n# uses maps/hosts.map\n",
    "maps/hosts.map": "a.example app\n",
    "maps/paths.map": "/api api\n",
}


def mode_of(path: Path) -> int:
    """Return the permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


def test_install_writes_every_file(tmp_path: Path) -> None:
    """Every file lands under the live directory with its text."""
    install(FILES, tmp_path / "live")

    for name, text in FILES.items():
        assert (tmp_path / "live" / name).read_text(encoding="utf-8") == text


def test_installed_files_are_readable_by_other_users(tmp_path: Path) -> None:
    """Files get mode 0644 and created directories 0755, whatever the umask."""
    old_umask = os.umask(0o077)
    try:
        install(FILES, tmp_path / "live")
    finally:
        os.umask(old_umask)

    assert mode_of(tmp_path / "live" / "haproxy.cfg") == 0o644
    assert mode_of(tmp_path / "live" / "maps" / "hosts.map") == 0o644
    assert mode_of(tmp_path / "live" / "maps") == 0o755
    assert mode_of(tmp_path / "live") == 0o755


def test_config_is_renamed_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Maps are in place before haproxy.cfg, which is renamed last."""
    targets: list[str] = []
    real_replace = os.replace

    def spy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        """Record each rename target, then rename."""
        targets.append(Path(target).name)
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", spy)
    install(FILES, tmp_path)

    renamed = [name for name in targets if name != MANIFEST]
    assert renamed == ["hosts.map", "paths.map", "haproxy.cfg"]


def test_read_installed_returns_the_installed_set(tmp_path: Path) -> None:
    """`read_installed` reads back exactly what was installed."""
    install(FILES, tmp_path)

    assert read_installed(tmp_path) == FILES


def test_read_installed_of_a_fresh_directory_is_empty(tmp_path: Path) -> None:
    """A directory we never installed into reads as empty, even with a config."""
    (tmp_path / "haproxy.cfg").write_text("global\n", encoding="utf-8")

    assert read_installed(tmp_path) == {}


def test_files_dropped_from_the_set_are_removed(tmp_path: Path) -> None:
    """A file the previous install wrote and the new set lacks is removed."""
    install(FILES, tmp_path)

    install({"haproxy.cfg": "global\n"}, tmp_path)

    assert not (tmp_path / "maps" / "hosts.map").exists()
    assert not (tmp_path / "maps" / "paths.map").exists()
    assert read_installed(tmp_path) == {"haproxy.cfg": "global\n"}


def test_files_we_did_not_write_are_left_alone(tmp_path: Path) -> None:
    """An operator's own files in the live directory survive every install."""
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "mine.map").write_text("keep\n", encoding="utf-8")
    (tmp_path / "errors.http").write_text("keep\n", encoding="utf-8")

    install(FILES, tmp_path)
    install({"haproxy.cfg": "global\n"}, tmp_path)

    assert (tmp_path / "maps" / "mine.map").read_text(encoding="utf-8") == "keep\n"
    assert (tmp_path / "errors.http").read_text(encoding="utf-8") == "keep\n"


def test_no_temporary_files_remain(tmp_path: Path) -> None:
    """After an install the directory holds the set and the manifest only."""
    install(FILES, tmp_path)

    found = {
        str(path.relative_to(tmp_path))
        for path in tmp_path.rglob("*")
        if path.is_file()
    }
    assert found == {*FILES, MANIFEST}


def test_failed_install_keeps_the_previous_files(tmp_path: Path) -> None:
    """A write that fails leaves the previous files and manifest untouched."""
    install({"haproxy.cfg": "old\n"}, tmp_path)
    (tmp_path / "maps").write_text("a file where a directory must go\n")

    with pytest.raises(InstallError, match=r"could not write '.*maps'.*left as they"):
        install({**FILES, "haproxy.cfg": "new\n"}, tmp_path)

    assert read_installed(tmp_path) == {"haproxy.cfg": "old\n"}
    leftovers = [path.name for path in tmp_path.iterdir() if path.name.startswith(".h")]
    assert leftovers == []


def test_unwritable_directory_raises_install_error(tmp_path: Path) -> None:
    """A live directory that cannot be created is an InstallError naming the path."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")

    with pytest.raises(InstallError, match="not-a-directory"):
        install(FILES, blocker / "live")


@pytest.mark.parametrize(
    "name",
    ["/etc/passwd", "../outside.cfg", "maps/../../x", "", MANIFEST, "a\nb", "a//b"],
    ids=["absolute", "parent", "nested-parent", "empty", "manifest", "newline", "dup"],
)
def test_names_that_escape_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    """A name that is not a plain relative path is refused before any write."""
    with pytest.raises(InstallError, match="plain relative paths"):
        install({name: "x", "haproxy.cfg": "global\n"}, tmp_path / "live")

    assert not (tmp_path / "live").exists()
