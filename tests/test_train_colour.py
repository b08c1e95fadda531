"""The validation videos' colour figures, and when they count as burnt against the base model's."""

import numpy as np

from cogvideox.train.colour import FIGURES, base_colours, burn_warning, measure, measure_video


def video(*rgb, frames=4, size=16):
    return np.broadcast_to(np.array(rgb, np.uint8), (frames, size, size, 3)).copy()


def test_each_video_is_measured_for_saturation_vividness_blown_pixels_and_detail():
    assert measure_video(video(128, 128, 128)) == (0.0, 0.0, 0.0, 0.0)  # grey
    assert measure_video(video(255, 0, 0)) == (1.0, 1.0, 1.0, 0.0)  # pure red, at full brightness
    assert measure_video(video(200, 100, 100)) == (0.5, 0.0, 0.0, 0.0)  # (max - min) / max = 0.5
    assert measure_video(video(255, 255, 255)) == (0.0, 0.0, 1.0, 0.0)  # white: blown out, no colour
    assert measure_video(video(20, 0, 0)) == (0.0, 0.0, 0.0, 0.0)  # too dark for its hue to count
    half = np.concatenate([video(255, 0, 0, frames=2), video(128, 128, 128, frames=2)], axis=2)
    saturation, vivid, blown, detail = measure_video(half)
    assert (saturation, vivid, blown) == (0.5, 0.5, 0.5)
    # One edge down the middle: a 32-wide frame has 31 neighbour pairs a row, one of them across it.
    assert detail == np.float32(np.abs(np.array([255, 0, 0]) - 128).mean() / 255 / 31 / 2)
    checkerboard = np.indices((4, 16, 16)).sum(axis=0) % 2 * 255
    assert measure_video(np.repeat(checkerboard[..., None], 3, axis=-1).astype(np.uint8))[3] == 1.0
    assert measure([video(255, 0, 0), video(128, 128, 128)]) == {
        "validation_saturation": [1.0, 0.0], "validation_vivid": [1.0, 0.0], "validation_blown": [1.0, 0.0],
        "validation_detail": [0.0, 0.0],
    }  # fmt: skip


def figures(*rows):
    rows = [row if len(row) == 4 else (*row, 0.01) for row in rows]  # detail 0.01 unless given
    return {name: [row[k] for row in rows] for k, name in enumerate(FIGURES)}


def test_a_burn_is_a_video_far_from_the_base_models_of_its_prompt():
    base = figures((0.3, 0.05, 0.0), (0.1, 0.0, 0.7))
    prompts = ["a cat", "a white room"]
    assert burn_warning(None, base, 10, 1e-3, prompts) is None  # no base, no warning
    assert burn_warning(base, figures((0.44, 0.5, 0.1), (0.1, 0.0, 0.85)), 10, 1e-3, prompts) is None  # small rises
    assert burn_warning(base, figures((0.8, 0.1, 0.0), (0.1, 0.0, 0.7)), 10, 1e-3, prompts) is None  # one figure
    garish = burn_warning(base, figures((0.6, 0.3, 0.0), (0.1, 0.0, 0.7)), 10, 1e-3, prompts)
    assert garish.startswith('the colours of validation video 0 ("a cat": mean saturation 0.30 -> 0.60, fully '
                             "saturated pixels 5% -> 30%, blown-out pixels 0% -> 0%, neighbour difference 0.010 -> "
                             "0.010) at step 10") and "(0.001)" in garish
    blown = burn_warning(base, figures((0.3, 0.05, 0.57), (0.1, 0.0, 0.5)), 10, 1e-3, prompts)
    assert "video 0 (" in blown and "blown-out pixels 0% -> 57%" in blown and "white room" not in blown
    noise = burn_warning(base, figures((0.3, 0.05, 0.0, 0.03), (0.1, 0.0, 0.7, 0.02)), 10, 1e-3, prompts)
    assert "neighbour difference 0.010 -> 0.030" in noise and "white room" not in noise  # 3x, 0.02 up; 2x, no
    # Other prompts than the base's (a resumed run's changed config): nothing to compare with.
    assert burn_warning(base, figures((0.9, 0.9, 0.9)), 10, 1e-3, ["a cat"]) is None


def test_the_base_figures_come_from_the_step_0_round():
    base = figures((0.3, 0.05, 0.0))
    records = [{"step": 0, **base}, {"step": 1, "loss": 0.2}, {"step": 2, **figures((0.9, 0.9, 0.9))}]
    assert base_colours(records) == base and base_colours(records[1:]) is None
    # A round logs its settings: the base is the round made with this run's, or one logged without any.
    cat, dog = {"prompts": ["a cat"], "steps": 50}, {"prompts": ["a dog"], "steps": 50}
    assert base_colours(records, cat) == base
    records[0]["validation"] = cat
    assert base_colours(records, cat) == base and base_colours(records, dog) is None
