"""A first and a last frame (keyframe interpolation, as CogVideoX-Interpolation conditions its 5B-I2V
fine-tune), against the reference's image-to-video pipeline given the same conditioning."""

import numpy as np
import pytest
import torch
from helpers import assert_same_video, run_reference, sample_picture

from cogvideox import InputError, Pipeline
from cogvideox.cli import main
from cogvideox.video import read_metadata

diffusers = pytest.importorskip("diffusers")

SMALL = dict(num_frames=9, num_inference_steps=3, max_sequence_length=16, guidance_scale=6.0)


def keyframe_reference(folder):
    """diffusers' image-to-video pipeline with CogVideoX-Interpolation's conditioning: the first frame's
    latent, zeros, the last frame's latent; posterior draws for the first, then the last, then the noise."""
    from diffusers.pipelines.cogvideo.pipeline_cogvideox_image2video import retrieve_latents
    from diffusers.utils.torch_utils import randn_tensor

    class Keyframes(diffusers.CogVideoXImageToVideoPipeline):
        last_image = None  # the preprocessed last frame [1, 3, H, W], set before each call

        def prepare_latents(self, image, batch_size=1, num_channels_latents=16, num_frames=13, height=60,
                            width=90, dtype=None, device=None, generator=None, latents=None):  # fmt: skip
            count = (num_frames - 1) // self.vae_scale_factor_temporal + 1

            def latent_of(picture):
                draws = [retrieve_latents(self.vae.encode(picture.unsqueeze(2)), generator) for _ in range(batch_size)]
                sample = torch.cat(draws).to(dtype).permute(0, 2, 1, 3, 4)
                factor = self.vae_scaling_factor_image
                return sample / factor if self.vae.config.invert_scale_latents else sample * factor

            first, last = latent_of(image[:1]), latent_of(self.last_image.to(device, dtype))
            zeros = torch.zeros((batch_size, count - 2, *first.shape[2:]), dtype=dtype, device=device)
            spatial = self.vae_scale_factor_spatial
            shape = (batch_size, count, num_channels_latents, height // spatial, width // spatial)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            return noise * self.scheduler.init_noise_sigma, torch.cat([first, zeros, last], dim=1)

    return Keyframes.from_pretrained(folder, torch_dtype=torch.float32)


@pytest.mark.parametrize("variant", ["5b-i2v", "1.5-i2v"])
def test_first_and_last_frame_match_the_reference(variant, tiny_i2v_dir, tiny_v15_i2v_dir):
    folder = {"5b-i2v": tiny_i2v_dir, "1.5-i2v": tiny_v15_i2v_dir}[variant]
    size = dict(height=64, width=64) if variant == "5b-i2v" else dict(height=32, width=48)
    first, last = sample_picture(seed=1), sample_picture(seed=2)
    reference = keyframe_reference(folder)
    reference.last_image = reference.video_processor.preprocess(last, **size)
    ref = run_reference(reference, seed=5, prompt="a ball rolls", image=first, **size, **SMALL)

    pipe = Pipeline.from_pretrained(folder)
    ours = pipe("a ball rolls", image=first, last_image=np.asarray(last), seed=5, progress=False, **size, **SMALL)
    latent_err, frame_err = assert_same_video(ours, *ref)
    print(f"{variant}: latents rel. error {latent_err:.2e}, frames max diff {frame_err}/255")
    # The last frame changes the video: without it, the same seed gives another one.
    alone = pipe("a ball rolls", image=first, seed=5, progress=False, **size, **SMALL)
    assert not torch.allclose(alone.latents, ours.latents, atol=1e-3)


def test_a_last_frame_needs_a_first_and_room(tiny_i2v_dir, tiny_v15_i2v_dir):
    pipe = Pipeline.from_pretrained(tiny_v15_i2v_dir)
    with pytest.raises(InputError, match=r"last_image is the last frame of an image-to-video video: give the first"):
        pipe("a cat", last_image=sample_picture(), **SMALL)
    with pytest.raises(InputError, match="a last frame needs a video of at least 9 frames, got num_frames=1"):
        pipe("a cat", image=sample_picture(), last_image=sample_picture(), height=32, width=48,
             **(SMALL | dict(num_frames=1)))  # fmt: skip


def test_cli_records_the_last_frame(capsys, tiny_v15_i2v_dir, tmp_path):
    first, last = tmp_path / "first.png", tmp_path / "last.png"
    sample_picture(seed=1).save(first)
    sample_picture(seed=2).save(last)
    out = tmp_path / "between.mp4"
    argv = ["generate", "a ball rolls", "--model", str(tiny_v15_i2v_dir), "--image", str(first), "--last-image",
            str(last), "--frames", "9", "--height", "32", "--width", "48", "--steps", "2", "--seed", "3", "--quiet",
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert (read_metadata(out)["image"], read_metadata(out)["last_image"]) == (str(first), str(last))
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"--image {first} --last-image {last}" in capsys.readouterr().out

    for argv, message in [
        (["generate", "a cat", "--last-image", str(last)], "--last-image is the last frame of an image-to-video "
                                                           "video: give the first with --image"),
        (["generate", "a cat", "--model", str(tiny_v15_i2v_dir), "--image", str(first), "--last-image", str(last),
          "--frames", "1"], "a last frame needs a video of at least 9 frames, got num_frames=1"),
        (["generate", "a cat", "--model", str(tiny_v15_i2v_dir), "--image", str(first), "--last-image",
          str(tmp_path / "missing.png")], "missing.png"),
    ]:  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cogvideox: error: ") and message in err and err.count("\n") == 1, err
