"""LoRA: the diffusers file layout both ways, several adapters with scales, fuse / unfuse, and --lora."""

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import assert_same_video, load_reference_pipeline, random_lora, run_reference
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cogvideox import InputError, Pipeline, read_video
from cogvideox.cli import main
from cogvideox.train import lora

pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' load_lora_weights needs it

SMALL = dict(num_frames=9, height=32, width=48, num_inference_steps=3, max_sequence_length=16)
TARGETS = [f"transformer.transformer_blocks.{i}.attn1.{m}" for i in (0, 1) for m in ("to_k", "to_out.0", "to_q", "to_v")]


@pytest.fixture(scope="module")
def lora_files(tiny_rope_dir, tmp_path_factory):
    """Two LoRA files for the tiny RoPE model: rank 4 / alpha 8 on q,k,v,out and rank 2 / alpha 1 on q,v."""
    root = tmp_path_factory.mktemp("loras")
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    random_lora(pipe.transformer, 4, 8.0, seed=1, name="one")
    random_lora(pipe.transformer, 2, 1.0, seed=2, name="two", targets=("to_q", "to_v"))
    return lora.save_lora(pipe.transformer, root / "one", name="one"), lora.save_lora(
        pipe.transformer, root / "two.safetensors", name="two"
    )


def transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, 6, generator=g)
    text = torch.randn(2, 16, 32, generator=g)
    return x, text, torch.tensor([999, 321])


def ours_out(transformer, inputs):
    x, text, t = inputs
    with torch.no_grad():
        return transformer(x, text, t, image_rotary_emb=transformer.rotary_embedding(3, 4, 6))


def reference_out(transformer, ours_transformer, inputs):
    x, text, t = inputs
    rotary = ours_transformer.rotary_embedding(3, 4, 6)
    with torch.no_grad():
        return transformer(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rotary,
                           return_dict=False)[0]


def test_file_layout(lora_files):
    one, two = lora_files
    assert one.name == "pytorch_lora_weights.safetensors" and two.name == "two.safetensors"
    with safe_open(one, "pt") as f:
        keys = sorted(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert f.get_tensor(keys[0]).shape == (4, 32)  # A: [rank, in]
    assert keys == sorted(f"{t}.lora_{ab}.weight" for t in TARGETS for ab in "AB")
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8.0
    assert sorted(meta["transformer.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]


def test_our_lora_in_the_reference_pipeline_gives_the_same_video(tiny_rope_dir, lora_files):
    one, _ = lora_files
    prompt = "a cat sits on the mat"
    ours = Pipeline.from_pretrained(tiny_rope_dir, lora=(one, 0.8))
    out = ours(prompt, seed=3, **SMALL)
    ref = load_reference_pipeline(tiny_rope_dir)
    ref.load_lora_weights(str(one.parent), adapter_name="one")
    ref.set_adapters(["one"], [0.8])
    latents, frames = run_reference(ref, seed=3, prompt=prompt, **SMALL)
    assert_same_video(out, latents, frames)
    plain = Pipeline.from_pretrained(tiny_rope_dir)(prompt, seed=3, **SMALL)
    assert (plain.latents - out.latents).abs().max() > 1e-2  # the LoRA does change the video


def test_reference_saved_lora_loads_into_ours(tiny_rope_dir, tmp_path):
    from diffusers import CogVideoXPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = load_reference_pipeline(tiny_rope_dir)
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=True)
    ref.transformer.add_adapter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in ref.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    CogVideoXPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(ref.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )
    ours = Pipeline.from_pretrained(tiny_rope_dir)
    ours.load_lora(tmp_path)
    inputs = transformer_inputs()
    want = reference_out(ref.transformer, ours.transformer, inputs)
    got = ours_out(ours.transformer, inputs)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_several_loras_with_scales_match_the_reference(tiny_rope_dir, lora_files):
    one, two = lora_files
    ours = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.7), (two, -1.5)])
    ref = load_reference_pipeline(tiny_rope_dir)
    ref.load_lora_weights(str(one), adapter_name="one")
    ref.load_lora_weights(str(two), adapter_name="two")
    ref.set_adapters(["one", "two"], [0.7, -1.5])
    inputs = transformer_inputs()
    want = reference_out(ref.transformer, ours.transformer, inputs)
    got = ours_out(ours.transformer, inputs)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # Scales can change afterwards (here: "two" off), as set_adapters does.
    ours.set_lora_scale(0.0, "one")  # one/pytorch_lora_weights.safetensors: named after its folder
    ref.set_adapters(["one", "two"], [0.0, -1.5])
    assert torch.allclose(ours_out(ours.transformer, inputs), reference_out(ref.transformer, ours.transformer, inputs),
                          atol=1e-5, rtol=1e-5)


def test_fuse_unfuse_and_unload_restore_the_weights(tiny_rope_dir, lora_files):
    one, two = lora_files
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    inputs = transformer_inputs()
    base = ours_out(pipe.transformer, inputs)
    pipe.load_lora(one, 0.5)
    pipe.load_lora(two, 2.0)
    live = ours_out(pipe.transformer, inputs)
    assert (live - base).abs().max() > 1e-2

    pipe.fuse_lora(keep_original=True)
    assert torch.allclose(ours_out(pipe.transformer, inputs), live, atol=1e-5)
    weight = pipe.transformer.transformer_blocks[0].attn1.to_q.weight
    assert not torch.allclose(weight, before["transformer_blocks.0.attn1.to_q.weight"])
    with pytest.raises(InputError, match="fused"):
        pipe.set_lora_scale(1.0)
    pipe.unfuse_lora()  # from the kept copy: bit for bit
    for key, value in before.items():
        assert torch.equal(pipe.transformer.state_dict()[key], value), key
    assert torch.equal(ours_out(pipe.transformer, inputs), live)

    pipe.fuse_lora()  # unfusing subtracts the update again, as the reference does: equal up to rounding
    assert torch.allclose(ours_out(pipe.transformer, inputs), live, atol=1e-5)
    pipe.unfuse_lora()
    for key, value in before.items():
        assert torch.allclose(pipe.transformer.state_dict()[key], value, atol=1e-6), key

    pipe.unload_lora()
    assert not lora.lora_layers(pipe.transformer)
    assert type(pipe.transformer.transformer_blocks[1].attn1.to_out[0]) is nn.Linear
    assert list(pipe.transformer.state_dict()) == list(before)
    assert torch.allclose(ours_out(pipe.transformer, inputs), base, atol=1e-5)


def test_fresh_adapter_is_a_no_op_and_only_it_trains(tiny_rope_dir):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    inputs = transformer_inputs()
    base = ours_out(pipe.transformer, inputs)
    names = lora.inject_lora(pipe.transformer, rank=3)
    assert sorted(names) == sorted(n.removeprefix("transformer.") for n in TARGETS)
    assert torch.allclose(ours_out(pipe.transformer, inputs), base, atol=1e-5)
    trainable = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert len(trainable) == 16 and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)


def test_bad_lora_files_are_user_errors(tiny_rope_dir, tmp_path):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    with pytest.raises(InputError, match="no LoRA file"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="no LoRA weights"):
        pipe.load_lora(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="cannot read"):
        pipe.load_lora(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 99),
               "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="another model size"):
        pipe.load_lora(tmp_path / "other.safetensors")
    save_file({"transformer.blocks.0.to_q.lora_A.weight": torch.zeros(4, 32),
               "transformer.blocks.0.to_q.lora_B.weight": torch.zeros(32, 4)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(InputError, match="not linear layers of this model"):
        pipe.load_lora(tmp_path / "wrong.safetensors")
    save_file({"transformer.transformer_blocks.0.attn1.to_q.weight": torch.zeros(32, 32)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(InputError, match="is not a LoRA weight"):
        pipe.load_lora(tmp_path / "full.safetensors")


def test_generate_with_lora(capsys, monkeypatch, tiny_rope_dir, lora_files, tmp_path):
    import cogvideox.video

    one, two = lora_files
    common = ["--model", str(tiny_rope_dir), "--steps", "2", "--frames", "9", "--height", "32", "--width", "48",
              "--seed", "4", "--quiet"]
    written = {}
    export = cogvideox.video.export_video

    def keep_frames(frames, path, fps=8, **kwargs):
        # The frames are compared before encoding too, to see the LoRA's effect without the codec's loss.
        written[str(path)] = frames
        return export(frames, path, fps=fps, **kwargs)

    monkeypatch.setattr(cogvideox.video, "export_video", keep_frames)
    out = tmp_path / "lora.mp4"
    assert main(["generate", "a cat", "--output", str(out), "--lora", str(one), "--lora-scale", "0.5",
                 "--lora", str(two), *common]) == 0
    assert read_video(out)[0].shape == (9, 32, 48, 3)
    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 1.0)])
    want = pipe("a cat", seed=4, num_frames=9, height=32, width=48, num_inference_steps=2).frames[0]
    assert np.array_equal(written[str(out)], want)
    export(want, tmp_path / "library.mp4", fps=8)
    assert np.array_equal(read_video(tmp_path / "library.mp4")[0], read_video(out)[0])
    # The file's record names the LoRAs with their scales, in order.
    assert cogvideox.video.read_metadata(out)["lora"] == [[str(one), 0.5], [str(two), 1.0]]
    plain = Pipeline.from_pretrained(tiny_rope_dir)("a cat", seed=4, num_frames=9, height=32, width=48,
                                                    num_inference_steps=2).frames[0]
    assert not np.array_equal(plain, want)

    capsys.readouterr()
    assert main(["generate", "a cat", "--output", str(tmp_path / "x.mp4"), "--lora", str(tmp_path / "nope"), *common]) == 2
    assert "--lora" in capsys.readouterr().err
    assert main(["generate", "a cat", "--output", str(tmp_path / "x.mp4"), "--lora-scale", "2", *common]) == 2
    assert "1 --lora-scale values for 0 --lora files" in capsys.readouterr().err


def test_accelerate_folds_the_loras_in_and_refuses_new_ones(tiny_rope_dir, lora_files, tmp_path):
    """The fast paths rewrite the linear layers: accelerate() folds loaded LoRAs into the weights first
    (unfused or fused alike), and a LoRA loaded afterwards is refused with a message saying the order."""
    one, two = lora_files
    inputs = transformer_inputs()
    live = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 2.0)])
    want = ours_out(live.transformer, inputs)
    for fuse_first in (False, True):
        pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 2.0)])
        if fuse_first:
            pipe.fuse_lora()
        pipe.accelerate(quantize="int8")
        assert not lora.lora_layers(pipe.transformer)
        got = ours_out(pipe.transformer, inputs)
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # int8 weights: rounding only
        with pytest.raises(InputError, match=r"load LoRAs before accelerate\(\)"):
            pipe.load_lora(one)
    exact = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 2.0)]).accelerate(cache=0.0)
    assert torch.allclose(ours_out(exact.transformer, inputs), want, atol=1e-5)  # fused QKV: lossless

    common = ["--model", str(tiny_rope_dir), "--steps", "2", "--frames", "9", "--height", "32", "--width", "48",
              "--seed", "4", "--quiet", "--lora", str(one), "--lora-scale", "0.5"]
    for flags in (["--quantize", "int8"], ["--cache", "0.1"]):
        out = tmp_path / f"lora{flags[0]}.mp4"
        assert main(["generate", "a cat", "--output", str(out), *flags, *common]) == 0
        assert read_video(out)[0].shape == (9, 32, 48, 3)


def test_state_dict_stays_the_official_layout(tiny_rope_dir, lora_files, tmp_path):
    """A pipeline with a fused LoRA saves as a plain model folder that both implementations read."""
    one, _ = lora_files
    base = Pipeline.from_pretrained(tiny_rope_dir)
    keys = list(base.transformer.state_dict())
    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=(one, 0.6))
    assert list(pipe.transformer.state_dict()) == keys
    inputs = transformer_inputs()
    want = ours_out(pipe.transformer, inputs)
    pipe.fuse_lora()
    pipe.save_pretrained(tmp_path / "fused")
    merged = Pipeline.from_pretrained(tmp_path / "fused")
    assert torch.allclose(ours_out(merged.transformer, inputs), want, atol=1e-5)
    # Loading official weights into a model with adapters leaves the adapters alone.
    pipe.unfuse_lora()
    pipe.transformer.load_state_dict(base.transformer.state_dict(), strict=True)
    assert torch.allclose(ours_out(pipe.transformer, inputs), want, atol=1e-5)


def test_lora_calls_with_unknown_names_or_bad_scales_are_input_errors(tiny_rope_dir, lora_files, tmp_path):
    pipe, path = Pipeline.from_pretrained(tiny_rope_dir), lora_files[0]
    name = pipe.load_lora(path)
    for call, message in [
        (lambda: pipe.set_lora_scale(0.5, "typo"), "cannot rescale LoRA 'typo': it is not loaded"),
        (lambda: pipe.fuse_lora(["typo"]), "cannot fuse LoRA 'typo'"),
        (lambda: pipe.unfuse_lora("typo"), "cannot unfuse LoRA 'typo'"),
        (lambda: pipe.unload_lora("typo"), "cannot unload LoRA 'typo'"),
        (lambda: pipe.set_lora_scale(float("nan")), "finite number"),
        (lambda: pipe.set_lora_scale("x"), "finite number"),
        (lambda: pipe.load_lora(path, scale=float("inf"), name="other"), "finite number"),
    ]:
        with pytest.raises(InputError, match=message):
            call()
    assert name in str(pytest.raises(InputError, pipe.set_lora_scale, 0.5, "typo").value)  # names what is loaded
    # A scale computed in numpy is a number like any other.
    pipe.set_lora_scale(np.float32(0.5))
    pipe.set_adapters([name], np.float32(0.25))
    other = Pipeline.from_pretrained(tiny_rope_dir, lora=(path, np.float64(0.5)))
    assert other.load_lora(path, np.float32(2)) == name + "_2"
    pipe.fuse_lora(name)  # one name as a string, not its characters
    assert all(name in layer.fused for layer in lora.lora_layers(pipe.transformer).values())


def test_a_lora_that_fails_to_load_leaves_the_model_unchanged(tiny_rope_dir, lora_files, tmp_path):
    pipe, path = Pipeline.from_pretrained(tiny_rope_dir), lora_files[0]
    tensors = load_file(lora._lora_file(path))
    last = sorted(k for k in tensors if k.endswith("lora_A.weight"))[-1]
    tensors[last] = torch.zeros(tensors[last].shape[0], 7)  # the last layer's input size is wrong
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    with pytest.raises(InputError, match="another model size"):
        pipe.load_lora(bad, name="bad")
    assert lora.adapter_names(pipe.transformer) == [] and not lora.lora_layers(pipe.transformer)
    assert pipe.load_lora(path, name="bad") == "bad"  # the name is free


def test_lora_names_and_paths_of_the_wrong_kind_are_input_errors(tiny_rope_dir, lora_files):
    """A name torch cannot key a layer by fails before any layer is touched; names and paths that are not
    strings fail as input errors, not a TypeError or KeyError from torch."""
    pipe, path = Pipeline.from_pretrained(tiny_rope_dir), lora_files[0]
    for call, message in [
        (lambda: pipe.load_lora(path, name="style.v2"), "a LoRA name must be a non-empty string without dots"),
        (lambda: pipe.load_lora(path, name=""), "a LoRA name must be a non-empty string without dots, got ''"),
        (lambda: pipe.load_lora(path, name=5), "a LoRA name must be a non-empty string without dots, got 5"),
        (lambda: pipe.load_lora(5), "a LoRA is a file or folder path, got int"),
        (lambda: pipe.set_adapters(5), "names must be a LoRA's name or a list of them, got int"),
        (lambda: pipe.set_adapters(["one", 2]), "LoRA names are strings, got int 2"),
        (lambda: pipe.fuse_lora(5), "LoRA names are strings, got int 5"),
        (lambda: pipe.unload_lora(5), "LoRA names are strings, got int 5"),
    ]:
        with pytest.raises(InputError, match=message):
            call()
    assert not lora.lora_layers(pipe.transformer)  # no layer was wrapped on the way to the error


def test_lora_calls_after_accelerate_say_the_loras_were_folded(tiny_rope_dir, lora_files, tmp_path):
    pipe, path = Pipeline.from_pretrained(tiny_rope_dir), lora_files[0]
    pipe.load_lora(path, name="style")
    pipe.accelerate()
    with pytest.raises(InputError, match="folded the LoRAs into the weights"):
        pipe.set_lora_scale(0.0)
    with pytest.raises(InputError, match="folded"):
        pipe.unload_lora("style")


def test_unloading_every_lora_after_accelerate_folded_them_is_refused_not_ignored(tiny_rope_dir, lora_files):
    """`unload_lora()` / `unfuse_lora()` (every LoRA) after `accelerate()` folded them in did nothing, without
    a word: the video kept the LoRA. A LoRA that `set_adapters` left out is not folded, not named."""
    one, two = lora_files
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    pipe.load_lora(one, name="one"), pipe.load_lora(two, name="two")
    pipe.set_adapters("one", 0.5)
    pipe.accelerate(quantize="int8", attention=None)
    with pytest.raises(InputError, match=r"cannot unload LoRA 'one': accelerate\(\) folded it"):
        pipe.unload_lora()
    with pytest.raises(InputError, match=r"cannot unfuse LoRA 'one'"):
        pipe.unfuse_lora()
    assert pipe.acceleration.folded_loras == ("one",)
    live = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 2.0)]).accelerate(cache=0.0, fuse_qkv=False)
    assert live.acceleration.folded_loras == ()
    live.unload_lora()  # still live LoRAs: they go
    assert not lora.lora_layers(live.transformer)


def test_keep_original_restores_exactly_the_weight_a_lora_was_fused_into(tiny_rope_dir, lora_files):
    """One LoRA fused, then another with `keep_original=True`: unfusing the second restores the weights
    it was fused into bit for bit (it subtracted the update, because another LoRA was still fused); a
    kept copy that no longer matches what stays fused is not restored."""
    one, two = lora_files
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    pipe.load_lora(one, 0.7, name="one"), pipe.load_lora(two, 1.3, name="two")
    weights = lambda: {k: v.clone() for k, v in pipe.transformer.state_dict().items()}  # noqa: E731
    plain = weights()
    pipe.fuse_lora("one")
    with_one = weights()
    pipe.fuse_lora("two", keep_original=True)
    pipe.unfuse_lora("two")
    assert all(torch.equal(with_one[k], v) for k, v in weights().items())
    pipe.fuse_lora("two", keep_original=True)
    pipe.unfuse_lora("one")  # the copy holds "one": unfusing "two" now subtracts
    pipe.unfuse_lora("two")
    assert all(torch.allclose(plain[k], v, atol=1e-6) for k, v in weights().items())


def test_keep_original_unfusing_any_of_two_loras_leaves_what_fusing_the_other_alone_gives(tiny_rope_dir, lora_files):
    """Two LoRAs fused into the same layers, each with `keep_original=True`: only one copy was kept, so
    unfusing one of them subtracted its update (off by rounding) and unfusing both, one call each, did not
    give the original weights back. Now each subset is bit for bit what fusing it alone gives."""
    one, two = lora_files
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    pipe.load_lora(one, 0.7, name="one"), pipe.load_lora(two, 1.3, name="two")
    weights = lambda: {k: v.clone() for k, v in pipe.transformer.state_dict().items()}  # noqa: E731
    same = lambda want: all(torch.equal(want[k], v) for k, v in weights().items())  # noqa: E731
    plain = weights()
    alone = {}
    for name in ("one", "two"):
        pipe.fuse_lora(name, keep_original=True)
        alone[name] = weights()
        pipe.unfuse_lora()
    assert same(plain) and not same(alone["one"])
    pipe.fuse_lora("one", keep_original=True)
    pipe.fuse_lora("two", keep_original=True)
    pipe.unfuse_lora("two")
    assert same(alone["one"])
    pipe.fuse_lora("two", keep_original=True)
    pipe.unfuse_lora("one")
    assert same(alone["two"])
    pipe.unfuse_lora("two")
    assert same(plain)
    pipe.fuse_lora(["one", "two"], keep_original=True)
    pipe.unfuse_lora("one")
    assert same(alone["two"])
    pipe.unfuse_lora("two")
    assert same(plain)


def test_a_lora_file_with_the_standard_name_is_named_after_its_folder(tiny_rope_dir, lora_files, tmp_path, monkeypatch):
    """Every training run writes pytorch_lora_weights.safetensors: given by its file path, a LoRA was named
    "pytorch_lora_weights" (a second one "pytorch_lora_weights_2"). It is named after its folder now, as
    when the folder is given; another file keeps its own name, and a name given (serve's NAME=PATH) wins."""
    one, two = lora_files
    style = tmp_path / "style" / lora.LORA_WEIGHTS_NAME
    style.parent.mkdir()
    style.write_bytes(one.read_bytes())
    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=[one, style, two])
    assert lora.adapter_names(pipe.transformer) == ["one", "style", "two"]
    assert pipe.load_lora(style.parent) == "style_2"
    assert pipe.load_lora(style, name="given") == "given"
    monkeypatch.chdir(style.parent)
    assert pipe.load_lora(lora.LORA_WEIGHTS_NAME) == "style_3"


def test_lora_metadata_that_is_not_json_is_an_input_error(lora_files, tmp_path):
    path = lora_files[0]
    bad = tmp_path / "meta.safetensors"
    save_file(load_file(lora._lora_file(path)), bad, metadata={"lora_adapter_metadata": "{not json"})
    with pytest.raises(InputError, match="not valid JSON"):
        lora.read_lora(bad)
    save_file(load_file(lora._lora_file(path)), bad, metadata={"lora_adapter_metadata": '{"transformer.lora_alpha": "x"}'})
    with pytest.raises(InputError, match="positive number"):
        lora.read_lora(bad)


def test_set_adapters_runs_only_the_chosen_loras_as_the_reference_does(tiny_rope_dir, lora_files):
    """A service picks LoRAs per request: the unchosen ones stay loaded and are skipped, and switching
    back and forth gives the outputs of a pipeline holding only the chosen ones."""
    one, two = lora_files
    inputs = transformer_inputs()
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    pipe.load_lora(one, name="one")
    pipe.load_lora(two, name="two")
    base = ours_out(Pipeline.from_pretrained(tiny_rope_dir).transformer, inputs)
    only_two = ours_out(Pipeline.from_pretrained(tiny_rope_dir, lora=[(two, -1.5)]).transformer, inputs)
    ref = load_reference_pipeline(tiny_rope_dir)
    ref.load_lora_weights(str(one), adapter_name="one")
    ref.load_lora_weights(str(two), adapter_name="two")
    for names, weights in ((["two"], [-1.5]), ([], None), (["one", "two"], [0.7, -1.5]), (["two"], [-1.5])):
        pipe.set_adapters(names, weights)
        got = ours_out(pipe.transformer, inputs)
        if names:
            ref.set_adapters(names, weights)
        else:
            ref.disable_lora()
        want = reference_out(ref.transformer, pipe.transformer, inputs)
        if not names:
            ref.enable_lora()
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (names, (got - want).abs().max())
        if names == ["two"]:
            assert torch.equal(got, only_two)  # skipped, not multiplied by zero: the same numbers
        if not names:
            assert torch.equal(got, base)
    with pytest.raises(InputError, match=r"cannot activate LoRA 'three': it is not loaded \(loaded: 'one', 'two'\)"):
        pipe.set_adapters(["three"])
    with pytest.raises(InputError, match="a LoRA scale must be a finite number, got nan"):
        pipe.set_adapters("one", float("nan"))
    with pytest.raises(InputError, match="1 LoRA weights for 2 names"):
        pipe.set_adapters(["one", "two"], [1.0])
    pipe.fuse_lora("one")
    with pytest.raises(InputError, match="'one' is fused into the weights; unfuse it before choosing"):
        pipe.set_adapters(["two"])


def test_loras_stay_live_with_the_levers_that_leave_linear_layers_alone(tiny_rope_dir, lora_files):
    """The step cache and the attention backend keep LoRAs choosable; fused QKV and quantising fold the
    ones that run, and only those."""
    one, two = lora_files
    inputs = transformer_inputs()
    want_two = ours_out(Pipeline.from_pretrained(tiny_rope_dir, lora=[(two, 2.0)]).transformer, inputs)
    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 2.0)])
    pipe.accelerate(cache=0.0, fuse_qkv=False, attention="math")
    assert len(lora.adapter_names(pipe.transformer)) == 2
    pipe.set_adapters(["two"], [2.0])
    assert torch.allclose(ours_out(pipe.transformer, inputs), want_two, atol=1e-6)
    folded = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 2.0)])
    folded.set_adapters(["two"], [2.0])
    folded.accelerate(cache=0.0)  # fused QKV: only the running LoRA goes into the weights
    assert not lora.lora_layers(folded.transformer)
    assert torch.allclose(ours_out(folded.transformer, inputs), want_two, atol=1e-5)


def test_fuse_lora_folds_in_the_loras_that_run_and_leaves_the_others_out(tiny_rope_dir, lora_files):
    """After set_adapters, fuse_lora() keeps the output the chosen LoRAs give (as diffusers fuses its active
    adapters): a LoRA left out was folded into the weights too, and ran again."""
    one, two = lora_files
    inputs = transformer_inputs()
    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=[(one, 0.5), (two, 2.0)])
    pipe.set_adapters(["two"], [2.0])
    live = ours_out(pipe.transformer, inputs)
    pipe.fuse_lora()
    assert torch.allclose(ours_out(pipe.transformer, inputs), live, atol=1e-5)
    pipe.unfuse_lora()
    assert torch.allclose(ours_out(pipe.transformer, inputs), live, atol=1e-5)


def test_a_run_folder_without_a_lora_says_what_it_holds(tmp_path):
    """`--lora RUN` on a full fine-tune's folder, or on a run that has not finished, says so instead of only
    "no LoRA weights"."""
    full = tmp_path / "full"
    (full / "model").mkdir(parents=True)
    (full / "model" / "model_index.json").write_text("{}")
    with pytest.raises(InputError, match=rf"^{full} holds a fully fine-tuned model, not a LoRA: give it as the "
                                         rf"model \(--model {full / 'model'}\)$"):
        lora.read_lora(full)
    running = tmp_path / "running"
    (running / "checkpoints").mkdir(parents=True)
    with pytest.raises(InputError, match=rf"^no LoRA weights \(pytorch_lora_weights.safetensors\) in {running} yet: "
                                         "its training run writes them when it ends; run the same command again to "
                                         "finish it$"):
        lora.read_lora(running)


def test_a_lora_path_with_a_tilde_and_a_model_folder_given_as_a_lora(tiny_rope_dir, lora_files, tmp_path, monkeypatch):
    """From Python no shell expands `~`: a model path took it, a LoRA path was "no LoRA file at ~/...". A
    model folder given as the LoRA was "no LoRA weights in" it; it is named as a model folder now."""
    one, two = lora_files
    home = tmp_path / "home"
    shutil.copytree(one.parent, home / "loras" / "one")  # a run folder holding pytorch_lora_weights.safetensors
    shutil.copyfile(two, home / "loras" / "two.safetensors")
    monkeypatch.setenv("HOME", str(home))
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    assert pipe.load_lora("~/loras/one") == "one" and pipe.load_lora("~/loras/two.safetensors") == "two"
    want = Pipeline.from_pretrained(tiny_rope_dir)
    want.load_lora(one)
    want.load_lora(two)
    got, expected = pipe.transformer.state_dict(), want.transformer.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(InputError, match=rf"^{tiny_rope_dir} is a model folder, not a LoRA: give it as the model "
                                         rf"\(--model {tiny_rope_dir}\)$"):
        lora.read_lora(tiny_rope_dir)


def _pair(a=None, b=None, prefix="transformer.transformer_blocks.0.attn1.to_q"):
    a = torch.randn(4, 32) if a is None else a
    return {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": torch.randn(32, a.shape[0]) if b is None else b}


@pytest.mark.parametrize(
    "tensors, metadata, why",
    [
        (_pair(), {"lora_adapter_metadata": '{"lora_alpha": ' + "1" * 5000 + "}"}, "not valid JSON"),
        (_pair(), {"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000}, "not valid JSON"),
        (_pair() | {"transformer.transformer_blocks.0.attn1.to_q.alpha": torch.ones(3)}, None, "one real number"),
        (_pair() | {"transformer.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(True)}, None, "one real number"),
        (_pair() | {"transformer.transformer_blocks.0.attn1.to_q.alpha": torch.tensor(float("nan"))}, None,
         "alpha of .* is nan"),
        (_pair(torch.zeros(0, 32), torch.zeros(32, 0)), {"lora_adapter_metadata": '{"lora_alpha": 4}'}, "rank 0"),
        (_pair(torch.ones(4, 32, dtype=torch.int32)), None, "holds torch.int32 values"),
        (_pair(torch.ones(4, 32, dtype=torch.complex64)), None, "holds torch.complex64 values"),
        (_pair(torch.full((4, 32), float("nan"))), None, "NaN or infinite"),
        (_pair(torch.randn(3, 32), torch.randn(32, 4)), None, "do not chain"),
        (_pair() | _pair(prefix="transformer_blocks.0.attn1.to_q"), None, "are the same LoRA weight; keep one"),
    ],
    ids=["huge alpha", "nested", "alpha of 3 values", "bool alpha", "nan alpha", "rank 0", "int", "complex", "nan", "mismatch",
         "with and without prefix"],
)
def test_damaged_lora_files_are_input_errors_naming_the_file(tiny_rope_dir, tmp_path, tensors, metadata, why):
    """A ValueError, RecursionError or ZeroDivisionError traceback before; integer and complex weights were
    cast without a word, NaN weights gave a black video, and of a weight named with and without the
    `transformer.` prefix the later one silently won."""
    path = tmp_path / "bad.safetensors"
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(InputError, match=f"{path}: .*{why}"):
        pipe.load_lora(path)
    assert pipe.transformer.state_dict().keys() == before.keys()


def test_a_pickled_lora_is_named_with_the_conversion_that_makes_it_readable(lora_files, tmp_path):
    """A LoRA saved by older diffusers or peft as `pytorch_lora_weights.bin`: the folder was "no LoRA
    weights", the file "cannot read as safetensors". Both name the file now, say that only safetensors is
    read, and give the conversion, which, run, gives a file holding the same weights."""
    import shlex
    import subprocess
    import sys

    one, _ = lora_files
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(load_file(one), folder / "pytorch_lora_weights.bin")
    (folder / "notes.txt").write_text("trained on 20 clips")
    for given in (folder, folder / "pytorch_lora_weights.bin"):
        with pytest.raises(InputError) as caught:
            lora.read_lora(given)
        message = str(caught.value)
        assert message.startswith(f"{folder / 'pytorch_lora_weights.bin'} is a pickled (torch.save) LoRA file; "
                                  "cogvideox reads only safetensors LoRA files. Convert it once")
    command = shlex.split(message.split(": ", 1)[1].replace("python", sys.executable, 1))
    subprocess.run(command, check=True)
    converted, _ = lora.read_lora(folder)  # the folder now holds pytorch_lora_weights.safetensors
    original, _ = lora.read_lora(one)
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k][0], original[k][0]) and torch.equal(converted[k][1], original[k][1])
               for k in original)
