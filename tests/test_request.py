"""What each CogVideoX variant can generate, decided from the configs alone."""

import pytest

from cogvideox import InputError
from cogvideox.models.config import TransformerConfig, VAEConfig
from cogvideox.request import check_request, default_fps, default_size

VAE = VAEConfig()
# The released transformers, as far as the request rules care (notes section 1.1).
V2B = TransformerConfig()
V5B = TransformerConfig(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
V5B_I2V = V5B.replace(in_channels=32, use_learned_positional_embeddings=True)
V15 = V5B.replace(sample_height=300, sample_width=300, sample_frames=81, patch_size_t=2, patch_bias=False)


def test_official_defaults():
    for config in (V2B, V5B):
        request = check_request(config, VAE, "a cat")
        assert (request.num_frames, request.height, request.width, request.latent_frames) == (49, 480, 720, 13)
        assert request.max_sequence_length == 226 and request.padding_frames == 0 and default_fps(config) == 8
    # 1.5: 768x1360 (not the 2400x2400 its sample size gives), 81 frames = 21 latents padded to 22.
    request = check_request(V15, VAE, "a cat")
    assert (request.num_frames, request.height, request.width) == (81, 768, 1360)
    assert (request.latent_frames, request.padding_frames) == (22, 1)
    assert default_size(V15, VAE) == (768, 1360) and default_fps(V15) == 16
    assert check_request(V15, VAE, "a cat", num_frames=161).latent_frames == 42


def test_negative_prompts_and_guidance():
    request = check_request(V5B, VAE, ["a", "b"], guidance_scale=1.0, num_videos_per_prompt=3)
    assert request.negative_prompts == ["", ""] and not request.use_guidance and request.batch_size == 6
    assert check_request(V5B, VAE, ["a", "b"], negative_prompt="blur").negative_prompts == ["blur", "blur"]


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        (V5B, dict(num_frames=45), r"num_frames must be 8k\+1 \(e.g. 49\), got 45; nearest valid: 41 or 49"),
        (V5B, dict(num_frames=53), "8k"),  # 4k+1 but 14 latent frames: the VAE would make 56 frames
        (V5B, dict(height=488), "height must be a positive multiple of 16"),
        (V15, dict(height=2416, width=768), r"at most 2400x2400"),
        (V2B, dict(max_sequence_length=128), "exactly 226 text tokens"),
        (V5B_I2V, dict(), "image-to-video model"),
        (V5B, dict(num_inference_steps=1001), "at most 1000"),
        (V5B, dict(guidance_scale="6"), "guidance_scale must be a number"),
        (V5B, dict(dynamic_cfg="cosine"), "dynamic_cfg must be one of reference, smooth"),
    ],
)
def test_rejections(config, kwargs, message):
    with pytest.raises(InputError, match=message):
        check_request(config, VAE, "a cat", **kwargs)


def test_rope_models_take_any_text_length():
    assert check_request(V5B, VAE, "a cat", max_sequence_length=128).max_sequence_length == 128


def test_learned_position_table_fixes_the_size():
    from cogvideox.request import check_size

    assert check_size(480, 720, 49, V5B_I2V, VAE) == (480, 720)
    with pytest.raises(InputError, match=r"only generates 720x480 \(width x height\) at 49 frames"):
        check_size(768, 1360, 49, V5B_I2V, VAE)
    with pytest.raises(InputError, match="at 49 frames; got 720x480 at 81 frames"):
        check_size(480, 720, 81, V5B_I2V, VAE)


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a \udcff cat", r"prompt is not valid UTF-8 text \(bytes b'\\xff' at character 2\)"),  # a shell's stray byte
        ("a \ud800 cat", r"prompt holds a lone surrogate '\\ud800' at character 2"),  # not from a byte at all
        (["a cat", "\udfff"], "prompt holds a lone surrogate"),
    ],
)
def test_prompts_that_are_not_unicode(prompt, message):
    with pytest.raises(InputError, match=message):
        check_request(V5B, VAE, prompt)
