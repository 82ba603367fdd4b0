"""deploy/registry.yaml, the registry API's Deployment and Service: valid Kubernetes objects that
run `clickstream registry serve` as the CLI's own parser reads it, from the chart's image, with
only environment variables the code reads, tokens in files of a Secret mounted so a rotation
reaches the pod, probes on the served port; and the Helm values pointing the code location (and
so its run pods) at that Service with a read token instead of the old registry ConfigMap."""

import copy
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import kubernetes.client as k8s  # type: ignore[import-untyped]
import psutil
import pytest
import requests
from kubernetes.utils import parse_quantity  # type: ignore[import-untyped]

from clickstream_pipeline.cli import registry as registry_cli
from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.registry import load_registry, registry_backend
from clickstream_pipeline.registry_service import PUBLIC_PATHS, READ, WRITE, Tokens
from clickstream_pipeline_tests.helpers import attempt, free_port, outside_env, wait_for
from clickstream_pipeline_tests.manifests import (
    container,
    container_port,
    manifest_documents,
    one_of_kind,
    parsed,
    plain_env,
    pod,
)
from clickstream_pipeline_tests.test_deploy import BIN, DEPLOY, k8s_object, load_yaml, start, stop
from clickstream_pipeline_tests.test_deploy_vortex import names_the_project_reads

REGISTRY = DEPLOY / "registry.yaml"
FILE_SUFFIX = "_FILE"  # config.secret_from_env: NAME, or the file NAME_FILE names


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return manifest_documents(REGISTRY)


@pytest.fixture(scope="module")
def deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one_of_kind(documents, "Deployment")


@pytest.fixture(scope="module")
def service(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one_of_kind(documents, "Service")


def unread(names: set[str]) -> set[str]:
    """Names the package's code never reads: a NAME_FILE is read where NAME is a secret."""
    known = names_the_project_reads()
    return {name for name in names if name.removesuffix(FILE_SUFFIX) not in known}


def secret_volume(spec: dict[str, Any], mount_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Secret volume mounted at ``mount_path`` and its mount, in a pod or in the values."""
    (mount,) = [m for m in spec["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume, mount


def files_in_mount(volume: dict[str, Any], mount: dict[str, Any]) -> set[str]:
    """The paths the kubelet writes into the mount, one per item of the Secret volume."""
    items = volume["secret"].get("items")
    assert items, "name the keys: a missing key then fails the pod's start, visibly"
    return {f"{mount['mountPath']}/{item['path']}" for item in items}


def materialized(
    env: dict[str, str], mount_path: str, directory: Path, contents: dict[str, str]
) -> dict[str, str]:
    """``env`` with the Secret mounted at ``directory`` instead of ``mount_path``, holding
    ``contents`` (file name -> text), as the kubelet writes a Secret volume."""
    directory.mkdir(exist_ok=True)
    for name, text in contents.items():
        (directory / name).write_text(text)
    prefix = mount_path.rstrip("/") + "/"
    return {
        name: str(directory / value.removeprefix(prefix)) if value.startswith(prefix) else value
        for name, value in env.items()
    }


# ---------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------


def test_the_manifest_is_a_deployment_and_its_service(
    documents: list[dict[str, Any]], deployment: dict[str, Any], service: dict[str, Any]
) -> None:
    assert [(d["apiVersion"], d["kind"]) for d in documents] == [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
    ]
    built = k8s_object(k8s.V1Deployment, deployment)  # strict: an unknown field is an error
    k8s_object(k8s.V1Service, service)
    template = built.spec.template
    assert built.spec.selector.match_labels.items() <= template.metadata.labels.items()
    # vortex.yaml's conventions: applied with `kubectl -n clickstream`, no namespace in the file;
    # named by app.kubernetes.io/name, part of the pipeline.
    for document in documents:
        metadata = document["metadata"]
        assert "namespace" not in metadata
        assert metadata["name"] == "clickstream-registry"
        assert metadata["labels"]["app.kubernetes.io/name"] == metadata["name"]
        assert metadata["labels"]["app.kubernetes.io/part-of"] == "clickstream-pipeline"
    assert template.metadata.labels == deployment["metadata"]["labels"]
    # Two replicas, replaced new pod first: the API keeps answering through an update.
    assert built.spec.replicas >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # The conversion is strict in the Service too.
    broken = copy.deepcopy(service)
    broken["spec"]["ports"][0]["targetPrt"] = 8080
    with pytest.raises(Exception, match=r"^Unexpected keys in model class V1ServicePort"):
        k8s_object(k8s.V1Service, broken)


def test_it_runs_clickstream_registry_serve_on_every_interface(
    deployment: dict[str, Any],
) -> None:
    spec = container(deployment)
    assert spec["command"] == ["clickstream", "registry", "serve"]
    context = parsed(deployment)
    assert context.command is registry_cli.registry_serve
    # 0.0.0.0, not the default 127.0.0.1, which the kubelet and the Service cannot reach.
    (host,) = [p for p in registry_cli.registry_serve.params if p.name == "host"]
    assert host.default == "127.0.0.1"
    assert context.params["host"] == "0.0.0.0"
    assert context.params["port"] == container_port(deployment, "http") == 8080
    # The parser is the CLI's: a misspelt option is refused.
    broken = copy.deepcopy(deployment)
    container(broken)["args"] = ["--host", "0.0.0.0", "--prot", "8080"]
    with pytest.raises(click.NoSuchOption, match="--prot"):
        parsed(broken)


def test_the_image_is_the_code_locations(
    deployment: dict[str, Any], code_server: dict[str, Any]
) -> None:
    image = code_server["image"]
    spec = container(deployment)
    assert spec["image"] == f"{image['repository']}:{image['tag']}"
    assert spec["imagePullPolicy"] == image["pullPolicy"]
    assert pod(deployment)["securityContext"] == code_server["podSecurityContext"]
    security = k8s_object(k8s.V1SecurityContext, spec["securityContext"])
    assert security.allow_privilege_escalation is False
    assert security.capabilities.drop == ["ALL"]
    assert security.read_only_root_filesystem is True
    # It needs neither AWS nor the Kubernetes API: no service account token.
    assert pod(deployment)["automountServiceAccountToken"] is False


def test_every_env_var_is_one_the_code_reads(deployment: dict[str, Any]) -> None:
    spec = container(deployment)
    assert "envFrom" not in spec  # every name is spelled out, so it can be checked
    names = {e["name"] for e in spec["env"]}
    refs = [e["valueFrom"]["secretKeyRef"] for e in spec["env"] if "valueFrom" in e]
    assert unread(names | {ref["key"] for ref in refs}) == set()
    assert unread({"CLICKSTREAM_REGISTRY_BACKEN", "CLICKSTREAM_REGISTRY_READTOKEN_FILE"}) == {
        "CLICKSTREAM_REGISTRY_BACKEN",
        "CLICKSTREAM_REGISTRY_READTOKEN_FILE",
    }
    assert names == {
        "CLICKSTREAM_REGISTRY_BACKEND",
        "CLICKSTREAM_REGISTRY_READ_TOKEN_FILE",
        "CLICKSTREAM_REGISTRY_WRITE_TOKEN_FILE",
    }
    # The backend URL (it has a password) comes from the Secret, never as a value; no token is a
    # value either, only a file's path.
    (backend,) = [e for e in spec["env"] if e["name"] == "CLICKSTREAM_REGISTRY_BACKEND"]
    assert backend["valueFrom"]["secretKeyRef"] == {
        "name": "clickstream-registry",
        "key": "CLICKSTREAM_REGISTRY_BACKEND",
    }
    assert all(name.endswith(FILE_SUFFIX) for name in plain_env(spec["env"]))


def test_tokens_are_files_of_a_secret_mounted_as_a_directory(
    deployment: dict[str, Any], tmp_path: Path
) -> None:
    spec = container(deployment)
    files = {n: v for n, v in plain_env(spec["env"]).items() if n.endswith(FILE_SUFFIX)}
    assert set(files) == {
        "CLICKSTREAM_REGISTRY_READ_TOKEN_FILE",
        "CLICKSTREAM_REGISTRY_WRITE_TOKEN_FILE",
    }
    (mount,) = spec["volumeMounts"]
    volume, mount = secret_volume({**pod(deployment), **spec}, mount["mountPath"])
    # A subPath mount is never updated: a rotated token would not reach the pod.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount["readOnly"] is True
    assert volume["secret"]["secretName"] == "clickstream-registry"
    # Each variable names a file the kubelet writes into the mount.
    assert set(files.values()) == files_in_mount(volume, mount)
    # Readable by the container's user through the pod's group, by no one else.
    mode = volume["secret"]["defaultMode"]
    security = pod(deployment)["securityContext"]
    assert security["fsGroup"] == security["runAsGroup"] and mode & 0o040
    assert mode & 0o007 == 0

    # The server reads those files, at every request: tokens in the Secret's format (comma-
    # separated) take effect and stop without a restart.
    keys = {item["key"]: item["path"] for item in volume["secret"]["items"]}
    secret = tmp_path / "secret"
    env = materialized(
        plain_env(spec["env"]),
        mount["mountPath"],
        secret,
        {keys["read-tokens"]: "r1\n", keys["write-tokens"]: "w1\n"},
    )
    tokens = Tokens(env)
    assert tokens.configured()
    assert (tokens.scopes("r1"), tokens.scopes("w1"), tokens.scopes("r2")) == (
        [READ],
        [READ, WRITE],
        [],
    )
    (secret / keys["read-tokens"]).write_text("r1,r2\n")  # the new token beside the old
    assert (tokens.scopes("r1"), tokens.scopes("r2")) == ([READ], [READ])
    (secret / keys["read-tokens"]).write_text("r2\n")  # the old one withdrawn
    assert (tokens.scopes("r1"), tokens.scopes("r2")) == ([], [READ])
    # A misspelt variable is not read: the server would start with no token and refuse to.
    misspelt = {name.replace("_TOKEN_FILE", "_TOKENS_FILE"): v for name, v in env.items()}
    assert not Tokens(misspelt).configured()


def test_probes_use_the_served_port_and_healthz(deployment: dict[str, Any]) -> None:
    spec = container(deployment)
    served = parsed(deployment).params["port"]
    readiness = k8s_object(k8s.V1Probe, spec["readinessProbe"])
    liveness = k8s_object(k8s.V1Probe, spec["livenessProbe"])
    assert readiness.http_get.path == "/healthz"
    assert readiness.http_get.scheme in (None, "HTTP")
    assert container_port(deployment, readiness.http_get.port) == served
    # /healthz needs no token (the kubelet sends none) and asks the backend.
    assert "/healthz" in PUBLIC_PATHS
    # Liveness does not ask the database: a PostgreSQL outage must not restart the API.
    assert (liveness.http_get, liveness._exec, liveness.grpc) == (None, None, None)
    assert container_port(deployment, liveness.tcp_socket.port) == served
    for probe in (readiness, liveness):
        assert probe.timeout_seconds < probe.period_seconds


def test_the_service_selects_the_pods_and_targets_the_served_port(
    deployment: dict[str, Any], service: dict[str, Any], code_server: dict[str, Any]
) -> None:
    spec = service["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    selector = spec["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()
    # ... and no other pod of the pipeline: not vortex's, not the code server's.
    vortex = load_yaml(DEPLOY / "vortex.yaml")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= vortex.items()
    assert not selector.items() <= code_server["labels"].items()
    (port,) = spec["ports"]
    assert port["port"] == 8080
    assert container_port(deployment, port["targetPort"]) == parsed(deployment).params["port"]


def test_resources_hold_the_measured_server(deployment: dict[str, Any]) -> None:
    resources = k8s_object(k8s.V1ResourceRequirements, container(deployment)["resources"])
    for kind in ("cpu", "memory"):
        assert parse_quantity(resources.requests[kind]) <= parse_quantity(resources.limits[kind])
    # As the manifest's comment measured it over PostgreSQL: 87 MiB at the peak.
    assert parse_quantity(resources.requests["memory"]) >= 87 * 1024 * 1024
    assert parse_quantity(resources.limits["memory"]) >= 2 * 87 * 1024 * 1024


def test_the_manifests_command_serves_and_answers_its_probes(
    deployment: dict[str, Any],
    code_server: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The container's command line and env, on this machine: loopback and a free port for its
    host and port, the Secret's files in a directory, a YAML file for the PostgreSQL URL."""
    spec = container(deployment)
    (mount,) = spec["volumeMounts"]
    volume, mount = secret_volume({**pod(deployment), **spec}, mount["mountPath"])
    keys = {item["key"]: item["path"] for item in volume["secret"]["items"]}
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text("customers:\n  acme:\n    events: [page_view, add_to_cart]\n")
    env = materialized(
        {**plain_env(spec["env"]), "CLICKSTREAM_REGISTRY_BACKEND": str(registry_file)},
        mount["mountPath"],
        tmp_path / "secret",
        {keys["read-tokens"]: "read-1\n", keys["write-tokens"]: "write-1\n"},
    )
    port = free_port()
    argv = [*spec["command"], *spec["args"]]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    argv[0] = str(BIN / argv[0])
    url = f"http://127.0.0.1:{port}"
    readiness = spec["readinessProbe"]["httpGet"]["path"]
    process = start(argv, {**outside_env(), **env}, tmp_path / "registry.log")
    try:
        wait_for(
            lambda: (
                attempt(lambda: requests.get(url + readiness, timeout=5).ok)
                or process.poll() is not None
            ),
            "the registry API",
            timeout=60,
        )
        assert process.poll() is None, (tmp_path / "registry.log").read_text()
        # The probes, as the kubelet runs them: no token.
        health = requests.get(url + readiness, timeout=5)
        assert (health.status_code, health.json()) == (200, {"status": "ok", "streams": 2})
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert requests.get(f"{url}/customers", timeout=5).status_code == 401

        # The code location, configured as values.yaml configures it (its URL swapped for this
        # server's): reads with the read token from its mounted file, cannot write.
        location = plain_env(code_server["env"])
        _volume, client_mount = secret_volume(
            code_server, location["CLICKSTREAM_REGISTRY_TOKEN_FILE"].rsplit("/", 1)[0]
        )
        client = materialized(
            {**location, "CLICKSTREAM_REGISTRY": url},
            client_mount["mountPath"],
            tmp_path / "client-secret",
            {"token": "read-1\n"},
        )
        for name in ("CLICKSTREAM_REGISTRY", "CLICKSTREAM_REGISTRY_TOKEN_FILE"):
            monkeypatch.setenv(name, client[name])
        monkeypatch.delenv("CLICKSTREAM_REGISTRY_TOKEN", raising=False)
        assert {s.key for s in load_registry().streams} == {"acme.page_view", "acme.add_to_cart"}
        with pytest.raises(ClickstreamError, match="may read the registry, not change it"):
            registry_backend().add("acme", ["checkout"])
        # A rotation: the server takes the new token beside the old, the client moves to it,
        # the old one is withdrawn; no process restarts.
        (tmp_path / "secret" / keys["read-tokens"]).write_text("read-1,read-2\n")
        (tmp_path / "client-secret" / "token").write_text("read-2\n")
        assert len(load_registry().streams) == 2
        (tmp_path / "secret" / keys["read-tokens"]).write_text("read-2\n")
        assert len(load_registry().streams) == 2
        # Memory: the whole process, after all that, within the manifest's request.
        rss = psutil.Process(process.pid).memory_info().rss
        request = container(deployment)["resources"]["requests"]["memory"]
        assert rss < parse_quantity(request)
    finally:
        stop(process)


# ---------------------------------------------------------------------------------------------
# The Helm values: the code location reads the registry through the Service
# ---------------------------------------------------------------------------------------------


def test_the_code_location_reads_the_registry_through_the_service(
    code_server: dict[str, Any], service: dict[str, Any]
) -> None:
    env = plain_env(code_server["env"])
    location = urlsplit(env["CLICKSTREAM_REGISTRY"])
    (port,) = service["spec"]["ports"]
    assert (location.scheme, location.hostname, location.port, location.path) == (
        "http",
        service["metadata"]["name"],
        port["port"],
        "",
    )
    # The short name resolves in the release's namespace, where registry.yaml is applied.
    assert "deploymentNamespace" not in code_server
    # The old ConfigMap is gone: no ConfigMap volume, nothing mounted where it was.
    assert not [v for v in code_server["volumes"] if "configMap" in v]
    assert "/etc/clickstream" not in {m["mountPath"] for m in code_server["volumeMounts"]}
    config_maps = [c.get("name") for c in code_server.get("envConfigMaps") or []]
    assert "clickstream-registry" not in config_maps


def test_the_code_location_and_its_runs_get_only_a_read_token(
    code_server: dict[str, Any], deployment: dict[str, Any]
) -> None:
    env = {e["name"]: e for e in code_server["env"]}
    assert unread({name for name in env if name.startswith("CLICKSTREAM_REGISTRY")}) == set()
    assert "CLICKSTREAM_REGISTRY_TOKEN" not in env  # never a value in the values file
    path = env["CLICKSTREAM_REGISTRY_TOKEN_FILE"]["value"]
    volume, mount = secret_volume(code_server, path.rsplit("/", 1)[0])
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert mount["readOnly"] is True
    assert path == f"{mount['mountPath']}/token"
    assert volume["secret"]["secretName"] == "clickstream-registry-read"
    assert volume["secret"]["defaultMode"] & 0o040
    assert (
        code_server["podSecurityContext"]["fsGroup"]
        == code_server["podSecurityContext"]["runAsGroup"]
    )
    # The server's Secret (the backend URL, the write tokens) reaches no pod of the release.
    (server_volume,) = pod(deployment)["volumes"]
    server_secret = server_volume["secret"]["secretName"]
    assert server_secret not in {s["name"] for s in code_server["envSecrets"]}
    assert server_secret != volume["secret"]["secretName"]
    # Run pods get the code server's env, secrets and volumes (the chart's container context),
    # and the run launcher's own settings give them no other registry.
    assert code_server["includeConfigInLaunchedRuns"] == {"enabled": True}
    launcher = load_yaml(DEPLOY / "helm" / "values.yaml")["runLauncher"]["config"]["k8sRunLauncher"]
    assert not [v for v in launcher["envVars"] if v.startswith("CLICKSTREAM_REGISTRY")]
    assert not [v for v in launcher["volumes"] if "configMap" in v]
    assert "clickstream-registry" not in launcher["envConfigMaps"]


def test_the_docs_create_every_secret_key_the_pods_read(
    deployment: dict[str, Any], code_server: dict[str, Any]
) -> None:
    """docs/deploy.md's `kubectl create secret generic` commands make every (Secret, key) the
    registry's pods and the code location take, so following the page starts them."""
    created: set[tuple[str, str]] = set()
    docs = (DEPLOY.parent / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    for name, flags in re.findall(r"create secret generic (\S+)([^\n]*)", docs):
        created |= {(name, key) for key in re.findall(r"--from-literal=([^=\s]+)=", flags)}
    spec = container(deployment)
    read: set[tuple[str, str]] = {
        (ref["name"], ref["key"])
        for ref in (e["valueFrom"]["secretKeyRef"] for e in spec["env"] if "valueFrom" in e)
    }
    (volume,) = pod(deployment)["volumes"]
    read |= {(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]}
    path = plain_env(code_server["env"])["CLICKSTREAM_REGISTRY_TOKEN_FILE"]
    client, _mount = secret_volume(code_server, path.rsplit("/", 1)[0])
    read.add((client["secret"]["secretName"], path.rsplit("/", 1)[1]))
    assert len(read) == 4
    assert read <= created, read - created
