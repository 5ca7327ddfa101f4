"""Errors that reach the user as one clear line instead of a traceback."""

from __future__ import annotations

import argparse
import itertools
import re

# torch's ExceptionWrapper.reraise: type(exc)(f"Caught {name} {where}.\nOriginal {traceback}"),
# where the formatted traceback may start with a chained cause that has no frames.
_WORKER_WRAPPER = re.compile(
    r"Caught (?P<type>\w+) in DataLoader worker process (?P<worker>\d+)\.\nOriginal "
)
_TRACEBACK_HEADER = "Traceback (most recent call last):\n"


class NoaError(Exception):
    """Base class: the CLI prints `error: <message>` and exits non-zero."""


class DataError(NoaError):
    """A dataset file, group, key, shape or value is not what the Well format expects."""


class ConfigError(NoaError):
    """One or more configuration values are invalid; the message lists all of them."""


def user_message(exc: BaseException) -> str:
    """What to print after `error: `: the message that says what went wrong.

    An exception raised in a DataLoader worker reaches the main process re-raised by torch with
    "Caught DataError in DataLoader worker process 0." and the worker's whole traceback as its
    message; the real message is at the end of that text. For such an error this returns the
    original message (all of its lines) followed by ` (in DataLoader worker N)`; for any other
    error, or if the wrapped text does not end in the caught type's message, `str(exc)`.
    """
    text = str(exc)
    wrapper = _WORKER_WRAPPER.match(text)
    if wrapper is None:
        return text
    original = _last_exception_message(text, wrapper["type"])
    if original is None:
        return text
    return f"{original} (in DataLoader worker {wrapper['worker']})"


def _last_exception_message(formatted: str, type_name: str) -> str | None:
    """The message of the last exception in a formatted traceback, or None.

    After the last "Traceback" header come indented frame lines, then `module.Type: message`
    (the message may span lines); chained exceptions come earlier in the text.
    """
    header = formatted.rfind(_TRACEBACK_HEADER)
    if header < 0:
        return None
    last = formatted[header + len(_TRACEBACK_HEADER) :]
    lines = list(itertools.dropwhile(lambda line: line.startswith(" "), last.splitlines()))
    if not lines:
        return None
    qualified_type, separator, first_line = lines[0].partition(": ")
    if qualified_type.rsplit(".", 1)[-1] != type_name:
        return None
    if not separator:  # raised without a message
        return qualified_type
    return "\n".join([first_line, *lines[1:]]).rstrip()


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (`error: ... (see PROG --help)`, exit 2)
    instead of the whole usage block; abbreviated flags are not accepted (`--tim 4` must not
    silently mean --timesteps)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
