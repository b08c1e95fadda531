"""Shared builders for tests: tiny, offline stand-ins for the real checkpoint components."""

from __future__ import annotations

from pathlib import Path

import torch

# A small corpus for the tiny tokenizer: the words test prompts use become single pieces, anything
# else falls back to characters (and unknown characters to <unk>).
_CORPUS = [
    "a cat sits on the mat in the sun",
    "a dog runs through the green park",
    "a panda plays a small guitar in the bamboo forest",
    "the bright red sun rises over the quiet hill",
    "a bird flies above the blue sea at sunset",
    "waves crash on the rocks while people walk along the beach",
]


def make_tiny_t5(
    text_encoder_dir: str | Path,
    tokenizer_dir: str | Path,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
):
    """Write a tiny T5 checkpoint in the official layout and return `(tokenizer, model)` loaded from it.

    `tokenizer_dir` gets a `spiece.model` trained on a few sentences (as the official `tokenizer/`
    folder holds a sentencepiece model), `text_encoder_dir` a randomly initialised (seeded) T5 v1.1
    style encoder saved with `save_pretrained`. The model is returned in float32, eval mode.
    """
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        # Bare words too, so that most of them end up as single pieces.
        sentence_iterator=iter(_CORPUS * 4 + sorted({w for s in _CORPUS for w in s.split()}) * 8),
        model_prefix=str(tokenizer_dir / "spiece"),
        vocab_size=120,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (tokenizer_dir / "spiece.vocab").unlink()
    tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir))

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(text_encoder_dir))
    return tokenizer, model


# ----------------------------------------------------------------------------------------------------
# Tiny CogVideoX model folders in the official layout, written by the reference (pipeline/loading tests)
# ----------------------------------------------------------------------------------------------------

# The shipped scheduler_config.json values (2B shifts the SNR by 3, 5B and 1.5 do not).
OFFICIAL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "v_prediction",
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
    "snr_shift_scale": 1.0,
}

TINY_VARIANTS = ("rope", "sincos", "1.5")


def tiny_transformer_kwargs(variant: str = "rope", text_embed_dim: int = 32) -> dict:
    """Config of a tiny transformer: "rope" (like 5B), "sincos" (like 2B) or "1.5" (2x2x2 patches)."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"variant must be one of {TINY_VARIANTS}")
    kwargs = dict(
        num_attention_heads=2,
        attention_head_dim=16,  # RoPE splits a head 4 / 6 / 6 (t / h / w)
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=text_embed_dim,
        num_layers=2,
        sample_width=8,  # latent size: the default video is 64x64 pixels
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=variant != "sincos",
    )
    if variant == "1.5":
        kwargs.update(patch_size_t=2, patch_bias=False)
    return kwargs


TINY_VAE_KWARGS = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
    scaling_factor=0.7,
)


def _jitter(module, generator: torch.Generator, scale: float = 0.05) -> None:
    # Default inits leave norms at 1/0 and some biases at 0; noise on every tensor makes any swapped or
    # misplaced weight visible in the output.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def make_tiny_cogvideox(
    folder: str | Path, variant: str = "rope", scheduler: str = "ddim", seed: int = 0
) -> Path:
    """Write a tiny CogVideoX pipeline with `diffusers.CogVideoXPipeline.save_pretrained` into `folder`.

    Tiny T5 (d_model 32, offline tokenizer), a 2-layer transformer of the given variant, a 4-level VAE of
    width 8 and the official scheduler config (DDIM or DPM; SNR shift 3 for the "sincos" 2B-like model).
    Weights are seeded. Returns the folder.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    folder = Path(folder)
    tokenizer, text_encoder = make_tiny_t5(folder / "text_encoder", folder / "tokenizer", d_model=32, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**tiny_transformer_kwargs(variant)).eval()
        vae = AutoencoderKLCogVideoX(**TINY_VAE_KWARGS).eval()
    _jitter(transformer, generator)
    _jitter(vae, generator)
    config = dict(OFFICIAL_SCHEDULER_CONFIG, snr_shift_scale=3.0 if variant == "sincos" else 1.0)
    scheduler_cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[scheduler]
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler_cls(**config),
    )
    pipe.save_pretrained(folder)
    return folder


def load_reference_pipeline(folder: str | Path, scheduler: str | None = None):
    """The diffusers pipeline of a folder written by `make_tiny_cogvideox` (fp32, CPU), optionally with
    its scheduler swapped for "ddim" or "dpm" built from the same config."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    if scheduler is not None:
        cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe
