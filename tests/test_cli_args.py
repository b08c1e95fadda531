"""The command-line pieces the commands share: value types, and flags that mean the same everywhere."""

from __future__ import annotations

import argparse
import inspect
import json
import shutil

import pytest

from cogvideox.cli import build_parser
from cogvideox.cli_args import (
    finite_float,
    fraction,
    frame_side,
    locate_model,
    non_negative_float,
    noise_seed,
    non_negative_int,
    num_videos,
    positive_float,
    positive_int,
    request_from_args,
)
from cogvideox.errors import LoadError
from cogvideox.pipeline import Pipeline


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize(
    "kind, good, bad, message",
    [
        (positive_int, [("1", 1), ("49", 49)], ["0", "-2"], "expected a positive integer, got"),
        (positive_int, [], ["1.5", "x"], "expected a positive integer, got '"),
        (non_negative_int, [("0", 0), ("7", 7)], ["-1"], "expected a non-negative integer, got -1"),
        (positive_float, [("0.5", 0.5), ("16", 16.0)], ["0", "-3", "inf", "nan"], "expected a positive number"),
        (non_negative_float, [("0", 0.0), ("0.1", 0.1)], ["-0.5", "inf", "nan"], "expected a finite number >= 0"),
        (non_negative_float, [], ["fast"], "expected a number >= 0, got 'fast'"),
        (finite_float, [("-2", -2.0), ("6", 6.0)], ["inf", "-inf", "nan"], "expected a finite number, got"),
        (fraction, [("1", 1.0), ("0.25", 0.25)], ["0", "1.5", "nan"], "expected a number in (0, 1]"),
        (frame_side, [("480", 480), ("16384", 16384)], ["0", "16385", str(10**30)],
         "expected a size in pixels from 1 to 16384, got"),
        (num_videos, [("1", 1), ("1000", 1000)], ["0", "1001", str(10**30)],
         "expected a number of videos from 1 to 1000 (use cogvideox batch for more), got"),
        (noise_seed, [("0", 0), (str(2**64 - 1), 2**64 - 1)], ["-1", str(2**64), str(10**30)],
         "expected a seed from 0 to 2**64 - 1, got"),
        (noise_seed, [], ["1.5", "x"], "expected a non-negative integer, got '"),
    ],
)
def test_value_types(kind, good, bad, message):
    for text, value in good:
        assert kind(text) == value and type(kind(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError) as info:
            kind(text)
        assert str(info.value).startswith(message), (text, str(info.value))


# A blank value is most likely an unset variable (`--model "$MODEL"`): refused by name, where it was read as
# the current folder (--model ""), vanished from the message (--model " "), or silently meant the default.
BLANK_REFUSED = [
    *[(command, "--model", "a model folder or a Hugging Face repo id")
      for command in ("generate", "batch", "invert", "regenerate", "decode", "encode", "serve", "worker")],
    ("convert", "--base", "a model folder or a Hugging Face repo id"),
    *[(command, "--text-device", "a device such as cpu, cuda or cuda:1")
      for command in ("generate", "batch", "invert", "regenerate", "serve", "worker")],
    ("generate", "--parallel", "a layout such as cfg=2,ulysses=2"),
    ("batch", "--parallel", "a layout such as cfg=2,ulysses=2"),
]


@pytest.mark.parametrize("blank", ["", "  "])
@pytest.mark.parametrize("command, flag, expected", BLANK_REFUSED)
def test_a_blank_value_is_refused(capsys, command, flag, expected, blank):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, flag, blank])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"argument {flag}: expected {expected}, got an empty one (an unset variable?)" in err, err


# A size no frame can have reached the image library (an OverflowError from PIL, for encode), and a number
# of videos no run can make listed its file names for minutes: both are refused as the flag is read.
TOO_LARGE = [
    *[(command, flag, "a size in pixels from 1 to 16384")
      for command in ("generate", "batch", "invert", "encode") for flag in ("--height", "--width")],
    ("generate", "--num-videos", "a number of videos from 1 to 1000"),
    # A seed past 64 bits was refused by the pipeline, after seconds (minutes for a 5B) of loading
    *[(command, "--seed", "a seed from 0 to 2**64 - 1") for command in ("generate", "batch")],
]


@pytest.mark.parametrize("command, flag, expected", TOO_LARGE)
def test_a_value_too_large_for_any_run_is_refused(capsys, command, flag, expected):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, flag, str(10**30)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: expected {expected}" in err, err


MODEL_USERS = {"generate", "batch", "invert", "regenerate", "train", "serve", "worker"}
HUB_USERS = {"generate", "batch", "invert", "regenerate"}
SAMPLING = ["--negative-prompt", "--steps", "--guidance", "--dynamic-cfg", "--dynamic-cfg-clock", "--scheduler",
            "--seed", "--frames", "--height", "--width", "--max-sequence-length"]  # fmt: skip
SHARED = {"--model": MODEL_USERS, "--dtype": MODEL_USERS, "--device": MODEL_USERS,
          "--revision": HUB_USERS | {"train"}, "--offline": HUB_USERS,
          **{flag: {"generate", "batch"} for flag in SAMPLING}}  # fmt: skip
# Worded per command on purpose: batch seeds prompt i with seed+i and runs under torchrun; the inversion
# tools take a text-to-video model, or the one the latents came from.
DIFFERENT = {("batch", "--seed"), ("batch", "--device"), ("invert", "--model"), ("regenerate", "--model")}


def test_a_shared_flag_means_the_same_in_every_command():
    commands = _commands()
    for flag, users in SHARED.items():
        uses = {}
        for command in users:
            action = next(a for a in commands[command]._actions if flag in a.option_strings)
            if (command, flag) not in DIFFERENT:
                uses[command] = (action.help, action.default, action.type, action.choices, action.nargs)
        assert len(set(uses.values())) == 1, f"{flag} differs between commands: {uses}"


def test_generate_and_batch_make_the_same_request(tiny_rope_dir):
    commands = _commands()
    flags = ["--negative-prompt", "blurry", "--steps", "3", "--guidance", "4.5", "--dynamic-cfg",
             "--dynamic-cfg-clock", "smooth", "--frames", "17", "--height", "32", "--width", "48",
             "--max-sequence-length", "20"]  # fmt: skip
    gen = request_from_args(commands["generate"].parse_args(["a cat", *flags]), tiny_rope_dir)
    bat = request_from_args(commands["batch"].parse_args(["prompts.txt", "-o", "out", *flags]), tiny_rope_dir)
    assert gen == bat == dict(
        negative_prompt="blurry", num_frames=17, height=32, width=48, num_inference_steps=3, guidance_scale=4.5,
        use_dynamic_cfg=True, dynamic_cfg="smooth", max_sequence_length=20, riflex=False,
    )  # fmt: skip
    # Every key is a keyword of the pipeline call, so the request goes to it as it is.
    assert set(gen) <= set(inspect.signature(Pipeline.__call__).parameters)


def test_guidance_flags_not_given_take_the_models_recommendation(tiny_rope_dir, tmp_path):
    generate = _commands()["generate"]
    plain = request_from_args(generate.parse_args(["a cat"]), tiny_rope_dir)
    assert (plain["guidance_scale"], plain["use_dynamic_cfg"], plain["dynamic_cfg"]) == (6.0, False, "reference")

    folder = tmp_path / "model"
    shutil.copytree(tiny_rope_dir, folder)
    (folder / "sampling.json").write_text(json.dumps({"guidance_scale": 3, "use_dynamic_cfg": True}))
    recommended = request_from_args(generate.parse_args(["a cat"]), folder)
    assert (recommended["guidance_scale"], recommended["use_dynamic_cfg"]) == (3.0, True)
    given = request_from_args(generate.parse_args(["a cat", "--guidance", "5", "--no-dynamic-cfg"]), folder)
    assert (given["guidance_scale"], given["use_dynamic_cfg"], given["dynamic_cfg"]) == (5.0, False, "reference")


def test_locate_model_reads_the_configs_before_any_weights(tiny_rope_dir, tmp_path):
    args = argparse.Namespace(model=str(tiny_rope_dir), dtype="fp32", device="cpu", revision=None, offline=True,
                              variant=None)
    device, folder, configs = locate_model(args)
    assert device.type == "cpu" and str(folder) == str(tiny_rope_dir)
    assert configs.transformer.use_rotary_positional_embeddings
    with pytest.raises(LoadError):
        locate_model(argparse.Namespace(**{**vars(args), "model": str(tmp_path / "nowhere")}))
