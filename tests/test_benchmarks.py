"""The benchmark scripts keep what they measured: they run on rented GPU time under a time cap, so a mode
that fails or a run cut short must not lose the figures already taken. Tiny configs on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def run_script(module_name: str, argv: list[str], out: Path, monkeypatch) -> int:
    """Run benchmarks/<module_name>.py's main with `argv`, its JSON under `out`; returns the exit status."""
    module = __import__(module_name)
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(sys, "argv", [f"{module_name}.py", *argv])
    try:
        status = module.main()
    except SystemExit as e:
        return 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
    return status or 0


def fail_on_call(monkeypatch, owner, name: str, n: int, error: BaseException) -> None:
    """Make call number `n` of `owner.name` raise `error` (a KeyboardInterrupt stops a run as a time cap's
    signal would: it is not an Exception); the other calls run the real function."""
    real = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_speed_records_a_failing_mode_and_keeps_the_others(tmp_path, monkeypatch):
    # fp8 cannot run on the CPU: it fails, the exact mode before it and int8 after it are still measured,
    # everything is in the JSON, and the exit status says that something failed.
    argv = ["--tiny", "--modes", "fused,fp8,int8", "--repeat", "1", "--trajectory-steps", "2", "--no-reference",
            "--skip-vae", "--skip-t5"]  # fmt: skip
    speed = __import__("speed")
    # int8 uncompiled: compiling takes half a minute here, and what is checked is the bookkeeping around a
    # failure (test_fast_compile.py compiles the int8 blocks)
    monkeypatch.setitem(speed.MODES, "int8", dict(quantize="int8"))
    assert run_script("speed", argv, tmp_path, monkeypatch) == 1
    result = json.loads((tmp_path / "speed_5b_tiny.json").read_text())
    assert set(result["modes"]) == {"fused", "fp8", "int8"}
    assert "error" in result["modes"]["fp8"]
    assert result["modes"]["fused"]["step_ms"] > 0
    assert result["modes"]["int8"]["trajectory_rel_l2_vs_fused"] >= 0


def test_speed_reports_the_errors_against_an_fp32_truth(tmp_path, monkeypatch, capsys):
    # The reference's own error against the fp32 step is its bf16 noise, shown next to each mode's; with
    # --tiny every run is fp32, so the figures are ~0 here: the keys, the table and the flag are checked.
    import math

    import torch

    pytest.importorskip("diffusers")
    argv = ["--tiny", "--modes", "fused", "--repeat", "1", "--trajectory-steps", "0", "--skip-vae", "--skip-t5"]
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert run_script("speed", argv, tmp_path / "with", monkeypatch) == 0
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags  # restored
    result = json.loads((tmp_path / "with" / "speed_5b_tiny.json").read_text())
    for entry in (result["reference_eager"], result["modes"]["fused"]):
        error = entry["step_rel_l2_vs_fp32"]
        assert isinstance(error, float) and math.isfinite(error) and error < 1e-4
    assert result["modes"]["fused"]["step_rel_l2_vs_reference"] < 1e-4
    assert result["fp32_truth"]["step_ms"] > 0 and result["fp32_truth"]["tf32"] is False
    table = capsys.readouterr().out
    assert "1-step err vs fp32" in table and "| fp32 truth" in table

    assert run_script("speed", [*argv, "--no-fp32-truth"], tmp_path / "without", monkeypatch) == 0
    result = json.loads((tmp_path / "without" / "speed_5b_tiny.json").read_text())
    assert "fp32_truth" not in result
    assert "step_rel_l2_vs_fp32" not in result["reference_eager"]
    assert "step_rel_l2_vs_fp32" not in result["modes"]["fused"]
    assert "step_rel_l2_vs_reference" in result["modes"]["fused"]

    # A truth that fails (out of memory) is recorded; the modes still run, and the exit status says so.
    speed = __import__("speed")
    fail_on_call(monkeypatch, speed, "fp32_step", 1, RuntimeError("CUDA out of memory"))
    assert run_script("speed", [*argv, "--no-reference"], tmp_path / "failed", monkeypatch) == 1
    result = json.loads((tmp_path / "failed" / "speed_5b_tiny.json").read_text())
    assert result["fp32_truth"] == {"error": "RuntimeError: CUDA out of memory"}
    assert result["modes"]["fused"]["step_ms"] > 0 and "step_rel_l2_vs_fp32" not in result["modes"]["fused"]


def test_speed_times_the_attention_kernels_and_emulates_sage_on_the_cpu(tmp_path, monkeypatch, capsys):
    # On the CPU the CUDA kernels' places are taken by the math SDPA and sage's emulation, labelled so, and
    # the sage modes run the emulation. The mode without compile here: compiling takes too long for a test.
    speed = __import__("speed")
    monkeypatch.setitem(speed.MODES, "sage", dict(attention="sage"))
    argv = ["--tiny", "--modes", "sage", "--attention-kernels", "--repeat", "1", "--trajectory-steps", "0",
            "--no-reference", "--skip-vae", "--skip-t5"]  # fmt: skip
    assert run_script("speed", argv, tmp_path, monkeypatch) == 0
    result = json.loads((tmp_path / "speed_5b_tiny.json").read_text())
    kernels = result["attention_kernels"]
    assert kernels["shape"] == [2, 2, 226 + 3 * 4 * 6, 64]  # CFG batch, heads, text + video tokens, head_dim
    assert kernels["sdpa_math (cpu)"]["rel_l2_vs_fp32"] < 1e-6 and kernels["sdpa_math (cpu)"]["tflops"] > 0
    assert 1e-3 < kernels["sage_emulated (cpu)"]["rel_l2_vs_fp32"] < 2e-2  # 8 bits: not exact, not far
    mode = result["modes"]["sage"]
    assert mode["options"]["attention"] == "sage-emulated" and mode["note"].startswith("no CUDA")
    assert 0 < mode["step_rel_l2_vs_fp32"] < 1e-2
    table = capsys.readouterr().out
    assert "sage-emulated attention" in table and "| sage_emulated (cpu) |" in table


def test_compile_error_reports_the_three_errors(tmp_path, monkeypatch):
    argv = ["--tiny", "--layers", "1", "--frames", "5", "--height", "32", "--width", "48"]
    assert run_script("compile_error", argv, tmp_path, monkeypatch) == 0
    result = json.loads((tmp_path / "compile_error_1l_tiny.json").read_text())
    for key in ("eager_bf16_vs_fp32", "compiled_bf16_vs_fp32", "compiled_vs_eager_bf16"):
        assert 0 < result[key] < 0.05, (key, result[key])  # bf16 noise of one block, not zero: bf16 ran
    assert set(result["seconds"]) == {"fp32", "eager_bf16", "compiled_bf16"}


def test_exact_trajectory_follows_the_reference_bit_for_bit_in_eager_mode(tmp_path, monkeypatch, capsys):
    # Our uncompiled exact path runs the reference's arithmetic: the whole run gives its latents bit for bit,
    # while the fp32 run, and the reference with another attention kernel, are bf16 noise away from it.
    argv = ["--tiny", "--layers", "1", "--steps", "3", "--every", "2", "--runs", "eager,reference,truth,reference_alt"]
    assert run_script("exact_trajectory", argv, tmp_path, monkeypatch) == 0
    runs = json.loads((tmp_path / "exact_trajectory_5b_1l_tiny.json").read_text())["runs"]
    assert list(runs) == ["reference", "eager", "truth", "reference_alt"]  # the reference first, then as asked
    assert runs["eager"]["vs_reference"] == {"2": 0.0, "3": 0.0}
    assert 0 < runs["truth"]["vs_reference"]["3"] < 0.05 and runs["eager"]["vs_truth"] == runs["reference"]["vs_truth"]
    assert runs["reference_alt"]["attention"] == "math" and 0 < runs["reference_alt"]["vs_reference"]["3"] < 0.05
    assert "| eager | " in capsys.readouterr().out


def test_speed_writes_its_json_as_each_mode_is_measured(tmp_path, monkeypatch):
    # A run killed after the first mode (here: the second mode interrupts it) still leaves the first's figures.
    speed = __import__("speed")
    fail_on_call(monkeypatch, speed.fast, "apply", 2, KeyboardInterrupt())
    argv = ["--tiny", "--modes", "fused,compile", "--repeat", "1", "--trajectory-steps", "0", "--no-reference",
            "--skip-vae", "--skip-t5"]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_script("speed", argv, tmp_path, monkeypatch)
    result = json.loads((tmp_path / "speed_5b_tiny.json").read_text())
    assert list(result["modes"]) == ["fused"] and result["modes"]["fused"]["step_ms"] > 0


def test_core_full_size_keeps_our_figures_when_the_reference_is_cut_short(tmp_path, monkeypatch):
    core = __import__("core_full_size")
    fail_on_call(monkeypatch, core, "timed", 2, KeyboardInterrupt())  # the reference's timing
    with pytest.raises(KeyboardInterrupt):
        run_script("core_full_size", ["--tiny", "--steps", "1", "--repeat", "1"], tmp_path, monkeypatch)
    result = json.loads((tmp_path / "core_full_size_5b_tiny.json").read_text())
    assert result["end_to_end"]["denoise"] > 0 and result["ours_step_ms"] > 0
    assert "reference_step_ms" not in result


def test_memory_keeps_the_runs_it_finished(tmp_path, monkeypatch):
    memory = __import__("memory")
    fail_on_call(monkeypatch, memory, "run_once", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        argv = ["--tiny", "--variant", "5b", "--steps", "2", "--modes", "none,model"]
        run_script("memory", argv, tmp_path, monkeypatch)
    result = json.loads((tmp_path / "memory_5b_tiny.json").read_text())
    assert list(result["runs"]) == ["none"] and result["runs"]["none"]["latents_equal_to_first_run"]


def test_finetune_memory_keeps_our_case_when_the_reference_is_cut_short(tmp_path, monkeypatch):
    finetune = __import__("finetune_memory")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "run_reference_lora", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_script("finetune_memory", ["--tiny", "--mode", "lora"], tmp_path, monkeypatch)
    report = json.loads((tmp_path / "finetune_memory.json").read_text())
    assert [c["mode"] for c in report["cases"]] == ["lora"] and report["cases"][0]["s_per_step"] > 0


def test_finetune_memory_offloads_activations_in_our_cases(tmp_path, monkeypatch):
    from cogvideox.models import transformer as transformer_module

    used = []
    real = transformer_module.HostSaves
    monkeypatch.setattr(transformer_module, "HostSaves", lambda model: used.append(1) or real(model))
    argv = ["--tiny", "--offload-activations", "--no-reference"]
    assert run_script("finetune_memory", argv, tmp_path, monkeypatch) == 0
    report = json.loads((tmp_path / "finetune_memory.json").read_text())
    assert [(c["mode"], c["offload_activations"]) for c in report["cases"]] == [("lora", True), ("full", True)]
    assert used


def test_finetune_memory_groups_live_blocks_by_the_code_that_allocated_them():
    finetune = __import__("finetune_memory")

    def block(size, *files, state="active_allocated"):
        return {"size": size, "state": state, "frames": [{"filename": f, "line": 7, "name": "f"} for f in files]}

    snapshot = {"segments": [
        {"blocks": [block(3e9), block(2e9, "torch/nn/functional.py", "src/cogvideox/models/host_saves.py")]},
        {"blocks": [block(1.5e9, "src/cogvideox/models/host_saves.py"), block(5e9, "x.py", state="inactive"),
                    block(0.5e9, "torch/autograd/graph.py")]},
    ]}
    assert finetune.live_by_origin(snapshot) == [
        {"origin": "before the trace", "gb": 3.0, "blocks": 1},  # no frames: allocated before the history
        {"origin": "host_saves.py:7 f <- functional.py:7 f", "gb": 2.0, "blocks": 1},  # ours, and the innermost
        {"origin": "host_saves.py:7 f", "gb": 1.5, "blocks": 1},  # ours is the innermost frame
        {"origin": "graph.py:7 f", "gb": 0.5, "blocks": 1},  # none of ours: the innermost frame
    ]  # the freed (inactive) block is not counted
    outermost_first = {"size": 1e9, "state": "active_allocated", "frames": [
        {"filename": "finetune_memory.py", "line": 1, "name": "<module>"},
        {"filename": "src/cogvideox/models/transformer.py", "line": 2, "name": "forward"},
        {"filename": "torch/nn/functional.py", "line": 3, "name": "linear"}]}
    got = finetune.live_by_origin({"segments": [{"blocks": [outermost_first]}]})
    assert got[0]["origin"] == "transformer.py:2 forward <- functional.py:3 linear"


def test_finetune_memory_traces_what_is_live_after_the_forward_pass(monkeypatch):
    # The trace runs on a GPU only: here the allocator's functions are stand-ins, to check the bookkeeping.
    import types

    import torch

    finetune = __import__("finetune_memory")
    history, allocated = [], {"now": 0}
    snapshot = {"segments": [{"blocks": [{"size": 3e9, "state": "active_allocated", "frames": []}]}]}
    for name, fake in {
        "synchronize": lambda *a: None,
        "reset_peak_memory_stats": lambda *a: allocated.update(peak=allocated["now"]),
        "memory_allocated": lambda *a: allocated["now"],
        "max_memory_allocated": lambda *a: allocated["peak"],
    }.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda enabled=None, **k: history.append(enabled))
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: snapshot)

    def step(i, after_forward=None):
        allocated.update(now=5e9, peak=7e9)  # the forward pass
        after_forward()
        allocated.update(now=2e9, peak=9e9)  # the backward pass

    model = types.SimpleNamespace(offload_stats={"copied": 84, "copied_bytes": 9.2e9, "kept_bytes": 1e6})
    case, saved = {"mode": "lora"}, []
    finetune.memory_trace(step, model, torch.device("cuda"), 4, case, lambda: saved.append(1))
    assert history == ["state", None] and saved  # the history on for the step, then off; the case saved
    assert case["memory_trace"] == {
        "after_forward_gb": 5.0, "forward_peak_gb": 7.0, "step_peak_gb": 9.0,
        "live_after_forward": [{"origin": "before the trace", "gb": 3.0, "blocks": 1}],
        "offload": {"copied": 84, "copied_gb": 9.2, "kept_gb": 0.001},
    }


def test_finetune_memory_compiles_after_the_lora_and_records_a_case_that_fails(tmp_path, monkeypatch):
    # The compilation itself is tested in test_fast_compile; here, what the script compiles and when, and
    # that a case whose compilation fails is recorded while the others are measured.
    finetune = __import__("finetune_memory")
    from cogvideox.train.lora import lora_layers

    compiled = []

    def compile_blocks(model, **options):
        compiled.append(len(lora_layers(model)))
        if len(compiled) == 2:
            raise RuntimeError("Cannot find a working triton installation")
        return len(model.transformer_blocks)

    monkeypatch.setattr(finetune, "compile_blocks", compile_blocks)
    argv = ["--tiny", "--compile", "--no-reference"]
    assert run_script("finetune_memory", argv, tmp_path, monkeypatch) == 1  # exits non-zero, naming the failure
    report = json.loads((tmp_path / "finetune_memory.json").read_text())
    lora, full = report["cases"]
    assert compiled == [8, 0]  # the LoRA's 8 layers were in place before the blocks were compiled
    assert lora["mode"] == "lora" and lora["compiled"] and lora["graphs"] == 0 and lora["graphs_after_warmup"] == 0
    assert lora["warmup_s"] > 0 and lora["s_per_step"] > 0  # the compiling step, apart from the steady ones
    assert full == {"mode": "full", "error": "RuntimeError: Cannot find a working triton installation"}
    assert report["compile"]


def test_finetune_memory_keeps_the_steps_it_finished(tmp_path, monkeypatch, capsys):
    # A time cap during the second timed step of full fine-tuning: the warm-up's peak (a GPU's, faked on
    # the CPU) judged against 5B's target, the first step's time and optimizer time are in the JSON, and
    # each step had its line.
    finetune = __import__("finetune_memory")
    monkeypatch.setattr(finetune, "memory_figures", lambda device: {"peak_gb": 39.5, "peak_reserved_gb": 41.0})
    fail_on_call(monkeypatch, finetune.CPUOffloadAdamW, "step", 3, KeyboardInterrupt())  # warm-up, 1, 2
    with pytest.raises(KeyboardInterrupt):
        run_script("finetune_memory", ["--tiny", "--mode", "full"], tmp_path, monkeypatch)
    [case] = json.loads((tmp_path / "finetune_memory.json").read_text())["cases"]
    assert case["mode"] == "full" and case["steps_timed"] == 1 and case["warmup_s"] > 0
    assert case["peak_gb"] == 39.5 and case["target_gb"] == 40.0 and case["meets_target"]
    assert 0 < case["optimizer_s"] < case["s_per_step"]
    out = capsys.readouterr().out
    assert "full warm-up: " in out and "full step 1/2: " in out and "full step 2/2" not in out


def test_parallel_per_rank_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    parallel = __import__("parallel_per_rank")
    # The third row's first part (three timings a row: the CPU has no cuDNN kernel to time).
    fail_on_call(monkeypatch, parallel, "timed", 7, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_script("parallel_per_rank", ["--tiny", "--repeats", "1"], tmp_path, monkeypatch)
    result = json.loads((tmp_path / "parallel_per_rank.json").read_text())
    assert [row["ways"] for row in result["rows"]] == [1, 2]


def test_parallel_per_rank_checks_each_ring_kernel_against_sdpa(tmp_path, monkeypatch):
    # The CPU has no cuDNN kernel: its columns are None with the reason, the flash kernel's error is tiny.
    assert run_script("parallel_per_rank", ["--tiny", "--ways", "1,2,4", "--repeats", "1"], tmp_path, monkeypatch) == 0
    rows = json.loads((tmp_path / "parallel_per_rank.json").read_text())["rows"]
    assert len(rows) == 6
    for row in rows:
        assert row["attention_ms"] > 0 and row["ring_attention_ms"] > 0 and row["layer_ms"] > 0
        assert 0 <= row["ring_rel_l2"] < 1e-5
        assert row["ring_cudnn_attention_ms"] is None and row["ring_cudnn_rel_l2"] is None
        assert row["ring_cudnn_error"] == "no cuDNN attention kernel for cpu float32"


def test_parallel_per_rank_records_a_failing_cudnn_kernel(tmp_path, monkeypatch):
    # On a GPU the cuDNN call may fail for some shapes: the row says why and the run goes on. A kernel that
    # works (here the CPU flash kernel stands in for it) gets its time and its error against SDPA.
    parallel = __import__("parallel_per_rank")
    real = parallel.ring.fused_kernel

    def cudnn_stand_in(q, k, v, scale):
        if q.shape[0] == 1:
            raise RuntimeError("cuDNN Frontend error: no execution plan")
        return real(q)(q, k, v, scale)

    def fused_kernel(q, prefer="flash"):
        return cudnn_stand_in if prefer == "cudnn" else real(q, prefer)

    monkeypatch.setattr(parallel.ring, "fused_kernel", fused_kernel)
    assert run_script("parallel_per_rank", ["--tiny", "--ways", "1,2", "--repeats", "1"], tmp_path, monkeypatch) == 0
    rows = json.loads((tmp_path / "parallel_per_rank.json").read_text())["rows"]
    assert [(row["batch"], row["ways"]) for row in rows] == [(2, 1), (2, 2), (1, 1), (1, 2)]
    for row in rows[:2]:
        assert row["ring_cudnn_attention_ms"] > 0 and 0 <= row["ring_cudnn_rel_l2"] < 1e-5
        assert "ring_cudnn_error" not in row
    for row in rows[2:]:
        assert row["ring_cudnn_attention_ms"] is None and row["ring_cudnn_rel_l2"] is None
        assert row["ring_cudnn_error"] == "RuntimeError: cuDNN Frontend error: no execution plan"
        assert row["ring_attention_ms"] > 0 and row["ring_rel_l2"] < 1e-5


def test_gpu_wheels_runs_in_a_git_worktree(tmp_path):
    # In a worktree .git is a file: the script once appended to .git/info/exclude there and stopped (set -e).
    def git(*args, cwd):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                       capture_output=True)  # fmt: skip

    main, tree = tmp_path / "main", tmp_path / "tree"
    (main / "scripts").mkdir(parents=True)
    shutil.copy(BENCHMARKS.parent / "scripts" / "gpu-wheels.sh", main / "scripts")
    git("init", "-q", cwd=main)
    git("add", ".", cwd=main)
    git("commit", "-q", "-m", "x", cwd=main)
    git("worktree", "add", "-q", str(tree), cwd=main)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text('#!/bin/sh\nmkdir -p .whl && echo "$@" > .whl/args\n')  # no network here
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "scripts/gpu-wheels.sh"], cwd=tree, env=env, capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "diffusers==0.42.1" in (tree / ".whl" / "args").read_text()
    assert "sageattention==1.0.6" in (tree / ".whl" / "args").read_text()
    assert "/.whl/" in (main / ".git" / "info" / "exclude").read_text().splitlines()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True, check=True)
    assert ".whl" not in status.stdout


def test_memory_records_a_failing_mode_and_runs_the_next(tmp_path, monkeypatch):
    memory = __import__("memory")
    fail_on_call(monkeypatch, memory, "run_once", 2, RuntimeError("CUDA out of memory"))
    argv = ["--tiny", "--variant", "5b", "--steps", "2", "--modes", "none,stream,sequential"]
    assert run_script("memory", argv, tmp_path, monkeypatch) == 1
    runs = json.loads((tmp_path / "memory_5b_tiny.json").read_text())["runs"]
    assert runs["stream"] == {"error": "RuntimeError: CUDA out of memory"}
    assert runs["sequential"]["latents_equal_to_first_run"] and runs["sequential"]["total_50_over_none"] > 0


def test_speed_without_diffusers_still_measures_our_modes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as on a machine without it: import fails
    argv = ["--tiny", "--modes", "fused", "--repeat", "1", "--trajectory-steps", "0", "--skip-t5",
            "--vae-variants", "reference_whole,ours_whole,ours_conv2d_whole"]  # fmt: skip
    assert run_script("speed", argv, tmp_path, monkeypatch) == 0
    result = json.loads((tmp_path / "speed_5b_tiny.json").read_text())
    assert result["reference"] == "diffusers not installed" and result["modes"]["fused"]["step_ms"] > 0
    vae = result["vae_decode"]
    assert list(vae) == ["ours_whole", "ours_conv2d_whole"] and vae["ours_whole"]["ms"] > 0
    assert 0 < vae["ours_conv2d_whole"]["rel_l2_vs_ours"] < 1e-5  # the lever's error, recorded with it


def test_gpu_session_runs_only_the_steps_named_packs_them_and_survives_a_failed_install(tmp_path):
    # A follow-up call on a still-warm machine reruns a few steps, not the whole session; a machine that
    # returns only a few files gets everything in one archive; a failed install of .whl/ only loses the
    # reference comparisons (it once ended the session at once).
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(BENCHMARKS / "gpu_session.sh", tmp_path / "benchmarks")
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "broken-1.0-py3-none-any.whl").write_text("not a zip")
    python = tmp_path / "python"  # pip fails (as without network or pip); everything else runs as usual
    python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 1\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python), "OUT": str(tmp_path / "out"), "TINY": "1",
           "STEPS": "parallel-5b,core-2b", "PACK": str(tmp_path / "results.tgz")}  # fmt: skip
    done = subprocess.run(["bash", str(tmp_path / "benchmarks" / "gpu_session.sh"), "0"], env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wheel install failed" in done.stderr
    steps = [json.loads(line) for line in (tmp_path / "out" / "session.jsonl").read_text().splitlines()]
    assert sorted(s["step"] for s in steps) == ["core-2b", "parallel-5b"]  # in the session's order
    assert all(s["status"] == "skipped" for s in steps)  # a budget of 0 s: every step skipped
    with tarfile.open(tmp_path / "results.tgz") as archive:
        assert "./env.txt" in archive.getnames()


def test_kernel_profile_sorts_kernels_into_categories():
    category = __import__("kernel_profile").category
    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>": "copy / layout",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>": "copy / layout",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16>": "norm",
        "triton_poi_fused__to_copy_add_convert_element_type_mul_0": "elementwise / other",
        "triton_red_fused_native_layer_norm_1": "norm",
        "triton_red_fused__to_copy_abs_amax_clamp_div_native_layer_norm_2": "quantize",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise / other",
        "Memcpy DtoD (Device -> Device)": "memcpy",
        "aten::mkldnn_convolution": "convolution",
    }  # fmt: skip
    assert {name: category(name) for name in names} == names


def test_kernel_profile_writes_each_target_and_records_a_failing_one(tmp_path, monkeypatch):
    profile = __import__("kernel_profile")
    fail_on_call(monkeypatch, profile.fast, "vae_conv2d", 1, RuntimeError("no 2D kernel"))
    assert run_script("kernel_profile", ["--tiny", "--targets", "vae_conv2d,vae"], tmp_path, monkeypatch) == 1
    result = json.loads((tmp_path / "kernel_profile_5b_tiny.json").read_text())
    assert list(result["targets"]) == ["vae_conv2d", "vae"]
    assert "no 2D kernel" in result["targets"]["vae_conv2d"]["error"]
    vae = result["targets"]["vae"]
    assert vae["categories"]["convolution"]["share"] > 0.2 and len(vae["top_kernels"]) == 25
    assert abs(sum(c["share"] for c in vae["categories"].values()) - 1) < 1e-3
    assert "| convolution |" in (tmp_path / "kernel_profile_vae.txt").read_text()


def test_riflex_demo_tells_a_restarting_video_from_a_continuous_one():
    from riflex_demo import positions, restarts

    def video(rows):  # a white 6x6 square on gray at each top row, 64x96 frames
        frames = np.full((len(rows), 64, 96, 3), 128, np.uint8)
        for i, top in enumerate(rows):
            frames[i, top : top + 6, 40:46] = 255
        return frames

    up = list(range(50, 10, -4))  # 10 frames moving up
    assert np.allclose(positions(video(up))[:, 1], np.array(up) + 2.5)
    assert not restarts(video(up + list(range(10, 2, -4))), "up")
    assert restarts(video(up + up), "up")  # back at the bottom, then up again
    assert not restarts(video(up + up), "down")  # its jump is along the motion; its steps back are small


def test_cpu_activations_measures_each_stage_and_tabulates_them(tmp_path, monkeypatch, capsys):
    """Each stage's row comes from a child process (`--one STAGE`), run here in this process: a fresh one
    would spend most of the test importing torch and transformers."""
    import torch

    from cogvideox.autoencoder import VideoAutoencoder
    from cogvideox.fast.memory_plan import decode_bytes

    cpu_activations = __import__("cpu_activations")
    children = []

    def child(command, **kwargs):
        assert command[1] == cpu_activations.__file__ and command[-2] == "--one"
        children.append(command[-1])
        row = cpu_activations.measure(command[-1], None, 9, 64, 96)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(row) + "\n", stderr="")

    monkeypatch.setattr(cpu_activations.subprocess, "run", child)
    assert run_script("cpu_activations", ["--size", "9x64x96"], tmp_path, monkeypatch) == 0
    assert children == ["denoise", "decode"]
    rows = json.loads((tmp_path / "cpu_activations.json").read_text())
    assert [r["stage"] for r in rows] == children and all(r["dtype"] == "torch.float32" for r in rows)
    vae = VideoAutoencoder.from_pretrained().vae
    assert rows[1]["estimate_gib"] == round(decode_bytes(vae, 1, 64, 96, torch.float32, tiled=False) / 2**30, 3)
    assert rows[1]["measured_gib"] > 0 and rows[0]["estimate_gib"] > 0
    assert "measured GiB" in capsys.readouterr().out
