"""SAT-format checkpoints: built here from random tiny models with the inverse of the name mapping, then
loaded back through `cogvideox.sat` to the very same tensors and outputs."""

import pytest
import torch
from helpers import make_sat_checkpoint, make_tiny_cogvideox, transformer_to_sat, vae_to_sat

from cogvideox import LoadError, Pipeline
from cogvideox.models.config import VAEConfig
from cogvideox.models.vae import CogVideoXVAE
from cogvideox.sat import (
    DEEPSPEED_FILE,
    checkpoint_file,
    convert_transformer_state_dict,
    convert_vae_state_dict,
    read_state_dict,
)

@pytest.mark.parametrize("variant", ["sincos", "i2v", "1.5-i2v"])
def test_key_conversion_inverts_the_sat_layout(variant, tmp_path):
    """Every transformer variant (2B sin-cos, 5B-I2V learned table, 1.5-I2V linear patch + ofs) comes
    back tensor for tensor; SAT-only tensors are dropped."""
    folder = make_tiny_cogvideox(tmp_path / variant, variant=variant)
    pipe = Pipeline.from_pretrained(folder)
    ours = pipe.transformer.state_dict()
    sat = transformer_to_sat(ours, pipe.config.attention_head_dim)
    assert len(sat) != len(ours)
    back = convert_transformer_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in sat.items()},
                                          pipe.config)  # fmt: skip
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_vae_conversion_with_shortcuts():
    """A VAE whose stages change width has `nin_shortcut` convolutions; the decoder order reverses."""
    config = VAEConfig(
        block_out_channels=(8, 16, 16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=4
    )
    torch.manual_seed(0)
    ours = CogVideoXVAE(config).state_dict()
    assert any("conv_shortcut" in k for k in ours)
    sat = vae_to_sat(ours, levels=4)
    assert "decoder.up.3.block.0.conv1.conv.weight" in sat and "encoder.down.1.block.0.nin_shortcut.weight" in sat
    back = convert_vae_state_dict(sat, config)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.fixture(scope="module")
def sat_rope(tiny_rope_dir, tmp_path_factory):
    """The tiny rope model fine-tuned (perturbed, so that the base folder and the checkpoint differ) and
    written as a SAT transformer checkpoint folder and a SAT VAE file."""
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    transformer, vae = make_sat_checkpoint(pipe, tmp_path_factory.mktemp("sat"))
    return pipe, transformer, vae


def test_from_sat_gives_the_same_model(sat_rope, tiny_rope_dir):
    pipe, transformer, vae = sat_rope
    loaded = Pipeline.from_sat(transformer, tiny_rope_dir, vae=vae)
    for name in ("transformer", "vae"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    kwargs = dict(num_frames=9, height=32, width=48, num_inference_steps=2, max_sequence_length=16, seed=3)
    want = pipe("a cat", progress=False, **kwargs)
    got = loaded("a cat", progress=False, **kwargs)
    assert torch.equal(want.latents, got.latents)
    assert all((a == b).all() for a, b in zip(want.frames, got.frames))


def test_a_full_training_checkpoint_holds_both(sat_rope, tiny_rope_dir, tmp_path):
    """SAT training saves the transformer, the VAE (`first_stage_model.`) and the T5 (`conditioner.`,
    ignored: the base's T5 is used) in one file."""
    pipe, transformer, vae = sat_rope
    state = torch.load(checkpoint_file(transformer), weights_only=True)["module"]
    state |= {f"first_stage_model.{k}": v for k, v in torch.load(vae, weights_only=True)["state_dict"].items()}
    state["conditioner.embedders.0.transformer.shared.weight"] = torch.randn(4, 4)
    torch.save({"module": state}, tmp_path / "full.pt")
    loaded = Pipeline.from_sat(tmp_path / "full.pt", tiny_rope_dir)
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), loaded.vae.state_dict().values()))


def test_vae_only_checkpoint_keeps_the_base_transformer(sat_rope, tiny_rope_dir):
    pipe, _, vae = sat_rope
    loaded = Pipeline.from_sat(vae, tiny_rope_dir)
    base = Pipeline.from_pretrained(tiny_rope_dir)
    assert torch.equal(loaded.vae.encoder.conv_in.conv.weight, pipe.vae.encoder.conv_in.conv.weight)
    assert torch.equal(loaded.transformer.proj_out.weight, base.transformer.proj_out.weight)
    assert not torch.equal(loaded.transformer.proj_out.weight, pipe.transformer.proj_out.weight)


def test_checkpoint_folder_resolution(tmp_path):
    folder = tmp_path / "ckpt"
    for iteration in (500, 1500):
        (folder / str(iteration)).mkdir(parents=True)
        torch.save({"module": {"x": torch.zeros(1)}}, folder / str(iteration) / DEEPSPEED_FILE)
    assert checkpoint_file(folder) == folder / "1500" / DEEPSPEED_FILE  # no `latest`: the highest
    (folder / "latest").write_text("500")
    assert checkpoint_file(folder) == folder / "500" / DEEPSPEED_FILE
    (folder / "latest").write_text("700")
    with pytest.raises(LoadError, match="names iteration '700'"):
        checkpoint_file(folder)
    with pytest.raises(LoadError, match="no SAT checkpoint at"):
        checkpoint_file(tmp_path / "nothing")


class _Opaque:
    """An object a weights-only unpickler refuses."""


def test_pickles_with_objects_need_trust(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"module": {"x": torch.ones(2)}, "extra": _Opaque()}, path)
    with pytest.raises(LoadError, match="trust_pickle=True"):
        read_state_dict(path)
    assert torch.equal(read_state_dict(path, trust_pickle=True)["x"], torch.ones(2))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match=r"cannot read .*junk.pt: not a PyTorch checkpoint \(UnpicklingError: "):
        read_state_dict(tmp_path / "junk.pt")


def test_a_checkpoint_cut_short_is_named_incomplete(tmp_path):
    """A .pt file whose save or copy was interrupted is a damaged checkpoint, not 'not a PyTorch checkpoint',
    and the reason is PyTorch's own words without its advice to report a PyTorch bug."""
    whole = tmp_path / "whole.pt"
    torch.save({"module": {"x": torch.ones(1000)}}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(LoadError) as error:
        read_state_dict(cut)
    assert str(error.value).startswith(f"cannot read {cut}: a damaged or incomplete PyTorch checkpoint (")
    assert "miniz" not in str(error.value)


def test_wrong_base_names_the_mismatch(sat_rope, tiny_v15_dir, tmp_path):
    _, transformer, _ = sat_rope
    with pytest.raises(LoadError, match="SAT transformer .* does not match the model its config.json describes"):
        Pipeline.from_sat(transformer, tiny_v15_dir)  # 1.5 patches differently
    torch.save({"module": {"conditioner.x": torch.zeros(1)}}, tmp_path / "t5.pt")
    with pytest.raises(LoadError, match="holds no CogVideoX tensors"):
        Pipeline.from_sat(tmp_path / "t5.pt", tiny_v15_dir)


def test_released_shapes_are_recognised():
    """A checkpoint of a released model loaded against the wrong base is told which base it needs."""
    from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer
    from cogvideox.sat import load_transformer

    with torch.device("meta"):
        i2v = CogVideoXTransformer(TRANSFORMER_PRESETS["CogVideoX-5b-I2V"]).state_dict()
    sat = transformer_to_sat(i2v, 64)
    sat = {k.removeprefix("model.diffusion_model."): v for k, v in sat.items() if "freqs" not in k}
    with pytest.raises(LoadError, match="shapes are those of CogVideoX-5b-I2V"):
        load_transformer(sat, TRANSFORMER_PRESETS["CogVideoX-5b"], torch.float32, "cpu", "the checkpoint")
