"""The assets and the batch job through Dagster, recorded in a real instance."""

from __future__ import annotations

from datetime import datetime

import dagster as dg
import pytest

from clickstream_pipeline.assets import QUARANTINE_CHECK, raw_events, warehouse_events
from clickstream_pipeline.definitions import defs
from clickstream_pipeline.errors import ServiceUnavailable
from clickstream_pipeline.jobs import LARGE_MIN_BYTES, LOAD_JOB, load_waves, run_config_for
from clickstream_pipeline.names import Stream
from clickstream_pipeline.resources import S3StorageResource, WarehouseResource
from clickstream_pipeline_tests.helpers import message_ids, put_file, recent_hour, record

H1, H2 = recent_hour(3), recent_hour(2)
RESOURCES = {"s3": S3StorageResource(), "warehouse": WarehouseResource()}


def key(stream: Stream, hour: datetime) -> str:
    return f"{hour:%Y-%m-%d-%H}:00|{stream}"


def test_materializing_one_partition_loads_it_with_metadata_and_check(
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
    instance.add_dynamic_partitions("stream", [str(stream)])

    result = dg.materialize(
        [raw_events, warehouse_events],
        partition_key=key(stream, H1),
        instance=instance,
        resources=RESOURCES,
    )

    assert result.success
    [raw] = result.asset_materializations_for_node("raw_events")
    [loaded] = result.asset_materializations_for_node("warehouse_events")
    assert raw.metadata["files"] == dg.IntMetadataValue(1)
    metadata = {k: v.value for k, v in loaded.metadata.items()}
    assert {
        k: metadata[k]
        for k in (
            "files",
            "records_read",
            "rows_loaded",
            "duplicates_dropped",
            "quarantined",
            "new_columns",
            "unchanged",
        )
    } == {
        "files": 1,
        "records_read": 4,
        "rows_loaded": 2,
        "duplicates_dropped": 1,
        "quarantined": 1,
        "new_columns": ["path"],
        "unchanged": False,
    }
    [check] = result.get_asset_check_evaluations()
    assert (check.check_name, check.passed) == (QUARANTINE_CHECK, False)
    assert sorted(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == ["m1", "m2"]


def test_batch_job_reports_each_partition_on_its_own(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    good, bad = Stream(customer, "page_view"), Stream(customer, "signup")
    put_file(bucket, good, H1, "a", [record("g1", H1), record("g2", H1)])
    put_file(bucket, good, H2, "a", [record("g3", H2)])
    put_file(bucket, bad, H1, "a", [record("b1", H1), b"{oops"])
    instance.add_dynamic_partitions("stream", [str(good), str(bad)])
    keys = [key(good, H1), key(good, H2), key(bad, H1)]

    result = defs.get_job_def(LOAD_JOB).execute_in_process(
        run_config=run_config_for(keys, concurrency=2), instance=instance
    )

    assert result.success
    materialized = instance.get_materialized_partitions(dg.AssetKey("warehouse_events"))
    assert materialized == set(keys)
    assert instance.get_materialized_partitions(dg.AssetKey("raw_events")) == set(keys)
    checks = {c.partition: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {key(good, H1): True, key(good, H2): True, key(bad, H1): False}

    # A second run over the same partitions loads nothing and records nothing new.
    again = defs.get_job_def(LOAD_JOB).execute_in_process(
        run_config=run_config_for(keys), instance=instance
    )
    assert again.output_for_node("load_partitions") == 0
    assert again.asset_materializations_for_node("load_partitions") == []


def test_an_unreachable_warehouse_is_one_clear_error(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1)])
    instance.add_dynamic_partitions("stream", [str(stream)])
    context = dg.build_asset_context(partition_key=key(stream, H1), instance=instance)
    unreachable = WarehouseResource(url="postgresql://nobody:s3cret@/x?host=/nonexistent")

    with pytest.raises(ServiceUnavailable) as raised:
        warehouse_events(context, s3=S3StorageResource(), warehouse=unreachable)

    message = str(raised.value)
    assert message.startswith("cannot connect to the warehouse: connection to server on socket")
    assert "\n" not in message and "s3cret" not in message


def test_each_partition_load_logs_one_structured_json_line(
    pipeline: dict[str, str], instance: dg.DagsterInstance, customer: str
) -> None:
    import json

    stream = Stream(customer, "page_view")
    put_file(pipeline["CLICKSTREAM_BUCKET"], stream, H1, "a", [record("m1", H1), b"{bad"])
    instance.add_dynamic_partitions("stream", [str(stream)])

    result = defs.get_job_def(LOAD_JOB).execute_in_process(
        run_config=run_config_for([key(stream, H1)]), instance=instance
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
    instance.add_dynamic_partitions("stream", [str(heavy), str(light)])
    keys = [key(heavy, H1), key(light, H1), key(light, H2)]

    result = defs.get_job_def(LOAD_JOB).execute_in_process(
        run_config=run_config_for(keys, concurrency=1), instance=instance
    )

    loaded = [
        m.partition
        for m in result.asset_materializations_for_node("load_partitions")
        if m.asset_key == dg.AssetKey("warehouse_events")
    ]
    assert set(loaded[:2]) == {key(light, H1), key(light, H2)}
    assert loaded[2] == key(heavy, H1)


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
