"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class ClickstreamError(Exception):
    """A user-facing error: bad input, bad configuration, or an unreachable service.

    The message is one line that names the bad value and what is allowed. Bugs raise other
    exception types and keep their traceback.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ServiceUnavailable(ClickstreamError):
    """A service (the warehouse, S3) cannot be reached; worth retrying with backoff."""


class WriteConflict(ClickstreamError):
    """The warehouse aborted a transaction that conflicted with a concurrent one (Redshift's
    ERROR 1023); the transaction is worth running again."""
