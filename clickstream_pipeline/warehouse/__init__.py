"""Warehouse dialects behind one seam, chosen by the URL scheme."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.warehouse.base import Warehouse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def warehouse_for_url(
    url: str, client: S3Client | None = None, bucket: str | None = None
) -> Warehouse:
    """The dialect for ``CLICKSTREAM_WAREHOUSE_URL``: ``postgresql://`` or ``redshift://``.

    Redshift loads through staged files, so it also needs the bucket (``CLICKSTREAM_BUCKET``
    unless given) and an IAM role (in the URL, or ``CLICKSTREAM_REDSHIFT_IAM_ROLE``).
    """
    scheme = url.partition("://")[0].lower()
    if scheme in ("postgresql", "postgres"):
        from clickstream_pipeline.warehouse.postgres import PostgresWarehouse

        return PostgresWarehouse(url)
    if scheme == "redshift":
        from clickstream_pipeline.config import Settings
        from clickstream_pipeline.s3 import s3_client
        from clickstream_pipeline.warehouse.redshift import RedshiftConfig, RedshiftWarehouse

        config = RedshiftConfig.from_url(url, os.environ.get("CLICKSTREAM_REDSHIFT_IAM_ROLE"))
        return RedshiftWarehouse(
            config, client or s3_client(), bucket or Settings.from_env().require_bucket()
        )
    raise ClickstreamError(
        f"unsupported warehouse URL scheme {scheme!r}: use postgresql:// or redshift://"
    )
