"""Reading the Kubernetes manifests in deploy/ (vortex, the registry API, metrics) the way the
deploy tests check them: a manifest's objects by kind, its one container, a port by name, and
its command line as the `clickstream` console script parses it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import yaml

from clickstream_pipeline.cli import cli


def manifest_documents(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(path.read_text()))


def one_of_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (only,) = [d for d in documents if d["kind"] == kind]
    return only


def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod(deployment)["containers"]
    return only


def plain_env(env: list[dict[str, Any]]) -> dict[str, str]:
    """The variables of ``env`` set to a value (not from a Secret or a field)."""
    return {e["name"]: e["value"] for e in env if "value" in e}


def container_port(deployment: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port (a number or a port name) as a number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container(deployment)["ports"] if p["name"] == port]
    return int(number)


def parsed(deployment: dict[str, Any]) -> click.Context:
    """The container's command line as the `clickstream` console script parses it, through its
    command groups (`registry`) to the command (`serve`)."""
    spec = container(deployment)
    argv = [*spec["command"][1:], *spec.get("args", [])]
    context = click.Context(cli, info_name="clickstream")
    command: click.Command = cli
    while isinstance(command, click.Group):
        name, argv = argv[0], argv[1:]
        found = command.get_command(context, name)
        assert found is not None, name
        command = found
        context = click.Context(command, info_name=name, parent=context)
    return command.make_context(context.info_name, argv, parent=context.parent)
