"""The ``clickstream`` command line: registry edits, synthetic data, the embedded stack, loads."""

from __future__ import annotations

import functools
import os
import shlex
import signal
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

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
from clickstream_pipeline.layout import hour_floor
from clickstream_pipeline.local import LocalStack
from clickstream_pipeline.local.stack import DEFAULT_BUCKET, DEFAULT_ROOT
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, registry_backend
from clickstream_pipeline.s3 import ensure_bucket, s3_client
from clickstream_pipeline.warehouse import warehouse_for_url

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from clickstream_pipeline.discovery import PendingPartition
    from clickstream_pipeline.resources import DiscoveryResource
    from clickstream_pipeline.runner import LoadSummary

# Tables keep their columns readable when output goes to a file or a CI log, not a terminal.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
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
        _register(spec)
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


def _register(spec: GeneratorSpec) -> None:
    """Add the spec's streams to the registry (others are kept)."""
    with registry_backend().edit() as edit:
        edit.registry = edit.registry.with_streams(spec.streams)


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
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


# --- pipeline commands -----------------------------------------------------------------------


def _load_options(command: Callable[..., None], batch_size: int = 100) -> Callable[..., None]:
    for option in reversed(
        [
            click.option(
                "--batch-size",
                default=batch_size,
                show_default=True,
                type=click.IntRange(min=1),
                help="Partitions per Dagster run.",
            ),
            click.option(
                "--concurrency",
                default=4,
                show_default=True,
                type=click.IntRange(1, 32),
                help="Partitions loaded at once in a run.",
            ),
            click.option(
                "--grace-minutes",
                default=5,
                show_default=True,
                type=click.IntRange(min=0),
                help="Load an hour only this long after it ended.",
            ),
        ]
    ):
        command = option(command)
    return command


@cli.command()
@_load_options
def load(batch_size: int, concurrency: int, grace_minutes: int) -> None:
    """Sync the registry, discover files and load every pending or changed (stream, hour).

    Runs go through Dagster and are recorded in DAGSTER_HOME, so they show in the UI.
    Exits 1 if any partition failed; with nothing new, it changes nothing and exits 0.
    """
    settings = Settings.from_env()
    settings.require_bucket()
    settings.require_warehouse_url()
    summary = _run_load(batch_size=batch_size, concurrency=concurrency, grace_minutes=grace_minutes)
    _print_load(summary)
    _raise_if_failed(summary)


def _raise_if_failed(summary: LoadSummary) -> None:
    if summary.failed:
        raise ClickstreamError(
            f"{len(summary.failed)} of {summary.pending} partitions failed to load "
            f"(first: {summary.failed[0]}); see the runs in the Dagster UI"
        )


def _quiet_dagster_warnings() -> None:
    """Dagster flags its own beta and preview parameters as it builds definitions; a user of
    these commands can do nothing about them. (Dagster is imported here, not at the top: the
    registry commands start faster without it.)"""
    import dagster as dg

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    warnings.filterwarnings("ignore", category=dg.PreviewWarning)


def _run_load(**discovery_settings: int) -> LoadSummary:
    """Load through Dagster."""
    _quiet_dagster_warnings()
    from clickstream_pipeline.resources import DiscoveryResource
    from clickstream_pipeline.runner import dagster_instance, run_load

    discovery = DiscoveryResource(**discovery_settings)
    instance = dagster_instance()
    with _progress() as progress:
        task = progress.add_task("discovering", total=None)
        summary = run_load(
            instance,
            discovery,
            on_start=lambda total: progress.update(task, description="loading", total=total),
            on_progress=lambda done: progress.advance(task, done),
        )
    return summary


HOUR = timedelta(hours=1)
# A backfill's runs are few and large: each run costs a process (a pod on Kubernetes) and about
# 0.1 s to queue, so 48,000 partitions go in 48 runs.
BACKFILL_BATCH_SIZE = 1_000


@cli.command()
@click.option(
    "--since",
    "since_text",
    required=True,
    metavar="HOUR",
    help="First hour to load, UTC, e.g. 2026-11-25T00.",
)
@click.option(
    "--until",
    "until_text",
    metavar="HOUR",
    help="Load the hours before this one (default: the current hour).",
)
@click.option(
    "--stream",
    "stream_keys",
    multiple=True,
    metavar="CUSTOMER.EVENT",
    help="Only this stream (repeatable; default: every registered stream).",
)
@click.option(
    "--submit",
    "webserver",
    metavar="URL",
    help="Launch a Dagster backfill of the tables on this webserver (its daemon runs it) "
    "instead of loading here.",
)
@functools.partial(_load_options, batch_size=BACKFILL_BATCH_SIZE)
def backfill(
    since_text: str,
    until_text: str | None,
    stream_keys: tuple[str, ...],
    webserver: str | None,
    batch_size: int,
    concurrency: int,
    grace_minutes: int,
) -> None:
    """Load every hour of a range whose files are not loaded yet, however old.

    The sensors look back 24 hours; this covers any range, in batch runs of many partitions
    (each partition's status shows in the Dagster UI). Runs here by default; with --submit it
    launches Dagster's own asset backfill of the tables on a webserver, as the UI's
    "Materialize" does. Hours already loaded with the same files are left alone.
    """
    since = _parse_hour("--since", since_text)
    until = _parse_hour("--until", until_text) if until_text else hour_floor(datetime.now(UTC))
    if until <= since:
        raise ClickstreamError(f"--until ({until:%Y-%m-%dT%H}) must be after --since")
    settings = Settings.from_env()
    settings.require_bucket()
    settings.require_warehouse_url()
    _quiet_dagster_warnings()
    from clickstream_pipeline.partitions import FIRST_HOUR_TIME
    from clickstream_pipeline.registry import load_registry
    from clickstream_pipeline.resources import DiscoveryResource
    from clickstream_pipeline.runner import backfill_pending, dagster_instance

    if since < FIRST_HOUR_TIME:
        raise ClickstreamError(f"--since is before the first partition hour, {FIRST_HOUR_TIME}")
    discovery = DiscoveryResource(
        batch_size=batch_size, concurrency=concurrency, grace_minutes=grace_minutes
    )
    registry = load_registry()
    streams = _select_streams(registry.streams, stream_keys)
    if webserver:
        _submit_backfill(webserver, streams, since, until)
        return
    instance = dagster_instance()
    with _progress() as progress:
        progress.add_task("listing files", total=None)
        pending = backfill_pending(streams, since, until, discovery)
    summary = _run_partitions(instance, registry, pending, discovery)
    _print_load(summary)
    _raise_if_failed(summary)


def _parse_hour(option: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ClickstreamError(f"{option}: not an hour such as 2026-11-25T00: {text!r}") from None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return hour_floor(value)


def _select_streams(registered: tuple[Stream, ...], keys: tuple[str, ...]) -> tuple[Stream, ...]:
    if not keys:
        return registered
    known = {stream.key: stream for stream in registered}
    unknown = [key for key in keys if key not in known]
    if unknown:
        raise ClickstreamError(f"not in the registry: {', '.join(unknown)}")
    return tuple(known[key] for key in dict.fromkeys(keys))


def _run_partitions(
    instance: DagsterInstance,
    registry: Registry,
    pending: list[PendingPartition],
    discovery: DiscoveryResource,
) -> LoadSummary:
    from clickstream_pipeline.definitions import build_defs
    from clickstream_pipeline.runner import run_partitions

    with _progress() as progress:
        task = progress.add_task("loading", total=len(pending))
        return run_partitions(
            build_defs(registry),
            instance,
            pending,
            discovery,
            "clickstream backfill",
            on_progress=lambda done: progress.advance(task, done),
        )


def _submit_backfill(
    url: str, streams: tuple[Stream, ...], since: datetime, until: datetime
) -> None:
    """Launch Dagster's own asset backfill of the tables over the hours, on the webserver."""
    from clickstream_pipeline.layout import hour_key
    from clickstream_pipeline.partitions import table_asset_key
    from clickstream_pipeline.runner import SOURCE_TAG
    from clickstream_pipeline.webserver import launch_backfill

    hours = [hour_key(since + timedelta(hours=n)) for n in range(int((until - since) / HOUR))]
    backfill_id = launch_backfill(
        url,
        [table_asset_key(stream) for stream in streams],
        hours,
        title=f"clickstream backfill {hours[0]}...{hours[-1]}",
        tags={SOURCE_TAG: "clickstream backfill"},
    )
    out.print(
        f"launched backfill {backfill_id} of {len(streams)} tables x {len(hours)} hours on {url}; "
        "its run loads the hours whose files are new or changed"
    )


def _print_load(summary: LoadSummary) -> None:
    if not summary.pending:
        out.print("nothing to load: every completed hour is up to date")
        return
    table = Table(title="loaded", title_justify="left")
    for column in (
        "stream",
        "hours",
        "files",
        "records",
        "rows loaded",
        "duplicates dropped",
        "quarantined",
    ):
        table.add_column(column, justify="left" if column == "stream" else "right")
    for key, totals in sorted(summary.streams.items()):
        table.add_row(
            key,
            *(
                f"{n:,}"
                for n in (
                    totals.partitions,
                    totals.files,
                    totals.records_read,
                    totals.rows_loaded,
                    totals.duplicates_dropped,
                    totals.quarantined,
                )
            ),
        )
    out.print(table)
    rate = summary.records_read / summary.seconds if summary.seconds else 0.0
    out.print(
        f"{summary.loaded:,} of {summary.pending:,} partitions loaded in {len(summary.runs)} "
        f"runs, {summary.seconds:,.1f} s ({rate:,.0f} events/s)"
    )


@cli.command("import-history")
def import_history() -> None:
    """Show every hour loaded before tables were assets as materialized in Dagster.

    Reads the load ledger (CLICKSTREAM_WAREHOUSE_URL) and reports each loaded hour that the
    instance in DAGSTER_HOME has no materialization of, for every table the ledger knows (removed
    ones too); run it once after upgrading. Running it again reports nothing.
    """
    _quiet_dagster_warnings()
    from clickstream_pipeline import history
    from clickstream_pipeline.resources import WarehouseResource
    from clickstream_pipeline.runner import dagster_instance

    warehouse = WarehouseResource().warehouse()
    total = sum(history.ledger_hours(warehouse).values())
    with _progress() as progress:
        task = progress.add_task("reporting loaded hours", total=total)
        result = history.import_history(
            dagster_instance(), warehouse, on_progress=lambda done: progress.advance(task, done)
        )
    out.print(
        f"{result.reported:,} loaded hours of {result.tables:,} tables reported as materialized "
        f"({result.present:,} already materialized)"
    )


@cli.command()
@click.option(
    "--root",
    default=str(DEFAULT_ROOT / "demo"),
    show_default=True,
    type=click.Path(),
    help="Where the demo keeps its embedded PostgreSQL and Dagster instance.",
)
@click.option("--customers", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--events", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--hours", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--events-per-file", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=42, show_default=True, type=int)
def demo(
    root: str, customers: int, events: int, hours: int, events_per_file: int, seed: int
) -> None:
    """Run the whole pipeline on embedded defaults and print a summary.

    Starts an embedded PostgreSQL and a local S3 server, writes synthetic events (with
    duplicates, bad records and late files), loads them through Dagster, writes the late files,
    loads again, and checks the tables hold exactly the unique valid events.
    """
    spec = GeneratorSpec(
        customers=customers,
        events=events,
        hours=hours,
        events_per_file=events_per_file,
        files_per_hour=2,
        duplicate_rate=0.03,
        bad_record_rate=0.005,
        late_files=max(1, customers * events * hours // 8),
        skew=5,
        seed=seed,
    )
    began = time.perf_counter()
    err.print("starting the embedded PostgreSQL and local S3 server ...")
    with LocalStack(root, fresh=True) as env:
        os.environ.update(env)
        settings = Settings.from_env()
        now = datetime.now(UTC)
        client = s3_client()
        _register(spec)
        with _progress() as progress:
            task = progress.add_task("writing events", total=None)
            written = write_files(
                client,
                env["CLICKSTREAM_BUCKET"],
                generate_files(spec, settings.raw_prefix, now, include="on_time"),
                on_file=lambda _: progress.advance(task),
            )
        err.print(f"wrote {written.files} files, {written.records:,} events; loading ...")
        first = _run_load(grace_minutes=0)
        late = write_files(
            client,
            env["CLICKSTREAM_BUCKET"],
            generate_files(spec, settings.raw_prefix, now, include="late"),
        )
        err.print(f"{late.files} late files arrived; loading again ...")
        second = _run_load(grace_minutes=0)
        third = _run_load(grace_minutes=0)
        expected = _expected_rows(spec, settings.raw_prefix, now)
        _print_demo(spec, expected, [first, second, third], time.perf_counter() - began)


def _expected_rows(spec: GeneratorSpec, raw_prefix: str, now: datetime) -> dict[str, int]:
    expected: dict[str, int] = {}
    for generated in generate_files(spec, raw_prefix, now):
        key = generated.stream.key
        expected[key] = expected.get(key, 0) + generated.new_messages
    return expected


def _print_demo(
    spec: GeneratorSpec, expected: dict[str, int], loads: list[LoadSummary], seconds: float
) -> None:
    warehouse = warehouse_for_url(Settings.from_env().require_warehouse_url())
    rows = warehouse.row_counts(spec.streams)
    ledger = warehouse.ledger(spec.streams)
    table = Table(title="clickstream demo: warehouse tables", title_justify="left")
    for column in ("table", "rows", "expected", "duplicates dropped", "quarantined", "events read"):
        table.add_column(column, justify="left" if column == "table" else "right")
    totals = [0, 0, 0, 0, 0]
    for stream in spec.streams:
        entries = [e for (key, _), e in ledger.items() if key == stream.key]
        values = [
            rows[stream.key],
            expected[stream.key],
            sum(e.duplicates for e in entries),
            sum(e.quarantined for e in entries),
            sum(e.records_read for e in entries),
        ]
        totals = [a + b for a, b in zip(totals, values, strict=True)]
        table.add_row(stream.key, *(f"{v:,}" for v in values))
    table.add_row("total", *(f"{v:,}" for v in totals), style="bold")
    out.print(table)
    first, second, third = loads
    load_seconds = first.seconds + second.seconds
    rate = (first.records_read + second.records_read) / load_seconds if load_seconds else 0.0
    out.print(
        f"first load: {first.loaded} partitions in {first.seconds:.1f} s; late files: "
        f"{second.loaded} partitions reloaded in {second.seconds:.1f} s; a third load found "
        f"{third.pending} to do"
    )
    out.print(f"loaded at {rate:,.0f} events/s; demo took {seconds:.1f} s in all")
    if rows != expected or first.failed or second.failed:
        raise ClickstreamError("the tables do not hold exactly the unique valid events")
    out.print("every table holds exactly the unique valid events: nothing lost, nothing twice")


@cli.command()
@click.option(
    "--root",
    default=str(DEFAULT_ROOT / "dev"),
    show_default=True,
    type=click.Path(),
    help="Where the embedded PostgreSQL and the Dagster instance live.",
)
@click.option(
    "--port",
    default=3000,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the Dagster UI on 127.0.0.1.",
)
@click.option(
    "--sample/--no-sample",
    default=True,
    show_default=True,
    help="Write a few hours of synthetic events to start with.",
)
@click.option(
    "--metrics-port",
    default=9108,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the Prometheus /metrics endpoint on 127.0.0.1.",
)
def dev(root: str, port: int, sample: bool, metrics_port: int) -> None:
    """Run the embedded stack with the Dagster UI and daemon, sensors on, and /metrics.

    Dagster runs as in production: a code server, the webserver and the daemon, so a registry
    change ('clickstream registry add' in another terminal) reloads the code location. Prints the
    variables that point other terminals at the same stack. Ctrl-C or SIGTERM stops everything.
    """
    from clickstream_pipeline.local.dagster import DagsterServices

    # SIGTERM (a supervisor, `kill`) stops everything as Ctrl-C does, instead of leaving the
    # embedded PostgreSQL and the Dagster processes running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with LocalStack(root) as env:
            os.environ.update(env)
            os.environ["CLICKSTREAM_DAGSTER_URL"] = f"http://127.0.0.1:{port}"
            try:
                _serve_metrics("127.0.0.1", metrics_port)
            except ClickstreamError as error:
                # The UI and the sensors matter more here than the endpoint: go on without it.
                err.print(f"warning: {error} (choose another with --metrics-port)", markup=False)
            if sample:
                _write_dev_sample(env["CLICKSTREAM_BUCKET"])
            for name in (*env, "CLICKSTREAM_DAGSTER_URL"):
                err.print(f"export {name}={shlex.quote(os.environ[name])}", markup=False)
            err.print("starting the Dagster code server, webserver and daemon ...")
            services = DagsterServices(Path(root) / "dagster", port, _free_port())
            with services:
                err.print(
                    f"Dagster UI on {services.url}, metrics on "
                    f"http://127.0.0.1:{metrics_port}/metrics (Ctrl-C stops everything)"
                )
                status = services.wait()
            raise ClickstreamError(f"a Dagster process exited with status {status}")
    except KeyboardInterrupt:
        err.print("stopped")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_dev_sample(bucket: str) -> None:
    spec = GeneratorSpec(
        customers=2,
        events=3,
        hours=3,
        events_per_file=500,
        duplicate_rate=0.02,
        bad_record_rate=0.01,
        seed=7,
        # Hours that ended over an hour ago: past any grace period, so they load at once.
        start=hour_floor(datetime.now(UTC)) - timedelta(hours=4),
    )
    _register(spec)
    write_files(
        s3_client(),
        bucket,
        generate_files(spec, Settings.from_env().raw_prefix, datetime.now(UTC)),
    )


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9108, show_default=True, type=click.IntRange(1, 65535))
def metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics on /metrics until stopped, computed from the load ledger and
    the Dagster instance at each scrape (events loaded, duplicates, quarantined, lag per
    stream; load durations, files and bytes; pending and failed partitions; sensor tick and
    daemon heartbeat ages). docs/operations.md lists every metric."""
    _serve_metrics(host, port)
    err.print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C stops)")
    _wait_for_interrupt()


def _serve_metrics(host: str, port: int) -> None:
    """Serve /metrics from a background thread of this process."""
    from prometheus_client import CollectorRegistry, start_http_server

    from clickstream_pipeline.metrics import PipelineCollector
    from clickstream_pipeline.resources import WarehouseResource

    WarehouseResource().warehouse()  # a missing or bad URL is a clear error now, not at scrape
    registry = CollectorRegistry()
    registry.register(PipelineCollector(lambda: WarehouseResource().warehouse()))
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise ClickstreamError(
            f"cannot serve metrics on {host}:{port}: {error.strerror or error}"
        ) from None


@cli.command()
@click.option(
    "--daemon/--no-daemon",
    default=True,
    show_default=True,
    help="Also require recent Dagster daemon heartbeats (DAGSTER_HOME).",
)
def health(daemon: bool) -> None:
    """Check S3, the warehouse, the registry and the Dagster daemon; exit 1 if any is down.

    Usable as a Kubernetes probe: one table, one exit code.
    """
    from clickstream_pipeline.health import run_checks

    checks = run_checks(include_daemon=daemon)
    table = Table(title="clickstream health", title_justify="left")
    for column in ("component", "state", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, "up" if check.ok else "DOWN", check.detail)
    out.print(table)
    down = [check.name for check in checks if not check.ok]
    if down:
        raise ClickstreamError(f"down: {', '.join(down)}")


@cli.command()
@click.option("--quick", is_flag=True, help="Tiny sizes, no daemon: proves the benchmark runs.")
@click.option(
    "--events",
    "sizes",
    multiple=True,
    type=click.IntRange(min=100),
    help="Data-plane partition sizes (repeatable; default 100,000 and 1,000,000).",
)
@click.option(
    "--only",
    type=click.Choice(["dataplane", "orchestration", "skew", "scale"]),
    multiple=True,
    help="Run only these parts (repeatable).",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to write results.json, benchmarks.md and benchmarks.png "
    "(default: benchmarks/ and docs/, or a temporary folder with --quick).",
)
@click.option(
    "--s3-bucket",
    default=None,
    help="Measure the scale part's S3 requests against this bucket, with this environment's AWS "
    "credentials, instead of the local S3 server (its files go under a fresh prefix, deleted "
    "afterwards).",
)
def bench(
    quick: bool,
    sizes: tuple[int, ...],
    only: tuple[str, ...],
    output: str | None,
    s3_bucket: str | None,
) -> None:
    """Measure the pipeline side by side with the COPY limit and with peers.

    Data plane (this project, COPY-only, naive inserts, dlt), orchestration (clickstream load and
    the daemon), skew and scale. Writes JSON, a Markdown table and a chart.
    """
    import json
    import tempfile

    from clickstream_pipeline.bench import dataplane, orchestration, report, scale

    parts = set(only) or {"dataplane", "orchestration", "skew", "scale"}
    if output is None and quick:
        output = tempfile.mkdtemp(prefix="clickstream-bench-")
    base = Path(output) if output else None
    json_path = (base or Path("benchmarks")) / "results.json"
    results: dict[str, object] = {"quick": quick}
    if only and json_path.exists():
        # Re-measure some parts and keep the others' last figures.
        results = {**json.loads(json_path.read_text()), "quick": quick}
    steps = {
        "dataplane": lambda: dataplane.run(
            list(sizes) or ([20_000] if quick else [100_000, 1_000_000])
        ),
        "orchestration": lambda: (
            orchestration.run(customers=5, events=4, per_partition=50, daemon=False)
            if quick
            else orchestration.run()
        ),
        "skew": lambda: orchestration.run_skew(
            **({"customers": 5, "light": 200, "factor": 10} if quick else {})
        ),
        "scale": lambda: (
            scale.run(
                customers=5, events=4, backfill_hours=1, history_hours=48, s3_bucket=s3_bucket
            )
            if quick
            else scale.run(s3_bucket=s3_bucket)
        ),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for name in ("dataplane", "orchestration", "skew", "scale"):
        if name in parts:
            err.print(f"bench: {name} ...")
            began = time.perf_counter()
            results[name] = steps[name]()
            err.print(f"bench: {name} done in {time.perf_counter() - began:.0f} s")
            # After each part: a later part that fails does not lose this one's figures.
            json_path.write_text(json.dumps(results, indent=2) + "\n")
    docs = base or Path("docs")
    docs.mkdir(parents=True, exist_ok=True)
    drawn = report.chart(results, docs / "benchmarks.png")
    (docs / "benchmarks.md").write_text(
        report.markdown(results, "benchmarks.png" if drawn else None)
    )
    table = Table(title="goals", title_justify="left")
    for column in ("goal", "target", "measured", "met"):
        table.add_column(column)
    for goal, target, measured, met in report.goals(results):
        table.add_row(goal, target, measured, "yes" if met else "no")
    out.print(table)
    out.print(
        f"results: {json_path}; report: {docs / 'benchmarks.md'}"
        + ("" if drawn else " (no chart: install the bench extra for matplotlib)")
    )


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
