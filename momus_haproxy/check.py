"""Check a candidate configuration with `haproxy -c` before it goes live.

HAProxy is the only judge of its own configuration: `check` runs
`haproxy -c -f haproxy.cfg` inside the candidate directory, so relative paths
in the configuration (map files, error files) resolve against that directory,
and reads the verdict from the exit status alone. The text HAProxy prints is
kept: on success it holds the warnings, on failure its `[ALERT]` lines become
the error message.

A check that gives no verdict (the binary missing, the process killed, the
time bound reached) raises `CheckUnavailableError`, which the sidecar retries;
a configuration HAProxy refused raises `CheckError`, which it does not.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
from pathlib import Path

from momus_haproxy.errors import CheckError, CheckUnavailableError

__all__ = [
    "CHECK_TIMEOUT",
    "alert_lines",
    "check",
    "haproxy_version",
    "missing_binary_message",
]

logger = logging.getLogger(__name__)

CHECK_TIMEOUT = 30.0
"""Seconds `haproxy -c` may run before the check counts as failed."""

_ALERT_PREFIX = re.compile(r"^\[ALERT\]\s*(?:\(\d+\)\s*)?:\s*(?:config\s*:\s*)?")
_GENERIC_ALERTS = (
    "Error(s) found in configuration file",
    "Fatal errors found in configuration",
)
_VERSION = re.compile(r"HA-?Proxy version (\S+)")


async def check(
    config_dir: Path,
    *,
    haproxy_bin: str = "haproxy",
    config_name: str = "haproxy.cfg",
    # The bound is ours, not the caller's: on expiry haproxy must be killed
    # and reaped, and the error must say why, which a cancellation cannot.
    timeout: float = CHECK_TIMEOUT,  # noqa: ASYNC109
) -> str:
    """Run `haproxy -c` on `config_dir/config_name` and return HAProxy's output.

    HAProxy runs with `config_dir` as its working directory and the file named
    relatively, so its messages read `[haproxy.cfg:12]` rather than a scratch
    path. Only the exit status decides: zero passes, whatever was printed.

    Raises:
        CheckUnavailableError: HAProxy could not be run, was killed, or did
            not finish within `timeout` seconds.
        CheckError: HAProxy refused the configuration (the message quotes its
            `[ALERT]` lines and `output` holds everything it printed).
    """
    config = config_dir / config_name
    if not config.is_file():
        raise CheckError(f"there is no configuration to check at {str(config)!r}.")

    output, status = await _run_check(haproxy_bin, config_dir, config_name, timeout)
    if _no_verdict(status, output):
        raise CheckUnavailableError(
            f"haproxy -c gave no verdict on {str(config)!r}: {_ended(status)} "
            "before it printed an alert.",
            output,
        )
    if status != 0:
        summary = "; ".join(alert_lines(output)) or _last_lines(output)
        raise CheckError(
            f"haproxy -c refused the configuration (exit status {status}): {summary}",
            output,
        )

    logger.debug("haproxy -c accepted %s", config)
    return output


async def _run_check(
    haproxy_bin: str,
    config_dir: Path,
    config_name: str,
    timeout: float,  # noqa: ASYNC109 - see check()
) -> tuple[str, int]:
    """Run `haproxy -c` and return its combined output and exit status."""
    try:
        process = await asyncio.create_subprocess_exec(
            haproxy_bin,
            "-c",
            "-f",
            config_name,
            cwd=config_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise CheckUnavailableError(missing_binary_message(haproxy_bin)) from exc

    # Not `wait_for`: on 3.11 it loses a cancellation that arrives as the
    # check ends, and a cancelled apply would go on to install and reload.
    try:
        async with asyncio.timeout(timeout):
            raw, _ = await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        raise
    except TimeoutError:
        process.kill()
        await process.wait()
        message = (
            f"haproxy -c on {str(config_dir / config_name)!r} did not finish "
            f"within {timeout:g} s; the check was stopped."
        )
        raise CheckUnavailableError(message) from None

    assert process.returncode is not None  # communicate() waited for the exit
    return raw.decode(errors="replace"), process.returncode


def _no_verdict(status: int, output: str) -> bool:
    """Whether `haproxy -c` ended without judging the configuration.

    Killed by a signal, HAProxy exits with a negative status; a shell in front
    of it reports 126 to 128 and above when it could not run it or saw it
    killed. HAProxy itself refuses with status 1 or 2 and an `[ALERT]`.
    """
    if status < 0:
        return True
    return status >= 126 and "[ALERT]" not in output


def _ended(status: int) -> str:
    """Say how a check without a verdict ended, from its exit status."""
    if status < 0:
        try:
            return f"it was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"it was killed by signal {-status}"
    return f"it exited with status {status}"


def alert_lines(output: str) -> list[str]:
    """Return the useful part of each `[ALERT]` in HAProxy's output.

    The `[ALERT] (pid) : config :` prefix is dropped, continuation lines that
    HAProxy indents with `|` are joined to their alert, and the closing
    "Fatal errors found" lines are left out when a more precise alert exists.
    """
    parts: list[list[str]] = []
    in_alert = False
    for line in output.splitlines():
        stripped = line.strip()
        if line.startswith("[ALERT]"):
            parts.append([_ALERT_PREFIX.sub("", line).strip()])
            in_alert = True
        elif in_alert and stripped.startswith("|"):
            parts[-1].append(stripped[1:].strip())
        else:
            in_alert = False

    alerts = [" ".join(part for part in alert if part) for alert in parts]
    precise = [a for a in alerts if not a.startswith(_GENERIC_ALERTS)]
    return precise or alerts


def _last_lines(output: str, count: int = 3) -> str:
    """Return the last non-empty lines of `output` on one line, or a placeholder."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "HAProxy printed nothing"


def missing_binary_message(haproxy_bin: str) -> str:
    """Return the sentence that explains how to get a missing haproxy binary."""
    return (
        f"cannot run HAProxy as {haproxy_bin!r}: no such executable. Install it "
        "(`apt-get install haproxy` on Debian or Ubuntu) or pass its path with "
        "--haproxy-bin."
    )


def haproxy_version(haproxy_bin: str = "haproxy") -> str:
    """Return the version HAProxy reports, such as `2.6.12-1+deb12u4`.

    Raises:
        CheckError: the binary cannot be run or its answer has no version.
    """
    try:
        result = subprocess.run(
            [haproxy_bin, "-v"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (FileNotFoundError, PermissionError) as exc:
        raise CheckError(missing_binary_message(haproxy_bin)) from exc
    except subprocess.TimeoutExpired as exc:
        message = f"{haproxy_bin!r} -v did not answer within 10 s."
        raise CheckError(message) from exc

    match = _VERSION.search(result.stdout + result.stderr)
    if match is None:
        text = (result.stdout + result.stderr).strip()
        raise CheckError(f"{haproxy_bin!r} -v printed no HAProxy version: {text!r}.")
    return match.group(1)
