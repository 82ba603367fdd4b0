"""Reading raw files and validating records: streaming, bounded memory, every bad line explained.

Validation is done here, in Python, so that bad input is quarantined with a reason instead of
failing a COPY; each warehouse dialect (``warehouse/``) turns a valid record, which carries its
parsed document, into the rows it loads.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import math
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import IO, Any, NamedTuple

import orjson

# Lines longer than this are quarantined without being held in memory whole.
MAX_LINE_BYTES = 16 * 1024 * 1024
READ_BUFFER_BYTES = 1024 * 1024
MAX_MESSAGE_ID_CHARS = 255

# Property value kinds that can become typed columns; anything else stays in ``properties`` only.
KIND_BOOLEAN = "boolean"
KIND_INTEGER = "integer"
KIND_NUMBER = "number"
KIND_STRING = "string"


class ValidRecord(NamedTuple):
    """A record that passed validation: the values the loader needs up front, the parsed
    document and its raw line. Timestamps are kept as sent, once checked to be ISO-8601 with a
    zone that both warehouses accept (``timestamp_value`` gives the datetime)."""

    message_id: str
    received_at: str
    event_timestamp: str | None
    sent_at: str | None
    line: int
    raw: bytes
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BadRecord:
    """One quarantined line (``raw`` is None when the file itself could not be read further)."""

    line: int
    error: str
    raw: bytes | None


@dataclass
class ReadStats:
    """What reading a partition's files found: counts, and the kinds of each top-level property
    (how often each property held each flattenable kind of value)."""

    records_read: int = 0
    quarantined: int = 0
    property_kinds: dict[str, dict[str, int]] = field(default_factory=dict)

    def observe(self, properties: dict[str, Any]) -> None:
        kinds = self.property_kinds
        for name, value in properties.items():
            kind = _KIND_OF_TYPE.get(type(value))
            if kind is None:
                continue
            if kind is KIND_INTEGER and not -(2**63) <= value < 2**63:
                kind = KIND_NUMBER
            per_name = kinds.get(name)
            if per_name is None:
                kinds[name] = {kind: 1}
            else:
                per_name[kind] = per_name.get(kind, 0) + 1


# Exact types only (bool is a subclass of int): what the parsers build. Decimal holds numbers
# beyond double: they count as numbers, and a typed column gets NULL for them.
_KIND_OF_TYPE: dict[type, str] = {
    bool: KIND_BOOLEAN,
    int: KIND_INTEGER,
    float: KIND_NUMBER,
    str: KIND_STRING,
    Decimal: KIND_NUMBER,
}


def value_kind(value: object) -> str | None:
    """The column kind a JSON value can be stored in, or None (null, objects, arrays)."""
    if isinstance(value, bool):
        return KIND_BOOLEAN
    if isinstance(value, int):
        return KIND_INTEGER if -(2**63) <= value < 2**63 else KIND_NUMBER
    if isinstance(value, float):
        return KIND_NUMBER
    if isinstance(value, str):
        return KIND_STRING
    return None


# The extended calendar form Segment sends, with a zone, in the ranges both warehouses accept:
# hours 00-23, minutes and seconds 00-59, and offsets up to 15:59 (PostgreSQL's limit).
_TIMESTAMP_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d{1,9})?)?"
    r"(?:Z|[+-](?:0\d|1[0-5]):?[0-5]\d)"
)


@functools.lru_cache(maxsize=4096)
def _valid_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def valid_timestamp(value: object) -> str | None:
    """``value`` if it is an ISO-8601 timestamp with a zone that both warehouses accept."""
    if type(value) is not str:
        return None
    match = _TIMESTAMP_RE.fullmatch(value)
    if match is None or not _valid_date(match[1]):
        return None
    return value


def timestamp_value(text: str) -> datetime:
    """The aware datetime of a timestamp ``valid_timestamp`` accepted."""
    return datetime.fromisoformat(text)


def validate_line(raw: bytes, line: int, stats: ReadStats) -> ValidRecord | BadRecord:
    """Validate one line; note the kinds of its top-level properties in ``stats`` when valid."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        record = _parse_beyond_orjson(raw)
        if record is None:
            return BadRecord(line, f"invalid JSON: {error}", raw)
        if b"\\u" in raw and _has_lone_surrogate(record):
            # Legal JSON that is not text: a lone UTF-16 surrogate escape, as a browser's
            # JSON.stringify writes for a string cut inside an emoji. Neither warehouse can
            # store it; U+FFFD takes its place, as a UTF-8 decoder puts it for a broken byte.
            record = _replace_lone_surrogates(record)
            raw = dump_json(record)
    if not isinstance(record, dict):
        return BadRecord(line, f"not a JSON object but {type(record).__name__}", raw)
    message_id = record.get("messageId")
    if not isinstance(message_id, str) or not message_id.strip():
        return BadRecord(line, "messageId is missing or not a non-empty string", raw)
    if len(message_id) > MAX_MESSAGE_ID_CHARS:
        return BadRecord(line, f"messageId is longer than {MAX_MESSAGE_ID_CHARS} characters", raw)
    received_at = valid_timestamp(record.get("receivedAt"))
    if received_at is None:
        if "receivedAt" not in record:
            return BadRecord(line, "receivedAt is missing", raw)
        return BadRecord(line, "receivedAt is not an ISO-8601 timestamp with a time zone", raw)
    if b"\\u0000" in raw:
        # PostgreSQL text and jsonb cannot hold NUL characters.
        return BadRecord(
            line, "contains a \\u0000 character, which the warehouse cannot store", raw
        )
    properties = record.get("properties")
    if isinstance(properties, dict):
        stats.observe(properties)
    return ValidRecord(
        message_id=message_id,
        received_at=received_at,
        event_timestamp=valid_timestamp(record.get("timestamp")),
        sent_at=valid_timestamp(record.get("sentAt")),
        line=line,
        raw=raw,
        doc=record,
    )


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string (or key) in a parsed document holds a lone surrogate (a pair is
    parsed into one character, so any surrogate left is alone)."""
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def _replace_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_lone_surrogates(item) for item in value]
    return value


def parse_json(raw: bytes) -> Any:
    """Parse one JSON document (orjson, else the standard parser for numbers beyond double);
    raise ValueError when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = _parse_beyond_orjson(raw)
        if parsed is None:
            raise
        return parsed


def _parse_beyond_orjson(raw: bytes) -> Any:
    """Parse what orjson refuses but is valid JSON (numbers beyond 64-bit integers or doubles,
    kept exact as Decimal); None if invalid."""
    try:
        text = raw.decode("utf-8")
        return json.loads(
            text, parse_int=_exact_int, parse_float=_exact_float, parse_constant=_reject_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        # RecursionError: nesting deeper than orjson's limit (1,024) that only recursion finds.
        return None


def _exact_int(text: str) -> int | Decimal:
    value = int(text)
    return value if -(2**63) <= value < 2**64 else Decimal(text)


def _exact_float(text: str) -> float | Decimal:
    value = float(text)
    if math.isinf(value) or (value == 0 and Decimal(text) != 0):
        return Decimal(text)
    return value


def dump_json(value: Any) -> bytes:
    """Serialize a parsed document (or part of one) compactly; numbers beyond double, parsed as
    Decimal, are written exactly."""
    return orjson.dumps(value, default=_exact_number)


def _exact_number(value: object) -> orjson.Fragment:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value))
    raise TypeError(f"{type(value).__name__} is not JSON")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class _StreamReader(io.RawIOBase):
    """A raw binary stream over any object with ``read(n)`` (e.g. botocore's StreamingBody)."""

    def __init__(self, source: IO[bytes] | Any) -> None:
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def iter_lines(source: IO[bytes] | Any, compressed: bool) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line number, line)`` of a file, streaming; lines split on ``\\n`` only.

    Blank lines are skipped. A line longer than MAX_LINE_BYTES is skipped without being held
    in memory and yielded as the ``OVERSIZED`` marker. Raises ``UnreadableFile`` (with the
    number of the line where reading stopped) when the gzip stream is corrupt or truncated; the
    lines before it have been yielded.
    """
    stream: IO[bytes] = io.BufferedReader(_StreamReader(source), READ_BUFFER_BYTES)
    if compressed:
        stream = gzip.GzipFile(fileobj=stream, mode="rb")  # type: ignore[assignment]
    number = 0
    try:
        while True:
            chunk = stream.readline(MAX_LINE_BYTES)
            if not chunk:
                return
            number += 1
            if len(chunk) == MAX_LINE_BYTES and not chunk.endswith(b"\n"):
                while chunk and not chunk.endswith(b"\n"):
                    chunk = stream.readline(MAX_LINE_BYTES)
                yield number, OVERSIZED
                continue
            line = chunk.rstrip(b"\r\n")
            if line.strip():
                yield number, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        # The file's content only: a read failing on the network (botocore's read timeout is an
        # OSError too) must fail the load, to be retried, not quarantine the rest of the file.
        raise UnreadableFile(number + 1, _describe_read_error(error)) from None


OVERSIZED = b"\x00oversized"


class UnreadableFile(Exception):
    """The rest of a file cannot be read (corrupt or truncated compression)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def _describe_read_error(error: BaseException) -> str:
    if isinstance(error, EOFError):
        return f"truncated gzip file: {error}"
    if isinstance(error, gzip.BadGzipFile | zlib.error):
        return f"not a valid gzip file: {error}"
    return f"cannot read file: {error}"


def read_records(
    source: IO[bytes] | Any, compressed: bool, stats: ReadStats
) -> Iterator[ValidRecord | BadRecord]:
    """Every record of one file, valid or bad; an unreadable tail becomes one last BadRecord."""
    try:
        for number, line in iter_lines(source, compressed):
            if line is OVERSIZED:
                yield BadRecord(number, f"line longer than {MAX_LINE_BYTES} bytes", None)
            else:
                yield validate_line(line, number, stats)
    except UnreadableFile as unreadable:
        yield BadRecord(unreadable.line, unreadable.reason, None)


def quarantine_line(source_key: str, bad: BadRecord) -> bytes:
    """One line of a quarantine file: ``{"source_key", "line", "error", "raw"}``."""
    raw = None if bad.raw is None else bad.raw.decode("utf-8", "backslashreplace")
    return orjson.dumps(
        {"source_key": source_key, "line": bad.line, "error": bad.error, "raw": raw}
    )
