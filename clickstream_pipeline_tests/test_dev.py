"""`clickstream dev`: the embedded stack, the Dagster UI and the daemon, sensors loading files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clickstream_pipeline_tests.helpers import free_port, graphql, outside_env

RUNS_QUERY = "{ runsOrError { ... on Runs { results { status jobName } } } }"


def processes_under(path: Path) -> list[str]:
    """Command lines of running processes that name ``path`` (data dirs, workspace files)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if str(path) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


@pytest.mark.slow(seconds=180)
def test_dev_runs_the_ui_and_the_sensors_load_the_sample_files_and_sigterm_stops_it(
    tmp_path: Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    root = tmp_path / "dev"
    log = (tmp_path / "dev.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clickstream_pipeline.cli",
            "dev",
            "--root",
            str(root),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        cwd=tmp_path,
        env=outside_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    runs: list[dict[str, str]] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                runs = graphql(port, RUNS_QUERY)["data"]["runsOrError"]["results"]
            except OSError:
                runs = []
            if any(run["status"] == "SUCCESS" for run in runs):
                break
            assert process.poll() is None, "clickstream dev exited early"
            time.sleep(3)
        assert [(r["jobName"], r["status"]) for r in runs] == [("load_partitions_job", "SUCCESS")]
        nodes = graphql(
            port, "{ assetNodes { assetKey { path } partitionStats { numMaterialized } } }"
        )["data"]["assetNodes"]
        materialized = {
            "/".join(node["assetKey"]["path"]): node["partitionStats"]["numMaterialized"]
            for node in nodes
        }
        # The sample: 2 customers x 3 events (a table and its raw files each) x 3 hours.
        assert len(materialized) == 12 and set(materialized.values()) == {3}
        # The stack serves /metrics: the same hours, and the daemon's sensors ticking.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            families = list(text_string_to_metric_families(response.read().decode()))
        samples = [sample for family in families for sample in family.samples]
        loaded = [s for s in samples if s.name == "clickstream_partitions_loaded_total"]
        assert sum(s.value for s in loaded) == 18
        ticks = {
            s.labels["sensor"]: s.value
            for s in samples
            if s.name == "clickstream_sensor_tick_age_seconds"
        }
        assert {"registry_sync_sensor", "s3_discovery_sensor"} <= set(ticks)
        assert all(0 <= age < 120 for age in ticks.values())
        assert processes_under(root)  # PostgreSQL and the three Dagster servers

        # SIGTERM to `clickstream dev` alone, as a supervisor or `kill` sends it.
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()
    assert processes_under(root) == []
    output = (tmp_path / "dev.log").read_text()
    assert "superseded" not in output and "Traceback" not in output
    assert "Dagster UI on http://127.0.0.1:" in output
