"""RIFLEx: videos longer than the model's own with one temporal RoPE frequency slowed, and nothing else
changed."""

import math

import numpy as np
import pytest
import torch

from cogvideox import InputError, Pipeline, export_video, read_video
from cogvideox.cli import main
from cogvideox.models.config import TransformerConfig
from cogvideox.models.embeddings import riflex_frequencies, rope_frequencies
from cogvideox.models.transformer import CogVideoXTransformer


def test_cogvideox_5b_gets_the_authors_intrinsic_component():
    """16 temporal channels, 13 latent frames: the second component (period 19.9) is slowed once a video
    passes 20 latent frames (81 frames), to 90% of a period over the video; the others keep theirs."""
    standard = rope_frequencies(16)
    assert 2 * math.pi / float(standard[1]) == pytest.approx(19.87, abs=0.01)
    for latent_frames in (13, 17, 19):  # 49, 65 and 73 frames: within the period, nothing changes
        assert torch.equal(riflex_frequencies(standard, 13, latent_frames), standard)
    for latent_frames in (21, 25, 37):  # 81, 97 and 145 frames
        slowed = riflex_frequencies(standard, 13, latent_frames)
        assert float(slowed[1]) == pytest.approx(0.9 * 2 * math.pi / latent_frames, rel=1e-6)
        assert torch.equal(torch.cat([slowed[:1], slowed[2:]]), torch.cat([standard[:1], standard[2:]]))
        assert latent_frames / (2 * math.pi / float(slowed[1])) == pytest.approx(0.9)


def test_the_component_is_the_first_whose_period_covers_the_trained_length():
    standard = rope_frequencies(16)  # periods 6.3, 19.9, 62.8, 199, ...
    assert not torch.equal(riflex_frequencies(standard, 5, 9)[0], standard[0])  # 6.3 covers 5
    slowed = riflex_frequencies(standard, 30, 70)  # 62.8 is the first to cover 30
    assert torch.equal(slowed[:2], standard[:2]) and not torch.equal(slowed[2], standard[2])
    assert torch.equal(riflex_frequencies(standard, 10**9, 2 * 10**9), standard)  # no period covers it


def tiny_config(**overrides) -> TransformerConfig:
    # head 32: 8 temporal channels, frequencies 1, 0.1, ... (periods 6.3, 62.8, ...); 9 frames = 3 latent
    base = dict(num_attention_heads=1, attention_head_dim=32, in_channels=4, out_channels=4, time_embed_dim=8,
                text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=9,
                max_text_seq_length=4, use_rotary_positional_embeddings=True)  # fmt: skip
    return TransformerConfig(**(base | overrides))


@pytest.mark.parametrize("patch_size_t", [None, 2])
def test_the_rotary_table_changes_only_in_the_slowed_temporal_channels(patch_size_t):
    model = CogVideoXTransformer(tiny_config(patch_size_t=patch_size_t))
    native = 3 if patch_size_t is None else 4  # 1.5 pads 3 latent frames to 4: two temporal positions
    for frames in (1, native):
        plain = model.rotary_embedding(frames, 8, 8)
        assert all(torch.equal(a, b) for a, b in zip(plain, model.rotary_embedding(frames, 8, 8, riflex=True)))
    frames = 14 if patch_size_t is None else 28  # 14 temporal positions, past the first period (6.3)
    (cos, sin), (cos_r, sin_r) = model.rotary_embedding(frames, 8, 8), model.rotary_embedding(frames, 8, 8, riflex=True)
    changed = (cos != cos_r).any(0) | (sin != sin_r).any(0)
    assert changed.nonzero().flatten().tolist() == [0, 1]  # component 0, its interleaved channel pair
    positions = torch.arange(14).repeat_interleave(16)  # time-major, 4x4 patches per frame
    assert torch.allclose(cos_r[:, 0], torch.cos(positions * 0.9 * 2 * math.pi / 14), atol=1e-5)


def test_the_pipeline_takes_riflex_for_longer_videos(tiny_rope_dir, tiny_sincos_dir):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)  # head 16, 9 frames (3 latent): component 0, period 6.3
    small = dict(num_inference_steps=1, height=32, width=32, max_sequence_length=8, seed=2, progress=False)
    at_native = [pipe("a cat", num_frames=9, riflex=r, **small).latents for r in (False, True)]
    assert torch.equal(*at_native)  # nothing to extrapolate: the same video
    longer = [pipe("a cat", num_frames=33, riflex=r, **small).latents for r in (False, True)]  # 9 latent
    assert not torch.allclose(*longer, atol=1e-3)
    with pytest.raises(InputError, match="riflex changes rotary positions, and this model has none"):
        Pipeline.from_pretrained(tiny_sincos_dir)("a cat", num_frames=33, riflex=True, **small)
    with pytest.raises(InputError, match="riflex must be True or False"):
        pipe("a cat", riflex="yes", **small)


def test_generate_riflex_and_the_warning_when_it_changes_nothing(capsys, tiny_rope_dir, tmp_path):
    common = ["--model", str(tiny_rope_dir), "--steps", "1", "--height", "32", "--width", "32", "--quiet",
              "--seed", "3", "--riflex"]  # fmt: skip
    assert main(["generate", "a cat", "-o", str(tmp_path / "a.mp4"), "--frames", "9", *common]) == 0
    assert "--riflex changes nothing at 9 frames: it is for videos longer than the model's own 9" in (
        capsys.readouterr().err
    )
    assert main(["generate", "a cat", "-o", str(tmp_path / "b.mp4"), "--frames", "33", *common]) == 0
    assert "--riflex" not in capsys.readouterr().err
    video = Pipeline.from_pretrained(tiny_rope_dir)(
        "a cat", num_frames=33, height=32, width=32, num_inference_steps=1, seed=3, riflex=True, progress=False
    ).frames[0]
    export_video(video, tmp_path / "library.mp4")  # the library's video, encoded the same way
    assert np.array_equal(read_video(tmp_path / "b.mp4")[0], read_video(tmp_path / "library.mp4")[0])
