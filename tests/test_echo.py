"""The echo backends that the HAProxy tests send traffic to."""

from __future__ import annotations

import http.client
import socket
import time

import pytest

from tests.support.echo import EchoBackends, free_port, http_request, read_response


def test_echo_reports_backend_method_raw_path_and_headers(
    echo_backends: EchoBackends,
) -> None:
    """A request is answered 200 with its method, raw path and lower-cased headers."""
    backend = echo_backends.start("d1")

    response = http_request(
        backend.port, "GET", "app.example.test", "/a/b?x=%2F&y=1", {"X-Test": "yes"}
    )

    assert response.status == 200
    assert response.json["backend"] == "d1"
    assert response.json["method"] == "GET"
    assert response.json["path"] == "/a/b?x=%2F&y=1"
    assert response.json["headers"]["host"] == "app.example.test"
    assert response.json["headers"]["x-test"] == "yes"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "PURGE"])
def test_echo_answers_any_method(echo_backends: EchoBackends, method: str) -> None:
    """Every method, even one HTTP does not define, gets the echo."""
    backend = echo_backends.start("d1")

    response = http_request(backend.port, method, "h", "/", body=b"payload")

    assert (response.status, response.json["method"]) == (200, method)


def test_echo_answers_head_without_body(echo_backends: EchoBackends) -> None:
    """HEAD gets status and headers only."""
    backend = echo_backends.start("d1")

    response = http_request(backend.port, "HEAD", "h", "/")

    assert response.status == 200
    assert response.text == ""


def test_health_rule_requires_the_host(echo_backends: EchoBackends) -> None:
    """A `/health` rule answers 200 for its Host only, `else_status` otherwise."""
    rules = {"/health": {"require_host": "app.example.test", "else_status": 400}}
    backend = echo_backends.start("d1", rules=rules)

    good = http_request(backend.port, "GET", "app.example.test", "/health")
    bad = http_request(backend.port, "GET", "other.example", "/health")
    elsewhere = http_request(backend.port, "GET", "other.example", "/")

    assert (good.status, bad.status, elsewhere.status) == (200, 400, 200)


def test_sleep_query_delays_the_answer(echo_backends: EchoBackends) -> None:
    """`?sleep=0.3` holds the answer back for that long."""
    backend = echo_backends.start("d1")

    started = time.monotonic()
    response = http_request(backend.port, "GET", "h", "/?sleep=0.3")

    assert response.status == 200
    assert time.monotonic() - started >= 0.3


def test_keep_alive_serves_several_requests_on_one_connection(
    echo_backends: EchoBackends,
) -> None:
    """HTTP/1.1 keep-alive: one connection carries several requests."""
    backend = echo_backends.start("d1")
    connection = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=5)

    try:
        statuses = []
        for _ in range(3):
            connection.request("GET", "/", headers={"Host": "h"})
            statuses.append(read_response(connection.getresponse()).status)
        local_ports = {connection.sock.getsockname()[1]}
    finally:
        connection.close()

    assert statuses == [200, 200, 200]
    assert len(local_ports) == 1
    assert len(backend.requests) == 3


def test_stopped_backend_refuses_then_restarts_on_same_port(
    echo_backends: EchoBackends,
) -> None:
    """`stop()` refuses connections; `start()` listens on the same port again."""
    backend = echo_backends.start("d1")
    port = backend.port

    backend.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    backend.start()

    assert backend.port == port
    assert http_request(port, "GET", "h", "/").status == 200


def test_free_port_can_be_bound() -> None:
    """`free_port()` returns a loopback port that can be listened on."""
    port = free_port()

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
