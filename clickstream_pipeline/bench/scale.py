"""Scale: 2,000 streams with history — definitions load, a registry-sync tick, discovery ticks
with 2,000 new files (and the S3 requests they send), the UI's partition-status queries, and a
one-day backfill of every stream submitted through the GraphQL API as ``clickstream backfill
--submit`` does (Dagster's own asset backfill validates against the whole partition space; see
docs/design.md)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from clickstream_pipeline.bench.common import StackProcess, run_measured, stack_process
from clickstream_pipeline.generator import GeneratorSpec, generate_files, write_files
from clickstream_pipeline.layout import hour_floor, hour_key
from clickstream_pipeline.metrics import s3_requests
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.s3 import s3_client

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

MODULE = "clickstream_pipeline.bench.scale"
T = TypeVar("T")

STATS_QUERY = """query Q($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
  partitionStats { numMaterialized numPartitions numFailed numMaterializing } } } }"""
HEALTH_QUERY = """query Q($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
  id partitionKeysByDimension { name type partitionKeys }
  assetPartitionStatuses { ... on MultiPartitionStatuses { primaryDimensionName ranges {
    primaryDimStartKey primaryDimEndKey secondaryDim {
      ... on DefaultPartitionStatuses { materializedPartitions failedPartitions }
      ... on TimePartitionStatuses { ranges { status startKey endKey } } } } } } } } }"""


def _timed(action: Callable[[], T]) -> tuple[T, float]:
    began = time.perf_counter()
    value = action()
    return value, round(time.perf_counter() - began, 3)


def _listed(action: Callable[[], T], server: StackProcess | None) -> tuple[T, dict[str, Any]]:
    """Run a listing step: its wall time, and the CPU it cost here and in the local S3 server
    (which bounds listing on this machine; see the report), None for S3 itself."""
    before, client = s3_requests(), time.process_time()
    server_before = server.cpu_seconds() if server else 0.0
    value, seconds = _timed(action)
    return value, {
        "seconds": seconds,
        "s3_requests": _requests(before),
        "client_cpu_seconds": round(time.process_time() - client, 2),
        "s3_server_cpu_seconds": (
            round(server.cpu_seconds() - server_before, 2) if server else None
        ),
    }


@contextmanager
def _bucket(stack: StackProcess, s3_bucket: str | None) -> Iterator[tuple[dict[str, str], str]]:
    """The environment and raw prefix to measure with: the local stack's, or with ``s3_bucket``
    the stack's PostgreSQL and this environment's AWS settings, under a fresh prefix of that
    bucket that is deleted afterwards."""
    if s3_bucket is None:
        yield stack.env, "raw"
        return
    root = f"clickstream-bench/{uuid.uuid4().hex[:12]}"
    env = {name: value for name, value in stack.env.items() if not name.startswith("AWS_")}
    env |= {"CLICKSTREAM_BUCKET": s3_bucket, "CLICKSTREAM_RAW_PREFIX": f"{root}/raw"}
    try:
        yield env, f"{root}/raw"
    finally:
        client = s3_client()
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=s3_bucket, Prefix=f"{root}/"
        ):
            keys: list[ObjectIdentifierTypeDef] = [
                {"Key": obj["Key"]} for obj in page.get("Contents", [])
            ]
            if keys:
                client.delete_objects(Bucket=s3_bucket, Delete={"Objects": keys, "Quiet": True})


def _requests(before: dict[str, int]) -> dict[str, int]:
    after = s3_requests()
    return {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}


def run(
    customers: int = 100, events: int = 20, backfill_hours: int = 24, s3_bucket: str | None = None
) -> dict[str, Any]:
    """Measure the scale steps against the local stack, or with ``s3_bucket`` against that S3
    bucket (this environment's AWS credentials) with the local PostgreSQL."""
    import dagster as dg

    from clickstream_pipeline.resources import (
        RegistryResource,
        S3StorageResource,
        WarehouseResource,
    )
    from clickstream_pipeline.sensors import (
        DiscoveryResource,
        registry_sync_sensor,
        s3_discovery_sensor,
    )

    streams = customers * events
    results: dict[str, Any] = {"streams": streams}
    new_hour = hour_floor(datetime.now(UTC)) - timedelta(hours=2)
    with (
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as root,
        stack_process(Path(root) / "stack") as stack,
        _bucket(stack, s3_bucket) as (env, raw),
    ):
        server = None if s3_bucket else stack
        results["s3"] = f"s3://{s3_bucket}" if s3_bucket else "local (moto)"
        os.environ.update(env)
        home = Path(tempfile.mkdtemp(dir=root))
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        os.environ["DAGSTER_HOME"] = str(home)
        registry = Path(root) / "registry.yaml"
        os.environ["CLICKSTREAM_REGISTRY"] = str(registry)
        spec = GeneratorSpec(
            customers=customers,
            events=events,
            hours=1,
            events_per_file=5,
            files_per_hour=1,
            start=new_hour,
        )
        YamlFileRegistry(registry).save(Registry().with_streams(spec.streams))
        client, bucket = s3_client(), env["CLICKSTREAM_BUCKET"]
        write_files(client, bucket, generate_files(spec, raw, new_hour))
        old = GeneratorSpec(**{**spec.__dict__, "start": new_hour - timedelta(days=3)})
        write_files(client, bucket, generate_files(old, raw, new_hour))

        defs_load = run_measured([MODULE, "defs"], {})
        results["definitions_load_seconds"] = defs_load.result["seconds"]

        resources = {
            "s3": S3StorageResource(),
            "warehouse": WarehouseResource(),
            "registry": RegistryResource(),
            "discovery": DiscoveryResource(grace_minutes=0),
        }
        with dg.DagsterInstance.get() as instance:
            context = dg.build_sensor_context(instance=instance, resources=resources)

            def sync() -> None:
                result = registry_sync_sensor(context)
                assert isinstance(result, dg.SensorResult)
                for request in result.dynamic_partitions_requests or []:
                    assert isinstance(request, dg.AddDynamicPartitionsRequest)
                    instance.add_dynamic_partitions("stream", list(request.partition_keys))

            _, results["registry_sync_tick_seconds"] = _timed(sync)

            def tick(cursor: str | None) -> dg.SensorResult:
                result = s3_discovery_sensor(
                    dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
                )
                assert isinstance(result, dg.SensorResult)
                return result

            first, cost = _listed(lambda: tick(None), server)
            results["discovery_first_tick"] = {
                **cost,
                "partitions_requested": sum(
                    len(r.run_config["ops"]["load_partitions"]["config"]["partitions"])
                    for r in first.run_requests or []
                ),
                "bucket_files": 2 * streams,
                "note": "streams seen for the first time are listed in full",
            }
            # Steady state: every stream known, 2,000 new files in the lookback window and the
            # older history outside it; then with twice the old history.
            steady_cursor = json.dumps(
                {"scanned": sorted(s.key for s in spec.streams), "requested": {}}
            )
            steady, cost = _listed(lambda: tick(steady_cursor), server)
            results["discovery_steady_tick"] = {
                **cost,
                "new_files": streams,
                "bucket_files": 2 * streams,
                "runs_requested": len(steady.run_requests or []),
            }
            older = GeneratorSpec(**{**spec.__dict__, "start": new_hour - timedelta(days=4)})
            write_files(client, bucket, generate_files(older, raw, new_hour))
            _, cost = _listed(lambda: tick(steady_cursor), server)
            results["discovery_steady_tick_bigger_bucket"] = {
                **cost,
                "new_files": streams,
                "bucket_files": 3 * streams,
            }

            def report() -> None:
                for stream in spec.streams:
                    instance.report_runless_asset_event(
                        dg.AssetMaterialization(
                            "warehouse_events", partition=f"{hour_key(new_hour)}|{stream}"
                        )
                    )

            _, seconds = _timed(report)
            results["materializations_reported"] = {
                "count": streams,
                "seconds": seconds,
                "per_second": round(streams / seconds),
            }
        from clickstream_pipeline.runner import backfill_pending

        first_hour = new_hour - timedelta(hours=backfill_hours - 1)
        pending, cost = _listed(
            lambda: backfill_pending(
                tuple(spec.streams),
                first_hour,
                new_hour + timedelta(hours=1),
                DiscoveryResource(grace_minutes=0),
            ),
            server,
        )
        results["backfill_listing"] = {**cost, "hours": backfill_hours, "pending": len(pending)}
        results["graphql"] = run_measured([MODULE, "graphql", str(home)], {}).result
        hours = [hour_key(new_hour - timedelta(hours=h)) for h in range(backfill_hours)]
        keys_file = Path(root) / "backfill.json"
        keys_file.write_text(json.dumps([f"{h}|{s}" for h in hours for s in spec.streams]))
        try:
            results["backfill_submit"] = run_measured(
                [MODULE, "backfill", str(home), str(keys_file)], {}, timeout=300, max_rss_mb=8192
            ).result
        except (RuntimeError, TimeoutError, MemoryError) as error:
            results["backfill_submit"] = {"partitions": len(hours) * streams, "failed": str(error)}
    return results


# --- child processes ------------------------------------------------------------------------


def child_defs() -> dict[str, Any]:
    began = time.perf_counter()
    from clickstream_pipeline.definitions import defs

    defs.get_repository_def()
    defs.resolve_asset_graph()
    return {"seconds": round(time.perf_counter() - began, 3)}


def _graphql(home: str) -> Any:
    from dagster_graphql.test.utils import define_out_of_process_context

    import clickstream_pipeline.definitions as module

    os.environ["DAGSTER_HOME"] = home
    import dagster as dg

    return define_out_of_process_context(
        str(Path(module.__file__)), "defs", dg.DagsterInstance.get()
    )


def child_graphql(home: str) -> dict[str, Any]:
    from dagster_graphql.test.utils import execute_dagster_graphql

    timings: dict[str, Any] = {}
    with _graphql(home) as context:
        for name, query in (("partition_stats", STATS_QUERY), ("partition_health", HEALTH_QUERY)):
            for attempt in ("cold", "warm"):
                request = context.process_context.create_request_context()
                began = time.perf_counter()
                response = execute_dagster_graphql(
                    request, query, {"k": {"path": ["warehouse_events"]}}
                )
                timings[f"{name}_{attempt}_seconds"] = round(time.perf_counter() - began, 3)
                assert response.errors is None, response.errors
                node = response.data["assetNodeOrError"]
                if "partitionStats" in node:
                    timings["partition_stats"] = node["partitionStats"]
    return timings


def child_backfill(home: str, keys_file: str) -> dict[str, Any]:
    """Queue the listed partitions as ``clickstream backfill --submit`` does: batch runs of
    ``load_partitions_job`` through the webserver's GraphQL API (here in process)."""
    from dagster_graphql.client.client_queries import CLIENT_SUBMIT_PIPELINE_RUN_MUTATION
    from dagster_graphql.test.utils import execute_dagster_graphql, main_repo_location_name

    from clickstream_pipeline.cli import BACKFILL_BATCH_SIZE
    from clickstream_pipeline.discovery import PendingPartition
    from clickstream_pipeline.jobs import LOAD_JOB
    from clickstream_pipeline.partitions import parse_partition_key
    from clickstream_pipeline.runner import submit_partitions
    from clickstream_pipeline.sensors import DiscoveryResource

    keys = json.loads(Path(keys_file).read_text())
    pending = [
        PendingPartition(hour, stream, (), "", False)
        for stream, hour in map(parse_partition_key, keys)
    ]
    with _graphql(home) as context:

        def submit(run_config: dict[str, Any], tags: dict[str, str]) -> str:
            params = {
                "selector": {
                    "repositoryLocationName": main_repo_location_name(),
                    "repositoryName": "__repository__",
                    "pipelineName": LOAD_JOB,
                },
                "runConfigData": run_config,
                "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
            }
            response = execute_dagster_graphql(
                context.process_context.create_request_context(),
                CLIENT_SUBMIT_PIPELINE_RUN_MUTATION,
                {"executionParams": params},
            )
            launched = response.data["launchPipelineExecution"]
            if launched["__typename"] != "LaunchRunSuccess":
                raise RuntimeError(str(launched))
            return str(launched["run"]["runId"])

        began = time.perf_counter()
        run_ids = submit_partitions(
            submit,
            pending,
            DiscoveryResource(batch_size=BACKFILL_BATCH_SIZE),
            "clickstream backfill",
        )
        seconds = round(time.perf_counter() - began, 3)
    return {"partitions": len(keys), "runs": len(run_ids), "seconds": seconds}


def main(argv: list[str]) -> None:
    commands: dict[str, Callable[..., dict[str, Any]]] = {
        "defs": child_defs,
        "graphql": child_graphql,
        "backfill": child_backfill,
    }
    print(json.dumps(commands[argv[0]](*argv[1:])))  # noqa: T201 - the parent reads this line


if __name__ == "__main__":
    main(sys.argv[1:])
