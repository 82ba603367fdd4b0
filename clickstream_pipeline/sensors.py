"""Sensors: a registry change reloads the code location; new and changed files in S3 become raw
materializations and batch loads.

Both are built for the registry snapshot the code location was loaded from, so the discovery
sensor loads exactly the tables that are assets here.
"""

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import dagster as dg

from clickstream_pipeline.alerts import max_runtime_tags
from clickstream_pipeline.batch import raw_materialization
from clickstream_pipeline.config import sensor_interval
from clickstream_pipeline.discovery import PendingPartition, list_streams, pending_partitions
from clickstream_pipeline.jobs import PARTITIONS_TAG, load_partitions_job, run_config_for
from clickstream_pipeline.layout import load_key
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import FIRST_HOUR_TIME
from clickstream_pipeline.resources import (
    DiscoveryResource,
    RegistryResource,
    S3StorageResource,
    WarehouseResource,
)
from clickstream_pipeline.webserver import DEFAULT_LOCATION, DagsterWebserverResource

# A reload asked for and not yet seen (the webserver may be slow to start the new code server)
# is asked for again after this long.
RELOAD_AGAIN_SECONDS = 120


@dataclass(frozen=True)
class RegistryChange:
    """Streams registered but not assets here, and assets here no longer registered."""

    added: tuple[Stream, ...]
    removed: tuple[Stream, ...]

    @classmethod
    def between(cls, loaded: tuple[Stream, ...], current: tuple[Stream, ...]) -> "RegistryChange":
        return cls(
            tuple(sorted(set(current) - set(loaded))), tuple(sorted(set(loaded) - set(current)))
        )

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)

    def describe(self) -> str:
        parts = []
        for label, streams in (("added", self.added), ("removed", self.removed)):
            if streams:
                shown = ", ".join(s.key for s in streams[:3])
                more = f" and {len(streams) - 3} more" if len(streams) > 3 else ""
                parts.append(f"{label} {shown}{more}")
        return "; ".join(parts)


def build_registry_sync_sensor(
    loaded: tuple[Stream, ...], location: str | None
) -> dg.SensorDefinition:
    """The sensor that reloads this code location when the registry no longer matches
    ``loaded``, the streams it was built from (``location``: its name, when known)."""

    @dg.sensor(
        name="registry_sync_sensor",
        minimum_interval_seconds=sensor_interval("registry_sync_sensor"),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Reloads the code location when the registry's tables change, so added "
        "tables become assets and removed ones stop loading, without a redeploy.",
    )
    def registry_sync_sensor(
        context: dg.SensorEvaluationContext,
        registry: RegistryResource,
        webserver: DagsterWebserverResource,
    ) -> dg.SensorResult:
        """Compare the registry with the tables loaded here; reload the location if they differ.

        An unreadable or invalid registry fails the tick in one line and changes nothing: the
        location keeps serving the tables it has."""
        change = RegistryChange.between(loaded, registry.load(missing_ok=True).streams)
        if not change:
            return dg.SensorResult(
                skip_reason=f"the code location has every registered table ({len(loaded)})"
            )
        fingerprint = json.dumps([[s.key for s in change.added], [s.key for s in change.removed]])
        previous = json.loads(context.cursor) if context.cursor else {}
        if previous.get("change") == fingerprint and (
            time.time() - previous.get("at", 0) < RELOAD_AGAIN_SECONDS
        ):
            return dg.SensorResult(
                skip_reason=f"registry {change.describe()}: reload already requested"
            )
        webserver.request_reload(location or DEFAULT_LOCATION)
        context.log.info(f"registry {change.describe()}: reloading the code location")
        return dg.SensorResult(
            skip_reason=f"registry {change.describe()}: reloading the code location",
            cursor=json.dumps({"change": fingerprint, "at": time.time()}),
        )

    return registry_sync_sensor


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


def build_s3_discovery_sensor(loaded: tuple[Stream, ...]) -> dg.SensorDefinition:
    """The sensor that finds new and changed files of the tables in ``loaded``."""

    @dg.sensor(
        name="s3_discovery_sensor",
        job=load_partitions_job,
        minimum_interval_seconds=sensor_interval("s3_discovery_sensor"),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Reports new, late or rewritten raw files as raw partitions and requests "
        "batch loads of their completed hours.",
    )
    def s3_discovery_sensor(
        context: dg.SensorEvaluationContext,
        s3: S3StorageResource,
        warehouse: WarehouseResource,
        discovery: DiscoveryResource,
    ) -> dg.SensorResult:
        """Find (table, hour)s whose files differ from the ledger: report each hour's raw files
        as materialized and request loads in batches."""
        now = datetime.now(UTC)
        cursor = DiscoveryCursor.parse(context.cursor)
        before = dict(cursor.requested)
        result = discover(s3, warehouse, discovery, loaded, cursor, now)
        # A request made again (its load did not land in time) is not news about the files.
        news = [
            p for p in result if before.get(load_key(p.stream, p.hour), ("",))[0] != p.fingerprint
        ]
        for pending in result:
            cursor.requested[load_key(pending.stream, pending.hour)] = (
                pending.fingerprint,
                now.timestamp(),
            )
        cursor.scanned = {s.key for s in loaded}
        return dg.SensorResult(
            run_requests=batch_requests(result, discovery, now),
            cursor=cursor.dump(),
            asset_events=[raw_materialization(p.stream, p.hour, p.files) for p in news],
        )

    return s3_discovery_sensor


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
        key = load_key(item.stream, item.hour)
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
    """One run per batch of up to ``batch_size`` (table, hour)s, oldest hours first."""
    runs = []
    for start in range(0, len(pending), discovery.batch_size):
        batch = pending[start : start + discovery.batch_size]
        keys = [load_key(p.stream, p.hour) for p in batch]
        runs.append(
            dg.RunRequest(
                run_key=f"{now:%Y%m%dT%H%M%S}-{start // discovery.batch_size}",
                run_config=run_config_for(keys, discovery.concurrency),
                tags={PARTITIONS_TAG: str(len(keys)), **max_runtime_tags()},
            )
        )
    return runs
