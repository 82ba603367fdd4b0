"""Dagster resources: S3 storage, the warehouse and the registry, configured from the environment.

Fields left unset fall back to the ``CLICKSTREAM_*`` variables when a run or sensor uses them, so
nothing is read at import time and the launchpad can still override any of them.
"""

import dagster as dg

from clickstream_pipeline.config import Settings
from clickstream_pipeline.loader import RawStore
from clickstream_pipeline.registry import Registry, load_registry
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse import warehouse_for_url
from clickstream_pipeline.warehouse.base import Warehouse


class S3StorageResource(dg.ConfigurableResource):
    """The bucket holding raw and quarantined files (default: CLICKSTREAM_BUCKET/_RAW_PREFIX)."""

    bucket: str | None = None
    raw_prefix: str | None = None
    endpoint_url: str | None = None

    def store(self) -> RawStore:
        settings = Settings.from_env()
        bucket = self.bucket or settings.require_bucket()
        return RawStore(
            s3_client(self.endpoint_url), bucket, self.raw_prefix or settings.raw_prefix
        )


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse that holds one table per stream (default: CLICKSTREAM_WAREHOUSE_URL)."""

    url: str | None = None

    def warehouse(self) -> Warehouse:
        return warehouse_for_url(self.url or Settings.from_env().require_warehouse_url())


class RegistryResource(dg.ConfigurableResource):
    """The registry of customers and events (default: CLICKSTREAM_REGISTRY)."""

    location: str | None = None

    def load(self, missing_ok: bool = False) -> Registry:
        """The registry now; with ``missing_ok``, one that does not exist yet is empty."""
        return load_registry(self.location or Settings.from_env().registry, missing_ok)


class DiscoveryResource(dg.ConfigurableResource):
    """How discovery decides what to load and how loads are batched."""

    grace_minutes: int = 5  # wait this long after an hour ends before loading it
    lookback_hours: int = 24  # late files are found in hours this recent
    batch_size: int = 100  # partitions per load run
    concurrency: int = 4  # partitions loaded at once within a run
    retry_minutes: int = 30  # re-request a partition whose requested load has not landed
