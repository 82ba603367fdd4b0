"""The code location's single entry point: ``defs``."""

import dagster as dg

defs = dg.Definitions()
