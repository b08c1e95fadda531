"""On the CPU, running out of memory is the kernel killing the process, with no message and the work lost:
a request whose activations the host cannot hold is refused up front, and a decode that would not fit runs
in tiles."""

import argparse
import re

import numpy as np
import pytest
import torch

from cogvideox import Pipeline
from cogvideox.autoencoder import decode_latents
from cogvideox.cli import build_parser, main
from cogvideox.errors import OutOfMemoryError
from cogvideox.fast import memory_plan
from cogvideox.fast.memory_plan import activation_bytes, decode_bytes

SMALL = dict(num_frames=9, height=64, width=96, num_inference_steps=2, seed=3, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()  # the demo model, on the CPU in fp32


def needs(pipe):
    """(denoise, untiled decode, tiled decode) estimates of a SMALL request, in bytes."""
    config, vae = pipe.config, pipe.vae
    denoise = activation_bytes(config, 4, 9, 64, 96, spatial_compression=vae.config.spatial_compression,
                               temporal_compression=vae.config.temporal_compression)["denoise"]  # fmt: skip
    untiled, tiled = (decode_bytes(vae, 1, 64, 96, torch.float32, tiles) for tiles in (False, True))
    return denoise, untiled, tiled


def test_the_decode_estimate_scales_with_the_decoders_width(pipe):
    released = activation_bytes(pipe.config, 2, 49, 480, 720)["decode"]
    assert released == pytest.approx(480 * 720 * 34_000, rel=1e-6)  # the H200 measurement's figure
    demo = activation_bytes(pipe.config, 2, 49, 480, 720, decoder_width=16)["decode"]
    assert demo == pytest.approx(released / 8, rel=1e-6)
    assert decode_bytes(pipe.vae, 1, 480, 720, torch.bfloat16, tiled=False) == pytest.approx(demo, rel=1e-6)
    # Tiles bound the decode by one tile's pixels (the demo's tiles: 32 x 48).
    assert decode_bytes(pipe.vae, 1, 480, 720, torch.bfloat16, tiled=True) == pytest.approx(demo * 32 * 48 / 480 / 720,
                                                                                            rel=1e-3)  # fmt: skip


def test_a_request_the_host_cannot_hold_is_refused_before_any_step(pipe, monkeypatch):
    denoise, untiled, tiled = needs(pipe)
    steps = []
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: denoise - 1)
    with pytest.raises(OutOfMemoryError) as error:
        pipe("a red circle", callback=lambda *a: steps.append(a), **SMALL)
    assert steps == [] and error.value.stage == "denoise"
    assert str(error.value).startswith("not enough memory on the CPU for this request: denoising 9 frames at 96x64 "
                                       "needs at least ")  # fmt: skip
    assert "try a smaller --height/--width or fewer --frames, or a GPU" in str(error.value)
    # The decode is counted in tiles, and only when there is one.
    assert denoise < tiled < untiled
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: tiled - 1)
    with pytest.raises(OutOfMemoryError, match="decoding 9 frames at 96x64"):
        pipe("a red circle", callback=lambda *a: steps.append(a), **SMALL)
    assert steps == []
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: denoise)
    assert pipe("a red circle", output_type="latent", **SMALL).frames is None
    # Where the available memory cannot be read, nothing is refused.
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: None)
    assert pipe("a red circle", **SMALL).frames[0].shape == (9, 64, 96, 3)


def test_a_decode_too_big_for_the_host_runs_in_tiles(pipe, monkeypatch):
    _, untiled, tiled = needs(pipe)
    assert tiled < untiled
    latents = pipe("a red circle", output_type="latent", **SMALL).latents
    pipe.vae.enable_tiling()
    try:
        in_tiles = decode_latents(pipe.vae, latents, torch.float32, pipe._memory_guard)
    finally:
        pipe.vae.disable_tiling()
    whole = decode_latents(pipe.vae, latents, torch.float32, pipe._memory_guard)
    assert not np.array_equal(in_tiles[0], whole[0])  # tiling shows, so the test can tell them apart

    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: untiled - 1)
    with pytest.warns(UserWarning, match="decoding 96x64 on the CPU would take about .* MiB, more than this machine "
                                         "has available: decoding in tiles, as --vae-tiling does"):  # fmt: skip
        frames = decode_latents(pipe.vae, latents, torch.float32, pipe._memory_guard)
    assert np.array_equal(frames[0], in_tiles[0]) and not pipe.vae.use_tiling  # and tiling is off again after
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: tiled - 1)
    with pytest.raises(OutOfMemoryError, match="not enough memory to decode 96x64 on the CPU, even in tiles"):
        decode_latents(pipe.vae, latents, torch.float32, pipe._memory_guard)


def test_the_command_line_says_so_in_one_line(capsys, tmp_path):
    """Without the guard, this request was killed by the kernel with no message at all."""
    out = tmp_path / "huge.mp4"
    assert main(["generate", "a red circle", "--height", "16000", "--width", "16000", "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cogvideox: error: not enough memory on the CPU for this request: denoising ")
    assert err.count("\n") == 1 and not out.exists()
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", err))  # the flags it says to try are generate's
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {option for action in commands.choices["generate"]._actions for option in action.option_strings}
    assert named and named <= flags, named - flags


def test_decoding_on_its_own_keeps_no_autograd_graph(pipe, monkeypatch):
    """`Pipeline.decode` called outside a generation (latents from output_type="latent") once kept every
    activation for a backward pass that never comes: 5.5 GB instead of 0.8 for the demo model at 240x360."""
    seen = []
    real = pipe.vae.decode

    def decode(z):
        seen.append(torch.is_inference_mode_enabled())
        return real(z)

    monkeypatch.setattr(pipe.vae, "decode", decode)
    latents = torch.randn(1, 3, pipe.config.latent_channels, 8, 12, requires_grad=True)
    frames = pipe.decode(latents)
    assert seen == [True] and frames[0].shape == (9, 64, 96, 3)
