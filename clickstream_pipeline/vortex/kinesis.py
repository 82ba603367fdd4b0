"""The Kinesis calls the project makes: a client, the stream's shards, creating a local stream,
and putting records (``clickstream generate --to kinesis``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.utils import parse_timestamp

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.vortex.leases import ShardInfo

# PutRecords takes at most 500 records and 5 MiB a call.
PUT_BATCH_RECORDS = 500
PUT_BATCH_BYTES = 5 * 1024 * 1024 - 64 * 1024


def _utc_timestamp(value: Any) -> datetime:
    """botocore's timestamp parser for Kinesis responses, in UTC: an epoch number (every
    record's ApproximateArrivalTimestamp) without botocore's local-time zone lookup, a quarter
    of the CPU vortex spent per record."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return parse_timestamp(value).astimezone(UTC)


def kinesis_client(max_attempts: int = 10) -> Any:
    """A thread-safe Kinesis client (AWS_ENDPOINT_URL and credentials from the environment),
    retrying throttling, server and connection errors with backoff; timestamps in UTC."""
    import boto3
    import botocore.session

    session = botocore.session.get_session()
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=_utc_timestamp
    )
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "adaptive"}, max_pool_connections=32
    )
    return boto3.session.Session(botocore_session=session).client("kinesis", config=config)


def _error(stream: str, action: str, error: Exception) -> ClickstreamError:
    if isinstance(error, ClientError) and error.response["Error"]["Code"] == (
        "ResourceNotFoundException"
    ):
        return ClickstreamError(f"Kinesis stream {stream!r} does not exist")
    if isinstance(error, BotoCoreError):
        return ClickstreamError(f"cannot reach Kinesis to {action} {stream!r}: {error}")
    return ClickstreamError(f"cannot {action} {stream!r}: {error}")


def ensure_stream(kinesis: Any, stream: str, shards: int) -> None:
    """Create ``stream`` with ``shards`` shards unless it exists, and wait until it is active."""
    try:
        kinesis.describe_stream_summary(StreamName=stream)
    except ClientError as error:
        if error.response["Error"]["Code"] != "ResourceNotFoundException":
            raise _error(stream, "describe", error) from None
        kinesis.create_stream(StreamName=stream, ShardCount=shards)
    except BotoCoreError as error:
        raise _error(stream, "describe", error) from None
    for _ in range(60):
        summary = kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
        if summary["StreamStatus"] in ("ACTIVE", "UPDATING"):
            return
        time.sleep(0.5)
    raise ClickstreamError(f"Kinesis stream {stream!r} did not become active")


def list_shards(kinesis: Any, stream: str) -> list[ShardInfo]:
    """Every shard of ``stream``, open and closed (ListShards, paged)."""
    shards: list[ShardInfo] = []
    request: dict[str, Any] = {"StreamName": stream}
    try:
        while True:
            page = kinesis.list_shards(**request)
            for shard in page["Shards"]:
                parents = tuple(
                    p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p
                )
                ending = shard["SequenceNumberRange"].get("EndingSequenceNumber")
                shards.append(ShardInfo(shard["ShardId"], parents, ending))
            if not page.get("NextToken"):
                return shards
            request = {"NextToken": page["NextToken"]}
    except (ClientError, BotoCoreError) as error:
        raise _error(stream, "list the shards of", error) from None


def _chunks(records: Iterable[tuple[bytes, str]]) -> Iterator[list[tuple[bytes, str]]]:
    chunk: list[tuple[bytes, str]] = []
    size = 0
    for data, key in records:
        if chunk and (len(chunk) == PUT_BATCH_RECORDS or size + len(data) > PUT_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append((data, key))
        size += len(data) + len(key)
    if chunk:
        yield chunk


def put_records(kinesis: Any, stream: str, records: Iterable[tuple[bytes, str]]) -> int:
    """Put (data, partition key) records, 500 a call; records a call did not take (throttled)
    are sent again, in order. Returns how many were put."""
    put = 0
    for chunk in _chunks(records):
        pending = chunk
        for attempt in range(20):
            try:
                response = kinesis.put_records(
                    StreamName=stream,
                    Records=[{"Data": data, "PartitionKey": key} for data, key in pending],
                )
            except (ClientError, BotoCoreError) as error:
                raise _error(stream, "put records on", error) from None
            failed = [
                record
                for record, result in zip(pending, response["Records"], strict=True)
                if "ErrorCode" in result
            ]
            put += len(pending) - len(failed)
            if not failed:
                break
            pending = failed
            time.sleep(min(0.1 * 2**attempt, 5.0))
        else:
            raise ClickstreamError(f"Kinesis kept refusing records on {stream!r}")
    return put
