"""Scale: 2,000 tables with history — the code location's load and a run worker's, a
registry-sync tick, discovery ticks with 2,000 new files (and the S3 requests they send), a
table's partition status in the UI with a year loaded, and a one-day backfill of every table
launched the way the UI's "Materialize" dialog launches it, then one backfill daemon iteration."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from clickstream_pipeline.bench.common import (
    StackProcess,
    dagster_home_on_postgres,
    poll,
    run_measured,
    stack_process,
)
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
# What the UI's partitions page asks for a time-partitioned asset.
HEALTH_QUERY = """query Q($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) { ... on AssetNode {
  id partitionKeysByDimension { name type partitionKeys }
  assetPartitionStatuses { ... on TimePartitionStatuses { ranges { status startKey endKey } } }
  } } }"""
# What the UI's "Materialize" dialog sends for a range of hours of the selected assets.
BACKFILL_MUTATION = """mutation B($p: LaunchBackfillParams!) { launchPartitionBackfill(
  backfillParams: $p) { __typename ... on LaunchBackfillSuccess { backfillId }
  ... on PythonError { message } ... on InvalidSubsetError { message } } }"""


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
    customers: int = 100,
    events: int = 20,
    backfill_hours: int = 24,
    history_hours: int = 8_760,
    s3_bucket: str | None = None,
    deployment: bool = True,
) -> dict[str, Any]:
    """Measure the scale steps against the local stack, or with ``s3_bucket`` against that S3
    bucket (this environment's AWS credentials) with the local PostgreSQL; ``deployment``: also
    time a code server, webserver and daemon serving every table."""
    import dagster as dg

    from clickstream_pipeline.partitions import table_asset_key
    from clickstream_pipeline.resources import (
        DiscoveryResource,
        RegistryResource,
        S3StorageResource,
        WarehouseResource,
    )
    from clickstream_pipeline.sensors import (
        build_registry_sync_sensor,
        build_s3_discovery_sensor,
    )
    from clickstream_pipeline.webserver import DagsterWebserverResource

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
        home = dagster_home_on_postgres(Path(root), env["CLICKSTREAM_WAREHOUSE_URL"], "scale")
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

        load_data = str(Path(root) / "load_data.json")
        defs_load = run_measured([MODULE, "defs", load_data], {})
        results["definitions_load_seconds"] = defs_load.result["seconds"]
        results["code_location_load"] = defs_load.result
        worker = run_measured([MODULE, "worker", load_data], {})
        results["run_worker_definitions_seconds"] = worker.result["seconds"]
        results["run_worker"] = {**worker.result, "peak_rss_mb": round(worker.peak_rss_mb, 1)}

        resources = {
            "s3": S3StorageResource(),
            "warehouse": WarehouseResource(),
            "registry": RegistryResource(),
            "discovery": DiscoveryResource(grace_minutes=0),
            "webserver": DagsterWebserverResource(),
        }
        loaded = tuple(spec.streams)
        registry_sync_sensor = build_registry_sync_sensor(loaded, None)
        s3_discovery_sensor = build_s3_discovery_sensor(loaded)
        with dg.DagsterInstance.get() as instance:
            context = dg.build_sensor_context(instance=instance, resources=resources)

            def sync() -> None:
                result = registry_sync_sensor(context)
                assert isinstance(result, dg.SensorResult) and result.skip_reason is not None

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
                            table_asset_key(stream), partition=hour_key(new_hour)
                        )
                    )

            _, seconds = _timed(report)
            results["materializations_reported"] = {
                "count": streams,
                "seconds": seconds,
                "per_second": round(streams / seconds),
            }
            # One table with every hour of its history loaded: what its partitions page shows.
            history = hour_floor(datetime.now(UTC)) - timedelta(hours=history_hours)
            loaded_table = table_asset_key(spec.streams[0])
            for hour in range(history_hours):
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(
                        loaded_table, partition=hour_key(history + timedelta(hours=hour))
                    )
                )
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
        first_table = ".".join(table_asset_key(spec.streams[0]).path)
        results["graphql"] = run_measured([MODULE, "graphql", str(home), first_table], {}).result
        results["graphql"]["hours_loaded"] = history_hours
        hours = [hour_key(new_hour - timedelta(hours=h)) for h in range(backfill_hours)]
        try:
            measured = run_measured(
                [MODULE, "backfill", str(home), json.dumps(hours)],
                {},
                timeout=600,
                max_rss_mb=8192,
            )
            results["backfill_submit"] = {
                **measured.result,
                "peak_rss_mb": round(measured.peak_rss_mb, 1),
            }
        except (RuntimeError, TimeoutError, MemoryError) as error:
            results["backfill_submit"] = {"partitions": len(hours) * streams, "failed": str(error)}
        if deployment:
            results["deployment"] = _deployment(Path(root), registry)
        results["idle_load"] = _idle_load(Path(root), spec.streams[:10], env)
    return results


def _deployment(root: Path, registry: Path) -> dict[str, Any]:
    """A code server, webserver and daemon over every table: how long until the webserver
    serves them all, and until a table added to the registry is an asset there."""
    from clickstream_pipeline.local.dagster import DagsterServices
    from clickstream_pipeline.names import Stream

    services = DagsterServices(root / "dagster")
    os.environ["CLICKSTREAM_DAGSTER_URL"] = services.url
    # A quiet deployment with an instance of its own: its discovery sensor finds no files (an
    # empty raw prefix) and its daemon has no earlier backfill or queued run to work on, so
    # nothing else runs while the reload is timed.
    saved = {name: os.environ.get(name) for name in ("CLICKSTREAM_RAW_PREFIX", "DAGSTER_HOME")}
    os.environ["CLICKSTREAM_RAW_PREFIX"] = "bench-empty"
    os.environ["DAGSTER_HOME"] = str(
        dagster_home_on_postgres(root, os.environ["CLICKSTREAM_WAREHOUSE_URL"], "deployment")
    )
    began = time.perf_counter()
    try:
        with services:
            assets = len(poll(services.asset_keys, timeout=600))
            served = time.perf_counter() - began
            added = Stream("bench_added", "checkout")
            with YamlFileRegistry(registry).edit() as edit:
                edit.registry = edit.registry.with_streams([added])
            changed = time.perf_counter()
            poll(lambda: services.has_asset(["bench_added", "checkout"]), timeout=600)
            appeared = time.perf_counter() - changed
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return {
        "assets": assets,
        "location_served_seconds": round(served, 1),
        "registry_add_to_asset_seconds": round(appeared, 1),
    }


def _idle_load(root: Path, streams: Sequence[Any], env: dict[str, str]) -> dict[str, Any]:
    """`clickstream load` of a few tables, then again with nothing new: the second's wall."""
    registry = root / "idle-registry.yaml"
    YamlFileRegistry(registry).save(Registry().with_streams(streams))
    home = Path(tempfile.mkdtemp(dir=root))
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    child = {**env, "CLICKSTREAM_REGISTRY": str(registry), "DAGSTER_HOME": str(home)}
    command = ["clickstream_pipeline.cli", "load", "--grace-minutes", "0"]
    run_measured(command, child)
    idle = run_measured(command, child)
    return {"streams": len(streams), "seconds": round(idle.wall_seconds, 2)}


# --- child processes ------------------------------------------------------------------------


def child_defs(load_data_file: str) -> dict[str, Any]:
    """What a code server does as it loads: read the registry, build the definitions and the
    snapshot the webserver and daemon receive. Writes the load data a run worker gets."""
    from dagster._core.code_pointer import CodePointer
    from dagster._core.definitions.reconstruct import initialize_repository_def_from_pointer
    from dagster._core.remote_representation.external_data import RepositorySnap
    from dagster_shared.serdes import serialize_value

    began = time.perf_counter()
    repository = initialize_repository_def_from_pointer(
        CodePointer.from_module("clickstream_pipeline.definitions", "defs", None)
    )
    built = time.perf_counter() - began
    repository.asset_graph  # noqa: B018 - resolving the graph is part of the load
    RepositorySnap.from_def(repository)
    Path(load_data_file).write_text(serialize_value(repository.repository_load_data))
    return {
        "seconds": round(time.perf_counter() - began, 3),
        "definitions_seconds": round(built, 3),
        "assets": len(repository.asset_graph.get_all_asset_keys()),
    }


def child_worker(load_data_file: str) -> dict[str, Any]:
    """What a run worker does before its first step: import the code, rebuild the definitions
    from the code server's registry snapshot (the registry is not read) and resolve the jobs."""
    began = time.perf_counter()
    from dagster._core.code_pointer import CodePointer
    from dagster._core.definitions.reconstruct import reconstruct_repository_def_from_pointer
    from dagster_shared.serdes import deserialize_value

    from clickstream_pipeline.jobs import LOAD_JOB

    load_data = deserialize_value(Path(load_data_file).read_text())
    os.environ["CLICKSTREAM_REGISTRY"] = "/nonexistent/registry.yaml"  # it must not be needed
    pointer = CodePointer.from_module("clickstream_pipeline.definitions", "defs", None)
    repository = reconstruct_repository_def_from_pointer(pointer, load_data)  # type: ignore[arg-type]
    repository.get_job(LOAD_JOB)
    repository.get_implicit_asset_job_names()
    return {
        "seconds": round(time.perf_counter() - began, 3),
        "assets": len(repository.asset_graph.get_all_asset_keys()),
    }


def _graphql(home: str) -> Any:
    from dagster_graphql.test.utils import define_out_of_process_context

    import clickstream_pipeline.definitions as module

    os.environ["DAGSTER_HOME"] = home
    import dagster as dg

    return define_out_of_process_context(
        str(Path(module.__file__)), "defs", dg.DagsterInstance.get()
    )


def child_graphql(home: str, table: str) -> dict[str, Any]:
    from dagster_graphql.test.utils import execute_dagster_graphql

    timings: dict[str, Any] = {}
    with _graphql(home) as context:
        for name, query in (("partition_stats", STATS_QUERY), ("partition_health", HEALTH_QUERY)):
            for attempt in ("cold", "warm"):
                request = context.process_context.create_request_context()
                began = time.perf_counter()
                response = execute_dagster_graphql(
                    request, query, {"k": {"path": table.split(".")}}
                )
                timings[f"{name}_{attempt}_seconds"] = round(time.perf_counter() - began, 3)
                assert response.errors is None, response.errors
                node = response.data["assetNodeOrError"]
                if "partitionStats" in node:
                    timings["partition_stats"] = node["partitionStats"]
                if "assetPartitionStatuses" in node:
                    timings["status_ranges"] = len(node["assetPartitionStatuses"]["ranges"])
    return timings


def child_backfill(home: str, hours_json: str) -> dict[str, Any]:
    """Launch a backfill of every table over the given hours as the UI's "Materialize" dialog
    does (``launchPartitionBackfill`` with an asset selection and partition names), then run
    one iteration of the backfill daemon over it (runs are queued, not started)."""
    import logging

    from dagster._daemon.backfill import execute_backfill_iteration
    from dagster_graphql.test.utils import execute_dagster_graphql

    hours = json.loads(hours_json)
    with _graphql(home) as context:
        request = context.process_context.create_request_context()
        nodes = execute_dagster_graphql(request, "{ assetNodes { assetKey { path } } }")
        tables = [
            {"path": node["assetKey"]["path"]}
            for node in nodes.data["assetNodes"]
            if node["assetKey"]["path"][0] != "raw"
        ]
        began = time.perf_counter()
        response = execute_dagster_graphql(
            request,
            BACKFILL_MUTATION,
            {"p": {"assetSelection": tables, "partitionNames": hours}},
        )
        launch_seconds = round(time.perf_counter() - began, 3)
        launched = response.data["launchPartitionBackfill"]
        if launched["__typename"] != "LaunchBackfillSuccess":
            raise RuntimeError(str(launched))
        iterations = []
        # The first iteration submits the backfill's run; the next ones check on it, as the
        # daemon does every few seconds until the run ends.
        for _ in range(3):
            began = time.perf_counter()
            list(execute_backfill_iteration(context.process_context, logging.getLogger("backfill")))
            iterations.append(round(time.perf_counter() - began, 3))
        runs = context.process_context.instance.get_runs_count()
    return {
        "partitions": len(tables) * len(hours),
        "tables": len(tables),
        "seconds": launch_seconds,
        "run_submission_iteration_seconds": iterations[0],
        "daemon_iteration_seconds": max(iterations[1:]),
        "runs": runs,
    }


def main(argv: list[str]) -> None:
    commands: dict[str, Callable[..., dict[str, Any]]] = {
        "defs": child_defs,
        "worker": child_worker,
        "graphql": child_graphql,
        "backfill": child_backfill,
    }
    print(json.dumps(commands[argv[0]](*argv[1:])))  # noqa: T201 - the parent reads this line


if __name__ == "__main__":
    main(sys.argv[1:])
