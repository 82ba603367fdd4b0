"""``clickstream metrics`` and ``health``: what on-call and Kubernetes look at."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.table import Table

from clickstream_pipeline.cli.app import (
    cli,
    err,
    out,
    wait_for_interrupt,
)
from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError

if TYPE_CHECKING:
    pass


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9108, show_default=True, type=click.IntRange(1, 65535))
def metrics(host: str, port: int) -> None:
    """Serve Prometheus metrics on /metrics until stopped, computed from the load ledger and
    the Dagster instance at each scrape (events loaded, duplicates, quarantined, lag per
    stream; load durations, files and bytes; pending and failed partitions; sensor tick and
    daemon heartbeat ages). docs/operations.md lists every metric."""
    serve_metrics(host, port)
    err.print(f"serving metrics on http://{host}:{port}/metrics (Ctrl-C stops)")
    wait_for_interrupt()


def serve_metrics(host: str, port: int) -> None:
    """Serve /metrics from a background thread of this process."""
    from prometheus_client import CollectorRegistry, start_http_server

    from clickstream_pipeline.metrics import PipelineCollector
    from clickstream_pipeline.resources import WarehouseResource

    WarehouseResource().warehouse()  # a missing or bad URL is a clear error now, not at scrape
    settings = Settings.from_env()
    registry = CollectorRegistry()
    registry.register(
        PipelineCollector(
            lambda: WarehouseResource().warehouse(),
            # Vortex's shards, wherever it records them in PostgreSQL (none: no series).
            vortex_url=settings.vortex_postgres_url,
        )
    )
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
    """Check S3, the warehouse, the registry, the Dagster daemon and (where
    CLICKSTREAM_KINESIS_STREAM is set) vortex; exit 1 if any is down.

    Usable as a Kubernetes probe: one table, one exit code. A registry service that is down while
    the code location serves its last snapshot is STALE, a warning: the pipeline still loads, so
    a probe must not take it out of service.
    """
    from clickstream_pipeline.health import run_checks

    checks = run_checks(include_daemon=daemon)
    table = Table(title="clickstream health", title_justify="left")
    for column in ("component", "state", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, check.state, check.detail)
    out.print(table)
    stale = [check.name for check in checks if check.stale]
    if stale:
        err.print(f"stale: {', '.join(stale)} (the pipeline serves its last snapshot)")
    down = [check.name for check in checks if not check.ok and not check.stale]
    if down:
        raise ClickstreamError(f"down: {', '.join(down)}")
