"""SIGTERM stops `clickstream stack`, `demo` and `dev` at any moment, as a supervisor or `kill`
sends it: within 10 s, with one line, and nothing they started is left running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from clickstream_pipeline_tests.helpers import free_port, outside_env

# From the signal to the command's exit, and to the last process it started gone.
STOP_SECONDS = 10
# Starting the embedded stack, or the demo reaching a stage, on a busy machine.
STARTUP_SECONDS = 180


@dataclass
class Command:
    """A ``clickstream`` command running in its own session, as a user's terminal runs it."""

    process: subprocess.Popen[bytes]
    root: Path
    stdout: Path
    stderr: Path

    def lines(self) -> list[str]:
        return self.stderr.read_text().splitlines()

    def wait_until(self, what: str, check: Callable[[], bool]) -> None:
        """Until ``check()`` holds; fails if the command exits first or it takes too long."""
        deadline = time.monotonic() + STARTUP_SECONDS
        while not check():
            assert self.process.poll() is None, f"exited before {what}:\n{self.stderr.read_text()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def wait_for_line(self, text: str, stream: str = "stderr") -> None:
        path = self.stderr if stream == "stderr" else self.stdout
        self.wait_until(repr(text), lambda: text in path.read_text())

    def family(self) -> list[psutil.Process]:
        """The command's descendants and every PostgreSQL process of its root (pg_ctl starts the
        postmaster detached: its parent is init, not the command)."""
        members = psutil.Process(self.process.pid).children(recursive=True)
        for postmaster in postgres_under(self.root):
            members.append(postmaster)
            try:
                members += postmaster.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        return members

    def sigterm_stops_everything(self, status: int) -> None:
        """SIGTERM: the command exits with ``status`` and its one line within STOP_SECONDS, and
        every process it started is gone by then."""
        family = self.family()
        assert family, "nothing started yet"
        signalled = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode = self.process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {STOP_SECONDS} s after SIGTERM") from None
        left = running(family, signalled + STOP_SECONDS)
        assert left == [], f"left running after SIGTERM: {left}"
        assert postgres_under(self.root) == []
        output = self.stderr.read_text()
        assert "Traceback" not in output, output
        assert self.lines()[-1] == "stopped", output
        assert returncode == status, output


@contextmanager
def clickstream(tmp_path: Path, *args: str, root_option: bool = True) -> Iterator[Command]:
    """``clickstream ARGS`` with its stack under ``tmp_path/root``, from a fresh shell. A command
    without ``--root`` gets a short folder of its own as its temporary folder instead (its stack
    goes a few levels below it, and PostgreSQL's socket path has a limit of 107 bytes)."""
    root = tmp_path / "root" if root_option else Path(tempfile.mkdtemp(prefix="cs-"))
    root.mkdir(exist_ok=True)
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    where = ["--root", str(root)] if root_option else []
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "clickstream_pipeline.cli", *args, *where],
            cwd=tmp_path,
            # Unbuffered: the test reads what the command printed so far.
            env=outside_env() | {"PYTHONUNBUFFERED": "1", "TMPDIR": str(root)},
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    command = Command(process, root, stdout, stderr)
    try:
        yield command
    finally:
        # A failed test leaves nothing behind for the next.
        leftovers = postgres_under(root)
        if process.poll() is None:
            leftovers += command.family()
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(STOP_SECONDS)
        for leftover in leftovers:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass
        if not root_option:
            shutil.rmtree(root, ignore_errors=True)


def postgres_under(root: Path) -> list[psutil.Process]:
    """Running postmasters whose data directory (``-D``) is under ``root`` (initdb and pg_ctl
    name it too, but they are not servers)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if (
            process.info["name"] == "postgres"
            and "-D" in cmdline[:-1]
            and cmdline[cmdline.index("-D") + 1].startswith(f"{root}/")
            and is_alive(process)
        ):
            found.append(process)
    return found


def is_alive(process: psutil.Process) -> bool:
    # An orphan's zombie waits for init to reap it; it runs nothing.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running(processes: list[psutil.Process], deadline: float) -> list[str]:
    """Command lines of the processes still running at ``deadline`` (checked until then)."""
    while True:
        alive = [process for process in processes if is_alive(process)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    lines = []
    for process in alive:
        try:
            lines.append(" ".join(process.cmdline())[:200])
        except psutil.NoSuchProcess:
            pass
    return lines


def dagster_run_started(root: Path) -> bool:
    """Whether the Dagster instance under ``root`` has a run (its event log file exists)."""
    return any((root / "dagster_home" / "history" / "runs").glob("*.db"))


def test_sigterm_while_the_stack_starts_stops_its_postgresql(tmp_path: Path) -> None:
    with clickstream(tmp_path, "stack") as stack:
        # The postmaster is up; the stack is still starting (the database, then S3 and Kinesis).
        stack.wait_until("the postmaster", lambda: bool(postgres_under(stack.root)))
        stack.sigterm_stops_everything(status=0)
        assert "embedded stack running" not in stack.stderr.read_text()


def test_sigterm_stops_the_running_stack(tmp_path: Path) -> None:
    with clickstream(tmp_path, "stack") as stack:
        stack.wait_for_line("export DAGSTER_HOME=", stream="stdout")
        stack.wait_for_line("embedded stack running")
        stack.sigterm_stops_everything(status=0)


# An interrupted demo did not finish: 128 + SIGTERM, as a shell reports a process it killed.
DEMO_STOPPED = 128 + signal.SIGTERM
DEMO = ("demo", "--customers", "2", "--events", "2", "--hours", "2", "--events-per-file", "300")


def test_sigterm_while_vortex_drains_the_demo_stream_stops_everything(tmp_path: Path) -> None:
    with clickstream(tmp_path, *DEMO) as demo:
        demo.wait_for_line("vortex is writing them to S3")
        demo.sigterm_stops_everything(status=DEMO_STOPPED)


def test_sigterm_while_the_demo_loads_through_dagster_stops_everything(tmp_path: Path) -> None:
    with clickstream(tmp_path, *DEMO) as demo:
        demo.wait_until("the first Dagster run", lambda: dagster_run_started(demo.root))
        demo.sigterm_stops_everything(status=DEMO_STOPPED)
        assert "every table holds exactly" not in demo.stdout.read_text()


def test_sigterm_while_the_bench_measures_stops_its_stack_and_loaders(tmp_path: Path) -> None:
    out = str(tmp_path / "results")
    with clickstream(
        tmp_path, "bench", "--quick", "--only", "dataplane", "--output", out, root_option=False
    ) as bench:
        bench.wait_for_line("bench: dataplane ...")
        bench.wait_until("the part's PostgreSQL", lambda: bool(postgres_under(bench.root)))
        bench.sigterm_stops_everything(status=DEMO_STOPPED)


def test_sigterm_while_dev_runs_a_load_stops_every_process_promptly(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    with clickstream(
        tmp_path, "dev", "--port", str(port), "--metrics-port", str(metrics_port)
    ) as dev:
        dev.wait_for_line("Dagster UI on http://127.0.0.1:")
        # The sensors launch a run for the sample; its worker (a child of the code server's gRPC
        # server, which waits for it) logs this as it starts the step's process.
        dev.wait_for_line("STEP_WORKER_STARTING")
        dev.sigterm_stops_everything(status=0)
