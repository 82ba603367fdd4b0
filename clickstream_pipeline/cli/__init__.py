"""The ``clickstream`` command line, one module per command group; ``main`` is the entry point."""

from clickstream_pipeline.cli import bench, generate, load, local, ops, registry, vortex
from clickstream_pipeline.cli.app import cli, main

__all__ = ["bench", "cli", "generate", "load", "local", "main", "ops", "registry", "vortex"]
