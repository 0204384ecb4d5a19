"""Tests of the NATS side: options, the store, and the watch on a real server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from nats.aio.client import Server
from pydantic import ValidationError

from momus_haproxy.errors import StoreError
from momus_haproxy.nats_server import EmbeddedNats
from momus_haproxy.watch import (
    Change,
    ConnectionEvents,
    NatsOptions,
    Store,
    redact_url,
)
from tests.support.nats import (
    OperatorFactory,
    StartNats,
    TcpProxy,
    TlsFiles,
    jwt_auth,
    nkey_user,
    tls_config,
)

# Short heartbeats keep the watch's own checks within a test's few seconds.
FAST: dict[str, Any] = {"heartbeat": 0.25, "connect_timeout": 2.0}
PASSWORD = "pa55-w0rd-secret"
TOKEN = "t0ken-secret-value"


def fast_options(url: str, **extra: Any) -> NatsOptions:
    """Return options for `url` with test-friendly timings."""
    return NatsOptions(servers=[url], **{**FAST, **extra})


class Follower:
    """Runs a store's watch in a task and keeps what it yields in a queue."""

    def __init__(self, store: Store) -> None:
        self.changes: asyncio.Queue[Change] = asyncio.Queue()
        self.task = asyncio.create_task(self._follow(store))

    async def _follow(self, store: Store) -> None:
        """Copy every change into the queue."""
        async for change in store.watch():
            self.changes.put_nowait(change)

    async def next(self, within: float = 3.0) -> Change:
        """Return the next change, failing after `within` seconds."""
        return await asyncio.wait_for(self.changes.get(), within)

    async def nothing_for(self, seconds: float) -> None:
        """Fail if a change comes within `seconds`."""
        with contextlib.suppress(TimeoutError):
            change = await asyncio.wait_for(self.changes.get(), seconds)
            pytest.fail(f"unexpected change {change!r}")

    async def stop(self) -> None:
        """Stop following."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@contextlib.asynccontextmanager
async def follow(store: Store) -> AsyncIterator[Follower]:
    """Follow `store.watch()` for the duration of the block."""
    follower = Follower(store)
    try:
        yield follower
    finally:
        await follower.stop()


class TestOptions:
    """NatsOptions: parsing, validation, secrets and connect arguments."""

    def test_servers_accept_a_comma_separated_string(self) -> None:
        """A string of URLs separated by commas becomes a list of servers."""
        options = NatsOptions.model_validate(
            {"servers": "nats://a:4222, tls://b:4223,"}
        )

        assert options.servers == ["nats://a:4222", "tls://b:4223"]

    def test_defaults_follow_momus(self) -> None:
        """Bucket, key and server default to what Momus used."""
        options = NatsOptions()

        assert (options.bucket, options.key) == ("momus", "route-config")
        assert options.servers == ["nats://127.0.0.1:4222"]
        assert options.history == 16

    def test_repr_and_str_never_show_secrets(self) -> None:
        """Passwords, tokens, JWTs, seeds and URL passwords are masked."""
        options = NatsOptions(
            servers=[f"nats://momus:{PASSWORD}@127.0.0.1:4222"],
            user="momus",
            password=PASSWORD,
            token=TOKEN,
            jwt="eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5In0.secret-jwt",
            nkey_seed="SUAKSEEDSEEDSEEDSEED",
        )

        for text in (repr(options), str(options)):
            assert PASSWORD not in text
            assert TOKEN not in text
            assert "secret-jwt" not in text
            assert "SEEDSEED" not in text
            assert "user='momus'" in text

    def test_redact_url_keeps_host_and_drops_credentials(self) -> None:
        """A URL with credentials keeps its scheme, host and port only."""
        url = f"tls://momus:{PASSWORD}@nats.example:4443"

        assert redact_url(url) == "tls://***@nats.example:4443"
        assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"

    @pytest.mark.parametrize(
        ("fields", "message"),
        [
            ({"servers": "http://x:80"}, "is not a NATS URL"),
            ({"bucket": "my.bucket"}, "bucket name 'my.bucket'"),
            ({"key": ".hidden"}, "key '.hidden'"),
            ({"jwt": "eyJ"}, "needs the NKey seed"),
            ({"tls_cert": "client.pem"}, "tls_cert and tls_key"),
            ({"history": 65}, "less than or equal to 64"),
        ],
        ids=["scheme", "bucket", "key", "jwt-without-seed", "cert-no-key", "history"],
    )
    def test_invalid_options_are_refused(
        self, fields: dict[str, Any], message: str
    ) -> None:
        """Options NATS would refuse fail validation with a message quoting them."""
        with pytest.raises(ValidationError, match=message):
            NatsOptions.model_validate(fields)

    def test_connect_kwargs_reconnect_forever(self) -> None:
        """The client is told to reconnect forever, with our callbacks."""
        kwargs = NatsOptions(user="momus", password=PASSWORD).connect_kwargs()

        assert kwargs["max_reconnect_attempts"] == -1
        assert kwargs["allow_reconnect"] is True
        assert kwargs["password"] == PASSWORD
        assert callable(kwargs["reconnected_cb"])
        assert "tls" not in kwargs

    def test_reconnects_back_off_up_to_the_limit(self) -> None:
        """The first reconnect is immediate; later ones wait longer, up to a cap."""
        events = ConnectionEvents(NatsOptions(reconnect_wait_max=2.0))
        uri = urlsplit("nats://127.0.0.1:4222")

        def wait(reconnects: int) -> float:
            server = Server(uri=uri, reconnects=reconnects)  # type: ignore[arg-type]
            return events.pick_server([server], {})[1]

        assert wait(0) == 0.0
        assert 0 < wait(1) < wait(3) <= 2.0
        assert wait(50) <= 2.0

    async def test_a_long_outage_is_reported_now_and_then(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A repeated error is one WARNING, then one more once NATS is away 30 s."""
        events = ConnectionEvents(NatsOptions())
        caplog.set_level(logging.DEBUG, logger="momus_haproxy.watch")

        await events.error(OSError("connection refused"))
        events.down_since = time.monotonic() - 31
        await events.error(OSError("connection refused"))
        await events.error(OSError("connection refused"))

        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == [
            "NATS error: connection refused",
            "NATS at nats://127.0.0.1:4222 is still out of reach after 31 s: "
            "connection refused",
        ]

    def test_missing_tls_files_are_named(self, tmp_path: Path) -> None:
        """A TLS file that cannot be read is a StoreError naming it."""
        missing = tmp_path / "nope.pem"
        options = NatsOptions(tls_ca=missing)

        with pytest.raises(StoreError, match=r"nope\.pem"):
            options.connect_kwargs()

    def test_nkey_auth_without_nkeys_says_how_to_install(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """NKey authentication without the nkeys package names the extra to add."""
        monkeypatch.setitem(sys.modules, "nkeys", None)  # makes the import fail
        options = NatsOptions(nkey_seed="SUAEXAMPLE")

        with pytest.raises(StoreError, match=r"nats-py\[nkeys\]"):
            options.connect_kwargs()


class TestStore:
    """Store against a real nats-server: bucket, reads and writes."""

    async def test_open_creates_the_bucket_with_history_and_replicas(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """A missing bucket is created with the configured history."""
        async with Store(fast_options(nats_server.url, history=5)):
            pass

        async with operator_kv(nats_server.url) as operator:
            info = await operator.stream_info()
        assert info.config.max_msgs_per_subject == 5
        assert info.config.num_replicas == 1

    async def test_open_without_create_refuses_a_missing_bucket(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """With create=False, open() names the missing bucket and creates none."""
        store = Store(fast_options(nats_server.url), create=False)
        with pytest.raises(StoreError, match="bucket 'momus' does not exist on NATS"):
            await store.open()
        assert not store.connected

        async with operator_kv(nats_server.url) as operator:
            assert await operator.js.streams_info() == []
            await operator.put(b"value")
        async with Store(fast_options(nats_server.url), create=False) as store:
            entry = await store.get()
        assert entry is not None
        assert entry.value == b"value"

    async def test_open_keeps_an_existing_bucket(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """An existing bucket is used as it is: its settings and values stay."""
        async with operator_kv(nats_server.url) as operator:
            await operator.kv(create=True, history=3)
            await operator.put(b"before")

        async with Store(fast_options(nats_server.url)) as store:
            entry = await store.get()

        async with operator_kv(nats_server.url) as operator:
            info = await operator.stream_info()
        assert entry is not None
        assert entry.value == b"before"
        assert info.config.max_msgs_per_subject == 3

    async def test_put_get_history_and_revisions(
        self, nats_server: EmbeddedNats
    ) -> None:
        """Puts come back from get(), history() and get_revision()."""
        async with Store(fast_options(nats_server.url)) as store:
            assert await store.get() is None
            first = await store.put(b"one")
            second = await store.put(b"two", expected_revision=first)
            current = await store.get()
            history = await store.history()
            old = await store.get_revision(first)

        assert current is not None
        assert (current.revision, current.value) == (second, b"two")
        assert current.created is not None
        assert [entry.value for entry in history] == [b"one", b"two"]
        assert (old.operation, old.value) == ("PUT", b"one")

    async def test_a_deleted_key_has_no_current_value(
        self, nats_server: EmbeddedNats
    ) -> None:
        """After a delete, get() says there is no value; history shows the marker."""
        async with Store(fast_options(nats_server.url)) as store:
            await store.put(b"one")
            await store.delete()
            current = await store.get()
            history = await store.history()

        assert current is None
        assert [entry.operation for entry in history] == ["PUT", "DEL"]

    async def test_a_stale_expected_revision_is_refused(
        self, nats_server: EmbeddedNats
    ) -> None:
        """A put against an old revision fails with a message naming both."""
        async with Store(fast_options(nats_server.url)) as store:
            first = await store.put(b"one")
            await store.put(b"two")

            with pytest.raises(StoreError) as caught:
                await store.put(b"three", expected_revision=first)

        message = str(caught.value)
        assert "is at revision 2, not 1 as expected" in message
        assert "'route-config'" in message

    async def test_a_revision_of_another_key_is_refused(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """get_revision() refuses a revision that belongs to another key."""
        async with Store(fast_options(nats_server.url)) as store:
            async with operator_kv(nats_server.url) as operator:
                other = await operator.put(b"x", key="other")

            with pytest.raises(StoreError, match="is not a revision of key"):
                await store.get_revision(other)
            with pytest.raises(StoreError, match=f"the latest revision is {other}"):
                await store.get_revision(other + 10)

    async def test_open_fails_fast_when_nats_is_down(
        self, nats_server: EmbeddedNats
    ) -> None:
        """Without waiting, open() gives up after connect_timeout with the URL."""
        await nats_server.stop()
        store = Store(fast_options(nats_server.url, connect_timeout=0.5))
        started = time.monotonic()

        with pytest.raises(StoreError, match="could not connect to NATS at"):
            await asyncio.wait_for(store.open(), 3.0)

        assert time.monotonic() - started < 2.0

    async def test_open_waits_for_nats_when_told_to(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """With wait=True, open() waits for NATS to come up and then works."""
        await nats_server.stop()
        store = Store(fast_options(nats_server.url), wait=True)
        opening = asyncio.ensure_future(store.open())
        await asyncio.sleep(1.0)
        assert not opening.done()

        await nats_server.start()
        await asyncio.wait_for(opening, 5.0)
        async with store, follow(store) as changes:
            async with operator_kv(nats_server.url) as operator:
                await operator.put(b"late")
            change = await changes.next()

        assert change.value == b"late"

    async def test_cancelling_a_waiting_open_leaves_nothing_running(
        self, nats_server: EmbeddedNats
    ) -> None:
        """A store waiting for NATS can be cancelled cleanly."""
        await nats_server.stop()
        store = Store(fast_options(nats_server.url), wait=True)
        opening = asyncio.ensure_future(store.open())
        await asyncio.sleep(0.3)

        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening

        assert not store.connected


class TestWatch:
    """Store.watch() against a real nats-server."""

    async def test_yields_current_value_then_changes_of_its_key_only(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """The current value comes first, then puts, deletes and purges, in order."""
        async with (
            Store(fast_options(nats_server.url)) as store,
            operator_kv(nats_server.url) as operator,
        ):
            await operator.put(b"one")
            await operator.put(b"two")
            async with follow(store) as changes:
                first = await changes.next()
                await operator.put(b"elsewhere", key="other-key")
                await operator.put(b"three")
                second = await changes.next()
                await operator.delete()
                deleted = await changes.next()
                await operator.purge()
                purged = await changes.next()
                await changes.nothing_for(0.3)

        assert (first.revision, first.value) == (2, b"two")
        assert (second.revision, second.value) == (4, b"three")
        assert (deleted.operation, deleted.value) == ("DEL", None)
        assert (purged.operation, purged.value) == ("PURGE", None)

    async def test_yields_nothing_for_a_key_never_written(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """A key with no revision yields nothing until its first put."""
        async with (
            Store(fast_options(nats_server.url)) as store,
            follow(store) as changes,
        ):
            await changes.nothing_for(0.5)
            async with operator_kv(nats_server.url) as operator:
                await operator.put(b"first")
            change = await changes.next()

        assert change.value == b"first"

    async def test_keeps_delivering_after_a_long_idle_period(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """After many heartbeats of silence, a put still arrives within a second."""
        async with (
            Store(fast_options(nats_server.url)) as store,
            operator_kv(nats_server.url) as operator,
            follow(store) as changes,
        ):
            await operator.put(b"one")
            await changes.next()
            await changes.nothing_for(3.0)
            await operator.put(b"after idle")
            change = await changes.next(within=1.0)

        assert change.value == b"after idle"

    async def test_catches_up_at_once_after_a_server_restart(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """A put made after a restart arrives within 3 s, with no repeat before it."""
        async with (
            Store(fast_options(nats_server.url)) as store,
            follow(store) as changes,
        ):
            async with operator_kv(nats_server.url) as operator:
                await operator.put(b"before")
            assert (await changes.next()).value == b"before"

            await nats_server.stop()
            await nats_server.start()
            started = time.monotonic()
            async with operator_kv(nats_server.url) as operator:
                revision = await operator.put(b"after")
            change = await changes.next(within=3.0)

        assert (change.revision, change.value) == (revision, b"after")
        assert time.monotonic() - started < 3.0

    async def test_a_put_before_the_watch_is_back_arrives_once(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """A revision written before the watch has reconnected arrives, only once."""
        async with (
            Store(fast_options(nats_server.url)) as store,
            follow(store) as changes,
        ):
            async with operator_kv(nats_server.url) as operator:
                await operator.put(b"before")
            await changes.next()
            await nats_server.stop()
            await asyncio.sleep(0.5)
            await nats_server.start()
            async with operator_kv(nats_server.url) as operator:
                await operator.put(b"while away")
            change = await changes.next()
            await changes.nothing_for(0.5)

        assert change.value == b"while away"

    async def test_a_server_that_lost_its_data_is_followed_from_scratch(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """After a restart with an empty store, revision 1 of the new bucket comes."""
        async with Store(fast_options(nats_server.url)) as store:
            for value in (b"one", b"two"):
                await store.put(value)
            async with follow(store) as changes:
                assert (await changes.next()).revision == 2

                await nats_server.stop()
                shutil.rmtree(nats_server.data_dir / "jetstream")
                await nats_server.start()
                async with operator_kv(nats_server.url) as operator:
                    await asyncio.wait_for(operator.wait_for_bucket(), 3.0)
                    await operator.put(b"fresh")
                change = await changes.next()

        assert (change.revision, change.value) == (1, b"fresh")

    async def test_a_recreated_bucket_yields_its_current_value_again(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """When the bucket is deleted and made again, revisions restart and count."""
        async with (
            Store(fast_options(nats_server.url)) as store,
            operator_kv(nats_server.url) as operator,
        ):
            for value in (b"one", b"two", b"three"):
                await operator.put(value)
            async with follow(store) as changes:
                assert (await changes.next()).revision == 3

                await operator.delete_bucket()
                await operator.kv(create=True)
                await operator.put(b"fresh")
                change = await changes.next()

        assert (change.revision, change.value) == (1, b"fresh")

    async def test_a_deleted_bucket_is_created_again_and_followed(
        self, nats_server: EmbeddedNats, operator_kv: OperatorFactory
    ) -> None:
        """The watch re-creates a bucket deleted under it and resumes on it."""
        async with (
            Store(fast_options(nats_server.url, history=7)) as store,
            operator_kv(nats_server.url) as operator,
            follow(store) as changes,
        ):
            await operator.put(b"one")
            await changes.next()

            await operator.delete_bucket()
            info = await asyncio.wait_for(operator.wait_for_bucket(), 3.0)
            await operator.put(b"two")
            change = await changes.next()
            consumers = await operator.consumer_count()

        assert info.config.max_msgs_per_subject == 7
        assert (change.revision, change.value) == (1, b"two")
        assert consumers == 1

    async def test_reopening_leaves_one_consumer(
        self,
        nats_server: EmbeddedNats,
        nats_proxy: TcpProxy,
        operator_kv: OperatorFactory,
    ) -> None:
        """Five cut connections re-open the watch five times, leaving one consumer."""
        async with (
            Store(fast_options(nats_proxy.url)) as store,
            operator_kv(nats_server.url) as operator,
            follow(store) as changes,
        ):
            await operator.put(b"start")
            await changes.next()
            for round_ in range(5):
                nats_proxy.sever()
                await asyncio.sleep(0.3)
                await operator.put(f"round {round_}".encode())
                assert (await changes.next()).value == f"round {round_}".encode()
            consumers = await operator.consumer_count()

        assert nats_proxy.accepted >= 6
        assert consumers == 1

    async def test_closing_the_store_ends_the_watch(
        self, nats_server: EmbeddedNats
    ) -> None:
        """A watch waiting for changes ends when its store is closed."""
        store = Store(fast_options(nats_server.url))
        await store.open()
        follower = Follower(store)
        await asyncio.sleep(0.2)

        await store.aclose()

        await asyncio.wait_for(follower.task, 2.0)
        assert follower.changes.empty()

    async def test_logs_name_events_and_never_secrets(
        self,
        start_nats: StartNats,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        """Disconnect, reconnect and re-open are logged, without the password."""
        config = f'authorization {{ user: momus, password: "{PASSWORD}" }}\n'
        server = await start_nats(config)
        url = f"nats://momus:{PASSWORD}@127.0.0.1:{server.port}"
        caplog.set_level(logging.DEBUG, logger="momus_haproxy")

        async with (
            Store(fast_options(url)) as store,
            follow(store) as changes,
        ):
            await store.put(b"one")
            await changes.next()
            await server.stop()
            await server.start()
            await store.put(b"two")
            await changes.next()

        assert "lost the connection to NATS" in caplog.text
        assert "reconnected to NATS" in caplog.text
        assert "re-opening the watch" in caplog.text
        assert PASSWORD not in caplog.text


class TestAuthentication:
    """Store against servers that require credentials or TLS."""

    async def test_user_and_password(self, start_nats: StartNats) -> None:
        """A store with the right user and password reads and writes."""
        config = f'authorization {{ user: momus, password: "{PASSWORD}" }}\n'
        server = await start_nats(config)
        options = fast_options(server.url, user="momus", password=PASSWORD)

        async with Store(options) as store:
            revision = await store.put(b"hello")

        assert revision == 1

    async def test_a_wrong_password_fails_fast_without_showing_it(
        self, start_nats: StartNats
    ) -> None:
        """A refused password is a StoreError that says why and hides the secret."""
        config = f'authorization {{ user: momus, password: "{PASSWORD}" }}\n'
        server = await start_nats(config)
        wrong = "not-the-password"
        options = fast_options(server.url, user="momus", password=wrong)

        with pytest.raises(StoreError, match="Authorization Violation") as caught:
            await Store(options).open()

        assert wrong not in str(caught.value)

    async def test_token(self, start_nats: StartNats) -> None:
        """A store with the right token reads and writes."""
        server = await start_nats(f'authorization {{ token: "{TOKEN}" }}\n')
        options = fast_options(server.url, token=TOKEN)

        async with Store(options) as store:
            await store.put(b"hello")
            entry = await store.get()

        assert entry is not None
        assert entry.value == b"hello"

    async def test_tls_with_a_client_certificate(
        self, start_nats: StartNats, tls_files: TlsFiles
    ) -> None:
        """A store with the CA and a client certificate works over TLS."""
        server = await start_nats(tls_config(tls_files), scheme="tls")
        options = fast_options(
            server.url,
            tls_ca=tls_files.ca,
            tls_cert=tls_files.client_cert,
            tls_key=tls_files.client_key,
        )

        async with Store(options) as store:
            await store.put(b"over tls")
            entry = await store.get()

        assert entry is not None
        assert entry.value == b"over tls"

    async def test_tls_without_a_client_certificate_is_refused(
        self, start_nats: StartNats, tls_files: TlsFiles
    ) -> None:
        """A server that verifies clients refuses a store with no certificate."""
        server = await start_nats(tls_config(tls_files), scheme="tls")
        options = fast_options(server.url, tls_ca=tls_files.ca, connect_timeout=1.0)

        with pytest.raises(StoreError, match="could not connect"):
            await Store(options).open()

    @pytest.mark.parametrize("as_file", [False, True], ids=["seed", "seed-file"])
    async def test_nkey_seed(
        self, start_nats: StartNats, tmp_path: Path, as_file: bool
    ) -> None:
        """A store with an NKey seed, as a string or a file, authenticates."""
        keypair = nkey_user()
        public = keypair.public_key.decode()
        server = await start_nats(
            f"authorization {{ users: [ {{ nkey: {public} }} ] }}"
        )
        seed = keypair.seed.decode()
        seed_file = tmp_path / "user.nk"
        seed_file.write_text(seed)
        auth = {"nkey_seed_file": seed_file} if as_file else {"nkey_seed": seed}

        async with Store(fast_options(server.url, **auth)) as store:
            revision = await store.put(b"signed")

        assert revision == 1
        assert seed not in repr(store.options)

    @pytest.mark.parametrize("as_creds", [False, True], ids=["jwt-seed", "creds"])
    async def test_user_jwt(
        self, start_nats: StartNats, tmp_path: Path, as_creds: bool
    ) -> None:
        """A store with a user JWT and its seed, or a creds file, authenticates."""
        auth = jwt_auth()
        server = await start_nats(auth.config)
        creds = tmp_path / "user.creds"
        creds.write_text(auth.creds())
        options = (
            fast_options(server.url, creds_file=creds)
            if as_creds
            else fast_options(server.url, jwt=auth.user_jwt, nkey_seed=auth.user_seed)
        )

        async with Store(options) as store:
            revision = await store.put(b"signed")

        assert revision == 1
        assert auth.user_jwt not in repr(options)
