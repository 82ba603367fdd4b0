"""The batch load job: any set of (table, hour)s in one run, each reported on its own.

The discovery sensor and ``clickstream load`` find a scattered set of (table, hour)s (new hours,
late files in older ones, a new table's whole history); this job takes them as a list of load
keys and loads them through ``batch.load_batch``, reporting each as a materialization of its
table's asset.
"""

import dagster as dg
from pydantic import Field

from clickstream_pipeline.batch import STEP_RETRY, WAREHOUSE_POOL, load_batch
from clickstream_pipeline.resources import S3StorageResource, WarehouseResource

LOAD_JOB = "load_partitions_job"
PARTITIONS_TAG = "clickstream/partitions"


class LoadPartitionsConfig(dg.Config):
    """Which (table, hour)s to load, as load keys ``<hour>|<customer>.<event>``."""

    partitions: list[str] = Field(description="Load keys, e.g. 2026-11-26-13:00|acme.page_view")
    concurrency: int = Field(default=4, ge=1, le=32, description="Partitions loaded at once.")
    report_raw: bool = Field(
        default=False,
        description="Also report each loaded hour's raw files as materialized (when no sensor "
        "reported them).",
    )


@dg.op(retry_policy=STEP_RETRY, pool=WAREHOUSE_POOL)
def load_partitions(
    context: dg.OpExecutionContext,
    config: LoadPartitionsConfig,
    s3: S3StorageResource,
    warehouse: WarehouseResource,
) -> dg.Output[int]:
    """Load each listed (table, hour) exactly once and report it as materialized on its own."""
    keys = list(dict.fromkeys(config.partitions))
    result = load_batch(
        context,
        keys,
        s3.store(),
        warehouse.warehouse(),
        config.concurrency,
        report_raw=config.report_raw,
    )
    result.raise_failures()
    return dg.Output(result.loaded, metadata={"partitions": len(keys), "loaded": result.loaded})


@dg.job(name=LOAD_JOB, tags={"clickstream/kind": "batch-load"})
def load_partitions_job() -> None:
    """Load a batch of (table, hour)s in one run (used by the discovery sensor and
    ``clickstream load``)."""
    load_partitions()


def run_config_for(
    partitions: list[str], concurrency: int = 4, report_raw: bool = False
) -> dict[str, object]:
    config = {"partitions": partitions, "concurrency": concurrency, "report_raw": report_raw}
    return {"ops": {"load_partitions": {"config": config}}}
