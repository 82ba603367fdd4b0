"""``clickstream vortex``: the microbatcher, Kinesis stream -> raw files in S3."""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING

import click

from clickstream_pipeline.cli.app import cli, err, out

if TYPE_CHECKING:
    from clickstream_pipeline.vortex import Vortex


@cli.command()
@click.option(
    "--stream",
    envvar="CLICKSTREAM_KINESIS_STREAM",
    required=True,
    help="Kinesis stream to read [env: CLICKSTREAM_KINESIS_STREAM].",
)
@click.option(
    "--until-idle",
    type=click.FloatRange(min=0.5),
    default=None,
    metavar="SECONDS",
    help="Exit 0 once this worker holds every shard, the stream has been idle this long, and "
    "every batch is written and checkpointed: drain the stream (default: run until stopped).",
)
@click.option(
    "--max-bytes",
    type=click.IntRange(min=1),
    default=16 * 1024 * 1024,
    show_default=True,
    help="Write a shard's batch once its records hold this many bytes.",
)
@click.option(
    "--max-records",
    type=click.IntRange(min=1),
    default=50_000,
    show_default=True,
    help="... or this many records.",
)
@click.option(
    "--max-delay",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="... or once its first record has waited this long (keep it under the loader's grace).",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(min=3),
    default=30.0,
    show_default=True,
    help="A worker's shard lease; a dead worker's shards are taken over after it expires.",
)
@click.option(
    "--max-shards",
    type=click.IntRange(min=1),
    default=None,
    help="Hold at most this many shards (memory is about --max-bytes per shard held); "
    "default: a fair share of the stream's shards, uncapped.",
)
def vortex(
    stream: str,
    until_idle: float | None,
    max_bytes: int,
    max_records: int,
    max_delay: float,
    lease_seconds: float,
    max_shards: int | None,
) -> None:
    """Read a Kinesis stream and write its records to S3 as raw files, exactly once.

    Records go to raw/customer=/event=/date=/hour=/ by their customer, event and receivedAt;
    records that cannot be routed go to errors/ with the reason. Several processes share the
    stream's shards (leases and checkpoints in CLICKSTREAM_VORTEX_URL, default the warehouse's
    PostgreSQL). SIGTERM or Ctrl-C writes what is batched, then exits.
    """
    from clickstream_pipeline.vortex import vortex_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    with vortex_worker(
        stream,
        max_bytes=max_bytes,
        max_records=max_records,
        max_delay_seconds=max_delay,
        lease_seconds=lease_seconds,
        max_shards=max_shards,
    ) as worker:
        _run(worker, until_idle)


def _run(worker: Vortex, until_idle: float | None) -> None:
    config = worker.config
    previous = signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    err.print(
        f"vortex {worker.owner}: reading {config.stream!r} into "
        f"s3://{config.bucket}/{config.raw_prefix}/"
        + (f" until idle for {until_idle:g} s" if until_idle else " (Ctrl-C stops)")
    )
    began = time.perf_counter()
    try:
        totals = worker.run(until_idle=until_idle)
    except KeyboardInterrupt:
        worker.stop()
        totals = worker.totals
    finally:
        signal.signal(signal.SIGTERM, previous)
    seconds = time.perf_counter() - began
    out.print(
        f"vortex: {totals.records_in:,} records read, {totals.records_out:,} written in "
        f"{totals.files:,} files ({totals.bytes_out:,} bytes), {totals.duplicates:,} duplicates "
        f"dropped, {totals.errors:,} to errors/ in {seconds:.1f} s"
    )
