"""Processes momus-haproxy starts end when it does, however it ends.

Standalone mode starts nats-server and HAProxy. When momus-haproxy is killed
with SIGKILL (or crashes past its own clean-up), they would live on as
orphans holding the ports and the NATS store, and the next start would fail
on them, or open the store a second time. Linux can send a child a signal
when its parent dies (`PR_SET_PDEATHSIG`); util-linux's `setpriv` sets it
and then runs the program, which keeps the setting across `exec`.
"""

from __future__ import annotations

import shutil

__all__ = ["ending_with_parent"]


def ending_with_parent(argv: list[str], signal_name: str) -> list[str]:
    """Return `argv` run so that it receives `signal_name` when we die.

    `signal_name` is a name such as `TERM` or `USR1`. Where `setpriv` is
    missing, `argv` is returned as it is: the child then outlives a killed
    parent, as before.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return argv
    return [setpriv, f"--pdeathsig={signal_name}", "--", *argv]
