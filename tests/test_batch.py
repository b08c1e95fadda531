"""`cogvideox batch`: one video per prompt with the demo model, a manifest, resuming, and prompts spread
over processes as torchrun starts them."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
from helpers import cli_rank, free_port, join_or_fail, start_processes

from cogvideox import Pipeline, read_video
from cogvideox.batch import LOCK, MANIFEST, finished, lossy_levers, plan, read_prompts, run_batch, video_name
from cogvideox.cli import main
from cogvideox.demo import DEMO_MODEL_DIR
from cogvideox.errors import InputError

FAST = ["--steps", "2", "--frames", "9", "--quiet"]
PROMPTS = "a red ball rolls left\n\n# a comment line\n  a blue square moves up  \na green ball bounces\n"


def _manifest(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def test_read_prompts_and_names(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    prompts = read_prompts(path)
    assert prompts == ["a red ball rolls left", "a blue square moves up", "a green ball bounces"]
    assert video_name(7, "A Panda, playing a guitar!") == "0007-a-panda-playing-a-guitar.mp4"
    assert video_name(0, "???") == "0000-video.mp4"
    assert [(i.index, i.seed) for i in plan(prompts, seed=10)] == [(0, 10), (1, 11), (2, 12)]


def test_batch_writes_videos_and_manifest_then_resumes(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "-o", str(out), "--seed", "4", *FAST]) == 0
    report = capsys.readouterr().out
    assert "wrote 3 video(s)" in report
    entries = _manifest(out)
    # The last line sums each stage's seconds over the videos made, as the manifest holds them.
    stages = re.search(r"0 failed\) \| text (\S+)s, denoise (\S+)s, decode (\S+)s, write (\S+)s \| manifest ", report)
    assert stages, report
    for stage, shown in zip(("text", "denoise", "decode", "write"), stages.groups()):
        assert float(shown) == pytest.approx(sum(e["timings"][stage] for e in entries), abs=0.051)
    assert [(e["index"], e["prompt"], e["seed"]) for e in entries] == [
        (0, "a red ball rolls left", 4),
        (1, "a blue square moves up", 5),
        (2, "a green ball bounces", 6),
    ]
    for e in entries:
        frames, fps = read_video(out / e["file"])
        assert frames.shape == (9, 64, 96, 3) == (e["frames"], e["height"], e["width"], 3)
        assert fps == e["fps"] == 8
        assert set(e["timings"]) >= {"text", "denoise", "decode", "write"}
    first = {e["file"]: (out / e["file"]).read_bytes() for e in entries}

    # An interrupted batch: one video lost, a manifest line cut short. The re-run redoes only that video.
    lost = entries[1]["file"]
    (out / lost).unlink()
    with open(out / MANIFEST, "a") as f:
        f.write('{"index": 2, "prom')
    kept = {e["file"]: os.stat(out / e["file"]).st_mtime_ns for e in entries if e["file"] != lost}
    assert main(["batch", str(prompts), "-o", str(out), "--seed", "4", *FAST]) == 0
    report = capsys.readouterr().out
    assert "wrote 1 video(s)" in report and "2 finished earlier" in report
    assert re.search(r"0 failed\) \| text \S+s, denoise \S+s, decode \S+s, write \S+s \| manifest ", report)
    assert {f: os.stat(out / f).st_mtime_ns for f in kept} == kept  # untouched
    redone = json.loads((out / MANIFEST).read_text().splitlines()[-1])
    assert redone["file"] == lost and redone["seed"] == 5
    # Same seed, same video: the very same file.
    assert (out / lost).read_bytes() == first[lost]

    # Another seed is another batch: nothing is skipped.
    items = plan(read_prompts(prompts), seed=5)
    assert finished(out, items, entries[0]["settings"]) == set()
    # Nothing made, no stage times.
    assert main(["batch", str(prompts), "-o", str(out), "--seed", "4", *FAST]) == 0
    assert "(3 finished earlier, 0 failed) | manifest " in capsys.readouterr().out


def test_batch_reports_progress_over_the_whole_batch(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\na blue square moves up\n")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), "--steps", "2", "--frames", "9"]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err and "video" in err


def test_progress_bar_on_global_rank_0_only(capsys, monkeypatch, tmp_path):
    """Under torchrun another process shows no bar, even before the process group is up (RANK); what
    it makes is still made."""
    monkeypatch.setenv("RANK", "1")
    pipe = Pipeline.from_pretrained(None, device="cpu")
    [entry] = run_batch(pipe, ["a red ball"], tmp_path / "out", num_inference_steps=2, num_frames=9)
    assert capsys.readouterr().err == ""
    assert (tmp_path / "out" / entry["file"]).is_file()


def test_batch_samples_as_generate_does(capsys, tmp_path):
    """The sampling flags the two commands share reach the pipeline the same way: same flags and seed,
    same video; and dropping --dynamic-cfg changes it, so the flag is not silently ignored."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\n")
    flags = ["--scheduler", "dpm", "--dynamic-cfg", "--dynamic-cfg-clock", "smooth", "--guidance", "4",
             "--negative-prompt", "blurry", "--max-sequence-length", "12", "--seed", "3", *FAST]  # fmt: skip
    assert main(["generate", "a red ball rolls left", "-o", str(tmp_path / "one.mp4"), *flags]) == 0
    assert main(["batch", str(prompts), "-o", str(tmp_path / "dyn"), *flags]) == 0
    flags.remove("--dynamic-cfg")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "fixed"), *flags]) == 0
    capsys.readouterr()
    name = video_name(0, "a red ball rolls left")
    single = read_video(tmp_path / "one.mp4")[0]
    assert np.array_equal(read_video(tmp_path / "dyn" / name)[0], single)
    assert not np.array_equal(read_video(tmp_path / "fixed" / name)[0], single)


def test_batch_takes_the_memory_flags_of_generate(capsys, tmp_path):
    """--offload and --text-device keep the videos as they are and say what they chose; --vae-tiling
    reaches the VAE as in `generate` (tiles change the demo's pixels, so the two tiled videos must agree)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\n")
    name = video_name(0, "a red ball rolls left")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "plain"), *FAST]) == 0
    capsys.readouterr()
    assert main(["batch", str(prompts), "-o", str(tmp_path / "off"), "--offload", "model", "--text-device", "cpu",
                 *FAST]) == 0  # fmt: skip
    assert capsys.readouterr().out.startswith("offload 'model', T5 on cpu\n")
    assert np.array_equal(read_video(tmp_path / "off" / name)[0], read_video(tmp_path / "plain" / name)[0])

    assert main(["batch", str(prompts), "-o", str(tmp_path / "tiled"), "--vae-tiling", *FAST]) == 0
    assert main(["generate", "a red ball rolls left", "-o", str(tmp_path / "tiled.mp4"), "--vae-tiling", "--seed", "0",
                 *FAST]) == 0  # fmt: skip
    tiled = read_video(tmp_path / "tiled" / name)[0]
    assert np.array_equal(tiled, read_video(tmp_path / "tiled.mp4")[0])
    assert not np.array_equal(tiled, read_video(tmp_path / "plain" / name)[0])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no prompts file at"),
        ("\n# only a comment\n   \n", "holds no prompts"),
        (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ],
)
def test_bad_prompts_file_is_one_line(capsys, tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["batch", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_bad_requests_fail_before_loading(capsys, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red ball\n")
    (tmp_path / "file").write_text("")
    assert main(["batch", str(path), "-o", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["batch", str(path), "-o", str(tmp_path / "out"), "--frames", "10"]) == 2
    assert "frames" in capsys.readouterr().err
    assert main(["batch", str(path), "-o", str(tmp_path / "out"), "--parallel", "cfg=2"]) == 2
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def _no_loading(monkeypatch) -> None:
    """Make loading a model fail the test: these mistakes must be caught before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "from_pretrained", load)


def _contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_other_settings_stop_before_loading_until_overwrite(capsys, monkeypatch, tmp_path):
    """A folder of videos made with other settings is neither passed off as this run's (skipped) nor
    silently made again: the run stops naming the first setting that differs; --overwrite remakes them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    batch = ["batch", str(prompts), "-o", str(out), *FAST]
    assert main(batch) == 0
    capsys.readouterr()
    before = _contents(out)
    made = _manifest(out)[0]["settings"]
    assert made["steps"] == 2 and made["frames"] == 9 and made["scheduler"] == "ddim"
    assert made["model"] is None  # the demo model, wherever the package is installed
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, model)

    with monkeypatch.context() as patch:
        _no_loading(patch)
        for flags, difference in [
            (["--steps", "3"], "steps 2, now 3"),
            (["--guidance", "1"], f"guidance {made['guidance']:g}, now 1"),
            (["--frames", "17"], "frames 9, now 17"),
            (["--height", "32", "--width", "48"], "height 64, now 32"),
            (["--fps", "12"], "fps 8, now 12"),
            (["--scheduler", "dpm"], "scheduler 'ddim', now 'dpm'"),
            (["--negative-prompt", "blurry"], "negative prompt '', now 'blurry'"),
            (["--dynamic-cfg"], "dynamic cfg 'off', now 'reference'"),
            (["--model", str(model)], f"model the demo, now {str(model.resolve())!r}"),
            (["--quantize", "int8"], "lossy levers 'none', now 'int8'"),
            (["--cache", "0.1"], "lossy levers 'none', now 'cache 0.1'"),
        ]:
            assert main([*batch, *flags]) == 2, flags
            assert capsys.readouterr().err == (
                f"cogvideox: error: {out} holds 3 video(s) made with other settings ({difference}); use "
                "another --output-dir, or --overwrite to make them again\n"
            )
        assert _contents(out) == before  # not a byte changed
        # Levers that change the computation by rounding only are not settings: nothing to make again.
        for flags in (["--attention", "math"], ["--cache", "0"]):
            assert main([*batch, *flags]) == 0, flags
            assert "wrote 0 video(s)" in capsys.readouterr().out

    assert main([*batch, "--steps", "3", "--overwrite"]) == 0
    assert "wrote 3 video(s)" in capsys.readouterr().out
    entries = _manifest(out)
    assert len(entries) == 6 and all(e["settings"] == made | {"steps": 3} for e in entries[3:])
    assert all((out / e["file"]).read_bytes() != before[e["file"]] for e in entries[3:])
    # Made with these settings now: a re-run keeps them, with or without --overwrite.
    for flags in ([], ["--overwrite"]):
        assert main([*batch, "--steps", "3", *flags]) == 0
        assert "wrote 0 video(s)" in capsys.readouterr().out
    assert len(_manifest(out)) == 6


def test_a_demo_batch_resumes_once_the_package_is_installed_elsewhere(capsys, monkeypatch, tmp_path):
    """The demo model's folder is where the package happens to be installed: a batch made with it resumes
    from another install (a new virtual environment), including one whose manifest names the old folder."""
    import cogvideox.demo

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\n")
    out = tmp_path / "out"
    batch = ["batch", str(prompts), "-o", str(out), *FAST]
    assert main(batch) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "site-packages" / "weights"
    shutil.copytree(DEMO_MODEL_DIR, elsewhere)
    with monkeypatch.context() as patch:
        _no_loading(patch)
        patch.setattr(cogvideox.demo, "DEMO_MODEL_DIR", elsewhere)
        assert main(batch) == 0
        assert "wrote 0 video(s)" in capsys.readouterr().out
        # A manifest written when the demo was recorded by its folder: that folder, this install's, agrees.
        entry = _manifest(out)[0]
        entry["settings"]["model"] = str(elsewhere)
        (out / MANIFEST).write_text(json.dumps(entry) + "\n")
        assert main(batch) == 0
        assert "wrote 0 video(s)" in capsys.readouterr().out


def test_manifest_lines_without_settings_count_by_size_and_rate(capsys, monkeypatch, tmp_path):
    """Lines written before settings were recorded: a video whose size and frame rate match is finished
    (the rest is unknown and taken to agree, so an interrupted batch still resumes after an upgrade); one
    of another size or rate was made with other settings."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\na blue square moves up\n")
    out = tmp_path / "out"
    batch = ["batch", str(prompts), "-o", str(out), *FAST]
    assert main(batch) == 0
    old = [{k: v for k, v in e.items() if k != "settings"} for e in _manifest(out)]
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in old))
    capsys.readouterr()

    for flags in ([], ["--steps", "3"]):
        assert main([*batch, *flags]) == 0
        report = capsys.readouterr().out
        assert "wrote 0 video(s)" in report and "2 finished earlier" in report
    assert len(_manifest(out)) == 2
    with monkeypatch.context() as patch:
        _no_loading(patch)
        assert main([*batch, "--frames", "17"]) == 2
        assert "holds 2 video(s) made with other settings (frames 9, now 17)" in capsys.readouterr().err
        assert main([*batch, "--fps", "12"]) == 2
        assert "(fps 8, now 12)" in capsys.readouterr().err
    assert main([*batch, "--frames", "17", "--overwrite"]) == 0
    assert "wrote 2 video(s)" in capsys.readouterr().out
    assert [e["settings"]["frames"] for e in _manifest(out)[2:]] == [17, 17]


@pytest.mark.parametrize("failure", ["mkdir", "write"])
def test_unwritable_output_folder_is_one_line_before_loading(capsys, monkeypatch, tmp_path, failure):
    """Tests run as root, so no folder is unwritable by permissions: a path under a regular file makes
    mkdir fail for real, and a write refused by the system is played by `tempfile.mkstemp`."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")
    _no_loading(monkeypatch)
    if failure == "mkdir":
        (tmp_path / "afile").write_text("")
        out, reason = tmp_path / "afile" / "sub", "Not a directory"
    else:
        out, reason = tmp_path / "ro", "Permission denied"

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["batch", str(prompts), "-o", str(out), *FAST]) == 2
    assert capsys.readouterr().err == f"cogvideox: error: cannot write to {out}: {reason}\n"
    if failure == "write":
        assert list(out.iterdir()) == []


def test_run_batch_records_the_pipelines_settings(tmp_path):
    """From Python, without `settings`: the pipeline's and the request's, every default resolved."""
    pipe = Pipeline.from_pretrained(None, device="cpu")
    out = tmp_path / "out"
    [entry] = run_batch(pipe, ["a red ball"], out, progress=False, num_inference_steps=2, num_frames=9)
    height, width = pipe.default_size
    assert entry["settings"] == {
        "model": None, "scheduler": "ddim", "steps": 2, "guidance": pipe.sampling_defaults["guidance_scale"],
        "dynamic_cfg": "off", "negative_prompt": "", "max_sequence_length": pipe.config.max_text_seq_length,
        "frames": 9, "height": height, "width": width, "fps": pipe.default_fps, "lossy_levers": "none",
        "resize": None, "riflex": False, "prompt_enhancer": "off",
    }  # fmt: skip
    assert run_batch(pipe, ["a red ball"], out, progress=False, num_inference_steps=2, num_frames=9) == []
    assert run_batch(pipe, "a red ball", out, progress=False, num_inference_steps=2, num_frames=9) == []  # one
    with pytest.raises(InputError, match=r"holds 1 video\(s\) made with other settings \(steps 2, now 3\)"):
        run_batch(pipe, ["a red ball"], out, progress=False, num_inference_steps=3, num_frames=9)
    [entry] = run_batch(pipe, ["a red ball"], out, progress=False, overwrite=True, num_inference_steps=3, num_frames=9)
    assert entry["settings"]["steps"] == 3


def test_lossy_levers_name_what_changes_the_video():
    assert lossy_levers() == lossy_levers(None, "auto", 0) == lossy_levers(None, "fa3", None) == "none"
    assert lossy_levers("fp8", "sage", 0.1) == "fp8, sage attention, cache 0.1"
    assert lossy_levers("int8", "sage-emulated") == "int8, sage-emulated attention"


def test_batch_with_the_step_cache_records_it(capsys, monkeypatch, tmp_path):
    """--cache changes the videos, so it is a setting; each entry says how many steps its video computed.
    Lines written before the levers were recorded were made without them."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving up\n")
    out = tmp_path / "out"
    batch = ["batch", str(prompts), "-o", str(out), "--seed", "5", "--steps", "10", "--frames", "9", "--quiet"]
    assert main([*batch, "--cache", "0.3"]) == 0
    [entry] = _manifest(out)
    assert entry["settings"]["lossy_levers"] == "cache 0.3"
    assert entry["cache"] == {"computed": 7, "calls": 10}  # the demo model's run skips 3 of 10 at 0.3
    # The same video as `generate` with the same flags and seed.
    single = tmp_path / "single.mp4"
    assert main(["generate", "a red circle moving up", "-o", str(single), *batch[4:], "--cache", "0.3"]) == 0
    assert np.array_equal(read_video(single)[0], read_video(out / entry["file"])[0])
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _no_loading(patch)
        assert main(batch) == 2
        assert "made with other settings (lossy levers 'cache 0.3', now 'none')" in capsys.readouterr().err

    assert main([*batch, "--overwrite"]) == 0
    entries = _manifest(out)
    assert entries[-1]["settings"]["lossy_levers"] == "none" and "cache" not in entries[-1]
    for e in entries:
        del e["settings"]["lossy_levers"]  # as a manifest of an earlier version writes them
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert main(batch) == 0
    assert "wrote 0 video(s)" in capsys.readouterr().out


def test_a_prompt_is_a_line_of_the_file_whatever_it_holds(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red ball\u2028rolls left\r\na blue\x0csquare\u0085moves\ra green\tball\n".encode())
    assert read_prompts(path) == ["a red ball\u2028rolls left", "a blue\x0csquare\u0085moves", "a green\tball"]


def test_prompts_files_with_a_byte_order_mark_and_invisible_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff# header\na red circle\n\u200b\n \u200b\u2060 \n\u200ba blue square\n".encode())
    assert read_prompts(path) == ["a red circle", "a blue square"]
    with pytest.raises(InputError, match="past 2\\*\\*64 - 1; use a seed up to 18446744073709551614"):
        plan(["a", "b"], seed=2**64 - 1)


def test_a_damaged_or_empty_video_is_made_again_and_a_locked_folder_refused(tmp_path):
    from cogvideox import batch

    pipe = Pipeline.from_pretrained(None, device="cpu")
    out = tmp_path / "out"
    call = dict(progress=False, num_inference_steps=2, num_frames=9)
    first = run_batch(pipe, ["a red ball", "a blue ball"], out, **call)
    (out / first[0]["file"]).write_bytes(b"")  # a crash or a full disk left it empty
    (out / first[1]["file"]).write_bytes(b"not a video")
    assert [e["index"] for e in run_batch(pipe, ["a red ball", "a blue ball"], out, **call)] == [0, 1]
    held = batch._lock_folder(out)  # another batch writing there
    try:
        with pytest.raises(InputError, match="another batch is writing into"):
            run_batch(pipe, ["a red ball"], out, **call)
    finally:
        held.close()
    assert run_batch(pipe, ["a red ball", "a blue ball"], out, **call) == []  # free again

    # A run killed while writing leaves its temporary file; the next run that claims the folder removes
    # those of its own videos, and nothing else.
    leftover = out / f".{first[0]['file'].removesuffix('.mp4')}.k2j4x9.mp4.part"
    others = [out / ".0009-not-in-this-batch.abc.mp4.part", out / "notes.part"]
    for path in [leftover, *others]:
        path.write_bytes(b"\0" * 100)
    assert run_batch(pipe, ["a red ball", "a blue ball"], out, **call) == []
    assert not leftover.exists() and all(path.exists() for path in others)


def test_a_failed_video_is_an_error_line_then_made_by_the_next_run(capsys, monkeypatch, tmp_path):
    from cogvideox.errors import NonFiniteError

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\na blue square moves up\n")
    out = tmp_path / "out"
    real = Pipeline.__call__

    def blue_fails(self, prompt, *args, **kwargs):
        if "blue" in prompt:
            raise NonFiniteError("the latents became NaN at step 1")
        return real(self, prompt, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Pipeline, "__call__", blue_fails)
        assert main(["batch", str(prompts), "-o", str(out), *FAST]) == 1
    report, err = capsys.readouterr()
    assert "wrote 1 video(s)" in report and "1 failed" in report and "error" not in report
    assert err == "cogvideox: error: prompt 1 ('a blue square moves up'): the latents became NaN at step 1\n"
    assert _manifest(out)[1]["error"] == "the latents became NaN at step 1"
    assert main(["batch", str(prompts), "-o", str(out), *FAST]) == 0
    assert "wrote 1 video(s)" in capsys.readouterr().out and _manifest(out)[2]["index"] == 1


def test_a_folder_that_cannot_be_locked_is_a_warning_or_one_line(capsys, monkeypatch, tmp_path):
    """A file system without locks (some network and FUSE mounts) leaves the batch unguarded, not stopped;
    a lock file that cannot be opened is a one-line error, not a traceback."""
    import errno
    import fcntl

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n")

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as patch:
        patch.setattr(fcntl, "flock", no_locks)
        assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), *FAST]) == 0
    out, err = capsys.readouterr()
    assert "wrote 1 video(s)" in out
    assert err == (
        f"cogvideox: warning: cannot lock {tmp_path / 'out'} (No locks available): nothing stops another "
        "batch from writing there too\n"
    )
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / LOCK).mkdir()
    _no_loading(monkeypatch)
    assert main(["batch", str(prompts), "-o", str(tmp_path / "odd"), *FAST]) == 2
    assert capsys.readouterr().err == f"cogvideox: error: cannot open {tmp_path / 'odd' / LOCK}: Is a directory\n"


def test_a_folder_that_fills_up_stops_the_batch_and_keeps_the_video(tmp_path, monkeypatch):
    from cogvideox import video

    pipe = Pipeline.from_pretrained(None, device="cpu")
    out = tmp_path / "out"
    real, calls = video.export_video, []

    def full_on_the_second(frames, path, fps=8, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(frames, path, fps=fps, **kwargs)

    monkeypatch.setattr(video, "export_video", full_on_the_second)
    with pytest.raises(InputError, match="No space left on device.*saved to .* instead; the batch stopped there"):
        run_batch(pipe, ["a", "b", "c"], out, progress=False, num_inference_steps=2, num_frames=9)
    entries = _manifest(out)
    assert [e["index"] for e in entries] == [0, 1] and "error" in entries[1] and "stop" not in entries[1]
    rescued = re.search(r"saved to (\S+) instead", entries[1]["error"]).group(1)
    assert read_video(rescued)[0].shape == (9, 64, 96, 3)


def test_torchrun_spreads_prompts_over_processes(tmp_path):
    """Two processes (as torchrun starts them), three prompts: each process makes its share, rank 0 keeps
    the one manifest and reports."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out = tmp_path / "out"
    argv = ["batch", str(prompts), "-o", str(out), *FAST]
    join_or_fail(start_processes(cli_rank, (argv, str(free_port()), str(tmp_path)), 2), 300, "a two-process batch")
    reports = [(tmp_path / f"rank-{rank}.out").read_text() for rank in range(2)]
    assert "wrote 3 video(s)" in reports[0] and not reports[1]  # only rank 0 reports
    entries = _manifest(out)
    assert sorted(e["index"] for e in entries) == [0, 1, 2]
    assert all((out / e["file"]).is_file() for e in entries)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MANIFEST] + [e["file"] for e in entries])


def test_a_resumed_batch_claims_its_folder_once_before_loading(capsys, monkeypatch, tmp_path):
    """The folder is locked and surveyed before the model loads, and each video's header is read once: a
    folder another batch holds costs no model load, and a resume over many videos no second survey."""
    from cogvideox import batch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\na blue square moves up\n")
    out = tmp_path / "out"
    command = ["batch", str(prompts), "-o", str(out), *FAST]
    assert main(command) == 0
    capsys.readouterr()

    read = []
    playable = batch._playable
    monkeypatch.setattr(batch, "_playable", lambda path: read.append(path.name) or playable(path))
    _no_loading(monkeypatch)  # nothing left to make: no model either
    assert main(command) == 0
    assert "wrote 0 video(s) to" in capsys.readouterr().out
    assert sorted(read) == sorted(e["file"] for e in _manifest(out))  # each header read once

    held = batch._lock_folder(out)  # another batch writing there
    try:
        assert main(command) == 2
    finally:
        held.close()
    assert capsys.readouterr().err == (
        f"cogvideox: error: another batch is writing into {out}; wait for it to finish, or give another "
        "--output-dir\n"
    )


def test_another_seed_or_an_edited_prompt_does_not_replace_videos_unasked(capsys, monkeypatch, tmp_path):
    """File names carry the prompt's place and first words, not its seed or its last words: a re-run with
    another --seed, or after a line was edited past its sixth word, would write over finished videos."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left over the grass\n")
    out = tmp_path / "out"
    batch = ["batch", str(prompts), "-o", str(out), *FAST]
    big = 2**40  # a seed is shown whole, not as 1.09951e+12
    assert main([*batch, "--seed", str(big)]) == 0
    capsys.readouterr()
    before = _contents(out)

    with monkeypatch.context() as patch:
        _no_loading(patch)
        assert main([*batch, "--seed", "5"]) == 2
        assert f"holds 1 video(s) made with other settings (seed {big}, now 5); use another" in capsys.readouterr().err
        prompts.write_text("a red ball rolls left over the sand\n")  # same file name
        assert main([*batch, "--seed", str(big)]) == 2
        assert (
            "(prompt 'a red ball rolls left over the grass', now 'a red ball rolls left over the sand')"
            in capsys.readouterr().err
        )
    assert _contents(out) == before
    assert main([*batch, "--seed", str(big), "--overwrite"]) == 0
    assert "wrote 1 video(s)" in capsys.readouterr().out
    assert _manifest(out)[-1]["prompt"] == "a red ball rolls left over the sand"


def test_a_manifest_with_bytes_that_are_not_utf8_spoils_only_their_line(tmp_path):
    pipe = Pipeline.from_pretrained(None, device="cpu")
    out = tmp_path / "out"
    call = dict(progress=False, num_inference_steps=2, num_frames=9)
    run_batch(pipe, ["a red ball", "a blue ball"], out, **call)
    lines = (out / MANIFEST).read_bytes().splitlines(keepends=True)
    (out / MANIFEST).write_bytes(lines[0] + b'{"index": 1, "prompt": "a blue \xff\xfe' + b"\n")
    assert [e["index"] for e in run_batch(pipe, ["a red ball", "a blue ball"], out, **call)] == [1]


def _i2v_prompts(tmp_path):
    """A prompts file in its own folder naming first frames in a sibling one (relative to the file)."""
    from helpers import sample_picture

    (tmp_path / "frames").mkdir()
    sample_picture(seed=1).save(tmp_path / "frames" / "a.png")
    sample_picture(seed=2).save(tmp_path / "frames" / "b.png")
    (tmp_path / "list").mkdir()
    prompts = tmp_path / "list" / "prompts.txt"
    prompts.write_text("a cat jumps@@../frames/a.png\n# a comment\na dog runs @@ ../frames/b.png\n")
    return prompts


I2V_FAST = ["--steps", "1", "--quiet", "--max-sequence-length", "16"]


def test_an_image_to_video_batch_takes_each_lines_first_frame(capsys, tiny_i2v_dir, tmp_path, monkeypatch):
    prompts = _i2v_prompts(tmp_path)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "frames")  # the images are found from the prompts file, not from here
    argv = ["batch", str(prompts), "-o", str(out), "--model", str(tiny_i2v_dir), "--seed", "7", *I2V_FAST]
    assert main(argv) == 0
    entries = _manifest(out)
    assert [(e["prompt"], e["image"], e["seed"]) for e in entries] == [
        ("a cat jumps", "../frames/a.png", 7),
        ("a dog runs", "../frames/b.png", 8),
    ]
    assert entries[0]["settings"]["resize"] == "stretch"
    # Each video is generate's for the same prompt, first frame and seed.
    for e in entries:
        single = tmp_path / f"single-{e['index']}.mp4"
        image = str(tmp_path / "frames" / e["image"].split("/")[-1])
        assert main(["generate", e["prompt"], "--image", image, "-o", str(single), "--model", str(tiny_i2v_dir),
                     "--seed", str(e["seed"]), *I2V_FAST]) == 0  # fmt: skip
        assert np.array_equal(read_video(single)[0], read_video(out / e["file"])[0])
    assert not np.array_equal(read_video(out / entries[0]["file"])[0], read_video(out / entries[1]["file"])[0])

    capsys.readouterr()
    assert main(argv) == 0
    assert "(2 finished earlier, 0 failed)" in capsys.readouterr().out
    # Another first frame on a line is another video: not replaced unasked.
    prompts.write_text("a cat jumps@@../frames/a.png\na dog runs@@../frames/a.png\n")
    assert main(argv) == 2
    assert "(image '../frames/b.png', now '../frames/a.png')" in capsys.readouterr().err
    assert main([*argv, "--resize", "crop"]) == 2
    assert "(resize 'stretch', now 'crop')" in capsys.readouterr().err


@pytest.mark.parametrize(
    "model, lines, extra, message",
    [
        ("tiny_i2v_dir", "a cat jumps@@../frames/a.png\na dog runs\n", [],
         "prompt 1 ('a dog runs') has no first frame: the model is image-to-video"),
        ("tiny_i2v_dir", "a cat jumps@@../frames/missing.png\n", [], "prompt 0 ('a cat jumps'): no image file at "),
        ("tiny_i2v_dir", "@@../frames/a.png\n", [], "prompt 0 ('@@../frames/a.png') has no prompt around its @@"),
        ("tiny_i2v_dir", "a cat jumps @@ \n", [], "has no image file around its @@"),
        ("tiny_rope_dir", "a cat\na cat jumps@@../frames/a.png\n", [],
         "prompt 1 ('a cat jumps') gives an image (@@../frames/a.png), but the model is text-to-video"),
        ("tiny_rope_dir", "a cat\n", ["--resize", "crop"], "--resize only applies to the first frames"),
    ],
)
def test_image_lines_that_do_not_fit_the_model_stop_before_loading(
    capsys, monkeypatch, request, tmp_path, model, lines, extra, message
):
    prompts = _i2v_prompts(tmp_path)
    prompts.write_text(lines)
    folder = request.getfixturevalue(model)
    monkeypatch.setattr(Pipeline, "from_pretrained", None)  # loading would fail loudly
    argv = ["batch", str(prompts), "-o", str(tmp_path / "out"), "--model", str(folder), *extra, *I2V_FAST]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_undecodable_first_frame_fails_its_video_alone(capsys, tiny_i2v_dir, tmp_path):
    prompts = _i2v_prompts(tmp_path)
    (tmp_path / "frames" / "b.png").write_text("not a picture")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "-o", str(out), "--model", str(tiny_i2v_dir), *I2V_FAST]) == 1
    captured = capsys.readouterr()
    assert "wrote 1 video(s)" in captured.out and "1 failed" in captured.out
    assert "prompt 1 ('a dog runs'): cannot decode" in captured.err
    failed = _manifest(out)[-1]
    assert failed["image"] == "../frames/b.png" and "cannot decode" in failed["error"]


def test_a_batch_rewrites_each_prompt_with_the_enhancer(capsys, monkeypatch, tmp_path):
    """--prompt-enhancer: each line rewritten before its video, the rewrite in the manifest and the
    file's record, the video that of the rewritten prompt; turning it off is another setting."""
    from cogvideox.enhance import PromptEnhancer
    from cogvideox.video import read_metadata

    sent = []

    def rewrite(self, prompt, image=None):
        sent.append(prompt)
        return f"{prompt}, slowly, in soft light"

    monkeypatch.setattr(PromptEnhancer, "rewrite", rewrite)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball rolls left\na blue square moves up\n")
    out = tmp_path / "out"
    batch = ["batch", str(prompts), "-o", str(out), *FAST]
    assert main([*batch, "--prompt-enhancer", "http://chat.invalid/v1", "--enhancer-model", "chat-small"]) == 0
    entries = _manifest(out)
    assert sent == ["a red ball rolls left", "a blue square moves up"]
    assert [e["enhanced_prompt"] for e in entries] == [p + ", slowly, in soft light" for p in sent]
    assert entries[0]["settings"]["prompt_enhancer"] == "chat-small"
    record = read_metadata(out / entries[1]["file"])
    assert (record["prompt"], record["prompt_idea"]) == (entries[1]["enhanced_prompt"], "a blue square moves up")
    single = tmp_path / "single.mp4"
    assert main(["generate", entries[1]["enhanced_prompt"], "-o", str(single), "--seed", "1", *FAST]) == 0
    assert np.array_equal(read_video(single)[0], read_video(out / entries[1]["file"])[0])

    capsys.readouterr()
    assert main(batch) == 2  # without the enhancer: other settings, not replaced unasked
    assert "(prompt enhancer 'chat-small', now 'off')" in capsys.readouterr().err
    assert main([*batch, "--prompt-enhancer", "http://chat.invalid/v1", "--parallel", "cfg=2"]) == 2
    assert "--prompt-enhancer does not combine with --parallel" in capsys.readouterr().err


def test_videos_of_removed_lines_are_named_not_passed_over(capsys, tmp_path):
    """A video's name holds its line's place: after a line is removed, the lines below it are made anew
    under new names, and the videos of the old places stay. The run says so."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue cube\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "-o", str(out), *FAST]) == 0
    assert "no line of the prompts" not in capsys.readouterr().err
    prompts.write_text("a blue cube\n")
    assert main(["batch", str(prompts), "-o", str(out), *FAST]) == 0
    out_text, err = capsys.readouterr()
    assert "wrote 1 video(s)" in out_text
    assert (f"cogvideox: warning: {out} holds 2 video(s) that no line of the prompts makes now (0000-a-red-ball.mp4, "
            "0001-a-blue-cube.mp4): of lines since removed or moved") in err  # fmt: skip
    assert sorted(p.name for p in out.glob("*.mp4")) == ["0000-a-blue-cube.mp4", "0000-a-red-ball.mp4",
                                                         "0001-a-blue-cube.mp4"]  # fmt: skip


def _batch_rank_that_dies(rank: int, port: str, out: str) -> None:
    """One of two processes of a batch of two prompts (one round); rank 0 dies while it makes its video."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, CUDA_VISIBLE_DEVICES="")  # fmt: skip
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    pipe = Pipeline.from_pretrained(None, device="cpu")
    if rank == 0:
        Pipeline.__call__ = lambda *args, **kwargs: os._exit(1)  # killed, say, or out of host memory
    try:
        run_batch(pipe, ["a red ball", "a blue square"], out, progress=False, num_inference_steps=2, num_frames=9)
    except RuntimeError:  # the round's exchange lost rank 0
        pass


def test_a_video_finished_in_a_round_another_process_dies_in_keeps_its_line(tmp_path):
    """Rank 0 dies mid-round; rank 1 wrote its video in that round: the video's manifest line is kept (the
    next run folds it in), so a resumed batch skips it instead of making it again."""
    import time

    out = tmp_path / "out"
    context = start_processes(_batch_rank_that_dies, (str(free_port()), str(out)), 2)
    deadline = time.monotonic() + 300
    for process in context.processes:  # not context.join: it would stop rank 1 once rank 0 has died
        process.join(timeout=max(deadline - time.monotonic(), 0))
    for process in context.processes:
        process.kill()
    assert [p.exitcode for p in context.processes] == [1, 0]
    second = plan(["a red ball", "a blue square"])[1]
    assert (out / second.file).is_file()

    pipe = Pipeline.from_pretrained(None, device="cpu")
    entries = run_batch(pipe, ["a red ball", "a blue square"], out, progress=False, num_inference_steps=2,
                        num_frames=9)  # fmt: skip
    assert [e["index"] for e in entries] == [0]  # the second was finished
    assert sorted(e["index"] for e in _manifest(out)) == [0, 1]
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MANIFEST] + [e["file"] for e in _manifest(out)])


def test_manifest_lines_json_cannot_read_are_redone_not_a_traceback(tmp_path):
    """A line nested past the JSON parser's stack, or holding an integer too long to convert, stopped the
    resumed batch with a RecursionError or ValueError; like a line cut short, its video is made again."""
    from cogvideox.batch import _latest_entries

    good = json.dumps({"file": "a.mp4", "seed": 1})
    (tmp_path / MANIFEST).write_text("\n".join([good, "[" * 100_000 + "]" * 100_000,
                                                '{"file": "b.mp4", "seed": ' + "1" * 5000 + "}"]) + "\n")  # fmt: skip
    assert _latest_entries(tmp_path) == {"a.mp4": {"file": "a.mp4", "seed": 1}}


def test_a_variant_is_a_setting_of_the_batch(capsys, monkeypatch, tiny_rope_dir, tmp_path):
    """`--variant fp16` loads the variant's weights and is recorded in the manifest; the same folder run
    without it (or with another variant) is another batch, refused before loading, and the reverse too."""
    from helpers import make_variant_model

    model = make_variant_model(tiny_rope_dir, tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    small = ["--model", str(model), "--height", "32", "--width", "32", "--max-sequence-length", "8", *FAST]
    fp16, plain = tmp_path / "fp16", tmp_path / "plain"
    assert main(["batch", str(prompts), "-o", str(fp16), "--variant", "fp16", *small]) == 0
    assert main(["batch", str(prompts), "-o", str(plain), *small]) == 0
    capsys.readouterr()
    assert _manifest(fp16)[0]["settings"]["variant"] == "fp16" and "variant" not in _manifest(plain)[0]["settings"]
    assert not np.array_equal(read_video(fp16 / _manifest(fp16)[0]["file"])[0],
                              read_video(plain / _manifest(plain)[0]["file"])[0])  # fmt: skip
    with monkeypatch.context() as patch:
        _no_loading(patch)
        plain_weights = "none (the plain weights)"
        for out, flags, difference in [(fp16, [], f"variant 'fp16', now {plain_weights}"),
                                       (plain, ["--variant", "fp16"], f"variant {plain_weights}, now 'fp16'")]:
            assert main(["batch", str(prompts), "-o", str(out), *flags, *small]) == 2
            assert f"holds 1 video(s) made with other settings ({difference})" in capsys.readouterr().err
        assert main(["batch", str(prompts), "-o", str(fp16), "--variant", "fp16", *small]) == 0
        assert "wrote 0 video(s)" in capsys.readouterr().out
