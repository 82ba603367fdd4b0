"""The registry API in a process of its own, answering: for the benchmark and the tests, as
`clickstream registry serve` runs in a deployment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.local.dagster import free_port


@dataclass(frozen=True)
class RunningRegistry:
    url: str
    pid: int


@contextmanager
def registry_api(
    backend: str,
    read_token: str,
    write_token: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> Iterator[RunningRegistry]:
    """``clickstream registry serve`` over ``backend`` accepting the two tokens (``env`` adds to
    or overrides its environment), once ``/healthz`` answers; stopped on exit. Its output goes
    to ``log`` (default: nowhere)."""
    port = port or free_port()
    environment = {
        **os.environ,
        "CLICKSTREAM_REGISTRY_BACKEND": backend,
        "CLICKSTREAM_REGISTRY_READ_TOKEN": read_token,
        "CLICKSTREAM_REGISTRY_WRITE_TOKEN": write_token,
        **(env or {}),
    }
    command = [sys.executable, "-m", "clickstream_pipeline.cli", "registry", "serve"]
    with open(log or os.devnull, "w") as sink:
        server = subprocess.Popen(
            [*command, "--port", str(port)], env=environment, stdout=sink, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _answers(url):
            if server.poll() is not None:
                tail = log.read_text()[-500:] if log else ""
                raise ClickstreamError(f"the registry API exited with {server.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise ClickstreamError(f"the registry API did not answer at {url} in 60 s")
            time.sleep(0.2)
        yield RunningRegistry(url, server.pid)
    finally:
        server.terminate()
        try:
            # Not its 10 s graceful shutdown: requests a load left queued are not waited for.
            server.wait(3)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=5).ok
    except requests.RequestException:
        return False
