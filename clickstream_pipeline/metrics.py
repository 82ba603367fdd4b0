"""Prometheus metrics: counters kept in-process, and the ``/metrics`` endpoint's collector, which
computes everything from the load ledger and the Dagster instance at scrape time, so it is right
after restarts.

Label cardinality: one ``stream`` label value per stream in the ledger or in recent load runs
(customers x events), one ``daemon`` value per Dagster daemon type and one ``sensor`` value per
sensor of this code location. No label carries hours, run ids or file names. Per stream there are
8 series, 10 for the load duration histogram (7 bounded buckets, +Inf, sum, count) and 2 for
pending and failed partitions: 20, so 2,000 streams make about 40,000 series (a scrape of that,
over a 96,000-row ledger and 100 runs, took 0.7-0.9 s here). docs/operations.md lists them all.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from clickstream_pipeline.layout import hour_key, parse_hour_key, stream_of
from clickstream_pipeline.warehouse.base import LOAD_SECONDS_BUCKETS, stream_totals

if TYPE_CHECKING:
    import dagster as dg

    from clickstream_pipeline.vortex import LeaseStore
    from clickstream_pipeline.warehouse.base import Warehouse

# This module is imported by the S3 client (the request counter): Dagster is imported only
# where the instance is read.
IN_FLIGHT = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
LOAD_JOB = "load_partitions_job"  # clickstream_pipeline.jobs.LOAD_JOB, without importing Dagster
PARTITION_TAG = "dagster/partition"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
# This code location's sensors (test_metrics checks the list against the definitions).
SENSORS = (
    "registry_sync_sensor",
    "s3_discovery_sensor",
    "load_failure_alert_sensor",
    "slow_load_alert_sensor",
    "stream_freshness_alert_sensor",
)

S3_REQUESTS = Counter(
    "clickstream_s3_requests",
    "HTTP requests sent to S3 by this process, retries included, by API operation.",
    ["operation"],
)


def count_s3_request(event_name: str, **_: Any) -> None:
    """botocore ``before-send`` hook: ``before-send.s3.ListObjectsV2`` counts one ListObjectsV2."""
    S3_REQUESTS.labels(operation=event_name.rsplit(".", 1)[-1]).inc()


def s3_requests() -> dict[str, int]:
    """Requests so far, by operation."""
    return {
        sample.labels["operation"]: int(sample.value)
        for metric in S3_REQUESTS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


# A partition counts as failed when the newest load run that included it, among the finished runs
# created this recently (at most RUN_LIMIT of them), failed on it. A partition that keeps failing
# is re-requested by discovery (every 30 minutes by default), so it stays inside the window.
FAILED_WINDOW = timedelta(hours=24)
RUN_LIMIT = 1000


def run_partitions(run: dg.DagsterRun) -> list[str]:
    """The (table, hour)s a run loads, as load keys ``<hour>|<customer>.<event>``: a batch load
    run's configured list, or the selected tables x the hour or hour range of a run of the
    tables' asset (a UI or CLI materialization or backfill)."""
    if run.job_name == LOAD_JOB:
        ops: Any = run.run_config.get("ops", {}) if isinstance(run.run_config, dict) else {}
        partitions = ops.get("load_partitions", {}).get("config", {}).get("partitions", [])
        return [str(key) for key in partitions]
    single = run.tags.get(PARTITION_TAG, "")
    if "|" in single:  # a run of an earlier release's (stream x hour) asset
        return [single]
    tables = sorted(
        ".".join(key.path)
        for key in run.asset_selection or ()
        if len(key.path) == 2 and key.path[0] != "raw"
    )
    return [f"{hour}|{table}" for table in tables for hour in _run_hours(run.tags)]


def _run_hours(tags: Mapping[str, str]) -> list[str]:
    """The hourly partition keys a run's tags name: one, a range, or none."""
    if PARTITION_TAG in tags:
        return [tags[PARTITION_TAG]]
    first, last = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    if not first or not last:
        return []
    try:
        hour, end = parse_hour_key(first), parse_hour_key(last)
    except ValueError:
        return []
    hours = []
    while hour <= end:
        hours.append(hour_key(hour))
        hour += timedelta(hours=1)
    return hours


def failed_in_run(instance: dg.DagsterInstance, run: dg.DagsterRun) -> set[str] | None:
    """The partitions a failed load run reported as failed (None when it reported none: a
    crash, a cancellation, a run stopped for exceeding its maximum runtime)."""
    import dagster as dg

    failed: set[str] = set()
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        event = record.dagster_event
        data = event.step_failure_data if event is not None else None
        if data is None or data.user_failure_data is None:
            continue
        value = data.user_failure_data.metadata.get("failed")
        if value is not None and isinstance(value.value, dict):
            failed.update(str(key) for key in value.value)
    return failed or None


def partition_states(
    instance: dg.DagsterInstance, now: datetime
) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Pending and failed partitions per stream, from two bounded run queries.

    Pending: named by a load run that has not finished (queued, starting, started, canceling).
    Failed: the newest finished run naming it, within FAILED_WINDOW, failed on it. The cost
    grows with the runs in flight and in the window, never with the partition space.
    """
    import dagster as dg

    in_flight = [dg.DagsterRunStatus(status) for status in IN_FLIGHT]
    finished_statuses = [dg.DagsterRunStatus(status) for status in FINISHED]
    pending: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()
    decided: set[str] = set()
    for run in instance.get_runs(dg.RunsFilter(statuses=in_flight)):
        for key in run_partitions(run):
            if key not in decided:
                decided.add(key)
                pending[stream_of(key)] += 1
    finished = instance.get_runs(
        dg.RunsFilter(statuses=finished_statuses, created_after=now - FAILED_WINDOW),
        limit=RUN_LIMIT,
    )
    for run in finished:  # newest first
        keys = [key for key in run_partitions(run) if key not in decided]
        decided.update(keys)
        if not keys or run.status == dg.DagsterRunStatus.SUCCESS:
            continue
        reported = failed_in_run(instance, run)
        for key in keys:
            if reported is None or key in reported:
                failed[stream_of(key)] += 1
    return pending, failed


# Vortex's per-shard counters (clickstream.vortex_shards): column, series, help.
VORTEX_COUNTERS = (
    ("records_in", "clickstream_vortex_records_read", "Records vortex read from the stream."),
    ("bytes_in", "clickstream_vortex_bytes_read", "Bytes of record data vortex read."),
    ("records_out", "clickstream_vortex_records_written", "Records vortex wrote to raw files."),
    ("bytes_out", "clickstream_vortex_bytes_written", "Bytes of files vortex wrote to S3."),
    ("files", "clickstream_vortex_files_written", "Files vortex wrote (raw and errors/)."),
    (
        "duplicates",
        "clickstream_vortex_duplicates_dropped",
        "Records vortex did not write: their messageId came earlier in the batch.",
    ),
    ("errors", "clickstream_vortex_errors", "Records vortex could not route (to errors/)."),
)


class PipelineCollector(Collector):
    """Per-stream load totals, durations and lag from the ledger; pending and failed partitions,
    sensor tick ages and daemon heartbeat ages from the Dagster instance; with ``vortex_url``,
    vortex's per-shard counters, lag and leases."""

    def __init__(
        self,
        warehouse: Callable[[], Warehouse],
        clock: Callable[[], float] = time.time,
        vortex_url: str | None = None,
    ):
        self._warehouse = warehouse
        self._clock = clock
        self._vortex: LeaseStore | None = None
        if vortex_url is not None:
            from clickstream_pipeline.vortex import LeaseStore

            self._vortex = LeaseStore(vortex_url)
        # One Dagster instance for the collector's life, as the daemon and the webserver keep
        # theirs: its storage's connections stay open between scrapes.
        self._dagster: dg.DagsterInstance | None = None
        self._dagster_lock = threading.Lock()

    def _dagster_instance(self) -> dg.DagsterInstance:
        import dagster as dg

        with self._dagster_lock:
            if self._dagster is None:
                self._dagster = dg.DagsterInstance.get()
            return self._dagster

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        totals = stream_totals(self._warehouse())
        families = {
            "partitions": CounterMetricFamily(
                "clickstream_partitions_loaded", "Hours loaded (ledger rows).", labels=["stream"]
            ),
            "records_read": CounterMetricFamily(
                "clickstream_records_read", "Records read from raw files.", labels=["stream"]
            ),
            "rows_loaded": CounterMetricFamily(
                "clickstream_events_loaded", "Rows in the stream's table.", labels=["stream"]
            ),
            "duplicates": CounterMetricFamily(
                "clickstream_duplicates_dropped",
                "Records not loaded: messageId already seen.",
                labels=["stream"],
            ),
            "quarantined": CounterMetricFamily(
                "clickstream_records_quarantined",
                "Bad records written to quarantine.",
                labels=["stream"],
            ),
            "files_read": CounterMetricFamily(
                "clickstream_files_read",
                "Raw files read by the latest load of each loaded hour.",
                labels=["stream"],
            ),
            "bytes_read": CounterMetricFamily(
                "clickstream_bytes_read",
                "Raw bytes (as stored in S3) read by the latest load of each loaded hour.",
                labels=["stream"],
            ),
        }
        duration = HistogramMetricFamily(
            "clickstream_load_duration_seconds",
            "Seconds the latest load of each loaded hour took, files listed to commit.",
            labels=["stream"],
        )
        lag = GaugeMetricFamily(
            "clickstream_lag_seconds",
            "Now minus the end of the newest loaded hour.",
            labels=["stream"],
        )
        for entry in totals:
            for name, family in families.items():
                family.add_metric([entry.stream], getattr(entry, name))
            buckets = [
                (str(bound), float(count))
                for bound, count in zip(LOAD_SECONDS_BUCKETS, entry.seconds_buckets, strict=True)
            ]
            duration.add_metric(
                [entry.stream], [*buckets, ("+Inf", float(entry.timed))], entry.seconds
            )
            newest_end = (entry.newest_hour + timedelta(hours=1)).timestamp()
            lag.add_metric([entry.stream], max(0.0, now - newest_end))
        yield from families.values()
        yield duration
        yield lag
        if self._vortex is not None:
            yield from self._vortex_shards(self._vortex)
        if os.environ.get("DAGSTER_HOME"):
            yield from self._instance(now, [entry.stream for entry in totals])

    def _vortex_shards(self, store: LeaseStore) -> Iterator[Metric]:
        """Per shard: what vortex read and wrote, how far behind it is, whether a live worker
        holds it, how long its reads have been failing (nothing when vortex has never run
        against this database)."""
        labels = ["stream", "shard"]
        counters = [
            (column, CounterMetricFamily(name, text, labels=labels))
            for column, name, text in VORTEX_COUNTERS
        ]
        behind = GaugeMetricFamily(
            "clickstream_vortex_millis_behind_latest",
            "How far the shard's reader is behind the stream's tip (Kinesis MillisBehindLatest).",
            labels=labels,
        )
        held = GaugeMetricFamily(
            "clickstream_vortex_shard_held",
            "1 while a live vortex worker holds the shard's lease; finished shards are left out.",
            labels=labels,
        )
        failing = GaugeMetricFamily(
            "clickstream_vortex_shard_read_failing_seconds",
            "How long the shard's reads (GetRecords) have been failing, 0 while they work; "
            "finished shards are left out.",
            labels=labels,
        )
        for shard in store.shards():
            key = [shard["stream"], shard["shard_id"]]
            for column, family in counters:
                family.add_metric(key, shard[column])
            if not shard["finished"]:
                held.add_metric(key, 1.0 if shard["lease_live"] else 0.0)
                failing.add_metric(key, shard["failing_seconds"] or 0.0)
                if shard["millis_behind"] is not None:
                    behind.add_metric(key, shard["millis_behind"])
        for _, family in counters:
            yield family
        yield behind
        yield held
        yield failing

    def _instance(self, now: float, streams: list[str]) -> Iterator[Metric]:
        """Everything the Dagster instance (DAGSTER_HOME) knows."""

        heartbeat = GaugeMetricFamily(
            "clickstream_daemon_heartbeat_age_seconds",
            "Seconds since each Dagster daemon's last heartbeat.",
            labels=["daemon"],
        )
        tick = GaugeMetricFamily(
            "clickstream_sensor_tick_age_seconds",
            "Seconds since each sensor's latest tick started.",
            labels=["sensor"],
        )
        pending_family = GaugeMetricFamily(
            "clickstream_partitions_pending",
            "Partitions named by load runs that have not finished.",
            labels=["stream"],
        )
        failed_family = GaugeMetricFamily(
            "clickstream_partitions_failed",
            f"Partitions whose newest load run (created in the last "
            f"{FAILED_WINDOW.total_seconds() / 3600:g} h) failed on them.",
            labels=["stream"],
        )
        ours = set(SENSORS)
        instance = self._dagster_instance()
        for kind, beat in instance.get_daemon_heartbeats().items():
            heartbeat.add_metric([kind], max(0.0, now - beat.timestamp))
        states = [s for s in instance.all_instigator_state() if s.instigator_name in ours]
        ticks = instance.get_batch_ticks([s.selector_id for s in states], limit=1)
        for state in sorted(states, key=lambda s: s.instigator_name):
            latest = ticks.get(state.selector_id, ())
            if latest:
                tick.add_metric([state.instigator_name], max(0.0, now - latest[0].timestamp))
        pending, failed = partition_states(instance, datetime.fromtimestamp(now, UTC))
        for stream in sorted(set(streams) | set(pending) | set(failed)):
            pending_family.add_metric([stream], pending[stream])
            failed_family.add_metric([stream], failed[stream])
        yield heartbeat
        yield tick
        yield pending_family
        yield failed_family
