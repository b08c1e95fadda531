"""Checks on values that come from users, files and the wire, shared by every module that takes them."""

from __future__ import annotations

import math


def is_finite_number(value) -> bool:
    """Whether `value` is a finite int or float. Not a bool (TOML, YAML and JSON give `true` where a number
    belongs, and Python's True is an int), not NaN or an infinity (float("nan") passes every comparison
    the wrong way), not a string."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
