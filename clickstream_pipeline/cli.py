"""The ``clickstream`` command line: registry edits, synthetic data, the embedded stack, loads."""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NoReturn

import click
from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.generator import (
    GenerationReport,
    GeneratorSpec,
    generate_files,
    write_files,
)
from clickstream_pipeline.local import LocalStack
from clickstream_pipeline.local.stack import DEFAULT_BUCKET, DEFAULT_ROOT
from clickstream_pipeline.registry import registry_backend
from clickstream_pipeline.s3 import ensure_bucket, s3_client

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="clickstream_pipeline")
def cli() -> None:
    """Load clickstream events from S3 into one warehouse table per customer event.

    Configuration comes from the environment: CLICKSTREAM_BUCKET, CLICKSTREAM_RAW_PREFIX,
    CLICKSTREAM_REGISTRY, CLICKSTREAM_WAREHOUSE_URL, AWS_* and DAGSTER_HOME.
    """


# --- registry ---------------------------------------------------------------------------------


@cli.group()
def registry() -> None:
    """List and edit the registry of customers and events (CLICKSTREAM_REGISTRY)."""


@registry.command("list")
def registry_list() -> None:
    """Print every registered stream, one per line."""
    for stream in registry_backend().load().streams:
        out.print(stream.key)


@registry.command("add")
@click.argument("customer")
@click.argument("events", nargs=-1, required=True)
def registry_add(customer: str, events: tuple[str, ...]) -> None:
    """Register EVENTS for CUSTOMER (created if new); they load from the next sensor tick."""
    backend = registry_backend()
    with backend.edit() as edit:
        edit.registry = edit.registry.with_added(customer, events)
    err.print(f"registered {', '.join(f'{customer}.{e}' for e in events)} in {backend.location}")


@registry.command("remove")
@click.argument("customer")
@click.argument("events", nargs=-1)
def registry_remove(customer: str, events: tuple[str, ...]) -> None:
    """Stop loading EVENTS of CUSTOMER (all of its events if none are given).

    Raw files and warehouse tables are kept; adding the stream back resumes loading.
    """
    backend = registry_backend()
    with backend.edit() as edit:
        edit.registry = edit.registry.with_removed(customer, events)
    removed = ", ".join(f"{customer}.{e}" for e in events) if events else f"customer {customer}"
    err.print(f"removed {removed} from {backend.location}")


# --- generate ---------------------------------------------------------------------------------


@cli.command()
@click.option("--customers", default=3, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--events",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Event types per customer.",
)
@click.option("--hours", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--events-per-file", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--files-per-hour", default=2, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--duplicate-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Share of records that re-send an earlier message of the stream.",
)
@click.option(
    "--bad-record-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1, max_open=True),
    help="Share of records that are invalid (bad JSON, missing fields, bad timestamp).",
)
@click.option(
    "--late-files",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Number of (stream, hour)s that get one extra file written after the others.",
)
@click.option(
    "--skew",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Events multiplier for heavy customers and heavy hours.",
)
@click.option(
    "--heavy-customers",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many customers (the first ones) are heavy when --skew > 1.",
)
@click.option(
    "--heavy-hours",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many hours (the first ones) are heavy when --skew > 1.",
)
@click.option(
    "--start",
    type=click.DateTime(["%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%d"]),
    help="First hour (UTC). Default: the hours ending with the last complete hour.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--gzip/--no-gzip", "compress", default=True, show_default=True)
@click.option("--no-register", is_flag=True, help="Do not add the streams to the registry.")
def generate(start: datetime | None, no_register: bool, **options: int | float | bool) -> None:
    """Write synthetic Segment-style event files to S3 in the raw layout."""
    settings = Settings.from_env()
    bucket = settings.require_bucket()
    spec = GeneratorSpec(start=start.replace(tzinfo=UTC) if start else None, **options)  # type: ignore[arg-type]
    client = s3_client()
    ensure_bucket(client, bucket)
    if not no_register:
        backend = registry_backend(settings.registry)
        with backend.edit() as edit:
            for stream in spec.streams:
                edit.registry = edit.registry.with_added(stream.customer, [stream.event])
    total_files = spec.customers * spec.events * spec.hours * spec.files_per_hour + min(
        spec.late_files, spec.customers * spec.events * spec.hours
    )
    began = time.perf_counter()
    with _progress() as progress:
        task = progress.add_task("writing files", total=total_files)
        report = write_files(
            client,
            bucket,
            generate_files(spec, settings.raw_prefix, datetime.now(UTC)),
            on_file=lambda _: progress.advance(task),
        )
    _print_generation(report, bucket, settings.raw_prefix, time.perf_counter() - began)


def _print_generation(report: GenerationReport, bucket: str, prefix: str, seconds: float) -> None:
    table = Table(title=f"generated into s3://{bucket}/{prefix}/", title_justify="left")
    for column in ("stream", "files", "records", "unique messages", "duplicates", "bad records"):
        table.add_column(column, justify="left" if column == "stream" else "right")
    for key, counts in sorted(report.streams.items()):
        table.add_row(
            key,
            *(
                f"{n:,}"
                for n in (
                    counts.files,
                    counts.records,
                    counts.unique_messages,
                    counts.duplicates,
                    counts.bad_records,
                )
            ),
        )
    out.print(table)
    rate = report.records / seconds if seconds else 0.0
    out.print(
        f"{report.files:,} files ({report.late_files:,} late), {report.records:,} records, "
        f"{report.bytes / 1e6:,.1f} MB in {seconds:,.1f} s ({rate:,.0f} events/s)"
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


# --- embedded stack -------------------------------------------------------------------------


@cli.command()
@click.option(
    "--root",
    default=str(DEFAULT_ROOT),
    show_default=True,
    type=click.Path(),
    help="Where the embedded PostgreSQL keeps its data.",
)
@click.option("--bucket", default=DEFAULT_BUCKET, show_default=True)
@click.option(
    "--s3-port",
    default=0,
    type=click.IntRange(0, 65535),
    help="Port of the local S3 server (default: a free one).",
)
def stack(root: str, bucket: str, s3_port: int) -> None:
    """Run the embedded PostgreSQL and local S3 server until Ctrl-C; print their env vars.

    Objects in the local S3 server live in memory and go away when it stops.
    """
    with LocalStack(root, bucket=bucket, s3_port=s3_port) as env:
        for name, value in env.items():
            out.print(f"export {name}={shlex.quote(value)}")
        err.print("embedded stack running; press Ctrl-C to stop")
        _wait_for_interrupt()


def _wait_for_interrupt() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


# --- pipeline commands (built on the core pipeline) --------------------------------------------


def _not_yet(name: str) -> NoReturn:
    raise ClickstreamError(f"'clickstream {name}' is not available yet")


@cli.command()
def load() -> None:
    """Sync the registry, discover files and load every pending or changed (stream, hour)."""
    _not_yet("load")


@cli.command()
def demo() -> None:
    """Run the whole pipeline on embedded defaults and print a summary."""
    _not_yet("demo")


@cli.command()
def dev() -> None:
    """Run the embedded stack with the Dagster UI and daemon, sensors on."""
    _not_yet("dev")


# --- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: user errors become one line on stderr and exit status 1."""
    try:
        status = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="clickstream",
            standalone_mode=False,
        )
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except ClickstreamError as error:
        _fail(str(error))
    except ClientError as error:
        _fail(f"S3 request failed: {error}")
    except BotoCoreError as error:
        _fail(f"cannot reach S3: {error}")
    except OSError as error:
        _fail(str(error))
    sys.exit(status if isinstance(status, int) else 0)


def _fail(message: str) -> NoReturn:
    err.print(f"clickstream: error: {message}", markup=False, soft_wrap=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
