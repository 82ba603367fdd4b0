"""Tables as assets in a running deployment: a real code server (`dagster code-server start`),
`dagster-webserver` and `dagster-daemon` on the embedded stack. A backfill launched as the UI
launches it, and one from the `dagster` CLI, load exact rows; a registry change reloads the code
location without a restart; a run in flight survives the removal of its table."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import psycopg2
import pytest
from dagster._core.execution.backfill import BulkActionStatus

from clickstream_pipeline.layout import hour_key
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import table_asset_key
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.webserver import launch_backfill
from clickstream_pipeline_tests.helpers import (
    attempt,
    deployment,
    materialize_tables,
    message_ids,
    put_file,
    recent_hour,
    record,
    run_cli,
    wait_for,
)

T = TypeVar("T")
OLD = recent_hour(60)  # beyond the discovery sensor's 24-hour lookback: only backfills load it
HISTORY_QUERY = """{ assetOrError(assetKey: $k) {
  ... on Asset { assetMaterializations { partition } definition { id } } } }"""


def finished_backfill(instance: dg.DagsterInstance, backfill_id: str) -> Any:
    backfill = instance.get_backfill(backfill_id)
    runs = list(instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id})))
    done = backfill is not None and backfill.status != BulkActionStatus.REQUESTED
    return (backfill, runs) if done and runs and all(r.is_finished for r in runs) else None


def write_hours(bucket: str, streams: list[Stream], hours: list[datetime]) -> dict[str, list[str]]:
    """Each (table, hour): one message twice and one more; the ids each table must hold."""
    expected: dict[str, list[str]] = {}
    for stream in streams:
        for hour in hours:
            first, second = f"{stream.event}-{hour:%d%H}", f"x-{hour:%d%H}"
            put_file(bucket, stream, hour, "a", [record(first, hour)] * 2 + [record(second, hour)])
            expected.setdefault(stream.key, []).extend([first, second])
    return {key: sorted(ids) for key, ids in expected.items()}


@pytest.mark.slow(seconds=300)
def test_backfills_reloads_and_removals_in_a_running_deployment(
    pipeline: dict[str, str],
    registry_path: Path,
    tmp_path: Path,
    customer: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    streams = [Stream(customer, event) for event in ("add_to_cart", "page_view", "signup")]
    registry = YamlFileRegistry(registry_path)
    registry.save(Registry().with_streams(streams))

    with deployment(tmp_path, monkeypatch) as services, dg.DagsterInstance.get() as instance:
        assert services.asset_keys() >= {f"{s.customer}/{s.event}" for s in streams}
        # Once the sensor has listed the new tables (empty), it looks back 24 hours only.
        wait_for(
            lambda: services.sensor_ticked("s3_discovery_sensor"),
            "the discovery sensor's first tick",
        )

        # 1. A backfill as the UI's "Materialize" dialog launches it: 3 tables x 3 hours.
        hours = [OLD + timedelta(hours=n) for n in range(3)]
        expected = write_hours(bucket, streams, hours)
        backfill_id = launch_backfill(
            services.url,
            [table_asset_key(s) for s in streams],
            [hour_key(h) for h in hours],
            title="test",
            tags={},
        )
        backfill, [run] = wait_for(lambda: finished_backfill(instance, backfill_id), "backfill")
        assert (backfill.status, run.status) == (
            BulkActionStatus.COMPLETED_SUCCESS,
            dg.DagsterRunStatus.SUCCESS,
        )
        for stream in streams:
            assert sorted(message_ids(url, stream)) == expected[stream.key]
            records = instance.fetch_materializations(table_asset_key(stream), limit=10).records
            assert sorted(str(r.partition_key) for r in records) == [hour_key(h) for h in hours]
            assert {r.run_id for r in records} == {run.run_id}

        # 2. The same from the `dagster` CLI, for the customer's group over three more hours.
        more = [OLD - timedelta(hours=n) for n in (3, 2, 1)]
        expected_more = write_hours(bucket, streams, more)
        cli = materialize_tables(
            f"group:{customer}",
            "--partition-range",
            f"{hour_key(more[0])}...{hour_key(more[-1])}",
        )
        assert cli.returncode == 0, cli.stderr[-2000:]
        for stream in streams:
            assert sorted(message_ids(url, stream)) == sorted(
                expected[stream.key] + expected_more[stream.key]
            )

        # 3. A registry add becomes an asset through a reload, and its files load.
        added = Stream(customer, "checkout")
        assert run_cli("registry", "add", customer, "checkout").returncode == 0
        wait_for(
            lambda: f"{customer}/checkout" in services.asset_keys(), "the new table", timeout=120
        )
        recent = recent_hour(3)
        put_file(bucket, added, recent, "a", [record("c1", recent), record("c2", recent)])
        wait_for(lambda: attempt(lambda: message_ids(url, added)), "the new table's rows")
        assert sorted(message_ids(url, added)) == ["c1", "c2"]

        # 4. A run of a table removed while it runs finishes: its worker rebuilds the tables
        # of the code server that launched it. The load waits on a lock until the reload.
        signup = streams[2]
        put_file(bucket, signup, hours[0], "late", [record("late", hours[0])])
        blocker = psycopg2.connect(url)
        try:
            with blocker.cursor() as cur:
                cur.execute(f'LOCK TABLE "{customer}"."signup" IN ACCESS EXCLUSIVE MODE')
            removal_id = launch_backfill(
                services.url, [table_asset_key(signup)], [hour_key(hours[0])], "test", {}
            )
            wait_for(
                lambda: [
                    r
                    for r in instance.get_runs(
                        dg.RunsFilter(
                            tags={"dagster/backfill": removal_id},
                            statuses=[dg.DagsterRunStatus.STARTED],
                        )
                    )
                ],
                "the run to start",
            )
            assert run_cli("registry", "remove", customer, "signup").returncode == 0
            wait_for(
                lambda: f"{customer}/signup" not in services.asset_keys(), "the reload", timeout=120
            )
        finally:
            blocker.rollback()
            blocker.close()
        [removed_run] = wait_for(
            lambda: [
                r
                for r in instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": removal_id}))
                if r.is_finished
            ],
            "the run to finish",
        )
        assert removed_run.status == dg.DagsterRunStatus.SUCCESS
        assert "late" in message_ids(url, signup)
        # Its history stays browsable; it is no longer defined.
        history = services.graphql(
            HISTORY_QUERY.replace("$k", f'{{path: ["{customer}", "signup"]}}')
        )["assetOrError"]
        assert history["definition"] is None
        assert len(history["assetMaterializations"]) == 7  # 6 hours, then the late file
