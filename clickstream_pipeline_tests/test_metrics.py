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

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clickstream_pipeline.loader import RawStore, load_partition
from clickstream_pipeline.metrics import PipelineCollector
from clickstream_pipeline.names import Stream
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse.postgres import PostgresWarehouse
from clickstream_pipeline_tests.helpers import free_port, put_file, recent_hour, record

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

    values = {
        (sample.name, sample.labels.get("stream")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    mine = {name: value for (name, label), value in values.items() if label == str(stream)}
    lag = mine.pop("clickstream_lag_seconds")
    assert mine == {
        "clickstream_partitions_loaded_total": 2.0,
        "clickstream_records_read_total": 5.0,
        "clickstream_events_loaded_total": 3.0,
        "clickstream_duplicates_dropped_total": 1.0,
        "clickstream_records_quarantined_total": 1.0,
    }
    expected_lag = (datetime.now(UTC) - (H2 + timedelta(hours=1))).total_seconds()
    assert abs(lag - expected_lag) < 120


def test_the_grafana_dashboard_uses_only_metrics_the_endpoint_serves(
    pipeline: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    collector = PipelineCollector(lambda: PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"]))
    served = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in collector.collect()
    }
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
    assert all(word in titles for word in ("lag", "loaded per second", "quarantined", "duplicates"))
