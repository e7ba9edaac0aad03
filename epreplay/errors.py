"""Exceptions that the CLI turns into one clear line and exit code 2.

Raise `UsageError` for anything the user can fix (a bad path, a bad value, a damaged file):
the message must name the offending value and the fix. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback (unless --debug)."""


class ShardError(UsageError):
    """A shard file is not a shard, or is damaged beyond what the reader recovers."""
