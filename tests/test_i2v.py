"""Image-to-video against diffusers' CogVideoXImageToVideoPipeline on tiny models, seed for seed."""

import numpy as np
import pytest
import torch
from helpers import (
    assert_same_video,
    load_reference_pipeline,
    run_reference,
    sample_picture,
)

from cogvideox import InputError, Pipeline
from cogvideox.conditioning import load_image, load_video, prepare_image, resize

pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")

SMALL = dict(num_frames=9, num_inference_steps=3, max_sequence_length=16)


@pytest.fixture(scope="module")
def picture_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "photo.png"
    sample_picture().save(path)
    return path


CASES = {
    # name: (folder fixture, call arguments)
    "5b-i2v-like-ddim": ("tiny_i2v_dir", dict(prompt="a cat sits on the mat", guidance_scale=6.0)),
    "5b-i2v-like-no-guidance": ("tiny_i2v_dir", dict(prompt="a dog runs", guidance_scale=1.0)),
    "v15-i2v-dpm-padding": ("tiny_v15_i2v_dir", dict(prompt="waves crash on the rocks", height=32, width=48)),
    "v15-i2v-17-frames-dynamic": (
        "tiny_v15_i2v_dir",
        dict(prompt="the green park", num_frames=17, use_dynamic_cfg=True, negative_prompt="the sun"),
    ),
    # One frame (one latent frame after the image's padding frame), one DPM step, a picture shrunk.
    "v15-i2v-1-frame-1-step": (
        "tiny_v15_i2v_dir",
        dict(prompt="a bird flies", num_frames=1, num_inference_steps=1, height=16, width=32),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(request, picture_file, case):
    fixture, call = CASES[case]
    folder = request.getfixturevalue(fixture)
    kwargs = SMALL | dict(guidance_scale=6.0) | call
    prompt = kwargs.pop("prompt")

    reference = load_reference_pipeline(folder, task="image")
    ref = run_reference(reference, seed=7, prompt=prompt, image=sample_picture(), **kwargs)
    pipe = Pipeline.from_pretrained(folder)
    ours = pipe(prompt, image=picture_file, seed=7, progress=False, **kwargs)
    latent_err, frame_err = assert_same_video(ours, *ref)
    print(f"{case}: latents rel. error {latent_err:.2e}, frames max diff {frame_err}/255")
    assert ours.frames[0].shape[0] == kwargs["num_frames"]
    assert set(ours.timings) == {"text", "encode", "denoise", "decode"}
    if pipe.version == "1.5":
        assert ours.padding_frames == 1  # odd latent count: one frame in front, the image latent's


def test_two_prompts_and_generators_match_reference(tiny_i2v_dir):
    """A batch draws one posterior sample per video (generator i for video i), then the noise: the
    reference does the same when it is given the image once per prompt."""

    def generators():
        return [torch.Generator().manual_seed(s) for s in (3, 11)]

    prompts = ["a cat", "a bird flies"]
    reference = load_reference_pipeline(tiny_i2v_dir, scheduler="dpm", task="image")
    image = sample_picture()
    ref = run_reference(reference, generator=generators(), prompt=prompts, image=[image, image], **SMALL)
    pipe = Pipeline.from_pretrained(tiny_i2v_dir, scheduler="dpm")
    ours = pipe(prompts, image=np.asarray(image), generator=generators(), progress=False, **SMALL)
    assert_same_video(ours, *ref)


def test_given_latents_match_reference(tiny_v15_i2v_dir):
    """`latents=` replaces the noise draw only: the image's posterior sample still comes from the seed."""
    noise = torch.randn(1, 4, 4, 4, 6, generator=torch.Generator().manual_seed(99))  # 3 latent frames + padding
    kwargs = SMALL | dict(prompt="a cat", height=32, width=48, guidance_scale=6.0)
    reference = load_reference_pipeline(tiny_v15_i2v_dir, task="image")
    ref = run_reference(reference, seed=2, image=sample_picture(), latents=noise.clone(), **kwargs)
    pipe = Pipeline.from_pretrained(tiny_v15_i2v_dir)
    ours = pipe(image=sample_picture(), latents=noise, seed=2, progress=False, **kwargs)
    assert_same_video(ours, *ref)


def test_the_image_conditions_the_video(tiny_i2v_dir):
    pipe = Pipeline.from_pretrained(tiny_i2v_dir)
    kwargs = SMALL | dict(seed=1, output_type="latent", progress=False)
    first = pipe("a cat", image=sample_picture(seed=0), **kwargs).latents
    other = pipe("a cat", image=sample_picture(seed=1), **kwargs).latents
    assert (first - other).abs().max() > 1e-3


def test_resize_rules():
    picture = sample_picture(height=50, width=100)  # 2:1, to a 1:1 target
    stretched = resize(picture, 32, 32, "stretch")
    assert stretched.size == (32, 32)
    assert np.array_equal(np.asarray(stretched), np.asarray(picture.resize((32, 32), PIL.Image.LANCZOS)))
    # "crop" keeps the aspect ratio: the centred 50x50 square, resized (the filter reads a few pixels
    # beyond the square's sides, so only the interior equals resizing a cut-out copy).
    cropped = resize(picture, 32, 32, "crop")
    centre = picture.crop((25, 0, 75, 50)).resize((32, 32), PIL.Image.LANCZOS)
    inside = np.asarray(cropped).astype(int)[:, 3:-3] - np.asarray(centre).astype(int)[:, 3:-3]
    assert np.abs(inside).max() <= 1
    assert not np.array_equal(np.asarray(cropped), np.asarray(stretched))
    tensor = prepare_image(picture, 16, 32)
    assert tensor.shape == (1, 3, 1, 16, 32) and tensor.dtype == torch.float32
    assert -1 <= tensor.min() and tensor.max() <= 1
    with pytest.raises(InputError, match="resize must be one of stretch, crop"):
        resize(picture, 32, 32, "fit")


def test_exif_orientation_is_applied(tmp_path):
    picture = sample_picture(height=20, width=40)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    picture.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """A 16-bit PNG keeps its shades: each pixel's high byte, not PIL's clip at 255 (a white picture)."""
    ramp = np.linspace(0, 65535, 8 * 12).astype(np.uint16).reshape(8, 12)
    path = tmp_path / "depth.png"
    PIL.Image.fromarray(ramp).save(path)
    assert PIL.Image.open(path).mode == "I;16"
    for source in (path, PIL.Image.open(path)):
        rgb = np.asarray(load_image(source))
        assert rgb.shape == (8, 12, 3)
        assert np.array_equal(rgb[..., 0], (ramp >> 8).astype(np.uint8))
        assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_32_bit_pictures_without_a_colour_range_are_refused():
    """PIL clips 32-bit pictures at 0..255: a float one in [0, 1] would turn black, silently."""
    floats = PIL.Image.fromarray(np.linspace(0, 1, 96, dtype=np.float32).reshape(8, 12))
    wide = PIL.Image.fromarray(np.linspace(0, 60000, 96).astype(np.int32).reshape(8, 12))
    for picture, message in ((floats, "a floating-point image .*mode F, values 0 to 1"),
                             (wide, "a 32-bit integer image .*mode I, values 0 to 60000")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            load_image(picture)
        with pytest.raises(InputError, match=message):  # and as the frames of a video-to-video source
            load_video([picture] * 9)
    byte_range = np.arange(96, dtype=np.int32).reshape(8, 12)  # already 0..255: read as it is
    assert np.array_equal(np.asarray(load_image(PIL.Image.fromarray(byte_range)))[..., 1], byte_range)


def test_crop_mode_runs(tiny_i2v_dir):
    pipe = Pipeline.from_pretrained(tiny_i2v_dir)
    kwargs = SMALL | dict(seed=1, output_type="latent", progress=False)
    stretched = pipe("a cat", image=sample_picture(), **kwargs).latents
    cropped = pipe("a cat", image=sample_picture(), resize="crop", **kwargs).latents
    assert stretched.shape == cropped.shape and not torch.equal(stretched, cropped)


@pytest.fixture(scope="module")
def i2v_pipe(tiny_i2v_dir):
    return Pipeline.from_pretrained(tiny_i2v_dir)


def _no_work(pipe, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("heavy work started before the request was checked")

    monkeypatch.setattr(pipe.text_encoder, "encode", no_work)
    monkeypatch.setattr(pipe.transformer, "forward", no_work)
    monkeypatch.setattr(pipe.vae, "encode", no_work)


def test_undecodable_image_fails_before_any_work(i2v_pipe, tmp_path, monkeypatch):
    _no_work(i2v_pipe, monkeypatch)
    broken = tmp_path / "photo.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    with pytest.raises(InputError, match="cannot decode .*photo.jpg as an image"):
        i2v_pipe("a cat", image=broken, **SMALL)
    with pytest.raises(InputError, match="no image file at"):
        i2v_pipe("a cat", image=tmp_path / "missing.png", **SMALL)
    with pytest.raises(InputError, match=r"uint8 \[H, W, 3\]"):
        i2v_pipe("a cat", image=np.zeros((8, 8, 4), dtype=np.uint8), **SMALL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=32, width=48), r"only generates 64x64 \(width x height\) at 9 frames"),
        (dict(num_frames=17), "at 9 frames; got 64x64 at 17 frames"),
        (dict(image=None), "image-to-video model: give it the first frame"),
        (dict(video=np.zeros((9, 64, 64, 3), np.uint8)), "either an image .* or a video"),
        (dict(strength=0.5), "strength only applies to video-to-video"),
        (dict(resize="fit"), "resize must be one of stretch, crop"),
    ],
)
def test_bad_requests_fail_before_any_work(i2v_pipe, monkeypatch, kwargs, message):
    _no_work(i2v_pipe, monkeypatch)
    kwargs = SMALL | dict(image=sample_picture()) | kwargs
    with pytest.raises(InputError, match=message):
        i2v_pipe("a cat", **kwargs)


def test_text_to_video_model_refuses_an_image(tiny_rope_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    _no_work(pipe, monkeypatch)
    with pytest.raises(InputError, match="text-to-video model and cannot take an image.*CogVideoX-5b-I2V"):
        pipe("a cat", image=sample_picture(), **SMALL)


def test_save_pretrained_names_the_image_to_video_pipeline(i2v_pipe, tmp_path):
    import json

    i2v_pipe.save_pretrained(tmp_path / "copy")
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXImageToVideoPipeline"


# ----------------------------------------------------------------------------------------------------
# The command line


def test_cli_generate_with_an_image(tiny_i2v_dir, picture_file, tmp_path, capsys):
    from cogvideox import read_video
    from cogvideox.cli import main

    out = tmp_path / "video.mp4"
    argv = ["generate", "a cat", "--model", str(tiny_i2v_dir), "--image", str(picture_file), "--frames", "9",
            "--steps", "2", "--max-sequence-length", "16", "--seed", "1", "--quiet", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "encode" in capsys.readouterr().out
    frames, _ = read_video(out)
    assert frames.shape == (9, 64, 64, 3)


@pytest.mark.parametrize(
    "model, extra, message",
    [
        ("rope", ["--image", "PICTURE"], "text-to-video model and cannot take an image"),
        ("i2v", [], "image-to-video model: give it the first frame"),
        ("i2v", ["--image", "BROKEN"], "cannot decode"),
        ("i2v", ["--image", "PICTURE", "--video", "PICTURE"],
         "give one of --image (image-to-video), --video (video-to-video) and --extend, not --image and --video"),
        ("i2v", ["--image", "PICTURE", "--strength", "0.5"], "--strength only applies to video-to-video"),
        ("i2v", ["--image", "PICTURE", "--height", "32"], "only generates 64x64"),
    ],
)
def test_cli_mistakes_fail_before_loading(
    tiny_i2v_dir, tiny_rope_dir, picture_file, tmp_path, capsys, monkeypatch, model, extra, message
):
    from cogvideox.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    names = {"PICTURE": str(picture_file), "BROKEN": str(broken)}
    folder = tiny_i2v_dir if model == "i2v" else tiny_rope_dir
    argv = ["generate", "a cat", "--model", str(folder), "--quiet", *[names.get(e, e) for e in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cogvideox: error: ") and message in err


def test_released_image_to_video_defaults():
    """5B-I2V: 49 frames at 720x480 only; 1.5-I2V: 81 frames at 1360x768, 21 latent frames padded to 22
    with the image latent in the padding frame (the reference's layout)."""
    from cogvideox.models.config import VAEConfig
    from cogvideox.models.transformer import TRANSFORMER_PRESETS
    from cogvideox.request import check_request

    vae = VAEConfig()
    v10 = check_request(TRANSFORMER_PRESETS["CogVideoX-5b-I2V"], vae, "a cat", task="image")
    assert (v10.num_frames, v10.height, v10.width, v10.latent_frames, v10.padding_frames) == (49, 480, 720, 13, 0)
    i2v15 = TRANSFORMER_PRESETS["CogVideoX1.5-5B-I2V"]
    v15 = check_request(i2v15, vae, "a cat", task="image")
    assert (v15.num_frames, v15.height, v15.width, v15.latent_frames, v15.padding_frames) == (81, 768, 1360, 22, 1)
    assert check_request(i2v15, vae, "a cat", task="image", num_frames=161).latent_frames == 42
    with pytest.raises(InputError, match=r"8k\+1"):
        check_request(i2v15, vae, "a cat", task="image", num_frames=85)


def test_float_image_arrays_read_like_float_video_frames():
    array = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(array.astype(np.float32) / 255)), array)
    with pytest.raises(InputError, match="look like 0..255"):
        load_image(array.astype(np.float32))
