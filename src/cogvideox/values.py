"""Checks on values that come from users, files and the wire, shared by every module that takes them."""

from __future__ import annotations

import math
import numbers


def is_finite_number(value) -> bool:
    """Whether `value` is a finite real number: an int or a float, numpy's too (np.float32(0.5), what a
    computation in numpy hands on). Not a bool (TOML, YAML and JSON give `true` where a number belongs,
    and Python's True is an int), not NaN or an infinity (float("nan") passes every comparison the wrong
    way), not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def in_units(nbytes: int) -> str:
    """Bytes for a message: GiB with one decimal, MiB below a tenth of a GiB."""
    gib = 2**30
    return f"{nbytes / gib:.1f} GiB" if nbytes >= gib / 10 else f"{max(nbytes / 2**20, 0.1):.1f} MiB"
