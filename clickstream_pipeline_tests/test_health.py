"""`clickstream health` against real servers: up, stopped, back."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from clickstream_pipeline.local import LocalStack
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline_tests.helpers import free_port, outside_env


def health(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clickstream_pipeline.cli", "health", *args],
        capture_output=True,
        text=True,
        env={**outside_env(), **env, "AWS_MAX_ATTEMPTS": "1"},
        timeout=120,
    )


def test_health_fails_while_the_warehouse_is_stopped_and_passes_when_it_is_back(
    tmp_path: Path,
) -> None:
    port = free_port()
    stack = LocalStack(tmp_path, bucket="health-check", s3_port=port)
    started = stack.start()
    # A deployment that does not run vortex: no stream configured, no vortex line.
    env = {k: v for k, v in started.items() if k != "CLICKSTREAM_KINESIS_STREAM"}
    YamlFileRegistry(env["CLICKSTREAM_REGISTRY"]).save(
        Registry.from_mapping({"acme": ["page_view"]})
    )
    try:
        up = health(env, "--no-daemon")
        assert up.returncode == 0, up.stderr
        assert "│ warehouse │ up    │ accepting connections" in up.stdout
        assert "1 streams in" in up.stdout

        stack.stop()
        down = health(env, "--no-daemon")
        assert down.returncode == 1
        assert "│ warehouse │ DOWN  │ cannot connect to the warehouse:" in down.stdout
        assert down.stderr.splitlines()[-1] == "clickstream: error: down: s3, warehouse"

        assert stack.start() == started  # the same socket and port: a restart, not a new stack
        back = health(env, "--no-daemon")
        assert back.returncode == 0, back.stdout
    finally:
        stack.stop()


@pytest.mark.slow(seconds=80)
def test_health_requires_a_daemon_heartbeat(local_stack: dict[str, str], tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    registry = tmp_path / "registry.yaml"
    YamlFileRegistry(registry).save(Registry())
    env = {**local_stack, "DAGSTER_HOME": str(home), "CLICKSTREAM_REGISTRY": str(registry)}
    env.pop("CLICKSTREAM_KINESIS_STREAM")

    without = health(env)
    assert without.returncode == 1
    assert "DOWN" in without.stdout and "no recent heartbeat from" in without.stdout

    daemon = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-daemon"),
            "run",
            "-m",
            "clickstream_pipeline.definitions",
        ],
        env={**outside_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Wait in this process (a `clickstream health` a poll would spend seconds starting),
        # then ask the command once.
        deadline = time.monotonic() + 90
        with dg.DagsterInstance.from_config(str(home)) as instance:
            while time.monotonic() < deadline:
                statuses = instance.get_daemon_statuses()
                if statuses and all(status.healthy for status in statuses.values()):
                    break
                time.sleep(1)
        result = health(env)
        assert result.returncode == 0, result.stdout
        assert "│ dagster daemon │ up    │" in result.stdout
    finally:
        daemon.terminate()
        daemon.wait(60)
