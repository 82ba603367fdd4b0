"""Loading many (table, hour)s in one Dagster step, each reported on its own.

One run per (table, hour) costs a process start (about 2.5 CPU-seconds here), which caps a
2-core machine far below thousands of partitions an hour. ``load_batch`` loads a list of them
with a few threads in one step and reports, per (table, hour), a materialization of the table's
asset and its quarantine check, so partition status, history and backfills in the UI stay per
table and hour. The sensor's batch job and the tables' own asset (UI and CLI backfills) both load
through it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import dagster as dg

from clickstream_pipeline.discovery import LIST_CONCURRENCY
from clickstream_pipeline.errors import first_line
from clickstream_pipeline.layout import hour_key, parse_hour_key, parse_load_key
from clickstream_pipeline.loader import (
    TRANSIENT_ERRORS,
    LoadOutcome,
    RawStore,
    fingerprint,
    load_partition,
    with_retries,
)
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import raw_asset_key, table_asset_key
from clickstream_pipeline.warehouse.base import SourceFile, Warehouse, table_facts

QUARANTINE_CHECK = "no_quarantined_records"
# Retries inside a run: S3 and warehouse hiccups, with exponential backoff and jitter.
STEP_RETRY = dg.RetryPolicy(
    max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)
# Concurrency pool shared by everything that writes to the warehouse (the batch op, the tables'
# asset); production sets its limit in dagster.yaml (`deploy/`).
WAREHOUSE_POOL = "warehouse"
LARGE_FACTOR = 10
LARGE_MIN_BYTES = 1 << 20
_LISTED_KEYS = 50  # keys shown in metadata; the count and totals cover all files


@dataclass
class BatchResult:
    """What a batch did: (table, hour)s requested and loaded, and the failed ones with why."""

    requested: int = 0
    loaded: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # load key -> one-line error
    transient: bool = False  # some failure may pass on a retry (network, throttling)

    def add(self, other: BatchResult) -> None:
        self.requested += other.requested
        self.loaded += other.loaded
        self.failures.update(other.failures)
        self.transient = self.transient or other.transient

    def raise_failures(self) -> None:
        """``dg.Failure`` naming every (table, hour) that failed, if any did."""
        if self.failures:
            raise dg.Failure(
                description=f"{len(self.failures)} of {self.requested} partitions failed to load",
                metadata={"failed": dg.MetadataValue.json(self.failures)},
                # Retrying the step helps only when a failure may pass (network, throttling);
                # bad keys or data fail the same way again.
                allow_retries=self.transient,
            )


def load_batch(
    context: dg.OpExecutionContext,
    keys: list[str],
    store: RawStore,
    target: Warehouse,
    concurrency: int,
    listed: dict[str, tuple[SourceFile, ...]] | None = None,
    report_raw: bool = False,
) -> BatchResult:
    """Load each (stream, hour) of ``keys`` (load keys) exactly once and report it on its own;
    a failed one (after its retries) does not stop the others.

    Keys missing from ``listed`` are listed first (16 listings in flight), then all are loaded
    smallest first in waves (``load_waves``): a partition much larger than the rest starts once
    they are loaded, so it does not take CPU from them. ``report_raw`` also reports each loaded
    hour's raw files as materialized (when no sensor saw them). Unchanged hours are skipped.
    """
    keys = list(dict.fromkeys(keys))
    result = BatchResult(requested=len(keys))

    def fail(key: str, error: Exception) -> None:
        result.failures[key] = f"{type(error).__name__}: {first_line(error)}"
        result.transient = result.transient or isinstance(error, TRANSIENT_ERRORS)
        context.log.error(load_log_line(key, context.run_id, error=result.failures[key]))

    def listing(key: str) -> tuple[SourceFile, ...]:
        stream, hour = parse_load_key(key)
        return with_retries(
            lambda: store.list_partition(stream, hour), describe=f"listing of {key}"
        )

    def load(key: str, files: tuple[SourceFile, ...]) -> LoadOutcome:
        stream, hour = parse_load_key(key)
        # The first attempt loads the files listed above; a retry lists again (a file rewritten
        # since its listing fails the read, and must not fail every attempt).
        first = iter([files])
        return with_retries(
            lambda: load_partition(
                store, target, stream, hour, next(first, None), run_id=context.run_id
            ),
            describe=f"load of {key}",
        )

    wanted = set(keys)
    files_of = {key: files for key, files in (listed or {}).items() if key in wanted}
    unlisted = [key for key in keys if key not in files_of]
    if unlisted:
        # Listing waits on S3, not on CPU: more requests in flight than loads.
        with ThreadPoolExecutor(min(LIST_CONCURRENCY, len(unlisted)), "list") as pool:
            for key, listed_files in [(key, pool.submit(listing, key)) for key in unlisted]:
                try:
                    files_of[key] = listed_files.result()
                except Exception as error:
                    fail(key, error)
    sizes = {key: sum(file.size for file in files) for key, files in files_of.items()}
    with ThreadPoolExecutor(concurrency, thread_name_prefix="load") as pool:
        for wave in load_waves(sizes):
            futures = {pool.submit(load, key, files_of[key]): key for key in wave}
            # Report each (table, hour) as soon as it is loaded: a heavy one must not hold back
            # the materializations of the light ones loaded beside it.
            for future in as_completed(futures):
                key = futures[future]
                try:
                    outcome = future.result()
                except Exception as error:
                    fail(key, error)
                    continue
                context.log.info(load_log_line(key, context.run_id, outcome))
                if not outcome.skipped:
                    report_load(context, outcome, target, report_raw)
                    result.loaded += 1
    return result


def load_waves(sizes: dict[str, int]) -> list[list[str]]:
    """The order a batch loads its partitions in, given their sizes in bytes.

    Smallest first, so most partitions are loaded soonest. Partitions over ``LARGE_FACTOR``
    times the batch's median size (and over ``LARGE_MIN_BYTES``) form a second wave that starts
    once the first is loaded: on a small machine a heavy load takes both cores, and the light
    partitions beside it would take longer by the CPU it uses, not by their own cost.
    """
    order = sorted(sizes, key=lambda key: (sizes[key], key))
    if not order:
        return []
    median = sizes[order[(len(order) - 1) // 2]]
    limit = max(median * LARGE_FACTOR, LARGE_MIN_BYTES)
    light = [key for key in order if sizes[key] <= limit]
    heavy = [key for key in order if sizes[key] > limit]
    return [wave for wave in (light, heavy) if wave]


def report_load(
    context: dg.OpExecutionContext, outcome: LoadOutcome, target: Warehouse, report_raw: bool
) -> None:
    """The materialization of one loaded (table, hour), and its quarantine check."""
    partition = hour_key(outcome.hour)
    if report_raw:
        context.log_event(raw_materialization(outcome.stream, outcome.hour, outcome.files))
    metadata = load_metadata(outcome)
    try:
        rows, columns = table_facts(target, outcome.stream, schema=bool(outcome.new_columns))
    except TRANSIENT_ERRORS as error:
        # The load is committed: a table fact that cannot be read now must not fail its report.
        context.log.warning(f"{outcome.stream.key}: no row count or schema: {first_line(error)}")
    else:
        metadata["dagster/row_count"] = rows
        if columns:
            metadata["dagster/column_schema"] = column_schema(columns)
    context.log_event(
        dg.AssetMaterialization(
            asset_key=table_asset_key(outcome.stream), partition=partition, metadata=metadata
        )
    )
    # log_event records check evaluations too; its annotation predates them.
    context.log_event(quarantine_check_evaluation(outcome))  # type: ignore[arg-type]


def raw_materialization(
    stream: Stream, hour: datetime, files: tuple[SourceFile, ...]
) -> dg.AssetMaterialization:
    """The raw asset's materialization of one hour: its files, bytes and fingerprint."""
    return dg.AssetMaterialization(
        asset_key=raw_asset_key(stream), partition=hour_key(hour), metadata=raw_metadata(files)
    )


def raw_metadata(files: tuple[SourceFile, ...]) -> dict[str, Any]:
    return {
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "fingerprint": fingerprint(files),
        "keys": dg.MetadataValue.json(
            [{"key": f.key, "size": f.size, "etag": f.etag} for f in files[:_LISTED_KEYS]]
        ),
    }


def load_metadata(outcome: LoadOutcome) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "dagster/table_name": outcome.stream.key,
        "files": len(outcome.files),
        "bytes": outcome.bytes,
        "fingerprint": outcome.fingerprint,
        "unchanged": outcome.skipped,
        "seconds": round(outcome.seconds, 3),
    }
    if not outcome.skipped:
        metadata.update(
            {
                "dagster/partition_row_count": outcome.rows_loaded,
                "records_read": outcome.records_read,
                "duplicates_dropped": outcome.duplicates,
                "quarantined": outcome.quarantined,
                "rows_loaded": outcome.rows_loaded,
                "rows_replaced": outcome.rows_replaced,
                "new_columns": dg.MetadataValue.json(outcome.new_columns),
            }
        )
        if outcome.seconds > 0:
            metadata["events_per_second"] = round(outcome.records_read / outcome.seconds)
    return metadata


def column_schema(columns: list[tuple[str, str]]) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, type) for name, type in columns])


def quarantine_check_evaluation(outcome: LoadOutcome) -> dg.AssetCheckEvaluation:
    """Passes when no record of the (table, hour) went to quarantine."""
    return dg.AssetCheckEvaluation(
        asset_key=table_asset_key(outcome.stream),
        check_name=QUARANTINE_CHECK,
        passed=outcome.quarantined == 0,
        metadata={
            "quarantined": outcome.quarantined,
            "quarantine_keys": dg.MetadataValue.json(outcome.quarantine_keys[:_LISTED_KEYS]),
        },
        partition=hour_key(outcome.hour),
    )


def load_log_line(
    key: str, run_id: str, outcome: LoadOutcome | None = None, error: str | None = None
) -> str:
    """One structured JSON line per partition load, for log search (Loki, Elasticsearch) by
    stream and hour: ``{"event": "partition_load", "stream", "hour", "run_id", "outcome", ...}``."""
    hour_text, _, stream = key.partition("|")
    try:
        hour = parse_hour_key(hour_text).isoformat()
    except ValueError:
        hour = hour_text  # a malformed key is logged as given: logging must never fail a load
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
