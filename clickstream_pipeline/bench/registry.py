"""Registry API: ``clickstream registry serve`` over a PostgreSQL registry of 2,000 streams, under
open-loop load (reads, writes, and both at once), and the registry read of a sensor tick through
the API and through ``postgresql://`` directly.

The load generator is a child process of its own (asyncio on uvloop with aiohttp) on the same
machine. It sends requests on a fixed schedule whatever the answers do (open loop), and a
request's latency runs from its scheduled send time, so a server falling behind shows as the
queueing it causes rather than as fewer requests sent (no coordinated omission)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import requests

from clickstream_pipeline.bench.common import (
    Measured,
    _peak_rss_mb,
    fresh_database,
    run_measured,
    stack_process,
)
from clickstream_pipeline.generator import customer_names, event_names
from clickstream_pipeline.local.registry import registry_api
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry

MODULE = "clickstream_pipeline.bench.registry"
DATABASE = "registry_bench"
READ_TOKEN = "bench-read-token"
WRITE_TOKEN = "bench-write-token"
# Of every three writes, two PUT a new event and one DELETEs an event PUT about a second earlier.
DELETE_EVERY = 3
DELETE_LAG_SECONDS = 1.0
# Seconds: a request unanswered by then is given up, an error counted at this latency. 100 times
# the goal: a load that reaches it has long failed, and a shorter wait keeps the bench short.
REQUEST_TIMEOUT = 5.0


def run(
    customers: int = 50,
    events: int = 40,
    read_rate: int = 1_000,
    write_rate: int = 100,
    seconds: float = 20.0,
    warmup: float = 3.0,
    samples: int = 200,
    small: tuple[int, int] | None = (5, 4),
) -> dict[str, Any]:
    """Reads (a small registry's too, with ``small``, for half as long), writes, then both at
    once, each for ``warmup`` + ``seconds``; then ``samples`` sensor-tick reads of each kind.

    Each load has a server process of its own over the seeded registry: a load the server could
    not keep up with leaves requests queued in it, which must not spill into the next one."""
    streams = [Stream(c, e) for c in customer_names(customers) for e in event_names(events)]
    seeded = Registry().with_streams(streams)
    results: dict[str, Any] = {
        "streams": len(streams),
        "customers": customers,
        "seconds": seconds,
        "warmup_seconds": warmup,
        "cores": psutil.cpu_count(),
        "loads": {},
    }
    loads: list[tuple[str, Registry, dict[str, Any]]] = []
    if small:
        few = [Stream(c, e) for c in customer_names(small[0]) for e in event_names(small[1])]
        loads.append(
            (
                "reads_small",
                Registry().with_streams(few),
                {"reads": read_rate, "seconds": seconds / 2},
            )
        )
    loads += [
        ("reads", seeded, {"reads": read_rate}),
        ("writes", seeded, {"writes": write_rate}),
        ("mixed", seeded, {"reads": read_rate, "writes": write_rate}),
    ]
    with (
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as root,
        stack_process(Path(root) / "stack") as stack,
    ):
        url = fresh_database(stack.env["CLICKSTREAM_WAREHOUSE_URL"], DATABASE)
        env = {**stack.env, "CLICKSTREAM_REGISTRY": url}
        for name, registry, spec in loads:
            _reset(url, registry)
            # Counted with the server stopped: a backend reports its counts when it exits.
            sessions, commits, changes = _database_counters(url)
            with _server(url, Path(root) / f"server-{name}.log") as (api, pid):
                spec = {"seconds": seconds, "warmup": warmup, **spec, "url": api, "tag": name}
                result = _load(env, pid, url, spec)
                result["server_peak_rss_mb"] = round(_peak_rss_mb(pid) or 0.0, 1)
            answered = result.pop("answered_all")
            time.sleep(0.5)
            sessions_after, commits_after, changes_after = _database_counters(url)
            # Less the count's own connection before.
            result["postgres_sessions_per_request"] = round(
                (sessions_after - sessions - 1) / answered, 3
            )
            result["postgres_commits_per_request"] = round((commits_after - commits) / answered, 2)
            server_cpu = result.pop("server_cpu_seconds")
            if "writes" in spec:
                # What the server wrote, whether or not the client still waited for the answer.
                committed = changes_after - changes
                result["writes_committed"] = committed
                # Over the generator's run, warm-up included.
                result["writes_committed_per_second"] = round(committed / result["run_seconds"], 1)
                if "reads" not in spec and committed:
                    result["server_cpu_ms_per_committed_write"] = round(
                        1000 * server_cpu / committed, 2
                    )
            results["loads"][name] = {"streams": len(registry.streams), **result}
        _reset(url, seeded)
        with _server(url, Path(root) / "server-tick.log") as (api, _):
            tick = run_measured(
                [MODULE, "tick", api, url, str(samples)],
                {**env, "CLICKSTREAM_REGISTRY_TOKEN": READ_TOKEN},
                timeout=300,
            )
        results["sensor_tick"] = tick.result
    return results


def _reset(url: str, registry: Registry) -> None:
    from clickstream_pipeline.registry_postgres import PostgresRegistry

    backend = PostgresRegistry(url, actor="bench", origin="bench")
    try:
        backend.save(registry)
    finally:
        backend.close()


@contextmanager
def _server(backend: str, log: Path) -> Iterator[tuple[str, int]]:
    """The registry API over ``backend``, answering: its URL and process id. Its log (one
    access line per request, as deployed) goes to ``log``."""
    with registry_api(backend, READ_TOKEN, WRITE_TOKEN, log=log) as server:
        yield server.url, server.pid


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    # softirq: loopback traffic, which processes are charged as system time too
    return float(
        times.user + times.system + getattr(times, "nice", 0.0) + getattr(times, "softirq", 0.0)
    )


def _postgres_seconds(url: str) -> float:
    """CPU of the PostgreSQL server behind ``url``: the postmaster's, its live backends' and
    (``children_*``) those that exited meanwhile: connections opened and closed included."""
    socket = re.search(r"[?&]host=([^&]+)", url)
    if socket is None:
        return 0.0
    try:
        postmaster = psutil.Process(
            int((Path(socket.group(1)) / "postmaster.pid").read_text().split()[0])
        )
        times = postmaster.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in postmaster.children():
            with contextlib.suppress(psutil.Error):
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
    except (OSError, ValueError, psutil.Error):
        return 0.0
    return float(total)


def _database_counters(url: str) -> tuple[int, int, int]:
    """Sessions opened and transactions committed in ``url``'s database so far, and the
    registry's history rows (one per stream a committed write added or removed)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT sessions, xact_commit FROM pg_stat_database WHERE datname = "
                "current_database()"
            )
            row = cur.fetchone()
            cur.execute("SELECT count(*) FROM clickstream.registry_changes")
            changes = cur.fetchone()
    finally:
        conn.close()
    sessions, commits = (int(row[0]), int(row[1])) if row else (0, 0)
    return sessions, commits, int(changes[0]) if changes else 0


def _load(env: dict[str, str], pid: int, url: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One load in the generator's process, with the CPU it cost (percent of one core, over the
    generator's run, warm-up included) the server, the generator, PostgreSQL and everything else
    on the machine (other processes' work competes for the same cores)."""
    server = psutil.Process(pid)
    before = server.cpu_times()
    busy, postgres = _busy_seconds(), _postgres_seconds(url)
    measured: Measured = run_measured([MODULE, "load", json.dumps(spec)], env, timeout=300)
    after = server.cpu_times()
    server_cpu = (after.user + after.system) - (before.user + before.system)
    postgres_cpu = _postgres_seconds(url) - postgres
    machine_cpu = _busy_seconds() - busy
    run_seconds = float(measured.result.pop("run_seconds"))
    answered = max(1, int(measured.result["answered_all"]))

    def percent(cpu: float) -> int:
        return round(100 * cpu / measured.wall_seconds)

    return {
        **{k: v for k, v in measured.result.items() if k != "answered_all"},
        "run_seconds": round(run_seconds, 1),
        "cpu_percent_of_a_core": {
            "server": percent(server_cpu),
            "load_generator": percent(measured.cpu_seconds),
            "postgres": percent(postgres_cpu),
            "other": percent(
                max(0.0, machine_cpu - server_cpu - measured.cpu_seconds - postgres_cpu)
            ),
            "machine": percent(machine_cpu),
            "machine_capacity": 100 * (psutil.cpu_count() or 1),
        },
        "cpu_ms_per_answered_request": {
            "server": round(1000 * server_cpu / answered, 2),
            "postgres": round(1000 * postgres_cpu / answered, 2),
            "load_generator": round(1000 * measured.cpu_seconds / answered, 2),
        },
        "answered_all": answered,
        "server_cpu_seconds": server_cpu,
    }


# --- the load generator (a child process) ---------------------------------------------------


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    ordered = sorted(latencies)

    def at(q: float) -> float | None:
        if not ordered:
            return None
        return round(
            1000 * ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))], 2
        )

    return {
        "p50_ms": at(0.50),
        "p95_ms": at(0.95),
        "p99_ms": at(0.99),
        "max_ms": round(1000 * ordered[-1], 2) if ordered else None,
    }


class _Schedule:
    """One fixed-rate stream of requests and what became of those sent in the measured window."""

    def __init__(
        self,
        rate: float,
        make: Callable[[int], tuple[str, str, dict[str, str], tuple[int, ...]]],
    ) -> None:
        self.rate = rate
        self.make = make
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.errors = 0
        self.ok = 0
        self.answered_all = 0  # warm-up included
        self.last_done = 0.0
        self.dispatch_lag = 0.0  # how late the generator sent a request, at worst

    async def run(
        self, session: Any, base: str, start: float, warmup: float, seconds: float
    ) -> None:
        import aiohttp

        clock = time.perf_counter  # uvloop's loop.time() moves in whole milliseconds
        window = start + warmup
        total = int((warmup + seconds) * self.rate)
        tasks: set[asyncio.Task[None]] = set()

        async def fire(index: int, scheduled: float) -> None:
            method, path, headers, ok = self.make(index)
            measured = scheduled >= window
            try:
                async with session.request(method, base + path, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as error:
                if measured:  # in the percentiles too: at the time it was given up
                    self.latencies.append(clock() - scheduled)
                    self.statuses[type(error).__name__] += 1
                    self.errors += 1
                return
            done = clock()
            self.answered_all += 1
            if measured:
                self.latencies.append(done - scheduled)
                self.statuses[str(status)] += 1
                self.last_done = max(self.last_done, done)
                if status in ok:
                    self.ok += 1
                else:
                    self.errors += 1

        index = 0
        while index < total:
            now = clock()
            while index < total and start + index / self.rate <= now:
                scheduled = start + index / self.rate
                if scheduled >= window:
                    self.dispatch_lag = max(self.dispatch_lag, now - scheduled)
                task = asyncio.create_task(fire(index, scheduled))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                index += 1
            if index < total:
                await asyncio.sleep(max(0.0, start + index / self.rate - clock()))
        if tasks:
            await asyncio.gather(*tasks)

    def summary(self, window_start: float, seconds: float) -> dict[str, Any]:
        elapsed = max(seconds, self.last_done - window_start)
        answered = sum(n for status, n in self.statuses.items() if status.isdigit())
        return {
            "target_per_second": self.rate,
            "requests": int(seconds * self.rate),
            "answered": answered,
            "achieved_per_second": round(self.ok / elapsed, 1),
            **_percentiles(self.latencies),
            "errors": self.errors,
            "statuses": dict(sorted(self.statuses.items())),
            "dispatch_lag_max_ms": round(1000 * self.dispatch_lag, 2),
        }


def child_load(spec_json: str) -> dict[str, Any]:
    """Reads (``GET /customers``, unconditional: the whole registry every time) and writes (``PUT``
    of new events, every third a ``DELETE`` of one put a second before), at fixed rates."""
    spec = json.loads(spec_json)
    customers = list(_customers(spec["url"]))
    tag = spec.get("tag", "load")
    read_headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    write_headers = {"Authorization": f"Bearer {WRITE_TOKEN}", "X-Clickstream-Actor": "bench"}
    write_rate = float(spec.get("writes", 0))
    # Slots between a PUT and its DELETE: about DELETE_LAG_SECONDS, whole groups of writes.
    lag = DELETE_EVERY * max(1, round(DELETE_LAG_SECONDS * write_rate / DELETE_EVERY))

    def read(index: int) -> tuple[str, str, dict[str, str], tuple[int, ...]]:
        return "GET", "/customers", read_headers, (200,)

    def event_path(index: int) -> str:
        return f"/customers/{customers[index % len(customers)]}/events/{tag}_{index}"

    def write(index: int) -> tuple[str, str, dict[str, str], tuple[int, ...]]:
        if index % DELETE_EVERY == DELETE_EVERY - 1 and index >= lag:
            # The first PUT of the group of writes ``lag`` slots before this one's.
            put = index - lag - (DELETE_EVERY - 1)
            return "DELETE", event_path(put), write_headers, (200,)
        return "PUT", event_path(index), write_headers, (201,)

    schedules = {}
    if spec.get("reads"):
        schedules["reads"] = _Schedule(float(spec["reads"]), read)
    if write_rate:
        schedules["writes"] = _Schedule(write_rate, write)

    async def main() -> float:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=512)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = time.perf_counter() + 0.2
            await asyncio.gather(
                *(
                    schedule.run(session, spec["url"], start, spec["warmup"], spec["seconds"])
                    for schedule in schedules.values()
                )
            )
            return start

    began = time.perf_counter()
    try:
        import uvloop

        start = uvloop.run(main())
    except ImportError:
        start = asyncio.run(main())
    result: dict[str, Any] = {
        name: schedule.summary(start + spec["warmup"], spec["seconds"])
        for name, schedule in schedules.items()
    }
    result["run_seconds"] = time.perf_counter() - began
    result["answered_all"] = sum(schedule.answered_all for schedule in schedules.values())
    return result


def _customers(url: str) -> Iterator[str]:
    response = requests.get(
        f"{url}/customers", headers={"Authorization": f"Bearer {READ_TOKEN}"}, timeout=10
    )
    response.raise_for_status()
    yield from response.json()["customers"]


# --- a sensor tick's registry read (a child process) ----------------------------------------


def child_tick(api: str, database: str, samples: str) -> dict[str, Any]:
    """``load_registry(location, missing_ok=True)`` as the registry-sync sensor calls it, through
    the API (``CLICKSTREAM_REGISTRY_TOKEN``) and from PostgreSQL directly: the first read of a new
    backend (a process's first tick), unchanged reads (the API answers 304), and reads after
    each of a few changes made meanwhile by someone else."""
    from clickstream_pipeline import registry as registry_module
    from clickstream_pipeline.registry import load_registry
    from clickstream_pipeline.registry_postgres import PostgresRegistry

    count = int(samples)
    firsts = max(5, count // 10)
    changes = max(5, count // 4)
    editor = PostgresRegistry(database, actor="bench", origin="bench")
    results: dict[str, Any] = {"samples": count}

    def timed(location: str) -> float:
        """One read as the sensor makes it, in seconds."""
        began = time.perf_counter()
        load_registry(location, missing_ok=True)
        return time.perf_counter() - began

    def forget(location: str) -> None:
        """Drop the process's backend for ``location`` and its connections: the next read is a
        new process's first."""
        backend = registry_module.registry_backend(location)
        session = getattr(backend, "_session", None)  # HttpRegistry's requests.Session
        close = session.close if session is not None else getattr(backend, "close", None)
        if close is not None:
            close()
        registry_module._backend.cache_clear()

    for kind, location in (("http", api), ("postgresql", database)):
        streams = len(load_registry(location, missing_ok=True).streams)
        first = []
        for _ in range(firsts):
            forget(location)
            first.append(timed(location))
        unchanged = [timed(location) for _ in range(count)]
        changed = []
        for n in range(changes):
            with editor.edit() as edit:
                edit.registry = edit.registry.with_added("bench_tick", [f"{kind}_{n}"])
            changed.append(timed(location))
        with editor.edit() as edit:
            edit.registry = edit.registry.with_removed("bench_tick")
        results[kind] = {
            "streams": streams,
            "first": {"reads": firsts, **_percentiles(first)},
            "unchanged": {"reads": count, **_percentiles(unchanged)},
            "after_a_change": {"reads": changes, **_percentiles(changed)},
        }
        forget(location)
    editor.close()
    return results


def main(argv: list[str]) -> None:
    commands: dict[str, Callable[..., dict[str, Any]]] = {
        "load": child_load,
        "tick": child_tick,
    }
    print(json.dumps(commands[argv[0]](*argv[1:])))  # noqa: T201 - the parent reads this line


if __name__ == "__main__":
    main(sys.argv[1:])
