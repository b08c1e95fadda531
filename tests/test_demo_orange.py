"""The extra colour orange: outside the base world unless asked for, rendered, and read by the judge
with an extended palette (and only then)."""

import numpy as np
import pytest
from test_judge import like_generated

from cogvideox.demo import DEMO_MODEL_DIR, world
from cogvideox.demo.judge import Verdict, _chroma, _hues, judge

EXTENDED = world.colours(include_extra=True)


def test_orange_is_in_no_base_caption_split_or_dataset():
    assert world.EXTRA_COLOURS == ("orange",) and world.colours() == world.COLOURS
    assert EXTENDED == world.COLOURS + ("orange",)
    base_words = {w for c in world.all_captions() for w in c.split()}
    assert "orange" not in base_words
    assert len(world.all_captions()) == 216 and len(world.held_out_captions()) == 54
    dataset = world.WorldDataset(200, seed=3)
    assert all(dataset.scene(i).colour in world.COLOURS for i in range(200))
    extra = world.concept_captions("orange")
    assert len(extra) == len(set(extra)) == 3 * 4 * 3
    assert world.concept_captions("diagonally")[0] not in extra  # each concept has captions of its own
    with pytest.raises(ValueError, match="'pink' is no extra concept; choose one of orange, diagonally"):
        world.concept_captions("pink")
    assert not set(extra) & set(world.all_captions())
    assert {world.parse_caption(c, include_extra=True)[0] for c in extra} == {"orange"}
    # Every shape, direction and background occurs with orange.
    parsed = [world.parse_caption(c, include_extra=True) for c in extra]
    assert {p[1] for p in parsed} == set(world.SHAPES)
    assert {p[2] for p in parsed} == set(world.DIRECTIONS)
    assert {p[3] for p in parsed} == set(world.BACKGROUNDS)


def test_orange_is_accepted_only_where_asked():
    text = "a orange circle moving up on a black background"
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        world.parse_caption(text)
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        world.scene_for_caption(text, 0)
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        world.Scene("circle", "orange", "up", "black", size=8.0, start=(40.0, 30.0), speed=1.0)
    assert world.parse_caption(text, include_extra=True) == ("orange", "circle", "up", "black")
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        world.parse_caption("a pink circle moving up on a black background", include_extra=True)
    scene = world.scene_for_caption(text, 0, include_extra=True)
    assert scene.colour == "orange" and scene.caption == text
    # A base caption draws the same geometry whether or not extras are allowed.
    base = "a red circle moving up on a black background"
    a, b = world.scene_for_caption(base, 5), world.scene_for_caption(base, 5, include_extra=True)
    assert (a.size, a.start, a.speed) == (b.size, b.start, b.speed)


def test_orange_renders_in_its_rgb():
    scene = world.scene_for_caption("a orange square moving right on a gray background", 1, include_extra=True)
    video = world.render(scene)
    inside = (video == np.array(world.EXTRA_COLOUR_RGB["orange"], np.uint8)).all(axis=-1)
    assert inside.any(axis=(1, 2)).all()  # the object's interior in every frame
    assert world.colour_rgb("orange") == world.EXTRA_COLOUR_RGB["orange"]
    assert world.colour_rgb("red") == world.COLOUR_RGB["red"]


def test_orange_hue_is_halfway_between_red_and_yellow():
    hues = dict(zip(EXTENDED, np.degrees(_hues(EXTENDED))))
    gaps = sorted(abs((hues["orange"] - h + 180) % 360 - 180) for c, h in hues.items() if c != "orange")
    # Its nearest neighbours (red and yellow) are each about 28 degrees away; nothing is nearer.
    assert 25 < gaps[0] and gaps[1] < 30
    rgb = np.asarray(world.EXTRA_COLOUR_RGB["orange"], np.float64)
    assert np.hypot(*_chroma(rgb)) > 150  # saturated, as the base colours are


def test_judge_reads_orange_on_every_background_and_direction():
    wrong, wrong_degraded = [], []
    rng = np.random.default_rng(0)
    for seed in range(2):
        for i, text in enumerate(world.concept_captions("orange")):
            video = world.render(world.scene_for_caption(text, [seed, i], include_extra=True))
            verdict = judge(video, EXTENDED)
            if not verdict.matches(text) or verdict.confidence < 0.5:
                wrong.append((text, verdict))
            degraded = judge(like_generated(video, rng), EXTENDED)
            if not degraded.matches(text):
                wrong_degraded.append((text, degraded))
    assert not wrong, f"{len(wrong)} of 72 misjudged, e.g. {wrong[:3]}"
    assert len(wrong_degraded) <= 1, f"{len(wrong_degraded)} of 72 degraded misjudged, e.g. {wrong_degraded[:3]}"


def test_judge_with_orange_still_reads_every_base_colour():
    wrong, degraded_wrong = [], []
    rng = np.random.default_rng(1)
    for index, text in enumerate(world.all_captions()):
        video = world.render(world.scene_for_caption(text, [4, index]))
        extended, base = judge(video, EXTENDED), judge(video)
        if not extended.matches(text) or extended.confidence < 0.5:
            wrong.append((text, extended))
        # The colour is the same; only the confidence (the hue margin to the nearest other colour) may drop.
        assert (extended.colour, extended.direction, extended.shape) == (base.colour, base.direction, base.shape)
        assert extended.confidence <= base.confidence + 1e-12
        degraded = judge(like_generated(video, rng), EXTENDED)
        if not degraded.matches(text):
            degraded_wrong.append((text, degraded))
    assert not wrong, f"{len(wrong)} of 216 misjudged, e.g. {wrong[:3]}"
    assert len(degraded_wrong) <= 2, f"{len(degraded_wrong)} of 216 misjudged, e.g. {degraded_wrong[:3]}"


def test_base_judge_never_says_orange():
    for i, text in enumerate(world.concept_captions("orange")[:12]):
        video = world.render(world.scene_for_caption(text, i, include_extra=True))
        assert judge(video).colour in ("red", "yellow")
        assert judge(video, world.COLOURS) == judge(video)


def test_judge_palette_errors_and_orange_captions_in_verdicts():
    video = world.render(world.scene_for_caption(world.all_captions()[0], 0))
    with pytest.raises(ValueError, match="does not know the colour 'pink'"):
        judge(video, ("red", "pink"))
    with pytest.raises(ValueError, match="at least two distinct colours"):
        judge(video, ("red", "red"))
    verdict = Verdict("orange", "left", "circle", 0.9)
    assert verdict.matches("a orange triangle moving left on a white background")
    assert not verdict.matches("a orange triangle moving up on a white background")
    assert not verdict.matches("a red triangle moving left on a white background")


def test_the_demo_tokenizer_reads_orange_as_its_unknown_token():
    """What the fine-tune builds on: "orange" is <unk>, which no base caption contains, and the caption
    "a orange ..." has the base captions' token layout; with the sentencepiece model itself and with the
    tokenizer the pipeline loads (transformers' T5Tokenizer)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from transformers import T5Tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(DEMO_MODEL_DIR / "tokenizer" / "spiece.model"))
    pipeline_tokenizer = T5Tokenizer.from_pretrained(str(DEMO_MODEL_DIR / "tokenizer"))
    for encode, unk in ((sp.encode, sp.unk_id()),
                        (lambda t: pipeline_tokenizer(t).input_ids, pipeline_tokenizer.unk_token_id)):
        assert all(unk not in encode(c) for c in world.all_captions())
        for text in world.concept_captions("orange"):
            ids = encode(text)
            twin = encode(text.replace("orange", "red"))
            assert ids[1] == unk and len(ids) == len(twin) and ids[:1] + ids[2:] == twin[:1] + twin[2:]
