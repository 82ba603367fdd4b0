"""Settings from the environment: the only place configuration is read, and never at import."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from clickstream_pipeline.errors import ClickstreamError
from clickstream_pipeline.registry import DEFAULT_REGISTRY

DEFAULT_RAW_PREFIX = "raw"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def secret_from_env(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A secret from ``name``, or from the file ``name_FILE`` names (a mounted Kubernetes
    Secret, read at each call so a rotated Secret takes effect); None when neither is set."""
    env = os.environ if environ is None else environ
    if env.get(name):
        return env[name].strip()
    path = env.get(f"{name}_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError as error:
        raise ClickstreamError(f"cannot read {name}_FILE {path}: {error.strerror}") from None


def number_from_env(name: str, default: float | None) -> float | None:
    """A positive number from the environment (unset or empty: ``default``)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ClickstreamError(f"{name} must be a positive number of seconds or a factor: {text!r}")
    return value


# How often each sensor runs, by default and from the environment (whole seconds; Dagster's
# sensor daemon looks at its sensors every 5 seconds, so less than that is 5 in effect).
SENSOR_INTERVALS = {
    "registry_sync_sensor": ("CLICKSTREAM_REGISTRY_SYNC_INTERVAL_SECONDS", 15),
    "s3_discovery_sensor": ("CLICKSTREAM_DISCOVERY_INTERVAL_SECONDS", 30),
}


def sensor_interval(sensor: str) -> int:
    """The minimum seconds between two ticks of ``sensor`` (``SENSOR_INTERVALS``)."""
    name, default = SENSOR_INTERVALS[sensor]
    return max(1, round(number_from_env(name, default) or default))


@dataclass(frozen=True)
class Settings:
    """Where the pipeline reads from and writes to (``CLICKSTREAM_*`` variables)."""

    bucket: str | None = None
    raw_prefix: str = DEFAULT_RAW_PREFIX
    registry: str = DEFAULT_REGISTRY
    warehouse_url: str | None = None
    kinesis_stream: str | None = None
    vortex_url: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        prefix = env.get("CLICKSTREAM_RAW_PREFIX", "").strip("/") or DEFAULT_RAW_PREFIX
        return cls(
            bucket=env.get("CLICKSTREAM_BUCKET") or None,
            raw_prefix=prefix,
            registry=env.get("CLICKSTREAM_REGISTRY") or DEFAULT_REGISTRY,
            warehouse_url=env.get("CLICKSTREAM_WAREHOUSE_URL") or None,
            kinesis_stream=env.get("CLICKSTREAM_KINESIS_STREAM") or None,
            vortex_url=(
                env.get("CLICKSTREAM_VORTEX_URL") or env.get("CLICKSTREAM_WAREHOUSE_URL") or None
            ),
        )

    def require_bucket(self) -> str:
        """The bucket name, or a one-line error saying how to set it."""
        if not self.bucket:
            raise ClickstreamError(
                "CLICKSTREAM_BUCKET is not set: export it, or run 'clickstream stack' "
                "for an embedded local S3 server"
            )
        return validate_bucket(self.bucket)

    def require_warehouse_url(self) -> str:
        if not self.warehouse_url:
            raise ClickstreamError(
                "CLICKSTREAM_WAREHOUSE_URL is not set: export a postgresql:// or redshift:// URL"
            )
        return self.warehouse_url

    @property
    def vortex_postgres_url(self) -> str | None:
        """The vortex URL when it is a PostgreSQL one (where vortex can keep its leases)."""
        if self.vortex_url and self.vortex_url.startswith(_POSTGRES_SCHEMES):
            return self.vortex_url
        return None

    def require_vortex_url(self) -> str:
        """Where vortex keeps leases and checkpoints: CLICKSTREAM_VORTEX_URL, else the
        warehouse's URL; a PostgreSQL one (a Redshift warehouse needs a URL of its own here)."""
        if not self.vortex_url:
            raise ClickstreamError(
                "CLICKSTREAM_VORTEX_URL is not set (nor CLICKSTREAM_WAREHOUSE_URL): export a "
                "postgresql:// URL for vortex's leases and checkpoints"
            )
        if self.vortex_postgres_url is None:
            raise ClickstreamError(
                "vortex keeps its leases in PostgreSQL: set CLICKSTREAM_VORTEX_URL to a "
                "postgresql:// URL"
            )
        return self.vortex_url


def validate_bucket(name: str) -> str:
    """Return ``name`` if it is a valid S3 bucket name, else raise a one-line error."""
    if not _BUCKET_RE.fullmatch(name) or ".." in name:
        raise ClickstreamError(
            f"invalid bucket name {name!r}: 3-63 characters of a-z, 0-9, '.' and '-'"
        )
    return name
