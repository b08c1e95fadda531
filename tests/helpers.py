"""Shared builders for tests: tiny, offline stand-ins for the real checkpoint components."""

from __future__ import annotations

import re
import socket
import time
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
    from transformers import T5EncoderModel, T5Tokenizer

    from cogvideox.demo.build import small_t5_config, train_t5_tokenizer

    text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
    # Bare words too, so that most of them end up as single pieces.
    sentences = _CORPUS * 4 + sorted({w for s in _CORPUS for w in s.split()}) * 8
    train_t5_tokenizer(tokenizer_dir, sentences, 120, "unigram", hard_vocab_limit=False)
    tokenizer = T5Tokenizer.from_pretrained(str(tokenizer_dir))

    config = small_t5_config(len(tokenizer), d_model, num_layers, num_heads)
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

TINY_VARIANTS = ("rope", "sincos", "1.5", "i2v", "1.5-i2v")


def tiny_transformer_kwargs(variant: str = "rope", text_embed_dim: int = 32) -> dict:
    """Config of a tiny transformer: "rope" (like 5B), "sincos" (like 2B), "1.5" (2x2x2 patches), "i2v"
    (like 5B-I2V: twice the input channels, a learned position table) or "1.5-i2v" (plus `ofs`)."""
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
    if variant in ("1.5", "1.5-i2v"):
        kwargs.update(patch_size_t=2, patch_bias=False)
    if variant in ("i2v", "1.5-i2v"):
        kwargs.update(in_channels=8)  # noisy latents and image latents, joined on the channel axis
    if variant == "i2v":
        kwargs.update(use_learned_positional_embeddings=True)
    if variant == "1.5-i2v":
        kwargs.update(ofs_embed_dim=8)  # added to the timestep embedding: time_embed_dim wide
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
    # misplaced weight visible in the output. The learned position table (5B-I2V) is a buffer that
    # starts as the sin-cos table: jitter it too, so that loading it is what the tests see.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
        for name, b in module.named_buffers():
            if name.endswith("pos_embedding") and module.config.get("use_learned_positional_embeddings"):
                b.add_(torch.randn(b.shape, generator=generator) * scale)


def make_tiny_cogvideox(
    folder: str | Path, variant: str = "rope", scheduler: str = "ddim", seed: int = 0
) -> Path:
    """Write a tiny CogVideoX pipeline with `diffusers.CogVideoXPipeline.save_pretrained` into `folder`.

    Tiny T5 (d_model 32, offline tokenizer), a 2-layer transformer of the given variant, a 4-level VAE of
    width 8 and the official scheduler config (DDIM or DPM; SNR shift 3 for the "sincos" 2B-like model).
    The image-to-video variants are saved by `CogVideoXImageToVideoPipeline`, the 1.5 one with a VAE
    that divides image latents by the scaling factor (`invert_scale_latents`), as the released 1.5 VAE.
    Weights are seeded. Returns the folder.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    folder = Path(folder)
    tokenizer, text_encoder = make_tiny_t5(folder / "text_encoder", folder / "tokenizer", d_model=32, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = CogVideoXTransformer3DModel(**tiny_transformer_kwargs(variant)).eval()
        vae_kwargs = dict(TINY_VAE_KWARGS, invert_scale_latents=variant == "1.5-i2v")
        vae = AutoencoderKLCogVideoX(**vae_kwargs).eval()
    _jitter(transformer, generator)
    _jitter(vae, generator)
    config = dict(OFFICIAL_SCHEDULER_CONFIG, snr_shift_scale=3.0 if variant == "sincos" else 1.0)
    scheduler_cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[scheduler]
    pipeline_cls = CogVideoXImageToVideoPipeline if variant.endswith("i2v") else CogVideoXPipeline
    pipe = pipeline_cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=scheduler_cls(**config),
    )
    pipe.save_pretrained(folder)
    return folder


def load_reference_pipeline(folder: str | Path, scheduler: str | None = None, task: str = "text"):
    """The diffusers pipeline of a folder written by `make_tiny_cogvideox` (fp32, CPU), optionally with
    its scheduler swapped for "ddim" or "dpm" built from the same config. `task` picks the pipeline
    class: "text" (CogVideoXPipeline), "image" (image-to-video) or "video" (video-to-video)."""
    import diffusers
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    name = {"text": "CogVideoXPipeline", "image": "CogVideoXImageToVideoPipeline"}.get(
        task, "CogVideoXVideoToVideoPipeline"
    )
    pipe = getattr(diffusers, name).from_pretrained(str(folder), torch_dtype=torch.float32)
    if scheduler is not None:
        cls = {"ddim": CogVideoXDDIMScheduler, "dpm": CogVideoXDPMScheduler}[scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, seed: int | None = None, generator=None, **kwargs):
    """Run a diffusers pipeline; return its final latents (as the loop leaves them) and uint8 frames
    [B, T, H, W, 3] (rounded as its own PIL conversion rounds)."""
    import numpy as np

    captured = {}

    def keep_latents(pipe, step, timestep, tensors):
        captured["latents"] = tensors["latents"]
        return {}

    generator = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    out = pipe(generator=generator, output_type="np", callback_on_step_end=keep_latents, **kwargs)
    return captured["latents"], (out.frames * 255).round().astype(np.uint8)


def assert_same_video(ours, ref_latents, ref_frames, latent_tol: float = 1e-4, frame_tol: int = 2):
    """Our `VideoOutput` against the reference's latents and frames; returns (latent rel. error, max
    frame difference in 1/255) so tests can report them."""
    import numpy as np

    assert ours.latents.shape == ref_latents.shape
    diff = (ours.latents.double() - ref_latents.double()).abs().max()
    latent_err = (diff / ref_latents.double().abs().max()).item()
    assert latent_err <= latent_tol, latent_err
    assert len(ours.frames) == len(ref_frames)
    frame_err = 0
    for got, want in zip(ours.frames, ref_frames):
        assert got.dtype == np.uint8 and got.shape == want.shape
        frame_err = max(frame_err, int(np.abs(got.astype(int) - want.astype(int)).max()))
    assert frame_err <= frame_tol, frame_err
    return latent_err, frame_err


def sample_picture(height: int = 50, width: int = 80, seed: int = 0):
    """A deterministic RGB PIL image (gradients plus seeded noise), not of any model's size or shape."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 5.0 + y / 7.0)], axis=-1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def sample_frames(frames: int = 9, height: int = 40, width: int = 56, seed: int = 0):
    """Deterministic uint8 video frames [T, H, W, 3]: a bright square moving over a noisy gradient."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    video = np.empty((frames, height, width, 3), dtype=np.float64)
    for t in range(frames):
        video[t] = np.stack([255 * x / width, 255 * y / height, np.full_like(x, 60.0)], axis=-1)
        top, left = 4 + t, 6 + 2 * t
        video[t, top : top + 12, left : left + 12] = (250, 220, 30)
    video += rng.normal(0, 10, video.shape)
    return np.clip(video, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# SAT-format checkpoints (sat tests): the inverse mapping, diffusers names -> SAT names, written
# independently of cogvideox.sat from the reference converter's rules.

_BLOCK_RENAMES = {
    "attn1.to_out.0": "attention.dense",
    "ff.net.0.proj": "mlp.dense_h_to_4h",
    "ff.net.2": "mlp.dense_4h_to_h",
    "norm1.norm": "input_layernorm",
    "norm2.norm": "post_attention_layernorm",
}
_TOP_RENAMES = {
    "norm_final": "transformer.final_layernorm",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "ofs_embedding.linear_1": "ofs_embed.0",
    "ofs_embedding.linear_2": "ofs_embed.2",
    "patch_embed.proj": "mixins.patch_embed.proj",
    "patch_embed.text_proj": "mixins.patch_embed.text_proj",
    "norm_out.norm": "mixins.final_layer.norm_final",
    "norm_out.linear": "mixins.final_layer.adaLN_modulation.1",
    "proj_out": "mixins.final_layer.linear",
}


def transformer_to_sat(state: dict, head_dim: int) -> dict:
    """Our (= diffusers) transformer state dict in SAT's layout, with the SAT-only tensors it carries."""
    sat, P = {}, "model.diffusion_model."
    for key, tensor in state.items():
        block = re.match(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if key == "patch_embed.pos_embedding":
            sat[P + "mixins.pos_embed.pos_embedding"] = tensor
        elif block is None:
            module, kind = key.rsplit(".", 1)
            sat[f"{P}{_TOP_RENAMES[module]}.{kind}"] = tensor
        else:
            i, module, kind = block.groups()
            layer = f"{P}transformer.layers.{i}."
            if module == "attn1.to_q":
                qkv = [state[f"transformer_blocks.{i}.attn1.to_{x}.{kind}"] for x in "qkv"]
                sat[f"{layer}attention.query_key_value.{kind}"] = torch.cat(qkv)
            elif module in ("attn1.to_k", "attn1.to_v", "norm2.linear"):
                continue  # written with their partners
            elif module in ("attn1.norm_q", "attn1.norm_k"):
                which = "query" if module.endswith("q") else "key"
                sat[f"{P}mixins.adaln_layer.{which}_layernorm_list.{i}.{kind}"] = tensor
            elif module == "norm1.linear":
                attn = tensor.chunk(6)  # shift, scale, gate, text shift, text scale, text gate
                ff = state[f"transformer_blocks.{i}.norm2.linear.{kind}"].chunk(6)
                order = attn[:3] + ff[:3] + attn[3:] + ff[3:]
                sat[f"{P}mixins.adaln_layer.adaLN_modulations.{i}.1.{kind}"] = torch.cat(order)
            else:
                sat[f"{layer}{_BLOCK_RENAMES[module]}.{kind}"] = tensor
    # What SAT stores but the model recomputes.
    sat[P + "mixins.pos_embed.freqs_sin"] = torch.randn(10, head_dim)
    sat[P + "mixins.pos_embed.freqs_cos"] = torch.randn(10, head_dim)
    if "patch_embed.pos_embedding" not in state:
        sat[P + "mixins.pos_embed.pos_embedding"] = torch.randn(1, 10, 4)  # 2B's sin-cos table
    return sat


def vae_to_sat(state: dict, levels: int) -> dict:
    """Our VAE state dict in SAT's `3d-vae.pt` layout (decoder stages numbered from the bottom)."""
    sat = {}
    for key, tensor in state.items():
        key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        key = key.replace(".resnets.", ".block.").replace("down_blocks.", "down.")
        key = key.replace("downsamplers.0.", "downsample.").replace("upsamplers.0.", "upsample.")
        key = key.replace("conv_shortcut.", "nin_shortcut.")
        up = re.match(r"decoder\.up_blocks\.(\d+)\.", key)
        if up:
            key = f"decoder.up.{levels - 1 - int(up.group(1))}." + key[up.end() :]
        sat[key] = tensor
    sat["loss.discriminator.weight"] = torch.randn(3)  # training-only
    return sat


def write_deepspeed_checkpoint(folder, state: dict, iteration: int = 1000):
    """SAT's transformer checkpoint: `<iteration>/mp_rank_00_model_states.pt` with the weights under
    "module", and a `latest` file naming the iteration."""
    (folder / str(iteration)).mkdir(parents=True)
    torch.save({"module": state, "iteration": iteration}, folder / str(iteration) / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text(f"{iteration}\n")
    return folder


def make_sat_checkpoint(pipe, root: Path, seed: int = 1):
    """Fine-tune `pipe` in place (a seeded perturbation of every transformer and VAE weight, so that it
    differs from the folder it was loaded from) and write it as SAT checkpoints under `root`: a DeepSpeed
    transformer folder and a `3d-vae.pt`. Returns (transformer folder, VAE file)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*pipe.transformer.parameters(), *pipe.vae.parameters()]:
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
    sat = transformer_to_sat(pipe.transformer.state_dict(), pipe.config.attention_head_dim)
    transformer = write_deepspeed_checkpoint(root / "transformer", sat)
    vae = root / "3d-vae.pt"
    levels = len(pipe.vae.config.up_block_types)
    torch.save({"state_dict": vae_to_sat(pipe.vae.state_dict(), levels)}, vae)
    return transformer, vae


# ----------------------------------------------------------------------------------------------------
# Fine-tuning data folders (train tests): real MP4s, plus the broken entries a real folder has.

TRAIN_CAPTIONS = ["a cat sits on the mat", "a dog runs through the green park", "a bird flies above the blue sea"]


def make_video_folder(root, layout: str = "jsonl", count: int = 3, frames: int = 12, broken: bool = True):
    """A data folder of `count` captioned MP4s (8 fps, 40x56, a moving square over a gradient) in the
    `metadata.jsonl` ("jsonl") or `prompts.txt` + `videos.txt` ("lines") layout. With `broken`, it also
    lists `videos/corrupt.mp4` (not a video), `videos/short.mp4` (4 frames) and `videos/nocaption.mp4`
    (a good video with an empty caption). Returns the folder."""
    import json

    from cogvideox.video import export_video

    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        export_video(sample_frames(frames, 40, 56, seed=i), root / "videos" / f"clip{i}.mp4", fps=8)
        entries.append((f"videos/clip{i}.mp4", TRAIN_CAPTIONS[i % len(TRAIN_CAPTIONS)]))
    if broken:
        (root / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
        export_video(sample_frames(4, 40, 56, seed=7), root / "videos" / "short.mp4", fps=8)
        export_video(sample_frames(frames, 40, 56, seed=8), root / "videos" / "nocaption.mp4", fps=8)
        entries += [("videos/corrupt.mp4", "a red sun"), ("videos/short.mp4", "a cat"), ("videos/nocaption.mp4", "")]
    if layout == "jsonl":
        lines = [json.dumps({"video": v, "caption": c}) for v, c in entries]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    elif layout == "lines":
        (root / "videos.txt").write_text("".join(f"{v}\n" for v, _ in entries))
        (root / "prompts.txt").write_text("".join(f"{c}\n" for _, c in entries))
    else:
        raise ValueError(f"layout must be jsonl or lines, got {layout!r}")
    return root


def fill_disk_for(monkeypatch, target: Path, rescue_dir: Path) -> None:
    """Make `export_video` fail on `target` as a full disk would (it was writable when the command started),
    and send what is rescued to `rescue_dir`; `read_rescued(err)` finds it in the error line."""
    import tempfile

    import cogvideox.video

    export = cogvideox.video.export_video

    def disk_full_for_target(frames, path, fps=8, **kwargs):
        if path == target:
            raise OSError(28, "No space left on device")
        return export(frames, path, fps=fps, **kwargs)

    monkeypatch.setattr(cogvideox.video, "export_video", disk_full_for_target)
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_dir))


def read_rescued(err: str, target: Path, what: str = "video") -> str:
    """The path of the file a one-line 'could not write TARGET (full disk); ... saved to PATH instead' error
    names, checked to be that error."""
    assert err.startswith(f"cogvideox: error: could not write {target} ([Errno 28] No space left on device); "
                          f"the {what} was saved to "), err
    return err.strip().split("saved to ")[1].removesuffix(" instead")


def fail_training_at(monkeypatch, stop: int, error: BaseException):
    """Make `Run.train_step` raise `error` at step `stop` (a user's Ctrl-C, running out of memory); returns
    the original method, to put back for the resumed run."""
    from cogvideox.train.finetune import Run

    original = Run.train_step

    def fail(self, step):
        if step == stop:
            raise error
        return original(self, step)

    monkeypatch.setattr(Run, "train_step", fail)
    return original


def free_port() -> int:
    """A loopback TCP port no one listens on now. Take it just before the process that listens on it
    starts: tests run side by side (pytest-xdist), and until then another test's server, or the local end
    of another test's connection, may take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_status(argv: list[str]) -> int:
    """`cogvideox.cli.main(argv)`'s exit status, whether returned or raised (argparse exits)."""
    from cogvideox.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_sigterm_ends_rank_zero_waiting(argv: list[str]) -> None:
    """Run `cogvideox ARGV` as rank 0 of two under torchrun's variables, with a rank 1 that never comes;
    once it waits for it in the rendezvous (listening on the port), send torchrun's SIGTERM and assert that
    it ends at once, by that signal, with nothing on stderr."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = os.environ | {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                        "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    process = subprocess.Popen([sys.executable, "-m", "cogvideox", *argv], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # rank 0 listens on the port once it waits for the others
            assert process.poll() is None and time.monotonic() < deadline, "rank 0 never waited to join"
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == -signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    assert process.stderr.read() == b""


def shared_port(rank: int, path: str | Path, wait_s: float = 120) -> int:
    """A fresh `free_port` for a process group about to start: rank 0 takes it and writes it to `path`,
    the other ranks read it there (waiting up to `wait_s`)."""
    path = Path(path)
    if rank == 0:
        port = free_port()
        path.with_suffix(".tmp").write_text(str(port))
        path.with_suffix(".tmp").rename(path)  # whole, or absent
        return port
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no port at {path} after {wait_s:g} s")
        time.sleep(0.02)
    return int(path.read_text())


# What every spawned test process imports, loaded once in the fork server that starts them: with the
# "spawn" method each process paid about 10 s of CPU here importing torch and transformers' T5 first.
FORKSERVER_PRELOAD = ["torch", "transformers.models.t5.modeling_t5", "cogvideox.pipeline", "helpers"]


def start_processes(fn, args: tuple, nprocs: int):
    """`torch.multiprocessing.spawn(fn, args, nprocs, join=False)`, the processes forked from a server that
    has imported `FORKSERVER_PRELOAD` already (a fork of a process that has run no torch work yet, so no
    thread pool is copied half-way); `join_or_fail` waits for them."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when the server starts
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="forkserver")


def cli_rank(rank: int, argv: list[str], port: str, log_dir: str | None = None, check: bool = True) -> None:
    """One process of a two-process `cogvideox ARGV` as torchrun starts it (its environment variables),
    for `start_processes`. With `log_dir`, its stdout, stderr and exit status go to `log_dir/rank-N.out`,
    `.err` and `.status`. With `check`, a non-zero exit status fails the process."""
    import os
    import sys

    import torch

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="")  # fmt: skip
    torch.set_num_threads(1)
    from cogvideox.cli import main

    log = Path(log_dir) / f"rank-{rank}" if log_dir is not None else None
    if log is not None:  # closed as the process ends
        sys.stdout, sys.stderr = open(log.with_suffix(".out"), "w"), open(log.with_suffix(".err"), "w")  # noqa: SIM115
    try:
        status = main(argv)
    except SystemExit as e:  # a usage error
        status = e.code
    sys.stdout.flush()
    sys.stderr.flush()
    if log is not None:
        log.with_suffix(".status").write_text(str(status))
    if check and status != 0:
        raise SystemExit(f"rank {rank}: cogvideox {argv[0]} exited with {status}")


def join_or_fail(context, deadline_s: float, what: str) -> None:
    """Wait for the processes of `torch.multiprocessing.spawn(..., join=False)`; any still running after
    `deadline_s` (waiting in a collective the others skipped) is killed and the test fails."""
    import pytest

    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):  # returns as each one exits
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} still running after {deadline_s:g} s")


def random_lora(transformer, rank=4, alpha=8.0, seed=1, name="default", targets=None):
    """Inject an adapter whose B is random too (a fresh one is a no-op), so it visibly changes outputs."""
    from cogvideox.train import lora

    lora.inject_lora(transformer, rank, alpha, targets=targets or lora.DEFAULT_TARGETS, name=name, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in lora.lora_layers(transformer).values():
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)


def make_variant_model(source: str | Path, folder: str | Path, variant: str = "fp16") -> Path:
    """A copy of the model folder `source` that also holds weights of `variant`, as the hub's repos do:
    the transformer's as one `diffusion_pytorch_model.{variant}.safetensors`, the T5's as shards
    (`model.{variant}-00001-of-0000N.safetensors` with `model.safetensors.index.{variant}.json`), both
    saved in float16 by diffusers' and transformers' own `save_pretrained(variant=)` after a seeded change
    (so that they differ from the plain weights beyond rounding); the VAE keeps its plain weights only.
    Returns the folder."""
    import shutil

    from diffusers import CogVideoXTransformer3DModel
    from transformers import T5EncoderModel

    folder = Path(shutil.copytree(source, folder))
    generator = torch.Generator().manual_seed(7)
    transformer = CogVideoXTransformer3DModel.from_pretrained(folder / "transformer")
    _jitter(transformer, generator, scale=0.5)
    transformer.half().save_pretrained(folder / "transformer", variant=variant)
    text_encoder = T5EncoderModel.from_pretrained(folder / "text_encoder")
    _jitter(text_encoder, generator, scale=0.5)
    text_encoder.half().save_pretrained(folder / "text_encoder", variant=variant, max_shard_size="20KB")
    return folder
