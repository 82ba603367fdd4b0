"""``clickstream stack``, ``demo`` and ``dev``: the pipeline on the embedded stack."""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from clickstream_pipeline.cli.app import (
    cli,
    err,
    interrupts_kept,
    out,
    progress,
    register,
    stopped_by_signals,
    wait_forever,
)
from clickstream_pipeline.cli.load import load_through_dagster
from clickstream_pipeline.cli.ops import serve_metrics
from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.generator import (
    GeneratorSpec,
    generate_files,
    put_on_stream,
)
from clickstream_pipeline.layout import hour_floor
from clickstream_pipeline.local import LocalStack
from clickstream_pipeline.local.stack import DEFAULT_BUCKET, DEFAULT_ROOT
from clickstream_pipeline.vortex import Totals, Vortex, vortex_worker
from clickstream_pipeline.vortex.kinesis import kinesis_client
from clickstream_pipeline.warehouse import warehouse_for_url

if TYPE_CHECKING:
    from clickstream_pipeline.runner import LoadSummary


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
@stopped_by_signals()
def stack(root: str, bucket: str, s3_port: int) -> None:
    """Run the embedded PostgreSQL and local S3 server until Ctrl-C; print their env vars.

    Objects in the local S3 server live in memory and go away when it stops.
    """
    with LocalStack(root, bucket=bucket, s3_port=s3_port) as env:
        for name, value in env.items():
            out.print(f"export {name}={shlex.quote(value)}")
        err.print("embedded stack running; press Ctrl-C to stop")
        wait_forever()


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
@click.option("--events-per-file", default=1500, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=42, show_default=True, type=int)
# Interrupted, the demo did not show what it is for: it exits 143 after SIGTERM (130, Ctrl-C).
@stopped_by_signals(unfinished=True)
def demo(
    root: str, customers: int, events: int, hours: int, events_per_file: int, seed: int
) -> None:
    """Run the whole pipeline on embedded defaults and print a summary.

    Starts an embedded PostgreSQL and a local S3 and Kinesis server, puts synthetic events on the
    stream (with duplicates and bad records), runs vortex to write them to S3, loads them through
    Dagster, sends late events for hours already loaded, writes and loads again, and checks the
    tables hold exactly the unique valid events.
    """
    if hours > 23:
        raise ClickstreamError("--hours must be 23 or fewer: older events go to errors/")
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
        compress=False,
    )
    began = time.perf_counter()
    err.print("starting the embedded PostgreSQL and local S3 and Kinesis server ...")
    with LocalStack(root, fresh=True) as env:
        os.environ.update(env)
        settings = Settings.from_env()
        now = datetime.now(UTC)
        kinesis = kinesis_client()
        stream = env["CLICKSTREAM_KINESIS_STREAM"]
        register(spec)
        with progress() as bar:
            task = bar.add_task("putting events on the stream", total=None)
            sent = put_on_stream(
                kinesis,
                stream,
                generate_files(spec, settings.raw_prefix, now, include="on_time"),
                on_file=lambda _: bar.advance(task),
            )
        err.print(f"put {sent.records:,} events on {stream}; vortex is writing them to S3 ...")
        first_vortex = _drain(stream)
        err.print(f"vortex wrote {first_vortex.files} files; loading ...")
        first = _load()
        late = put_on_stream(
            kinesis, stream, generate_files(spec, settings.raw_prefix, now, include="late")
        )
        err.print(f"{late.records:,} late events for loaded hours; writing and loading again ...")
        second_vortex = _drain(stream)
        second = _load()
        third = _load()
        expected = _expected_rows(spec, settings.raw_prefix, now)
        _print_demo(
            spec,
            expected,
            [first, second, third],
            [first_vortex, second_vortex],
            time.perf_counter() - began,
        )


def _load() -> LoadSummary:
    """Load what vortex wrote through Dagster, in this process, until a signal stops the demo."""
    with interrupts_kept():
        return load_through_dagster(grace_minutes=0)


def _drain(stream: str) -> Totals:
    """Vortex until the stream has been idle for 2 s: every record written and checkpointed."""
    with vortex_worker(stream) as worker:
        return worker.run(until_idle=2.0)


def _expected_rows(spec: GeneratorSpec, raw_prefix: str, now: datetime) -> dict[str, int]:
    expected: dict[str, int] = {}
    for generated in generate_files(spec, raw_prefix, now):
        key = generated.stream.key
        expected[key] = expected.get(key, 0) + generated.new_messages
    return expected


def _print_demo(
    spec: GeneratorSpec,
    expected: dict[str, int],
    loads: list[LoadSummary],
    vortex: list[Totals],
    seconds: float,
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
    read, written, files, duplicates, errors = (
        sum(getattr(v, name) for v in vortex)
        for name in ("records_in", "records_out", "files", "duplicates", "errors")
    )
    out.print(
        f"vortex: {read:,} events read from the stream, {written:,} written in {files:,} files, "
        f"{duplicates:,} duplicates dropped within batches, {errors:,} unroutable to errors/"
    )
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
    help="Put a few hours of synthetic events on the stream to start with.",
)
@click.option(
    "--metrics-port",
    default=9108,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the Prometheus /metrics endpoint on 127.0.0.1.",
)
# SIGTERM (a supervisor, `kill`) stops everything as Ctrl-C does, instead of leaving the embedded
# PostgreSQL and the Dagster processes running; stopped by the user, dev exits 0.
@stopped_by_signals()
def dev(root: str, port: int, sample: bool, metrics_port: int) -> None:
    """Run the embedded stack with vortex, the Dagster UI and daemon, sensors on, and /metrics.

    Events put on the local Kinesis stream ('clickstream generate --to kinesis' in another
    terminal) reach S3 through vortex within seconds, and the sensors load them.

    Dagster runs as in production: a code server, the webserver and the daemon, so a registry
    change ('clickstream registry add' in another terminal) reloads the code location. Prints the
    variables that point other terminals at the same stack. Ctrl-C or SIGTERM stops everything.
    """
    from clickstream_pipeline.local.dagster import DagsterServices

    with LocalStack(root) as env:
        os.environ.update(env)
        os.environ["CLICKSTREAM_DAGSTER_URL"] = f"http://127.0.0.1:{port}"
        try:
            serve_metrics("127.0.0.1", metrics_port)
        except ClickstreamError as error:
            # The UI and the sensors matter more here than the endpoint: go on without it.
            err.print(f"warning: {error} (choose another with --metrics-port)", markup=False)
        stream = env["CLICKSTREAM_KINESIS_STREAM"]
        if sample:
            _put_dev_sample(stream)
        for name in (*env, "CLICKSTREAM_DAGSTER_URL"):
            err.print(f"export {name}={shlex.quote(os.environ[name])}", markup=False)
        err.print("starting vortex, the Dagster code server, webserver and daemon ...")
        services = DagsterServices(Path(root) / "dagster", port)
        with _vortex_running(stream) as worker, services:
            err.print(
                f"Dagster UI on {services.url}, metrics on "
                f"http://127.0.0.1:{metrics_port}/metrics; vortex reads {stream} "
                "(Ctrl-C stops everything)"
            )
            try:
                status = services.wait()
            finally:
                # Vortex writes what it batched while the Dagster processes stop, not after.
                worker.stop()
        raise ClickstreamError(f"a Dagster process exited with status {status}")


# On a laptop a batch waits at most this long: events put on the stream are in S3 within seconds.
DEV_MAX_DELAY_SECONDS = 5.0
# What vortex gets to write its batches when dev stops (it takes well under a second here).
VORTEX_STOP_SECONDS = 5.0


@contextlib.contextmanager
def _vortex_running(stream: str) -> Iterator[Vortex]:
    """Vortex reading ``stream`` in a thread until the block ends (it writes what it batched)."""
    with vortex_worker(stream, max_delay_seconds=DEV_MAX_DELAY_SECONDS) as worker:
        thread = threading.Thread(target=worker.run, name="vortex", daemon=True)
        thread.start()
        try:
            yield worker
        finally:
            worker.stop()
            # Bounded, so that stopping is prompt: a batch vortex had no time to write stays
            # planned or unread, and the next start writes it (nothing is lost).
            thread.join(VORTEX_STOP_SECONDS)


def _put_dev_sample(stream: str) -> None:
    """A few hours of events on the stream, as apps send them: vortex writes them to S3."""
    spec = GeneratorSpec(
        customers=2,
        events=3,
        hours=3,
        events_per_file=500,
        duplicate_rate=0.02,
        bad_record_rate=0.01,
        seed=7,
        compress=False,
        # Hours that ended over an hour ago: past any grace period, so they load at once.
        start=hour_floor(datetime.now(UTC)) - timedelta(hours=4),
    )
    register(spec)
    put_on_stream(
        kinesis_client(),
        stream,
        generate_files(spec, Settings.from_env().raw_prefix, datetime.now(UTC)),
    )
