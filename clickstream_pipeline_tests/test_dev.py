"""`clickstream dev`: the embedded stack, the Dagster UI and the daemon, sensors loading files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from clickstream_pipeline_tests.helpers import free_port, outside_env

RUNS_QUERY = "{ runsOrError { ... on Runs { results { status jobName } } } }"


def graphql(port: int, query: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_dev_runs_the_ui_and_the_sensors_load_the_sample_files(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clickstream_pipeline.cli",
            "dev",
            "--root",
            str(tmp_path),
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=outside_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
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
        materialized = graphql(
            port,
            '{ assetNodeOrError(assetKey: {path: ["warehouse_events"]}) { ... on AssetNode '
            "{ partitionStats { numMaterialized } } } }",
        )["data"]["assetNodeOrError"]["partitionStats"]["numMaterialized"]
        # The sample: 2 customers x 3 events x 3 completed hours.
        assert materialized == 18
    finally:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(60)
