"""The one exception type for mistakes a user can fix: the CLI prints it as one line."""


class ClickstreamError(Exception):
    """A user-facing error: bad input, bad configuration, or an unreachable service.

    The message is one line that names the bad value and what is allowed. Bugs raise other
    exception types and keep their traceback.
    """


class ServiceUnavailable(ClickstreamError):
    """A service (the warehouse, S3) cannot be reached; worth retrying with backoff."""
