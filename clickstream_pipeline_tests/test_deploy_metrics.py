"""deploy/metrics.yaml, the Prometheus exporter's Deployment and Service: valid Kubernetes objects
that run `clickstream metrics` as the CLI's own parser reads it, from the chart's image, with only
environment variables the code or the instance config reads, what the code server's old metrics
sidecar got (the warehouse Secret, DAGSTER_HOME) plus the Dagster instance the chart renders
(its instance ConfigMap and DAGSTER_PG_PASSWORD), probes and scrape annotations on the served
port; and the container's command line and env serving the ledger and instance series here."""

import copy
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import dagster as dg
import kubernetes.client as k8s  # type: ignore[import-untyped]
import psycopg2
import pytest
import requests
import yaml
from dagster._daemon.types import DaemonHeartbeat
from kubernetes.utils import parse_quantity  # type: ignore[import-untyped]
from psycopg2 import sql

from clickstream_pipeline.cli import ops as ops_cli
from clickstream_pipeline.config import Settings
from clickstream_pipeline_tests.helpers import attempt, free_port, outside_env, wait_for
from clickstream_pipeline_tests.manifests import (
    container,
    container_port,
    manifest_documents,
    one_of_kind,
    parsed,
    pod,
)
from clickstream_pipeline_tests.test_deploy import (
    BIN,
    DEPLOY,
    ROOT,
    k8s_object,
    start,
    stop,
)
from clickstream_pipeline_tests.test_deploy_vortex import unread

METRICS = DEPLOY / "metrics.yaml"
# What the chart's instance ConfigMap (dagster.yaml) reads from the environment: its PostgreSQL
# storage config, dagsterYaml.postgresql.config, has `password: {env: DAGSTER_PG_PASSWORD}`
# (and `username: {env: DAGSTER_PG_USERNAME}` only with global.postgresqlSecretUsernameKey).
INSTANCE_PASSWORD = "DAGSTER_PG_PASSWORD"


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return manifest_documents(METRICS)


@pytest.fixture(scope="module")
def deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one_of_kind(documents, "Deployment")


@pytest.fixture(scope="module")
def service(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return one_of_kind(documents, "Service")


def env_of(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(deployment)["env"]}


def secret_refs(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Variable -> its secretKeyRef."""
    return {
        name: e["valueFrom"]["secretKeyRef"]
        for name, e in env_of(deployment).items()
        if "valueFrom" in e
    }


def image_dagster_home() -> str:
    """DAGSTER_HOME as the Dockerfile sets it (what the sidecar had)."""
    match = re.search(r"^\s*DAGSTER_HOME=(\S+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match
    return match.group(1)


def instance_config_map(values: dict[str, Any]) -> str:
    """The chart's instance ConfigMap, `<dagster.fullname>-instance`, for the release that
    values.yaml's header installs: the release name, or `<release>-dagster` when the release
    name does not contain the chart's name."""
    header = (DEPLOY / "helm" / "values.yaml").read_text()
    (release,) = re.findall(r"helm upgrade --install (\S+) dagster/dagster", header)
    assert "fullnameOverride" not in values.get("global", {})
    fullname = release if "dagster" in release else f"{release}-dagster"
    return f"{fullname}-instance"


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
    for document in documents:
        metadata = document["metadata"]
        assert "namespace" not in metadata
        assert metadata["name"] == "clickstream-metrics"
        assert metadata["labels"]["app.kubernetes.io/name"] == metadata["name"]
        assert metadata["labels"]["app.kubernetes.io/part-of"] == "clickstream-pipeline"
    assert template.metadata.labels == deployment["metadata"]["labels"]
    # One replica, replaced old pod first: never two pods serving the same series at once.
    assert built.spec.replicas == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # The conversion is strict at the depth of a volume mount too.
    broken = copy.deepcopy(deployment)
    container(broken)["volumeMounts"][0]["subpath"] = "dagster.yaml"
    with pytest.raises(Exception, match=r"^Unexpected keys in model class V1VolumeMount"):
        k8s_object(k8s.V1Deployment, broken)


def test_it_runs_clickstream_metrics_on_every_interface(deployment: dict[str, Any]) -> None:
    assert container(deployment)["command"] == ["clickstream", "metrics"]
    context = parsed(deployment)
    assert context.command is ops_cli.metrics
    # 0.0.0.0, not the default 127.0.0.1, which the kubelet and Prometheus cannot reach.
    (host,) = [p for p in ops_cli.metrics.params if p.name == "host"]
    assert host.default == "127.0.0.1"
    assert context.params["host"] == "0.0.0.0"
    assert context.params["port"] == container_port(deployment, "metrics") == 9108
    # The parser is the CLI's: a misspelt option is refused.
    broken = copy.deepcopy(deployment)
    container(broken)["args"] = ["--host", "0.0.0.0", "--prot", "9108"]
    with pytest.raises(click.NoSuchOption, match="--prot"):
        parsed(broken)


def test_the_image_and_security_are_the_code_servers(
    deployment: dict[str, Any], code_server: dict[str, Any], values: dict[str, Any]
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
    # The code server's service account (the sidecar ran under it): its cloud identity gives
    # a Redshift URL without a password its IAM database credentials.
    assert pod(deployment)["serviceAccountName"] == values["global"]["serviceAccountName"]
    assert values["serviceAccount"]["name"] == values["global"]["serviceAccountName"]


def test_every_env_var_is_one_the_code_or_the_instance_reads(
    deployment: dict[str, Any], values: dict[str, Any]
) -> None:
    spec = container(deployment)
    assert "envFrom" not in spec  # every name is spelled out, so it can be checked
    names = set(env_of(deployment))
    refs = secret_refs(deployment)
    assert unread(names - {INSTANCE_PASSWORD}) == set()
    assert unread({"CLICKSTREAM_WAREHOUSE_UR"}) == {"CLICKSTREAM_WAREHOUSE_UR"}
    # The chart's instance config reads only the password from the environment here.
    assert "postgresqlSecretUsernameKey" not in values["global"]
    assert names == {
        "CLICKSTREAM_WAREHOUSE_URL",
        "CLICKSTREAM_VORTEX_URL",
        "DAGSTER_HOME",
        INSTANCE_PASSWORD,
    }
    # Secrets come from Secrets, never as values; each variable from the key of its own name
    # or, for the password, the key the chart itself reads it from.
    assert set(refs) == names - {"DAGSTER_HOME"}
    for name, ref in refs.items():
        assert ref["key"] == (name if name != INSTANCE_PASSWORD else "postgresql-password")


def test_it_gets_what_the_sidecar_got_and_the_instance(
    deployment: dict[str, Any], code_server: dict[str, Any], values: dict[str, Any]
) -> None:
    refs = secret_refs(deployment)
    env = env_of(deployment)
    # The sidecar took the code server's Secret whole (envFrom); of it, `clickstream metrics`
    # reads the warehouse URL (required) and the vortex URL (only where vortex's shard table is
    # not in the warehouse, so optional).
    secrets = {s["name"] for s in code_server["envSecrets"]}
    assert refs["CLICKSTREAM_WAREHOUSE_URL"]["name"] in secrets
    assert not refs["CLICKSTREAM_WAREHOUSE_URL"].get("optional", False)
    assert refs["CLICKSTREAM_VORTEX_URL"]["name"] in secrets
    assert refs["CLICKSTREAM_VORTEX_URL"]["optional"] is True
    settings = Settings.from_env(
        {"CLICKSTREAM_WAREHOUSE_URL": "redshift://w", "CLICKSTREAM_VORTEX_URL": "postgresql://v"}
    )
    assert settings.vortex_postgres_url == "postgresql://v"
    # DAGSTER_HOME: the image's (the sidecar had that one), the chart's global.dagsterHome.
    home = env["DAGSTER_HOME"]["value"]
    assert home == image_dagster_home() == "/opt/dagster/dagster_home"
    # ... holding the release's dagster.yaml, mounted from the chart's instance ConfigMap as the
    # chart mounts it into its daemon and webserver.
    (mount,) = container(deployment)["volumeMounts"]
    (volume,) = pod(deployment)["volumes"]
    assert mount["name"] == volume["name"]
    assert (mount["mountPath"], mount["subPath"]) == (f"{home}/dagster.yaml", "dagster.yaml")
    assert mount["readOnly"] is True
    assert volume["configMap"]["name"] == instance_config_map(values)
    assert "items" not in volume["configMap"] and "optional" not in volume["configMap"]
    # ... whose storage password comes from the chart's PostgreSQL Secret.
    assert refs[INSTANCE_PASSWORD] == {
        "name": values["global"]["postgresqlSecretName"],
        "key": "postgresql-password",
    }


def test_probes_target_the_served_port(deployment: dict[str, Any]) -> None:
    spec = container(deployment)
    served = parsed(deployment).params["port"]
    readiness = k8s_object(k8s.V1Probe, spec["readinessProbe"])
    liveness = k8s_object(k8s.V1Probe, spec["livenessProbe"])
    assert readiness.http_get.path == "/metrics"
    assert readiness.http_get.scheme in (None, "HTTP")
    assert container_port(deployment, readiness.http_get.port) == served
    # A scrape computes every series (about 0.9 s at 2,000 streams): not every few seconds.
    assert readiness.period_seconds >= 30 and readiness.timeout_seconds >= 10
    # Liveness costs no scrape and asks no database: a connect to the served port.
    assert (liveness.http_get, liveness._exec, liveness.grpc) == (None, None, None)
    assert container_port(deployment, liveness.tcp_socket.port) == served
    for probe in (readiness, liveness):
        assert probe.timeout_seconds < probe.period_seconds


def test_prometheus_finds_the_served_port_and_path(
    deployment: dict[str, Any], service: dict[str, Any], code_server: dict[str, Any]
) -> None:
    served = parsed(deployment).params["port"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(served),
        "prometheus.io/path": container(deployment)["readinessProbe"]["httpGet"]["path"],
    }
    # The Service selects this pod only, on the served port ...
    spec = service["spec"]
    assert spec.get("type", "ClusterIP") == "ClusterIP"
    selector = spec["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()
    for other in ("vortex.yaml", "registry.yaml"):
        (manifest,) = [
            d for d in yaml.safe_load_all((DEPLOY / other).read_text()) if d["kind"] == "Deployment"
        ]
        assert not selector.items() <= manifest["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= code_server["labels"].items()
    (port,) = spec["ports"]
    assert container_port(deployment, port["targetPort"]) == served
    # ... the target of docs/operations.md's scrape job.
    operations = (ROOT / "docs" / "operations.md").read_text()
    (target,) = re.findall(r'targets: \["([^"]+)"\]', operations)
    assert target == f"{service['metadata']['name']}:{port['port']}"


def test_resources_are_the_sidecars(deployment: dict[str, Any]) -> None:
    resources = k8s_object(k8s.V1ResourceRequirements, container(deployment)["resources"])
    assert (resources.requests, resources.limits) == (
        {"cpu": "50m", "memory": "128Mi"},
        {"cpu": "500m", "memory": "256Mi"},
    )
    for kind in ("cpu", "memory"):
        assert parse_quantity(resources.requests[kind]) <= parse_quantity(resources.limits[kind])


# ---------------------------------------------------------------------------------------------
# The container's command line and env, here
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def storage(local_stack: dict[str, str]) -> Iterator[tuple[Path, int, str]]:
    """A database of its own in the embedded PostgreSQL for Dagster's storage: its socket
    directory, port and name."""
    url = local_stack["CLICKSTREAM_WAREHOUSE_URL"]
    match = re.search(r"[?&]host=([^&]+)", url)
    assert match
    directory = Path(match.group(1))
    (port,) = [p.name.rsplit(".", 1)[1] for p in directory.glob(".s.PGSQL.*[0-9]")]
    name = f"dagster_{int(time.time() * 1000)}"
    admin = psycopg2.connect(url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield directory, int(port), name
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


def chart_dagster_yaml(values: dict[str, Any], directory: Path, port: int, name: str) -> str:
    """dagster.yaml as the chart's instance ConfigMap renders it from the values (storage, the
    K8sRunLauncher), pointed at the embedded PostgreSQL: its socket, port, database and user."""
    postgres = values["postgresql"]
    postgres_db = {
        "username": "postgres",
        "password": {"env": INSTANCE_PASSWORD},
        "hostname": "localhost",
        "db_name": name,
        "port": port,
        "params": {"host": str(directory)},
        "scheme": postgres["postgresqlScheme"],
    }
    storage = {
        kind: {"module": module, "class": cls, "config": {"postgres_db": postgres_db}}
        for kind, module, cls in (
            ("schedule_storage", "dagster_postgres.schedule_storage", "PostgresScheduleStorage"),
            ("run_storage", "dagster_postgres.run_storage", "PostgresRunStorage"),
            ("event_log_storage", "dagster_postgres.event_log", "PostgresEventLogStorage"),
        )
    }
    launcher = {
        "module": "dagster_k8s",
        "class": "K8sRunLauncher",
        "config": {
            "load_incluster_config": True,
            "job_namespace": "clickstream",
            "instance_config_map": instance_config_map(values),
            "dagster_home": image_dagster_home(),
            "postgres_password_secret": values["global"]["postgresqlSecretName"],
            "service_account_name": values["global"]["serviceAccountName"],
        },
    }
    return yaml.safe_dump(
        {**storage, "run_launcher": launcher, "telemetry": values["telemetry"]}, sort_keys=False
    )


def test_the_manifests_command_serves_the_ledger_and_the_instance(
    deployment: dict[str, Any],
    values: dict[str, Any],
    local_stack: dict[str, str],
    storage: tuple[Path, int, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The container's command line (loopback and a free port for its host and port) and env:
    its Secrets' keys as the embedded stack's values, the instance ConfigMap's dagster.yaml in a
    directory for DAGSTER_HOME. It serves the ledger series and, through that instance, a daemon
    heartbeat the instance holds."""
    spec = container(deployment)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(chart_dagster_yaml(values, *storage))
    secret_data = {
        ("clickstream-warehouse", "CLICKSTREAM_WAREHOUSE_URL"): local_stack[
            "CLICKSTREAM_WAREHOUSE_URL"
        ],
        (values["global"]["postgresqlSecretName"], "postgresql-password"): "",
    }
    env: dict[str, str] = {}
    for name, entry in env_of(deployment).items():
        if "value" in entry:
            env[name] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) in secret_data:
                env[name] = secret_data[ref["name"], ref["key"]]
            else:
                assert ref.get("optional"), name  # a missing optional key sets nothing
    assert env["DAGSTER_HOME"] == str(Path(spec["volumeMounts"][0]["mountPath"]).parent)
    env["DAGSTER_HOME"] = str(home)

    # The instance the exporter reads: the chart's dagster.yaml, with the password variable.
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv(INSTANCE_PASSWORD, raising=False)
    with pytest.raises(Exception, match=INSTANCE_PASSWORD):
        dg.DagsterInstance.get()
    monkeypatch.setenv(INSTANCE_PASSWORD, env[INSTANCE_PASSWORD])
    with dg.DagsterInstance.get() as instance:
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", "test", None))

    port = free_port()
    argv = [*spec["command"], *spec["args"]]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    argv[0] = str(BIN / argv[0])
    path = spec["readinessProbe"]["httpGet"]["path"]
    url = f"http://127.0.0.1:{port}{path}"
    log = tmp_path / "metrics.log"
    process = start(argv, {**outside_env(), **env}, log)
    try:
        wait_for(
            lambda: attempt(lambda: requests.get(url, timeout=20).ok) or process.poll() is not None,
            "the metrics endpoint",
            timeout=60,
        )
        assert process.poll() is None, log.read_text()
        # The probes, as the kubelet runs them.
        answer = requests.get(url, timeout=20)
        assert answer.status_code == 200, log.read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        body = answer.text
        assert "# TYPE clickstream_lag_seconds gauge" in body  # the ledger
        assert re.search(
            r'^clickstream_daemon_heartbeat_age_seconds\{daemon="SENSOR"\} ', body, re.MULTILINE
        ), body
        # Nothing written beside the mounted dagster.yaml (the root file system is read-only).
        assert [p.name for p in home.iterdir()] == ["dagster.yaml"]
    finally:
        stop(process)
