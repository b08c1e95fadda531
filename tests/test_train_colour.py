"""The validation videos' colour figures, and when they count as burnt against the base model's."""

import numpy as np

from cogvideox.train.colour import SATURATION_RISE, base_colours, burn_warning, measure


def video(*rgb, frames=4, size=16):
    return np.broadcast_to(np.array(rgb, np.uint8), (frames, size, size, 3)).copy()


def test_measure_reads_saturation_and_the_fully_saturated_share():
    assert measure([video(128, 128, 128)]) == {"validation_saturation": 0.0, "validation_vivid": 0.0}  # grey
    assert measure([video(255, 0, 0)]) == {"validation_saturation": 1.0, "validation_vivid": 1.0}  # pure red
    half = measure([video(200, 100, 100)])  # (max - min) / max = 0.5
    assert half == {"validation_saturation": 0.5, "validation_vivid": 0.0}
    # Videos count by their pixels; dark pixels (hue is noise there) are left out.
    assert measure([video(255, 0, 0), video(128, 128, 128)]) == {"validation_saturation": 0.5, "validation_vivid": 0.5}
    assert measure([video(255, 0, 0), video(20, 0, 0)]) == {"validation_saturation": 1.0, "validation_vivid": 1.0}
    assert measure([video(0, 0, 0)]) == {"validation_saturation": 0.0, "validation_vivid": 0.0}
    rng = np.random.default_rng(0)
    noisy = measure([rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)])
    assert 0.5 < noisy["validation_saturation"] < 0.8 and 0.05 < noisy["validation_vivid"] < 0.4


def test_a_burn_needs_both_figures_to_rise_against_the_base():
    base = {"validation_saturation": 0.3, "validation_vivid": 0.05}
    assert burn_warning(None, {"validation_saturation": 0.9, "validation_vivid": 0.9}, 10, 1e-3) is None  # no base
    assert burn_warning(base, {"validation_saturation": 0.3 + SATURATION_RISE - 0.01, "validation_vivid": 0.5}, 10, 1e-3) is None
    assert burn_warning(base, {"validation_saturation": 0.8, "validation_vivid": 0.1}, 10, 1e-3) is None
    warning = burn_warning(base, {"validation_saturation": 0.6, "validation_vivid": 0.3}, 10, 1e-3)
    assert warning.startswith("the validation videos at step 10 are far more saturated") and "(0.001)" in warning
    records = [{"step": 1, "loss": 0.2}, {"step": 0, "validation_saturation": 0.3, "validation_vivid": 0.05}]
    assert base_colours(records) == base and base_colours(records[:1]) is None
