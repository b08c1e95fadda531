"""The `cogvideox` command: help, one-line errors with exit status 2, and a real generate run."""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from helpers import fill_disk_for, read_rescued

from cogvideox import export_video, read_video
from cogvideox.cli import build_parser, main


def generate_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["generate"]


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "cogvideox", "generate", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ["--output", "--model", "--steps", "--guidance", "--seed", "--frames", "--height", "--width",
                 "--fps", "--negative-prompt", "--dtype", "--device", "--scheduler {ddim,dpm}",
                 "--dynamic-cfg, --no-dynamic-cfg"]:  # fmt: skip
        assert flag in text
    assert "Hugging Face repo id" in text and "embedded demo model" in text


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`cogvideox generate ... | head -1`: the reader is gone before the report line; the command ends as a
    program that SIGPIPE stops (status 141), not with a BrokenPipeError traceback, and its video is written."""
    output = tmp_path / "out.mp4"
    argv = ["generate", "a red ball", "--steps", "1", "--frames", "9", "-o", str(output)]
    process = subprocess.Popen([sys.executable, "-m", "cogvideox", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=tmp_path)  # fmt: skip
    process.stdout.close()  # before the command has written a byte
    _, err = process.communicate(timeout=300)
    assert (process.returncode, "Traceback" in err.decode(), "Broken" in err.decode()) == (141, False, False), err
    assert read_video(output)[0].shape[0] == 9


def test_every_flag_is_explained():
    for action in generate_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_every_flag_with_a_default_says_it():
    # A flag that does something when left out says what; flags whose absence means "off" need not.
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, [], "", argparse.SUPPRESS):
                assert "default" in action.help, (name, action.option_strings)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a cat", "--steps", "abc"], "argument --steps: expected a positive integer, got 'abc'"),
        (["generate", "a cat", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
        (["generate", "a cat", "--scheduler", "euler"], "argument --scheduler: invalid choice"),
        (["generate", "a cat", "--fps", "-3"], "argument --fps: expected a frame rate from 1/1001 to 1000, got -3"),
        (["generate", "a cat", "--fps", "0.0009"], "argument --fps: expected a frame rate from 1/1001 to 1000"),
        (["generate"], "the following arguments are required: prompt"),
        (["render", "a cat"], "invalid choice: 'render'"),
        (["generate", "a", "red", "cat"], "unrecognized arguments: red cat; put a prompt of several words in quotes "
                                          "(see cogvideox generate --help)"),
        # An unknown option's value is not taken for words of a prompt.
        (["regenerate", "l.safetensors", "--steps", "4"], "unrecognized arguments: --steps 4 (see cogvideox "
                                                            "regenerate --help)"),
        (["invert", "in.mp4", "--negative-prompt", "blur"], "unrecognized arguments: --negative-prompt blur (see"),
        (["regenerate", "l.safetensors", "--prompt", "a", "blue", "cat"], "unrecognized arguments: blue cat; put "
                                                                          "a prompt of several words in quotes"),
        # invert and regenerate take their prompt as an option: quoting the words alone would not do.
        (["invert", "in.mp4", "a red cat"], 'unrecognized arguments: a red cat; give the prompt with --prompt, in '
                                            'quotes: --prompt "a red ball rolls left" (see cogvideox invert --help)'),
        (["regenerate", "l.safetensors", "a", "cat"], "unrecognized arguments: a cat; give the prompt with --prompt"),
        # An empty name (an unset variable) is neither the current folder nor no file at all.
        (["generate", "a cat", "--video", ""], "argument --video: expected a file name, got an empty one (an unset "
                                               "variable?)"),
        (["generate", "a cat", "--image", " "], "argument --image: expected a file name, got an empty one"),
        (["generate", "a cat", "--extend", ""], "argument --extend: expected a file name, got an empty one"),
        (["batch", "prompts.txt", "-o", ""], "argument -o/--output-dir: expected a file name, got an empty one"),
        (["caption", ""], "argument folder: expected a file name, got an empty one"),
        (["decode", "l.safetensors", "-o", ""], "argument -o/--output: expected a file name, got an empty one"),
        (["info", "a.mp4", ""], "argument VIDEO: expected a file name, got an empty one"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--model", "/no/such/model"], "no model folder at /no/such/model"),
        (["--frames", "10"], "num_frames must be 8k+1"),
        (["--height", "40"], "height must be a positive multiple of 16"),
        (["--steps", "1001"], "num_inference_steps can be at most 1000"),
        (["--output", "/no/such/folder/x.mp4"], "--output folder /no/such/folder does not exist"),
        (["--output", "clip.avi"], "--output clip.avi: videos are written as MP4 (H.264), GIF or numbered PNG "
                                   "frames; give a name ending in .mp4 or .gif, such as clip.mp4, or one such as "
                                   "frames/%04d.png"),
        (["--output", "clip"], "give a name ending in .mp4 or .gif, such as clip.mp4"),
        (["--max-sequence-length", "100000"], "max_sequence_length can be at most 512 (T5's training length; "
                                              "this model uses 16)"),
        (["--output", ".mp4"], "give a name ending in .mp4 or .gif, such as video.mp4"),
        (["--resize", "crop"], "--resize only applies to an --image or --video input"),
        (["--negative-prompt", os.fsdecode(b"bad \xff")], "negative_prompt is not valid UTF-8 text (bytes b'\\xff'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(capsys, monkeypatch, tiny_rope_dir, extra, message):
    from cogvideox.pipeline import Pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    argv = ["generate", "a cat", "--model", str(tiny_rope_dir), "--quiet", *extra]
    assert main(argv) == 2
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and out.err.startswith("cogvideox: error: ") and message in out.err
    assert "Traceback" not in out.err


def test_an_output_folder_that_takes_no_file_fails_before_loading(capsys, monkeypatch, tiny_rope_dir, tmp_path):
    from cogvideox.pipeline import Pipeline

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the output was checked")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    argv = ["generate", "a cat", "--model", str(tiny_rope_dir), "--quiet", "--output", str(tmp_path / "x.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"cogvideox: error: cannot write {tmp_path / 'x.mp4'}: Permission denied\n"


def test_a_video_that_cannot_be_written_at_the_end_is_saved_elsewhere(capsys, monkeypatch, tiny_rope_dir, tmp_path):
    """The folder took files at the start but not at the end (a full disk): the minutes of generation are
    not lost, the video goes to the temporary folder and the one-line error says where."""
    target = tmp_path / "cat.mp4"
    fill_disk_for(monkeypatch, target, tmp_path)
    argv = ["generate", "a cat", "--model", str(tiny_rope_dir), "--output", str(target), "--quiet",
            "--steps", "1", "--height", "32", "--width", "48", "--max-sequence-length", "16"]  # fmt: skip
    assert main(argv) == 2
    rescued = read_rescued(capsys.readouterr().err, target)
    assert rescued.startswith(str(tmp_path))
    frames, fps = read_video(rescued)
    assert frames.shape == (9, 32, 48, 3) and fps == 8 and not target.exists()


@pytest.mark.parametrize(
    "error, where",
    [
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 80000000000 bytes."), "host"),
        (MemoryError(), "host"),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), "GPU"),
    ],
)
def test_running_out_of_memory_is_one_line(capsys, monkeypatch, tiny_rope_dir, tmp_path, error, where):
    from cogvideox.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)  # the default output.mp4: one left in the working folder would be warned of
    def allocation_fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(Pipeline, "__call__", allocation_fails)
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--quiet", "--steps", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cogvideox: error: out of {where} memory; try --dtype bf16") and err.count("\n") == 1


def test_generate_writes_a_readable_mp4(capsys, tiny_rope_dir, tmp_path):
    output = tmp_path / "cat.mp4"
    argv = ["generate", "a cat sits on the mat", "--model", str(tiny_rope_dir), "--output", str(output),
            "--steps", "2", "--height", "32", "--width", "48", "--seed", "3", "--max-sequence-length", "16",
            "--scheduler", "dpm", "--dynamic-cfg"]  # fmt: skip
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {output} (9 frames, 48x32, 8 fps, seed 3) | load ")
    for stage in ("load", "text", "denoise", "decode", "write"):
        assert f" {stage} " in last
    frames, fps = read_video(output)
    assert frames.shape == (9, 32, 48, 3) and fps == 8
    assert frames.std() > 1  # a picture, not a flat frame

    # The same request through the library gives the same video (the CLI is a thin layer).
    from cogvideox import Pipeline

    pipe = Pipeline.from_pretrained(tiny_rope_dir, scheduler="dpm")
    video = pipe("a cat sits on the mat", num_frames=None, height=32, width=48, num_inference_steps=2, seed=3,
                 max_sequence_length=16, use_dynamic_cfg=True, progress=False).frames[0]  # fmt: skip
    export_video(video, tmp_path / "library.mp4", fps=8)
    assert np.array_equal(read_video(tmp_path / "library.mp4")[0], frames)


def test_several_videos_and_fps(capsys, tiny_rope_dir, tmp_path):
    argv = ["generate", "a dog", "--model", str(tiny_rope_dir), "--output", str(tmp_path / "dog.mp4"),
            "--quiet", "--steps", "1", "--height", "32", "--width", "32", "--num-videos", "2",
            "--fps", "12"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog-1.mp4", "dog-2.mp4"]
    assert read_video(tmp_path / "dog-2.mp4")[1] == 12
    assert "seed" in capsys.readouterr().out
    # As PNG sequences, a video's number comes before the frame number, so each video's frames sort together.
    (tmp_path / "frames").mkdir()
    argv[argv.index("--output") + 1] = str(tmp_path / "frames" / "dog_%03d.png")
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == [f"dog_{v}-{f:03d}.png" for v in (1, 2) for f in range(9)]
    assert f"wrote {tmp_path / 'frames' / 'dog_1-%03d.png'}, {tmp_path / 'frames' / 'dog_2-%03d.png'}" in (
        capsys.readouterr().out)


def test_generate_writes_a_gif_when_asked(capsys, tiny_rope_dir, tmp_path):
    """`--output NAME.gif`: the same video as an animated GIF (a palette of 256 colours per frame)."""
    from PIL import Image

    from cogvideox import Pipeline
    from cogvideox.video import gif_palette

    argv = ["generate", "a dog", "--model", str(tiny_rope_dir), "--output", str(tmp_path / "dog.gif"),
            "--quiet", "--steps", "1", "--height", "32", "--width", "48", "--seed", "4", "--fps", "12"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'dog.gif'} (9 frames, 48x32, 12 fps, seed 4)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog.gif"]
    with Image.open(tmp_path / "dog.gif") as gif:
        durations = []
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
    assert sum(durations) == 750  # 9 frames at 12 fps
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    want = pipe("a dog", height=32, width=48, num_inference_steps=1, seed=4, progress=False).frames[0]
    frames, _ = read_video(tmp_path / "dog.gif")
    assert frames.shape == want.shape == (9, 32, 48, 3)
    assert np.array_equal(frames, [np.asarray(gif_palette(frame).convert("RGB")) for frame in want])

    # A numbered .png name: the frames themselves, one PNG each, from 0.
    (tmp_path / "frames").mkdir()
    argv[5] = str(tmp_path / "frames" / "%02d.png")
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == [f"{i:02d}.png" for i in range(9)]
    assert np.array_equal([np.asarray(Image.open(tmp_path / "frames" / f"{i:02d}.png")) for i in range(9)], want)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error(capsys, tiny_rope_dir):
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--device", "cuda"]) == 2
    assert "no CUDA device is available here; use the CPU (--device cpu" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--text-device", "cuda"]) == 2
    assert "use the CPU (--text-device cpu" in capsys.readouterr().err


@pytest.mark.parametrize("output, existing", [("old.mp4", "old.mp4"), ("%04d.png", "0000.png")])
def test_replacing_an_existing_video_is_said(capsys, tiny_rope_dir, tmp_path, output, existing):
    """A video, or a PNG sequence (by its first frame), that the new one replaces is warned of."""
    (tmp_path / existing).write_bytes(b"an earlier video")
    argv = ["generate", "a dog", "--model", str(tiny_rope_dir), "--output", str(tmp_path / output),
            "--quiet", "--steps", "1", "--height", "32", "--width", "32"]  # fmt: skip
    assert main(argv) == 0
    assert f"cogvideox: warning: {tmp_path / output} exists and will be replaced" in capsys.readouterr().err
    assert read_video(tmp_path / existing)[0].shape[1:] == (32, 32, 3)


def test_a_stray_percent_sign_in_a_png_name_fails_before_loading(capsys, monkeypatch, tiny_rope_dir, tmp_path):
    from cogvideox.pipeline import Pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the output was checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    argv = ["generate", "a dog", "--model", str(tiny_rope_dir), "--output", str(tmp_path / "50%-%04d.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvideox: error: --output ") and "write any other % as %%" in err and err.count("\n") == 1


@pytest.mark.parametrize("prompt", ["", "  \t"])
def test_a_blank_prompt_is_refused(capsys, prompt):
    assert main(["generate", prompt, "--model", "/no/such/model"]) == 2
    assert capsys.readouterr().err == ("cogvideox: error: the prompt is blank (an unset variable?); say what the "
                                       "video should show\n")


def test_a_blank_prompt_is_taken_with_an_image_to_follow(capsys, tmp_path):
    # Past the prompt check: the error is about the image, an empty file.
    image = tmp_path / "first.png"
    image.write_bytes(b"")
    assert main(["generate", "", "--image", str(image), "--model", "/no/such/model"]) == 2
    err = capsys.readouterr().err
    assert "the prompt is blank" not in err and "as an image" in err


def test_a_refused_request_does_not_say_it_will_replace_the_output(capsys, tiny_rope_dir, tmp_path):
    (tmp_path / "old.mp4").write_bytes(b"an earlier video")
    argv = ["generate", "a dog", "--model", str(tiny_rope_dir), "--output", str(tmp_path / "old.mp4"), "--frames", "10"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvideox: error: num_frames must be 8k+1") and err.count("\n") == 1
    assert (tmp_path / "old.mp4").read_bytes() == b"an earlier video"


def test_help_does_not_load_torch():
    # `cogvideox --help` (and every one-line usage error) answers at once: torch takes a second to import.
    code = "import sys; from cogvideox.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize(
    "flags, warning",
    [
        (["--negative-prompt", "blurry", "--guidance", "1"],
         "--negative-prompt changes nothing at --guidance 1: guidance of 1 or less is off"),
        (["--dynamic-cfg-clock", "smooth", "--no-dynamic-cfg", "--guidance", "6"],
         "--dynamic-cfg-clock changes nothing without dynamic CFG (give --dynamic-cfg)"),
        (["--dynamic-cfg-clock", "smooth", "--dynamic-cfg", "--guidance", "0.5"],
         "--dynamic-cfg-clock changes nothing without guidance (raise --guidance above 1)"),
        (["--negative-prompt", "blurry", "--guidance", "6", "--dynamic-cfg", "--dynamic-cfg-clock", "smooth"], None),
    ],
)
def test_guidance_flags_the_request_leaves_unused_are_said(capsys, tiny_rope_dir, tmp_path, flags, warning):
    argv = ["generate", "a cat", "-o", str(tmp_path / "a.mp4"), "--model", str(tiny_rope_dir), "--steps", "1",
            "--frames", "9", "--height", "32", "--width", "32", "--quiet", *flags]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    if warning is None:
        assert "changes nothing" not in err, err
    else:
        assert f"cogvideox: warning: {warning}" in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "a cat", "--steps", "y" * 100_000],
        ["generate", "a cat", "--scheduler", "a long prompt " * 8000],
        ["invert", "clip.mp4", "--offload", "z" * 100_000],
        ["info", "clip.mp4", "--bogus", "w" * 100_000],
    ],
)
def test_a_long_value_is_cut_in_the_error_line(capsys, argv):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 400, err[:400]
    assert "characters)" in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a cat", "-o", "{tmp}/" + "q" * 300 + ".mp4"], "file name too long for the file system: "),
        (["info", "q" * 100_000], "file name too long for the file system: " + "q" * 100 + "... (100000 characters);"),
        (["generate", "a cat", "-o", "{tmp}/a.mp4", "--dtype", "q" * 100_000],
         "unknown dtype '" + "q" * 100 + "... (100000 characters)'; use one of"),
    ],
)
def test_a_name_too_long_is_one_short_line(capsys, tmp_path, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 600 and message in err, err[:600]
