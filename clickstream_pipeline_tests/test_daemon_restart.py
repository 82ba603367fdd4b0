"""The Dagster daemon SIGKILLed mid-run: with its whole process group, then restarted (run
monitoring fails the orphaned run, run retries re-run it), or alone (the run finishes). Either
way the rows end exact and unique."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml

from clickstream_pipeline.jobs import LOAD_JOB
from clickstream_pipeline.local.stack import DAGSTER_YAML
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline_tests.helpers import message_ids, query
from clickstream_pipeline_tests.test_faults import _copy_backend, write_partition

RETRY_NUMBER_TAG = "dagster/retry_number"
# The local instance's settings with a runtime limit short enough for a test: the limit is what
# fails a run whose worker died with the daemon (docs/reliability.md), and it must still exceed
# the retried run's load of 100,000 events on a busy 2-core machine.
TEST_MAX_RUNTIME_SECONDS = 30


def instance_yaml() -> str:
    config = yaml.safe_load(DAGSTER_YAML)
    config["run_monitoring"].update(
        max_runtime_seconds=TEST_MAX_RUNTIME_SECONDS, poll_interval_seconds=2
    )
    return yaml.safe_dump(config)


@contextmanager
def daemon(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``dagster-daemon run`` in a process group of its own (its code server and run workers
    join it), logging to ``log``; whatever is left of the group is stopped at the end."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-daemon"),
                "run",
                "-m",
                "clickstream_pipeline.definitions",
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        members = group_members(process.pid)
        for member in members:
            member.terminate()
        psutil.wait_procs(members, timeout=60)
        process.wait(60)


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return members


def load_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(
        instance.get_runs(filters=dg.RunsFilter(job_name=LOAD_JOB), ascending=True)  # oldest first
    )


def one_stream_instance(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str, seed: int
) -> tuple[Stream, Path, dict[str, str]]:
    """A registry of one stream with an hour of 100,000 events in 2 files, and a Dagster home
    with run monitoring and retries: the stream, the home and the daemon's environment."""
    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 100_000, files=2, seed=seed)
    YamlFileRegistry(registry_path).save(Registry().with_streams([stream]))
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml())
    return stream, home, {**os.environ, **pipeline, "DAGSTER_HOME": str(home)}


@pytest.mark.slow(seconds=110)
def test_a_daemon_killed_mid_run_is_retried_to_an_exact_load(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    stream, home, env = one_stream_instance(pipeline, registry_path, tmp_path, customer, seed=21)
    ledger_rows = "SELECT count(*) FROM clickstream.load_ledger WHERE stream = %s"

    with daemon(env, tmp_path / "daemon-1.log") as first:
        # The discovery sensor's first tick requests the load; wait until its COPY is running.
        _copy_backend(url, timeout=90)
        members = group_members(first.pid)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    # The daemon, its code server and the run worker were all in the group, and all are gone.
    assert len(members) >= 3, [p.cmdline() for p in members]
    psutil.wait_procs(members, timeout=10)
    assert group_members(first.pid) == []
    assert query(url, ledger_rows, (str(stream),)) == [(0,)]

    with dg.DagsterInstance.from_config(str(home)) as instance:
        [orphan] = load_runs(instance)
        assert orphan.status == dg.DagsterRunStatus.STARTED  # nobody is left to say otherwise

        with daemon(env, tmp_path / "daemon-2.log"):
            deadline = time.monotonic() + 90
            runs = load_runs(instance)
            while time.monotonic() < deadline and not (
                len(runs) == 2 and runs[1].status == dg.DagsterRunStatus.SUCCESS
            ):
                time.sleep(1)
                runs = load_runs(instance)

        assert [(run.status, run.tags.get(RETRY_NUMBER_TAG)) for run in runs] == [
            (dg.DagsterRunStatus.FAILURE, None),
            (dg.DagsterRunStatus.SUCCESS, "1"),
        ]
        assert runs[1].parent_run_id == orphan.run_id
        # The runtime limit is what failed it: the default run launcher cannot see a dead worker.
        canceling = instance.all_logs(orphan.run_id, of_type=dg.DagsterEventType.RUN_CANCELING)
        assert canceling[0].message == (
            f"Canceling due to exceeding maximum runtime of {TEST_MAX_RUNTIME_SECONDS} seconds."
        )
    assert len(message_ids(url, stream)) == 100_000
    assert query(url, ledger_rows, (str(stream),)) == [(1,)]


@pytest.mark.slow(seconds=70)
def test_a_daemon_killed_alone_mid_run_leaves_the_run_to_finish(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    stream, home, env = one_stream_instance(pipeline, registry_path, tmp_path, customer, seed=22)

    with (
        dg.DagsterInstance.from_config(str(home)) as instance,
        daemon(env, tmp_path / "daemon.log") as alone,
    ):
        _copy_backend(url, timeout=90)
        alone.send_signal(signal.SIGKILL)  # the daemon only: its code server and worker live on
        alone.wait(30)
        deadline = time.monotonic() + 60
        runs = load_runs(instance)
        while time.monotonic() < deadline and not (runs and runs[0].is_finished):
            time.sleep(1)
            runs = load_runs(instance)

        assert [(run.status, run.tags.get(RETRY_NUMBER_TAG)) for run in runs] == [
            (dg.DagsterRunStatus.SUCCESS, None)
        ]
    assert len(message_ids(url, stream)) == 100_000
    assert query(
        url, "SELECT count(*) FROM clickstream.load_ledger WHERE stream = %s", (str(stream),)
    ) == [(1,)]
