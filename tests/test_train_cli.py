"""`cogvideox train`: an end-to-end run on a tiny folder, resume, and one-line errors."""

import argparse
import json

import pytest
import torch
from helpers import cli_status, fail_training_at, make_video_folder

from cogvideox.cli import build_parser, main


def train_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_flag_is_explained():
    for action in train_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_train_end_to_end_and_resume(capsys, tiny_rope_dir, tmp_path):
    data = make_video_folder(tmp_path / "data")
    (tmp_path / "run.toml").write_text(
        f'model = "{tiny_rope_dir}"\nrank = 4\nbuckets = ["9x32x48"]\nlr = 1e-3\nmask_weight = 2.0\n'
    )
    argv = ["train", str(data), "--output", str(tmp_path / "out"), "--config", str(tmp_path / "run.toml"),
            "--warmup-steps", "0", "--checkpoint-every", "1", "--mask-weight", "3", "--quiet"]
    assert main([*argv, "--steps", "2"]) == 0
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    # No clip of the folder has a mask: said in one line, and the run goes on.
    assert "cogvideox: warning: mask_weight is 3 but no clip in" in captured.err
    assert any(line.startswith("cogvideox train: skipped videos/corrupt.mp4: cannot decode") for line in out)
    assert out[-1].startswith(f"wrote {tmp_path / 'out' / 'pytorch_lora_weights.safetensors'} (2 steps, final loss ")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rank"] == 4 and saved["steps"] == 2 and saved["model"] == str(tiny_rope_dir)
    assert saved["mask_weight"] == 3.0  # the flag over the file's 2.0
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-1.pt", "step-2.pt"]

    # Asking for more steps continues the run from its newest checkpoint.
    assert main([*argv, "--steps", "3"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    capsys.readouterr()

    # Fewer steps than the run reached: nothing can be trained, said in one line.
    assert main([*argv, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err == f"cogvideox: error: {tmp_path / 'out'} is already at step 3 (asked for 2): nothing to train; raise --steps to continue\n"
    # As many: the result is written again, and the last line says nothing was trained.
    assert main([*argv, "--steps", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"{tmp_path / 'out'} was already at step 3: nothing trained (raise --steps to continue); "
                           f"wrote {tmp_path / 'out' / 'pytorch_lora_weights.safetensors'} again")
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--output", "o"], "missing setting(s): data"),
        (["nope", "--output", "o"], "data folder nope does not exist"),
        (["{tmp}", "--output", "o", "--config", "{tmp}/missing.toml"], "missing.toml does not exist"),
        (["{tmp}", "--output", "o", "--bucket", "10x32x48", "--model", "{model}"], "bucket 10x32x48: num_frames must be 8k+1"),
        (["{tmp}", "--output", "o", "--model", "{model}"], "neither metadata.jsonl nor prompts.txt"),
        (["{tmp}", "--output", "o", "--optimizer", "sgd"], "argument --optimizer: invalid choice"),
        (["{tmp}", "--output", "o", "--caption-dropout", "2"], "caption_dropout must be in [0, 1)"),
        (["{tmp}", "--output", "o", "--offload-activations", "--no-gradient-checkpointing"],
         "offload_activations needs gradient_checkpointing"),
        (["{tmp}", "--output", "o", "--mask-weight", "0"], "argument --mask-weight: expected a positive number, got 0"),
        (["{tmp}", "--output", "o", "--validation-guidance", "-1"],
         "argument --validation-guidance: expected a finite number >= 0, got -1"),
        (["{tmp}", "--output", "o", "--validation-guidance", "inf"],
         "argument --validation-guidance: expected a finite number >= 0, got inf"),
        (["{tmp}", "--output", "{tmp}/a-file", "--model", "{model}"], "cannot write to {tmp}/a-file: File exists"),
        (["{tmp}/a-file", "--output", "o", "--model", "{model}"], "data {tmp}/a-file is a file; give the folder"),
        # A blank name (an unset variable) is refused, not trained into a folder named "  " or read as "."
        (["  ", "--output", "o"], "argument data: expected a file name, got an empty one"),
        (["{tmp}", "--output", "  "], "argument -o/--output: expected a file name, got an empty one"),
        (["{tmp}", "--output", "o", "--config", ""], "argument --config: expected a file name, got an empty one"),
        (["{tmp}", "--output", "o", "--cache-dir", " "], "argument --cache-dir: expected a file name, got an empty"),
        (["{tmp}", "--output", "o", "--model", ""], "argument --model: expected a model folder or a Hugging Face"),
        (["{tmp}", "--output", "o", "--seed", str(10**30)], "seed must be an integer in [0, 2**64), got 1000"),
        (["{tmp}", "--output", "o", "--batch-size", str(10**30)], "batch_size must be at most 4096, got 1000"),
        (["{tmp}", "--output", "o", "--rank", str(10**30)], "rank must be at most 16384, got 1000"),
        (["{tmp}", "--output", "o", "--full", "--rank", "8"], "rank: LoRA setting(s), but full is on"),
        (["{tmp}", "--output", "o", "--full", "--alpha", "8"], "alpha: LoRA setting(s), but full is on"),
        (["{tmp}", "--output", "o", "--fps", "1e308"], "argument --fps: expected a frame rate from 1/1001 to 1000"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(capsys, tiny_rope_dir, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    argv = ["train", *[a.format(tmp=tmp_path, model=tiny_rope_dir) for a in extra], "--quiet"]
    message = message.format(tmp=tmp_path)
    assert cli_status(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_compile_flags_reach_the_config():
    parse = train_parser().parse_args
    assert parse(["d", "--output", "o", "--compile"]).compile is True
    assert parse(["d", "--output", "o", "--no-compile"]).compile is False
    assert parse(["d", "--output", "o"]).compile is None  # the config file's value, else off


def test_a_string_for_the_validation_prompts_is_refused(capsys, tiny_rope_dir, tmp_path):
    """Not one validation video per character of the string: a one-line error before any loading."""
    data = make_video_folder(tmp_path / "data")
    (tmp_path / "run.toml").write_text(
        f'model = "{tiny_rope_dir}"\nvalidation_prompts = "a single string"\nvalidation_every = 1\nsteps = 2\n'
    )
    argv = ["train", str(data), "-o", str(tmp_path / "out"), "--config", str(tmp_path / "run.toml"), "--quiet"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "cogvideox: error: validation_prompts must be a list of prompts such as [\"a cat on a mat\"], "
        "got 'a single string'\n"
    )
    assert not (tmp_path / "out").exists()


def test_validation_every_past_the_steps_warns(capsys, tiny_rope_dir, tmp_path):
    data = make_video_folder(tmp_path / "data")
    argv = ["train", str(data), "-o", str(tmp_path / "out"), "--model", str(tiny_rope_dir), "--bucket", "9x32x48",
            "--rank", "4", "--steps", "2", "--validation-every", "5", "--validation-prompt", "a cat", "--quiet"]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cogvideox: warning:")]
    assert warnings == [
        "cogvideox: warning: validation_every is 5 but the run has only 2 steps: no validation videos will be made"
    ]
    assert not (tmp_path / "out" / "validation").exists()


def test_ctrl_c_says_how_to_resume(capsys, tiny_rope_dir, tmp_path, monkeypatch):
    from cogvideox.train.finetune import Run

    data = make_video_folder(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    argv = ["train", str(data), "--output", str(out), "--model", str(tiny_rope_dir), "--rank", "4",
            "--bucket", "9x32x48", "--steps", "4", "--checkpoint-every", "2", "--quiet"]
    original = fail_training_at(monkeypatch, 0, KeyboardInterrupt())
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "cogvideox train: interrupted before the first checkpoint; run the same command again to start over "
        "(the clips encoded so far stay in the cache)"
    )
    # Step 3 is done since the checkpoint of step 2: it is saved before the run stops, not lost.
    monkeypatch.setattr(Run, "train_step", original)
    fail_training_at(monkeypatch, 3, KeyboardInterrupt())
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-2:] == [
        "cogvideox train: stopping; saving step 3 first (Ctrl-C again to stop at once)",
        f"cogvideox train: interrupted; {out} holds step 3 (its newest checkpoint): run the same command again "
        "to continue from there",
    ]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2.pt", "step-3.pt"]
    # Continued from it, the run is the one that was never stopped.
    monkeypatch.setattr(Run, "train_step", original)
    assert main(argv) == 0
    assert main([*argv[:3], str(tmp_path / "straight"), *argv[4:]]) == 0

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]

    assert len(losses("out")) == 4 and losses("out") == losses("straight")


def test_sigterm_stops_a_run_as_ctrl_c_does(capsys, tiny_rope_dir, tmp_path, monkeypatch):
    """A cluster scheduler stops a job with SIGTERM: the run says where it stands and how to resume, and
    exits with a terminated process's status (143); the handler goes when the command returns."""
    import os
    import signal

    from cogvideox.train.finetune import Run

    data = make_video_folder(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    argv = ["train", str(data), "--output", str(out), "--model", str(tiny_rope_dir), "--rank", "4",
            "--bucket", "9x32x48", "--steps", "4", "--checkpoint-every", "2", "--quiet"]
    original = Run.train_step

    def train_step(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step)

    monkeypatch.setattr(Run, "train_step", train_step)
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cogvideox train: interrupted; {out} holds step 3 (its newest checkpoint): run the same command again "
        "to continue from there"
    )
    assert signal.getsignal(signal.SIGTERM) == before
    monkeypatch.setattr(Run, "train_step", original)
    assert main(argv) == 0  # and the run goes on from step 3


def test_a_damaged_checkpoint_is_one_line_naming_it(capsys, tiny_rope_dir, tmp_path):
    """A checkpoint cut short (a full disk, a copy stopped midway) or not one at all: the file is named with
    what to do, instead of torch.load's traceback once the data and the model are loaded."""
    data = make_video_folder(tmp_path / "data", count=1, broken=False)
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-1.pt").write_bytes(b"not a checkpoint")
    (out / "checkpoints" / "step-2.pt").write_bytes(b"PK\x03\x04 cut short")
    argv = ["train", str(data), "-o", str(out), "--model", str(tiny_rope_dir), "--rank", "4",
            "--bucket", "9x32x48", "--steps", "3", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"cogvideox: error: cannot read the checkpoint {out / 'checkpoints' / 'step-2.pt'} (")
    assert err.endswith("); delete it to continue from the next newest, or give another --output\n")


def test_a_cache_folder_that_cannot_be_written_is_one_line(capsys, tiny_rope_dir, tmp_path):
    """A --cache-dir that is a file (or a read-only data folder's cache): named before any clip is encoded,
    not a traceback from the first cache entry written."""
    data = make_video_folder(tmp_path / "data", count=1, broken=False)
    (tmp_path / "a-file").write_text("")
    argv = ["train", str(data), "-o", str(tmp_path / "out"), "--model", str(tiny_rope_dir), "--rank", "4",
            "--bucket", "9x32x48", "--steps", "1", "--cache-dir", str(tmp_path / "a-file"), "--quiet"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"cogvideox: error: cannot write to {tmp_path / 'a-file'}: File exists (the cache of latents and T5 states); "
        "give another --cache-dir\n"
    )


def test_the_last_line_after_a_validation_round(capsys, tiny_rope_dir, tmp_path):
    """A validation round at the last step writes its colours after the step's loss in loss.jsonl: the
    summary still gives the final loss, instead of a KeyError once everything is written."""
    data = make_video_folder(tmp_path / "data", count=1, broken=False)
    out = tmp_path / "out"
    argv = ["train", str(data), "-o", str(out), "--model", str(tiny_rope_dir), "--rank", "4", "--bucket", "9x32x48",
            "--steps", "1", "--validation-every", "1", "--validation-prompt", "a cat", "--validation-steps", "1",
            "--quiet"]
    assert main(argv) == 0
    last = json.loads((out / "loss.jsonl").read_text().splitlines()[-1])
    assert "loss" not in last and last["step"] == 1  # the round's colours
    loss = json.loads((out / "loss.jsonl").read_text().splitlines()[-2])["loss"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"wrote {out / 'pytorch_lora_weights.safetensors'} (1 steps, final loss {loss:.4f}; log {out / 'loss.jsonl'})"
    )


def test_cache_files_no_run_reads_are_reported_and_pruned_on_request(capsys, tiny_rope_dir, tmp_path):
    """A clip re-made leaves its old latents behind: the next run says how much the cache holds that it does
    not read, and --prune-cache deletes exactly those files."""
    from helpers import sample_frames

    from cogvideox.video import export_video

    data = make_video_folder(tmp_path / "data", count=2, broken=False)
    argv = ["train", str(data), "--model", str(tiny_rope_dir), "--rank", "4", "--bucket", "9x32x48", "--steps", "1",
            "--quiet"]
    assert main([*argv, "-o", str(tmp_path / "a")]) == 0
    assert "does not read" not in capsys.readouterr().out
    cache = data / "cache"
    before = {p.name for p in (cache / "latents").iterdir()}
    export_video(sample_frames(12, 40, 56, seed=99), data / "videos" / "clip1.mp4", fps=8)
    (cache / "text" / ".x.safetensors.part").write_bytes(b"left by a killed run")
    assert main([*argv, "-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"cogvideox train: {cache} holds 2 file(s) (" in out and "this run does not read; --prune-cache" in out
    after = {p.name for p in (cache / "latents").iterdir()}
    assert len(before) == 2 and len(after) == 3 and before < after
    assert main([*argv, "-o", str(tmp_path / "c"), "--prune-cache"]) == 0
    assert f"cogvideox train: removed 2 unused cache file(s) from {cache} (" in capsys.readouterr().out
    kept = {p.name for p in (cache / "latents").iterdir()}
    assert len(kept) == 2 and after - before < kept and len(kept & before) == 1  # clip0's, and clip1's new one
    assert not (cache / "text" / ".x.safetensors.part").exists()
    # What is left is what a run reads: nothing more to report, nothing encoded again.
    assert main([*argv, "-o", str(tmp_path / "d")]) == 0
    assert "does not read" not in capsys.readouterr().out


def test_out_of_memory_names_the_training_levers_and_the_step_held(capsys, tiny_rope_dir, tmp_path, monkeypatch):
    """Out of GPU memory at a training step: one line with the settings that lower a step's memory (not
    `--dtype bf16`, which a GPU run has already) and the step the run folder holds to continue from."""
    data = make_video_folder(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    fail_training_at(monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    argv = ["train", str(data), "--output", str(out), "--model", str(tiny_rope_dir), "--rank", "4",
            "--bucket", "9x32x48", "--steps", "4", "--checkpoint-every", "2", "--quiet"]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"cogvideox: error: out of GPU memory; {out} holds step 2: continue from there with --offload-activations "
        "or a smaller --bucket, or start a new --output with --quantize-base int8 (LoRA), --optimizer adamw-cpu "
        "(--full) or a smaller --batch-size"
    )


def test_sigterm_stops_a_process_waiting_for_the_others_to_join(tiny_rope_dir, tmp_path):
    """Under torchrun, rank 0 waits in the rendezvous for a rank 1 that never comes (it failed before
    joining); torchrun's SIGTERM ends it at once instead of 30 s later with SIGKILL."""
    from helpers import assert_sigterm_ends_rank_zero_waiting

    data = make_video_folder(tmp_path / "data", count=1, broken=False)
    argv = ["train", str(data), "--output", str(tmp_path / "out"), "--model", str(tiny_rope_dir), "--rank", "4",
            "--bucket", "9x32x48", "--steps", "1", "--device", "cpu", "--quiet"]
    assert_sigterm_ends_rank_zero_waiting(argv)
