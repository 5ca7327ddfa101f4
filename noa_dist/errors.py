"""Errors that reach the user as one clear line instead of a traceback."""


class NoaError(Exception):
    """Base class: the CLI prints `error: <message>` and exits non-zero."""


class DataError(NoaError):
    """A dataset file, group, key, shape or value is not what the Well format expects."""


class ConfigError(NoaError):
    """One or more configuration values are invalid; the message lists all of them."""


def user_message(exc: BaseException) -> str:
    """The one line to show for `exc` (placeholder until the data work lands)."""
    return str(exc)
