"""Vortex, the microbatcher: a Kinesis stream's records as raw files in S3, exactly once."""

from clickstream_pipeline.vortex.consumer import Totals, Vortex, VortexConfig, vortex_worker
from clickstream_pipeline.vortex.kinesis import kinesis_client
from clickstream_pipeline.vortex.leases import LeaseLost, LeaseStore

__all__ = [
    "LeaseLost",
    "LeaseStore",
    "Totals",
    "Vortex",
    "VortexConfig",
    "kinesis_client",
    "vortex_worker",
]
