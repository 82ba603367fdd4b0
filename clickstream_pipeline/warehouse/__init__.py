"""Warehouse dialects behind one seam, chosen by the URL scheme."""

from __future__ import annotations

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.warehouse.base import Warehouse


def warehouse_for_url(url: str) -> Warehouse:
    """The dialect for ``CLICKSTREAM_WAREHOUSE_URL``: ``postgresql://`` (or ``redshift://``)."""
    scheme = url.partition("://")[0].lower()
    if scheme in ("postgresql", "postgres"):
        from clickstream_pipeline.warehouse.postgres import PostgresWarehouse

        return PostgresWarehouse(url)
    if scheme == "redshift":
        raise ClickstreamError("the Redshift loader is not available yet; use postgresql://")
    raise ClickstreamError(
        f"unsupported warehouse URL scheme {scheme!r}: use postgresql:// or redshift://"
    )
