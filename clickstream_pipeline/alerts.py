"""Alerts: Slack-compatible webhook messages for failed, slow and stale loads."""

import json
import os
import statistics
import urllib.request
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from clickstream_pipeline.config import number_from_env
from clickstream_pipeline.layout import stream_of
from clickstream_pipeline.metrics import run_partitions
from clickstream_pipeline.resources import WarehouseResource
from clickstream_pipeline.warehouse.base import recent_load_seconds, stream_totals

MAX_RUNTIME_TAG = "dagster/max_runtime"


def max_runtime_tags() -> dict[str, str]:
    """Run tags that let Dagster's run monitoring stop a load run after
    CLICKSTREAM_LOAD_MAX_RUNTIME_SECONDS (none when unset)."""
    seconds = number_from_env("CLICKSTREAM_LOAD_MAX_RUNTIME_SECONDS", None)
    return {} if seconds is None else {MAX_RUNTIME_TAG: str(int(seconds))}


class AlertResource(dg.ConfigurableResource):
    """Where alerts go (default: CLICKSTREAM_ALERT_WEBHOOK) and when a stream is stale."""

    webhook_url: str | None = None
    ui_url: str | None = None  # links to runs; default CLICKSTREAM_UI_URL or localhost:3000
    stale_after_minutes: int = 180  # lag (now - end of newest loaded hour) that raises an alert
    # A load run is slow past this multiple of its expected time (from its streams' recent
    # median load seconds), once it has run slow_min_seconds; or past slow_max_seconds anyway.
    # None: CLICKSTREAM_SLOW_LOAD_MULTIPLE (5), _MIN_SECONDS (300), _MAX_SECONDS (3600).
    slow_multiple: float | None = None
    slow_min_seconds: float | None = None
    slow_max_seconds: float | None = None

    def webhook(self) -> str | None:
        return self.webhook_url or os.environ.get("CLICKSTREAM_ALERT_WEBHOOK") or None

    def slow_rules(self) -> tuple[float, float, float]:
        """(multiple, minimum seconds, cap seconds) for the slow-load alert."""
        return (
            self.slow_multiple or number_from_env("CLICKSTREAM_SLOW_LOAD_MULTIPLE", 5.0) or 5.0,
            self.slow_min_seconds
            if self.slow_min_seconds is not None
            else number_from_env("CLICKSTREAM_SLOW_LOAD_MIN_SECONDS", 300.0) or 300.0,
            self.slow_max_seconds
            or number_from_env("CLICKSTREAM_SLOW_LOAD_MAX_SECONDS", 3600.0)
            or 3600.0,
        )

    def run_link(self, run_id: str) -> str:
        base = self.ui_url or os.environ.get("CLICKSTREAM_UI_URL") or "http://localhost:3000"
        return f"{base.rstrip('/')}/runs/{run_id}"

    def send(self, text: str, **fields: object) -> None:
        """POST ``{"text": ..., "clickstream": {fields}}``; Slack shows the text."""
        url = self.webhook()
        if url is None:
            return
        body = json.dumps({"text": text, "clickstream": fields}).encode()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


# Every job of this code location: the batch load job and runs of the tables' asset.
@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="One alert per failed load run, with its failed partitions and a link.",
)
def load_failure_alert_sensor(context: dg.RunFailureSensorContext, alerts: AlertResource) -> None:
    """Send one message per failed load run: which partitions, why, and the run's link."""
    run = context.dagster_run
    failed: dict[str, str] = {}
    for event in context.get_step_failure_events():
        data = event.step_failure_data
        metadata = data.user_failure_data.metadata if data and data.user_failure_data else {}
        value = metadata.get("failed")
        if value is not None:
            failed.update(value.value)  # type: ignore[arg-type]
    keys = sorted(failed) or run_partitions(run)
    reason = next(iter(failed.values()), context.failure_event.message or "run failed")
    first = keys[0] if keys else "?|?"
    hour, _, stream = first.partition("|")
    alerts.send(
        f":red_circle: clickstream load failed: {len(keys)} partition(s), first {first} — "
        f"{reason} — {alerts.run_link(run.run_id)}",
        kind="load_failed",
        run_id=run.run_id,
        stream=stream,
        hour=hour,
        partitions=keys,
        reason=reason,
        link=alerts.run_link(run.run_id),
    )


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts once when a stream's lag passes the threshold, and once when it clears.",
)
def stream_freshness_alert_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource, alerts: AlertResource
) -> dg.SkipReason:
    """Lag per stream from the ledger; one alert when a stream goes stale, one when it clears."""
    if alerts.webhook() is None:
        return dg.SkipReason("no alert webhook configured (CLICKSTREAM_ALERT_WEBHOOK)")
    stale_before: set[str] = set(json.loads(context.cursor)) if context.cursor else set()
    now = datetime.now(UTC)
    stale: dict[str, float] = {}
    for entry in stream_totals(warehouse.warehouse()):
        lag_minutes = (now - entry.newest_hour).total_seconds() / 60 - 60
        if lag_minutes > alerts.stale_after_minutes:
            stale[entry.stream] = lag_minutes
    for stream in sorted(set(stale) - stale_before):
        alerts.send(
            f":warning: {stream} is stale: newest loaded hour ended {stale[stream]:.0f} min ago "
            f"(threshold {alerts.stale_after_minutes} min)",
            kind="stale",
            stream=stream,
            lag_minutes=round(stale[stream]),
            state="firing",
        )
    for stream in sorted(stale_before - set(stale)):
        alerts.send(
            f":white_check_mark: {stream} is fresh again",
            kind="stale",
            stream=stream,
            state="resolved",
        )
    context.update_cursor(json.dumps(sorted(stale)))
    return dg.SkipReason(f"{len(stale)} stale stream(s)")


def expected_run_seconds(
    partitions: list[str], medians: dict[str, float], concurrency: int
) -> float | None:
    """What a load run of ``partitions`` should take: the sum of its streams' median load
    seconds over the partitions loaded at once. Partitions of streams without history count
    as the slowest known stream; None when no stream has history."""
    if not partitions or not medians:
        return None
    known = [medians[stream_of(key)] for key in partitions if stream_of(key) in medians]
    if not known:
        return None
    unknown = len(partitions) - len(known)
    total = sum(known) + unknown * max(known)
    return total / max(1, min(concurrency, len(partitions)))


def _concurrency(run: dg.DagsterRun) -> int:
    config: Any = run.run_config.get("ops", {}) if isinstance(run.run_config, dict) else {}
    return int(config.get("load_partitions", {}).get("config", {}).get("concurrency", 4) or 1)


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Alerts once when a load run runs unusually long, and once when it finishes.",
)
def slow_load_alert_sensor(
    context: dg.SensorEvaluationContext, warehouse: WarehouseResource, alerts: AlertResource
) -> dg.SkipReason:
    """One alert per load run that runs past its streams' usual time (or the cap), one resolve
    when that run ends; the cursor holds the runs alerted on."""
    if alerts.webhook() is None:
        return dg.SkipReason("no alert webhook configured (CLICKSTREAM_ALERT_WEBHOOK)")
    multiple, min_seconds, max_seconds = alerts.slow_rules()
    firing: dict[str, dict[str, Any]] = json.loads(context.cursor) if context.cursor else {}
    now = datetime.now(UTC).timestamp()
    instance = context.instance
    for run_id in sorted(firing):
        record = instance.get_run_record_by_id(run_id)
        if record is not None and not record.dagster_run.is_finished:
            continue
        incident = firing.pop(run_id)
        status = record.dagster_run.status.value if record is not None else "DELETED"
        took = (record.end_time or now) - (record.start_time or now) if record else 0.0
        alerts.send(
            f":white_check_mark: clickstream load run {run_id[:8]} ({incident['stream']}) "
            f"finished: {status} after {took:.0f} s — {alerts.run_link(run_id)}",
            kind="slow_load",
            state="resolved",
            run_id=run_id,
            stream=incident["stream"],
            hour=incident["hour"],
            status=status,
            seconds=round(took, 1),
            link=alerts.run_link(run_id),
        )
    started = instance.get_run_records(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]), limit=1000
    )
    running = [
        (record, run_partitions(record.dagster_run))
        for record in started
        if record.dagster_run.run_id not in firing and record.start_time is not None
    ]
    running = [(record, keys) for record, keys in running if keys]
    streams = {stream_of(key) for _, keys in running for key in keys}
    history = recent_load_seconds(warehouse.warehouse(), streams) if streams else {}
    medians = {stream: statistics.median(values) for stream, values in history.items()}
    for record, keys in running:
        run = record.dagster_run
        elapsed = now - (record.start_time or now)
        expected = expected_run_seconds(keys, medians, _concurrency(run))
        if elapsed > max_seconds:
            reason = f"running {elapsed:.0f} s, over the {max_seconds:.0f} s cap"
        elif expected is not None and elapsed > max(min_seconds, multiple * expected):
            reason = (
                f"running {elapsed:.0f} s, over {multiple:g}x the {expected:.1f} s its "
                f"{len(keys)} partition(s) usually take"
            )
        else:
            continue
        first = sorted(keys)[0]
        hour, _, stream = first.partition("|")
        firing[run.run_id] = {"stream": stream, "hour": hour}
        alerts.send(
            f":hourglass: clickstream load run {run.run_id[:8]} is slow: {reason}; "
            f"{len(keys)} partition(s), first {first} — {alerts.run_link(run.run_id)}",
            kind="slow_load",
            state="firing",
            run_id=run.run_id,
            stream=stream,
            hour=hour,
            partitions=len(keys),
            seconds=round(elapsed, 1),
            expected_seconds=None if expected is None else round(expected, 3),
            reason=reason,
            link=alerts.run_link(run.run_id),
        )
    context.update_cursor(json.dumps(firing, sort_keys=True))
    return dg.SkipReason(f"{len(firing)} slow load run(s)")
