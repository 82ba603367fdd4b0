"""Generation speed: events/s of `clickstream generate`, alone and into a local S3 server.

The S3 server runs in its own process (`clickstream stack`), as it does for a user, so the
figure is what the generator achieves, not what one process can share with the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

from clickstream_pipeline.generator import GeneratorSpec, generate_files, write_files
from clickstream_pipeline.s3 import s3_client

SPEC = GeneratorSpec(
    customers=10,
    events=10,
    hours=2,
    events_per_file=2500,
    files_per_hour=2,
    duplicate_rate=0.02,
    bad_record_rate=0.01,
    seed=1,
)


def main() -> None:
    now = datetime.now(UTC)
    events = SPEC.customers * SPEC.events * SPEC.hours * SPEC.files_per_hour * SPEC.events_per_file

    began = time.perf_counter()
    size = sum(len(f.body) for f in generate_files(SPEC, "raw", now))
    in_memory = time.perf_counter() - began

    with tempfile.TemporaryDirectory() as root:
        stack = subprocess.Popen(
            [sys.executable, "-m", "clickstream_pipeline.cli", "stack", "--root", root],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert stack.stdout is not None
            env = {}
            while len(env) < 8:
                name, _, value = stack.stdout.readline().removeprefix("export ").partition("=")
                env[name] = value.strip().strip("'")
            os.environ.update(env)
            began = time.perf_counter()
            report = write_files(
                s3_client(), env["CLICKSTREAM_BUCKET"], generate_files(SPEC, "raw", now)
            )
            to_s3 = time.perf_counter() - began
        finally:
            stack.terminate()
            stack.wait(30)

    result = {
        "events": events,
        "files": report.files,
        "gzip_megabytes": round(size / 1e6, 1),
        "generate_events_per_s": round(events / in_memory),
        "generate_and_upload_events_per_s": round(events / to_s3),
    }
    print(json.dumps(result, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
