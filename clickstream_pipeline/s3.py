"""S3 clients: boto3 with adaptive retries, pointed at AWS_ENDPOINT_URL when it is set."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.metrics import count_s3_request

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

DEFAULT_MAX_ATTEMPTS = 10
# Explicit, so a hung connect or a stalled response fails and is retried instead of waiting on:
# the read timeout bounds each wait for bytes (not a whole download), so big files are unaffected.
CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 60.0


def s3_client(
    endpoint_url: str | None = None,
    max_attempts: int | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    read_timeout: float = READ_TIMEOUT_SECONDS,
    session: boto3.session.Session | None = None,
    signature_version: Any = None,
    **client_args: Any,
) -> S3Client:
    """A thread-safe S3 client; boto3 reads AWS_ENDPOINT_URL and credentials from the env
    unless ``session`` (a profile) or ``client_args`` (region, keys, SSL) say otherwise.

    Botocore's adaptive mode retries throttling (503 Slow Down), 5xx, connection errors and
    timeouts with exponential backoff and jitter; AWS_MAX_ATTEMPTS overrides the attempt count.
    """
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    config = Config(
        retries={"max_attempts": attempts, "mode": "adaptive"},
        max_pool_connections=32,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        **({"signature_version": signature_version} if signature_version else {}),
    )
    client = (session or boto3.session.Session()).client(
        "s3", endpoint_url=endpoint_url, config=config, **client_args
    )
    client.meta.events.register("before-send.s3", count_s3_request)
    return client


def ensure_bucket(client: S3Client, bucket: str) -> None:
    """Create ``bucket`` unless it exists (local S3 servers start empty)."""
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise ClickstreamError(f"cannot reach bucket {bucket!r}: {error}") from None
    except BotoCoreError as error:
        raise ClickstreamError(f"cannot reach S3 for bucket {bucket!r}: {error}") from None
    client.create_bucket(Bucket=bucket)
