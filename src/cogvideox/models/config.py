"""Model configurations as frozen dataclasses, read from and written to the checkpoints' `config.json`.

Field names and defaults are those of the official diffusers-format configs, so a checkpoint's
`config.json` maps onto a dataclass without renaming. Keys we do not model (`_class_name`,
`_diffusers_version`, future additions) are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from cogvideox.errors import CogVideoXError
from cogvideox.files import read_json
from cogvideox.values import is_finite_number


class ConfigError(CogVideoXError, ValueError):
    """A configuration that no CogVideoX model can be built from."""


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _checked(key: str, value: Any, hint: Any) -> Any:
    """`value` of config entry `key` as field type `hint` wants it (JSON lists become tuples), or
    `ConfigError`. Integers may be written as integral floats (4.0)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} must not be null")
    kind = next(o for o in options if o is not type(None))
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_checked(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = is_finite_number(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{key} must be {_KINDS.get(kind, kind.__name__)}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Config:
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # Name written as `_class_name`, the one the reference's loaders expect in the folder.
    class_name: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """The config from a `config.json` object; `ConfigError` for a value of the wrong type."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        hints = typing.get_type_hints(cls)
        known = {k: _checked(k, v, hints[k]) for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(extra=extra, **known)

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except OSError as e:  # unreadable: another user's download, a file mode of 000
            raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"{path} is {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        if self.class_name:
            out.setdefault("_class_name", self.class_name)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def _check_positive(self, *names: str) -> None:
        """`ConfigError` for a size, count or scale among `names` that is not above zero (None passes: an
        optional field left out). Types are checked on reading; a zero or negative value of the right type
        would otherwise surface later as a division by zero or an empty schedule, far from its file."""
        for name in names:
            value = getattr(self, name)
            for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
                if item is not None and not item > 0:
                    where = f"{name}[{i}]" if isinstance(value, tuple) else name
                    raise ConfigError(f"{where} must be positive, got {item!r}")


@dataclass(frozen=True)
class TransformerConfig(_Config):
    """`transformer/config.json` of a CogVideoX checkpoint. Defaults are the reference class defaults."""

    class_name: ClassVar[str] = "CogVideoXTransformer3DModel"

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    def __post_init__(self) -> None:
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ConfigError(
                "use_learned_positional_embeddings requires use_rotary_positional_embeddings "
                "(no CogVideoX checkpoint has a learned table without RoPE)"
            )
        self._check_positive(
            "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "time_embed_dim",
            "ofs_embed_dim", "text_embed_dim", "num_layers", "sample_width", "sample_height", "sample_frames",
            "patch_size", "patch_size_t", "temporal_compression_ratio", "max_text_seq_length",
        )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latent (image-to-video models take twice that on input)."""
        return self.out_channels or self.in_channels

    @property
    def is_image_to_video(self) -> bool:
        return self.in_channels == 2 * self.latent_channels

    @property
    def version(self) -> str:
        """"1.5" for the models with a temporal patch, "1.0" otherwise."""
        return "1.5" if self.patch_size_t is not None else "1.0"


@dataclass(frozen=True)
class VAEConfig(_Config):
    """`vae/config.json` of a CogVideoX checkpoint (AutoencoderKLCogVideoX)."""

    class_name: ClassVar[str] = "AutoencoderKLCogVideoX"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: float = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self) -> None:
        self._check_positive(
            "in_channels", "out_channels", "block_out_channels", "latent_channels", "layers_per_block",
            "norm_num_groups", "temporal_compression_ratio", "sample_height", "sample_width", "scaling_factor",
        )
        ratio = self.temporal_compression_ratio
        if ratio != int(ratio) or int(ratio) & (int(ratio) - 1):  # read as an int further on: 2.5 would be 2
            raise ConfigError(f"temporal_compression_ratio must be a power of two, got {ratio!r}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_compression(self) -> int:
        return int(self.temporal_compression_ratio)


@dataclass(frozen=True)
class SchedulerConfig(_Config):
    """`scheduler/scheduler_config.json`. Defaults are the shipped CogVideoX values, not the class defaults
    of the reference (which differ: epsilon prediction, leading spacing, no zero-SNR)."""

    class_name: ClassVar[str] = "CogVideoXDDIMScheduler"

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = False
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "v_prediction"
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "trailing"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 1.0

    def __post_init__(self) -> None:
        self._check_positive("num_train_timesteps", "snr_shift_scale")
        for name in ("beta_start", "beta_end"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
