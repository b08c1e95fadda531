"""What the API accepts for a model, read from its configs: the same defaults as the loaded Pipeline, the
official models' native sizes, the clip lengths that map to frame counts the VAE round-trips."""

import pytest
from serve_helpers import write_config_folder

from cogvideox.errors import InputError
from cogvideox.pipeline import Pipeline
from cogvideox.serve.spec import ModelSpec, default_model_name, parse_size

# The official configs' values that decide sizes and lengths (see the reference notes' config table).
COGVIDEOX_1_0 = dict(sample_width=90, sample_height=60, sample_frames=49, patch_size=2)
COGVIDEOX_1_5 = dict(sample_width=300, sample_height=300, sample_frames=81, patch_size=2, patch_size_t=2)


def test_spec_agrees_with_the_loaded_pipeline(tiny_rope_dir):
    spec = ModelSpec.from_folder(tiny_rope_dir, "tiny")
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    height, width = pipe.default_size
    assert spec.native_size == f"{width}x{height}" == "64x64"
    assert (spec.num_frames, spec.fps, spec.version) == (pipe.default_num_frames, pipe.default_fps, pipe.version)
    # Every frame count the spec hands out is one the pipeline takes.
    for frames in range(spec.frame_step + 1, spec.num_frames + 1, spec.frame_step):
        pipe.check_request("a cat", num_frames=frames, height=height, width=width)


def test_official_native_sizes(tmp_path):
    v10 = ModelSpec.from_folder(write_config_folder(tmp_path / "v10", **COGVIDEOX_1_0), "CogVideoX-2b")
    assert (v10.sizes, v10.num_frames, v10.fps, v10.frame_step) == (("720x480",), 49, 8, 8)
    v15 = ModelSpec.from_folder(write_config_folder(tmp_path / "v15", **COGVIDEOX_1_5), "CogVideoX1.5-5B")
    assert (v15.sizes, v15.num_frames, v15.fps, v15.version) == (("1360x768",), 81, 16, "1.5")


def test_extra_sizes_are_checked_against_the_model(tmp_path):
    folder = write_config_folder(tmp_path / "v15", **COGVIDEOX_1_5)
    spec = ModelSpec.from_folder(folder, "m", extra_sizes=("768x1360", "1360x768", " 720x480 "))
    assert spec.sizes == ("1360x768", "768x1360", "720x480")
    for bad, why in (("720x470", "multiples of 16"), ("2416x768", "at most 2400x2400"), ("wide", "WIDTHxHEIGHT")):
        with pytest.raises(InputError, match=why):
            ModelSpec.from_folder(folder, "m", extra_sizes=(bad,))
    i2v = write_config_folder(
        tmp_path / "i2v", **COGVIDEOX_1_0, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True
    )
    with pytest.raises(InputError, match="learned position table"):
        ModelSpec.from_folder(i2v, "m", extra_sizes=("480x720",))


def test_seconds_map_to_frame_counts_the_model_makes(tmp_path):
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "v10", **COGVIDEOX_1_0), "m")
    assert spec.frames_for(None, 8) == 49
    assert [spec.frames_for(s, 8) for s in (0.1, 1, 4, 4.4, 6, 6.125)] == [9, 9, 33, 33, 49, 49]
    assert spec.frames_for(2, 16) == 33  # a higher frame rate: more frames for the same length
    for seconds, fps in ((7, 8), (4, 16), (1e308, 8)):  # 1e308 s at 8 fps: more frames than a float holds
        with pytest.raises(InputError, match="at most 49 frames"):
            spec.frames_for(seconds, fps)


def test_sizes_and_names():
    assert parse_size("720x480") == (720, 480)
    for bad in ("720", "720x", "x480", "720X480", "-720x480", "720x480x3", 720):
        with pytest.raises(InputError):
            parse_size(bad)
    assert default_model_name(None) == "cogvideox-demo"
    assert default_model_name("THUDM/CogVideoX-2b") == "CogVideoX-2b"
    assert default_model_name("models/my-finetune/") == "my-finetune"


def test_an_image_to_video_model_makes_its_one_length_from_a_first_frame(tmp_path):
    """5B-I2V's learned position table makes 49 frames at 720x480 and nothing else: another length is a 400
    at the API, not a job that fails on the worker. It has no RIFLEx."""
    i2v = dict(in_channels=32, out_channels=16, use_rotary_positional_embeddings=True,
               use_learned_positional_embeddings=True)  # fmt: skip
    spec = ModelSpec.from_folder(write_config_folder(tmp_path / "i2v", **COGVIDEOX_1_0, **i2v), "CogVideoX-5b-I2V")
    assert (spec.image_to_video, spec.one_length, spec.riflex, spec.riflex_frames) == (True, True, False, None)
    assert spec.frames_for(None, 8) == spec.frames_for(6, 8) == 49
    with pytest.raises(InputError, match="makes 49 frames only"):
        spec.frames_for(4, 8)


def test_riflex_reaches_twice_the_trained_length_on_rope_models_only(tmp_path):
    rope = ModelSpec.from_folder(write_config_folder(tmp_path / "5b", **COGVIDEOX_1_0), "CogVideoX-5b")
    assert (rope.riflex, rope.riflex_frames, rope.riflex_max_seconds, rope.image_to_video) == (True, 97, 12.125, False)
    assert rope.frames_for(12, 8, riflex=True) == 97
    with pytest.raises(InputError, match=r"at most 49 frames \(6.125 s at 8 fps, or up to 97 frames with riflex"):
        rope.frames_for(12, 8)
    with pytest.raises(InputError, match="at most 97 frames"):
        rope.frames_for(13, 8, riflex=True)
    sincos = write_config_folder(tmp_path / "2b", **COGVIDEOX_1_0, use_rotary_positional_embeddings=False)
    spec = ModelSpec.from_folder(sincos, "CogVideoX-2b")
    assert (spec.riflex, spec.riflex_max_seconds) == (False, None)
    with pytest.raises(InputError, match=r"at most 49 frames \(6.125 s at 8 fps\); got 12"):
        spec.frames_for(12, 8)
