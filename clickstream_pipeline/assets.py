"""Assets, built from the registry: one per warehouse table and one per table's raw files.

Table ``acme.page_view`` is the asset ``acme/page_view`` in group ``acme``; its raw files in S3
are the asset ``raw/acme/page_view``, which the discovery sensor reports as materialized hour by
hour. Every table is an output of one subsettable ``warehouse_tables`` multi-asset, so a UI or
CLI backfill over any tables and hours runs as few runs of many (table, hour)s, loaded by
``batch.load_batch`` like the sensor's batch job.
"""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg

from clickstream_pipeline.batch import (
    QUARANTINE_CHECK,
    STEP_RETRY,
    WAREHOUSE_POOL,
    BatchResult,
    column_schema,
    load_batch,
)
from clickstream_pipeline.discovery import range_pending
from clickstream_pipeline.layout import load_key, stream_prefix
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import (
    hourly_partitions,
    raw_asset_key,
    stream_of_table,
    table_asset_key,
)
from clickstream_pipeline.resources import DiscoveryResource, S3StorageResource, WarehouseResource
from clickstream_pipeline.warehouse.base import BASE_COLUMNS

TABLES_ASSET = "warehouse_tables"
# A run of the tables lists and loads this many (table, hour)s at a time, so its memory is
# bounded whatever the range: a year of one table, or a day of 416 tables, per step.
CHUNK_PARTITIONS = 10_000
# The UI shows a table as stale when no hour has been loaded for this long (next to the
# webhook alert of stream_freshness_alert_sensor, which reads the ledger).
FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=timedelta(hours=3), warn_window=timedelta(hours=2)
)
_BASE_TYPES = {
    "message_id": "text",
    "user_id": "text",
    "anonymous_id": "text",
    "event_name": "text",
    "event_timestamp": "timestamp with time zone",
    "sent_at": "timestamp with time zone",
    "received_at": "timestamp with time zone",
    "properties": "jsonb / SUPER",
    "context": "jsonb / SUPER",
    "_hour": "timestamp with time zone",
    "_source_key": "text",
    "_loaded_at": "timestamp with time zone",
}
BASE_SCHEMA = column_schema([(column, _BASE_TYPES[column]) for column in BASE_COLUMNS])


def raw_spec(stream: Stream, raw_prefix: str) -> dg.AssetSpec:
    """The stream's raw files: an external asset the discovery sensor reports on."""
    return dg.AssetSpec(
        raw_asset_key(stream),
        description=f"Raw events of {stream.key} in S3: newline-delimited JSON files under "
        f"`{stream_prefix(raw_prefix, stream)}date=YYYY-MM-DD/hour=HH/`, written by the "
        "microbatcher.",
        partitions_def=hourly_partitions,
        group_name=stream.customer,
        kinds={"s3"},
    )


def table_spec(stream: Stream, warehouse_kind: str) -> dg.AssetSpec:
    """The stream's warehouse table, loaded hour by hour from its raw files."""
    return dg.AssetSpec(
        table_asset_key(stream),
        description=f"Table {stream.key}: the validated, deduplicated (by messageId) events "
        f"{stream.event!r} of customer {stream.customer!r}, properties flattened into typed "
        "columns, one hour per partition.",
        deps=[raw_asset_key(stream)],
        partitions_def=hourly_partitions,
        group_name=stream.customer,
        kinds={warehouse_kind},
        # A run selecting this table loads only the hours whose files are new or changed.
        skippable=True,
        freshness_policy=FRESHNESS,
        metadata={"dagster/table_name": stream.key, "dagster/column_schema": BASE_SCHEMA},
    )


def table_assets(
    streams: tuple[Stream, ...], raw_prefix: str, warehouse_kind: str
) -> list[dg.AssetSpec | dg.AssetsDefinition]:
    """Every stream's raw and table assets; the tables are the outputs of one multi-asset."""
    if not streams:
        return []

    @dg.multi_asset(
        name=TABLES_ASSET,
        specs=[table_spec(stream, warehouse_kind) for stream in streams],
        check_specs=[
            dg.AssetCheckSpec(
                QUARANTINE_CHECK,
                asset=table_asset_key(stream),
                partitions_def=hourly_partitions,
                description="No record of the hour went to quarantine.",
            )
            for stream in streams
        ],
        partitions_def=hourly_partitions,
        can_subset=True,
        # One run per backfill: it lists each table once over the whole range, and the
        # `dagster asset materialize --partition-range` command needs it.
        backfill_policy=dg.BackfillPolicy.single_run(),
        retry_policy=STEP_RETRY,
        pool=WAREHOUSE_POOL,
    )
    def warehouse_tables(
        context: dg.AssetExecutionContext,
        s3: S3StorageResource,
        warehouse: WarehouseResource,
        discovery: DiscoveryResource,
    ) -> Iterator[dg.MaterializeResult]:
        """Load the selected tables' hours whose raw files are new or changed."""
        window = context.partition_time_window
        selected = [stream_of_table(key) for key in sorted(context.selected_asset_keys)]
        hours = round((window.end - window.start) / timedelta(hours=1))
        store, target = s3.store(), warehouse.warehouse()
        result = BatchResult()
        per_chunk = max(1, CHUNK_PARTITIONS // hours)
        for start in range(0, len(selected), per_chunk):
            chunk = selected[start : start + per_chunk]
            pending = range_pending(
                store, target, chunk, window.start, window.end, datetime.now(UTC), timedelta(0)
            )
            listed = {load_key(item.stream, item.hour): item.files for item in pending}
            result.add(
                load_batch(
                    context.op_execution_context,
                    list(listed),
                    store,
                    target,
                    discovery.concurrency,
                    listed,
                    report_raw=True,
                )
            )
            context.log.info(
                f"{start + len(chunk)} of {len(selected)} tables x {hours} hours: "
                f"{result.requested} (table, hour)s had new or changed files, "
                f"{result.loaded} loaded, {len(result.failures)} failed"
            )
        result.raise_failures()
        # Each (table, hour) was reported as it loaded; an unchanged one is not reported again.
        yield from ()

    raw = [raw_spec(stream, raw_prefix) for stream in streams]
    return [*raw, warehouse_tables]
