"""Errors that reach the user as one clear line instead of a traceback."""


class NoaError(Exception):
    """Base class: the CLI prints `error: <message>` and exits non-zero."""


class DataError(NoaError):
    """A dataset file, group, key, shape or value is not what the Well format expects."""


class ConfigError(NoaError):
    """One or more configuration values are invalid; the message lists all of them."""
