from __future__ import annotations

from pathlib import Path

import pytest

from clickstream_pipeline.cli import main
from clickstream_pipeline_tests.conftest import list_keys
from clickstream_pipeline_tests.helpers import run_cli


def run(*args: str) -> tuple[int, str, str]:
    result = run_cli(*args)
    return result.returncode, result.stdout, result.stderr


def test_registry_round_trip(registry_path: Path) -> None:
    assert run("registry", "add", "acme", "add_to_cart", "page_view") == (
        0,
        "",
        f"registered acme.add_to_cart, acme.page_view in {registry_path}\n",
    )
    assert run("registry", "add", "globex", "video_play")[0] == 0
    assert run("registry", "list") == (
        0,
        "acme.add_to_cart\nacme.page_view\nglobex.video_play\n",
        "",
    )
    assert run("registry", "remove", "acme", "page_view")[0] == 0
    assert run("registry", "remove", "globex")[0] == 0
    assert run("registry", "list")[1] == "acme.add_to_cart\n"
    assert registry_path.read_text() == "customers:\n  acme:\n    events: [add_to_cart]\n"


RULE = "names must match ^[a-z][a-z0-9_]{0,62}$"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("registry", "add", "Acme", "x"), f"invalid customer 'Acme': {RULE}"),
        (("registry", "add", "acme", "add-to-cart"), f"invalid event 'add-to-cart': {RULE}"),
        (("registry", "remove", "nobody"), "customer 'nobody' is not in the registry"),
        (
            ("registry", "list"),
            "registry file {registry} not found: create it with "
            "'clickstream registry add <customer> <event>' or set CLICKSTREAM_REGISTRY",
        ),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    registry_path: Path, args: tuple[str, ...], message: str
) -> None:
    code, stdout, stderr = run(*args)
    assert (code, stdout) == (1, "")
    assert stderr == f"clickstream: error: {message.replace('{registry}', str(registry_path))}\n"


def test_malformed_registry_is_one_line(registry_path: Path) -> None:
    registry_path.write_text("customers: [oops\n")
    code, _, stderr = run("registry", "list")
    assert code == 1
    assert stderr.startswith(
        f"clickstream: error: registry {registry_path} is not valid YAML at line"
    )
    assert stderr.count("\n") == 1


def test_generate_without_a_bucket_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLICKSTREAM_BUCKET", raising=False)
    code, _, stderr = run("generate")
    assert code == 1
    assert stderr == (
        "clickstream: error: CLICKSTREAM_BUCKET is not set: export it, or run "
        "'clickstream stack' for an embedded local S3 server\n"
    )


def test_unreachable_s3_is_one_line(monkeypatch: pytest.MonkeyPatch, registry_path: Path) -> None:
    monkeypatch.setenv("CLICKSTREAM_BUCKET", "some-bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, _, stderr = run("generate", "--no-register")
    assert code == 1
    assert stderr.startswith("clickstream: error: cannot reach S3")
    assert stderr.count("\n") == 1


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["registry"],
        ["registry", "list"],
        ["registry", "add"],
        ["registry", "remove"],
        ["registry", "history"],
        ["registry", "import"],
        ["registry", "export"],
        ["generate"],
        ["stack"],
        ["load"],
        ["demo"],
        ["dev"],
        ["health"],
        ["bench"],
        ["vortex"],
    ],
)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"Usage: clickstream {' '.join(command)}".rstrip())


@pytest.mark.slow(seconds=300)
def test_the_quick_bench_runs_every_part_and_measures_s3_against_a_given_bucket(
    pipeline: dict[str, str], tmp_path: Path
) -> None:
    import json

    from clickstream_pipeline.cli.bench import PARTS

    # The session's S3 server stands in for S3: the scale part must send its requests there,
    # with this environment's credentials, not to the local server it starts for PostgreSQL.
    bucket = pipeline["CLICKSTREAM_BUCKET"]
    done = run_cli(
        *("bench", "--quick", "--s3-bucket", bucket, "--output", str(tmp_path)),
        env=pipeline,
        timeout=570,  # within the test's own bound (twice its usual 300 s)
    )

    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"quick", *PARTS}
    finished = [line.partition(" done in ")[0] for line in done.stderr.splitlines()]
    assert [line for line in finished if line.startswith("bench: ")] == [
        line for part in PARTS for line in (f"bench: {part} ...", f"bench: {part}")
    ]
    scale = results["scale"]
    assert scale["s3"] == f"s3://{bucket}"
    assert scale["discovery_first_tick"]["partitions_requested"] == 40  # 20 streams, 2 hours
    assert scale["discovery_steady_tick"]["s3_requests"] == {"ListObjectsV2": 20}
    assert scale["backfill_listing"]["s3_server_cpu_seconds"] is None
    assert f"S3: s3://{bucket}" in (tmp_path / "benchmarks.md").read_text()
    assert (tmp_path / "benchmarks.png").stat().st_size > 0
    assert "goals" in done.stdout
    assert list_keys(bucket) == []
