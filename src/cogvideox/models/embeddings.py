"""What the expert transformer knows about *when* and *where*: the diffusion-timestep embedding, the
3D sin-cos table (CogVideoX-2B), the 3D rotary tables (5B and 1.5) and the patch embedding that turns
text states and video latents into one token sequence.

Positional tables are pure functions of the grid; the modules only decide which grid to ask for.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ConfigError, TransformerConfig

# ---------------------------------------------------------------------------------------------------
# Timestep


def timestep_sinusoid(
    timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> torch.Tensor:
    """DDPM sinusoidal embedding of diffusion timesteps: [B] -> [B, dim], always float32.

    Frequencies are 10000^(-k / (dim/2 - freq_shift)) for k < dim/2. CogVideoX uses the model width
    as `dim` (not the usual 256) and puts the cosines first (`flip_sin_to_cos`).
    """
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    angles = timesteps[:, None].float() * freqs[None, :]  # [B, half]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


_ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "mish": nn.Mish}


def activation(name: str) -> nn.Module:
    """The activation module for a config name (`timestep_activation_fn`)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the timestep sinusoid: linear_1 -> activation -> linear_2."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "silu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = activation(act)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------------
# 3D sin-cos table (CogVideoX-2B, and the initial / fallback values of 5B-I2V's learned table)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos code of 1-D positions: [M] -> [M, dim] as [sin | cos] (not interleaved).

    The frequencies are float64, as in the reference, so the table is float64.
    """
    if dim % 2:
        raise ConfigError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = torch.outer(positions.reshape(-1), omega)  # [M, dim/2], float64 by promotion
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_3d(
    dim: int,
    frames: int,
    height: int,
    width: int,
    spatial_scale: float = 1.875,
    temporal_scale: float = 1.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """3D sin-cos table for a (frames, height, width) token grid: [frames*height*width, dim], float64.

    Per token: [time (dim/4) | width coordinate (3dim/8) | height coordinate (3dim/8)]. The width
    coordinate comes first in the spatial part, a mesh-grid quirk CogVideoX inherited from SAT and the
    checkpoints were trained with. Spatial positions are divided by `spatial_scale` (with 1.875 the
    45 patches of the training width span 24 units), temporal ones by `temporal_scale`.
    """
    if dim % 16:
        raise ConfigError(f"the 3D sin-cos table needs a width divisible by 16, got {dim}")
    dim_t, dim_s = dim // 4, 3 * dim // 4
    h = torch.arange(height, dtype=torch.float32, device=device) / spatial_scale
    w = torch.arange(width, dtype=torch.float32, device=device) / spatial_scale
    t = torch.arange(frames, dtype=torch.float32, device=device) / temporal_scale

    emb_w = sincos_1d(dim_s // 2, w)  # [W, 3dim/8]
    emb_h = sincos_1d(dim_s // 2, h)  # [H, 3dim/8]
    emb_t = sincos_1d(dim_t, t)  # [T, dim/4]
    spatial = torch.cat(
        [emb_w[None, :, :].expand(height, -1, -1), emb_h[:, None, :].expand(-1, width, -1)], dim=-1
    ).reshape(height * width, dim_s)  # [H*W, 3dim/4], row-major tokens
    table = torch.cat(
        [emb_t[:, None, :].expand(-1, height * width, -1), spatial[None].expand(frames, -1, -1)], dim=-1
    )  # [T, H*W, dim]
    return table.reshape(frames * height * width, dim)


def joint_sincos_table(
    dim: int,
    text_len: int,
    frames: int,
    height: int,
    width: int,
    spatial_scale: float,
    temporal_scale: float,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The additive table for the joint [text ; video] sequence: [1, text_len + T*H*W, dim], float64,
    with zero rows for the text tokens (only video tokens carry positions)."""
    video = sincos_3d(dim, frames, height, width, spatial_scale, temporal_scale, device=device)
    text = video.new_zeros(text_len, dim)
    return torch.cat([text, video], dim=0)[None]


# ---------------------------------------------------------------------------------------------------
# 3D rotary embedding (CogVideoX-5B, 5B-I2V, 1.5)


def rope_frequencies(dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """The dim/2 rotation frequencies of a rotary embedding of width `dim`: theta^(-2i/dim), float32."""
    if dim % 2:
        raise ConfigError(f"rotary embedding width must be even, got {dim}")
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


def rope_1d(
    dim: int, positions: torch.Tensor, theta: float = 10000.0, frequencies: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary angles for 1-D positions: [S] -> (cos, sin), each [S, dim] float32, every value
    repeated twice (c0, c0, c1, c1, ...) to match the interleaved channel pairs of `apply_rope`.
    `frequencies` replaces the standard ones (`rope_frequencies`)."""
    if frequencies is None:
        frequencies = rope_frequencies(dim, theta, positions.device)
    angles = torch.outer(positions, frequencies.to(positions.device))  # [S, dim/2]
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


# RIFLEx keeps the extrapolated length within this fraction of the slowed component's period.
RIFLEX_MARGIN = 0.9


def riflex_frequencies(frequencies: torch.Tensor, trained: int, length: int) -> torch.Tensor:
    """RIFLEx (Zhao et al., 2025, arXiv 2502.15894): rotary frequencies for `length` positions of a model
    trained on `trained`.

    Past the trained length a video made with RoPE tends to repeat itself: the component whose period is
    the first to cover the trained length (the "intrinsic frequency") completes its cycle, and the model
    reads the later frames as the early ones again. Once `length` passes that period, RIFLEx slows this
    one component until `length` spans 90% of its period, and leaves the others alone. For CogVideoX-5B
    (16 temporal channels, 13 latent frames) it is the second component, period 19.9 latent frames: the
    k = 2, N_k = 20 of the authors' CogVideoX script, which changes it for 81 frames (21 latent) and more.
    """
    periods = 2 * math.pi / frequencies
    covering = (periods >= trained).nonzero()
    if len(covering) == 0:
        return frequencies
    k = int(covering[0])
    if length <= periods[k]:  # the component does not come round within the video
        return frequencies
    slowed = frequencies.clone()
    slowed[k] = RIFLEX_MARGIN * 2 * math.pi / length
    return slowed


def rope_3d(
    head_dim: int,
    t: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    theta: float = 10000.0,
    time_frequencies: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables for the grid t x h x w of positions: (cos, sin), each [T*H*W, head_dim] float32.

    The head dimension is split time / height / width as 1/4, 3/8, 3/8 (16/24/24 for head_dim 64);
    token order is time-major, then row, then column, the order of the patch embedding.
    `time_frequencies` replaces the temporal part's standard frequencies (RIFLEx).
    """
    if head_dim % 16:
        raise ConfigError(f"3D RoPE needs a head dimension divisible by 16, got {head_dim}")
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    T, H, W = len(t), len(h), len(w)
    cos_t, sin_t = rope_1d(dim_t, t, theta, time_frequencies)
    cos_h, sin_h = rope_1d(dim_hw, h, theta)
    cos_w, sin_w = rope_1d(dim_hw, w, theta)

    def grid(a_t: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
        per_token = [
            a_t[:, None, None, :].expand(T, H, W, dim_t),
            a_h[None, :, None, :].expand(T, H, W, dim_hw),
            a_w[None, None, :, :].expand(T, H, W, dim_hw),
        ]
        return torch.cat(per_token, dim=-1).reshape(T * H * W, head_dim)

    return grid(cos_t, cos_h, cos_w), grid(sin_t, sin_h, sin_w)


def resize_crop_region(
    grid_h: int, grid_w: int, base_h: int, base_w: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Fit a grid_h x grid_w grid, aspect ratio kept, into the base_h x base_w training grid and centre it:
    ((top, left), (bottom, right)) in base-grid units. Python `round` (half to even), as the reference."""
    if grid_h / grid_w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / grid_h * grid_w))
    else:
        rh, rw = int(round(base_w / grid_w * grid_h)), base_w
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def rope_positions_linspace(
    frames: int, grid_h: int, grid_w: int, base_h: int, base_w: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CogVideoX 1.0 positions: the grid is squeezed into the crop region of the base (training) grid,
    so any resolution spans the positions seen in training. At the native resolution these are the
    integers 0..n-1. The end point scales `bottom`, not the span (a reference quirk, kept)."""
    (top, left), (bottom, right) = resize_crop_region(grid_h, grid_w, base_h, base_w)
    f32 = dict(dtype=torch.float32, device=device)
    h = torch.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, **f32)
    w = torch.linspace(left, right * (grid_w - 1) / grid_w, grid_w, **f32)
    t = torch.linspace(0, frames * (frames - 1) / frames, frames, **f32)
    return t, h, w


def rope_positions_slice(
    frames: int, grid_h: int, grid_w: int, max_h: int, max_w: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CogVideoX 1.5 positions: plain integer indices, limited to the model's max grid (sample size)."""
    if grid_h > max_h or grid_w > max_w:
        raise ValueError(
            f"a {grid_h}x{grid_w} patch grid exceeds this model's rotary table of {max_h}x{max_w} patches "
            f"(sample_height/sample_width in the config); use a smaller resolution"
        )
    f32 = dict(dtype=torch.float32, device=device)
    return torch.arange(frames, **f32), torch.arange(grid_h, **f32), torch.arange(grid_w, **f32)


# ---------------------------------------------------------------------------------------------------
# Patch embedding


class PatchEmbed(nn.Module):
    """Text states and video latents -> one token sequence [text ; video] of width D.

    `proj` embeds 2x2 latent patches frame by frame (a Conv2d, CogVideoX 1.0) or 2x2x2 space-time
    patches (a Linear over (c, t, h, w)-ordered patch vectors, 1.5); `text_proj` maps T5 states to D.
    2B adds a fixed 3D sin-cos table, 5B-I2V a learned one (`pos_embedding`); the rest use RoPE only.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = self.config = config
        p, pt, dim = c.patch_size, c.patch_size_t, c.inner_dim
        if not c.use_rotary_positional_embeddings:
            self.table = "sincos"
        else:
            self.table = "learned" if c.use_learned_positional_embeddings else None
        if self.table is not None and pt is not None:
            raise ConfigError("additive positional tables exist only for CogVideoX 1.0 (patch_size_t None)")

        if pt is None:
            self.proj = nn.Conv2d(c.in_channels, dim, kernel_size=p, stride=p, bias=c.patch_bias)
        else:
            # The 1.5 checkpoints have a bias here whatever `patch_bias` says.
            self.proj = nn.Linear(c.in_channels * pt * p * p, dim)
        self.text_proj = nn.Linear(c.text_embed_dim, dim)

        if self.table is not None:
            # 2B: fixed, recomputable, so not saved. 5B-I2V: learned, saved with the weights.
            table = self._sincos_table(self._latent_frames(c.sample_frames), c.sample_height, c.sample_width)
            self.register_buffer("pos_embedding", table, persistent=self.table == "learned")
        if self.table == "sincos":
            self.register_load_state_dict_post_hook(_refresh_sincos_table)

    def _latent_frames(self, pixel_frames: int) -> int:
        # `sample_frames` counts pixel frames (49), the table is built for latent frames (13).
        return (pixel_frames - 1) // self.config.temporal_compression_ratio + 1

    def _sincos_table(self, latent_frames: int, height: int, width: int, device=None) -> torch.Tensor:
        c = self.config
        return joint_sincos_table(
            c.inner_dim,
            c.max_text_seq_length,
            latent_frames,
            height // c.patch_size,
            width // c.patch_size,
            c.spatial_interpolation_scale,
            c.temporal_interpolation_scale,
            device=device,
        )

    def _positions(self, frames: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The additive table for a latent video of this size, with the reference's rules."""
        c = self.config
        native_hw = (height, width) == (c.sample_height, c.sample_width)
        if self.table == "learned" and not native_hw:
            raise ValueError(
                f"this model has a learned positional table for {c.sample_height}x{c.sample_width} latents "
                f"({c.sample_height * 8}x{c.sample_width * 8} pixels) and cannot run at {height}x{width}"
            )
        # The frame count is compared in pixel frames, as the reference does.
        if native_hw and (frames - 1) * c.temporal_compression_ratio + 1 == c.sample_frames:
            return self.pos_embedding
        # Another grid: a fresh sin-cos table. For 5B-I2V this silently replaces the learned table when
        # only the frame count differs; the reference does exactly that.
        return self._sincos_table(frames, height, width, device=device)

    def forward(self, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """text [B, L, text_embed_dim], video [B, F, C, H, W] -> tokens [B, L + N, D]."""
        B, F, C, H, W = video.shape
        c = self.config
        p, pt = c.patch_size, c.patch_size_t
        if pt is None:
            x = self.proj(video.reshape(B * F, C, H, W))  # [B*F, D, H/p, W/p]
            x = x.reshape(B, F, c.inner_dim, -1).transpose(2, 3)  # [B, F, H'*W', D]
            x = x.reshape(B, -1, c.inner_dim)  # [B, F*H'*W', D]
        else:
            if F % pt:
                raise ValueError(f"CogVideoX 1.5 needs a latent frame count divisible by {pt}, got {F}")
            x = video.reshape(B, F // pt, pt, C, H // p, p, W // p, p)
            x = x.permute(0, 1, 4, 6, 3, 2, 5, 7)  # [B, T', H', W', C, pt, p, p]
            x = self.proj(x.reshape(B, -1, C * pt * p * p))  # [B, T'*H'*W', D]
        x = torch.cat([self.text_proj(text), x], dim=1).contiguous()

        if self.table is not None:
            if text.shape[1] != c.max_text_seq_length:
                raise ValueError(
                    f"this model's positional table expects exactly {c.max_text_seq_length} text tokens, "
                    f"got {text.shape[1]}; pad the prompt embeddings to max_text_seq_length"
                )
            x = x + self._positions(F, H, W, x.device).to(dtype=x.dtype)
        return x


def _refresh_sincos_table(module: PatchEmbed, incompatible_keys) -> None:
    # The 2B table is not in the checkpoint. A model built on the meta device (or with `to_empty`) and
    # then loaded has no real values for it, so it is recomputed after every load, as the reference's
    # model holds it: computed in float64 on the CPU (a GPU's float64 sine can differ from the CPU's in the
    # last bit, and one bf16 value rounded the other way made a 2B step differ from the reference's by
    # 8e-3 on an H200), cast once to the weights' dtype, then moved to their device. In the weights'
    # dtype it also takes a quarter of the float64 table's memory (68 MB instead of 273 for 2B in bf16).
    c, weight = module.config, module.text_proj.weight
    frames = module._latent_frames(c.sample_frames)
    table = module._sincos_table(frames, c.sample_height, c.sample_width, device=torch.device("cpu"))
    dtype = weight.dtype if weight.is_floating_point() else module.pos_embedding.dtype
    module.pos_embedding = table.to(dtype).to(weight.device)
