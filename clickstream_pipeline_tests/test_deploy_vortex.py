"""deploy/vortex.yaml, the microbatcher's Deployment: a valid Kubernetes object that runs
`clickstream vortex` on a stream, parsed by the CLI's own parser, from the chart's image, with
only environment variables the code reads, and time and memory to write what it batched."""

import ast
import copy
import importlib.metadata
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click
import kubernetes.client as k8s  # type: ignore[import-untyped]
import pytest
from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
from kubernetes.utils import parse_quantity  # type: ignore[import-untyped]

from clickstream_pipeline.cli import vortex
from clickstream_pipeline_tests.manifests import container, parsed, plain_env
from clickstream_pipeline_tests.test_deploy import DEPLOY, ROOT, k8s_object, load_yaml

VORTEX = DEPLOY / "vortex.yaml"
MIB = 1024 * 1024
ENV_NAME = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return load_yaml(VORTEX)


def parsed_with_env(manifest: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> click.Context:
    """The container's command line as the `clickstream` console script parses it, with the
    container's environment in place of this process's for the variables it reads."""
    for parameter in vortex.vortex.params:
        if isinstance(parameter.envvar, str):
            monkeypatch.delenv(parameter.envvar, raising=False)
    for name, value in plain_env(container(manifest)["env"]).items():
        monkeypatch.setenv(name, value)
    return parsed(manifest)


def names_the_project_reads() -> set[str]:
    """Every environment-variable-like string literal in the package's code."""
    names: set[str] = set()
    for path in (ROOT / "clickstream_pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if ENV_NAME.fullmatch(node.value):
                    names.add(node.value)
    return names


def names_botocore_reads() -> set[str]:
    """The variables of botocore's session configuration and its credential providers."""
    import botocore.credentials

    names: set[str] = set()
    for _config, env, _default, _convert in BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        names.update([env] if isinstance(env, str) else env or [])
    source = Path(botocore.credentials.__file__).read_text()
    names.update(re.findall(r"""['"](AWS_[A-Z_]+)['"]""", source))
    return names


def unread(names: Iterable[str]) -> set[str]:
    return set(names) - names_the_project_reads() - names_botocore_reads()


def test_the_manifest_is_one_valid_deployment(manifest: dict[str, Any]) -> None:
    # One object: the fixture's yaml.safe_load refuses a file of several documents.
    assert (manifest["apiVersion"], manifest["kind"]) == ("apps/v1", "Deployment")
    deployment = k8s_object(k8s.V1Deployment, manifest)  # strict: an unknown field is an error
    template = deployment.spec.template
    assert deployment.spec.selector.match_labels.items() <= template.metadata.labels.items()
    assert template.spec.service_account_name == "clickstream-pipeline"
    # The conversion is strict at the depth of an env var too.
    broken = copy.deepcopy(manifest)
    container(broken)["env"][0]["valu"] = "x"
    with pytest.raises(Exception, match=r"^Unexpected keys in model class V1EnvVar"):
        k8s_object(k8s.V1Deployment, broken)


def test_it_runs_clickstream_vortex_on_a_stream(
    manifest: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert container(manifest)["command"] == ["clickstream", "vortex"]
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="clickstream")
    assert script.value == "clickstream_pipeline.cli:main"
    context = parsed_with_env(manifest, monkeypatch)
    assert context.command is vortex.vortex
    assert (
        context.params["stream"]
        == plain_env(container(manifest)["env"])["CLICKSTREAM_KINESIS_STREAM"]
        != ""
    )
    assert context.params["until_idle"] is None  # a Deployment's worker runs until stopped
    # Without the stream variable the same command line is refused.
    monkeypatch.delenv("CLICKSTREAM_KINESIS_STREAM")
    spec = container(manifest)
    with pytest.raises(click.MissingParameter, match=r"^Missing parameter: stream$"):
        vortex.vortex.make_context("vortex", list(spec["args"]))


def test_the_image_is_the_code_locations(
    manifest: dict[str, Any], code_server: dict[str, Any]
) -> None:
    image = code_server["image"]
    assert container(manifest)["image"] == f"{image['repository']}:{image['tag']}"
    assert container(manifest)["imagePullPolicy"] == image["pullPolicy"]
    pod = manifest["spec"]["template"]["spec"]
    assert pod["securityContext"] == code_server["podSecurityContext"]


def test_every_env_var_is_one_the_code_reads(
    manifest: dict[str, Any], code_server: dict[str, Any]
) -> None:
    spec = container(manifest)
    assert "envFrom" not in spec  # every name is spelled out, so it can be checked
    names = {e["name"] for e in spec["env"]}
    refs = [e["valueFrom"]["secretKeyRef"] for e in spec["env"] if "valueFrom" in e]
    assert unread(names | {ref["key"] for ref in refs}) == set()
    assert unread(["CLICKSTREAM_KINESIS_STEAM"]) == {"CLICKSTREAM_KINESIS_STEAM"}
    # Secrets come from the code location's Secret, never as values.
    secrets = {s["name"] for s in code_server["envSecrets"]}
    assert {ref["name"] for ref in refs} <= secrets
    assert {ref["key"] for ref in refs} == {"CLICKSTREAM_WAREHOUSE_URL", "CLICKSTREAM_VORTEX_URL"}
    # Vortex writes where the loader reads, in the same region (botocore reads only
    # AWS_DEFAULT_REGION for a client's region).
    env = plain_env(container(manifest)["env"])
    location = {e["name"]: e["value"] for e in code_server["env"]}
    for name in ("CLICKSTREAM_BUCKET", "CLICKSTREAM_RAW_PREFIX", "AWS_MAX_ATTEMPTS"):
        assert env[name] == location[name], name
    assert BOTOCORE_DEFAUT_SESSION_VARIABLES["region"][1] == "AWS_DEFAULT_REGION"
    region = location.get("AWS_DEFAULT_REGION") or location["AWS_REGION"]
    assert env["AWS_DEFAULT_REGION"] == region


def test_stopping_leaves_time_to_write_a_batch(
    manifest: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (max_delay,) = [p for p in vortex.vortex.params if p.name == "max_delay"]
    assert max_delay.default == 60.0
    context = parsed_with_env(manifest, monkeypatch)
    grace = manifest["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= max(context.params["max_delay"], max_delay.default)
    # New pod first, then the old one: each shard changes hands once per update.
    assert manifest["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    # `clickstream health` judges the whole stream and needs the registry, which the pod does
    # not mount: as a probe it would restart every replica at once.
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        command = container(manifest).get(probe, {}).get("exec", {}).get("command", [])
        assert command[:2] != ["clickstream", "health"], probe


def test_memory_follows_the_flush_limits(
    manifest: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = k8s_object(k8s.V1ResourceRequirements, container(manifest)["resources"])
    for kind in ("cpu", "memory"):
        assert parse_quantity(resources.requests[kind]) <= parse_quantity(resources.limits[kind])
    # As the manifest's comment reckons it: 80 MiB for the process, and per shard held
    # 4 x --max-bytes for the batch and 70 MiB for the GetRecords response being decoded.
    max_bytes = parsed_with_env(manifest, monkeypatch).params["max_bytes"]
    per_shard = 4 * max_bytes + 70 * MIB
    assert parse_quantity(resources.requests["memory"]) >= 80 * MIB + per_shard
    assert parse_quantity(resources.limits["memory"]) >= 80 * MIB + 3 * per_shard
