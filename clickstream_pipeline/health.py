"""Health checks for on-call and Kubernetes probes: S3, the warehouse, the registry, the daemon
and, where a Kinesis stream is configured, vortex."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from botocore.exceptions import BotoCoreError, ClientError

from clickstream_pipeline import registry_snapshot
from clickstream_pipeline.config import Settings
from clickstream_pipeline.errors import ClickstreamError, first_line
from clickstream_pipeline.registry import registry_backend
from clickstream_pipeline.s3 import s3_client


@dataclass(frozen=True)
class Check:
    """One component's state: ``ok``, and a one-line detail either way. A ``stale`` component
    is down but the pipeline works around it (a registry service: its last snapshot)."""

    name: str
    ok: bool
    detail: str
    stale: bool = False

    @property
    def state(self) -> str:
        return "up" if self.ok else "STALE" if self.stale else "DOWN"


def _guarded(name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, True, probe())
    except (ClickstreamError, BotoCoreError, ClientError, OSError) as error:
        return Check(name, False, first_line(error))


def check_registry(settings: Settings) -> Check:
    """The registry answers; if a registry service does not, whether the code location has a
    snapshot of it to serve (then the registry is stale rather than down)."""

    def probe() -> str:
        backend = registry_backend(settings.registry)
        return f"{len(backend.load().streams)} streams in {backend.location}"

    check = _guarded("registry", probe)
    if check.ok or not registry_snapshot.is_service(settings.registry):
        return check
    try:
        snapshot = registry_snapshot.last_good()
    except Exception as error:  # the instance itself may be down: say so, keep the first cause
        return Check("registry", False, f"{check.detail}; no snapshot: {first_line(error)}")
    if snapshot is None:
        return check
    return Check("registry", False, f"{check.detail}; {snapshot.describe()}", stale=True)


def check_s3(settings: Settings) -> Check:
    def probe() -> str:
        bucket = settings.require_bucket()
        # A one-key listing of the raw prefix: what the loader itself needs, and all the
        # least-privilege policy grants (HeadBucket would need ListBucket on the whole bucket).
        s3_client(max_attempts=2).list_objects_v2(
            Bucket=bucket, Prefix=f"{settings.raw_prefix}/", MaxKeys=1
        )
        return f"bucket {bucket} reachable"

    return _guarded("s3", probe)


def check_warehouse(settings: Settings) -> Check:
    def probe() -> str:
        from clickstream_pipeline.warehouse import warehouse_for_url

        warehouse = warehouse_for_url(settings.require_warehouse_url())
        with warehouse.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchone()
        return "accepting connections"

    return _guarded("warehouse", probe)


def check_daemon() -> Check:
    """Every daemon the instance requires has a recent heartbeat (DAGSTER_HOME's instance)."""

    def probe() -> str:
        import dagster as dg

        with dg.DagsterInstance.get() as instance:
            statuses = instance.get_daemon_statuses()
        if not statuses:
            raise ClickstreamError("the instance requires no daemons")
        down = sorted(kind for kind, status in statuses.items() if not status.healthy)
        if down:
            raise ClickstreamError(f"no recent heartbeat from {', '.join(down)}")
        return f"{len(statuses)} daemons healthy"

    return _guarded("dagster daemon", probe)


# Vortex further behind the stream's tip than the loader's grace period (5 minutes) means hours
# are loaded before all their files are in S3: they load again as late files, but later.
VORTEX_MAX_BEHIND_MS = 5 * 60 * 1000
# A shard whose reads have failed this long (vortex's six ticks) is down, not a passing error.
VORTEX_MAX_FAILING_SECONDS = 60.0


def check_vortex(settings: Settings) -> Check:
    """Every unfinished shard of the stream held by a live worker, reading, none too far
    behind."""

    def probe() -> str:
        from clickstream_pipeline.vortex import LeaseStore

        stream = settings.kinesis_stream
        store = LeaseStore(settings.require_vortex_url())
        try:
            shards = [s for s in store.shards(stream) if not s["finished"]]
        finally:
            store.close()
        if not shards:
            raise ClickstreamError(f"no vortex worker has read stream {stream!r} yet")
        unheld = [s["shard_id"] for s in shards if not s["lease_live"]]
        if unheld:
            raise ClickstreamError(
                f"{len(unheld)} of {len(shards)} shards held by no live worker: "
                + ", ".join(unheld[:3])
                + (" ..." if len(unheld) > 3 else "")
            )
        failing = [s for s in shards if (s["failing_seconds"] or 0.0) >= VORTEX_MAX_FAILING_SECONDS]
        if failing:
            first = failing[0]
            raise ClickstreamError(
                f"reads of {len(failing)} of {len(shards)} shards failing: {first['shard_id']} "
                f"for {first['failing_seconds']:,.0f} s: {first['read_error']}"
            )
        behind = max(s["millis_behind"] or 0 for s in shards)
        if behind > VORTEX_MAX_BEHIND_MS:
            raise ClickstreamError(
                f"{behind / 1000:,.0f} s behind the stream (more than the loader's "
                f"{VORTEX_MAX_BEHIND_MS / 60000:g}-minute grace)"
            )
        workers = len({s["owner"] for s in shards})
        return (
            f"{len(shards)} shards of {stream} read by {workers} "
            f"worker{'s' if workers != 1 else ''}, at most {behind:,} ms behind"
        )

    return _guarded("vortex", probe)


def run_checks(include_daemon: bool = True) -> list[Check]:
    settings = Settings.from_env()
    checks = [check_s3(settings), check_warehouse(settings), check_registry(settings)]
    if settings.kinesis_stream:
        checks.append(check_vortex(settings))
    if include_daemon:
        checks.append(check_daemon())
    return checks
