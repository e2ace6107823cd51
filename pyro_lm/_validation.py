"""Argument checks shared across the package."""

from __future__ import annotations


def check_positive_int(value, name: str) -> int:
    """``value`` if it is an int >= 1 (and not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value
