"""Partitions and keys: one hourly partitions definition shared by every asset, and the names
that tie a (stream, hour) to Dagster.

Table ``acme.page_view`` is the asset ``acme/page_view`` and its raw files ``raw/acme/page_view``;
both are partitioned by the same ``HourlyPartitionsDefinition`` (keys ``2026-11-26-13:00``), so a
backfill over any set of tables has one definition at its roots. The batch load job names each
(stream, hour) by a load key (``layout.load_key``). docs/design.md has the measurements behind
the layout.
"""

import dagster as dg

from clickstream_pipeline.layout import parse_hour_key
from clickstream_pipeline.names import Stream

RAW_ROOT = "raw"
# Hours before this are not partitions; discovery ignores files in them.
FIRST_HOUR = "2025-01-01-00:00"
FIRST_HOUR_TIME = parse_hour_key(FIRST_HOUR)

hourly_partitions = dg.HourlyPartitionsDefinition(start_date=FIRST_HOUR, timezone="UTC")


def table_asset_key(stream: Stream) -> dg.AssetKey:
    """The asset of table ``<customer>.<event>``: ``[customer, event]``."""
    return dg.AssetKey([stream.customer, stream.event])


def raw_asset_key(stream: Stream) -> dg.AssetKey:
    """The asset of the stream's raw files in S3: ``["raw", customer, event]``."""
    return dg.AssetKey([RAW_ROOT, stream.customer, stream.event])


def stream_of_table(key: dg.AssetKey) -> Stream:
    """The stream of a table asset key ``[customer, event]``."""
    customer, event = key.path
    return Stream(customer, event)
