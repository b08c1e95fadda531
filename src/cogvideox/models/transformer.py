"""The CogVideoX expert transformer (arXiv 2408.06072, section 2.2).

Text and video tokens are concatenated and processed by one stack of blocks with full 3D attention.
The two modalities differ only in their *expert adaptive LayerNorm*: each block predicts separate
shift / scale / gate vectors for text and for video from the timestep embedding, while the attention
and feed-forward weights are shared.

    latents [B,F,C,H,W] --patch_embed--> [text ; video] tokens
        --N x ExpertBlock(t)--> norm_final --FinalAdaLayerNorm(t)--> proj_out --unpatchify--> [B,F,C,H,W]

Attribute names are the official checkpoint keys, so `load_state_dict` needs no renaming.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import JointAttention
from .config import ConfigError, TransformerConfig
from .embeddings import (
    PatchEmbed,
    TimestepEmbedding,
    riflex_frequencies,
    rope_3d,
    rope_frequencies,
    rope_positions_linspace,
    rope_positions_slice,
    timestep_sinusoid,
)
from .host_saves import HostSaves

# The released checkpoints' `transformer/config.json`, as named presets.
_V1_5 = dict(patch_size_t=2, patch_bias=False, sample_height=300, sample_width=300, sample_frames=81)
TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "CogVideoX-2b": TransformerConfig(num_attention_heads=30, num_layers=30),
    "CogVideoX-5b": TransformerConfig(
        num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True
    ),
    "CogVideoX-5b-I2V": TransformerConfig(
        num_attention_heads=48,
        num_layers=42,
        in_channels=32,
        use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=True,
    ),
    "CogVideoX1.5-5B": TransformerConfig(
        num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, **_V1_5
    ),
    "CogVideoX1.5-5B-I2V": TransformerConfig(
        num_attention_heads=48,
        num_layers=42,
        in_channels=32,
        ofs_embed_dim=512,
        use_rotary_positional_embeddings=True,
        **_V1_5,
    ),
}


# The fused attention kernels SDPA dispatches to (those this PyTorch build has): each returns the output
# with the softmax's log-sum-exp, which is all its backward needs besides q, k and v.
ATTENTION_KERNELS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_efficient_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _keep_attention(context, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_KERNELS else CheckpointPolicy.PREFER_RECOMPUTE


def saving_attention():
    """The contexts of a selective gradient checkpoint (`checkpoint(..., context_fn=saving_attention)`)
    that keeps the attention kernels' results (output and log-sum-exp) from the forward pass and
    recomputes everything else: the backward's recompute of a block then runs its projections, norms
    and feed-forward again but not its attention, whose gradient reads the kept results. The gradients
    are those of plain checkpointing (the same ops on the same values). The math fallback (no fused
    kernel, e.g. with a mask) keeps nothing and is recomputed as usual."""
    return create_selective_checkpoint_contexts(_keep_attention)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] with per-sample shift/scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class ExpertAdaLayerNorm(nn.Module):
    """Expert adaptive LayerNorm: one shared LayerNorm, separate modulation for video and text.

    `linear` maps the timestep embedding to (shift, scale, gate, enc_shift, enc_scale, enc_gate);
    the `enc_` half modulates the text tokens. The gates are returned for the residual branches.
    """

    def __init__(self, cond_dim: int, dim: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(
        self, video: torch.Tensor, text: torch.Tensor, emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (modulated video, modulated text, video gate [B,1,D], text gate [B,1,D])"""
        shift, scale, gate, enc_shift, enc_scale, enc_gate = self.linear(F.silu(emb)).chunk(6, dim=1)
        video = modulate(self.norm(video), shift, scale)
        text = modulate(self.norm(text), enc_shift, enc_scale)
        return video, text, gate[:, None], enc_gate[:, None]


class GELUProjection(nn.Module):
    """Linear followed by GELU (the feed-forward's first layer, key `ff.net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


_GELU_KINDS = {"gelu-approximate": "tanh", "gelu": "none"}


class FeedForward(nn.Module):
    """Position-wise MLP D -> 4D -> D. `net` = [GELUProjection, Dropout, Linear, Dropout]."""

    def __init__(self, dim: int, activation: str = "gelu-approximate", dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in _GELU_KINDS:
            raise ConfigError(f"activation_fn {activation!r} is not supported; expected {list(_GELU_KINDS)}")
        self.net = nn.ModuleList(
            [
                GELUProjection(dim, 4 * dim, _GELU_KINDS[activation]),
                nn.Dropout(dropout),
                nn.Linear(4 * dim, dim),
                nn.Dropout(dropout),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class ExpertBlock(nn.Module):
    """One expert transformer block: AdaLN -> joint attention -> gated residual, AdaLN -> FFN -> gated
    residual, with separate modulation and gates for the text and the video tokens."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = config
        dim = c.inner_dim
        self.norm1 = ExpertAdaLayerNorm(c.time_embed_dim, dim, c.norm_elementwise_affine, c.norm_eps)
        self.attn1 = JointAttention(dim, c.num_attention_heads, c.attention_head_dim, bias=c.attention_bias)
        self.norm2 = ExpertAdaLayerNorm(c.time_embed_dim, dim, c.norm_elementwise_affine, c.norm_eps)
        self.ff = FeedForward(dim, c.activation_fn, c.dropout)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        emb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, N, D], text [B, L, D], emb [B, time_embed_dim] -> (video, text)"""
        L = text.shape[1]
        x, c, gate, enc_gate = self.norm1(video, text, emb)
        out = self.attn1(torch.cat([c, x], dim=1), L, rope)
        video = video + gate * out[:, L:]
        text = text + enc_gate * out[:, :L]

        x, c, gate, enc_gate = self.norm2(video, text, emb)
        out = self.ff(torch.cat([c, x], dim=1))
        video = video + gate * out[:, L:]
        text = text + enc_gate * out[:, :L]
        return video, text

    def checkpointed(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        emb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's own `forward` under a gradient checkpoint that keeps the attention's results
        (`saving_attention`). A method of the block, so that `fast.compile_blocks` compiles it with the
        checkpoint inside: a selective checkpoint sees no operator inside a compiled region around
        which it is placed. It calls the class's `forward` itself, so module hooks on the block do not
        run (the trainer uses it where the block has none)."""
        forward = type(self).forward
        return checkpoint(forward, self, video, text, emb, rope, use_reentrant=False, context_fn=saving_attention)


class FinalAdaLayerNorm(nn.Module):
    """LayerNorm modulated by the timestep embedding before the output projection.
    `linear` gives (shift, scale), in that order."""

    def __init__(self, cond_dim: int, dim: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.linear = nn.Linear(cond_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(emb)).chunk(2, dim=1)
        return modulate(self.norm(x), shift, scale)


def unpatchify(x: torch.Tensor, frames: int, height: int, width: int, p: int, pt: int = 1) -> torch.Tensor:
    """Tokens [B, (F/pt)*(H/p)*(W/p), C*pt*p*p] with features ordered (c, t, h, w) -> [B, F, C, H, W].
    CogVideoX 1.0 is the case pt = 1."""
    B = x.shape[0]
    T, Hp, Wp = frames // pt, height // p, width // p
    x = x.reshape(B, T, Hp, Wp, -1, pt, p, p)
    x = x.permute(0, 1, 5, 4, 2, 6, 3, 7)  # [B, T, pt, C, H', p, W', p]
    return x.reshape(B, T * pt, -1, Hp * p, Wp * p)


class CogVideoXTransformer(nn.Module):
    """The CogVideoX denoiser: predicts v for latents [B, F, C, H, W] given T5 text states and a timestep.

    Every released variant is one `TransformerConfig` away (see `TRANSFORMER_PRESETS`): 2B (3D sin-cos
    table), 5B (3D RoPE), 5B-I2V (RoPE + learned table, 32 input channels), 1.5 (2x2x2 patches, RoPE on
    a slice grid) and 1.5-I2V (plus the `ofs` embedding). `state_dict()` keys are the official ones.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.patch_embed = PatchEmbed(c)
        self.embedding_dropout = nn.Dropout(c.dropout)
        self.time_embedding = TimestepEmbedding(c.inner_dim, c.time_embed_dim, c.timestep_activation_fn)
        # 1.5-I2V only: an embedding of the "ofs" scalar, added to the timestep embedding.
        self.ofs_embedding = None
        if c.ofs_embed_dim:
            self.ofs_embedding = TimestepEmbedding(c.ofs_embed_dim, c.ofs_embed_dim, c.timestep_activation_fn)
        self.transformer_blocks = nn.ModuleList([ExpertBlock(c) for _ in range(c.num_layers)])
        self.norm_final = nn.LayerNorm(c.inner_dim, c.norm_eps, c.norm_elementwise_affine)
        self.norm_out = FinalAdaLayerNorm(
            c.time_embed_dim, c.inner_dim, c.norm_elementwise_affine, c.norm_eps
        )
        patch_volume = c.patch_size * c.patch_size * (c.patch_size_t or 1)
        self.proj_out = nn.Linear(c.inner_dim, patch_volume * c.latent_channels)
        self.gradient_checkpointing = False
        # With gradient checkpointing: keep each block's saved inputs in (pinned) host memory until the
        # backward pass instead of on the device.
        self.offload_activations = False
        # With gradient checkpointing: keep each block's attention results through the backward pass
        # (`saving_attention`): its recompute then skips the attention kernel, for their memory.
        self.save_attention = False
        self.offload_stats: dict | None = None  # the last offloaded pass's HostSaves.stats(), kept up to date

    def rotary_embedding(
        self,
        num_latent_frames: int,
        latent_height: int,
        latent_width: int,
        device: torch.device | str | None = None,
        riflex: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The 3D RoPE tables (cos, sin), each [tokens, head_dim] fp32, that the reference pipeline
        builds for a latent video of this size; `None` for models without RoPE (2B).

        1.0 squeezes any grid into the (sample_height/2, sample_width/2) training grid ("linspace");
        1.5 uses integer positions up to that size and one temporal position per `patch_size_t` frames.
        `riflex`: a video longer than the model's `sample_frames` gets RIFLEx's slowed temporal frequency
        (`riflex_frequencies`) instead of repeating itself; a video of that length or shorter is unchanged.
        """
        c = self.config
        if not c.use_rotary_positional_embeddings:
            return None
        p = c.patch_size
        grid_h, grid_w = latent_height // p, latent_width // p
        base_h, base_w = c.sample_height // p, c.sample_width // p
        if c.patch_size_t is None:
            t, h, w = rope_positions_linspace(num_latent_frames, grid_h, grid_w, base_h, base_w, device)
        else:
            frames = self.temporal_positions(num_latent_frames)
            t, h, w = rope_positions_slice(frames, grid_h, grid_w, base_h, base_w, device)
        time_frequencies = None
        if riflex:
            dim_t = c.attention_head_dim // 4
            trained = self.temporal_positions((c.sample_frames - 1) // c.temporal_compression_ratio + 1)
            time_frequencies = riflex_frequencies(rope_frequencies(dim_t, device=device), trained, len(t))
        return rope_3d(c.attention_head_dim, t, h, w, time_frequencies=time_frequencies)

    def temporal_positions(self, num_latent_frames: int) -> int:
        """How many temporal positions a video of this many latent frames spans: one per latent frame
        (1.0), one per `patch_size_t` of them (1.5, padded up)."""
        pt = self.config.patch_size_t
        return num_latent_frames if pt is None else -(-num_latent_frames // pt)

    def _check_inputs(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        c = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[2] != c.in_channels:
            raise ValueError(
                f"hidden_states must be [B, F, {c.in_channels}, H, W] (frames before channels), "
                f"got {list(hidden_states.shape)}"
                + (" (image-to-video models take the noisy latents and the image latents concatenated "
                   "on the channel axis)" if c.is_image_to_video else "")
            )
        H, W = hidden_states.shape[-2:]
        if H % c.patch_size or W % c.patch_size:
            raise ValueError(f"latent height and width must be multiples of {c.patch_size}, got {H}x{W}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != c.text_embed_dim:
            raise ValueError(
                f"encoder_hidden_states must be [B, L, {c.text_embed_dim}], "
                f"got {list(encoder_hidden_states.shape)}"
            )

    @staticmethod
    def _as_batch(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
        value = torch.as_tensor(value, device=device)
        return value.expand(batch) if value.ndim == 0 else value

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        ofs: torch.Tensor | float | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states [B, F, C_in, H, W], encoder_hidden_states [B, L, text_embed_dim], timestep [B]
        (or a scalar), ofs (1.5-I2V only, the pipeline passes 2.0), image_rotary_emb = (cos, sin) from
        `rotary_embedding` for RoPE models -> prediction [B, F, C_out, H, W]."""
        self._check_inputs(hidden_states, encoder_hidden_states)
        c = self.config
        B, frames, _, H, W = hidden_states.shape
        dtype, device = hidden_states.dtype, hidden_states.device

        # The sinusoids are fp32 whatever the model dtype; the MLPs run in the model dtype.
        t = self._as_batch(timestep, B, device)
        t = timestep_sinusoid(t, c.inner_dim, c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(t.to(dtype))  # [B, time_embed_dim]
        if self.ofs_embedding is not None:
            if ofs is None:
                raise ValueError("CogVideoX 1.5 I2V models need `ofs` (the reference pipelines pass 2.0)")
            o = self._as_batch(ofs, 1, device)
            o = timestep_sinusoid(o, c.ofs_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            emb = emb + self.ofs_embedding(o.to(dtype))  # [1 or B, time_embed_dim], broadcast

        x = self.embedding_dropout(self.patch_embed(encoder_hidden_states, hidden_states))  # [B, L+N, D]
        L = encoder_hidden_states.shape[1]
        text, video = x[:, :L], x[:, L:]

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        # One set of host copies for the whole pass: the copies back run ahead of the blocks that need them.
        offload = HostSaves(self) if checkpointing and self.offload_activations else nullcontext()
        for block in self.transformer_blocks:
            if checkpointing and self.save_attention:
                with offload:
                    video, text = block.checkpointed(video, text, emb, image_rotary_emb)
            elif checkpointing:
                # Recompute each block's activations in the backward pass instead of storing them. The
                # checkpoint saves only its tensor arguments, the block's own inputs; emb and the RoPE
                # tables, shared by all blocks, go in by reference so offloading never copies them.
                run = partial(block, emb=emb, rope=image_rotary_emb)
                with offload:
                    video, text = checkpoint(run, video, text, use_reentrant=False)
            else:
                video, text = block(video, text, emb, image_rotary_emb)

        if checkpointing and self.offload_activations:
            self.offload_stats = offload.stats()  # what the pass copied to the host, for the benchmarks
        video = self.norm_out(self.norm_final(video), emb)
        video = self.proj_out(video)  # [B, N, C_out * pt * p * p]
        return unpatchify(video, frames, H, W, c.patch_size, c.patch_size_t or 1)
