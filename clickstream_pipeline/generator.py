"""Synthetic clickstream: Segment-style track calls in the exact raw layout the microbatcher writes.

Deterministic for a given spec and seed: streams are generated one by one, hours in order, files in
order, each file from its own seeded random stream, so the same spec always writes the same bytes.
Duplicates re-emit an earlier record of the same stream byte for byte (in-file, cross-file and
cross-hour, as retries upstream produce them); bad records cover every way a record can be invalid.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from clickstream_pipeline.layout import hour_floor, hour_key, raw_key
from clickstream_pipeline.names import Stream

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CUSTOMER_NAMES = (
    "acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka", "tyrell",
    "cyberdyne", "soylent", "aperture", "vandelay", "dunder", "oscorp", "gringotts",
    "monsters_inc", "pied_piper", "massive_dynamic", "blue_sun",
)  # fmt: skip
EVENT_NAMES = (
    "page_view", "add_to_cart", "remove_from_cart", "product_viewed", "checkout_started",
    "order_completed", "search", "signup", "login", "video_play", "video_pause", "share",
    "coupon_applied", "wishlist_add", "review_submitted", "newsletter_signup",
    "notification_opened", "app_opened", "screen_view", "logout",
)  # fmt: skip

BAD_RECORD_KINDS = (
    "invalid_json",
    "not_an_object",
    "missing_message_id",
    "missing_received_at",
    "bad_timestamp",
)
_USER_AGENTS = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/128.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "okhttp/4.12.0 (Android 14; Pixel 8)",
)
_PATHS = ("/", "/products", "/products/x1", "/cart", "/checkout", "/search", "/account")
_CURRENCIES = ("USD", "EUR", "GBP", "JPY")
_RECENT = 4096  # how far back (in records of the same stream) a duplicate may reach


def customer_names(count: int) -> list[str]:
    """``count`` distinct customer ids: familiar names first, then ``customer_NNN``."""
    return [
        CUSTOMER_NAMES[i] if i < len(CUSTOMER_NAMES) else f"customer_{i:03d}" for i in range(count)
    ]


def event_names(count: int) -> list[str]:
    return [EVENT_NAMES[i] if i < len(EVENT_NAMES) else f"event_{i:03d}" for i in range(count)]


@dataclass(frozen=True)
class GeneratorSpec:
    """What to generate. Heavy customers (the first ``heavy_customers``) and heavy hours (the
    first ``heavy_hours``) get ``skew`` times the events per file, as real traffic does."""

    customers: int = 3
    events: int = 3
    hours: int = 3
    events_per_file: int = 1000
    files_per_hour: int = 2
    duplicate_rate: float = 0.0
    bad_record_rate: float = 0.0
    late_files: int = 0
    skew: int = 1
    heavy_customers: int = 1
    heavy_hours: int = 0
    seed: int = 0
    start: datetime | None = None
    compress: bool = True

    def __post_init__(self) -> None:
        for name in ("customers", "events", "hours", "events_per_file", "files_per_hour", "skew"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("duplicate_rate", "bad_record_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1)")
        if self.late_files < 0 or self.heavy_customers < 0 or self.heavy_hours < 0:
            raise ValueError("late_files, heavy_customers and heavy_hours must not be negative")

    def first_hour(self, now: datetime) -> datetime:
        """The first generated hour: ``start``, or the hours that end with the last complete one."""
        if self.start is not None:
            return hour_floor(self.start)
        return hour_floor(now) - timedelta(hours=self.hours)

    @property
    def streams(self) -> list[Stream]:
        return [
            Stream(customer, event)
            for customer in customer_names(self.customers)
            for event in event_names(self.events)
        ]


@dataclass(frozen=True)
class GeneratedFile:
    """One file's key, body and what is in it."""

    key: str
    body: bytes
    stream: Stream
    hour: datetime
    late: bool
    records: int
    new_messages: int
    duplicates: int
    bad_records: int


@dataclass
class StreamCounts:
    """What one stream received: the loader must load exactly ``unique_messages`` rows."""

    files: int = 0
    records: int = 0
    unique_messages: int = 0
    duplicates: int = 0
    bad_records: int = 0


@dataclass
class GenerationReport:
    """Totals of one generation run, per stream and overall."""

    streams: dict[str, StreamCounts] = field(default_factory=dict)
    files: int = 0
    late_files: int = 0
    bytes: int = 0

    def add(self, generated: GeneratedFile) -> None:
        counts = self.streams.setdefault(generated.stream.key, StreamCounts())
        counts.files += 1
        counts.records += generated.records
        counts.unique_messages += generated.new_messages
        counts.duplicates += generated.duplicates
        counts.bad_records += generated.bad_records
        self.files += 1
        self.late_files += generated.late
        self.bytes += len(generated.body)

    @property
    def records(self) -> int:
        return sum(c.records for c in self.streams.values())

    @property
    def unique_messages(self) -> int:
        return sum(c.unique_messages for c in self.streams.values())

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.streams.values())

    @property
    def bad_records(self) -> int:
        return sum(c.bad_records for c in self.streams.values())


def generate_files(
    spec: GeneratorSpec, raw_prefix: str, now: datetime, include: str = "all"
) -> Iterator[GeneratedFile]:
    """Yield the files of ``spec``: ``include`` is ``all``, ``on_time`` or ``late``.

    Late files are generated in sequence with the others (so their content does not depend on
    ``include``) and can be written after a first load to exercise late arrival.
    """
    if include not in ("all", "on_time", "late"):
        raise ValueError(f"include must be all, on_time or late, not {include!r}")
    first = spec.first_hour(now)
    hours = [first + timedelta(hours=h) for h in range(spec.hours)]
    streams = spec.streams
    picker = random.Random(f"{spec.seed}/late")
    pairs = [(s, h) for s in range(len(streams)) for h in range(spec.hours)]
    late = set(picker.sample(pairs, min(spec.late_files, len(pairs))))
    heavy_customers = set(customer_names(spec.customers)[: spec.heavy_customers])
    for s, stream in enumerate(streams):
        recent: deque[bytes] = deque(maxlen=_RECENT)
        for h, hour in enumerate(hours):
            heavy = stream.customer in heavy_customers or h < spec.heavy_hours
            per_file = spec.events_per_file * (spec.skew if heavy else 1)
            names = [f"part-{i:04d}" for i in range(spec.files_per_hour)]
            if (s, h) in late:
                names.append("late-0000")
            for name in names:
                is_late = name.startswith("late")
                generated = _make_file(spec, raw_prefix, stream, hour, name, per_file, recent)
                if include == "all" or (include == "late") == is_late:
                    yield generated


def _make_file(
    spec: GeneratorSpec,
    raw_prefix: str,
    stream: Stream,
    hour: datetime,
    name: str,
    count: int,
    recent: deque[bytes],
) -> GeneratedFile:
    rng = random.Random(f"{spec.seed}/{stream.key}/{hour_key(hour)}/{name}")
    random_ = rng.random
    make_record = _record_factory(stream, hour, rng)
    lines: list[bytes] = []
    new = duplicates = bad = 0
    for _ in range(count):
        roll = random_()
        if roll < spec.duplicate_rate and recent:
            lines.append(recent[int(random_() * len(recent))])
            duplicates += 1
        elif roll < spec.duplicate_rate + spec.bad_record_rate:
            lines.append(_bad_record(make_record, rng))
            bad += 1
        else:
            line = orjson.dumps(make_record())
            recent.append(line)
            lines.append(line)
            new += 1
    body = b"\n".join(lines) + b"\n"
    suffix = ".jsonl"
    if spec.compress:
        # Level 1: generation speed matters more than a few percent of size here.
        packer = zlib.compressobj(1, zlib.DEFLATED, 31)
        body = packer.compress(body) + packer.flush()
        suffix += ".gz"
    return GeneratedFile(
        key=raw_key(raw_prefix, stream, hour, name + suffix),
        body=body,
        stream=stream,
        hour=hour,
        late=name.startswith("late"),
        records=count,
        new_messages=new,
        duplicates=duplicates,
        bad_records=bad,
    )


def _bad_record(make_record: Callable[[], dict[str, object]], rng: random.Random) -> bytes:
    kind = BAD_RECORD_KINDS[int(rng.random() * len(BAD_RECORD_KINDS))]
    record = make_record()
    if kind == "invalid_json":
        line = orjson.dumps(record)
        return line[: len(line) // 2]
    if kind == "not_an_object":
        return orjson.dumps([record["messageId"], record["event"]])
    if kind == "missing_message_id":
        del record["messageId"]
    elif kind == "missing_received_at":
        del record["receivedAt"]
    else:
        record["receivedAt"] = "yesterday at noon"
    return orjson.dumps(record)


def _record_factory(
    stream: Stream, hour: datetime, rng: random.Random
) -> Callable[[], dict[str, object]]:
    """A closure producing one valid record of ``stream`` received within ``hour``."""
    random_ = rng.random
    bits = rng.getrandbits
    event_title = stream.event.replace("_", " ").title()
    stamp = _stamp_formatter(hour)
    properties = _properties_factory(stream.event, rng)

    def make() -> dict[str, object]:
        received_ms = int(random_() * 3_600_000)
        sent_ms = received_ms - int(random_() * 2_000) - 1
        h = f"{bits(128):032x}"
        user = int(random_() * 50_000)
        return {
            "messageId": f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
            "type": "track",
            "event": event_title,
            "userId": f"u{user}" if random_() < 0.7 else None,
            "anonymousId": f"a{user * 7919 % 1_000_003}",
            "timestamp": stamp(sent_ms - 40),
            "sentAt": stamp(sent_ms),
            "receivedAt": stamp(received_ms),
            "properties": properties(),
            "context": {
                "ip": f"198.51.100.{user % 254 + 1}",
                "userAgent": _USER_AGENTS[user % len(_USER_AGENTS)],
                "library": {"name": "analytics.js", "version": "5.2.0"},
            },
        }

    return make


def _stamp_formatter(hour: datetime) -> Callable[[int], str]:
    """Format ``hour + ms`` (ms may be a little negative) as an ISO-8601 UTC timestamp, fast."""
    this_hour = f"{hour:%Y-%m-%dT%H}"
    previous = f"{hour - timedelta(hours=1):%Y-%m-%dT%H}"

    def stamp(ms: int) -> str:
        prefix = this_hour
        if ms < 0:
            prefix, ms = previous, ms + 3_600_000
        minutes, rest = divmod(ms, 60_000)
        return f"{prefix}:{minutes:02d}:{rest // 1000:02d}.{rest % 1000:03d}Z"

    return stamp


def _properties_factory(event: str, rng: random.Random) -> Callable[[], dict[str, object]]:
    """Event-specific properties with camelCase names, as web SDKs send them."""
    random_ = rng.random
    if event in ("add_to_cart", "remove_from_cart", "product_viewed", "wishlist_add"):
        return lambda: {
            "productId": f"sku-{int(random_() * 5000)}",
            "unitPrice": round(random_() * 200, 2),
            "quantity": int(random_() * 4) + 1,
            "currency": _CURRENCIES[int(random_() * 4)],
            "isGift": random_() < 0.1,
        }
    if event in ("checkout_started", "order_completed"):
        return lambda: {
            "orderId": f"o-{int(random_() * 10**9)}",
            "revenue": round(random_() * 500, 2),
            "itemCount": int(random_() * 8) + 1,
            "currency": _CURRENCIES[int(random_() * 4)],
            "coupon": None if random_() < 0.8 else "WELCOME10",
        }
    if event in ("video_play", "video_pause"):
        return lambda: {
            "videoId": f"v-{int(random_() * 900)}",
            "positionSeconds": int(random_() * 3600),
            "fullScreen": random_() < 0.3,
        }
    return lambda: {
        "path": _PATHS[int(random_() * len(_PATHS))],
        "referrer": "https://search.example.com/" if random_() < 0.3 else "",
        "loadTimeMs": int(random_() * 3000),
        "experiment": {"name": "checkout_v2", "variant": "b" if random_() < 0.5 else "a"},
    }


def write_files(
    client: S3Client,
    bucket: str,
    files: Iterable[GeneratedFile],
    on_file: Callable[[GeneratedFile], None] | None = None,
    concurrency: int = 8,
) -> GenerationReport:
    """Upload ``files`` with a few parallel PUTs, holding at most ``2 * concurrency`` in memory."""
    report = GenerationReport()
    in_flight: deque[tuple[Future[Any], GeneratedFile]] = deque()

    def finish_oldest() -> None:
        future, generated = in_flight.popleft()
        future.result()
        report.add(generated)
        if on_file is not None:
            on_file(generated)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-put") as pool:
        for generated in files:
            future = pool.submit(
                client.put_object, Bucket=bucket, Key=generated.key, Body=generated.body
            )
            in_flight.append((future, generated))
            if len(in_flight) >= 2 * concurrency:
                finish_oldest()
        while in_flight:
            finish_oldest()
    return report


def stream_records(generated: GeneratedFile) -> Iterator[tuple[bytes, str]]:
    """A generated file's records as apps send them to the Kinesis stream: each with its
    ``customer`` (what vortex routes by) and the messageId as partition key, so a re-sent record
    lands on the shard of its first copy. Records that are not JSON objects go as they are."""
    body = generated.body
    if generated.key.endswith(".gz"):
        body = gzip.decompress(body)
    for line in body.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            yield line, hashlib.sha1(line).hexdigest()
            continue
        record = {**record, "customer": generated.stream.customer}
        key = record.get("messageId")
        yield orjson.dumps(record), key if isinstance(key, str) and key else "unkeyed"


def put_on_stream(
    kinesis: Any,
    stream: str,
    files: Iterable[GeneratedFile],
    on_file: Callable[[GeneratedFile], None] | None = None,
) -> GenerationReport:
    """Put every record of ``files`` on the Kinesis ``stream``; the same report as
    ``write_files`` (what each stream received)."""
    from clickstream_pipeline.vortex.kinesis import put_records

    report = GenerationReport()
    for generated in files:
        put_records(kinesis, stream, stream_records(generated))
        report.add(generated)
        if on_file is not None:
            on_file(generated)
    return report
