"""Exceptions a user can cause, each with a message that says what to change.

Anything raised from here is printed by the CLI as one line, without a traceback;
any other exception is a bug in recemb and keeps its traceback.
"""

from __future__ import annotations


class RecembError(Exception):
    """Base class of every user-facing error."""


class ConfigError(RecembError):
    """A config file or override is wrong: unknown key, wrong type, bad value."""


class DataError(RecembError):
    """Input data cannot be used: missing/empty file, unknown column, too many rejects."""


class OutputExistsError(RecembError):
    """An output folder exists and ``--overwrite`` was not given."""
