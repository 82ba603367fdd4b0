"""Partitions: a dynamic ``stream`` dimension (``customer.event``, from the registry) x UTC hours.

Multi-partition keys are ``"<hour>|<stream>"`` (Dagster orders dimensions by name), e.g.
``2026-11-26-13:00|acme.add_to_cart``. See docs/design.md for the measurements behind the layout.
"""

from datetime import datetime

import dagster as dg

from clickstream_pipeline.layout import hour_key, parse_hour_key
from clickstream_pipeline.names import Stream

STREAM_DIMENSION = "stream"
HOUR_DIMENSION = "hour"
# Hours before this are not partitions; discovery ignores files in them.
FIRST_HOUR = "2025-01-01-00:00"

stream_partitions = dg.DynamicPartitionsDefinition(name=STREAM_DIMENSION)
hour_partitions = dg.HourlyPartitionsDefinition(start_date=FIRST_HOUR, timezone="UTC")
stream_hour_partitions = dg.MultiPartitionsDefinition(
    {STREAM_DIMENSION: stream_partitions, HOUR_DIMENSION: hour_partitions}
)
FIRST_HOUR_TIME = parse_hour_key(FIRST_HOUR)


def partition_key(stream: Stream, hour: datetime) -> dg.MultiPartitionKey:
    """The multi-partition key of one (stream, hour)."""
    return dg.MultiPartitionKey({STREAM_DIMENSION: stream.key, HOUR_DIMENSION: hour_key(hour)})


def parse_partition_key(key: str | dg.MultiPartitionKey) -> tuple[Stream, datetime]:
    """The (stream, hour) of a multi-partition key such as ``2026-11-26-13:00|acme.page_view``."""
    if isinstance(key, dg.MultiPartitionKey):
        dimensions = key.keys_by_dimension
        return Stream.parse(dimensions[STREAM_DIMENSION]), parse_hour_key(
            dimensions[HOUR_DIMENSION]
        )
    hour, _, stream = key.partition("|")
    return Stream.parse(stream), parse_hour_key(hour)
