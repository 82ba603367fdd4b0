"""``clickstream load``, ``backfill`` and ``import-history``: loads through Dagster."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import click
from rich.table import Table

from clickstream_pipeline.cli.app import (
    cli,
    out,
    progress,
    quiet_dagster_warnings,
)
from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.layout import hour_floor
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry

if TYPE_CHECKING:
    from dagster import DagsterInstance

    from clickstream_pipeline.discovery import PendingPartition
    from clickstream_pipeline.resources import DiscoveryResource
    from clickstream_pipeline.runner import LoadSummary


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
    summary = load_through_dagster(
        batch_size=batch_size, concurrency=concurrency, grace_minutes=grace_minutes
    )
    _print_load(summary)
    _raise_if_failed(summary)


def _raise_if_failed(summary: LoadSummary) -> None:
    if summary.failed:
        raise ClickstreamError(
            f"{len(summary.failed)} of {summary.pending} partitions failed to load "
            f"(first: {summary.failed[0]}); see the runs in the Dagster UI"
        )


def load_through_dagster(**discovery_settings: int) -> LoadSummary:
    """Load through Dagster."""
    quiet_dagster_warnings()
    from clickstream_pipeline.resources import DiscoveryResource
    from clickstream_pipeline.runner import dagster_instance, run_load

    discovery = DiscoveryResource(**discovery_settings)
    instance = dagster_instance()
    with progress() as bar:
        task = bar.add_task("discovering", total=None)
        summary = run_load(
            instance,
            discovery,
            on_start=lambda total: bar.update(task, description="loading", total=total),
            on_progress=lambda done: bar.advance(task, done),
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
    quiet_dagster_warnings()
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
    with progress() as bar:
        bar.add_task("listing files", total=None)
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

    with progress() as bar:
        task = bar.add_task("loading", total=len(pending))
        return run_partitions(
            build_defs(registry),
            instance,
            pending,
            discovery,
            "clickstream backfill",
            on_progress=lambda done: bar.advance(task, done),
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
    quiet_dagster_warnings()
    from clickstream_pipeline import history
    from clickstream_pipeline.resources import WarehouseResource
    from clickstream_pipeline.runner import dagster_instance

    warehouse = WarehouseResource().warehouse()
    total = sum(history.ledger_hours(warehouse).values())
    with progress() as bar:
        task = bar.add_task("reporting loaded hours", total=total)
        result = history.import_history(
            dagster_instance(), warehouse, on_progress=lambda done: bar.advance(task, done)
        )
    out.print(
        f"{result.reported:,} loaded hours of {result.tables:,} tables reported as materialized "
        f"({result.present:,} already materialized)"
    )
