"""One exception family so the CLI and the server can turn any user mistake into a one-line message."""


class LongserveError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""

    #: HTTP status the server maps this error to.
    status_code: int = 400
    #: OpenAI-style error type.
    error_type: str = "invalid_request_error"


class ModelNotFoundError(LongserveError):
    status_code = 404
    error_type = "not_found_error"


class CorruptModelError(LongserveError):
    """A cached or local model is damaged; re-pulling usually fixes it."""


class PullError(LongserveError):
    """Downloading, assembling or converting a zoo model failed; nothing half-written was kept."""

    status_code = 502


class ContextLengthError(LongserveError):
    """The prompt (plus generation) does not fit into the model's context window."""


class InvalidParameterError(LongserveError):
    """A sampling, policy or budget parameter is out of range."""
