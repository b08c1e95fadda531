"""Reads a video of the demo world from its pixels and tells the moving object's colour and direction.

It scores what the demo model generates, so it must survive the blur, noise and colour drift of a
generated video, and it never looks inside the model. The steps:

1. smooth each frame a little (3x3 box) to quiet pixel noise;
2. take each frame's median colour as its background (the object covers a few percent of the frame);
3. call a pixel foreground when it differs from the background by more than half the object's contrast,
   which keeps an object's area under blur;
4. colour: the hue of the object's core pixels, nearest among the world's six hues (or a palette
   given to `judge`, such as one with the extra colour orange). Hue is measured in
   the chroma plane (RGB less its grey component), where a pixel mixed with a grey, black or white
   background keeps its angle, so blurred edges do not pull it towards another colour;
5. direction: the object's position per frame (median of its pixel coordinates), a least-squares line
   through them, and the direction nearest by angle to the fitted displacement among the world's four
   (or a palette given to `judge`, such as one with the extra direction "diagonally"). Among the four
   this is the dominant axis of the displacement and its sign;
6. shape, as a bonus: the 3- and 4-fold symmetry of the object's silhouette.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from cogvideox.demo.world import COLOURS, DIRECTIONS, colour_rgb, direction_vector, parse_caption

__all__ = ["UNKNOWN", "Verdict", "judge", "parse_caption"]

UNKNOWN = "unknown"

# Object-to-background contrast (RGB distance, 0-255 scale) below which a video holds no object.
# The world's weakest pair, purple on gray, stands about 118 apart.
_MIN_CONTRAST = 40.0
# A frame shows the object when its foreground covers between these fractions of the frame.
_MIN_AREA, _MAX_AREA = 0.0015, 0.25
# Fitted displacement over the clip, as a fraction of the frame height, below which nothing moves. It is
# measured on the displacement's larger component (x or y), as it was before the judge knew diagonals,
# so that verdicts on the base world stay what they were.
_MIN_TRAVEL = 0.08
# Mean chroma of the object's core below which it has no colour to speak of.
_MIN_CHROMA = 25.0
# Silhouette harmonics that tell the shapes apart (see `_shape`).
_TRIANGLE_HARMONIC, _SQUARE_HARMONIC = 0.25, -0.22


@dataclass(frozen=True)
class Verdict:
    """What the judge sees. `colour` and `direction` are vocabulary words or "unknown"; `shape` is a shape
    word, or None when there is no object to see. `confidence` in [0, 1] is how sure the judge is of
    colour and direction together: the share of frames showing the object, times how clearly the hue
    sits on one colour, times how clearly the motion follows one direction; 0 when either is unknown."""

    colour: str
    direction: str
    shape: str | None
    confidence: float

    def matches(self, caption: str) -> bool:
        """Whether colour and direction agree with a caption of the world (the demo's success test);
        captions with an extra colour or direction (orange, diagonally) are read too."""
        colour, _, direction, _ = parse_caption(caption, include_extra=True)
        return self.colour == colour and self.direction == direction


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] RGB -> [..., 2] chroma-plane coordinates: the colour with its grey component removed."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([r - 0.5 * (g + b), (math.sqrt(3) / 2) * (g - b)], axis=-1)


@functools.cache
def _hues(palette: tuple[str, ...]) -> np.ndarray:
    """The chroma-plane angle of each colour of `palette`, in its order."""
    return np.array([math.atan2(*_chroma(np.asarray(colour_rgb(c), dtype=np.float64))[::-1]) for c in palette])


@functools.cache
def _headings(palette: tuple[str, ...]) -> np.ndarray:
    """The image-plane angle (atan2 of y down, x right) of each direction of `palette`, in its order."""
    return np.array([math.atan2(direction_vector(d)[1], direction_vector(d)[0]) for d in palette])


def _nearest(angle: float, angles: np.ndarray) -> tuple[int, float]:
    """Index of the angle of `angles` nearest to `angle` around the circle, and how clearly:
    (second gap - first gap) / (second gap + first gap), 1 on one of them, 0 halfway between two."""
    gaps = np.abs((angles - angle + math.pi) % (2 * math.pi) - math.pi)
    best, second = np.sort(gaps)[:2]
    return int(np.argmin(gaps)), float((second - best) / (second + best))


def _box_blur3(x: np.ndarray) -> np.ndarray:
    """3x3 mean over the two spatial axes of [F, H, W, C], edges replicated."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    return (rows[:, :, :-2] + rows[:, :, 1:-1] + rows[:, :, 2:]) / 9.0


def _palette(kind: str, words, lookup) -> tuple[str, ...]:
    """`words` as a tuple, checked: at least two distinct words, each known to `lookup`."""
    palette = tuple(words)
    if len(palette) < 2 or len(set(palette)) != len(palette):
        raise ValueError(f"judge needs at least two distinct {kind}s to choose from, got {list(palette)}")
    for name in palette:
        try:
            lookup(name)
        except KeyError:
            raise ValueError(f"judge does not know the {kind} {name!r}") from None
    return palette


def _validated(frames) -> np.ndarray:
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"judge expects frames shaped [F, H, W, 3], got {list(x.shape)}")
    if x.dtype != np.uint8:
        raise ValueError(
            f"judge expects uint8 frames (0-255), got {x.dtype}; convert [0, 1] floats with "
            "(x * 255).round().astype(np.uint8)"
        )
    if x.shape[0] < 2:
        raise ValueError(f"judge needs at least 2 frames to see motion, got {x.shape[0]}")
    return x.astype(np.float32)


def _colour(core_rgb: np.ndarray, palette: tuple[str, ...] = COLOURS) -> tuple[str, float]:
    """Nearest hue of `palette` to the mean chroma of the core pixels, and how clearly."""
    chroma = _chroma(core_rgb).mean(axis=0)
    magnitude = float(np.hypot(*chroma))
    if magnitude < _MIN_CHROMA:
        return UNKNOWN, 0.0
    index, clarity = _nearest(math.atan2(chroma[1], chroma[0]), _hues(palette))
    return palette[index], clarity


def _median_positions(masks: np.ndarray) -> np.ndarray:
    """Median (y, x) of each [H, W] mask's pixels, [N, 2]: each pixel's mass spread over its cell, so the
    median is sub-pixel and moves with the object. Every mask must hold at least one pixel."""
    rows = np.arange(masks.shape[0])
    positions = []
    for other_axis in (2, 1):  # summing out x leaves the y profile, summing out y the x profile
        profile = masks.sum(axis=other_axis).astype(np.float64)  # [N, L]
        cumulative = np.cumsum(profile, axis=1)
        half = cumulative[:, -1] / 2
        cell = (cumulative < half[:, None]).sum(axis=1)  # the cell where the cumulative mass reaches half
        before = np.where(cell > 0, cumulative[rows, cell - 1], 0.0)
        positions.append(cell + (half - before) / profile[rows, cell] - 0.5)
    return np.stack(positions, axis=1)


def _direction(
    times: np.ndarray, positions: np.ndarray, num_frames: int, height: int, palette: tuple[str, ...] = DIRECTIONS
) -> tuple[str, float]:
    """The direction of `palette` nearest by angle to the least-squares displacement of [N, 2] (y, x)
    positions, and how clearly (1 along a palette direction, 0 halfway between two)."""
    t = times - times.mean()
    slopes = (t[:, None] * (positions - positions.mean(axis=0))).sum(axis=0) / (t**2).sum()
    travel = slopes * (num_frames - 1)  # fitted (dy, dx) over the whole clip
    if np.abs(travel).max() < _MIN_TRAVEL * height:
        return UNKNOWN, 0.0
    index, clarity = _nearest(math.atan2(travel[0], travel[1]), _headings(palette))
    return palette[index], clarity


def _shape(distance: np.ndarray, times: np.ndarray, positions: np.ndarray, threshold: float) -> str | None:
    """Shape from the angular harmonics of the object's silhouette, found on the mean of the frames'
    distance maps re-centred on the object, where pixel noise averages out.

    With r, theta the polar coordinates of silhouette pixels about their centroid, the 3-fold harmonic
    E[r^3 sin 3theta] is large only for the triangle and the 4-fold one E[r^4 cos 4theta] strongly
    negative only for the upright square; a circle has neither. Both are normalised by E[r^2], so they do
    not depend on size, and blur weakens them without changing their sign.
    """
    num_frames, height, width = distance.shape
    half = max(2, round(0.25 * min(height, width)))
    padded = np.pad(distance, ((0, 0), (half, half), (half, half)))
    origins = np.rint(positions).astype(int)  # crop origins in padded coordinates = centres in frames
    template = np.mean(
        [padded[t, y : y + 2 * half + 1, x : x + 2 * half + 1] for t, (y, x) in zip(times.astype(int), origins)],
        axis=0,
    )  # [2 half + 1, 2 half + 1]
    ys, xs = np.nonzero(template > threshold)
    if ys.size < 5:
        return None
    y, x = ys - ys.mean(), xs - xs.mean()
    spread = np.mean(x * x + y * y)
    threefold = np.mean(3 * x * x * y - y**3) / spread**1.5  # E[r^3 sin 3theta], y pointing down
    fourfold = np.mean(x**4 - 6 * x * x * y * y + y**4) / spread**2  # E[r^4 cos 4theta]
    # Ideal values: triangle |threefold| ~0.7, square fourfold -0.6; thresholds near the middle.
    if abs(threefold) > _TRIANGLE_HARMONIC:
        return "triangle"
    return "square" if fourfold < _SQUARE_HARMONIC else "circle"


def judge(
    frames, colours: tuple[str, ...] | list[str] = COLOURS, directions: tuple[str, ...] | list[str] = DIRECTIONS
) -> Verdict:
    """Colour, direction (and shape) of the moving object in uint8 frames [F, H, W, 3].

    `colours` is the palette the colour is chosen from: the world's six by default, or e.g.
    `world.colours(include_extra=True)` to recognise orange as well (orange sits between red and
    yellow, so adding it halves the hue margin of those two).

    `directions` is the palette the direction is chosen from, by the angle of the object's fitted
    displacement: the world's four by default, or e.g. `world.directions(include_extra=True)` to
    recognise "diagonally" (up and to the right) as well. The direction's share of the confidence is 1
    for a motion exactly along a palette direction and 0 halfway between two, falling linearly with the
    angle when the two nearest directions lie on either side of the motion.

    Returns "unknown" colour and direction with confidence 0 when no object stands out of the
    background, and "unknown" direction when the object does not clearly move.
    """
    palette = _palette("colour", colours, colour_rgb)
    compass = _palette("direction", directions, direction_vector)
    x = _box_blur3(_validated(frames))  # [F, H, W, 3]
    num_frames, height, width, _ = x.shape
    # Every other pixel is plenty for a median and halves the cost.
    background = np.median(x[:, ::2, ::2].reshape(num_frames, -1, 3), axis=1)  # [F, 3]
    distance = np.linalg.norm(x - background[:, None, None, :], axis=-1)  # [F, H, W]

    # The object's contrast: the median over frames of each frame's 99.5th-percentile distance, which
    # falls inside any object of the world (1% of the frame or more), so neither a few noisy pixels nor
    # a frame without the object sets it.
    contrast = float(np.median(np.quantile(distance.reshape(num_frames, -1), 0.995, axis=1)))
    nothing = Verdict(UNKNOWN, UNKNOWN, None, 0.0)
    if contrast < _MIN_CONTRAST:
        return nothing
    masks = distance > 0.5 * contrast  # [F, H, W]
    areas = masks.sum(axis=(1, 2)) / (height * width)
    present = (areas >= _MIN_AREA) & (areas <= _MAX_AREA)
    if present.sum() < max(2, num_frames // 3):
        return nothing

    core = distance > 0.75 * contrast
    colour, colour_confidence = _colour(x[core & present[:, None, None]], palette)

    times = np.flatnonzero(present).astype(np.float64)
    positions = _median_positions(masks[present])  # [N, 2] (y, x)
    direction, direction_confidence = _direction(times, positions, num_frames, height, compass)

    confidence = float(present.mean()) * colour_confidence * direction_confidence
    return Verdict(colour, direction, _shape(distance, times, positions, 0.5 * contrast), confidence)
