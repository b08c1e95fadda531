"""The record of how a video was made, kept in the file: written by generate and batch, printed by
`cogvideox info`, and its command makes the same video again."""

import json
import shlex

import numpy as np
import pytest

from cogvideox import InputError, export_video, read_video
from cogvideox.cli import main
from cogvideox.provenance import MARK, command, is_record
from cogvideox.video import read_metadata

SMALL = ["--steps", "2", "--height", "32", "--width", "32", "--max-sequence-length", "8", "--quiet"]


def again(capsys, video, output) -> list[str]:
    """The `again:` command `cogvideox info` prints for `video`, writing to `output` (prefix dropped)."""
    capsys.readouterr()
    assert main(["info", str(video)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("again: "))
    argv = shlex.split(line.removeprefix("again: ").split("  (video ")[0])
    wanted = "again-%04d.png" if video.suffix == ".png" else f"again{video.suffix}"
    assert argv[:2] == ["cogvideox", "generate"] and argv[-2:] == ["--output", wanted]
    return [*argv[1:-1], str(output)]


@pytest.mark.parametrize("suffix", [".mp4", ".gif", "-%02d.png"])
def test_info_gives_the_command_that_makes_the_same_video(capsys, tiny_rope_dir, tmp_path, suffix):
    made = tmp_path / f"cat{suffix}"
    argv = ["generate", "a cat, it's 'quoted'", "-o", str(made), "--model", str(tiny_rope_dir), "--seed", "11",
            "--negative-prompt", "blurry", "--dynamic-cfg", "--dynamic-cfg-clock", "smooth", "--guidance", "4.25",
            "--scheduler", "dpm", "--frames", "33", "--riflex", "--fps", "12", *SMALL]  # fmt: skip
    assert main(argv) == 0
    entry = read_metadata(made)
    assert is_record(entry) and entry[MARK] == __import__("cogvideox").__version__
    assert (entry["prompt"], entry["seed"], entry["negative_prompt"], entry["guidance"]) == (
        "a cat, it's 'quoted'", 11, "blurry", 4.25
    )
    assert (entry["dynamic_cfg"], entry["scheduler"], entry["frames"], entry["riflex"], entry["fps"]) == (
        "smooth", "dpm", 33, True, 12
    )
    assert entry["model"] == str(tiny_rope_dir.resolve())

    remade = tmp_path / f"again{suffix}"
    assert main(again(capsys, made, remade)) == 0
    if suffix.endswith(".png"):  # frame by frame
        pairs = [(tmp_path / f"again-{i:02d}.png", tmp_path / f"cat-{i:02d}.png") for i in range(33)]
        assert all(a.read_bytes() == b.read_bytes() for a, b in pairs)
    else:
        assert np.array_equal(read_video(remade)[0], read_video(made)[0])


def test_several_videos_and_a_rewritten_prompt_are_recorded(capsys, tiny_rope_dir, tmp_path, monkeypatch):
    from cogvideox.enhance import PromptEnhancer

    monkeypatch.setattr(PromptEnhancer, "rewrite", lambda self, prompt, image=None: f"{prompt}, in detail")
    argv = ["generate", "a dog", "-o", str(tmp_path / "dog.mp4"), "--model", str(tiny_rope_dir), "--seed", "5",
            "--num-videos", "2", "--prompt-enhancer", "http://chat.invalid/v1", *SMALL]  # fmt: skip
    assert main(argv) == 0
    second = read_metadata(tmp_path / "dog-2.mp4")
    assert (second["prompt"], second["prompt_idea"], second["video_number"]) == ("a dog, in detail", "a dog", [2, 2])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "dog-2.mp4")]) == 0
    out = capsys.readouterr().out
    assert "prompt_idea" in out and out.rstrip().endswith("(video 2 of the 2)")
    # The command asks for the rewritten prompt itself, and the whole set of two.
    remade = again(capsys, tmp_path / "dog-2.mp4", tmp_path / "again.mp4")
    assert remade[1] == "a dog, in detail" and "--num-videos" in remade and "--prompt-enhancer" not in remade
    assert main(remade) == 0
    assert np.array_equal(read_video(tmp_path / "again-2.mp4")[0], read_video(tmp_path / "dog-2.mp4")[0])


def test_batch_videos_carry_their_record(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\na blue square moves up\n")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), "--seed", "3", "--steps", "2", "--frames", "9",
                 "--quiet"]) == 0  # fmt: skip
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    for entry in manifest:
        record = read_metadata(tmp_path / "out" / entry["file"])
        assert record == {MARK: record[MARK], "prompt": entry["prompt"], "seed": entry["seed"], **entry["settings"]}
    second = tmp_path / "out" / manifest[1]["file"]
    assert main(again(capsys, second, tmp_path / "again.mp4")) == 0
    assert np.array_equal(read_video(tmp_path / "again.mp4")[0], read_video(second)[0])


def test_files_without_a_record(capsys, tmp_path):
    plain = export_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "plain.mp4")
    assert read_metadata(plain) == {}
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(InputError, match="cannot read .*text.mp4 as a video"):
        read_metadata(tmp_path / "text.mp4")
    foreign = export_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "foreign.gif", metadata={"title": "x"})
    assert not is_record(read_metadata(foreign))
    assert main(["info", str(plain), str(foreign)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{plain}: no cogvideox record (made by another program, or re-encoded since)",
                   f"{foreign}: no cogvideox record (made by another program, or re-encoded since)"]  # fmt: skip
    assert main(["info", str(tmp_path / "missing.mp4")]) == 2
    assert "no video file at" in capsys.readouterr().err
    # With --json, stdout holds JSON lines alone, for a script to parse; a file without a record is named on stderr.
    ours = export_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "ours.mp4",
                        metadata={MARK: "0.1.0", "prompt": "p", "seed": 1})  # fmt: skip
    assert main(["info", "--json", str(plain), str(ours)]) == 1
    out = capsys.readouterr()
    assert [json.loads(line) for line in out.out.splitlines()] == [{"file": str(ours), MARK: "0.1.0", "prompt": "p",
                                                                    "seed": 1}]  # fmt: skip
    assert out.err == f"{plain}: no cogvideox record (made by another program, or re-encoded since)\n"


def test_the_command_names_inputs_loras_and_levers():
    entry = {MARK: "0.1.0", "prompt": "p", "seed": 1, "model": "M", "image": "first.png", "resize": "crop",
             "lora": [["style.safetensors", 0.8]], "quantize": "fp8", "attention": "sage", "cache": 0.1,
             "negative_prompt": "", "dynamic_cfg": "off"}  # fmt: skip
    assert command(entry) == [
        "cogvideox", "generate", "p", "--model", "M", "--seed", "1", "--no-dynamic-cfg", "--image", "first.png",
        "--resize", "crop", "--lora", "style.safetensors", "--lora-scale", "0.8", "--quantize", "fp8",
        "--attention", "sage", "--cache", "0.1",
    ]  # fmt: skip


def test_an_int8_text_encoder_is_recorded_and_made_again(capsys, tiny_rope_dir, tmp_path):
    made = tmp_path / "cat.mp4"
    argv = ["generate", "a cat", "-o", str(made), "--model", str(tiny_rope_dir), "--seed", "2", "--quantize-text",
            "int8", *SMALL]  # fmt: skip
    assert main(argv) == 0
    assert read_metadata(made)["quantize_text"] == "int8"
    remade = again(capsys, made, tmp_path / "again.mp4")
    assert remade[remade.index("--quantize-text") + 1] == "int8"
    assert main(remade) == 0
    assert np.array_equal(read_video(tmp_path / "again.mp4")[0], read_video(made)[0])
    plain = tmp_path / "plain.mp4"
    assert main([*argv[:-len(SMALL) - 2], *SMALL, "-o", str(plain)]) == 0
    assert not np.array_equal(read_video(plain)[0], read_video(made)[0])  # the text states did change


@pytest.mark.parametrize(
    "fields, why",
    [
        ({"lora": 5}, "lora is 5, not a list of [path, scale] pairs"),
        ({"lora": [["style.safetensors"]]}, "lora is [['style.safetensors']], not a list of [path, scale] pairs"),
        ({"video_number": 2}, "video_number is 2, not [i, n]"),
        ({"video_number": [1]}, "video_number is [1], not [i, n]"),
        ({"model": 5}, "model is 5, not a string"),
        ({"dynamic_cfg": 5}, "dynamic_cfg is 5, not a string"),
        ({"steps": [4]}, "steps is [4], not a string or a number"),
        ({"seed": True}, "seed is True, not a whole number"),
        ({"seed": 1.5}, "seed is 1.5, not a whole number"),
        ({"steps": 4.0}, "steps is 4.0, not a whole number"),
        ({"frames": "49"}, "frames is '49', not a whole number"),
        ({"guidance": True}, "guidance is True, not a number"),
        ({"guidance": "six"}, "guidance is 'six', not a number"),
    ],
    ids=["lora number", "lora half pair", "video_number number", "video_number short", "model number",
         "dynamic_cfg number", "steps list", "seed true", "seed float", "steps float", "frames string",
         "guidance true", "guidance string"],
)
def test_info_on_a_damaged_record_says_so_in_one_line(capsys, tmp_path, fields, why):
    """A record edited by hand or damaged: info stopped with a TypeError, ValueError or IndexError traceback."""
    video = export_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "v.mp4",
                         metadata={MARK: "0.1.0", "prompt": "p", "seed": 1, **fields})  # fmt: skip
    assert main(["info", str(video)]) == 1
    assert capsys.readouterr().out == f"{video}: its cogvideox record is damaged ({why})\n"


def test_values_that_start_with_a_dash_are_read_back_as_values():
    """`generate -cat --negative-prompt -blurry` is refused by the parser ("expected one argument"): the
    command is written so that it parses to the recorded values."""
    from cogvideox.cli import build_parser

    entry = {MARK: "0.1.0", "prompt": "-cat", "seed": 1, "negative_prompt": "-blurry", "image": "-first.png",
             "lora": [["-style.safetensors", -0.5]]}  # fmt: skip
    argv = command(entry, "again.mp4")
    assert argv[-2:] == ["--", "-cat"] and "--negative-prompt=-blurry" in argv
    args = build_parser().parse_args(argv[1:])
    assert (args.prompt, args.negative_prompt, args.image, args.output) == ("-cat", "-blurry", "-first.png", "again.mp4")
    assert (args.lora, args.lora_scale) == (["-style.safetensors"], [-0.5])
    assert command({MARK: "0.1.0", "prompt": "a cat", "seed": 1}, "again.mp4")[2] == "a cat"  # the usual order


@pytest.mark.parametrize("comment", ["[" * 100_000 + "]" * 100_000, '{"seed": ' + "1" * 5000 + "}"],
                         ids=["nested", "huge integer"])
def test_a_comment_that_json_cannot_hold_is_no_record(capsys, tmp_path, comment):
    """A RecursionError or ValueError traceback before: such a comment is another program's, not ours."""
    from PIL import Image

    path = tmp_path / "v.gif"
    Image.new("RGB", (16, 16)).save(path, comment=comment.encode())
    assert read_metadata(path) == {}
    assert main(["info", str(path)]) == 1
    assert capsys.readouterr().out == f"{path}: no cogvideox record (made by another program, or re-encoded since)\n"


def test_a_variant_is_loaded_recorded_and_made_again(capsys, tiny_rope_dir, tmp_path):
    """`--variant fp16` loads the variant's weights (another video than the plain weights'), the record
    carries it, and `info`'s command passes it on, so that the video made again is the same."""
    from helpers import make_variant_model

    model = make_variant_model(tiny_rope_dir, tmp_path / "model")
    common = ["a cat", "--model", str(model), "--seed", "5", "--frames", "9", *SMALL]
    assert main(["generate", *common, "-o", str(tmp_path / "plain.mp4")]) == 0
    assert main(["generate", *common, "--variant", "fp16", "-o", str(tmp_path / "fp16.mp4")]) == 0
    assert "variant" not in read_metadata(tmp_path / "plain.mp4")
    assert read_metadata(tmp_path / "fp16.mp4")["variant"] == "fp16"
    assert not np.array_equal(read_video(tmp_path / "plain.mp4")[0], read_video(tmp_path / "fp16.mp4")[0])
    argv = again(capsys, tmp_path / "fp16.mp4", tmp_path / "again.mp4")
    assert argv[argv.index("--variant") + 1] == "fp16"
    assert main(argv) == 0
    assert np.array_equal(read_video(tmp_path / "again.mp4")[0], read_video(tmp_path / "fp16.mp4")[0])
    capsys.readouterr()
    assert main(["generate", *common, "--variant", "ema", "-o", str(tmp_path / "ema.mp4")]) != 0
    assert "has no weights of the variant 'ema'; its weights come in the variant(s) fp16" in capsys.readouterr().err
