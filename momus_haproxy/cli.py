"""The `momus-haproxy` command line.

Every option can also be set through an environment variable named after it
(`--http-bind` is `MOMUS_HTTP_BIND`); the settings of the original Momus keep
working under their own names (`MOMUS_NatsUrl`, `MOMUS_StoreName`, ...).
Exit codes follow the error that stopped the command (see `errors`).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .check import check
from .document import Document, parse_document
from .errors import DocumentError, MomusError
from .install import install
from .render import Rendered, RenderSettings, render

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


def _read_document(path: str) -> Document:
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    document = parse_document(data)
    for warning in document.warnings:
        click.echo(f"warning: {warning}", err=True)
    return document


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="momus-haproxy")
def main() -> None:
    """Keep HAProxy's routing in step with a routing document in NATS."""


@main.command("render")
@click.option(
    "--from-file",
    "from_file",
    metavar="FILE",
    help="Render this document ('-' for standard input).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write haproxy.cfg and its map files into this directory.",
)
@render_options
def render_command(from_file: str | None, out: Path | None, **options: Any) -> None:
    """Print the HAProxy configuration for a document, or write it to --out."""
    if from_file is None:
        raise click.UsageError("give --from-file FILE")
    try:
        rendered = render(_read_document(from_file), render_settings(**options))
        if out is None:
            click.echo(rendered.config, nl=False)
            return
        install(rendered.files, out)
    except MomusError as exc:
        fail(exc)
    click.echo(f"wrote {len(rendered.files)} files to {out}", err=True)


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
