"""The load ledger's history as Dagster materializations: what an upgrade from the one-asset
layout (``warehouse_events``, partitioned by stream x hour) needs, so every hour loaded before it
shows as a materialized partition of its table's asset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from clickstream_pipeline.layout import hour_key
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import table_asset_key
from clickstream_pipeline.warehouse.base import LedgerEntry, Warehouse, stream_totals


@dataclass
class ImportedHistory:
    """What ``import_history`` did."""

    tables: int = 0
    reported: int = 0  # hours reported as materialized now
    present: int = 0  # hours Dagster already had


def ledger_hours(warehouse: Warehouse) -> dict[str, int]:
    """Loaded hours per table in the ledger, removed tables included."""
    return {totals.stream: totals.partitions for totals in stream_totals(warehouse)}


def import_history(
    instance: dg.DagsterInstance,
    warehouse: Warehouse,
    on_progress: Callable[[int], None] | None = None,
) -> ImportedHistory:
    """Report each hour in the ledger that Dagster has no materialization of, table by table
    (memory is one table's ledger); running it again reports nothing."""
    result = ImportedHistory()
    for stream_key in ledger_hours(warehouse):
        stream = Stream.parse(stream_key)
        entries = warehouse.ledger([stream])
        key = table_asset_key(stream)
        have = instance.get_materialized_partitions(key)
        result.tables += 1
        for (_, hour), entry in sorted(entries.items()):
            if hour_key(hour) in have:
                result.present += 1
            else:
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(
                        key, partition=hour_key(hour), metadata=ledger_metadata(entry)
                    )
                )
                result.reported += 1
            if on_progress is not None:
                on_progress(1)
    return result


def ledger_metadata(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "dagster/table_name": entry.stream,
        "dagster/partition_row_count": entry.rows_loaded,
        "rows_loaded": entry.rows_loaded,
        "records_read": entry.records_read,
        "duplicates_dropped": entry.duplicates,
        "quarantined": entry.quarantined,
        "fingerprint": entry.fingerprint,
        "loaded_at": dg.MetadataValue.timestamp(entry.loaded_at),
        "source": "load ledger (loaded before this table was an asset)",
    }
