"""Prometheus metrics: counters kept in-process, and the ``/metrics`` endpoint's collector, which
computes everything from the load ledger and the Dagster instance at scrape time, so it is right
after restarts.

Label cardinality: one ``stream`` label value per registered stream (customers x events; about
7 series per stream, so 2,000 streams make ~14,000 series), and one ``daemon`` value per Dagster
daemon type. No label carries hours, run ids or file names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from clickstream_pipeline.warehouse.base import Warehouse

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


class PipelineCollector(Collector):
    """Per-stream load totals and lag from the ledger; daemon heartbeat ages from Dagster."""

    def __init__(self, warehouse: Callable[[], Warehouse], clock: Callable[[], float] = time.time):
        self._warehouse = warehouse
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        from clickstream_pipeline.warehouse.base import stream_totals

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
        }
        lag = GaugeMetricFamily(
            "clickstream_lag_seconds",
            "Now minus the end of the newest loaded hour.",
            labels=["stream"],
        )
        for entry in totals:
            for name, family in families.items():
                family.add_metric([entry.stream], getattr(entry, name))
            newest_end = (entry.newest_hour + timedelta(hours=1)).timestamp()
            lag.add_metric([entry.stream], max(0.0, now - newest_end))
        yield from families.values()
        yield lag
        yield from self._daemons(now)

    def _daemons(self, now: float) -> Iterator[Metric]:
        if not os.environ.get("DAGSTER_HOME"):
            return
        import dagster as dg

        age = GaugeMetricFamily(
            "clickstream_daemon_heartbeat_age_seconds",
            "Seconds since each Dagster daemon's last heartbeat.",
            labels=["daemon"],
        )
        with dg.DagsterInstance.get() as instance:
            for kind, heartbeat in instance.get_daemon_heartbeats().items():
                age.add_metric([kind], max(0.0, now - heartbeat.timestamp))
        yield age
