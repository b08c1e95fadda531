"""`cogvideox convert`: a SAT checkpoint becomes a model folder in the diffusers layout, readable by us and
by the reference, with the checkpoint's weights."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_sat_checkpoint

from cogvideox import Pipeline
from cogvideox.cli import main


@pytest.fixture(scope="module")
def sat_checkpoint(tiny_rope_dir, tmp_path_factory):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    transformer, vae = make_sat_checkpoint(pipe, tmp_path_factory.mktemp("sat"))
    return pipe, transformer, vae


def assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_writes_the_diffusers_layout(sat_checkpoint, tiny_rope_dir, tmp_path, capsys):
    tuned, transformer, vae = sat_checkpoint
    out = tmp_path / "converted"
    argv = ["convert", str(transformer), "--vae", str(vae), "--base", str(tiny_rope_dir), "-o", str(out)]
    assert main([*argv, "--dtype", "fp32"]) == 0
    assert f"wrote {out} (diffusers layout, fp32; transformer and VAE converted)" in capsys.readouterr().out
    ours = Pipeline.from_pretrained(out)
    assert_same_weights(ours.transformer, tuned.transformer)
    assert_same_weights(ours.vae, tuned.vae)

    # The reference reads the folder too, and finds the same tensors.
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.CogVideoXPipeline.from_pretrained(str(out), torch_dtype=torch.float32)
    theirs = reference.transformer.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in tuned.transformer.state_dict().items())


def test_convert_transformer_only_keeps_the_base_vae_in_bf16(sat_checkpoint, tiny_rope_dir, tmp_path):
    tuned, transformer, _ = sat_checkpoint
    out = tmp_path / "converted"
    assert main(["convert", str(transformer), "--base", str(tiny_rope_dir), "--output", str(out)]) == 0
    ours = Pipeline.from_pretrained(out, dtype="fp32")
    base = Pipeline.from_pretrained(tiny_rope_dir)
    assert_same_weights(ours.vae, base.vae)
    # Written in bf16 by default, the released weights' precision.
    want = tuned.transformer.proj_out.weight.to(torch.bfloat16).float()
    assert torch.equal(ours.transformer.proj_out.weight, want)


def test_a_vae_only_checkpoint_says_the_transformer_came_from_the_base(
    sat_checkpoint, tiny_rope_dir, tmp_path, capsys
):
    """A file meant as a transformer that holds only a VAE (3d-vae.pt) must not pass for a converted model."""
    tuned, _, vae = sat_checkpoint
    out = tmp_path / "converted"
    assert main(["convert", str(vae), "--base", str(tiny_rope_dir), "--output", str(out), "--dtype", "fp32"]) == 0
    said = capsys.readouterr().out
    assert f"VAE converted; transformer copied from {tiny_rope_dir}" in said
    ours = Pipeline.from_pretrained(out)
    assert_same_weights(ours.vae, tuned.vae)
    assert_same_weights(ours.transformer, Pipeline.from_pretrained(tiny_rope_dir).transformer)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--output", "EXISTING"], "already exists and is not empty"),
        (["--dtype", "int4"], "unknown dtype 'int4'"),
        (["--vae", "/no/such/vae.pt"], "no SAT checkpoint at /no/such/vae.pt"),
    ],
)
def test_mistakes_exit_2_with_one_line(sat_checkpoint, tiny_rope_dir, tmp_path, capsys, extra, message):
    _, transformer, _ = sat_checkpoint
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "file").write_text("x")
    extra = [str(existing) if e == "EXISTING" else e for e in extra]
    argv = ["convert", str(transformer), "--base", str(tiny_rope_dir), "--output", str(tmp_path / "new"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cogvideox: error: ") and message in err
    assert not (tmp_path / "new").exists()


def test_missing_checkpoint_and_help(tiny_rope_dir, tmp_path, capsys):
    missing = ["convert", str(tmp_path / "none.pt"), "--base", str(tiny_rope_dir), "-o", str(tmp_path / "o")]
    assert main(missing) == 2
    assert "no SAT checkpoint at" in capsys.readouterr().err
    result = subprocess.run(
        [sys.executable, "-m", "cogvideox", "convert", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in ["--output", "--base", "--vae", "--dtype", "--trust-pickle", "--offline"]:
        assert flag in text


@pytest.mark.parametrize("given", ["", "transformer"], ids=["model folder", "component folder"])
def test_a_folder_in_the_diffusers_layout_is_named_as_such(tiny_rope_dir, tmp_path, capsys, given):
    """Converting what needs no conversion said the folder was no SAT checkpoint folder, and to give a .pt
    file; it says the folder is in the diffusers layout already."""
    checkpoint = tiny_rope_dir / given if given else tiny_rope_dir
    argv = ["convert", str(checkpoint), "--base", str(tiny_rope_dir), "-o", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"cogvideox: error: {checkpoint} is in the diffusers layout already (a model folder or one of "
                   "its components), not a SAT checkpoint: there is nothing to convert; give its model folder as "
                   "the model (--model)\n")
    assert not (tmp_path / "o").exists()


def test_convert_keeps_the_base_sampling_settings(sat_checkpoint, tiny_rope_dir, tmp_path):
    """The base's sampling.json (its recommended guidance) comes along, as its T5 and scheduler do."""
    _, transformer, vae = sat_checkpoint
    base = shutil.copytree(tiny_rope_dir, tmp_path / "base")
    (base / "sampling.json").write_text(json.dumps({"guidance_scale": 2.5}))
    out = tmp_path / "converted"
    assert main(["convert", str(transformer), "--vae", str(vae), "--base", str(base), "-o", str(out)]) == 0
    assert json.loads((out / "sampling.json").read_text()) == {"guidance_scale": 2.5}
    assert Pipeline.from_pretrained(out).sampling_defaults["guidance_scale"] == 2.5


def test_a_file_of_random_bytes_is_named_not_a_checkpoint(tiny_rope_dir, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    assert main(["convert", str(garbage), "--base", str(tiny_rope_dir), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"cogvideox: error: cannot read {garbage}: not a PyTorch checkpoint (UnpicklingError: ")
    assert not (tmp_path / "o").exists()


def test_an_interrupted_convert_leaves_no_folder_behind(sat_checkpoint, tiny_rope_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the weights are written leaves nothing at --output (a half-written model folder was
    refused by the next try as 'not empty'); the next try writes the model."""
    from cogvideox import weights
    from cogvideox.files import umask

    _, transformer, vae = sat_checkpoint
    out = tmp_path / "models" / "converted"
    argv = ["convert", str(transformer), "--vae", str(vae), "--base", str(tiny_rope_dir), "-o", str(out)]
    save = weights.save_weights
    calls = []

    def interrupted(module, folder, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the transformer written, the VAE not
        return save(module, folder, **kwargs)

    monkeypatch.setattr(weights, "save_weights", interrupted)
    assert main(argv) == 130
    assert "cogvideox: interrupted" in capsys.readouterr().err
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.setattr(weights, "save_weights", save)
    assert main([*argv, "--dtype", "fp32"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["converted"]
    assert (out / "model_index.json").is_file() and out.stat().st_mode & 0o777 == 0o777 & ~umask()
    Pipeline.from_pretrained(out)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a folder no file can be created in (Linux /proc)")
def test_an_output_that_cannot_be_written_fails_before_reading(sat_checkpoint, tiny_rope_dir, tmp_path, capsys, monkeypatch):
    from cogvideox import sat

    def no_reading(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr(sat, "read_state_dict", no_reading)
    _, transformer, _ = sat_checkpoint
    for output, message in [("/proc/converted", "cannot write /proc/converted: "),
                            (str(tmp_path / "file" / "sub"), f"cannot write {tmp_path / 'file' / 'sub'}: ")]:
        (tmp_path / "file").write_text("x")
        assert main(["convert", str(transformer), "--base", str(tiny_rope_dir), "-o", output]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("cogvideox: error: " + message), err


def test_a_full_disk_is_one_line_and_leaves_nothing(sat_checkpoint, tiny_rope_dir, tmp_path, capsys, monkeypatch):
    import errno

    from cogvideox import weights

    def full(module, folder, **kwargs):
        (folder / "part.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "save_weights", full)
    _, transformer, _ = sat_checkpoint
    out = tmp_path / "models" / "converted"
    assert main(["convert", str(transformer), "--base", str(tiny_rope_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"cogvideox: error: cannot write {out}: No space left on device; nothing was left there\n"
    assert list(out.parent.iterdir()) == []


def test_a_base_whose_weights_are_fp16_variants_converts_with_variant(sat_checkpoint, tiny_rope_dir, tmp_path, capsys):
    """A base holding only fp16 files for its transformer (one file) and T5 (shards): without --variant it
    is refused with the flag to give; with --variant fp16 those files are taken, and the written folder holds
    them under the plain names, so it loads without a variant. `Pipeline.from_sat(variant=)` reads it too."""
    from helpers import make_variant_model

    from cogvideox import LoadError
    from cogvideox.loading import folder_variants

    tuned, transformer, vae = sat_checkpoint
    base = make_variant_model(tiny_rope_dir, tmp_path / "base")
    (base / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (base / "text_encoder" / "model.safetensors").unlink()
    out = tmp_path / "converted"
    assert main(["convert", str(vae), "--base", str(base), "-o", str(out)]) == 2
    assert "found only the weights of the variant fp16; load them with variant='fp16' (--variant fp16)" in (
        capsys.readouterr().err)
    assert main(["convert", str(vae), "--base", str(base), "-o", str(out), "--variant", "fp16", "--dtype", "fp32"]) == 0
    assert f"VAE converted; transformer copied from {base}" in capsys.readouterr().out
    assert folder_variants(out) == []
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors.index.json"} <= names
    assert not any("fp16" in name for name in names)
    ours = Pipeline.from_pretrained(out)
    want = Pipeline.from_pretrained(base, variant="fp16")
    assert_same_weights(ours.transformer, want.transformer)
    assert_same_weights(ours.text_encoder.model, want.text_encoder.model)
    assert_same_weights(ours.vae, tuned.vae)

    with pytest.raises(LoadError, match=r"--variant fp16"):
        Pipeline.from_sat(vae, base)
    loaded = Pipeline.from_sat(transformer, base, vae=vae, variant="fp16")
    assert_same_weights(loaded.transformer, tuned.transformer)
    assert_same_weights(loaded.text_encoder.model, want.text_encoder.model)
