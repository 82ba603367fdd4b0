"""Faults with real processes and servers; every case ends in exact, unique row counts."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

import dagster as dg
import psycopg2
import pytest

from clickstream_pipeline.generator import GeneratorSpec, generate_files
from clickstream_pipeline.layout import raw_key
from clickstream_pipeline.loader import RawStore, load_partition, with_retries
from clickstream_pipeline.names import Stream
from clickstream_pipeline.registry import Registry, YamlFileRegistry
from clickstream_pipeline.s3 import s3_client
from clickstream_pipeline.warehouse.postgres import PostgresWarehouse
from clickstream_pipeline_tests.helpers import message_ids, query, recent_hour, run_cli

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

H1 = recent_hour(3)


class ProxyHandler(BaseHTTPRequestHandler):
    """A fault-injecting proxy's handler: every method goes to ``_handle``; no access log."""

    def log_message(self, *args: object) -> None:
        pass

    def _handle(self) -> None:
        raise NotImplementedError

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET


def read_body(handler: BaseHTTPRequestHandler) -> bytes | None:
    """The request's body, read whole (S3 clients send Content-Length)."""
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else None


def forward(
    handler: BaseHTTPRequestHandler, upstream: SplitResult, body: bytes | None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send the handler's request to the upstream S3 server; its status, headers and body."""
    connection = http.client.HTTPConnection(upstream.netloc)
    headers = {k: v for k, v in handler.headers.items() if k.lower() != "host"}
    headers["Host"] = upstream.netloc
    try:
        connection.request(handler.command, handler.path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def send_head(
    handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], length: int
) -> None:
    """Answer with ``status`` and ``headers`` for a body of ``length`` bytes (hop-by-hop
    headers dropped: the proxy sends the body whole, with its own length)."""
    handler.send_response(status)
    for key, value in headers:
        if key.lower() not in ("content-length", "transfer-encoding", "connection"):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(length))
    handler.end_headers()


class FaultyS3:
    """An HTTP proxy in front of the local S3 server that answers some requests itself with
    503 Slow Down or 500 InternalError, as S3 does under load."""

    def __init__(self, upstream: str, every: int = 3) -> None:
        self.upstream = urlsplit(upstream)
        self.every = every
        self.requests = 0
        self.injected = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(ProxyHandler):
            def _handle(self) -> None:
                body = read_body(self)
                with proxy._lock:
                    proxy.requests += 1
                    fault = proxy.requests % proxy.every == 0
                    if fault:
                        proxy.injected += 1
                        code = 503 if proxy.injected % 2 else 500
                if fault:
                    name = "SlowDown" if code == 503 else "InternalError"
                    payload = (
                        f"<Error><Code>{name}</Code><Message>injected</Message></Error>".encode()
                    )
                    send_head(self, code, [("Content-Type", "application/xml")], len(payload))
                    self.wfile.write(payload)
                    return
                status, headers, data = forward(self, proxy.upstream, body)
                send_head(self, status, headers, len(data))
                if self.command != "HEAD":
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def faulty_s3(local_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3]:
    proxy = FaultyS3(local_stack["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def write_generated(bucket: str, spec: GeneratorSpec, prefix: str) -> dict[Stream, int]:
    """Write the spec's files under customers renamed ``<prefix>_<customer>`` (so this test's
    tables are its own); return the unique messages each stream must end with."""
    expected: dict[Stream, int] = {}
    client = s3_client()
    for generated in generate_files(spec, "raw", H1):
        stream = Stream(f"{prefix}_{generated.stream.customer}", generated.stream.event)
        name = generated.key.rsplit("/", 1)[1]
        client.put_object(
            Bucket=bucket, Key=raw_key("raw", stream, generated.hour, name), Body=generated.body
        )
        expected[stream] = expected.get(stream, 0) + generated.new_messages
    return expected


def write_partition(
    bucket: str, customer: str, events: int, files: int = 2, seed: int = 0
) -> Stream:
    spec = GeneratorSpec(
        customers=1,
        events=1,
        hours=1,
        events_per_file=events // files,
        files_per_hour=files,
        start=H1,
        seed=seed,
    )
    [stream] = write_generated(bucket, spec, customer)
    return stream


def test_s3_500s_and_slow_downs_are_retried_to_an_exact_load(
    pipeline: dict[str, str], faulty_s3: FaultyS3, customer: str
) -> None:
    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 2000, files=5, seed=11)
    warehouse = PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"])
    store = RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw")

    outcome = load_partition(store, warehouse, stream, H1)

    assert faulty_s3.injected >= 3
    assert outcome.rows_loaded == 2000
    assert len(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == 2000


def _copy_backend(url: str, timeout: float = 60) -> int:
    """The pid of the backend running our COPY, once it is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = query(
            url,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'clickstream' "
            "AND query LIKE 'COPY %% FROM STDIN'",
        )
        if rows:
            return int(rows[0][0])
        time.sleep(0.02)
    raise AssertionError("the load never reached COPY")


def test_the_warehouse_dropping_mid_copy_is_retried_to_an_exact_load(
    pipeline: dict[str, str], customer: str
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 60_000, files=2, seed=12)
    store = RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw")
    killed: list[int] = []

    def drop_connection() -> None:
        backend = _copy_backend(url)
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
            killed.append(backend)
        conn.close()

    dropper = threading.Thread(target=drop_connection)
    dropper.start()
    outcome = with_retries(
        lambda: load_partition(store, PostgresWarehouse(url), stream, H1), base_delay=0.05
    )
    dropper.join()

    assert killed and outcome.rows_loaded == 60_000
    assert len(message_ids(url, stream)) == 60_000


@pytest.mark.slow(seconds=60)
def test_sigkill_of_a_load_mid_copy_then_a_rerun_loads_exactly_once(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 100_000, files=2, seed=13)
    YamlFileRegistry(registry_path).save(Registry().with_streams([stream]))
    env = {**os.environ, **pipeline, "DAGSTER_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "clickstream_pipeline.cli", "load", "--grace-minutes", "0"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _copy_backend(url, timeout=120)
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    assert query(
        url, "SELECT count(*) FROM clickstream.load_ledger WHERE stream = %s", (str(stream),)
    ) == [(0,)]

    rerun = run_cli("load", "--grace-minutes", "0", env={**pipeline, "DAGSTER_HOME": str(tmp_path)})

    assert rerun.returncode == 0, rerun.stderr
    assert len(message_ids(url, stream)) == 100_000
    assert query(
        url, "SELECT count(*) FROM clickstream.load_ledger WHERE stream = %s", (str(stream),)
    ) == [(1,)]


def test_two_loads_over_the_same_new_data_at_once(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    spec = GeneratorSpec(
        customers=3,
        events=2,
        hours=2,
        events_per_file=500,
        files_per_hour=2,
        duplicate_rate=0.05,
        bad_record_rate=0.01,
        start=H1,
        seed=14,
    )
    expected = write_generated(bucket, spec, customer)
    YamlFileRegistry(registry_path).save(Registry().with_streams(expected))
    # An existing Dagster instance, as in a deployment (two processes creating a new sqlite
    # instance at the same moment race in Dagster's schema set-up, not in the loader).
    dg.DagsterInstance.from_config(str(tmp_path)).dispose()
    env = {**os.environ, **pipeline, "DAGSTER_HOME": str(tmp_path)}
    command = [sys.executable, "-m", "clickstream_pipeline.cli", "load", "--grace-minutes", "0"]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in processes]

    assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in results]
    assert {s: len(message_ids(url, s)) for s in expected} == expected
    [(ledger_rows,)] = query(
        url,
        "SELECT count(*) FROM clickstream.load_ledger WHERE stream = ANY(%s)",
        ([s.key for s in expected],),
    )
    assert ledger_rows == len(expected) * 2


def test_secrets_never_reach_output_logs_or_metadata(
    pipeline: dict[str, str], registry_path: Path, tmp_path: Path, customer: str
) -> None:
    sentinel = "Sentinel-Passw0rd-7c1d"
    # The embedded server trusts local connections, so a URL with a password works.
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"].replace("postgres:@", f"postgres:{sentinel}@")
    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 200, files=1, seed=15)
    YamlFileRegistry(registry_path).save(Registry().with_streams([stream]))
    home = tmp_path / "home"
    home.mkdir()
    result = run_cli(
        "load",
        "--grace-minutes",
        "0",
        env={**pipeline, "CLICKSTREAM_WAREHOUSE_URL": url, "DAGSTER_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    assert len(message_ids(url, stream)) == 200
    assert sentinel not in result.stdout + result.stderr
    for path in home.rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), path
    failed = run_cli(
        "load",
        env={
            **pipeline,
            "CLICKSTREAM_WAREHOUSE_URL": url.replace("host=", "host=/nowhere"),
            "DAGSTER_HOME": str(home),
        },
    )
    assert failed.returncode == 1 and sentinel not in failed.stdout + failed.stderr


def test_a_file_rewritten_after_listing_is_never_loaded_stale(
    pipeline: dict[str, str], customer: str
) -> None:
    from botocore.exceptions import ClientError

    from clickstream_pipeline_tests.helpers import put_file, record

    bucket, url = pipeline["CLICKSTREAM_BUCKET"], pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    stream = Stream(customer, "page_view")
    put_file(bucket, stream, H1, "a", [record("old", H1)])
    store = RawStore(s3_client(), bucket, "raw")
    listed = store.list_partition(stream, H1)
    put_file(bucket, stream, H1, "a", [record("new-1", H1), record("new-2", H1)])  # rewritten

    with pytest.raises(ClientError, match="PreconditionFailed"):
        load_partition(store, PostgresWarehouse(url), stream, H1, files=listed)
    assert query(
        url, "SELECT count(*) FROM clickstream.load_ledger WHERE stream = %s", (str(stream),)
    ) == [(0,)]

    # A retry lists again and loads what the file holds now.
    assert load_partition(store, PostgresWarehouse(url), stream, H1).rows_loaded == 2
    assert sorted(message_ids(url, stream)) == ["new-1", "new-2"]


def test_an_s3_server_restart_during_a_load_is_retried_to_an_exact_load(
    pipeline: dict[str, str], customer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.server import ThreadedMotoServer

    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 40_000, files=8, seed=16)
    # A second server over the same in-process state, on a port of its own, to restart freely.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    restarted = threading.Event()

    def restart() -> None:
        _copy_backend(pipeline["CLICKSTREAM_WAREHOUSE_URL"])
        server.stop()
        time.sleep(1.0)
        again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        again.start()
        restarted.set()
        nonlocal_servers.append(again)

    nonlocal_servers: list[ThreadedMotoServer] = []
    restarter = threading.Thread(target=restart)
    restarter.start()
    store = RawStore(s3_client(), pipeline["CLICKSTREAM_BUCKET"], "raw")
    outcome = with_retries(
        lambda: load_partition(
            store, PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"]), stream, H1
        ),
        base_delay=0.5,
    )
    restarter.join()
    for running in nonlocal_servers:
        running.stop()

    assert restarted.is_set() and outcome.rows_loaded == 40_000
    assert len(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == 40_000


class StallingS3:
    """A proxy in front of the local S3 server that stalls as a sick network or S3 node does.

    For the first ``hold_seconds`` no connection is accepted: the listen backlog is kept full,
    so connects hang. Then the first ``header_stalls`` reads of a raw file get no answer at all,
    and the next ``body_stalls`` get their headers and half their body, then nothing; each
    stall lasts ``stall_seconds`` before the proxy drops the connection.
    """

    def __init__(
        self,
        upstream: str,
        *,
        hold_seconds: float = 0.0,
        header_stalls: int = 0,
        body_stalls: int = 0,
        stall_seconds: float = 5.0,
    ) -> None:
        self.upstream = urlsplit(upstream)
        self.header_stalls = header_stalls
        self.body_stalls = body_stalls
        self.stall_seconds = stall_seconds
        self.reads = 0
        self.stalled: list[str] = []
        self.first_accept: float | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(ProxyHandler):
            def _handle(self) -> None:
                with proxy._lock:
                    if proxy.first_accept is None:
                        proxy.first_accept = time.monotonic()
                    stall = None
                    if self.command == "GET" and "/raw/" in self.path and "?" not in self.path:
                        proxy.reads += 1
                        if proxy.reads <= proxy.header_stalls:
                            stall = "header"
                        elif proxy.reads <= proxy.header_stalls + proxy.body_stalls:
                            stall = "body"
                    if stall:
                        proxy.stalled.append(stall)
                if stall == "header":
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                status, headers, data = forward(self, proxy.upstream, read_body(self))
                send_head(self, status, headers, len(data))
                if self.command == "HEAD":
                    return
                if stall == "body":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    time.sleep(proxy.stall_seconds)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 0  # one pending connection fills the backlog

        self.server = Server(("127.0.0.1", 0), Handler)
        port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        # The one pending connection that keeps every other connect hanging until served.
        filler = socket.create_connection(("127.0.0.1", port))

        def serve() -> None:
            time.sleep(hold_seconds)
            filler.close()
            self.server.serve_forever()

        self.started = time.monotonic()
        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        # Returns once the server is serving (after the hold) and has stopped.
        self.server.shutdown()
        self.server.server_close()


def retried_errors(client: S3Client) -> list[str]:
    """The errors botocore's retry handler sees on ``client`` (each is retried or raised)."""
    seen: list[str] = []

    def record(caught_exception: BaseException | None = None, **_: object) -> None:
        if caught_exception is not None:
            seen.append(type(caught_exception).__name__)

    client.meta.events.register_first("needs-retry.s3", record)
    return seen


def test_s3_connects_that_hang_are_retried_to_an_exact_load(
    pipeline: dict[str, str], customer: str
) -> None:
    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 4000, files=4, seed=17)
    proxy = StallingS3(pipeline["AWS_ENDPOINT_URL"], hold_seconds=3.0)
    client = s3_client(proxy.url, connect_timeout=0.5, read_timeout=2)
    errors = retried_errors(client)
    store = RawStore(client, pipeline["CLICKSTREAM_BUCKET"], "raw")
    try:
        outcome = load_partition(
            store, PostgresWarehouse(pipeline["CLICKSTREAM_WAREHOUSE_URL"]), stream, H1
        )
    finally:
        proxy.close()

    # Connects timed out while the proxy held them, and botocore backed off and tried again.
    assert errors and set(errors) == {"ConnectTimeoutError"}, errors
    assert proxy.first_accept is not None and proxy.first_accept - proxy.started >= 3.0
    assert outcome.rows_loaded == 4000 and outcome.quarantined == 0
    assert len(message_ids(pipeline["CLICKSTREAM_WAREHOUSE_URL"], stream)) == 4000


def test_s3_reads_that_stall_are_retried_to_an_exact_load(
    pipeline: dict[str, str], customer: str, caplog: pytest.LogCaptureFixture
) -> None:
    stream = write_partition(pipeline["CLICKSTREAM_BUCKET"], customer, 40_000, files=4, seed=18)
    proxy = StallingS3(
        pipeline["AWS_ENDPOINT_URL"], header_stalls=2, body_stalls=1, stall_seconds=4.0
    )
    client = s3_client(proxy.url, connect_timeout=1, read_timeout=1)
    errors = retried_errors(client)
    store = RawStore(client, pipeline["CLICKSTREAM_BUCKET"], "raw")
    url = pipeline["CLICKSTREAM_WAREHOUSE_URL"]
    try:
        with caplog.at_level("WARNING", logger="clickstream_pipeline.loader"):
            outcome = with_retries(
                lambda: load_partition(store, PostgresWarehouse(url), stream, H1),
                base_delay=0.05,
                describe="load",
            )
    finally:
        proxy.close()

    assert proxy.stalled == ["header", "header", "body"]
    # A read with no answer is retried by botocore; a body that stops half-way fails the load
    # (its transaction rolls back) and the load is retried, never quarantined as unreadable.
    assert errors == ["ReadTimeoutError", "ReadTimeoutError"]
    [retry] = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retry.startswith("load failed (attempt 1 of 4), retrying in ")
    assert "Read timeout on endpoint URL" in retry
    assert outcome.rows_loaded == 40_000 and outcome.quarantined == 0
    assert outcome.quarantine_keys == []
    assert len(message_ids(url, stream)) == 40_000
