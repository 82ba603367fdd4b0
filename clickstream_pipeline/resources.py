"""Dagster resources: S3 storage, the warehouse and the registry, configured from the environment.

Fields left unset fall back to the ``CLICKSTREAM_*`` variables when a run or sensor uses them, so
nothing is read at import time and the launchpad can still override any of them.
"""

from typing import TYPE_CHECKING, Any

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from clickstream_pipeline.config import Settings
from clickstream_pipeline.loader import RawStore
from clickstream_pipeline.registry import Registry, load_registry
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse import warehouse_for_url
from clickstream_pipeline.warehouse.base import Warehouse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3StorageResource(S3Resource):
    """The bucket holding raw and quarantined files (default: CLICKSTREAM_BUCKET/_RAW_PREFIX).

    Configured as Dagster's own ``S3Resource`` is (region, endpoint, profile, credentials,
    SSL, unsigned), and ``get_client()`` is its client with this project's settings: adaptive
    retries, connect and read timeouts, a pool for the loader's threads, and the request count
    behind ``/metrics``."""

    bucket: str | None = None
    raw_prefix: str | None = None
    max_attempts: int | None = Field(  # type: ignore[assignment]
        default=None,
        description="botocore's retries max_attempts for each S3 request (default: "
        "AWS_MAX_ATTEMPTS, else 10), in botocore's adaptive retry mode.",
    )

    def get_client(self) -> "S3Client":
        import boto3
        from botocore import UNSIGNED

        client_args: dict[str, Any] = {
            "region_name": self.region_name,
            "use_ssl": self.use_ssl,
            "verify": self.verify,
            "aws_access_key_id": self.aws_access_key_id,
            "aws_secret_access_key": self.aws_secret_access_key,
            "aws_session_token": self.aws_session_token,
        }
        return s3_client(
            self.endpoint_url,
            self.max_attempts,
            session=boto3.session.Session(profile_name=self.profile_name),
            signature_version=UNSIGNED if self.use_unsigned_session else None,
            **client_args,
        )

    def store(self) -> RawStore:
        settings = Settings.from_env()
        bucket = self.bucket or settings.require_bucket()
        return RawStore(self.get_client(), bucket, self.raw_prefix or settings.raw_prefix)


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
