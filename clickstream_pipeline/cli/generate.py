"""``clickstream generate``: synthetic Segment-style files in the raw layout."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import click
from rich.table import Table

from clickstream_pipeline.cli.app import (
    cli,
    out,
    progress,
    register,
)
from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.generator import (
    GenerationReport,
    GeneratorSpec,
    generate_files,
    put_on_stream,
    write_files,
)
from clickstream_pipeline.s3 import ensure_bucket, s3_client
from clickstream_pipeline.vortex.kinesis import kinesis_client
from clickstream_pipeline.vortex.routing import MAX_CLOCK_SKEW

if TYPE_CHECKING:
    pass


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
@click.option(
    "--to",
    "target",
    type=click.Choice(["s3", "kinesis"]),
    default="s3",
    show_default=True,
    help="Write raw files to S3, or put the records on the Kinesis stream (for vortex).",
)
@click.option(
    "--stream",
    envvar="CLICKSTREAM_KINESIS_STREAM",
    help="Kinesis stream for --to kinesis [env: CLICKSTREAM_KINESIS_STREAM].",
)
def generate(
    start: datetime | None,
    no_register: bool,
    target: str,
    stream: str | None,
    **options: int | float | bool,
) -> None:
    """Write synthetic Segment-style events: files to S3 in the raw layout, or records on the
    Kinesis stream as apps send them (each with its customer)."""
    settings = Settings.from_env()
    if target == "kinesis":
        options["compress"] = False  # records go on the stream one by one: no file to gzip
    spec = GeneratorSpec(start=start.replace(tzinfo=UTC) if start else None, **options)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    if target == "kinesis":
        if not stream:
            raise ClickstreamError(
                "--to kinesis needs a stream: pass --stream or export CLICKSTREAM_KINESIS_STREAM"
            )
        if now - spec.first_hour(now) > MAX_CLOCK_SKEW:
            raise ClickstreamError(
                "records received more than 24 h before they reach the stream go to errors/: "
                "use --hours 23 or fewer, or a later --start"
            )
    else:
        ensure_bucket(s3_client(), settings.require_bucket())
    if not no_register:
        register(spec)
    total_files = spec.customers * spec.events * spec.hours * spec.files_per_hour + min(
        spec.late_files, spec.customers * spec.events * spec.hours
    )
    began = time.perf_counter()
    files = generate_files(spec, settings.raw_prefix, now)
    with progress() as bar:
        task = bar.add_task(
            "putting records (file by file)" if target == "kinesis" else "writing files",
            total=total_files,
        )
        if target == "kinesis":
            assert stream is not None
            report = put_on_stream(
                kinesis_client(), stream, files, on_file=lambda _: bar.advance(task)
            )
            where = f"Kinesis stream {stream}"
        else:
            bucket = settings.require_bucket()
            report = write_files(s3_client(), bucket, files, on_file=lambda _: bar.advance(task))
            where = f"s3://{bucket}/{settings.raw_prefix}/"
    _print_generation(report, where, time.perf_counter() - began)


def _print_generation(report: GenerationReport, where: str, seconds: float) -> None:
    table = Table(title=f"generated into {where}", title_justify="left")
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
