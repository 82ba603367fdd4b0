"""Assets: the raw files of each (stream, hour) in S3 and the warehouse rows loaded from them."""

import json
from typing import Any

import dagster as dg

from clickstream_pipeline.layout import parse_hour_key
from clickstream_pipeline.loader import LoadOutcome, load_partition
from clickstream_pipeline.partitions import parse_partition_key, stream_hour_partitions
from clickstream_pipeline.resources import S3StorageResource, WarehouseResource
from clickstream_pipeline.warehouse.base import SourceFile

GROUP = "clickstream"
QUARANTINE_CHECK = "no_quarantined_records"
# Retries inside a run: S3 and warehouse hiccups, with exponential backoff and jitter.
STEP_RETRY = dg.RetryPolicy(
    max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
_LISTED_KEYS = 50  # keys shown in metadata; the count and totals cover all files

raw_events_key = dg.AssetKey("raw_events")
warehouse_events_key = dg.AssetKey("warehouse_events")


# Concurrency pool shared by everything that writes to the warehouse (the batch op, or a
# one-partition materialization); production sets its limit in dagster.yaml (`deploy/`).
WAREHOUSE_POOL = "warehouse"


@dg.asset(
    key=raw_events_key,
    partitions_def=stream_hour_partitions,
    group_name=GROUP,
    retry_policy=STEP_RETRY,
    kinds={"s3"},
)
def raw_events(context: dg.AssetExecutionContext, s3: S3StorageResource) -> dg.MaterializeResult:
    """The (stream, hour)'s newline-delimited JSON files in S3, as written by the microbatcher."""
    stream, hour = parse_partition_key(context.partition_key)
    files = s3.store().list_partition(stream, hour)
    return dg.MaterializeResult(metadata=raw_metadata(files))


@dg.asset(
    key=warehouse_events_key,
    partitions_def=stream_hour_partitions,
    deps=[raw_events],
    group_name=GROUP,
    retry_policy=STEP_RETRY,
    kinds={"postgres", "redshift"},
    pool=WAREHOUSE_POOL,
    check_specs=[dg.AssetCheckSpec(QUARANTINE_CHECK, asset=warehouse_events_key)],
)
def warehouse_events(
    context: dg.AssetExecutionContext, s3: S3StorageResource, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    """The (stream, hour)'s validated, deduplicated, flattened rows in table <customer>.<event>."""
    stream, hour = parse_partition_key(context.partition_key)
    outcome = load_partition(
        s3.store(), warehouse.warehouse(), stream, hour, run_id=context.op_execution_context.run_id
    )
    context.log.info(
        load_log_line(context.partition_key, context.op_execution_context.run_id, outcome)
    )
    return dg.MaterializeResult(
        metadata=load_metadata(outcome), check_results=[quarantine_check_result(outcome)]
    )


def raw_metadata(files: tuple[SourceFile, ...]) -> dict[str, Any]:
    return {
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "keys": dg.MetadataValue.json(
            [{"key": f.key, "size": f.size, "etag": f.etag} for f in files[:_LISTED_KEYS]]
        ),
    }


def load_metadata(outcome: LoadOutcome) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "table": f"{outcome.stream.customer}.{outcome.stream.event}",
        "files": len(outcome.files),
        "bytes": outcome.bytes,
        "fingerprint": outcome.fingerprint,
        "unchanged": outcome.skipped,
        "seconds": round(outcome.seconds, 3),
    }
    if not outcome.skipped:
        metadata.update(
            records_read=outcome.records_read,
            duplicates_dropped=outcome.duplicates,
            quarantined=outcome.quarantined,
            rows_loaded=outcome.rows_loaded,
            rows_replaced=outcome.rows_replaced,
            new_columns=dg.MetadataValue.json(outcome.new_columns),
        )
        if outcome.seconds > 0:
            metadata["events_per_second"] = round(outcome.records_read / outcome.seconds)
    return metadata


def quarantine_check_result(outcome: LoadOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=QUARANTINE_CHECK,
        asset_key=warehouse_events_key,
        passed=outcome.quarantined == 0,
        metadata=_check_metadata(outcome),
    )


def quarantine_check_evaluation(outcome: LoadOutcome, partition: str) -> dg.AssetCheckEvaluation:
    """The same check, reported for one partition of a batch run."""
    return dg.AssetCheckEvaluation(
        asset_key=warehouse_events_key,
        check_name=QUARANTINE_CHECK,
        passed=outcome.quarantined == 0,
        metadata=_check_metadata(outcome),
        partition=partition,
    )


def _check_metadata(outcome: LoadOutcome) -> dict[str, Any]:
    return {
        "quarantined": outcome.quarantined,
        "quarantine_keys": dg.MetadataValue.json(outcome.quarantine_keys[:_LISTED_KEYS]),
    }


def load_log_line(
    key: str, run_id: str, outcome: LoadOutcome | None = None, error: str | None = None
) -> str:
    """One structured JSON line per partition load, for log search (Loki, Elasticsearch) by
    stream and hour: ``{"event": "partition_load", "stream", "hour", "run_id", "outcome", ...}``."""
    hour_key, _, stream = key.partition("|")
    try:
        hour = parse_hour_key(hour_key).isoformat()
    except ValueError:
        hour = hour_key  # a malformed key is logged as given: logging must never fail a load
    line: dict[str, Any] = {
        "event": "partition_load",
        "stream": stream,
        "hour": hour,
        "run_id": run_id,
    }
    if outcome is None:
        line.update(outcome="failed", error=error)
    elif outcome.skipped:
        line.update(
            outcome="unchanged", files=len(outcome.files), seconds=round(outcome.seconds, 3)
        )
    else:
        line.update(
            outcome="loaded",
            files=len(outcome.files),
            bytes=outcome.bytes,
            records=outcome.records_read,
            rows=outcome.rows_loaded,
            duplicates=outcome.duplicates,
            quarantined=outcome.quarantined,
            new_columns=outcome.new_columns,
            seconds=round(outcome.seconds, 3),
        )
    return json.dumps(line, separators=(",", ":"))
