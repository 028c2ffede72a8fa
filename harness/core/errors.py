"""Errors a user's input can cause, shared by every layer. Pure module.

Each one ends a command with one line on stderr (exit 2) or, under pytest, a usage error.
"""

from __future__ import annotations


class SpecError(ValueError):
    """A cell description a user wrote is invalid (bad precision, length, ...)."""


class CliError(Exception):
    pass
