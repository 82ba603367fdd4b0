"""The batch load job: many (stream, hour) partitions in one run, each recorded on its own.

One run per partition costs a process start (about 2.5 CPU-seconds here), which caps a 2-core
machine far below thousands of partitions an hour. This job loads a list of partitions with a few
threads in one run and reports, per partition, the same materializations and check result the
``warehouse_events`` asset reports, so partition status, history and backfills in the UI stay
per partition.
"""

from concurrent.futures import ThreadPoolExecutor, as_completed

import dagster as dg
from pydantic import Field

from clickstream_pipeline.assets import (
    STEP_RETRY,
    WAREHOUSE_POOL,
    load_log_line,
    load_metadata,
    quarantine_check_evaluation,
    raw_events_key,
    raw_metadata,
    warehouse_events_key,
)
from clickstream_pipeline.discovery import LIST_CONCURRENCY
from clickstream_pipeline.errors import first_line
from clickstream_pipeline.loader import TRANSIENT_ERRORS, LoadOutcome, load_partition, with_retries
from clickstream_pipeline.partitions import parse_partition_key
from clickstream_pipeline.resources import S3StorageResource, WarehouseResource
from clickstream_pipeline.warehouse.base import SourceFile

LOAD_JOB = "load_partitions_job"
PARTITIONS_TAG = "clickstream/partitions"
LARGE_FACTOR = 10
LARGE_MIN_BYTES = 1 << 20


class LoadPartitionsConfig(dg.Config):
    """Which partitions to load, as multi-partition keys ``<hour>|<customer>.<event>``."""

    partitions: list[str] = Field(
        description="Partition keys, e.g. 2026-11-26-13:00|acme.page_view"
    )
    concurrency: int = Field(default=4, ge=1, le=32, description="Partitions loaded at once.")


@dg.op(retry_policy=STEP_RETRY, pool=WAREHOUSE_POOL)
def load_partitions(
    context: dg.OpExecutionContext,
    config: LoadPartitionsConfig,
    s3: S3StorageResource,
    warehouse: WarehouseResource,
) -> dg.Output[int]:
    """Load each listed partition exactly once and report it as materialized on its own.

    The batch's partitions are listed first, then loaded smallest first in waves (see
    ``load_waves``): a partition much larger than the rest starts once they are loaded, so it
    does not take CPU from them.
    """
    store, target = s3.store(), warehouse.warehouse()
    failures: dict[str, str] = {}
    transient = False
    loaded = 0

    def fail(key: str, error: Exception) -> None:
        nonlocal transient
        failures[key] = f"{type(error).__name__}: {first_line(error)}"
        transient = transient or isinstance(error, TRANSIENT_ERRORS)
        context.log.error(load_log_line(key, context.run_id, error=failures[key]))

    def listing(key: str) -> tuple[SourceFile, ...]:
        stream, hour = parse_partition_key(key)
        return with_retries(
            lambda: store.list_partition(stream, hour), describe=f"listing of {key}"
        )

    def load(key: str, files: tuple[SourceFile, ...]) -> LoadOutcome:
        stream, hour = parse_partition_key(key)
        # The first attempt loads the files listed above; a retry lists again (a file rewritten
        # since its listing fails the read, and must not fail every attempt).
        first = iter([files])
        return with_retries(
            lambda: load_partition(
                store, target, stream, hour, next(first, None), run_id=context.run_id
            ),
            describe=f"load of {key}",
        )

    keys = list(dict.fromkeys(config.partitions))
    listed: dict[str, tuple[SourceFile, ...]] = {}
    # Listing waits on S3, not on CPU: more requests in flight than loads.
    with ThreadPoolExecutor(min(LIST_CONCURRENCY, len(keys)), "list") as pool:
        for key, files in [(key, pool.submit(listing, key)) for key in keys]:
            try:
                listed[key] = files.result()
            except Exception as error:
                fail(key, error)
    sizes = {key: sum(file.size for file in files) for key, files in listed.items()}
    with ThreadPoolExecutor(config.concurrency, thread_name_prefix="load") as pool:
        for wave in load_waves(sizes):
            futures = {pool.submit(load, key, listed[key]): key for key in wave}
            # Report each partition as soon as it is loaded: a heavy partition must not hold
            # back the materializations of the light ones loaded beside it.
            for future in as_completed(futures):
                key = futures[future]
                try:
                    outcome = future.result()
                except Exception as error:
                    fail(key, error)
                    continue
                context.log.info(load_log_line(key, context.run_id, outcome))
                if not outcome.skipped:
                    _report(context, key, outcome)
                    loaded += 1
    if failures:
        raise dg.Failure(
            description=f"{len(failures)} of {len(keys)} partitions failed to load",
            metadata={"failed": dg.MetadataValue.json(failures)},
            # Retrying the step helps only when a failure may pass (network, throttling);
            # bad keys or data fail the same way again.
            allow_retries=transient,
        )
    return dg.Output(loaded, metadata={"partitions": len(keys), "loaded": loaded})


def load_waves(sizes: dict[str, int]) -> list[list[str]]:
    """The order a batch loads its partitions in, given their sizes in bytes.

    Smallest first, so most partitions are loaded soonest. Partitions over ``LARGE_FACTOR``
    times the batch's median size (and over ``LARGE_MIN_BYTES``) form a second wave that starts
    once the first is loaded: on a small machine a heavy load takes both cores, and the light
    partitions beside it would take longer by the CPU it uses, not by their own cost.
    """
    order = sorted(sizes, key=lambda key: (sizes[key], key))
    if not order:
        return []
    median = sizes[order[(len(order) - 1) // 2]]
    limit = max(median * LARGE_FACTOR, LARGE_MIN_BYTES)
    light = [key for key in order if sizes[key] <= limit]
    heavy = [key for key in order if sizes[key] > limit]
    return [wave for wave in (light, heavy) if wave]


def _report(context: dg.OpExecutionContext, key: str, outcome: LoadOutcome) -> None:
    context.log_event(
        dg.AssetMaterialization(
            asset_key=raw_events_key, partition=key, metadata=raw_metadata(outcome.files)
        )
    )
    context.log_event(
        dg.AssetMaterialization(
            asset_key=warehouse_events_key, partition=key, metadata=load_metadata(outcome)
        )
    )
    # log_event records check evaluations too; its annotation predates them.
    context.log_event(quarantine_check_evaluation(outcome, key))  # type: ignore[arg-type]


@dg.job(name=LOAD_JOB, tags={"clickstream/kind": "batch-load"})
def load_partitions_job() -> None:
    """Load a batch of (stream, hour) partitions in one run (used by the discovery sensor and
    ``clickstream load``)."""
    load_partitions()


def run_config_for(partitions: list[str], concurrency: int = 4) -> dict[str, object]:
    return {
        "ops": {
            "load_partitions": {"config": {"partitions": partitions, "concurrency": concurrency}}
        }
    }
