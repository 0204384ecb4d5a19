"""Starting and stopping our own HAProxy in master-worker mode."""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from pathlib import Path

import pytest

from momus_haproxy.errors import ProcessError
from momus_haproxy.haproxy import HAProxyProcess
from momus_haproxy.reload import MasterSocket
from tests.support.echo import EchoBackend, EchoBackends, free_port, http_request
from tests.support.haproxy import HAProxyRunner, simple_config


async def wait_for_requests(backend: EchoBackend, count: int) -> None:
    """Wait until `backend` has received `count` requests."""
    for _ in range(200):
        if len(backend.requests) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{backend.name} got {len(backend.requests)} of {count}")


async def wait_until_no_old_workers(master: MasterSocket, within: float) -> float:
    """Wait until the master lists no old worker; return how long that took."""
    started = time.monotonic()
    while (await master.show_proc()).old_worker_pids:
        if time.monotonic() - started > within:
            raise AssertionError(f"old workers still there after {within} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def slow_get(port: int, seconds: float) -> int | str:
    """Send a request the backend holds for `seconds`; return the status or error."""
    try:
        path = f"/slow?sleep={seconds}"
        return http_request(port, "GET", "app.test", path, timeout=10).status
    except (OSError, http.client.HTTPException) as exc:
        return repr(exc)


def refuses(port: int) -> bool:
    """Return whether nothing accepts connections on `port` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_started_haproxy_serves_and_reports_its_master(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """A started HAProxy serves, and its master socket names our pid as master."""
    backend = echo_backends.start("app")
    port = free_port()
    simple_config(tmp_path / "live", listen_port=port, server_port=backend.port)

    process = await haproxy_runner(tmp_path / "live")
    state = await process.master().show_proc()

    assert state.master_pid == process.pid
    assert len(state.workers) == 1
    assert process.pid_file.read_text().strip() == str(process.pid)
    response = await asyncio.to_thread(http_request, port, "GET", "app.test", "/")
    assert (response.status, response.json["backend"]) == (200, "app")


async def test_context_manager_starts_and_stops(
    tmp_path: Path, haproxy_bin: str
) -> None:
    """`async with HAProxyProcess(...)` runs HAProxy inside the block only."""
    port = free_port()
    simple_config(tmp_path / "live", listen_port=port, server_port=free_port())

    async with HAProxyProcess(
        tmp_path / "live", tmp_path / "run", haproxy_bin=haproxy_bin
    ) as process:
        assert process.returncode is None
        assert not refuses(port)

    assert process.returncode == 0
    assert refuses(port)


async def test_failed_start_raises_with_the_log_tail(
    tmp_path: Path, haproxy_runner: HAProxyRunner
) -> None:
    """HAProxy that cannot bind its port fails to start, quoting its log."""
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        taken = squatter.getsockname()[1]
        simple_config(tmp_path / "live", listen_port=taken, server_port=free_port())

        with pytest.raises(
            ProcessError, match=r"exited with status 1(.|\n)*cannot bind"
        ):
            await haproxy_runner(tmp_path / "live")


async def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    """A missing haproxy binary is a ProcessError that says how to install it."""
    simple_config(tmp_path / "live", listen_port=free_port(), server_port=free_port())
    process = HAProxyProcess(tmp_path / "live", tmp_path / "run", haproxy_bin="nope-hx")

    with pytest.raises(ProcessError, match="apt-get install haproxy"):
        await process.start()


async def test_too_long_socket_path_is_refused_before_starting(tmp_path: Path) -> None:
    """A run directory whose socket path HAProxy cannot bind is refused up front."""
    process = HAProxyProcess(tmp_path, tmp_path / ("x" * 100))

    with pytest.raises(ProcessError, match="at most 97"):
        await process.start()


async def test_graceful_stop_finishes_the_request_in_flight(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """`aclose()` lets a slow request in flight finish, then HAProxy exits."""
    backend = echo_backends.start("app")
    port = free_port()
    simple_config(tmp_path / "live", listen_port=port, server_port=backend.port)
    process = await haproxy_runner(tmp_path / "live")

    request = asyncio.create_task(asyncio.to_thread(slow_get, port, 1.0))
    await wait_for_requests(backend, 1)
    await process.aclose()

    assert await request == 200
    assert process.returncode == 0
    assert refuses(port)


async def test_stop_escalates_when_the_soft_stop_takes_too_long(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """After `stop_timeout`, HAProxy gets SIGTERM and the slow request is cut."""
    backend = echo_backends.start("app")
    port = free_port()
    simple_config(tmp_path / "live", listen_port=port, server_port=backend.port)
    process = await haproxy_runner(tmp_path / "live", stop_timeout=0.5)

    request = asyncio.create_task(asyncio.to_thread(slow_get, port, 5.0))
    await wait_for_requests(backend, 1)
    started = time.monotonic()
    await process.aclose()

    assert time.monotonic() - started < 3
    assert process.returncode is not None
    assert await request != 200


async def test_hard_stop_after_bounds_how_long_an_old_worker_lingers(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """With `hard-stop-after 1s` an old worker holding a request exits after 1 s."""
    backend = echo_backends.start("app")
    port = free_port()
    simple_config(
        tmp_path / "live",
        listen_port=port,
        server_port=backend.port,
        global_lines=["hard-stop-after 1s"],
    )
    process = await haproxy_runner(tmp_path / "live")
    master = process.master()

    request = asyncio.create_task(asyncio.to_thread(slow_get, port, 5.0))
    await wait_for_requests(backend, 1)
    result = await master.reload()
    lingering = (await master.show_proc()).old_worker_pids
    lingered = await wait_until_no_old_workers(master, within=5.0)

    assert lingering == result.old_pids
    assert 0.8 <= lingered < 4.0
    assert await request != 200


async def test_mworker_max_reloads_bounds_the_number_of_old_workers(
    tmp_path: Path, echo_backends: EchoBackends, haproxy_runner: HAProxyRunner
) -> None:
    """With `mworker-max-reloads 1` one old worker at most is left after reloads."""
    backend = echo_backends.start("app")
    port = free_port()
    simple_config(
        tmp_path / "live",
        listen_port=port,
        server_port=backend.port,
        global_lines=["mworker-max-reloads 1"],
    )
    process = await haproxy_runner(tmp_path / "live")
    master = MasterSocket(process.master_socket)

    requests = []
    for count in range(1, 4):
        requests.append(asyncio.create_task(asyncio.to_thread(slow_get, port, 2.0)))
        await wait_for_requests(backend, count)
        await master.reload()
    await asyncio.sleep(0.2)

    assert len((await master.show_proc()).old_worker_pids) == 1
    outcomes = await asyncio.gather(*requests)
    assert outcomes[-1] == 200
    assert all(outcome != 200 for outcome in outcomes[:-1])


async def test_a_second_haproxy_on_the_same_address_fails_to_start(
    tmp_path: Path, haproxy_runner: HAProxyRunner
) -> None:
    """Two rendered configurations on one address: the second HAProxy fails.

    With SO_REUSEPORT both would listen and share the connections, and a
    forgotten second stack would silently answer part of the traffic.
    """
    from momus_haproxy.document import parse_document
    from momus_haproxy.install import install
    from momus_haproxy.render import RenderSettings, render

    empty = parse_document(b'{"Routes": [], "Clusters": []}')
    settings = RenderSettings(http_bind=f"127.0.0.1:{free_port()}", stats_bind=None)
    for name in ("first", "second"):
        install(render(empty, settings).files, tmp_path / name)
    await haproxy_runner(tmp_path / "first")
    with pytest.raises(ProcessError, match="cannot bind"):
        await haproxy_runner(tmp_path / "second")
