"""The embedded demo model: it ships in the package, loads like a real checkpoint, and follows prompts."""

import numpy as np
import pytest

from cogvideox import Pipeline
from cogvideox.demo import DEMO_MODEL_DIR, world
from cogvideox.demo.judge import judge

PROMPTS = [
    "a red circle moving up on a gray background",  # held out: (red, up)
    "a green square moving right on a white background",
]


@pytest.fixture(scope="module")
def demo():
    return Pipeline.from_pretrained()


def test_weights_ship_in_the_package_in_the_official_layout():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
    size = sum(p.stat().st_size for p in DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 40 * 2**20, f"demo weights are {size / 2**20:.1f} MB"


def test_demo_prompts_split():
    assert [world.is_held_out(p) for p in PROMPTS] == [True, False]


def test_demo_model_generates_its_native_video_reproducibly(demo):
    # The format, and that a seed fixes the video (20 steps: the count does not matter here).
    out = demo(PROMPTS, seed=3, num_inference_steps=20, progress=False)
    again = demo(PROMPTS[:1], seed=3, num_inference_steps=20, progress=False)
    assert len(out.frames) == 2
    assert out.frames[0].shape == (world.FRAMES, world.HEIGHT, world.WIDTH, 3)
    assert out.frames[0].dtype == np.uint8
    assert demo.default_fps == 8
    # The first video of the batch is drawn from the same noise as a batch of one.
    assert np.abs(out.frames[0].astype(int) - again.frames[0].astype(int)).max() <= 2


def test_demo_model_draws_the_colour_and_motion_it_is_asked_for(demo):
    # Twelve captions covering every colour, shape, direction and background, one seed, 20 steps, the
    # model's recommended guidance (2.5, from its sampling.json): the judge, reading pixels, sees the
    # caption's colour and direction in 11 of 12 (chance: 1 of 24).
    assert demo.sampling_defaults["guidance_scale"] == 2.5
    captions = [
        f"a {c} {s} moving {d} on a {b} background"
        for c, s, d, b in zip(world.COLOURS * 2, world.SHAPES * 4, world.DIRECTIONS * 3, world.BACKGROUNDS * 4)
    ]
    out = demo(captions, seed=0, num_inference_steps=20, progress=False)
    right = sum(judge(frames).matches(c) for c, frames in zip(captions, out.frames))
    assert right >= 10, f"colour and direction right in {right} of {len(captions)} videos"


def test_evaluate_seeds_are_chosen_on_the_command_line(monkeypatch, tmp_path):
    # A fresh --first-seed scores videos that a checkpoint was not chosen on: held-out captions take seeds
    # first, first + 1, ...; training captions 100 + first, ...
    from cogvideox.demo import evaluate as evaluate_module
    from cogvideox.pipeline import Pipeline as PipelineClass

    calls = []
    monkeypatch.setattr(PipelineClass, "from_pretrained", classmethod(lambda cls, model=None: "pipe"))
    monkeypatch.setattr(evaluate_module, "evaluate",
                        lambda pipe, seeds, train_seeds, steps, **kw: calls.append((seeds, train_seeds, kw)) or {})
    out = tmp_path / "report.json"
    evaluate_module.main(["--seeds", "3", "--train-seeds", "2", "--first-seed", "3", "--guidance", "2",
                          "--output", str(out)])
    assert calls == [((3, 4, 5), (103, 104), {"num_frames": None, "riflex": False, "guidance_scale": 2.0})]
    assert out.read_text() == "{}\n"
    evaluate_module.main(["--seeds", "2", "--frames", "33", "--riflex"])
    assert calls[1] == ((0, 1), (100,), {"num_frames": 33, "riflex": True})
    # --output in a folder that does not exist yet: the folder is made, the report written
    evaluate_module.main(["--seeds", "1", "--output", str(tmp_path / "new" / "report.json")])
    assert (tmp_path / "new" / "report.json").read_text() == "{}\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/model"], "error: no model folder at /no/such/model"),
        (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["--guidance", "nan"], "argument --guidance: expected a finite number, got nan"),
    ],
)
def test_evaluate_mistakes_are_one_line(capsys, argv, message):
    from cogvideox.demo import evaluate as evaluate_module

    try:
        status = evaluate_module.main(argv)
    except SystemExit as e:  # argparse's own errors exit
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m cogvideox.demo.evaluate: error: ") and message in err and err.count("\n") == 1
