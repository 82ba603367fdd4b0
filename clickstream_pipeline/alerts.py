"""Alerts: Slack-compatible webhook messages for failed loads and stale streams."""

import json
import os
import urllib.request
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from clickstream_pipeline.jobs import load_partitions_job
from clickstream_pipeline.resources import WarehouseResource
from clickstream_pipeline.warehouse.base import stream_totals


class AlertResource(dg.ConfigurableResource):
    """Where alerts go (default: CLICKSTREAM_ALERT_WEBHOOK) and when a stream is stale."""

    webhook_url: str | None = None
    ui_url: str | None = None  # links to runs; default CLICKSTREAM_UI_URL or localhost:3000
    stale_after_minutes: int = 180  # lag (now - end of newest loaded hour) that raises an alert

    def webhook(self) -> str | None:
        return self.webhook_url or os.environ.get("CLICKSTREAM_ALERT_WEBHOOK") or None

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


@dg.run_failure_sensor(
    monitored_jobs=[load_partitions_job],
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
    config: Any = run.run_config.get("ops", {})
    requested = config.get("load_partitions", {}).get("config", {}).get("partitions", [])
    keys = sorted(failed) or list(requested)
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
