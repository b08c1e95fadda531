"""The extra direction "diagonally" (up and to the right at 45 degrees): outside the base world unless
asked for, drawn wholly inside the frame at 45 degrees, and read by the judge with an extended direction
palette (and only then), while every base scene and base verdict stays what it was."""

import hashlib
import math

import numpy as np
import pytest
from test_judge import like_generated

from cogvideox.demo import DEMO_MODEL_DIR, world
from cogvideox.demo import judge as judge_module
from cogvideox.demo.judge import UNKNOWN, Verdict, judge

DIAGONAL = "a red circle moving diagonally on a black background"
EXTENDED = world.directions(include_extra=True)
CAPTIONS = world.concept_captions("diagonally")


def test_diagonally_is_in_no_base_caption_split_or_dataset():
    assert world.EXTRA_DIRECTIONS == ("diagonally",) and world.directions() == world.DIRECTIONS
    assert EXTENDED == world.DIRECTIONS + ("diagonally",)
    assert "diagonally" not in {w for c in world.all_captions() for w in c.split()}
    dataset = world.WorldDataset(200, seed=3)
    assert all(dataset.scene(i).direction in world.DIRECTIONS for i in range(200))
    assert len(CAPTIONS) == len(set(CAPTIONS)) == 3 * 6 * 3
    assert not set(CAPTIONS) & set(world.all_captions())
    parsed = [world.parse_caption(c, include_extra=True) for c in CAPTIONS]
    assert {p[2] for p in parsed} == {"diagonally"}
    # Every shape, base colour and background occurs with the diagonal, and nothing else is extra.
    assert {p[0] for p in parsed} == set(world.COLOURS)
    assert {p[1] for p in parsed} == set(world.SHAPES)
    assert {p[3] for p in parsed} == set(world.BACKGROUNDS)


def test_diagonally_is_accepted_only_where_asked():
    with pytest.raises(ValueError, match="unknown direction 'diagonally'"):
        world.parse_caption(DIAGONAL)
    with pytest.raises(ValueError, match="unknown direction 'diagonally'"):
        world.scene_for_caption(DIAGONAL, 0)
    with pytest.raises(ValueError, match="unknown direction 'diagonally'"):
        world.Scene("circle", "red", "diagonally", "black", size=8.0, start=(40.0, 30.0), speed=1.0)
    assert world.parse_caption(DIAGONAL, include_extra=True) == ("red", "circle", "diagonally", "black")
    # The caption pattern reads hyphenated directions, so a near miss is refused by name.
    with pytest.raises(ValueError, match="unknown direction 'up-right'"):
        world.parse_caption("a red circle moving up-right on a black background", include_extra=True)
    scene = world.scene_for_caption(DIAGONAL, 0, include_extra=True)
    assert scene.direction == "diagonally" and scene.caption == DIAGONAL


def test_the_diagonal_is_a_unit_vector_rising_to_the_right():
    vx, vy = world.direction_vector("diagonally")
    assert vx > 0 > vy and vx == -vy and math.hypot(vx, vy) == pytest.approx(1.0, abs=1e-15)
    assert world.direction_vector("left") == world.DIRECTION_VECTORS["left"] == (-1, 0)


@pytest.mark.parametrize("shape", world.SHAPES)
def test_diagonal_scenes_stay_inside_the_frame_and_travel_at_45_degrees(shape):
    text = f"a blue {shape} moving diagonally on a white background"
    starts, lengths = [], []
    for seed in range(200):
        scene = world.scene_for_caption(text, [seed, 3], include_extra=True)
        centres = scene.centres()
        reach = 1.25 * scene.size  # the farthest any shape reaches from its centre
        assert (centres - reach >= 0).all() and (centres[:, 0] + reach <= world.WIDTH).all()
        assert (centres[:, 1] + reach <= world.HEIGHT).all()
        travel = centres[-1] - centres[0]
        assert travel[0] > 0 > travel[1] and travel[0] == pytest.approx(-travel[1], rel=1e-12)
        assert math.hypot(*travel) == pytest.approx(scene.speed * (world.FRAMES - 1), rel=1e-12)
        # 50-90% of the tighter (vertical) axis's free span, along each axis.
        free = world.HEIGHT - 2 * (reach + 1.0)
        assert 0.5 - 1e-9 <= travel[0] / free <= 0.9 + 1e-9
        lengths.append(travel[0] / free)
        # Where the start may lie on each axis, given the path: it is uniform over that range.
        x_range = world.WIDTH - 2 * (reach + 1.0) - travel[0]
        starts.append(((centres[0, 0] - reach - 1.0) / x_range, (world.HEIGHT - reach - 1.0 - centres[0, 1]) / free
                       / (1 - travel[0] / free)))
    starts = np.array(starts)
    assert (starts >= -1e-9).all() and (starts <= 1 + 1e-9).all()
    assert (starts.min(axis=0) < 0.05).all() and (starts.max(axis=0) > 0.95).all()  # the whole range is used
    assert min(lengths) < 0.55 and max(lengths) > 0.85


@pytest.mark.parametrize("index", range(0, 54, 5))
def test_diagonal_renders_stay_inside_and_move_up_right(index):
    text = CAPTIONS[index]
    scene = world.scene_for_caption(text, index, include_extra=True)
    video = world.render(scene)
    background = np.array(world.BACKGROUND_RGB[scene.background], dtype=np.uint8)
    for border in (video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]):
        assert (border == background).all()
    mask = (video == np.array(world.COLOUR_RGB[scene.colour], dtype=np.uint8)).all(axis=-1)
    assert (mask.sum(axis=(1, 2)) >= 20).all(), "the object is visible in every frame"
    ys, xs = np.indices(mask.shape[1:])
    centroid = np.array([[xs[m].mean(), ys[m].mean()] for m in mask])  # [F, 2] as (x, y)
    dx, dy = centroid[-1] - centroid[0]
    assert dx > 0.2 * world.HEIGHT and math.degrees(math.atan2(-dy, dx)) == pytest.approx(45.0, abs=2.0)


# (size, start, speed) of `scene_for_caption(all_captions()[i], [7, i])`, computed by the world before it
# knew diagonals: the cached latents of the demo model's training data come from these numbers.
BEFORE_DIAGONALS = {
    0: (7.8802749438214414, (77.0168177075799, 20.376453018065256), 3.988412737602994),
    1: (8.298005938890006, (78.32149897261769, 17.97145936433936), 2.4941990015412934),
    2: (6.880554412717514, (63.313138633034555, 40.19103046068015), 3.2546352596145653),
    3: (8.888096634712165, (14.544017251265908, 41.1995634515623), 3.8304680149289747),
    100: (7.4927250729033865, (10.871345993200721, 20.661624953938095), 4.194206041109287),
    215: (7.5365089379438075, (17.304807357233223, 15.256329166409412), 1.8770859247776484),
}
# SHA-256 digests, by the same earlier world, of: the repr of (size, start, speed) of every caption's
# scene as above; the repr of the first 300 scenes of WorldDataset(300, seed=5); the rendered frames of
# every ninth caption's scene as above.
SCENES_DIGEST = "ca767cbd89ef360c81f06f67729e0ade33da97eea7ee8f79109b0b84143f9102"
DATASET_DIGEST = "88dd335db899a47e6900502c6ad4ddcf3b31d6f5245d2909d945dd2d10b938e6"
RENDER_DIGEST = "f303f455f655d2513019d9965bd7dbf00a75bd8431a3f74d06bfc9ee24c324f7"


def test_base_scenes_are_bit_identical_to_those_before_diagonals():
    captions = world.all_captions()
    for i, (size, start, speed) in BEFORE_DIAGONALS.items():
        for include_extra in (False, True):
            scene = world.scene_for_caption(captions[i], [7, i], include_extra=include_extra)
            assert (scene.size, scene.start, scene.speed) == (size, start, speed)
    scenes = (world.scene_for_caption(c, [7, i]) for i, c in enumerate(captions))
    geometry = "".join(repr((s.size, s.start, s.speed)) for s in scenes)
    assert hashlib.sha256(geometry.encode()).hexdigest() == SCENES_DIGEST
    dataset = world.WorldDataset(300, seed=5)
    assert hashlib.sha256("".join(repr(dataset.scene(i)) for i in range(300)).encode()).hexdigest() == DATASET_DIGEST
    frames = hashlib.sha256()
    for i in range(0, 216, 9):
        frames.update(world.render(world.scene_for_caption(captions[i], [7, i])).tobytes())
    assert frames.hexdigest() == RENDER_DIGEST


def test_judge_reads_diagonally_on_every_concept_caption_clean_and_degraded():
    wrong, wrong_degraded = [], []
    rng = np.random.default_rng(0)
    for seed in range(2):
        for i, text in enumerate(CAPTIONS):
            video = world.render(world.scene_for_caption(text, [seed, i], include_extra=True))
            verdict = judge(video, directions=EXTENDED)
            if not verdict.matches(text) or verdict.confidence < 0.5:
                wrong.append((text, verdict))
            degraded = judge(like_generated(video, rng), directions=EXTENDED)
            if not degraded.matches(text):
                wrong_degraded.append((text, degraded))
    assert not wrong, f"{len(wrong)} of 108 misjudged, e.g. {wrong[:3]}"
    assert len(wrong_degraded) <= 1, f"{len(wrong_degraded)} of 108 degraded misjudged, e.g. {wrong_degraded[:3]}"


def test_base_judge_never_says_diagonally_and_is_unsure_of_a_diagonal():
    for i, text in enumerate(CAPTIONS[::3]):
        video = world.render(world.scene_for_caption(text, i, include_extra=True))
        verdict = judge(video)
        # Halfway between up and right: either, with a direction confidence near 0.
        assert verdict.direction in ("up", "right") and verdict.confidence < 0.1
        assert judge(video, directions=world.DIRECTIONS) == verdict


def dominant_axis(travel: np.ndarray, height: int) -> str:
    """The base judge's rule before diagonals, written out: the larger component of the fitted (dy, dx)
    displacement and its sign, "unknown" below 8% of the frame height."""
    dy, dx = travel
    if max(abs(dy), abs(dx)) < 0.08 * height:
        return UNKNOWN
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def test_nearest_direction_among_the_base_four_is_the_dominant_axis_rule():
    rng = np.random.default_rng(5)
    times = np.arange(17, dtype=np.float64)
    for _ in range(3000):
        # A straight path with a random displacement (sometimes too short to count) and noise.
        travel = rng.normal(0, 12, 2) * rng.choice([0.2, 1.0])
        positions = np.array([30.0, 40.0]) + times[:, None] / 16 * travel + rng.normal(0, 0.5, (17, 2))
        t = times - times.mean()
        fitted = (t[:, None] * (positions - positions.mean(0))).sum(0) / (t**2).sum() * 16
        direction, clarity = judge_module._direction(times, positions, 17, 64)
        assert direction == dominant_axis(fitted, 64)
        if direction != UNKNOWN:
            # 1 along an axis, 0 halfway between two, linear in the angle.
            off_axis = math.atan2(min(abs(fitted[0]), abs(fitted[1])), max(abs(fitted[0]), abs(fitted[1])))
            assert clarity == pytest.approx(1 - off_axis / (math.pi / 4), abs=1e-9)
        extended, _ = judge_module._direction(times, positions, 17, 64, EXTENDED)
        assert direction == UNKNOWN or extended in (direction, "diagonally")


def test_direction_confidence_is_one_on_a_palette_direction_and_zero_halfway():
    times = np.arange(17, dtype=np.float64)
    for degrees, palette, expected in (
        (45.0, EXTENDED, ("diagonally", 1.0)),
        (45.0, world.DIRECTIONS, (None, 0.0)),  # exactly halfway between up and right
        (22.5, EXTENDED, (None, 0.0)),  # halfway between right and diagonally
        (0.0, EXTENDED, ("right", 1.0)),
        (90.0, EXTENDED, ("up", 1.0)),
        (33.75, EXTENDED, ("diagonally", 0.5)),
        (180.0, EXTENDED, ("left", 1.0)),
    ):
        angle = math.radians(degrees)
        # Image coordinates: up is negative y. positions are (y, x).
        positions = np.stack([30 - times * math.sin(angle), 40 + times * math.cos(angle)], axis=1)
        direction, clarity = judge_module._direction(times, positions, 17, 64, palette)
        if expected[0] is not None:
            assert direction == expected[0]
        assert clarity == pytest.approx(expected[1], abs=1e-9)


def test_base_verdicts_do_not_change_when_the_palette_holds_diagonally():
    rng = np.random.default_rng(2)
    for index, text in enumerate(world.all_captions()[::2]):
        video = world.render(world.scene_for_caption(text, [4, index]))
        for frames in (video, like_generated(video, rng)):
            base, extended = judge(frames), judge(frames, directions=EXTENDED)
            assert (extended.colour, extended.direction, extended.shape) == (base.colour, base.direction, base.shape)
        assert base.matches(text)


def test_judge_direction_palette_errors_and_diagonal_captions_in_verdicts():
    video = world.render(world.scene_for_caption(world.all_captions()[0], 0))
    with pytest.raises(ValueError, match="does not know the direction 'up-right'"):
        judge(video, directions=("up", "up-right"))
    with pytest.raises(ValueError, match="at least two distinct directions"):
        judge(video, directions=("up",))
    with pytest.raises(ValueError, match="at least two distinct directions"):
        judge(video, directions=("up", "up"))
    # A palette of two reads any motion as the nearer of them.
    assert judge(video, directions=("up", "diagonally")).direction in ("up", "diagonally")
    verdict = Verdict("green", "diagonally", "square", 0.9)
    assert verdict.matches("a green triangle moving diagonally on a white background")
    assert not verdict.matches("a green triangle moving up on a white background")
    assert not verdict.matches("a red triangle moving diagonally on a white background")


def test_the_demo_tokenizer_reads_diagonally_as_its_unknown_token():
    """What the fine-tune builds on: "diagonally" is one <unk> in the direction's place, with the
    sentencepiece model and with the tokenizer the pipeline loads; "up-right" would not be (the
    pipeline's tokenizer reads it as "up" and another piece), which is why the word is "diagonally"."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from transformers import T5Tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(DEMO_MODEL_DIR / "tokenizer" / "spiece.model"))
    pipeline_tokenizer = T5Tokenizer.from_pretrained(str(DEMO_MODEL_DIR / "tokenizer"))
    for encode, unk in ((sp.encode, sp.unk_id()),
                        (lambda t: pipeline_tokenizer(t).input_ids, pipeline_tokenizer.unk_token_id)):
        for text in CAPTIONS:
            ids = encode(text)
            twin = encode(text.replace("diagonally", "up"))
            assert ids[4] == unk and len(ids) == len(twin) and ids[:4] + ids[5:] == twin[:4] + twin[5:]
    hyphenated = pipeline_tokenizer(DIAGONAL.replace("diagonally", "up-right")).input_ids
    assert len(hyphenated) == len(pipeline_tokenizer(DIAGONAL).input_ids) + 1
