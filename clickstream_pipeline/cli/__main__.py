"""``python -m clickstream_pipeline.cli``."""

from clickstream_pipeline.cli import main

main()
