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


class CompileError(CogVideoXError, RuntimeError):
    """torch.compile's backend could not build the compiled blocks (no C++ compiler for the CPU, no Triton
    for the GPU, ...); the same computation runs without compiling."""


class OutOfMemoryError(CogVideoXError, RuntimeError):
    """The GPU ran out of memory in one stage of a generation; the message says which setting would fit.

    stage: "text", "encode", "denoise" or "decode"; requested_bytes: what the failed allocation asked
    for (None when PyTorch did not say); suggestion: the setting to try, as a CLI flag.
    """

    def __init__(
        self, message: str, stage: str = "", requested_bytes: int | None = None, suggestion: str = ""
    ) -> None:
        super().__init__(message)
        self.stage, self.requested_bytes, self.suggestion = stage, requested_bytes, suggestion
