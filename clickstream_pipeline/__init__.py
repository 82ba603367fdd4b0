"""Load clickstream events from S3 into one warehouse table per customer event, exactly once."""

__version__ = "0.1.0"
