"""Sensors: the registry becomes partitions; new and changed files in S3 become batch loads."""

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import dagster as dg

from clickstream_pipeline.alerts import max_runtime_tags
from clickstream_pipeline.discovery import PendingPartition, list_streams, pending_partitions
from clickstream_pipeline.jobs import PARTITIONS_TAG, load_partitions_job, run_config_for
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import FIRST_HOUR_TIME, partition_key, stream_partitions
from clickstream_pipeline.resources import RegistryResource, S3StorageResource, WarehouseResource


class DiscoveryResource(dg.ConfigurableResource):
    """How discovery decides what to load and how loads are batched."""

    grace_minutes: int = 5  # wait this long after an hour ends before loading it
    lookback_hours: int = 24  # late files are found in hours this recent
    batch_size: int = 100  # partitions per load run
    concurrency: int = 4  # partitions loaded at once within a run
    retry_minutes: int = 30  # re-request a partition whose requested load has not landed


def stream_partition_requests(
    instance: dg.DagsterInstance, streams: tuple[Stream, ...]
) -> list[dg.AddDynamicPartitionsRequest]:
    """Add registry streams that are not partitions yet. Removed streams are never deleted:
    their materialization history stays, and loading stops because discovery skips them."""
    existing = set(instance.get_dynamic_partitions(stream_partitions.name or "stream"))
    new = [s.key for s in streams if s.key not in existing]
    return [stream_partitions.build_add_request(new)] if new else []


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds every registry stream as a `stream` partition.",
)
def registry_sync_sensor(
    context: dg.SensorEvaluationContext, registry: RegistryResource
) -> dg.SensorResult | dg.SkipReason:
    """Turn new registry streams into partitions, without a redeploy."""
    requests = stream_partition_requests(context.instance, registry.load().streams)
    if not requests:
        return dg.SkipReason("every registered stream is already a partition")
    return dg.SensorResult(dynamic_partitions_requests=requests)


@dataclass
class DiscoveryCursor:
    """Streams already listed in full once, and loads requested but not yet in the ledger."""

    scanned: set[str] = field(default_factory=set)
    requested: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (fp, when)

    @classmethod
    def parse(cls, text: str | None) -> "DiscoveryCursor":
        if not text:
            return cls()
        data = json.loads(text)
        requested = {key: (fp, when) for key, (fp, when) in data.get("requested", {}).items()}
        return cls(set(data.get("scanned", [])), requested)

    def dump(self) -> str:
        return json.dumps(
            {"scanned": sorted(self.scanned), "requested": self.requested}, separators=(",", ":")
        )


@dg.sensor(
    job=load_partitions_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests batch loads of completed hours with new, late or rewritten files.",
)
def s3_discovery_sensor(
    context: dg.SensorEvaluationContext,
    s3: S3StorageResource,
    warehouse: WarehouseResource,
    registry: RegistryResource,
    discovery: DiscoveryResource,
) -> dg.SensorResult:
    """Find (stream, hour)s whose files differ from the ledger and request loads in batches."""
    now = datetime.now(UTC)
    cursor = DiscoveryCursor.parse(context.cursor)
    streams = registry.load().streams
    result = discover(s3, warehouse, discovery, streams, cursor, now)
    runs = batch_requests(result, discovery, now)
    for pending in result:
        cursor.requested[str(partition_key(pending.stream, pending.hour))] = (
            pending.fingerprint,
            now.timestamp(),
        )
    cursor.scanned = {s.key for s in streams}
    return dg.SensorResult(
        run_requests=runs,
        cursor=cursor.dump(),
        dynamic_partitions_requests=stream_partition_requests(context.instance, streams),
    )


def discover(
    s3: S3StorageResource,
    warehouse: WarehouseResource,
    discovery: DiscoveryResource,
    streams: tuple[Stream, ...],
    cursor: DiscoveryCursor,
    now: datetime,
) -> list[PendingPartition]:
    """Pending partitions not already requested (unless that request is older than the retry
    window); prunes the cursor's requests that have landed."""
    since = max(now - timedelta(hours=discovery.lookback_hours), FIRST_HOUR_TIME)
    new = tuple(s for s in streams if s.key not in cursor.scanned)
    known = tuple(s for s in streams if s.key in cursor.scanned)
    listings = list_streams(
        s3.store(), [(s, FIRST_HOUR_TIME) for s in new] + [(s, since) for s in known]
    )
    target = warehouse.warehouse()
    ledger = {**target.ledger(new), **target.ledger(known, since)} if streams else {}
    pending = pending_partitions(listings, ledger, now, timedelta(minutes=discovery.grace_minutes))
    retry_before = now.timestamp() - discovery.retry_minutes * 60
    fresh = []
    still_requested: dict[str, tuple[str, float]] = {}
    for item in pending:
        key = str(partition_key(item.stream, item.hour))
        previous = cursor.requested.get(key)
        if previous is not None and previous[0] == item.fingerprint and previous[1] > retry_before:
            still_requested[key] = previous
            continue
        fresh.append(item)
    cursor.requested = still_requested
    return fresh


def batch_requests(
    pending: list[PendingPartition], discovery: DiscoveryResource, now: datetime
) -> list[dg.RunRequest]:
    """One run per batch of up to ``batch_size`` partitions, oldest hours first."""
    runs = []
    for start in range(0, len(pending), discovery.batch_size):
        batch = pending[start : start + discovery.batch_size]
        keys = [str(partition_key(p.stream, p.hour)) for p in batch]
        runs.append(
            dg.RunRequest(
                run_key=f"{now:%Y%m%dT%H%M%S}-{start // discovery.batch_size}",
                run_config=run_config_for(keys, discovery.concurrency),
                tags={PARTITIONS_TAG: str(len(keys)), **max_runtime_tags()},
            )
        )
    return runs
