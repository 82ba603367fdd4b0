"""Dagster as production runs it, on this machine: a code server, the webserver and the daemon.

``clickstream dev`` runs them as separate processes, the way the Helm chart does (the code
server is the Dockerfile's ``dagster code-server start``), so a registry change reloads the code
location through the webserver exactly as in production. Stopping stops every process they
started, whichever signal asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import yaml

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.local.stack import DAGSTER_ENV, deferred_interrupts, wait_gone
from clickstream_pipeline.webserver import DEFAULT_LOCATION

MODULE = "clickstream_pipeline.definitions"
_STARTUP_SECONDS = 180
# On SIGTERM a run worker records its run as failed within about a second; the webserver and
# the daemon take seconds on a busy machine, the code server longest: it waits for the gRPC
# server it started, which waits for the runs it executes and for its calls in flight (up to
# its grace period, a minute). Whatever still runs after this gets SIGKILL; a run whose worker
# had not yet recorded its failure stays STARTED until run monitoring fails it (see
# DAGSTER_YAML in stack.py).
STOP_GRACE_SECONDS = 3.0
# SIGKILL ends a process at once; this only waits for the kernel to say so.
_KILLED_SECONDS = 2.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def graphql(url: str, query: str, timeout: float = 60) -> Any:
    """The ``data`` of a GraphQL query to the webserver at ``url`` (OSError while it is down)."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["data"]


class DagsterServices:
    """The code server, webserver and daemon for this code location, under ``root``."""

    def __init__(
        self,
        root: str | Path,
        port: int | None = None,
        grpc_port: int | None = None,
        host: str = "127.0.0.1",
    ):
        self.root = Path(root)
        self.host = host
        self.port = port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self._processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def graphql(self, query: str) -> Any:
        return graphql(self.url, query)

    def asset_keys(self) -> set[str]:
        """Every asset the webserver serves, as ``a/b/c``."""
        nodes = self.graphql("{ assetNodes { assetKey { path } } }")["assetNodes"]
        return {"/".join(node["assetKey"]["path"]) for node in nodes}

    def has_asset(self, path: list[str]) -> bool:
        """Whether the webserver serves the asset ``path``."""
        key = json.dumps(path)
        data = self.graphql(f"{{ assetNodeOrError(assetKey: {{path: {key}}}) {{ __typename }} }}")
        return bool(data["assetNodeOrError"]["__typename"] == "AssetNode")

    def sensor_ticked(self, sensor: str) -> bool:
        """Whether ``sensor`` has completed a tick (skipped or requesting)."""
        data = self.graphql(
            "{ sensorOrError(sensorSelector: {repositoryLocationName: "
            f'"{DEFAULT_LOCATION}", repositoryName: "__repository__", sensorName: "{sensor}"}})'
            " { ... on Sensor { sensorState { ticks(limit: 5) { status } } } } }"
        )
        ticks = data["sensorOrError"].get("sensorState", {}).get("ticks", [])
        return any(tick["status"] in ("SKIPPED", "SUCCESS") for tick in ticks)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        workspace = self.root / "workspace.yaml"
        workspace.write_text(
            yaml.safe_dump(
                {
                    "load_from": [
                        {
                            "grpc_server": {
                                "host": self.host,
                                "port": self.grpc_port,
                                "location_name": DEFAULT_LOCATION,
                            }
                        }
                    ]
                }
            )
        )
        bin_dir = Path(sys.executable).parent
        self._spawn(
            bin_dir / "dagster",
            "code-server",
            "start",
            "-m",
            MODULE,
            "--location-name",
            DEFAULT_LOCATION,
            "-h",
            self.host,
            "-p",
            str(self.grpc_port),
        )
        self._wait_for_code_server(bin_dir / "dagster")
        self._spawn(
            bin_dir / "dagster-webserver",
            "-w",
            str(workspace),
            "-h",
            self.host,
            "-p",
            str(self.port),
        )
        self._spawn(bin_dir / "dagster-daemon", "run", "-w", workspace)

    def _spawn(self, *command: str | Path) -> None:
        env = {**DAGSTER_ENV, **os.environ}
        self._processes.append(subprocess.Popen([str(part) for part in command], env=env))

    def _wait_for_code_server(self, dagster: Path) -> None:
        """Until the code server answers (it has loaded the definitions), or it exits."""
        deadline = time.monotonic() + _STARTUP_SECONDS
        server = self._processes[0]
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise ClickstreamError("the Dagster code server exited while loading the code")
            check = subprocess.run(
                [
                    str(dagster),
                    "api",
                    "grpc-health-check",
                    "-h",
                    self.host,
                    "-p",
                    str(self.grpc_port),
                ],
                capture_output=True,
                check=False,
            )
            if check.returncode == 0:
                return
            time.sleep(0.5)
        raise ClickstreamError(
            f"the Dagster code server did not load the code in {_STARTUP_SECONDS} s"
        )

    def wait(self) -> int:
        """Until any of the processes exits; its exit status."""
        while True:
            for process in self._processes:
                status = process.poll()
                if status is not None:
                    return status
            time.sleep(0.5)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop every process started, and every process they started: SIGTERM to all of them
        at once, SIGKILL to those still running ``grace`` seconds later."""
        with deferred_interrupts():
            family = self._family()
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.terminate()
            alive = self._wait(family, grace)
            # And what they started meanwhile (a run worker's step process).
            for member in [*alive, *self._family()]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            self._wait([*alive, *self._family()], _KILLED_SECONDS)
            self._processes = []

    def _family(self) -> list[psutil.Process]:
        family: list[psutil.Process] = []
        for process in self._processes:
            try:
                parent = psutil.Process(process.pid)
                family += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return [member for member in family if member.is_running()]

    def _wait(self, family: list[psutil.Process], timeout: float) -> list[psutil.Process]:
        """Until ``family`` has exited, or ``timeout``; those still running. Our own children
        are reaped meanwhile; others are reaped by their parents, or by init."""
        deadline = time.monotonic() + timeout
        while True:
            for process in self._processes:
                process.poll()
            alive = wait_gone(family, 0)
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.05)

    def __enter__(self) -> DagsterServices:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
