"""Argument checks shared across the package."""

from __future__ import annotations

import numbers

import torch


def check_positive_int(value, name: str) -> int:
    """``value`` if it is an int >= 1 (and not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_positive_number(value, name: str, allow_zero: bool = False) -> float:
    """``value`` as a float if it is a number > 0 (>= 0 with ``allow_zero``; not NaN, not a
    bool), else an error naming ``name``: a TypeError for a non-number, else a ValueError."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected a number, got {value!r}") from None
    if not (number >= 0 if allow_zero else number > 0):  # NaN fails both
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a number {bound}, got {value!r}")
    return number


def check_max_plate_nesting(value) -> None:
    """A ValueError naming ``max_plate_nesting`` unless it is ``inf`` (found from the model)
    or an int >= 0."""
    if value == float("inf"):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 \
            or value != int(value):  # NaN fails value >= 0 before int() sees it
        raise ValueError(f"max_plate_nesting: expected an int >= 0 (or inf, found from the "
                         f"model), got {value!r}")


def as_real_tensor(value, device: torch.device, name: str, expected: str,
                   where: str = "") -> torch.Tensor:
    """``value`` (what a user function returned: a tensor, a number, a nested sequence) as a
    real tensor on ``device``, floating point (an integer tensor becomes float32), else a
    TypeError: ``"{name}: returned {what}{where}, expected {expected}"``."""
    if not isinstance(value, torch.Tensor) or value.device != device:
        try:
            value = torch.as_tensor(value, device=device)
        except (TypeError, RuntimeError, ValueError):
            raise TypeError(f"{name}: returned {type(value).__name__}{where}, expected "
                            f"{expected}") from None
    if value.is_complex():
        raise TypeError(f"{name}: returned a complex tensor{where}, expected {expected}")
    return value if value.is_floating_point() else value.float()
