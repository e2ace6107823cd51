"""Argument checks shared across the package."""

from __future__ import annotations

import torch


def check_positive_int(value, name: str) -> int:
    """``value`` if it is an int >= 1 (and not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


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
