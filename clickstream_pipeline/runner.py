"""Headless loads through Dagster (``clickstream load``): sync, discover, run batches, summarise.

Runs execute in this process against the Dagster instance in DAGSTER_HOME, so every run,
materialization and check result is recorded there and visible in the UI afterwards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg

from clickstream_pipeline.definitions import build_defs
from clickstream_pipeline.discovery import PendingPartition, range_pending
from clickstream_pipeline.jobs import LOAD_JOB, PARTITIONS_TAG, run_config_for
from clickstream_pipeline.layout import load_key
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import RAW_ROOT
from clickstream_pipeline.registry import load_registry
from clickstream_pipeline.resources import DiscoveryResource, S3StorageResource, WarehouseResource
from clickstream_pipeline.sensors import DiscoveryCursor, discover

DEFAULT_DAGSTER_HOME = Path(".clickstream") / "dagster_home"
# Runs started here log warnings and errors to the terminal; everything is still recorded in
# the instance's event log for the UI.
QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# Which command started a run: "clickstream load", "clickstream backfill".
SOURCE_TAG = "clickstream/source"


@dataclass
class LoadTotals:
    """One stream's share of a `clickstream load`."""

    partitions: int = 0
    files: int = 0
    records_read: int = 0
    rows_loaded: int = 0
    duplicates_dropped: int = 0
    quarantined: int = 0


@dataclass
class LoadSummary:
    """What one ``clickstream load`` did."""

    pending: int = 0
    loaded: int = 0
    failed: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    streams: dict[str, LoadTotals] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def records_read(self) -> int:
        return sum(t.records_read for t in self.streams.values())


def dagster_instance() -> dg.DagsterInstance:
    """The instance in DAGSTER_HOME (``.clickstream/dagster_home`` when unset)."""
    if not os.environ.get("DAGSTER_HOME"):
        DEFAULT_DAGSTER_HOME.mkdir(parents=True, exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(DEFAULT_DAGSTER_HOME.resolve())
    return dg.DagsterInstance.get()


def run_load(
    instance: dg.DagsterInstance,
    discovery: DiscoveryResource | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LoadSummary:
    """Read the registry, discover every pending (table, hour) and load them in batch runs."""
    began = time.perf_counter()
    discovery = discovery or DiscoveryResource()
    registry = load_registry()
    pending = discover(
        S3StorageResource(),
        WarehouseResource(),
        discovery,
        registry.streams,
        DiscoveryCursor(),
        datetime.now(UTC),
    )
    return run_partitions(
        build_defs(registry),
        instance,
        pending,
        discovery,
        "clickstream load",
        began,
        on_start,
        on_progress,
    )


def backfill_pending(
    streams: tuple[Stream, ...], since: datetime, until: datetime, discovery: DiscoveryResource
) -> list[PendingPartition]:
    """What a backfill of ``streams`` over ``[since, until)`` loads: the completed hours whose
    files are not what the ledger says was loaded, however old."""
    return range_pending(
        S3StorageResource().store(),
        WarehouseResource().warehouse(),
        streams,
        since,
        until,
        datetime.now(UTC),
        timedelta(minutes=discovery.grace_minutes),
    )


def run_partitions(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    pending: list[PendingPartition],
    discovery: DiscoveryResource,
    source: str,
    began: float | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LoadSummary:
    """Load ``pending`` here, in runs of ``batch_size`` partitions recorded in the instance."""
    began = time.perf_counter() if began is None else began
    summary = LoadSummary(pending=len(pending))
    if on_start is not None:
        on_start(len(pending))
    job = defs.get_job_def(LOAD_JOB)
    for batch in batches(pending, discovery.batch_size):
        keys = [load_key(p.stream, p.hour) for p in batch]
        result = job.execute_in_process(
            # No sensor saw these files: the run reports the raw partitions too.
            run_config={
                **run_config_for(keys, discovery.concurrency, report_raw=True),
                **QUIET_CONSOLE,
            },
            instance=instance,
            tags={PARTITIONS_TAG: str(len(keys)), SOURCE_TAG: source},
            raise_on_error=False,
        )
        summary.runs.append(result.run_id)
        _collect(summary, result)
        if on_progress is not None:
            on_progress(len(batch))
    _verify_against_ledger(summary, pending, WarehouseResource())
    summary.seconds = time.perf_counter() - began
    return summary


def batches(pending: list[PendingPartition], size: int) -> list[list[PendingPartition]]:
    return [pending[start : start + size] for start in range(0, len(pending), size)]


def _collect(summary: LoadSummary, result: dg.ExecuteInProcessResult) -> None:
    """Add the metadata of the run's table materializations to the totals."""
    for materialization in result.asset_materializations_for_node("load_partitions"):
        if materialization.asset_key.path[0] == RAW_ROOT:
            continue
        metadata = {k: v.value for k, v in materialization.metadata.items()}
        totals = summary.streams.setdefault(str(metadata["dagster/table_name"]), LoadTotals())
        totals.partitions += 1
        for name in ("files", "records_read", "rows_loaded", "duplicates_dropped", "quarantined"):
            value = metadata.get(name)
            setattr(totals, name, getattr(totals, name) + (value if isinstance(value, int) else 0))


def _verify_against_ledger(
    summary: LoadSummary, pending: list[PendingPartition], warehouse: WarehouseResource
) -> None:
    """A partition counts as loaded only if the ledger now holds its fingerprint."""
    if not pending:
        return
    streams = {p.stream for p in pending}
    ledger = warehouse.warehouse().ledger(streams)
    for item in pending:
        entry = ledger.get((item.stream.key, item.hour))
        if entry is not None and entry.fingerprint == item.fingerprint:
            summary.loaded += 1
        else:
            summary.failed.append(load_key(item.stream, item.hour))
