"""`haproxy -c` as the judge of a candidate configuration."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from momus_haproxy.check import alert_lines, check, haproxy_version
from momus_haproxy.errors import CheckError, CheckUnavailableError
from tests.support.haproxy import simple_config

ALERT_OUTPUT = """\
[NOTICE]   (3818) : haproxy version is 2.6.12-1+deb12u4
[NOTICE]   (3818) : path to executable is /usr/sbin/haproxy
[ALERT]    (3818) : config : parsing [haproxy.cfg:2] : unknown keyword 'bogus' in \
'global' section
[ALERT]    (3818) : config : Error(s) found in configuration file : haproxy.cfg
[ALERT]    (3818) : config : Fatal errors found in configuration.
"""


def fake_haproxy(directory: Path, script: str) -> str:
    """Write an executable shell script that stands in for haproxy; return its path."""
    path = directory / "fake-haproxy"
    path.write_text(f"#!/bin/sh\n{script}\n", encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


async def test_valid_configuration_passes(tmp_path: Path, haproxy_bin: str) -> None:
    """A valid configuration passes and its output is returned."""
    simple_config(tmp_path, listen_port=18000, server_port=18001)

    output = await check(tmp_path, haproxy_bin=haproxy_bin)

    assert "Configuration file is valid" in output


async def test_warnings_are_returned_on_success(
    tmp_path: Path, haproxy_bin: str
) -> None:
    """Warnings do not fail the check; they come back in the output."""
    (tmp_path / "haproxy.cfg").write_text(
        "defaults\n    mode http\nfrontend web\n    bind 127.0.0.1:18000\n",
        encoding="utf-8",
    )

    output = await check(tmp_path, haproxy_bin=haproxy_bin)

    assert "missing timeouts for frontend 'web'" in output


async def test_invalid_configuration_raises_with_haproxys_alert(
    tmp_path: Path, haproxy_bin: str
) -> None:
    """A refused configuration raises CheckError quoting HAProxy's precise alert."""
    simple_config(
        tmp_path, listen_port=18000, server_port=18001, global_lines=["bogus 1"]
    )

    with pytest.raises(CheckError) as caught:
        await check(tmp_path, haproxy_bin=haproxy_bin)

    message = str(caught.value)
    assert "parsing [haproxy.cfg:2] : unknown keyword 'bogus'" in message
    assert "Fatal errors" not in message
    assert "[ALERT]" in caught.value.output


async def test_relative_paths_resolve_in_the_config_directory(
    tmp_path: Path, haproxy_bin: str
) -> None:
    """A map named relatively is found in the checked directory, wherever we run."""
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "hosts.map").write_text("a.example app\n", encoding="utf-8")
    simple_config(
        tmp_path,
        listen_port=18000,
        server_port=18001,
        frontend_lines=[
            "http-request set-var(txn.site) req.hdr(host),lower,map_str(maps/hosts.map)"
        ],
    )

    await check(tmp_path, haproxy_bin=haproxy_bin)


async def test_exit_status_alone_decides_success(tmp_path: Path) -> None:
    """Alert-looking output with exit status 0 still passes."""
    simple_config(tmp_path, listen_port=18000, server_port=18001)
    binary = fake_haproxy(tmp_path, "echo '[ALERT] (1) : looks bad'; exit 0")

    output = await check(tmp_path, haproxy_bin=binary)

    assert "looks bad" in output


async def test_exit_status_alone_decides_failure(tmp_path: Path) -> None:
    """A non-zero exit status fails even without any alert, quoting the output."""
    simple_config(tmp_path, listen_port=18000, server_port=18001)
    binary = fake_haproxy(tmp_path, "echo 'something odd'; exit 2")

    with pytest.raises(CheckError, match=r"exit status 2\): something odd") as caught:
        await check(tmp_path, haproxy_bin=binary)
    assert not isinstance(caught.value, CheckUnavailableError)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ("kill -KILL $$", "killed by SIGKILL"),
        ("echo 'cannot run'; exit 126", "exited with status 126"),
    ],
    ids=["killed", "shell-could-not-run-it"],
)
async def test_a_check_without_verdict_is_unavailable(
    tmp_path: Path, script: str, reason: str
) -> None:
    """A check killed, or one a shell could not run, gives no verdict to retry."""
    simple_config(tmp_path, listen_port=18000, server_port=18001)
    binary = fake_haproxy(tmp_path, script)

    with pytest.raises(CheckUnavailableError, match=f"no verdict.*{reason}"):
        await check(tmp_path, haproxy_bin=binary)


async def test_a_check_that_hangs_is_stopped(tmp_path: Path) -> None:
    """A check that runs past its time limit is killed and reported."""
    simple_config(tmp_path, listen_port=18000, server_port=18001)
    binary = fake_haproxy(tmp_path, "exec sleep 30")

    with pytest.raises(CheckUnavailableError, match=r"did not finish within 0\.3 s"):
        await check(tmp_path, haproxy_bin=binary, timeout=0.3)


async def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    """A missing haproxy binary names itself and how to install it."""
    simple_config(tmp_path, listen_port=18000, server_port=18001)

    with pytest.raises(
        CheckUnavailableError, match=r"'no-such-haproxy'.*apt-get install haproxy"
    ):
        await check(tmp_path, haproxy_bin="no-such-haproxy")


async def test_missing_configuration_is_named(tmp_path: Path, haproxy_bin: str) -> None:
    """Checking a directory without haproxy.cfg names the missing file."""
    with pytest.raises(CheckError, match=r"no configuration to check at '.*haproxy"):
        await check(tmp_path / "absent", haproxy_bin=haproxy_bin)


def test_alert_lines_keep_the_precise_part() -> None:
    """Alert prefixes and the generic closing alerts are dropped."""
    assert alert_lines(ALERT_OUTPUT) == [
        "parsing [haproxy.cfg:2] : unknown keyword 'bogus' in 'global' section"
    ]


def test_alert_lines_join_continuations() -> None:
    """Lines HAProxy continues with `|` join their alert."""
    output = "[ALERT]    (1) : config : first part\n   | second part\nother\n"

    assert alert_lines(output) == ["first part second part"]


def test_haproxy_version_reads_the_installed_version(haproxy_bin: str) -> None:
    """`haproxy_version` returns the version string HAProxy prints."""
    assert haproxy_version(haproxy_bin).startswith(("2.", "3."))


def test_haproxy_version_of_a_missing_binary_fails() -> None:
    """`haproxy_version` on a missing binary explains how to install one."""
    with pytest.raises(CheckError, match="apt-get install haproxy"):
        haproxy_version("no-such-haproxy")
