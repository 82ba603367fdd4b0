"""Alerts to a local HTTP receiver: a failed load, a stale stream, and its resolution."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg2
import pytest

from clickstream_pipeline.alerts import (
    MAX_RUNTIME_TAG,
    AlertResource,
    load_failure_alert_sensor,
    max_runtime_tags,
    slow_load_alert_sensor,
    stream_freshness_alert_sensor,
)
from clickstream_pipeline.discovery import PendingPartition
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.jobs import LOAD_JOB, run_config_for
from clickstream_pipeline.loader import RawStore, load_partition
from clickstream_pipeline.names import Stream
from clickstream_pipeline.resources import DiscoveryResource, WarehouseResource
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.sensors import batch_requests
from clickstream_pipeline.warehouse.postgres import PostgresWarehouse
from clickstream_pipeline_tests.helpers import defs_for, put_file, recent_hour, record

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
    result = (
        defs_for()
        .get_job_def(LOAD_JOB)
        .execute_in_process(
            run_config=run_config_for([bad_key]), instance=instance, raise_on_error=False
        )
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


def test_a_slow_load_run_alerts_once_and_resolves_once_when_it_finishes(
    pipeline: dict[str, str], customer: str, instance: dg.DagsterInstance, receiver: Receiver
) -> None:
    stream = Stream(customer, "page_view")
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    store = RawStore(s3_client(), bucket, "raw")
    # History: three quick loads give the stream a median of a fraction of a second.
    # Hours relative to H3 (fixed at import), so a session crossing an hour boundary never
    # names H3 itself.
    for hours_ago in (6, 5, 4):
        hour = H3 - timedelta(hours=hours_ago - 3)
        put_file(bucket, stream, hour, "a", [record(f"h{hours_ago}", hour)])
        load_partition(store, PostgresWarehouse(url), stream, hour)
    put_file(bucket, stream, H3, "a", [record("m1", H3)])
    key = f"{H3:%Y-%m-%d-%H}:00|{stream}"
    alerts = AlertResource(
        webhook_url=receiver.url, ui_url="https://dagster.example", slow_multiple=3,
        slow_min_seconds=1, slow_max_seconds=3600,
    )  # fmt: skip

    def tick(cursor: str | None) -> str | None:
        context = dg.build_sensor_context(
            instance=instance,
            cursor=cursor,
            resources={"warehouse": WarehouseResource(), "alerts": alerts},
        )
        slow_load_alert_sensor(context)
        return context.cursor

    # Force the load to be slow: hold a lock on its table, which the load must write.
    blocker = psycopg2.connect(url)
    with blocker.cursor() as cur:
        cur.execute(f'LOCK TABLE "{customer}"."page_view" IN ACCESS EXCLUSIVE MODE')
    results: list[dg.ExecuteInProcessResult] = []
    runner = threading.Thread(
        target=lambda: results.append(
            defs_for()
            .get_job_def(LOAD_JOB)
            .execute_in_process(run_config=run_config_for([key]), instance=instance)
        )
    )
    runner.start()
    try:
        deadline = time.monotonic() + 60
        started: list[dg.RunRecord] = []
        while not started or datetime.now(UTC).timestamp() - (started[0].start_time or 0) < 2:
            assert time.monotonic() < deadline, "the load run did not start"
            time.sleep(0.2)
            started = list(
                instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            )
        cursor = tick(None)
        cursor = tick(cursor)  # still running, still slow: no second alert
        assert [m["clickstream"]["state"] for m in receiver.messages] == ["firing"]
    finally:
        blocker.rollback()
        blocker.close()
        runner.join(120)
    [result] = results
    assert result.success
    tick(tick(cursor))  # finished: one resolve, then nothing more

    firing, resolved = (m["clickstream"] for m in receiver.messages)
    assert len(receiver.messages) == 2
    run_id = result.run_id
    assert firing["kind"] == "slow_load" and firing["run_id"] == run_id
    assert (firing["stream"], firing["hour"], firing["partitions"]) == (
        str(stream),
        f"{H3:%Y-%m-%d-%H}:00",
        1,
    )
    assert firing["reason"].startswith("running ")
    assert "usually take" in firing["reason"] and firing["expected_seconds"] < 1 / 3
    assert firing["link"] == f"https://dagster.example/runs/{run_id}"
    assert {k: resolved[k] for k in ("kind", "state", "run_id", "stream", "status")} == {
        "kind": "slow_load",
        "state": "resolved",
        "run_id": run_id,
        "stream": str(stream),
        "status": "SUCCESS",
    }
    assert resolved["seconds"] >= 2


def test_a_load_run_within_its_usual_time_raises_nothing(
    pipeline: dict[str, str], customer: str, instance: dg.DagsterInstance, receiver: Receiver
) -> None:
    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H3, "a", [record("m1", H3)])
    run = instance.create_run_for_job(
        defs_for().get_job_def(LOAD_JOB),
        run_config=run_config_for([f"{H3:%Y-%m-%d-%H}:00|{stream}"]),
    )
    instance.report_run_failed(run)  # finished runs are never slow
    context = dg.build_sensor_context(
        instance=instance,
        resources={
            "warehouse": WarehouseResource(),
            "alerts": AlertResource(webhook_url=receiver.url, slow_max_seconds=1),
        },
    )
    slow_load_alert_sensor(context)
    assert receiver.messages == [] and context.cursor == "{}"


def test_load_runs_carry_max_runtime_for_run_monitoring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pending = [PendingPartition(H3, Stream("acme", "page_view"), (), "fp", False)]
    monkeypatch.delenv("CLICKSTREAM_LOAD_MAX_RUNTIME_SECONDS", raising=False)
    [plain] = batch_requests(pending, DiscoveryResource(), datetime.now(UTC))
    assert plain.tags == {"clickstream/partitions": "1"}

    monkeypatch.setenv("CLICKSTREAM_LOAD_MAX_RUNTIME_SECONDS", "5400")
    [capped] = batch_requests(pending, DiscoveryResource(), datetime.now(UTC))
    assert capped.tags == {"clickstream/partitions": "1", "dagster/max_runtime": "5400"}

    monkeypatch.setenv("CLICKSTREAM_LOAD_MAX_RUNTIME_SECONDS", "an hour")
    with pytest.raises(ClickstreamError) as raised:
        max_runtime_tags()
    assert str(raised.value) == (
        "CLICKSTREAM_LOAD_MAX_RUNTIME_SECONDS must be a positive number of seconds or a factor: "
        "'an hour'"
    )


# What the daemon needs to enforce dagster/max_runtime: run monitoring (dev's and production's
# dagster.yaml need `run_monitoring: {enabled: true}`); a fast poll keeps this test short.
MONITORED_DAGSTER_YAML = """\
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  poll_interval_seconds: 1
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
"""


@pytest.mark.slow(seconds=60)
def test_run_monitoring_stops_a_load_past_max_runtime_and_the_failure_alert_says_why(
    pipeline: dict[str, str], customer: str, receiver: Receiver, tmp_path: Path
) -> None:
    stream = Stream(customer, "page_view")
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    hour = H3 - timedelta(hours=2)
    put_file(bucket, stream, hour, "a", [record("h1", hour)])
    load_partition(RawStore(s3_client(), bucket, "raw"), PostgresWarehouse(url), stream, hour)
    put_file(bucket, stream, H3, "a", [record("m1", H3)])
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(MONITORED_DAGSTER_YAML)
    with dg.DagsterInstance.from_config(str(home)):
        pass  # create its storage once, before two processes race to
    env = {
        **os.environ,
        **pipeline,
        "DAGSTER_HOME": str(home),
        "CLICKSTREAM_ALERT_WEBHOOK": receiver.url,
        "CLICKSTREAM_UI_URL": "https://dagster.example",
    }
    bin_dir = Path(sys.executable).parent
    daemon = subprocess.Popen(
        [str(bin_dir / "dagster-daemon"), "run", "-m", "clickstream_pipeline.definitions"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "daemon.log").open("w"),
        start_new_session=True,
    )
    blocker = psycopg2.connect(url)
    try:
        with blocker.cursor() as cur:  # the load must write this table: it waits, for ever
            cur.execute(f'LOCK TABLE "{customer}"."page_view" IN ACCESS EXCLUSIVE MODE')
        config = run_config_for([f"{H3:%Y-%m-%d-%H}:00|{stream}"])
        launched = subprocess.run(
            [
                str(bin_dir / "dagster"), "job", "launch", "-m", "clickstream_pipeline.definitions",
                "-j", LOAD_JOB, "--config-json", json.dumps(config),
                "--tags", json.dumps({MAX_RUNTIME_TAG: "3"}),
            ],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert launched.returncode == 0, launched.stderr
        deadline = time.monotonic() + 180
        mine: list[dict[str, Any]] = []
        while not mine:
            assert time.monotonic() < deadline, "no failure alert"
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(1)
            # The daemon runs every sensor: the freshness sensor may report other streams.
            mine = [
                m["clickstream"]
                for m in receiver.messages
                if m["clickstream"]["kind"] in ("load_failed", "slow_load")
            ]
    finally:
        blocker.rollback()
        blocker.close()
        os.killpg(daemon.pid, signal.SIGINT)
        daemon.wait(60)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.tags[MAX_RUNTIME_TAG] == "3"
    [alert] = mine
    assert {k: alert[k] for k in ("kind", "run_id", "stream", "reason", "link")} == {
        "kind": "load_failed",
        "run_id": run.run_id,
        "stream": str(stream),
        "reason": "Exceeded maximum runtime of 3 seconds.",
        "link": f"https://dagster.example/runs/{run.run_id}",
    }
