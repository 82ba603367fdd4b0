"""A real Prometheus server scrapes `clickstream metrics` during a demo-sized load and serves the
exact loaded event counts through its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from clickstream_pipeline.generator import GeneratorSpec, generate_files, write_files
from clickstream_pipeline.registry import registry_backend
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline_tests.helpers import free_port, query, run_cli

PROMETHEUS = shutil.which("prometheus")
# The demo's shape (3 customers x 3 events x 3 hours, duplicates and bad records), lighter files.
SPEC = GeneratorSpec(
    customers=3,
    events=3,
    hours=3,
    events_per_file=1500,
    files_per_hour=2,
    duplicate_rate=0.03,
    bad_record_rate=0.005,
    skew=3,
    seed=11,
)


def prometheus_binary() -> str:
    """The `prometheus` binary; .ci/run installs Debian's package and sets
    CLICKSTREAM_REQUIRE_PROMETHEUS, so in CI a missing binary fails instead of skipping."""
    if PROMETHEUS is None:
        if os.environ.get("CLICKSTREAM_REQUIRE_PROMETHEUS") or os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run installs Debian's package")
        pytest.skip("prometheus is not installed here (apt-get install -y prometheus)")
    return PROMETHEUS


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_until_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None, f"{url}: the server exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{url} not ready after {timeout} s"
        time.sleep(0.3)


@pytest.fixture
def warehouse_db(local_stack: dict[str, str]) -> Iterator[str]:
    """A database of its own: the demo's customer names are shared with other tests."""
    url = local_stack["CLICKSTREAM_WAREHOUSE_URL"]
    name = f"prom_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    yield url.replace("/clickstream?", f"/{name}?")
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
    conn.close()


@pytest.mark.slow(seconds=80)
def test_prometheus_scrapes_the_exact_event_counts_of_a_demo_load(
    pipeline: dict[str, str], warehouse_db: str, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **pipeline,
        "CLICKSTREAM_WAREHOUSE_URL": warehouse_db,
        "DAGSTER_HOME": str(dagster_home),
    }
    with registry_backend().edit() as edit:
        edit.registry = edit.registry.with_streams(SPEC.streams)
    report = write_files(
        s3_client(), pipeline["CLICKSTREAM_BUCKET"], generate_files(SPEC, "raw", datetime.now(UTC))
    )
    expected = {key: counts.unique_messages for key, counts in report.streams.items()}
    assert len(expected) == 9 and sum(expected.values()) > 40_000

    metrics_port, prometheus_port = free_port(), free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: clickstream\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{metrics_port}']\n"
    )
    exporter = subprocess.Popen(
        [sys.executable, "-m", "clickstream_pipeline.cli", "metrics", "--port", str(metrics_port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    prometheus = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{prometheus_port}/api/v1"
    try:
        wait_until_ready(f"http://127.0.0.1:{metrics_port}/metrics", exporter)
        wait_until_ready(f"http://127.0.0.1:{prometheus_port}/-/ready", prometheus)

        loaded = run_cli("load", "--grace-minutes", "0", env=env)  # scraped while it runs
        assert loaded.returncode == 0, loaded.stderr

        assert {key: table_rows(warehouse_db, key) for key in expected} == expected
        deadline = time.monotonic() + 60
        while True:
            answer = get_json(
                f"{api}/query?"
                + urllib.parse.urlencode({"query": "clickstream_events_loaded_total"})
            )
            scraped = {
                item["metric"]["stream"]: int(float(item["value"][1]))
                for item in answer["data"]["result"]
            }
            if scraped == expected or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert scraped == expected
        [target] = get_json(f"{api}/targets")["data"]["activeTargets"]
        assert (target["health"], target["scrapeUrl"]) == (
            "up",
            f"http://127.0.0.1:{metrics_port}/metrics",
        )
        total = get_json(
            f"{api}/query?"
            + urllib.parse.urlencode({"query": "sum(clickstream_partitions_loaded_total)"})
        )["data"]["result"]
        assert [int(float(total[0]["value"][1]))] == [9 * 3]
        # Every query of the Grafana dashboard is valid PromQL and evaluates on this server.
        for expr in dashboard_queries():
            answer = get_json(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))
            assert answer["status"] == "success", (expr, answer)
    finally:
        for process in (prometheus, exporter):
            process.terminate()
            process.wait(30)


def table_rows(url: str, stream: str) -> int:
    customer, event = stream.split(".")
    return int(query(url, f'SELECT count(*) FROM "{customer}"."{event}"')[0][0])


def dashboard_queries() -> list[str]:
    """The dashboard's PromQL with Grafana's variables filled in as Grafana would."""
    dashboard = json.loads(
        (Path(__file__).resolve().parents[1] / "deploy/grafana/clickstream.json").read_text()
    )
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return [
        expr.replace("$stream", ".*").replace("$__rate_interval", "1m").replace("$__range", "1h")
        for expr in exprs
    ]
