"""A synthetic world of short captioned videos, the training data of the embedded demo model.

One object of a given shape and colour moves in a straight line on a plain background, and its caption
names those four attributes in a fixed template. Some (colour, direction) pairs are held out of training,
so the demo model can be checked on captions whose words it knows but whose combination it never saw.

A `Scene` fully describes its video and `render` is a pure numpy function of it, so a video is
reproduced exactly from the seed that drew its scene.

Beyond the base world there are extra concepts that no base caption, split or dataset contains: the
colour orange (`EXTRA_COLOURS`) and the diagonal motion "diagonally" (`EXTRA_DIRECTIONS`: up and to the
right at 45 degrees). They exist to teach a trained model something new (`cogvideox.demo.teach`), are
accepted only where a function is asked to (`include_extra=True`), and each has its own captions
(`concept_captions`): the concept in the base world, never together with the other extra concept.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch

# The demo model's video size: its VAE compresses 8x in space and 4x in time, keeping the first frame,
# so 17 x 64 x 96 frames become 5 x 8 x 12 latents. Frame counts must have the form 4k + 1.
FRAMES, HEIGHT, WIDTH = 17, 64, 96

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS = ("black", "white", "gray")

# Saturated, well separated hues: the judge tells colours apart by hue alone, which survives the blur of
# a generated video (an object pixel mixed with a grey background keeps its hue).
COLOUR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 230),
    "yellow": (235, 215, 25),
    "purple": (160, 40, 200),
    "cyan": (25, 205, 215),
}
BACKGROUND_RGB = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}

# Colours outside the base world. Orange's hue (28 degrees in the judge's chroma plane) sits halfway
# between red (0) and yellow (55), as far from both as the palette allows.
EXTRA_COLOURS = ("orange",)
EXTRA_COLOUR_RGB = {"orange": (245, 125, 20)}

# Unit motion per direction, in image coordinates (x to the right, y downwards).
DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Directions outside the base world. "diagonally" rises to the right at 45 degrees; its vector is a unit
# vector, so a scene's speed stays pixels per frame along the direction. (The word is "diagonally", not
# "up-right": the demo model's tokenizer reads "up-right" as the known word "up" followed by an unknown
# piece, whereas "diagonally" is one unknown token in the place of a direction word.)
EXTRA_DIRECTIONS = ("diagonally",)
EXTRA_DIRECTION_VECTORS = {"diagonally": (1 / math.sqrt(2), -1 / math.sqrt(2))}

CAPTION_TEMPLATE = "a {colour} {shape} moving {direction} on a {background} background"

# The generalisation split: every caption with one of these (colour, direction) pairs is held out of all
# training. Each colour and each direction still appears in training with other partners.
HELD_OUT_PAIRS = frozenset({
    ("red", "up"),
    ("green", "left"),
    ("blue", "down"),
    ("yellow", "right"),
    ("purple", "up"),
    ("cyan", "left"),
})

SPLITS = ("train", "held_out", "all")

# Object size is drawn as a fraction of the frame height; the shapes reach at most this many sizes
# from their centre (square corner, triangle vertex), which bounds where the centre may go.
_SIZE_RANGE = (0.095, 0.14)
_REACH = 1.25
# Fraction of the free span along the motion axis that the object travels over the clip: enough to be
# unmistakable, while the object stays wholly inside the frame.
_TRAVEL_RANGE = (0.5, 0.9)

# Direction words may hold a hyphen, so that "up-right" is read as a direction and refused by name.
_CAPTION_PATTERN = re.compile(
    r"a (?P<colour>\w+) (?P<shape>\w+) moving (?P<direction>[\w-]+) on a (?P<background>\w+) background"
)


@dataclass(frozen=True)
class Scene:
    """Everything that determines one video. Lengths are in pixels, positions are object centres in
    continuous image coordinates (pixel (i, j) covers [j, j+1] x [i, i+1])."""

    shape: str
    colour: str
    direction: str
    background: str
    size: float  # circle radius; the square has the same area, the triangle a circumradius of 1.25 size
    start: tuple[float, float]  # (x, y) of the centre in the first frame
    speed: float  # pixels per frame along `direction`
    frames: int = FRAMES
    height: int = HEIGHT
    width: int = WIDTH
    include_extra: bool = False  # whether the colour or direction may be extra (EXTRA_COLOURS, EXTRA_DIRECTIONS)

    def __post_init__(self) -> None:
        for name, vocabulary in (
            ("shape", SHAPES),
            ("colour", colours(self.include_extra)),
            ("direction", directions(self.include_extra)),
            ("background", BACKGROUNDS),
        ):
            if getattr(self, name) not in vocabulary:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(vocabulary)}")
        if self.frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError(f"video size must be positive, got {self.frames}x{self.height}x{self.width}")

    @property
    def caption(self) -> str:
        return caption(self)

    def centres(self) -> np.ndarray:
        """Object centre in every frame, [F, 2] as (x, y)."""
        t = np.arange(self.frames, dtype=np.float64)
        vx, vy = direction_vector(self.direction)
        return np.stack([self.start[0] + vx * self.speed * t, self.start[1] + vy * self.speed * t], axis=1)


def colours(include_extra: bool = False) -> tuple[str, ...]:
    """The colour words: the base world's, followed by `EXTRA_COLOURS` when `include_extra`."""
    return COLOURS + EXTRA_COLOURS if include_extra else COLOURS


def colour_rgb(colour: str) -> tuple[int, int, int]:
    """The RGB of a base or extra colour."""
    return COLOUR_RGB[colour] if colour in COLOUR_RGB else EXTRA_COLOUR_RGB[colour]


def directions(include_extra: bool = False) -> tuple[str, ...]:
    """The direction words: the base world's, followed by `EXTRA_DIRECTIONS` when `include_extra`."""
    return DIRECTIONS + EXTRA_DIRECTIONS if include_extra else DIRECTIONS


def direction_vector(direction: str) -> tuple[float, float]:
    """The unit motion (x, y) of a base or extra direction, in image coordinates (y downwards)."""
    return DIRECTION_VECTORS[direction] if direction in DIRECTION_VECTORS else EXTRA_DIRECTION_VECTORS[direction]


def caption(scene: Scene) -> str:
    """The English caption of a scene, from `CAPTION_TEMPLATE`."""
    return CAPTION_TEMPLATE.format(
        colour=scene.colour, shape=scene.shape, direction=scene.direction, background=scene.background
    )


def parse_caption(text: str, include_extra: bool = False) -> tuple[str, str, str, str]:
    """Inverse of `caption`: `(colour, shape, direction, background)` of a caption of this world (or,
    with `include_extra`, of the world extended by `EXTRA_COLOURS` and `EXTRA_DIRECTIONS`)."""
    normalised = " ".join(text.lower().split())
    match = _CAPTION_PATTERN.fullmatch(normalised)
    if match is None:
        raise ValueError(f"{text!r} is not a caption of the demo world; captions read {CAPTION_TEMPLATE!r}")
    colour, shape, direction, background = match.group("colour", "shape", "direction", "background")
    for name, word, vocabulary in (
        ("colour", colour, colours(include_extra)),
        ("shape", shape, SHAPES),
        ("direction", direction, directions(include_extra)),
        ("background", background, BACKGROUNDS),
    ):
        if word not in vocabulary:
            raise ValueError(f"{text!r}: unknown {name} {word!r}; the demo world knows {', '.join(vocabulary)}")
    return colour, shape, direction, background


def is_held_out(caption_or_scene: str | Scene) -> bool:
    """Whether a caption (or a scene's caption) belongs to the held-out split."""
    if isinstance(caption_or_scene, Scene):
        colour, direction = caption_or_scene.colour, caption_or_scene.direction
    else:
        colour, _, direction, _ = parse_caption(caption_or_scene)
    return (colour, direction) in HELD_OUT_PAIRS


@functools.cache
def all_captions() -> tuple[str, ...]:
    """Every caption of the world (3 shapes x 6 colours x 4 directions x 3 backgrounds), in a fixed order."""
    return tuple(
        CAPTION_TEMPLATE.format(colour=c, shape=s, direction=d, background=b)
        for s, c, d, b in itertools.product(SHAPES, COLOURS, DIRECTIONS, BACKGROUNDS)
    )


@functools.cache
def training_captions() -> tuple[str, ...]:
    """The captions the demo model may be trained on."""
    return tuple(c for c in all_captions() if not is_held_out(c))


@functools.cache
def held_out_captions() -> tuple[str, ...]:
    """The captions kept out of all training, for the generalisation check."""
    return tuple(c for c in all_captions() if is_held_out(c))


@functools.cache
def concept_captions(word: str) -> tuple[str, ...]:
    """The captions of one extra concept, in a fixed order, none of them in `all_captions()`: an extra
    colour with every shape, direction and background (3 x 4 x 3 = 36), or an extra direction with every
    shape, colour and background (3 x 6 x 3 = 54)."""
    if word in EXTRA_COLOURS:
        colours_, directions_ = (word,), DIRECTIONS
    elif word in EXTRA_DIRECTIONS:
        colours_, directions_ = COLOURS, (word,)
    else:
        raise ValueError(f"{word!r} is no extra concept; choose one of {', '.join(EXTRA_COLOURS + EXTRA_DIRECTIONS)}")
    return tuple(
        CAPTION_TEMPLATE.format(colour=c, shape=s, direction=d, background=b)
        for s, c, d, b in itertools.product(SHAPES, colours_, directions_, BACKGROUNDS)
    )


def captions_of(split: str) -> tuple[str, ...]:
    """The captions of a split: "train", "held_out" or "all"."""
    if split == "train":
        return training_captions()
    if split == "held_out":
        return held_out_captions()
    if split == "all":
        return all_captions()
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def scene_for_caption(
    text: str,
    rng: np.random.Generator | int,
    frames: int = FRAMES,
    height: int = HEIGHT,
    width: int = WIDTH,
    include_extra: bool = False,
) -> Scene:
    """A scene matching `text`, with size, start position and speed drawn from `rng`.

    The object stays wholly inside the frame for the whole clip and crosses 50-90% of the free span
    along its direction of motion; a diagonal moves 50-90% of the tighter axis's free span along each
    axis (the longest diagonal path that fits). The start is uniform over the positions from which the
    whole path stays inside. `include_extra` admits captions with an extra colour or direction.
    """
    rng = np.random.default_rng(rng)
    colour, shape, direction, background = parse_caption(text, include_extra)
    if frames < 2:
        raise ValueError(f"a moving object needs at least 2 frames, got {frames}")
    size = height * rng.uniform(*_SIZE_RANGE)
    margin = _REACH * size + 1.0
    if 2 * margin >= min(height, width):
        raise ValueError(f"a {height}x{width} frame is too small for the demo world's objects")
    travel_fraction = rng.uniform(*_TRAVEL_RANGE)
    start_fraction = rng.uniform()
    across_fraction = rng.uniform()

    vx, vy = direction_vector(direction)
    if vx and vy:
        # A diagonal spends the same draws its own way, so the axis-aligned arithmetic below, which every
        # cached latent of the world comes from, stays as it was.
        fractions = (start_fraction, across_fraction)
        start, length = _diagonal_path((vx, vy), margin, travel_fraction, fractions, height, width)
        return Scene(shape=shape, colour=colour, direction=direction, background=background, size=float(size),
                     start=start, speed=float(length / (frames - 1)), frames=frames, height=height, width=width,
                     include_extra=include_extra)
    along_length, across_length = (width, height) if vx else (height, width)
    free = along_length - 2 * margin
    travel = travel_fraction * free
    # The start is uniform over the positions from which the whole path stays inside the frame.
    along = margin + start_fraction * (free - travel)
    if vx + vy < 0:
        along = along_length - along
    across = margin + across_fraction * (across_length - 2 * margin)
    start = (along, across) if vx else (across, along)
    return Scene(
        shape=shape,
        colour=colour,
        direction=direction,
        background=background,
        size=float(size),
        start=(float(start[0]), float(start[1])),
        speed=float(travel / (frames - 1)),
        frames=frames,
        height=height,
        width=width,
        include_extra=include_extra,
    )


def _diagonal_path(
    vector: tuple[float, float], margin: float, travel_fraction: float, start_fractions: tuple[float, float],
    height: int, width: int,
) -> tuple[tuple[float, float], float]:
    """Start (x, y) and path length of a motion along `vector` (both components nonzero) whose object
    keeps `margin` from every edge: the path is `travel_fraction` of the longest one that fits, and the
    start on each axis is uniform (by its `start_fractions`) over the positions that keep the path inside."""
    free = (width - 2 * margin, height - 2 * margin)
    length = travel_fraction * min(span / abs(v) for span, v in zip(free, vector))
    start = []
    for span, v, fraction, extent in zip(free, vector, start_fractions, (width, height)):
        position = margin + fraction * (span - length * abs(v))  # the path's low end on this axis
        start.append(float(position if v > 0 else extent - position))
    return (start[0], start[1]), float(length)


def sample_scene(
    rng: np.random.Generator | int,
    split: str = "train",
    frames: int = FRAMES,
    height: int = HEIGHT,
    width: int = WIDTH,
) -> Scene:
    """Draw a scene: a caption uniformly from `split` ("train" by default), then its geometry."""
    rng = np.random.default_rng(rng)
    pool = captions_of(split)
    return scene_for_caption(pool[rng.integers(len(pool))], rng, frames, height, width)


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Signed distance (in pixels, negative inside) from offsets to the object centre to its outline."""
    if shape == "circle":
        return np.hypot(dx, dy) - size
    if shape == "square":
        # Half side sqrt(pi)/2 * size gives the circle's area.
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.5 * math.sqrt(math.pi) * size
    # Equilateral triangle pointing up, centred on its centroid, circumradius _REACH * size: the distance
    # to its three edge lines (outward normals down, up-right, up-left) less the inradius.
    circumradius = _REACH * size
    s = math.sqrt(3) / 2
    edges = np.maximum(dy, np.maximum(s * dx - 0.5 * dy, -s * dx - 0.5 * dy))
    return edges - 0.5 * circumradius


def render(scene: Scene, rgb: tuple[float, float, float] | None = None) -> np.ndarray:
    """The scene's video, uint8 [F, H, W, 3], anti-aliased by the pixel coverage of the outline.

    rgb: paint the object this colour instead of its colour word's (VAE training uses it so that the
    VAE codes colour as a continuous quantity, not as the world's six hues)."""
    ys = np.arange(scene.height, dtype=np.float32) + 0.5
    xs = np.arange(scene.width, dtype=np.float32) + 0.5
    centres = scene.centres().astype(np.float32)
    dx = xs[None, None, :] - centres[:, 0, None, None]  # [F, 1, W]
    dy = ys[None, :, None] - centres[:, 1, None, None]  # [F, H, 1]
    distance = _signed_distance(scene.shape, dx, dy, scene.size)  # [F, H, W]
    coverage = np.clip(0.5 - distance, 0.0, 1.0)[..., None]
    background = np.asarray(BACKGROUND_RGB[scene.background], dtype=np.float32)
    colour = np.asarray(colour_rgb(scene.colour) if rgb is None else rgb, dtype=np.float32)
    video = background + coverage * (colour - background)  # [F, H, W, 3]
    return np.rint(video).astype(np.uint8)


def to_model_range(video: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] frames -> float32 [3, F, H, W] in [-1, 1], the layout the VAE encodes."""
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2).float()
    return x / 127.5 - 1.0


class WorldDataset(torch.utils.data.Dataset):
    """Training videos of the world: item `i` is `(video [3, F, H, W] in [-1, 1], caption)`.

    Items are drawn from the training captions only, so no held-out caption ever reaches the model.
    Item `i` depends only on `(seed, i)`, whatever the order or the worker that asks for it.
    """

    def __init__(
        self, length: int, seed: int = 0, frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH
    ) -> None:
        if length < 1:
            raise ValueError(f"dataset length must be positive, got {length}")
        if frames % 4 != 1:
            raise ValueError(f"the VAE needs 4k + 1 frames, got {frames}")
        self.length, self.seed = length, seed
        self.frames, self.height, self.width = frames, height, width

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene of item `index`, without rendering it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length}")
        rng = np.random.default_rng([self.seed, index])
        # The split is applied here: training data is drawn from the training captions alone.
        return sample_scene(rng, "train", self.frames, self.height, self.width)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene = self.scene(index)
        return to_model_range(render(scene)), scene.caption
