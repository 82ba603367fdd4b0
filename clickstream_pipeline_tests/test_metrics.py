"""`clickstream metrics`: the /metrics endpoint computed from the ledger, scraped over HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clickstream_pipeline.jobs import LOAD_JOB, run_config_for
from clickstream_pipeline.layout import raw_key
from clickstream_pipeline.loader import RawStore, load_partition
from clickstream_pipeline.metrics import PipelineCollector, run_partitions
from clickstream_pipeline.names import Stream
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse.base import StreamTotals, stream_totals
from clickstream_pipeline.warehouse.postgres import PostgresWarehouse
from clickstream_pipeline_tests.helpers import (
    defs_for,
    free_port,
    new_database,
    put_file,
    query,
    recent_hour,
    record,
)

H1, H2 = recent_hour(3), recent_hour(2)


def scrape(port: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_metrics_report_the_ledger_per_stream(pipeline: dict[str, str], customer: str) -> None:
    stream = Stream(customer, "page_view")
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    put_file(bucket, stream, H1, "a", [record("m1", H1), record("m1", H1), b"{bad"])
    put_file(bucket, stream, H2, "a", [record("m2", H2), record("m3", H2)])
    store = RawStore(s3_client(), bucket, "raw")
    for hour in (H1, H2):
        load_partition(store, PostgresWarehouse(url), stream, hour)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    server = subprocess.Popen(
        [sys.executable, "-m", "clickstream_pipeline.cli", "metrics", "--port", str(port)],
        env={**env, **pipeline},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = scrape(port)
    finally:
        server.terminate()
        server.wait(30)

    mine = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("stream") == str(stream)
    }
    lag = mine.pop(("clickstream_lag_seconds", None))
    seconds = mine.pop(("clickstream_load_duration_seconds_sum", None))
    sizes = [
        s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"]
        for key in (hour_key(stream, H1), hour_key(stream, H2))
    ]
    buckets = {le: value for (name, le), value in mine.items() if name.endswith("_bucket")}
    assert {k: v for k, v in mine.items() if not k[0].endswith("_bucket")} == {
        ("clickstream_partitions_loaded_total", None): 2.0,
        ("clickstream_records_read_total", None): 5.0,
        ("clickstream_events_loaded_total", None): 3.0,
        ("clickstream_duplicates_dropped_total", None): 1.0,
        ("clickstream_records_quarantined_total", None): 1.0,
        ("clickstream_files_read_total", None): 2.0,
        ("clickstream_bytes_read_total", None): float(sum(sizes)),
        ("clickstream_load_duration_seconds_count", None): 2.0,
        ("clickstream_partitions_pending", None): 0.0,  # no load runs in the instance
        ("clickstream_partitions_failed", None): 0.0,
    }
    # Cumulative buckets: both loads took well under an hour, and each took some time.
    assert list(buckets) == ["1.0", "5.0", "15.0", "60.0", "300.0", "900.0", "3600.0", "+Inf"]
    assert buckets["3600.0"] == buckets["+Inf"] == 2.0
    assert 0 < seconds < 60
    expected_lag = (datetime.now(UTC) - (H2 + timedelta(hours=1))).total_seconds()
    assert abs(lag - expected_lag) < 120


def hour_key(stream: Stream, hour: datetime) -> str:
    return raw_key("raw", stream, hour, "a.jsonl.gz")


def test_a_ledger_from_before_load_seconds_gets_the_new_columns(
    local_stack: dict[str, str],
) -> None:
    old = new_database(local_stack["CLICKSTREAM_WAREHOUSE_URL"], "old_ledger")
    with psycopg2.connect(old) as setup, setup.cursor() as cur:
        cur.execute(
            "CREATE SCHEMA clickstream; CREATE TABLE clickstream.load_ledger (stream text NOT "
            "NULL, hour timestamptz NOT NULL, fingerprint text NOT NULL, files jsonb NOT NULL, "
            "records_read bigint NOT NULL, rows_loaded bigint NOT NULL, duplicates bigint NOT "
            "NULL, quarantined bigint NOT NULL, new_columns jsonb NOT NULL, run_id text, "
            "loaded_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (stream, hour))"
        )
        cur.execute(
            "INSERT INTO clickstream.load_ledger VALUES "
            "('acme.page_view', %s, 'fp', '[]', 4, 3, 1, 0, '[]', NULL)",
            (H1,),
        )
    setup.close()

    [totals] = stream_totals(PostgresWarehouse(old))

    assert totals == StreamTotals(
        stream="acme.page_view",
        partitions=1,
        records_read=4,
        rows_loaded=3,
        duplicates=1,
        quarantined=0,
        newest_hour=H1,
        files_read=0,
        bytes_read=0,
        timed=0,
        seconds=0.0,
        seconds_buckets=(0, 0, 0, 0, 0, 0, 0),
    )
    assert query(
        old,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'load_ledger' "
        "AND column_name IN ('seconds', 'files_read', 'bytes_read') ORDER BY column_name",
    ) == [("bytes_read",), ("files_read",), ("seconds",)]


def test_pending_and_failed_partitions_come_from_the_runs(
    pipeline: dict[str, str], customer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])
    good, bad = f"{H1:%Y-%m-%d-%H}:00|{stream}", f"{H1:%Y-%m-%d-%H}:00|Not.A.Stream"
    job = defs_for(stream).get_job_def(LOAD_JOB)
    with dg.DagsterInstance.get() as instance:
        # A batch that failed on one of its two partitions: only that one counts as failed.
        failed_batch = job.execute_in_process(
            run_config=run_config_for([good, bad]), instance=instance, raise_on_error=False
        )
        assert not failed_batch.success
        # A run that died without saying which partitions failed: all of them count.
        died = instance.create_run_for_job(
            job, run_config=run_config_for([f"{H2:%Y-%m-%d-%H}:00|{stream}"])
        )
        instance.report_run_failed(died)
        # Not started yet: pending. It names `good` too, which is then pending, not failed.
        # Hours relative to H1 (fixed at import): recent_hour() here could name H1 itself once
        # the clock passes an hour boundary during the session.
        earlier = (H1 - timedelta(hours=2), H1 - timedelta(hours=1))
        queued = [f"{hour:%Y-%m-%d-%H}:00|{stream}" for hour in earlier]
        instance.create_run_for_job(
            job, run_config=run_config_for([*queued, good]), status=dg.DagsterRunStatus.NOT_STARTED
        )

    collector = PipelineCollector(lambda: PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"]))
    values = {
        (sample.name, sample.labels.get("stream")): sample.value
        for family in collector.collect()
        for sample in family.samples
        if sample.name in ("clickstream_partitions_pending", "clickstream_partitions_failed")
    }

    assert {k: v for k, v in values.items() if k[1] in (str(stream), "Not.A.Stream")} == {
        ("clickstream_partitions_pending", str(stream)): 3.0,
        ("clickstream_partitions_failed", str(stream)): 1.0,
        ("clickstream_partitions_pending", "Not.A.Stream"): 0.0,
        ("clickstream_partitions_failed", "Not.A.Stream"): 1.0,
    }


def test_a_run_of_the_tables_loads_its_selected_tables_over_its_hours() -> None:
    tables = frozenset({dg.AssetKey(["acme", "page_view"]), dg.AssetKey(["globex", "signup"])})
    ranged = dg.DagsterRun(
        job_name="__ASSET_JOB",
        asset_selection=tables | {dg.AssetKey(["raw", "acme", "page_view"])},
        tags={
            "dagster/asset_partition_range_start": "2026-11-30-23:00",
            "dagster/asset_partition_range_end": "2026-12-01-01:00",
        },
    )
    single = dg.DagsterRun(
        job_name="__ASSET_JOB",
        asset_selection=tables,
        tags={"dagster/partition": "2026-12-01-01:00"},
    )
    earlier_release = dg.DagsterRun(
        job_name="__ASSET_JOB", tags={"dagster/partition": "2026-12-01-01:00|acme.page_view"}
    )

    assert run_partitions(ranged) == [
        "2026-11-30-23:00|acme.page_view",
        "2026-12-01-00:00|acme.page_view",
        "2026-12-01-01:00|acme.page_view",
        "2026-11-30-23:00|globex.signup",
        "2026-12-01-00:00|globex.signup",
        "2026-12-01-01:00|globex.signup",
    ]
    assert run_partitions(single) == [
        "2026-12-01-01:00|acme.page_view",
        "2026-12-01-01:00|globex.signup",
    ]
    assert run_partitions(earlier_release) == ["2026-12-01-01:00|acme.page_view"]


def test_the_grafana_dashboard_uses_only_metrics_the_endpoint_serves(
    pipeline: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    collector = PipelineCollector(lambda: PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"]))
    served = set()
    for family in collector.collect():
        if family.type == "counter":
            served.add(f"{family.name}_total")
        elif family.type == "histogram":
            served |= {f"{family.name}_{part}" for part in ("bucket", "sum", "count")}
        else:
            served.add(family.name)
    dashboard = json.loads(
        (Path(__file__).resolve().parents[1] / "deploy/grafana/clickstream.json").read_text()
    )
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    exprs += [
        variable["query"]["query"]
        for variable in dashboard["templating"]["list"]
        if isinstance(variable.get("query"), dict)
    ]
    used = {name for expr in exprs for name in re.findall(r"clickstream_[a-z_]+", expr)}

    assert used and used <= served, used - served
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    assert all(
        word in titles
        for word in (
            "lag",
            "loaded per second",
            "quarantined",
            "duplicates",
            "failed",
            "pending",
            "load duration",
            "bytes read",
            "sensor tick age",
        )
    )
