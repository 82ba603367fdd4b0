"""What every benchmark needs: a stack in its own process, and measured child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@contextmanager
def stack_process(root: Path) -> Iterator[dict[str, str]]:
    """``clickstream stack`` in a child process: the S3 server's work is not billed to loaders."""
    process = subprocess.Popen(
        [sys.executable, "-m", "clickstream_pipeline.cli", "stack", "--root", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        env: dict[str, str] = {}
        while len(env) < 8:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("the embedded stack did not start")
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip().strip("'")
        yield env
    finally:
        process.terminate()
        process.wait(60)


@dataclass(frozen=True)
class Measured:
    """A child process's result (its last stdout line, JSON) and its resource use."""

    result: dict[str, Any]
    wall_seconds: float
    cpu_seconds: float
    peak_rss_mb: float


def run_measured(args: list[str], env: dict[str, str], timeout: float = 3600) -> Measured:
    """Run ``python -m <args>`` and measure it with wait4 (peak RSS, CPU of the process)."""
    began = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: a chatty child can never block on a full pipe while we wait.
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, **env},
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                raise TimeoutError(f"{args} took longer than {timeout} s")
            time.sleep(0.05)
        wall = time.perf_counter() - began
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {stderr.strip().splitlines()[-3:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return Measured(
        result=json.loads(lines[-1]) if lines else {},
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,
    )
