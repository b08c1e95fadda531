"""What a fine-tuning run does, as one dataclass, readable from a TOML or YAML file.

A file holds the same names as the dataclass fields (`rank = 64`, `lr = 2e-4`, `buckets =
["49x480x720", "49x720x480"]`); dashes are accepted for underscores. `cogvideox train --config FILE`
reads it and lets flags override single values.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvideox.errors import InputError
from cogvideox.values import is_finite_number
from cogvideox.video import MAX_FPS, MIN_FPS

from .lora import DEFAULT_TARGETS

OPTIMIZERS = ("adamw", "adamw-8bit", "adamw-cpu")
# A LoRA of rank r adapts a layer no better than one of rank min(in, out), and no CogVideoX layer is wider
# than this (the 5B's feed-forward is 12288): a larger rank is a typo, refused before torch is asked for it.
MAX_RANK = 16384
# The clips of one step and process go through the transformer as one batch; a 5B step holds a few on an
# 80 GB GPU. More than this is a typo (--grad-accum makes larger batches), refused before encoding the data.
MAX_BATCH_SIZE = 4096
SCHEDULES = ("constant", "cosine")
TIMESTEPS = ("stratified", "uniform")


@dataclass
class FinetuneConfig:
    """A fine-tuning run. Only `data` and `output` are required; None means "the model's own"."""

    data: str  # the data folder (metadata.jsonl, or prompts.txt + videos.txt)
    output: str  # run folder: checkpoints, logs, validation videos and the result
    model: str | None = None  # model folder or hub id; None: the embedded demo model
    revision: str | None = None
    variant: str | None = None  # the weights' variant ("fp16") where the model has one; None: the plain weights
    # What is trained
    full: bool = False  # all transformer weights instead of a LoRA
    rank: int = 64
    alpha: float | None = None  # LoRA alpha; None: the rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Data
    buckets: list[str] | None = None  # ["49x480x720", ...]; None: the model's frames and size
    fps: float | None = None  # frame rate clips are sampled at; None: the model's (8 or 16)
    caption_dropout: float = 0.1  # share of steps on the empty caption, for classifier-free guidance
    max_sequence_length: int | None = None
    cache_dir: str | None = None  # None: <data>/cache
    prune_cache: bool = False  # delete the cache's entries this run does not read
    sample_posterior: bool = True  # a fresh VAE posterior sample per step (else its mean)
    # Loss weight of the latent cells a clip's mask covers (the rest weigh 1); 1: masks are ignored
    mask_weight: float = 1.0
    # Timesteps of a step's draws (over processes, micro-batches and the batch): one per stratum of
    # [0, T) ("stratified"), or each uniform on its own ("uniform"); the same with one draw per step.
    # None: stratified for a new run; a resumed run keeps what it recorded (uniform for runs recorded
    # before the setting existed), so that it continues its own curve
    timesteps: str | None = None
    # Optimisation
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 for LoRA, 1e-5 for full fine-tuning
    schedule: str = "constant"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine: the final lr as a fraction of lr
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    # With gradient checkpointing: the block inputs it keeps wait in host memory until the backward pass
    offload_activations: bool = False
    # With gradient checkpointing: keep each block's attention results through the backward pass, so its
    # recompute skips the attention kernel (selective checkpointing)
    save_attention: bool = False
    # torch.compile each transformer block's forward (one graph shared by the blocks); the first step
    # compiles, the others run the fused code
    compile: bool = False
    # LoRA: the frozen linears the adapters leave alone (feed-forward, modulation) stored as int8 weights
    # with one scale per output channel, dequantised as they are used: about 3.9 GB less for 5B
    quantize_base: str | None = None
    seed: int = 0
    # Precision and placement
    dtype: str | None = None  # weights: bf16 / fp16 / fp32; None: bf16 on GPU, fp32 on CPU
    device: str | None = None
    # Bookkeeping
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 1
    validation_every: int = 0  # 0: no validation videos
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 50
    # None: the model's recommendation (its sampling.json, else 6); a resumed run keeps the one it recorded
    validation_guidance: float | None = None
    validation_seed: int = 42
    progress: bool = True

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.full else 1e-4)

    @property
    def run_identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (the rest may change)."""
        keys = ("model", "variant", "full", "rank", "alpha", "targets", "optimizer", "batch_size", "grad_accum",
                "seed", "quantize_base")  # fmt: skip
        return {k: getattr(self, k) for k in keys} | {"targets": list(self.targets)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What the text settings look like, for their error messages.
_EXAMPLES = {"model": "THUDM/CogVideoX-5b", "revision": "main", "variant": "fp16", "cache_dir": "clips/cache",
             "dtype": "bf16", "device": "cuda"}


def _positive(value, name: str, kind=int) -> None:
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    if kind is float and not (is_finite_number(value) and value > 0):
        raise InputError(f"{name} must be a positive number, got {value!r}")


def check_config(c: FinetuneConfig) -> None:
    """Every mistake that the values alone reveal, as an `InputError` naming the setting."""
    for name in ("data", "output"):
        if not isinstance(getattr(c, name), (str, Path)) or not str(getattr(c, name)):
            raise InputError(f"{name} must be a folder path")
    for name in ("model", "revision", "variant", "cache_dir", "dtype", "device"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, (str, Path)) or not str(value)):
            raise InputError(f"{name} must be a text such as \"{_EXAMPLES[name]}\" (or unset), got {value!r}")
    for name in ("full", "prune_cache", "sample_posterior", "gradient_checkpointing", "offload_activations",
                 "save_attention", "compile", "progress"):
        # A file's "no" or "false" is a string, and any non-empty string would count as true
        if not isinstance(getattr(c, name), bool):
            raise InputError(f"{name} must be true or false, got {getattr(c, name)!r}")
    for name in ("rank", "steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                 "log_every", "validation_steps"):
        _positive(getattr(c, name), name)
    for name, most in (("rank", MAX_RANK), ("batch_size", MAX_BATCH_SIZE)):
        if getattr(c, name) > most:
            raise InputError(f"{name} must be at most {most}, got {getattr(c, name)!r}")
    if c.max_sequence_length is not None:
        _positive(c.max_sequence_length, "max_sequence_length")
    for name in ("warmup_steps", "validation_every", "seed", "validation_seed"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise InputError(f"{name} must be a non-negative integer, got {value!r}")
    for name in ("seed", "validation_seed"):  # torch's generators take seeds of 64 bits
        if getattr(c, name) >= 2**64:
            raise InputError(f"{name} must be an integer in [0, 2**64), got {getattr(c, name)!r}")
    if c.alpha is not None:
        _positive(c.alpha, "alpha", float)
    if c.lr is not None:
        _positive(c.lr, "lr", float)
    if c.fps is not None:
        _positive(c.fps, "fps", float)
        if not MIN_FPS <= c.fps <= MAX_FPS:  # the rate clips are read at: a video's, within what a file holds
            raise InputError(f"fps must be a frame rate from 1/1001 to {MAX_FPS}, got {c.fps!r}")
    if c.grad_clip is not None:
        _positive(c.grad_clip, "grad_clip", float)
    _positive(c.mask_weight, "mask_weight", float)
    if not (_non_negative_number(c.caption_dropout) and c.caption_dropout < 1):
        raise InputError(f"caption_dropout must be in [0, 1), got {c.caption_dropout!r}")
    if not (_non_negative_number(c.min_lr_ratio) and c.min_lr_ratio <= 1):
        raise InputError(f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio!r}")
    if c.optimizer not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {c.optimizer!r}")
    if c.timesteps is not None and c.timesteps not in TIMESTEPS:
        raise InputError(f"timesteps must be one of {', '.join(TIMESTEPS)}, got {c.timesteps!r}")
    if c.schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {c.schedule!r}")
    if not _non_negative_number(c.weight_decay):
        raise InputError(f"weight_decay must be a finite number >= 0, got {c.weight_decay!r}")
    if not (_non_negative_number(c.eps) and c.eps > 0):
        raise InputError(f"eps must be a finite number > 0, got {c.eps!r}")
    if c.validation_guidance is not None and not _non_negative_number(c.validation_guidance):
        raise InputError(f"validation_guidance must be a finite number >= 0, got {c.validation_guidance!r}")
    check_lists(c)
    if c.offload_activations and not c.gradient_checkpointing:
        raise InputError(
            "offload_activations needs gradient_checkpointing: it moves the block inputs that checkpointing "
            "keeps to host memory; turn gradient_checkpointing on or offload_activations off"
        )
    if c.quantize_base not in (None, "int8"):
        raise InputError(f"quantize_base must be int8 (or unset), got {c.quantize_base!r}")
    if c.quantize_base and c.full:
        raise InputError(
            "quantize_base is for LoRA: full fine-tuning trains the base weights, which must stay in their dtype"
        )
    if c.save_attention and not c.gradient_checkpointing:
        raise InputError(
            "save_attention needs gradient_checkpointing: it keeps the attention results that checkpointing "
            "would recompute; without checkpointing every activation is kept already"
        )
    if c.validation_every and not c.validation_prompts:
        raise InputError("validation_every is set but there are no validation_prompts")


def _non_negative_number(value) -> bool:
    """Whether `value` is a finite number >= 0 (TOML and YAML also give booleans, strings and nan)."""
    return is_finite_number(value) and value >= 0


def _strings(value, *, empty: bool) -> bool:
    """Whether `value` is a list (or tuple) of strings, and not empty unless `empty` allows it."""
    return isinstance(value, (list, tuple)) and (empty or bool(value)) and all(isinstance(v, str) for v in value)


def check_lists(c: FinetuneConfig) -> None:
    """The list settings are lists of the right things. A file may give a single string where a list
    belongs (`validation_prompts = "a cat"`), and a string is iterable: unchecked, it would be read as
    one prompt, bucket or layer name per character."""
    if not _strings(c.targets, empty=False):
        raise InputError(f"targets must be a list of layer names such as [\"to_q\"], got {c.targets!r}")
    if c.buckets is not None and not _strings(c.buckets, empty=False):
        raise InputError(f"buckets must be a list such as [\"49x480x720\"], got {c.buckets!r}")
    if not _strings(c.validation_prompts, empty=True):
        raise InputError(
            f"validation_prompts must be a list of prompts such as [\"a cat on a mat\"], got {c.validation_prompts!r}"
        )
    betas = c.betas
    two = isinstance(betas, (list, tuple)) and len(betas) == 2
    if not (two and all(_non_negative_number(b) and b < 1 for b in betas)):
        raise InputError(f"betas must be a list of two numbers in [0, 1) such as [0.9, 0.95], got {betas!r}")


_FIELDS = {f.name for f in dataclasses.fields(FinetuneConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a `.toml`, `.yaml` or `.yml` file (YAML needs PyYAML), keys normalised to field
    names. Raises `InputError` for a missing or unreadable file and for unknown keys."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            values = tomllib.loads(text)
        except RecursionError:  # "a = [[[[...": the parser recurses per level
            raise InputError(f"{path} is not valid TOML: nested too deep") from None
        except ValueError as e:  # TOMLDecodeError, and an integer too long to convert
            raise InputError(f"{path} is not valid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"reading {path} needs PyYAML (pip install pyyaml), or write the config as TOML") from None
        try:
            values = yaml.load(text, Loader=_yaml_loader(yaml)) or {}
        except RecursionError:
            raise InputError(f"{path} is not valid YAML: nested too deep") from None
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer too long to convert
            raise InputError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    else:
        raise InputError(f"config file {path} must end in .toml, .yaml or .yml")
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a table of settings at the top level")
    settings: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name in settings:
            raise InputError(f"{path}: {spelled[name]} and {key} are the same setting; keep one")
        settings[name], spelled[name] = value, str(key)
    unknown = sorted(set(settings) - _FIELDS)
    if unknown:
        raise InputError(f"{path}: unknown setting(s) {', '.join(unknown)}; see docs/finetune.md for the names")
    return settings


def _yaml_loader(yaml):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: `1e-4` is a float (YAML 1.1 wants `1.0e-4`
    and gives the string "1e-4" otherwise, the usual way of writing a learning rate)."""

    class Loader(yaml.SafeLoader):
        pass

    exponent = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", exponent, list("-+0123456789."))
    return Loader


def make_config(file: str | Path | None = None, **overrides: Any) -> FinetuneConfig:
    """A config from an optional file with `overrides` (None values ignored) on top."""
    values = read_config_file(file) if file is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("data", "output") if k not in values]
    if missing:
        raise InputError(f"missing setting(s): {', '.join(missing)} (give them as flags or in the config file)")
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise InputError(f"unknown setting(s) {', '.join(unknown)}")
    try:
        config = FinetuneConfig(**values)
    except TypeError as e:
        raise InputError(f"bad config: {e}") from None
    # The dataclass cannot tell a default from a value given; here a LoRA setting given to a full run
    # would shape nothing, as quantize_base would not (which check_config refuses).
    lora_only = [k for k in ("rank", "alpha", "targets") if k in values]
    if config.full and lora_only:
        raise InputError(
            f"{', '.join(lora_only)}: LoRA setting(s), but full is on and trains every transformer weight "
            "without a LoRA; drop them or turn full off"
        )
    return config
