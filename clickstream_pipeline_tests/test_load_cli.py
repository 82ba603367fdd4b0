"""`clickstream load` and `clickstream demo` as a user runs them: subprocesses, real servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from clickstream_pipeline.layout import hour_key
from clickstream_pipeline.loader import RawStore, load_partition
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import raw_asset_key, table_asset_key
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse.postgres import PostgresWarehouse
from clickstream_pipeline_tests.helpers import (
    materialize_tables,
    message_ids,
    new_database,
    outside_env,
    put_file,
    query,
    recent_hour,
    record,
    run_cli,
)

H1, H2 = recent_hour(3), recent_hour(2)


def test_load_records_runs_in_dagster_home_and_a_second_load_changes_nothing(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    stream = Stream(customer, "page_view")
    YamlFileRegistry(registry_path).save(Registry().with_streams([stream]))
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    put_file(bucket, stream, H1, "a", [record("m1", H1), record("m2", H1), record("m1", H1)])
    put_file(bucket, stream, H2, "a", [record("m3", H2), b"{bad"])
    env = {**pipeline, "DAGSTER_HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()

    first = run_cli("load", "--grace-minutes", "0", env=env)

    assert first.returncode == 0, first.stderr
    assert (
        f"│ {stream} │     2 │     2 │       5 │           3 │                  1 │           1 │"
        in first.stdout
    )
    assert "2 of 2 partitions loaded in 1 runs" in first.stdout
    assert sorted(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == ["m1", "m2", "m3"]
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        hours = {hour_key(H1), hour_key(H2)}
        assert instance.get_materialized_partitions(table_asset_key(stream)) == hours
        assert instance.get_materialized_partitions(raw_asset_key(stream)) == hours

    second = run_cli("load", "--grace-minutes", "0", env=env)
    assert (second.returncode, second.stdout) == (
        0,
        "nothing to load: every completed hour is up to date\n",
    )


def test_load_with_the_warehouse_down_is_one_line_and_exit_1(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    YamlFileRegistry(registry_path).save(Registry().with_streams([Stream(customer, "page_view")]))
    env = {
        **pipeline,
        "DAGSTER_HOME": str(tmp_path),
        "CLICKSTREAM_WAREHOUSE_URL": "postgresql://loader:s3cret@/x?host=/nonexistent",
    }
    result = run_cli("load", env=env)
    assert result.returncode == 1
    # Dagster may warn first about DAGSTER_HOME having no dagster.yaml; the error is one line.
    last = result.stderr.splitlines()[-1]
    assert last.startswith("clickstream: error: cannot connect to the warehouse: ")
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


def test_demo_prints_the_summary_and_proves_exact_counts(tmp_path: Path) -> None:
    args = f"demo --root {tmp_path} --customers 2 --events 2 --hours 2 --events-per-file 300"
    result = subprocess.run(
        [sys.executable, "-m", "clickstream_pipeline.cli", *args.split()],
        capture_output=True,
        text=True,
        env=outside_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "clickstream demo: warehouse tables" in result.stdout
    assert "a third load found 0 to do" in result.stdout
    assert result.stdout.rstrip().endswith(
        "every table holds exactly the unique valid events: nothing lost, nothing twice"
    )


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("hours", ["--partition", "--partition-range"])
def test_dagster_asset_materialize_loads_a_customers_tables(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str, hours: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    views, signups = Stream(customer, "page_view"), Stream(customer, "signup")
    other = Stream(f"{customer}x", "page_view")
    YamlFileRegistry(registry_path).save(Registry().with_streams([views, signups, other]))
    put_file(bucket, views, H1, "a", [record("m1", H1), record("m2", H1)])
    put_file(bucket, views, H2, "a", [record("m3", H2)])
    put_file(bucket, signups, H2, "a", [record("s1", H2)])
    put_file(bucket, other, H1, "a", [record("o1", H1)])
    home = tmp_path / "home"
    home.mkdir()
    partition = hour_key(H1) if hours == "--partition" else f"{hour_key(H1)}...{hour_key(H2)}"

    result = materialize_tables(
        f"group:{customer}", hours, partition, env={**pipeline, "DAGSTER_HOME": str(home)}
    )

    assert result.returncode == 0, result.stderr[-2000:]
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    ranged = hours == "--partition-range"
    assert sorted(message_ids(url, views)) == (["m1", "m2", "m3"] if ranged else ["m1", "m2"])
    assert query(url, "SELECT to_regclass(%s)", (f'"{other.customer}"."page_view"',)) == [(None,)]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_materialized_partitions(table_asset_key(views)) == (
            {hour_key(H1), hour_key(H2)} if ranged else {hour_key(H1)}
        )
        assert instance.get_materialized_partitions(table_asset_key(signups)) == (
            {hour_key(H2)} if ranged else set()
        )


@pytest.mark.slow(seconds=55)
def test_import_history_shows_ledger_hours_as_materialized_once(
    pipeline: dict[str, str], tmp_path: Path, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    url = new_database(pipeline["CLICKSTREAM_WAREHOUSE_URL"], "history")  # a ledger of its own
    # Loaded before tables were assets: in the ledger, not in this Dagster instance.
    views, removed = Stream(customer, "page_view"), Stream(customer, "gone")
    store = RawStore(s3_client(), bucket, "raw")
    for stream, hour in ((views, H1), (views, H2), (removed, H1)):
        put_file(bucket, stream, hour, "a", [record(f"{stream.event}{hour:%H}", hour)])
        load_partition(store, PostgresWarehouse(url), stream, hour)
    home = tmp_path / "home"
    home.mkdir()
    env = {**pipeline, "DAGSTER_HOME": str(home), "CLICKSTREAM_WAREHOUSE_URL": url}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(table_asset_key(views), partition=hour_key(H2))
        )

    first = run_cli("import-history", env=env)
    again = run_cli("import-history", env=env)

    assert first.returncode == 0, first.stderr
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_materialized_partitions(table_asset_key(views)) == {
            hour_key(H1),
            hour_key(H2),
        }
        assert instance.get_materialized_partitions(table_asset_key(removed)) == {hour_key(H1)}
        [event] = instance.fetch_materializations(table_asset_key(removed), limit=5).records
        metadata = event.asset_materialization.metadata  # type: ignore[union-attr]
        assert metadata["rows_loaded"] == dg.IntMetadataValue(1)
    assert first.stdout == (
        "2 loaded hours of 2 tables reported as materialized (1 already materialized)\n"
    )
    assert again.stdout == (
        "0 loaded hours of 2 tables reported as materialized (3 already materialized)\n"
    )
