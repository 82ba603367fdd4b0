"""`clickstream backfill`: any range of hours, beyond the sensors' lookback, run here or queued."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import dagster as dg

from clickstream_pipeline.layout import hour_key
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import raw_asset_key, table_asset_key
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline_tests.helpers import (
    free_port,
    message_ids,
    put_file,
    query,
    recent_hour,
    record,
    run_cli,
)

OLD = recent_hour(50)  # far beyond the discovery sensor's 24-hour lookback


def _setup(pipeline: dict[str, str], registry_path: Path, customer: str) -> tuple[Stream, Stream]:
    views, signups = Stream(customer, "page_view"), Stream(customer, "signup")
    YamlFileRegistry(registry_path).save(Registry().with_streams([views, signups]))
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    for offset, name in ((0, "a"), (1, "b"), (3, "c")):
        hour = OLD + timedelta(hours=offset)
        copies = [record(f"v{offset}", hour), record(f"v{offset}", hour)]
        put_file(bucket, views, hour, name, copies)
    put_file(bucket, signups, OLD, "a", [record("s0", OLD)])
    return views, signups


def test_backfill_loads_the_range_of_the_streams_asked_for_and_then_nothing(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    views, signups = _setup(pipeline, registry_path, customer)
    env = {**pipeline, "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    since, until = f"{OLD:%Y-%m-%dT%H}", f"{OLD + timedelta(hours=2):%Y-%m-%dT%H}"
    args = ("backfill", "--since", since, "--until", until, "--stream", str(views))

    first = run_cli(*args, env=env)

    assert first.returncode == 0, first.stderr
    row = f"│ {views} │     2 │     2 │       4 │           2 │                  2 │"
    assert row in first.stdout
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    assert message_ids(url, views) == {"v0": OLD, "v1": OLD + timedelta(hours=1)}
    assert query(url, "SELECT to_regclass(%s)", (f'"{signups.customer}"."signup"',)) == [(None,)]
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        [run] = instance.get_runs()
        assert run.tags["clickstream/source"] == "clickstream backfill"
        hours = {hour_key(OLD), hour_key(OLD + timedelta(hours=1))}
        assert instance.get_materialized_partitions(table_asset_key(views)) == hours
        assert instance.get_materialized_partitions(raw_asset_key(views)) == hours
    again = run_cli(*args, env=env)
    assert (again.returncode, again.stdout) == (
        0,
        "nothing to load: every completed hour is up to date\n",
    )


def test_backfill_mistakes_are_one_line(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    views, _ = _setup(pipeline, registry_path, customer)
    env = {**pipeline, "DAGSTER_HOME": str(tmp_path)}
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    cases = {
        ("--since", "yesterday"): "error: --since: not an hour such as 2026-11-25T00: 'yesterday'",
        ("--since", "2026-11-25T05", "--until", "2026-11-25T05"): (
            "error: --until (2026-11-25T05) must be after --since"
        ),
        ("--since", "2024-12-31T23"): (
            "error: --since is before the first partition hour, 2025-01-01 00:00:00+00:00"
        ),
        ("--since", f"{OLD:%Y-%m-%dT%H}", "--stream", f"{customer}.nope"): (
            f"error: not in the registry: {customer}.nope"
        ),
        ("--since", f"{OLD:%Y-%m-%dT%H}", "--stream", str(views), "--submit", "127.0.0.1:9"): (
            "error: cannot reach the Dagster webserver at 127.0.0.1:9: [Errno 111] Connection "
            "refused"
        ),
    }
    for args, message in cases.items():
        result = run_cli("backfill", *args, env=env)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.strip().startswith(f"clickstream: {message}"), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_backfill_submit_launches_a_dagster_backfill_of_the_tables(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    views, signups = _setup(pipeline, registry_path, customer)
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**pipeline, "DAGSTER_HOME": str(home)}
    port = free_port()
    webserver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagster_webserver",
            "-m",
            "clickstream_pipeline.definitions",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the webserver did not start"
                time.sleep(0.5)

        result = run_cli(
            "backfill",
            "--since",
            f"{OLD:%Y-%m-%dT%H}",
            "--until",
            f"{OLD + timedelta(hours=4):%Y-%m-%dT%H}",
            "--submit",
            f"http://127.0.0.1:{port}",
            env=env,
        )
    finally:
        webserver.terminate()
        webserver.wait(timeout=30)

    assert result.returncode == 0, result.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [backfill] = instance.get_backfills()
    assert result.stdout == (
        f"launched backfill {backfill.backfill_id} of 2 tables x 4 hours on "
        f"http://127.0.0.1:{port}; its run loads the hours whose files are new or changed\n"
    )
    assert backfill.tags["clickstream/source"] == "clickstream backfill"
    target = backfill.asset_backfill_data.target_subset  # type: ignore[union-attr]
    assert target.asset_keys == {table_asset_key(views), table_asset_key(signups)}
    hours = {hour_key(OLD + timedelta(hours=h)) for h in range(4)}
    for table in (views, signups):
        assert (
            set(target.get_partitions_subset(table_asset_key(table)).get_partition_keys()) == hours
        )
