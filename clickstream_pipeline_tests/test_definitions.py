from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg

from clickstream_pipeline.definitions import defs

ROOT = Path(__file__).resolve().parents[1]


def test_definitions_load() -> None:
    assert isinstance(defs, dg.Definitions)
    dg.Definitions.validate_loadable(defs)


def test_dagster_validates_the_workspace() -> None:
    result = subprocess.run(
        [
            Path(sys.executable).parent / "dagster",
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Validation successful" in result.stdout + result.stderr


def test_every_warehouse_writer_is_in_the_warehouse_pool() -> None:
    # The production instance limits this pool (deploy/dagster.yaml concurrency.pools).
    job = defs.get_job_def("load_partitions_job")
    assert [node.definition.pools for node in job.graph.node_dict.values()] == [{"warehouse"}]
    assert defs.get_assets_def("warehouse_events").op.pool == "warehouse"
