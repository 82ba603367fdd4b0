"""Alerts to a local HTTP receiver: a failed load, a stale stream, and its resolution."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import pytest

from clickstream_pipeline.alerts import (
    AlertResource,
    load_failure_alert_sensor,
    stream_freshness_alert_sensor,
)
from clickstream_pipeline.definitions import defs
from clickstream_pipeline.jobs import LOAD_JOB, run_config_for
from clickstream_pipeline.loader import RawStore, load_partition
from clickstream_pipeline.names import Stream
from clickstream_pipeline.resources import WarehouseResource
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse.postgres import PostgresWarehouse
from clickstream_pipeline_tests.helpers import put_file, recent_hour, record

H3 = recent_hour(3)


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body it receives."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                owner.messages.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.server.shutdown()


def test_a_failed_load_run_sends_one_alert_with_partitions_and_link(
    pipeline: dict[str, str], instance: dg.DagsterInstance, receiver: Receiver
) -> None:
    bad_key = "2026-11-26-10:00|Not.A.Stream"
    result = defs.get_job_def(LOAD_JOB).execute_in_process(
        run_config=run_config_for([bad_key]), instance=instance, raise_on_error=False
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE]
    context = dg.build_run_status_sensor_context(
        sensor_name="load_failure_alert_sensor",
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()
    alerts = AlertResource(webhook_url=receiver.url, ui_url="https://dagster.example")

    load_failure_alert_sensor(context, alerts=alerts)

    [message] = receiver.messages
    fields = message["clickstream"]
    assert fields == {
        "kind": "load_failed",
        "run_id": result.run_id,
        "stream": "Not.A.Stream",
        "hour": "2026-11-26-10:00",
        "partitions": [bad_key],
        "reason": (
            "ClickstreamError: invalid customer 'Not': names must match ^[a-z][a-z0-9_]{0,62}$"
        ),
        "link": f"https://dagster.example/runs/{result.run_id}",
    }
    assert message["text"].startswith(":red_circle: clickstream load failed: 1 partition(s)")


def test_a_stale_stream_alerts_once_and_resolves_once(
    pipeline: dict[str, str], customer: str, receiver: Receiver
) -> None:
    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H3, "a", [record("m1", H3)])
    store = RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw")
    load_partition(store, PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"]), stream, H3)

    def tick(cursor: str | None, stale_after: int) -> str | None:
        context = dg.build_sensor_context(
            cursor=cursor,
            resources={
                "warehouse": WarehouseResource(),
                "alerts": AlertResource(webhook_url=receiver.url, stale_after_minutes=stale_after),
            },
        )
        stream_freshness_alert_sensor(context)
        return context.cursor

    # The newest hour ended about two hours ago: stale for a 60-minute threshold.
    cursor = tick(None, 60)
    cursor = tick(cursor, 60)  # still stale: no second alert
    mine = [
        m["clickstream"] for m in receiver.messages if m["clickstream"]["stream"] == str(stream)
    ]
    assert [(m["kind"], m["state"]) for m in mine] == [("stale", "firing")]
    assert 100 < mine[0]["lag_minutes"] < 200

    tick(cursor, 24 * 60)  # a threshold it now meets: one resolve message
    mine = [
        m["clickstream"] for m in receiver.messages if m["clickstream"]["stream"] == str(stream)
    ]
    assert [(m["kind"], m["state"]) for m in mine] == [("stale", "firing"), ("stale", "resolved")]
