"""Errors about what a user gave jlora: a config value, a data or model file, a checkpoint.

Each is a `ValueError` whose message is one line naming the file or field, the value and what
is allowed; `train.py` prints it alone on stderr and exits with status 2 (`--debug` or
`JLORA_DEBUG=1` shows the traceback). Anything else reaching `train.py` is a bug and keeps its
traceback.

`one_line` and `exception_line` make any text or exception fit such a message.

Example:
  >>> from jlora.errors import DataError, UserError, exception_line
  >>> issubclass(DataError, UserError) and issubclass(UserError, ValueError)
  True
  >>> str(DataError("data/sst2/train.tsv line 7: label=7; allowed: 0, 1"))
  'data/sst2/train.tsv line 7: label=7; allowed: 0, 1'
  >>> exception_line(OSError("disk   full"))
  'OSError: disk full'
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input; the message is one line naming where, what and what
    is allowed."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type, or out of range."""


class DataError(UserError):
    """A data file or folder is missing, unreadable, malformed, or holds values the task does
    not allow (e.g. a label out of range)."""


class ModelFileError(UserError):
    """A model source is missing, truncated, or not in a format jlora reads."""


class CheckpointError(UserError):
    """A checkpoint or exported adapter folder is missing, damaged, non-finite, or does not fit
    the run or model it is loaded into."""


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def exception_line(e: BaseException, limit: int = 300) -> str:
    """`"Type: message"` of an exception on one line, cut to `limit` characters."""
    return one_line(f"{type(e).__name__}: {e}", limit)
