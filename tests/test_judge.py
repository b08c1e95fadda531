"""The demo judge: colour and direction read back from pixels, on clean and degraded renders."""

import dataclasses

import numpy as np
import pytest

from cogvideox.demo import judge as judge_module
from cogvideox.demo import world
from cogvideox.demo.judge import UNKNOWN, Verdict, judge
from cogvideox.demo.world import BACKGROUND_RGB, FRAMES, HEIGHT, WIDTH, all_captions, render, scene_for_caption


def gaussian_blur(video: np.ndarray, sigma: float) -> np.ndarray:
    """Separable spatial Gaussian blur of [F, H, W, 3], edges replicated; float32 out."""
    radius = int(3 * sigma) + 1
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = (kernel / kernel.sum()).astype(np.float32)
    x = np.pad(video.astype(np.float32), ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = video.shape[1:3]
    x = sum(k * x[:, i : i + h] for i, k in enumerate(kernel))
    return sum(k * x[:, :, i : i + w] for i, k in enumerate(kernel))


def like_generated(video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A render made to look generated: blurred, object faded towards the background, brightness
    flicker per frame, pixel noise."""
    background = video[:, :1, :1].astype(np.float32)  # the corners are background in the world's renders
    x = gaussian_blur(video, sigma=1.0)
    x = background + 0.8 * (x - background)
    x = x + 6.0 * rng.standard_normal((video.shape[0], 1, 1, 1), np.float32)
    x = x + 12.0 * rng.standard_normal(video.shape, np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_judge_reads_every_rendered_caption():
    wrong, wrong_shape, total = [], 0, 0
    for seed in range(2):
        for index, text in enumerate(all_captions()):
            scene = scene_for_caption(text, [seed, index])
            verdict = judge(render(scene))
            total += 1
            if not verdict.matches(text) or verdict.confidence < 0.5:
                wrong.append((text, verdict))
            wrong_shape += verdict.shape != scene.shape
    assert not wrong, f"{len(wrong)} of {total} misjudged, e.g. {wrong[:3]}"
    assert wrong_shape <= 0.01 * total


def test_judge_survives_blur_noise_and_fading():
    rng = np.random.default_rng(0)
    wrong = []
    for index, text in enumerate(all_captions()):
        video = like_generated(render(scene_for_caption(text, [9, index])), rng)
        verdict = judge(video)
        if not verdict.matches(text):
            wrong.append((text, verdict))
    assert len(wrong) <= 2, f"{len(wrong)} of 216 misjudged, e.g. {wrong[:3]}"


@pytest.mark.parametrize("background", world.BACKGROUNDS)
@pytest.mark.parametrize("noise", [0.0, 12.0, 30.0])
def test_blank_video_is_unknown(background, noise):
    video = np.full((FRAMES, HEIGHT, WIDTH, 3), BACKGROUND_RGB[background], dtype=np.float32)
    video += np.random.default_rng(1).normal(0.0, noise, video.shape)
    verdict = judge(np.clip(np.rint(video), 0, 255).astype(np.uint8))
    assert verdict == Verdict(UNKNOWN, UNKNOWN, None, 0.0)


def test_still_object_has_a_colour_but_no_direction():
    for index in range(0, 216, 5):
        scene = dataclasses.replace(scene_for_caption(all_captions()[index], index), speed=0.0)
        verdict = judge(render(scene))
        assert (verdict.colour, verdict.direction, verdict.confidence) == (scene.colour, UNKNOWN, 0.0)


def test_verdict_matches_colour_and_direction_only():
    verdict = Verdict("yellow", "right", None, 0.9)
    assert verdict.matches("a yellow triangle moving right on a white background")
    assert verdict.matches("a yellow circle moving right on a black background")
    assert not verdict.matches("a yellow circle moving left on a black background")
    assert not verdict.matches("a cyan circle moving right on a black background")
    assert judge_module.parse_caption is world.parse_caption


def test_judge_rejects_frames_it_cannot_read():
    video = render(scene_for_caption(all_captions()[0], 0))
    with pytest.raises(ValueError, match="uint8"):
        judge(video.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        judge(video.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="at least 2 frames"):
        judge(video[:1])
