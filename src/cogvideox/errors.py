"""Errors meant for people: each one says what was wrong and what to do about it.

The CLI prints these as one line and exits with status 2 (a mistake in the request) or 1 (a run that went
wrong); anything else escaping the library is a bug of ours and keeps its traceback.
"""

from __future__ import annotations


class CogVideoXError(Exception):
    """Base class of the errors the library raises for problems the user can fix."""


class InputError(CogVideoXError, ValueError):
    """A generation request the model cannot take (frame count, size, prompt, step count, dtype, ...)."""


class LoadError(CogVideoXError, ValueError):
    """A model folder or repository that cannot be loaded: missing files, mismatched tensors or components."""


class NonFiniteError(CogVideoXError, RuntimeError):
    """The sampler produced NaN or infinite latents (usually fp16 with a model trained in bf16)."""
