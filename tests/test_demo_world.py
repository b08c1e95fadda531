"""The synthetic world of the demo model: captions, the held-out split, rendering and the dataset."""

import dataclasses

import numpy as np
import pytest
import torch

from cogvideox.demo import world
from cogvideox.demo.world import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    FRAMES,
    HEIGHT,
    WIDTH,
    Scene,
    WorldDataset,
    all_captions,
    held_out_captions,
    is_held_out,
    parse_caption,
    render,
    sample_scene,
    scene_for_caption,
    training_captions,
)

# The split as the issue states it, written out independently of the code under test.
ISSUE_HELD_OUT = {
    ("red", "up"),
    ("green", "left"),
    ("blue", "down"),
    ("yellow", "right"),
    ("purple", "up"),
    ("cyan", "left"),
}


def object_pixels(video: np.ndarray, scene: Scene) -> np.ndarray:
    """[F, H, W] mask of pixels exactly of the object's colour (its fully covered interior)."""
    return (video == np.array(COLOUR_RGB[scene.colour], dtype=np.uint8)).all(axis=-1)


def test_video_size_fits_the_demo_vae():
    assert (FRAMES - 1) % 4 == 0 and HEIGHT % 8 == 0 and WIDTH % 8 == 0
    assert ((FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8) == (5, 8, 12)


def test_split_sizes_and_membership():
    everything, train, held = all_captions(), training_captions(), held_out_captions()
    assert len(everything) == len(set(everything)) == 3 * 6 * 4 * 3 == 216
    assert len(held) == 6 * 3 * 3 == 54
    assert len(train) == 216 - 54
    assert set(train) | set(held) == set(everything) and not set(train) & set(held)
    assert world.HELD_OUT_PAIRS == ISSUE_HELD_OUT
    for text in everything:
        colour, _, direction, _ = parse_caption(text)
        assert ((colour, direction) in ISSUE_HELD_OUT) == (text in held) == is_held_out(text)
    # Generalisation means new combinations of known words: every word still occurs in training.
    train_words = {word for text in train for word in parse_caption(text)}
    for vocabulary in (world.COLOURS, world.SHAPES, world.DIRECTIONS, world.BACKGROUNDS):
        assert set(vocabulary) <= train_words


def test_caption_template_and_parsing():
    for seed in range(50):
        scene = sample_scene(seed, split="all")
        expected = f"a {scene.colour} {scene.shape} moving {scene.direction} on a {scene.background} background"
        assert scene.caption == world.caption(scene) == expected
        assert is_held_out(scene) == is_held_out(expected)
    for text in all_captions():
        colour, shape, direction, background = parse_caption(text)
        assert text == f"a {colour} {shape} moving {direction} on a {background} background"
    assert parse_caption("  A Red  circle moving UP on a black background ") == ("red", "circle", "up", "black")
    with pytest.raises(ValueError, match="not a caption of the demo world"):
        parse_caption("a cat playing the piano")
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        parse_caption("a orange circle moving up on a black background")


def test_sample_scene_respects_the_split():
    assert all(not is_held_out(sample_scene(seed)) for seed in range(300))
    assert all(is_held_out(sample_scene(seed, split="held_out")) for seed in range(100))
    with pytest.raises(ValueError, match="unknown split"):
        sample_scene(0, split="test")
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("hexagon", "red", "up", "black", size=8.0, start=(40.0, 30.0), speed=1.0)


def test_render_is_deterministic():
    a = render(sample_scene(np.random.default_rng(7)))
    b = render(sample_scene(np.random.default_rng(7)))
    c = render(sample_scene(np.random.default_rng(8)))
    assert a.dtype == np.uint8 and a.shape == (FRAMES, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert scene_for_caption(all_captions()[5], 3) == scene_for_caption(all_captions()[5], 3)


@pytest.mark.parametrize("index", range(0, 216, 7))
def test_render_shows_the_captioned_scene(index):
    text = all_captions()[index]
    scene = scene_for_caption(text, index)
    assert scene.caption == text
    video = render(scene)
    background = np.array(BACKGROUND_RGB[scene.background], dtype=np.uint8)
    # The object stays wholly inside the frame: every border pixel is background in every frame.
    for border in (video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]):
        assert (border == background).all()
    mask = object_pixels(video, scene)
    assert (mask.sum(axis=(1, 2)) >= 20).all(), "the object is visible in every frame"
    assert ((video == background).all(axis=-1) | mask).mean() > 0.95, "other pixels are only the outline"
    ys, xs = np.indices(mask.shape[1:])
    centroid = np.array([[xs[m].mean(), ys[m].mean()] for m in mask])  # [F, 2]
    travel = centroid[-1] - centroid[0]
    vx, vy = world.DIRECTION_VECTORS[scene.direction]
    along, across = (travel[0] * vx, travel[1]) if vx else (travel[1] * vy, travel[0])
    assert along > 0.2 * min(HEIGHT, WIDTH) and abs(across) < 1.0


def test_render_follows_the_scene_size():
    scene = scene_for_caption(all_captions()[0], 0, frames=9, height=32, width=48)
    assert render(scene).shape == (9, 32, 48, 3)
    still = dataclasses.replace(scene, speed=0.0)
    assert (render(still) == render(still)[:1]).all(), "a still object draws the same frame throughout"


def test_dataset_never_yields_a_held_out_caption():
    data = WorldDataset(length=5000, seed=3)
    captions = [data.scene(i).caption for i in range(len(data))]
    assert not any(is_held_out(text) for text in captions)
    assert set(captions) == set(training_captions()), "every training caption is drawn"
    for i in range(0, len(data), 250):
        video, text = data[i]
        assert text == captions[i] and not is_held_out(text)


def test_dataset_items_are_deterministic_model_inputs():
    data = WorldDataset(length=100, seed=11)
    video, text = data[42]
    assert video.shape == (3, FRAMES, HEIGHT, WIDTH) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    # Channels-first in [-1, 1]: the rendered frames, scaled.
    frames = render(data.scene(42))
    assert torch.equal(video, torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1)
    again, again_text = WorldDataset(length=100, seed=11)[42]
    assert torch.equal(video, again) and text == again_text
    other = WorldDataset(length=100, seed=12)
    assert not torch.equal(video, other[42][0])
    assert [data.scene(i) for i in range(20)] != [other.scene(i) for i in range(20)]
    with pytest.raises(IndexError):
        data[100]
    with pytest.raises(ValueError, match="4k \\+ 1"):
        WorldDataset(length=10, frames=16)
