"""Fixtures for tests against real nats-server processes on loopback ports.

- `nats_server`: a started `EmbeddedNats` with JetStream, on a free port and a
  scratch store directory; `await nats_server.stop()` and `await
  nats_server.start()` restart it on the same port and store.
- `start_nats`: a factory, `await start_nats(config)`, for servers that need a
  configuration file (authorization, TLS); every server it starts is stopped.
- `tls_files`: a CA, a server certificate for 127.0.0.1 and a client
  certificate, made once per session with the `openssl` command.
- `operator_kv`: `async with operator_kv(url) as op:` is a second client that
  plays the operator's `nats kv put`, separate from the `Store` under test.
- `nkey_user()`: a fresh NKey user key pair (skips without `nkeys`).
- `jwt_auth()`: an operator-mode server configuration and a user JWT and seed
  for it (skips the test when the `nkeys` package is missing).
- `nats_proxy`: a TCP proxy in front of `nats_server` whose `sever()` cuts every
  connection, so a client reconnects while the server keeps its consumers.

Every process is stopped by the pid we started, at teardown at the latest.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from momus_haproxy.nats_server import EmbeddedNats, free_port

__all__ = [
    "JwtAuth",
    "Operator",
    "TcpProxy",
    "TlsFiles",
    "jwt_auth",
    "nkey_user",
    "open_operator",
    "tls_config",
]

StartNats = Callable[..., Awaitable[EmbeddedNats]]
OperatorFactory = Callable[..., contextlib.AbstractAsyncContextManager["Operator"]]


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """Start a nats-server with JetStream on a free loopback port."""
    url = f"nats://127.0.0.1:{free_port()}"
    server = EmbeddedNats(url, tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
async def start_nats(tmp_path: Path) -> AsyncIterator[StartNats]:
    """Return a coroutine that starts a nats-server with extra configuration."""
    servers: list[EmbeddedNats] = []

    async def start(config: str = "", *, scheme: str = "nats") -> EmbeddedNats:
        data_dir = tmp_path / f"nats-{len(servers)}"
        data_dir.mkdir()
        config_file = data_dir / "nats.conf"
        config_file.write_text(config)
        url = f"{scheme}://127.0.0.1:{free_port()}"
        server = EmbeddedNats(url, data_dir, config_file=config_file)
        servers.append(server)
        await server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.aclose()


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS test: a CA, a server pair and a client pair."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def tls_config(files: TlsFiles, *, verify: bool = True) -> str:
    """Return the nats-server `tls {}` block for `files`.

    With `verify`, clients must present a certificate signed by the CA.
    """
    return (
        "tls {\n"
        f'  cert_file: "{files.server_cert}"\n'
        f'  key_file: "{files.server_key}"\n'
        f'  ca_file: "{files.ca}"\n'
        f"  verify: {'true' if verify else 'false'}\n"
        "}\n"
    )


def _openssl(*args: str) -> None:
    """Run one openssl command, failing the test with its output."""
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"openssl {args[0]} failed: {done.stderr.strip()}")


def _issue(directory: Path, name: str, ca: Path, ca_key: Path, usage: str) -> None:
    """Make `name.pem` and `name.key`, signed by the CA, for `usage`."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "basicConstraints = CA:FALSE\n"
        f"extendedKeyUsage = {usage}\n"
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-out", str(cert),
        "-extfile", str(extensions),
    )  # fmt: skip


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Make a CA, a server and a client certificate with the openssl command."""
    directory = tmp_path_factory.mktemp("tls")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=momus test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    _issue(directory, "server", ca, ca_key, "serverAuth")
    _issue(directory, "client", ca, ca_key, "clientAuth")
    return TlsFiles(
        ca=ca,
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


@dataclass(frozen=True)
class JwtAuth:
    """A nats-server in operator mode, and a user's credentials for it."""

    config: str
    user_jwt: str
    user_seed: str

    def creds(self) -> str:
        """Return the user's credentials in the format of a `.creds` file."""
        return (
            "-----BEGIN NATS USER JWT-----\n"
            f"{self.user_jwt}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{self.user_seed}\n"
            "------END USER NKEY SEED------\n"
        )


def _b64(data: bytes) -> str:
    """Encode `data` as unpadded base64url, as JWTs do."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class _Signer:
    """Makes NKey pairs and signs NATS JWTs with the nkeys package."""

    def __init__(self) -> None:
        self.nkeys = pytest.importorskip("nkeys")
        self.signing = importlib.import_module("nacl.signing")

    def keypair(self, prefix: str) -> Any:
        """Make a fresh key pair of a kind such as PREFIX_BYTE_USER."""
        raw = self.signing.SigningKey.generate().encode()
        seed = self.nkeys.encode_seed(raw, getattr(self.nkeys, prefix))
        return self.nkeys.from_seed(bytearray(seed))

    def jwt(self, issuer: Any, subject: Any, nats: dict[str, Any]) -> str:
        """Return a JWT about `subject`, signed by `issuer`."""
        claims = {
            "jti": secrets.token_hex(16),
            "iat": int(time.time()),
            "iss": issuer.public_key.decode(),
            "sub": subject.public_key.decode(),
            "name": nats["type"],
            "nats": {**nats, "version": 2},
        }
        header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        body = _b64(json.dumps(claims).encode())
        signature = _b64(issuer.sign(f"{header}.{body}".encode()))
        return f"{header}.{body}.{signature}"


def nkey_user() -> Any:
    """Make an NKey user key pair; skip the test without the nkeys package."""
    return _Signer().keypair("PREFIX_BYTE_USER")


def jwt_auth() -> JwtAuth:
    """Make an operator, a JetStream account and a user; skip without nkeys."""
    signer = _Signer()
    operator = signer.keypair("PREFIX_BYTE_OPERATOR")
    system, account = (signer.keypair("PREFIX_BYTE_ACCOUNT") for _ in range(2))
    user = signer.keypair("PREFIX_BYTE_USER")
    limits: dict[str, Any] = {"subs": -1, "data": -1, "payload": -1, "conn": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    preload = {
        system.public_key.decode(): signer.jwt(
            operator, system, {"type": "account", "limits": limits}
        ),
        account.public_key.decode(): signer.jwt(
            operator, account, {"type": "account", "limits": limits | jetstream}
        ),
    }
    config = (
        f'operator: "{signer.jwt(operator, operator, {"type": "operator"})}"\n'
        f"system_account: {system.public_key.decode()}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {json.dumps(preload)}\n"
    )
    user_jwt = signer.jwt(account, user, {"type": "user", **limits})
    return JwtAuth(config, user_jwt, user.seed.decode())


class Operator:
    """A client of its own that changes the bucket the way an operator would."""

    def __init__(self, client: Client, bucket: str, key: str) -> None:
        self.client = client
        self.js: JetStreamContext = client.jetstream(timeout=3.0)
        self.bucket = bucket
        self.key = key

    @property
    def stream(self) -> str:
        """The stream behind the bucket."""
        return f"KV_{self.bucket}"

    async def kv(self, *, create: bool = False, history: int = 16) -> KeyValue:
        """Return the bucket; with `create`, make it first when it is missing."""
        try:
            return await self.js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise
        return await self.js.create_key_value(bucket=self.bucket, history=history)

    async def put(self, value: bytes, key: str | None = None) -> int:
        """Put `value` under `key` (the store's key by default), like `nats kv put`."""
        kv = await self.kv(create=True)
        return await kv.put(key or self.key, value)

    async def delete(self, key: str | None = None) -> None:
        """Delete the key, like `nats kv del`."""
        kv = await self.kv()
        await kv.delete(key or self.key)

    async def purge(self, key: str | None = None) -> None:
        """Purge the key, like `nats kv purge`."""
        kv = await self.kv()
        await kv.purge(key or self.key)

    async def delete_bucket(self) -> None:
        """Delete the whole bucket, like `nats kv rm`."""
        await self.js.delete_key_value(self.bucket)

    async def stream_info(self) -> api.StreamInfo:
        """Return the bucket's stream info."""
        return await self.js.stream_info(self.stream)

    async def consumer_count(self) -> int:
        """Return how many consumers the bucket's stream has."""
        info = await self.stream_info()
        return info.state.consumer_count

    async def wait_for_bucket(self) -> api.StreamInfo:
        """Wait until the bucket's stream exists and return its info."""
        while True:
            try:
                return await self.stream_info()
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def open_operator(
    url: str, *, bucket: str = "momus", key: str = "route-config", **connect: Any
) -> AsyncIterator[Operator]:
    """Connect an operator's client to `url`; `connect` adds connect arguments."""
    client = await nats.connect(url, max_reconnect_attempts=2, **connect)
    try:
        yield Operator(client, bucket, key)
    finally:
        await client.close()


@pytest.fixture
def operator_kv() -> OperatorFactory:
    """Return `open_operator`, so tests can write `async with operator_kv(url)`."""
    return open_operator


class TcpProxy:
    """Forward loopback connections to a server; `sever()` cuts them all."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen on the proxy's port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one client connection, keeping track of the task doing it."""
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Connect to the target and pump bytes both ways until one side ends."""
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            return
        self._writers |= {writer, up_writer}
        pumps = {
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        }
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._writers -= {writer, up_writer}
            up_writer.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy bytes from `reader` to `writer` until the reader ends."""
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    def sever(self) -> None:
        """Drop every open connection at once, as a broken network would."""
        for writer in list(self._writers):
            writer.transport.abort()

    async def aclose(self) -> None:
        """Stop listening and drop every connection."""
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)


@pytest.fixture
async def nats_proxy(nats_server: EmbeddedNats) -> AsyncIterator[TcpProxy]:
    """Start a TCP proxy in front of `nats_server`."""
    proxy = TcpProxy(nats_server.host, nats_server.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.aclose()
