"""`fast.apply` / `Pipeline.accelerate` and the `generate` flags --quantize, --attention, --compile, --cache: the
levers reach the pipeline, the output stays close to the exact one, and mistakes are one-line user errors."""

import pytest
import torch
from test_fast_fuse import tiny_transformer

from cogvideox import InputError, Pipeline
from cogvideox.cli import main
from cogvideox.fast import Acceleration, apply, check_options
from cogvideox.fast.quantize import Int8WeightOnlyLinear
from cogvideox.video import read_video

CALL = dict(num_frames=9, height=32, width=48, num_inference_steps=4, max_sequence_length=16,
            output_type="latent", progress=False, seed=0)  # fmt: skip


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_accelerated_pipeline_stays_close_to_exact(tiny_rope_dir):
    exact = Pipeline.from_pretrained(tiny_rope_dir)
    assert exact.acceleration is None
    want = exact("a cat", **CALL).latents

    fused = Pipeline.from_pretrained(tiny_rope_dir).accelerate()  # fused QKV + auto attention
    assert rel_l2(fused("a cat", **CALL).latents, want) < 1e-5

    pipe = Pipeline.from_pretrained(tiny_rope_dir).accelerate(quantize="int8", cache=0.0)
    record = pipe.acceleration
    assert isinstance(record, Acceleration) and record.quantize == "int8" and record.fuse_qkv
    assert isinstance(pipe.transformer.transformer_blocks[1].ff.net[2], Int8WeightOnlyLinear)
    assert rel_l2(pipe("a cat", **CALL).latents, want) < 2e-2
    assert record.cache.computed == record.cache.calls == 4

    with pytest.raises(InputError, match="already accelerated"):
        pipe.accelerate(cache=0.1)


def test_option_checks():
    with pytest.raises(InputError, match="compute capability 8.9"):
        check_options("cpu", quantize="fp8")
    with pytest.raises(InputError, match="unknown compile mode 'fastest'"):
        check_options("cpu", compile="fastest")
    with pytest.raises(InputError, match="unknown attention backend"):
        check_options("cpu", attention="xformers")
    with pytest.raises(InputError, match="the sage attention backend needs a CUDA GPU"):
        check_options("cpu", attention="sage")
    check_options("cpu", quantize="int8", compile=True, cache=0.1, attention="auto")  # all fine on a CPU
    with pytest.raises(TypeError, match="a Pipeline or a CogVideoXTransformer"):
        apply(torch.nn.Linear(2, 2))
    assert apply(tiny_transformer(), fuse_qkv=False, attention=None).describe() == "none"


def no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded before the options were checked")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without an fp8-capable GPU")
def test_fp8_without_a_capable_gpu_exits_2_before_loading(capsys, monkeypatch, tiny_rope_dir):
    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--quiet", "--quantize", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("cogvideox: error: --quantize fp8 needs an NVIDIA GPU of compute capability 8.9 or newer")


@pytest.mark.parametrize("kernel", ["sage", "fa3"])
def test_gpu_attention_kernels_on_the_cpu_exit_2_before_loading(capsys, monkeypatch, tiny_rope_dir, kernel):
    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    assert main(["generate", "a cat", "--model", str(tiny_rope_dir), "--quiet", "--attention", kernel]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cogvideox: error: the {kernel} attention backend needs a CUDA GPU")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
        (["--attention", "xformers"], "argument --attention: invalid choice: 'xformers'"),
        (["--cache", "-0.5"], "argument --cache: expected a finite number >= 0, got -0.5"),
        (["--cache", "fast"], "argument --cache: expected a number >= 0, got 'fast'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(capsys, monkeypatch, tiny_rope_dir, extra, message):
    monkeypatch.setattr(Pipeline, "from_pretrained", no_loading)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "a cat", "--model", str(tiny_rope_dir), "--quiet", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_generate_with_int8_and_the_cache_reports_steps(capsys, tiny_rope_dir, tmp_path):
    output = tmp_path / "cat.mp4"
    argv = ["generate", "a cat", "--model", str(tiny_rope_dir), "--output", str(output), "--quiet",
            "--steps", "6", "--height", "32", "--width", "48", "--seed", "3", "--max-sequence-length", "16",
            "--quantize", "int8", "--cache", "0.3"]  # fmt: skip
    assert main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"wrote {output} (9 frames, 48x32, 8 fps, seed 3) | load ")
    computed = int(last.split("| cache 0.3: ")[1].split("/")[0])
    assert last.endswith("/6 steps computed") and 1 <= computed <= 6
    frames, _ = read_video(output)
    assert frames.shape == (9, 32, 48, 3)


def test_fp8_is_checked_against_the_compute_device_not_where_weights_rest(monkeypatch, tiny_rope_dir):
    """With offloading the weights rest in host memory while a capable GPU computes: fp8 must be accepted.
    On the CPU the capability check is replaced by one that says yes for CUDA alone."""
    import cogvideox.fast.quantize as quantize
    from cogvideox.fast.quantize import Fp8Linear

    monkeypatch.setattr(quantize, "fp8_supported", lambda device: torch.device(device).type == "cuda")
    model = tiny_transformer().to(torch.bfloat16)
    with pytest.raises(InputError, match="compute capability 8.9"):
        apply(model, quantize="fp8", attention=None)  # default: where the parameters are, the CPU
    record = apply(model, quantize="fp8", attention=None, device="cuda")
    assert record.quantize == "fp8"
    assert isinstance(model.transformer_blocks[0].ff.net[2], Fp8Linear)
    assert model.transformer_blocks[0].ff.net[2].weight.device.type == "cpu"  # rewritten where it rests

    # Pipeline.accelerate passes its compute device (the offload device), not the parameters' device.
    pipe = Pipeline.from_pretrained(tiny_rope_dir, dtype="bf16")
    monkeypatch.setattr(Pipeline, "device", property(lambda self: torch.device("cuda")))
    pipe.accelerate(quantize="fp8", attention=None)
    assert pipe.acceleration.quantize == "fp8"
    assert isinstance(pipe.transformer.transformer_blocks[0].ff.net[2], Fp8Linear)
