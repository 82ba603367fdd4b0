"""Prometheus metrics the pipeline keeps in-process (the ``/metrics`` endpoint serves them)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

S3_REQUESTS = Counter(
    "clickstream_s3_requests",
    "HTTP requests sent to S3 by this process, retries included, by API operation.",
    ["operation"],
)


def count_s3_request(event_name: str, **_: Any) -> None:
    """botocore ``before-send`` hook: ``before-send.s3.ListObjectsV2`` counts one ListObjectsV2."""
    S3_REQUESTS.labels(operation=event_name.rsplit(".", 1)[-1]).inc()


def s3_requests() -> dict[str, int]:
    """Requests so far, by operation."""
    return {
        sample.labels["operation"]: int(sample.value)
        for metric in S3_REQUESTS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
