"""The error of a flow filter that cannot be read (a flag, a value, a selector, a time)."""

from __future__ import annotations


class FilterError(ValueError):
    """A filter that cannot be read: the message names the flag, the value and why."""
