"""The tables' assets and the batch job through Dagster, recorded in a real instance."""

from __future__ import annotations

from typing import Any

import dagster as dg

from clickstream_pipeline.assets import TABLES_ASSET
from clickstream_pipeline.batch import LARGE_MIN_BYTES, QUARANTINE_CHECK, load_batch, load_waves
from clickstream_pipeline.jobs import LOAD_JOB, run_config_for
from clickstream_pipeline.layout import hour_key
from clickstream_pipeline.loader import RawStore
from clickstream_pipeline.names import Stream
from clickstream_pipeline.partitions import raw_asset_key, table_asset_key
from clickstream_pipeline.resources import (
    DiscoveryResource,
    S3StorageResource,
    WarehouseResource,
)
from clickstream_pipeline_tests.conftest import list_keys
from clickstream_pipeline_tests.helpers import (
    defs_for,
    load_keys,
    message_ids,
    put_file,
    recent_hour,
    record,
)

H1, H2, H3 = recent_hour(3), recent_hour(2), recent_hour(1)
RESOURCES = {
    "s3": S3StorageResource(),
    "warehouse": WarehouseResource(),
    "discovery": DiscoveryResource(),
}


def materialize(
    instance: dg.DagsterInstance, streams: list[Stream], **partitions: str
) -> dg.ExecuteInProcessResult:
    """Materialize the tables of ``streams`` as the UI does, for one hour or a range of hours."""
    defs = defs_for(*streams)
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={table_asset_key(stream) for stream in streams}
    )
    if "partition_key" in partitions:
        return job.execute_in_process(instance=instance, partition_key=partitions["partition_key"])
    return job.execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": partitions["start"],
            "dagster/asset_partition_range_end": partitions["end"],
        },
    )


def test_materializing_a_table_hour_loads_it_with_metadata_and_check(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    stream = Stream(customer, "page_view")
    put_file(
        pipeline["CLICKSTREAM_BUCKET"],
        stream,
        H1,
        "a",
        [record("m1", H1, path="/"), record("m1", H1), b"not json", record("m2", H1)],
    )

    result = materialize(instance, [stream], partition_key=hour_key(H1))

    assert result.success
    raw, loaded = result.asset_materializations_for_node(TABLES_ASSET)
    assert (raw.asset_key, raw.partition) == (raw_asset_key(stream), hour_key(H1))
    assert raw.metadata["files"] == dg.IntMetadataValue(1)
    assert (loaded.asset_key, loaded.partition) == (table_asset_key(stream), hour_key(H1))
    metadata = {k: v.value for k, v in loaded.metadata.items()}
    assert {
        k: metadata[k]
        for k in (
            "dagster/table_name",
            "dagster/row_count",
            "dagster/partition_row_count",
            "files",
            "records_read",
            "rows_loaded",
            "duplicates_dropped",
            "quarantined",
            "new_columns",
            "unchanged",
        )
    } == {
        "dagster/table_name": f"{customer}.page_view",
        "dagster/row_count": 2,
        "dagster/partition_row_count": 2,
        "files": 1,
        "records_read": 4,
        "rows_loaded": 2,
        "duplicates_dropped": 1,
        "quarantined": 1,
        "new_columns": ["path"],
        "unchanged": False,
    }
    schema = loaded.metadata["dagster/column_schema"].value
    assert isinstance(schema, dg.TableSchema)
    assert [(c.name, c.type) for c in schema.columns][-1] == ("path", "text")
    [check] = result.get_asset_check_evaluations()
    assert (check.asset_key, check.check_name, check.partition, check.passed) == (
        table_asset_key(stream),
        QUARANTINE_CHECK,
        hour_key(H1),
        False,
    )
    assert sorted(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == ["m1", "m2"]


def test_a_range_of_hours_loads_only_the_hours_with_new_files(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    a, b = Stream(customer, "page_view"), Stream(customer, "signup")
    put_file(bucket, a, H1, "a", [record("a1", H1), record("a2", H1)])
    put_file(bucket, a, H3, "a", [record("a3", H3)])
    put_file(bucket, b, H2, "a", [record("b1", H2)])

    first = materialize(instance, [a, b], start=hour_key(H1), end=hour_key(H3))
    # The same range again: every hour is loaded with the same files, so nothing is done.
    again = materialize(instance, [a, b], start=hour_key(H1), end=hour_key(H3))

    assert first.success and again.success
    assert instance.get_materialized_partitions(table_asset_key(a)) == {hour_key(H1), hour_key(H3)}
    assert instance.get_materialized_partitions(table_asset_key(b)) == {hour_key(H2)}
    assert again.asset_materializations_for_node(TABLES_ASSET) == []
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    assert sorted(message_ids(url, a)) == ["a1", "a2", "a3"]
    assert sorted(message_ids(url, b)) == ["b1"]


def test_batch_job_reports_each_table_hour_on_its_own(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    good, bad = Stream(customer, "page_view"), Stream(customer, "signup")
    put_file(bucket, good, H1, "a", [record("g1", H1), record("g2", H1)])
    put_file(bucket, good, H2, "a", [record("g3", H2)])
    put_file(bucket, bad, H1, "a", [record("b1", H1), b"{oops"])
    keys = load_keys((good, H1), (good, H2), (bad, H1))
    job = defs_for(good, bad).get_job_def(LOAD_JOB)

    result = job.execute_in_process(
        run_config=run_config_for(keys, concurrency=2), instance=instance
    )

    assert result.success
    assert instance.get_materialized_partitions(table_asset_key(good)) == {
        hour_key(H1),
        hour_key(H2),
    }
    assert instance.get_materialized_partitions(table_asset_key(bad)) == {hour_key(H1)}
    # The sensor reports raw hours itself: a batch run does only when told to.
    assert instance.get_materialized_partitions(raw_asset_key(good)) == set()
    checks = {(c.asset_key, c.partition): c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {
        (table_asset_key(good), hour_key(H1)): True,
        (table_asset_key(good), hour_key(H2)): True,
        (table_asset_key(bad), hour_key(H1)): False,
    }

    # A second run over the same partitions loads nothing and records nothing new.
    again = job.execute_in_process(run_config=run_config_for(keys), instance=instance)
    assert again.output_for_node("load_partitions") == 0
    assert again.asset_materializations_for_node("load_partitions") == []


def test_an_unreachable_warehouse_is_one_clear_error(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])
    unreachable = WarehouseResource(url="postgresql://nobody:s3cret@/x?host=/nonexistent")
    store: RawStore = S3StorageResource().store()

    result = load_batch(
        dg.build_op_context(instance=instance),
        load_keys((stream, H1)),
        store,
        unreachable.warehouse(),
        concurrency=1,
    )

    assert (result.requested, result.loaded, result.transient) == (1, 0, True)
    [message] = result.failures.values()
    assert message.startswith(
        "ServiceUnavailable: cannot connect to the warehouse: connection to server on socket"
    )
    assert "\n" not in message and "s3cret" not in message


def test_each_partition_load_logs_one_structured_json_line(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    import json

    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1), b"{bad"])

    result = (
        defs_for(stream)
        .get_job_def(LOAD_JOB)
        .execute_in_process(run_config=run_config_for(load_keys((stream, H1))), instance=instance)
    )

    lines = [
        json.loads(entry.user_message)
        for entry in instance.all_logs(result.run_id)
        if entry.user_message.startswith('{"event":"partition_load"')
    ]
    [line] = lines
    assert {k: v for k, v in line.items() if k != "seconds"} == {
        "event": "partition_load",
        "stream": str(stream),
        "hour": H1.isoformat(),
        "run_id": result.run_id,
        "outcome": "loaded",
        "files": 1,
        "bytes": line["bytes"],
        "records": 2,
        "rows": 1,
        "duplicates": 0,
        "quarantined": 1,
        "new_columns": [],
    }
    assert line["bytes"] > 0 and line["seconds"] >= 0


def test_a_batch_loads_its_smallest_partitions_first(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    heavy, light = Stream(customer, "page_view"), Stream(customer, "signup")
    put_file(bucket, heavy, H1, "a", [record(f"h{i}", H1, n=i) for i in range(3_000)])
    put_file(bucket, light, H1, "a", [record("l1", H1)])
    put_file(bucket, light, H2, "a", [record("l2", H2)])
    keys = load_keys((heavy, H1), (light, H1), (light, H2))

    result = (
        defs_for(heavy, light)
        .get_job_def(LOAD_JOB)
        .execute_in_process(run_config=run_config_for(keys, concurrency=1), instance=instance)
    )

    loaded = [
        (m.asset_key, m.partition)
        for m in result.asset_materializations_for_node("load_partitions")
    ]
    assert set(loaded[:2]) == {
        (table_asset_key(light), hour_key(H1)),
        (table_asset_key(light), hour_key(H2)),
    }
    assert loaded[2] == (table_asset_key(heavy), hour_key(H1))


def test_partitions_far_larger_than_the_batch_wait_for_the_rest() -> None:
    big = 10 * LARGE_MIN_BYTES
    sizes = {"a": 900, "b": 1_000, "c": 0, "d": 1_100, "heavy": big, "heavier": 2 * big}

    assert load_waves(sizes) == [["c", "a", "b", "d"], ["heavy", "heavier"]]


def test_a_batch_of_alike_or_small_partitions_is_one_wave() -> None:
    # Ten times the median is the bar, and nothing under LARGE_MIN_BYTES is ever held back.
    alike = {"a": 5 * LARGE_MIN_BYTES, "b": 40 * LARGE_MIN_BYTES, "c": 6 * LARGE_MIN_BYTES}
    small = {"a": 0, "b": 0, "c": LARGE_MIN_BYTES}

    assert load_waves(alike) == [["a", "c", "b"]]
    assert load_waves(small) == [["a", "b", "c"]]
    assert load_waves({}) == []


def test_the_s3_resource_is_dagsters_own_with_the_loaders_client_settings(
    pipeline: dict[str, str],
) -> None:
    from botocore import UNSIGNED
    from dagster_aws.s3 import S3Resource

    # Configured as Dagster's S3Resource is; the client keeps adaptive retries and timeouts.
    resource = S3StorageResource(region_name="eu-west-1", max_attempts=3)
    assert isinstance(resource, S3Resource)
    client = resource.get_client()
    config: Any = client.meta.config  # botocore sets these attributes at run time
    assert client.meta.region_name == "eu-west-1"
    assert config.retries == {"mode": "adaptive", "total_max_attempts": 4}
    assert (config.connect_timeout, config.read_timeout) == (10.0, 60.0)
    assert config.max_pool_connections == 32
    unsigned: Any = S3StorageResource(use_unsigned_session=True).get_client().meta.config
    assert unsigned.signature_version is UNSIGNED

    # Unset fields fall back to the environment: the bucket, and the endpoint it is served at.
    store = S3StorageResource().store()
    assert store.bucket == pipeline["CLICKSTREAM_BUCKET"]
    store.client.put_object(Bucket=store.bucket, Key="raw/probe", Body=b"x")
    assert list_keys(store.bucket, "raw/") == ["raw/probe"]
