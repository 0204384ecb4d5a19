"""The `momus-haproxy` command line.

Every option can also be set through an environment variable named after it
(`--http-bind` is `MOMUS_HTTP_BIND`); the settings of the original Momus keep
working under their own names (`MOMUS_NatsUrl`, `MOMUS_StoreName`, ...).
Exit codes follow the error that stopped the command (see `errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from . import __version__
from .check import check
from .document import Document, parse_document
from .errors import DocumentError, MomusError
from .install import install
from .render import Rendered, RenderSettings, render
from .runner import RunOptions, default_paths, run
from .runtime import CONFIG
from .sidecar import SidecarSettings
from .status import (
    DEFAULT_BUCKET,
    Fleet,
    StatusSettings,
    check_instance_id,
    default_instance_id,
    read_fleet,
)
from .watch import Entry, NatsOptions, Store

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _env(*names: str) -> list[str]:
    return [f"MOMUS_{name}" for name in names]


def render_options(func: F) -> F:
    """Options that shape the parts of haproxy.cfg outside the routes."""
    options = [
        click.option(
            "--http-bind",
            envvar=_env("HTTP_BIND"),
            default="127.0.0.1:8080",
            show_default=True,
            help="Address and port of HAProxy's HTTP frontend.",
        ),
        click.option(
            "--stats-bind",
            envvar=_env("STATS_BIND"),
            default="127.0.0.1:8404",
            show_default=True,
            help="Local stats and Prometheus listener of HAProxy ('' for none).",
        ),
        click.option(
            "--templates-dir",
            envvar=_env("TEMPLATES_DIR"),
            type=click.Path(file_okay=False, exists=True, path_type=Path),
            help="A directory with your own haproxy.cfg.j2 to render instead.",
        ),
        click.option(
            "--maxconn",
            envvar=_env("MAXCONN"),
            type=click.IntRange(1, 100000),
            default=4096,
            show_default=True,
            help="HAProxy's global maxconn (mind the open-file limit).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def haproxy_option(func: F) -> F:
    """The `--haproxy-bin` option."""
    return click.option(
        "--haproxy-bin",
        envvar=_env("HAPROXY_BIN"),
        default="haproxy",
        show_default=True,
        help="The haproxy binary used for checks (and started in standalone mode).",
    )(func)


def render_settings(**options: Any) -> RenderSettings:
    """Build `RenderSettings` from the values of `render_options`."""
    return RenderSettings(
        http_bind=options["http_bind"],
        stats_bind=options["stats_bind"] or None,
        templates_dir=options["templates_dir"],
        maxconn=options["maxconn"],
    )


def fail(error: MomusError) -> None:
    """Print an error to stderr and exit with its code."""
    click.echo(f"error: {error}", err=True)
    if isinstance(error, DocumentError):
        pass
    elif getattr(error, "output", ""):
        click.echo(error.output.rstrip(), err=True)  # type: ignore[attr-defined]
    sys.exit(error.exit_code)


def read_input(path: str) -> bytes:
    """Read a file, or standard input for '-'; a missing file is a clear error."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.FileError(path, hint=exc.strerror or str(exc)) from None


def _read_document(path: str) -> Document:
    data = read_input(path)
    document = parse_document(data)
    for warning in document.warnings:
        click.echo(f"warning: {warning}", err=True)
    return document


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="momus-haproxy")
def main() -> None:
    """Keep HAProxy's routing in step with a routing document in NATS."""
    # One-shot commands report their own errors; the libraries' retry chatter
    # (a refused connection before the final message) stays out of the way.
    # `run` sets up its own logging.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")


@main.command("validate")
@click.option("--from-file", "from_file", metavar="FILE", required=True)
@render_options
@haproxy_option
def validate_command(from_file: str, haproxy_bin: str, **options: Any) -> None:
    """Render a document and have `haproxy -c` check it (exit 0, 2 or 3)."""
    try:
        rendered = render(_read_document(from_file), render_settings(**options))
        asyncio.run(check_rendered(rendered, haproxy_bin))
    except MomusError as exc:
        fail(exc)
    click.echo("configuration is valid", err=True)


async def check_rendered(rendered: Rendered, haproxy_bin: str) -> str:
    """Write a render into a scratch directory and run `haproxy -c` on it."""
    with tempfile.TemporaryDirectory(prefix="momus-check-") as scratch:
        install(rendered.files, Path(scratch))
        return await check(Path(scratch), haproxy_bin=haproxy_bin)


def nats_options(func: F) -> F:
    """Options for the NATS connection, bucket and key."""
    options = [
        click.option(
            "--nats-url",
            envvar=_env("NATS_URL", "NatsUrl"),
            default="nats://127.0.0.1:4222",
            show_default=True,
            help="NATS server URL(s), comma-separated.",
        ),
        click.option(
            "--bucket",
            envvar=_env("BUCKET", "StoreName"),
            default="momus",
            show_default=True,
            help="Key-value bucket holding the document.",
        ),
        click.option(
            "--key",
            envvar=_env("KEY", "KeyName"),
            default="route-config",
            show_default=True,
            help="Key of the document in the bucket.",
        ),
        click.option("--user", envvar=_env("USER", "User"), help="NATS user name."),
        click.option(
            "--password", envvar=_env("PASSWORD", "Pass"), help="NATS password."
        ),
        click.option("--token", envvar=_env("TOKEN", "Token"), help="NATS token."),
        click.option(
            "--creds",
            envvar=_env("CREDS", "CredsFilePath"),
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="NATS credentials file (JWT and seed).",
        ),
        click.option(
            "--jwt", envvar=_env("JWT", "Jwt"), help="User JWT (with --seed)."
        ),
        click.option(
            "--seed",
            envvar=_env("SEED", "Seed"),
            help="NKey seed (with --jwt for JWT auth, alone for NKey auth).",
        ),
        click.option(
            "--nkey",
            envvar=_env("NKEY", "NKey"),
            help="Public NKey; it must be the one of --seed.",
        ),
        click.option(
            "--tls-ca",
            envvar=_env("TLS_CA"),
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="CA certificate that signed the NATS server's certificate.",
        ),
        click.option(
            "--tls-cert",
            envvar=_env("TLS_CERT"),
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="Client certificate for NATS over TLS.",
        ),
        click.option(
            "--tls-key",
            envvar=_env("TLS_KEY"),
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="Key of the client certificate.",
        ),
        click.option(
            "--replicas",
            envvar=_env("REPLICAS"),
            type=click.IntRange(1, 5),
            default=1,
            show_default=True,
            help="Replicas of the bucket when it is created (3 on a NATS cluster).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_NATS_KEYS = (
    "nats_url", "bucket", "key", "user", "password", "token", "creds", "jwt",
    "seed", "nkey", "tls_ca", "tls_cert", "tls_key", "replicas",
)  # fmt: skip


def build_nats_options(options: dict[str, Any]) -> NatsOptions:
    """Turn the values of `nats_options` into `NatsOptions` (and pop them)."""
    values = {key: options.pop(key) for key in _NATS_KEYS}
    try:
        return NatsOptions(
            servers=values["nats_url"],
            bucket=values["bucket"],
            key=values["key"],
            user=values["user"],
            password=values["password"],
            token=values["token"],
            creds_file=values["creds"],
            jwt=values["jwt"],
            nkey_seed=values["seed"],
            tls_ca=values["tls_ca"],
            tls_cert=values["tls_cert"],
            tls_key=values["tls_key"],
            replicas=values["replicas"],
        )
    except ValidationError as exc:
        raise click.UsageError(_option_problems(exc)) from None
    except ValueError as exc:
        raise click.UsageError(" ".join(str(exc).split())) from None


_OPTION_NAMES = {
    "servers": "--nats-url",
    "nkey_seed": "--seed",
    "creds_file": "--creds",
}


def _option_problems(exc: ValidationError) -> str:
    """Each problem of `exc` on its own line, naming the option."""
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        option = _OPTION_NAMES.get(field, "--" + field.replace("_", "-"))
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{option}: {message}" if field else message)
    return "\n".join(lines)


class JsonFormatter(logging.Formatter):
    """Format each log record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as `{"time", "level", "logger", "message"}`."""
        stamp = datetime.fromtimestamp(record.created, UTC)
        data: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Send log lines to stderr, as text or as one JSON object per line.

    `auto` is text on a terminal and JSON otherwise (a container's log).
    """
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    logging.basicConfig(
        level=getattr(logging, level.upper()), handlers=[handler], force=True
    )


def status_bucket_option(func: F) -> F:
    """The `--status-bucket` option, shared by `run` and `status`."""
    return click.option(
        "--status-bucket",
        envvar=_env("STATUS_BUCKET"),
        default=DEFAULT_BUCKET,
        show_default=True,
        help="Bucket where each instance reports its status ('' for none).",
    )(func)


def status_options(func: F) -> F:
    """Options of the status write-back and of readiness, for `run`."""
    options = [
        status_bucket_option,
        click.option(
            "--instance-id",
            envvar=_env("INSTANCE_ID"),
            default=default_instance_id,
            show_default="the host name",
            help="This instance's key in the status bucket; unique in the fleet.",
        ),
        click.option(
            "--status-interval",
            envvar=_env("STATUS_INTERVAL"),
            type=click.FloatRange(0.1, 3600),
            default=10.0,
            show_default=True,
            help="Seconds between status records; 3 missed ones mark it lost.",
        ),
        click.option(
            "--status-ttl",
            envvar=_env("STATUS_TTL"),
            type=click.FloatRange(1, 365 * 86400),
            default=3600.0,
            show_default=True,
            help="Maximum age of a status record (when the bucket is created).",
        ),
        click.option(
            "--ready-max-lag",
            envvar=_env("READY_MAX_LAG"),
            type=click.FloatRange(0),
            default=60.0,
            show_default=True,
            help="/readyz fails once the latest revision waits this long (0: never).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _status_settings(options: dict[str, Any]) -> StatusSettings:
    interval, ttl = options.pop("status_interval"), options.pop("status_ttl")
    if ttl < 2 * interval:
        raise click.UsageError(
            f"--status-ttl {ttl:g} must be at least twice --status-interval "
            f"{interval:g}, or records expire between two heartbeats"
        )
    try:
        instance_id = check_instance_id(options.pop("instance_id"))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return StatusSettings(
        bucket=options.pop("status_bucket"),
        instance_id=instance_id,
        interval=interval,
        ttl=ttl,
    )


@main.command("run")
@click.option(
    "--standalone",
    is_flag=True,
    envvar=_env("STANDALONE"),
    help="Start an embedded nats-server and HAProxy too.",
)
@click.option(
    "--data-dir",
    envvar=_env("DATA_DIR"),
    type=click.Path(file_okay=False, path_type=Path),
    default="momus-data",
    show_default=True,
    help="Where the last good document (and, standalone, NATS and HAProxy) live.",
)
@click.option(
    "--config-dir",
    envvar=_env("CONFIG_DIR"),
    type=click.Path(file_okay=False, path_type=Path),
    help="HAProxy's config directory [standalone: DATA_DIR/haproxy].",
)
@click.option(
    "--master-socket",
    envvar=_env("MASTER_SOCKET"),
    type=click.Path(dir_okay=False, path_type=Path),
    help="HAProxy's master CLI socket (sidecar mode).",
)
@click.option(
    "--health-bind",
    envvar=_env("HEALTH_BIND"),
    default="127.0.0.1:8081",
    show_default=True,
    help="Address of /healthz, /readyz and /metrics ('' for none).",
)
@click.option(
    "--quiet-period",
    envvar=_env("QUIET_PERIOD"),
    type=click.FloatRange(0, 60),
    default=0.03,
    show_default=True,
    help="Seconds without a new change before a burst is applied.",
)
@click.option(
    "--once",
    is_flag=True,
    envvar=_env("ONCE"),
    help="Apply the current value and exit.",
)
@click.option(
    "--log-level",
    envvar=_env("LOG_LEVEL"),
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    envvar=_env("LOG_FORMAT"),
    type=click.Choice(["auto", "text", "json"]),
    default="auto",
    show_default=True,
    help="text, or json (one object per line); auto: text on a terminal.",
)
@status_options
@nats_options
@render_options
@haproxy_option
def run_command(**options: Any) -> None:
    """Follow the key and keep HAProxy serving the newest good document."""
    setup_logging(options.pop("log_level"), options.pop("log_format"))
    status = _status_settings(options)
    ready_max_lag: float = options.pop("ready_max_lag")
    nats = build_nats_options(options)
    data_dir: Path = options.pop("data_dir").absolute()
    standalone: bool = options.pop("standalone")
    config_dir, master_socket = default_paths(data_dir)
    config_dir = options.pop("config_dir") or config_dir
    given_socket = options.pop("master_socket")
    if not standalone and given_socket is None:
        raise click.UsageError("sidecar mode needs --master-socket (or --standalone)")
    settings = SidecarSettings(
        config_dir=config_dir.absolute(),
        master_socket=given_socket or master_socket,
        data_dir=data_dir,
        haproxy_bin=options.pop("haproxy_bin"),
        quiet_period=options.pop("quiet_period"),
        render=_render_settings_or_exit(options),
    )
    run_options = RunOptions(
        sidecar=settings,
        nats=nats,
        standalone=standalone,
        health_bind=options.pop("health_bind") or None,
        once=options.pop("once"),
        status=status,
        ready_max_lag=ready_max_lag,
    )
    _run_until_signal(run(run_options))


def _render_settings_or_exit(options: dict[str, Any]) -> RenderSettings:
    try:
        return render_settings(**options)
    except MomusError as exc:
        raise click.UsageError(str(exc)) from None


def _run_until_signal(work: Coroutine[Any, Any, None]) -> None:
    async def main_task() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await work

    try:
        asyncio.run(main_task())
    except MomusError as exc:
        fail(exc)


@main.group("config")
def config_group() -> None:
    """Read and write the routing document in NATS."""


@config_group.command("put")
@click.argument("file")
@click.option("--force", is_flag=True, help="Put it even if it fails validation.")
@nats_options
def config_put(file: str, force: bool, **options: Any) -> None:
    """Put FILE ('-' for standard input) under the key, after validating it."""
    data = read_input(file)
    nats = build_nats_options(options)
    try:
        _validate_before_put(data, force)
        revision = asyncio.run(_put(nats, data))
    except MomusError as exc:
        fail(exc)
    click.echo(f"put revision {revision} under {nats.bucket}/{nats.key}", err=True)


def _validate_before_put(data: bytes, force: bool) -> None:
    try:
        parse_document(data)
    except DocumentError as exc:
        if not force:
            raise
        click.echo(f"warning: putting a refused document (--force): {exc}", err=True)


async def _put(nats: NatsOptions, data: bytes) -> int:
    async with Store(nats) as store:
        revision: int = await store.put(data)
    return revision


@config_group.command("get")
@nats_options
def config_get(**options: Any) -> None:
    """Print the document stored under the key."""
    nats = build_nats_options(options)
    try:
        entry = asyncio.run(_get(nats))
    except MomusError as exc:
        fail(exc)
    if entry is None or entry.value is None:
        click.echo(f"error: {nats.bucket}/{nats.key} holds no document", err=True)
        sys.exit(1)
    click.echo(entry.value.decode(errors="replace"))


async def _get(nats: NatsOptions) -> Entry | None:
    async with Store(nats, create=False) as store:
        return await store.get()


@main.command("render")
@click.option(
    "--from-file",
    "from_file",
    metavar="FILE",
    help="Render this document ('-' for standard input).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Render the document stored in NATS instead; nothing is changed.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help=(
        "Write haproxy.cfg and its map files into this directory. Without it, "
        "haproxy.cfg is printed and its map files go to ~/.cache/momus-haproxy."
    ),
)
@nats_options
@render_options
def render_command(
    from_file: str | None, dry_run: bool, out: Path | None, **options: Any
) -> None:
    """Print the HAProxy configuration for a document, or write it to --out.

    With --dry-run the document is read from the watched key, and the
    configuration and map files that would be installed are printed.
    """
    if (from_file is None) == (not dry_run):
        raise click.UsageError("give either --from-file FILE or --dry-run")
    nats = build_nats_options(options)
    try:
        document = _read_document(from_file) if from_file else _stored_document(nats)
        rendered = render(document, render_settings(**options))
        if out is not None:
            install(rendered.files, out)
        elif dry_run:
            for name in sorted(rendered.files, key=lambda n: n != "haproxy.cfg"):
                click.echo(f"# ---- {name}")
                click.echo(rendered.files[name], nl=False)
        else:
            click.echo(_runnable_config(rendered), nl=False)
    except MomusError as exc:
        fail(exc)
    if out is not None:
        click.echo(f"wrote {len(rendered.files)} files to {out}", err=True)


_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./-]+$")


def _runnable_config(rendered: Rendered) -> str:
    """Return haproxy.cfg pointing at its map files by absolute path.

    The configuration looks hosts and paths up in map files, which a printed
    configuration cannot carry; they are written to a cache directory under
    names that hash their content, so the printed text runs as it is
    (`haproxy -c -f printed.cfg`) wherever it is saved.
    """
    maps = {name: text for name, text in rendered.files.items() if name != CONFIG}
    if not maps:
        return rendered.config
    cache = _map_cache()
    config = rendered.config
    for name, text in maps.items():
        path = cache / name
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_name(f".{path.name}.{os.getpid()}")
            scratch.write_text(text)
            scratch.replace(path)
        config = config.replace(f"({name})", f"({path})")
    click.echo(f"# map files of this configuration: {cache / 'maps'}", err=True)
    return config


def _map_cache() -> Path:
    """The directory printed configurations keep their map files in."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    cache = Path(base) / "momus-haproxy"
    if not cache.is_absolute() or not _SAFE_PATH.match(str(cache)):
        # The path is written into the configuration unquoted.
        cache = Path(tempfile.mkdtemp(prefix="momus-haproxy-"))
    return cache


def _stored_document(nats: NatsOptions) -> Document:
    entry = asyncio.run(_get(nats))
    if entry is None or entry.value is None:
        raise MomusError(f"{nats.bucket}/{nats.key} holds no document")
    document = parse_document(entry.value)
    click.echo(f"# revision {entry.revision} of {nats.bucket}/{nats.key}", err=True)
    for warning in document.warnings:
        click.echo(f"warning: {warning}", err=True)
    return document


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=0.0,
    metavar="SECONDS",
    help="Wait up to SECONDS for every live instance to reach the latest revision.",
)
@status_bucket_option
@nats_options
def status_command(
    as_json: bool, wait: float, status_bucket: str, **options: Any
) -> None:
    """Show which revision each instance serves, and why some do not.

    Exits 0 when every live instance serves the latest revision of the key,
    1 when one does not (or none reports), 6 when NATS cannot be read or the
    bucket does not exist.
    """
    nats = build_nats_options(options)
    try:
        fleet = asyncio.run(_watch_fleet(nats, status_bucket or DEFAULT_BUCKET, wait))
    except MomusError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps(fleet.as_json(), indent=2))
    else:
        click.echo(fleet.table())
        click.echo(fleet.summary())
    sys.exit(0 if fleet.converged else 1)


async def _watch_fleet(nats: NatsOptions, bucket: str, wait: float) -> Fleet:
    deadline = time.monotonic() + wait
    async with Store(nats, create=False) as store:
        while True:
            fleet = await read_fleet(store, bucket)
            if fleet.converged or time.monotonic() >= deadline:
                return fleet
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))


# The document commands register themselves on `main` and `config_group`,
# which must exist before that module is imported.
import momus_haproxy.edit  # noqa: E402, F401
