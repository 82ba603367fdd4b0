"""The embedded local stack: a real PostgreSQL server and a real HTTP S3 API, no Docker."""

from clickstream_pipeline.local.stack import LocalStack

__all__ = ["LocalStack"]
