"""Loading the official layout: strictness, sharding, dtype policy, hub cache resolution, clear errors."""

import json
import os
import shutil
import socket
import warnings

import pytest
import torch
from helpers import load_reference_pipeline, make_variant_model
from safetensors.torch import load_file, save_file

from cogvideox import InputError, LoadError, Pipeline, VideoAutoencoder
from cogvideox.loading import (
    check_components,
    check_model_dir,
    choose_dtype,
    parse_dtype,
    resolve_model_dir,
)
from cogvideox.weights import load_weights, read_tensors, save_weights, weight_files
from cogvideox.models.config import TransformerConfig, VAEConfig

diffusers = pytest.importorskip("diffusers")

WEIGHTS = "diffusion_pytorch_model.safetensors"
SMALL = dict(num_frames=9, height=32, width=32, num_inference_steps=2, max_sequence_length=16)


@pytest.fixture(scope="module")
def ours(tiny_rope_dir):
    return Pipeline.from_pretrained(tiny_rope_dir)


@pytest.fixture
def model_copy(tiny_rope_dir, tmp_path):
    """A private copy of the tiny folder, to damage."""
    return shutil.copytree(tiny_rope_dir, tmp_path / "model")


def edit_weights(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_loaded_tensors_equal_the_reference(ours, tiny_rope_dir):
    ref = load_reference_pipeline(tiny_rope_dir)
    for name in ("transformer", "vae"):
        want = getattr(ref, name).state_dict()
        got = getattr(ours, name).state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert not any(t.is_meta for t in ours.transformer.state_dict().values())
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32


def test_dtype_argument_reaches_every_component(tiny_rope_dir):
    pipe = Pipeline.from_pretrained(tiny_rope_dir, dtype="bf16", device="cpu")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert pipe.text_encoder.model.dtype == torch.bfloat16
    out = pipe("a cat", **SMALL, seed=0, progress=False, output_type="latent")
    assert out.latents.dtype == torch.bfloat16 and torch.isfinite(out.latents.float()).all()


@pytest.mark.parametrize(
    "value, want",
    [
        ("bf16", torch.bfloat16),
        ("BFloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        ("torch.float32", torch.float32),
        (torch.float16, torch.float16),
        (None, None),
    ],
)
def test_parse_dtype(value, want):
    assert parse_dtype(value) == want


@pytest.mark.parametrize("value", ["int8", "fp8", torch.float64, 3])
def test_parse_dtype_rejects(value):
    with pytest.raises(InputError, match="dtype"):
        parse_dtype(value)


def test_dtype_defaults_and_fp16_warning():
    cpu = torch.device("cpu")
    assert choose_dtype(None, cpu) == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_dtype("fp16", cpu, TransformerConfig(num_attention_heads=30)) == torch.float16  # 2B: fine
    with pytest.warns(UserWarning, match="NaN"):
        choose_dtype("fp16", cpu, TransformerConfig(num_attention_heads=48))


def test_unknown_dtype_and_scheduler_fail_before_loading(tmp_path):
    with pytest.raises(InputError, match="unknown dtype"):
        Pipeline.from_pretrained(tmp_path / "nowhere", dtype="float8")
    with pytest.raises(InputError, match="unknown scheduler 'euler'"):
        Pipeline.from_pretrained(tmp_path / "nowhere", scheduler="euler")


def test_scheduler_choice(tiny_rope_dir, tiny_v15_dir):
    from cogvideox.schedulers import DDIMScheduler, DPMScheduler

    assert isinstance(Pipeline.from_pretrained(tiny_v15_dir).scheduler, DPMScheduler)  # as its config says
    assert isinstance(Pipeline.from_pretrained(tiny_v15_dir, scheduler="ddim").scheduler, DDIMScheduler)
    assert isinstance(Pipeline.from_pretrained(tiny_rope_dir, scheduler="DPM").scheduler, DPMScheduler)


def test_missing_tensor(model_copy):
    edit_weights(model_copy / "transformer" / WEIGHTS, lambda t: t.pop("proj_out.bias"))
    with pytest.raises(LoadError, match=r"missing 1 tensor\(s\): proj_out.bias"):
        Pipeline.from_pretrained(model_copy)


def test_unexpected_tensor(model_copy):
    edit_weights(model_copy / "vae" / WEIGHTS, lambda t: t.update({"decoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(LoadError, match=r"vae does not match .*unexpected 1 tensor\(s\): decoder.extra.weight"):
        Pipeline.from_pretrained(model_copy)


def test_wrong_shape(model_copy):
    def grow(tensors):
        tensors["norm_final.weight"] = torch.ones(33)

    edit_weights(model_copy / "transformer" / WEIGHTS, grow)
    with pytest.raises(LoadError, match=r"norm_final.weight \(checkpoint \[33\], model \[32\]\)"):
        Pipeline.from_pretrained(model_copy)


def test_missing_folder_and_not_a_model(tmp_path, model_copy):
    with pytest.raises(LoadError, match="no model folder at"):
        Pipeline.from_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="not a CogVideoX model folder: missing model_index.json, transformer/"):
        Pipeline.from_pretrained(tmp_path / "empty")
    shutil.rmtree(model_copy / "vae")
    (model_copy / "transformer" / WEIGHTS).unlink()
    with pytest.raises(LoadError, match=f"missing vae/config.json, transformer/{WEIGHTS}"):
        check_model_dir(model_copy)


def test_a_component_folder_given_as_the_model_names_the_model_folder(tiny_rope_dir, tmp_path):
    """`--model CogVideoX-2b/vae` (the folder diffusers' AutoencoderKLCogVideoX takes): the error listed
    every file of a model folder as missing; it says what the folder is and which one to give."""
    from cogvideox.autoencoder import VideoAutoencoder

    vae = tiny_rope_dir / "vae"
    with pytest.raises(LoadError, match=rf"^{vae} holds a single component \(AutoencoderKLCogVideoX\), not a whole "
                                        rf"model; give the model folder {tiny_rope_dir}$"):
        VideoAutoencoder.from_pretrained(vae)
    with pytest.raises(LoadError, match=rf"^{tiny_rope_dir}/scheduler holds a single component "
                                        r"\(CogVideoXDDIMScheduler\), not a whole model"):
        Pipeline.from_pretrained(tiny_rope_dir / "scheduler")
    alone = shutil.copytree(tiny_rope_dir / "transformer", tmp_path / "transformer")
    with pytest.raises(LoadError, match=r"holds a single component \(CogVideoXTransformer3DModel\), not a whole "
                                        "model; give the folder holding model_index.json$"):
        Pipeline.from_pretrained(alone)


def test_a_tokenizer_folder_without_its_vocabulary_is_refused(model_copy):
    """transformers builds a T5 tokenizer from tokenizer_config.json alone, one that reads every word as
    <unk>: the video would ignore its prompt without a word said."""
    tokenizer = model_copy / "tokenizer"
    (tokenizer / "tokenizer.json").unlink(missing_ok=True)
    words = Pipeline.from_pretrained(model_copy).text_encoder.tokenizer  # spiece.model alone is enough
    assert words.unk_token_id not in words("a cat").input_ids
    (tokenizer / "spiece.model").unlink()
    assert (tokenizer / "tokenizer_config.json").is_file()
    with pytest.raises(LoadError, match=r"not a CogVideoX model folder: missing tokenizer/spiece.model \(or tokenizer.json\)"):
        Pipeline.from_pretrained(model_copy)


@pytest.mark.parametrize("content", [b"", b"not a model"])
def test_a_damaged_sentencepiece_model_is_a_load_error(model_copy, content):
    """An empty spiece.model (an interrupted download) loaded, and failed mid-generation with an index out
    of range; a damaged one was answered with advice to install tiktoken."""
    tokenizer = model_copy / "tokenizer"
    (tokenizer / "tokenizer.json").unlink(missing_ok=True)
    (tokenizer / "spiece.model").write_bytes(content)
    with pytest.raises(LoadError, match=r"cannot load the T5 text encoder of .*spiece.model is not a SentencePiece "
                                        r"model \(.*\): a damaged or truncated download\?$"):
        Pipeline.from_pretrained(model_copy)


def test_a_repo_id_with_a_trailing_slash_is_told_apart_from_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError, match=r"^no model folder at THUDM/CogVideoX-2b/; for the Hugging Face repo, write THUDM/CogVideoX-2b \(no trailing slash\)$"):
        resolve_model_dir("THUDM/CogVideoX-2b/")


@pytest.mark.parametrize(
    "component, key, value, message",
    [
        ("transformer", "num_layers", "two", "num_layers must be an integer, got 'two'"),
        ("transformer", "use_rotary_positional_embeddings", "yes", "use_rotary_positional_embeddings must be true or false"),
        ("vae", "block_out_channels", [32, "x"], r"block_out_channels\[1\] must be an integer"),
        ("vae", "scaling_factor", None, "scaling_factor must not be null"),
    ],
)
def test_config_values_of_the_wrong_type_are_load_errors(model_copy, component, key, value, message):
    path = model_copy / component / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(LoadError, match=f"{component}/config.json: {message}"):
        Pipeline.from_pretrained(model_copy)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("d_model", "abc", "text_encoder/config.json: d_model must be a positive integer, got 'abc'"),
        ("d_model", "32", "text_encoder/config.json: d_model must be a positive integer, got '32'"),
        ("num_layers", "2", "cannot load the T5 text encoder of .*num_layers"),
    ],
)
def test_t5_config_values_of_the_wrong_type_are_load_errors(model_copy, key, value, message):
    path = model_copy / "text_encoder" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    with pytest.raises(LoadError, match=message) as info:
        Pipeline.from_pretrained(model_copy)
    assert "\n" not in str(info.value)  # the CLI prints it as one line


@pytest.mark.parametrize(
    "component, key, value, message",
    [
        ("transformer", "activation_fn", "relu9", "activation_fn 'relu9' is not supported"),
        ("vae", "temporal_compression_ratio", 4.5, "temporal_compression_ratio must be a power of two"),
    ],
)
def test_config_values_no_network_can_be_built_with_name_their_file(model_copy, component, key, value, message):
    path = model_copy / component / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    with pytest.raises(LoadError, match=f"{component}/config.json: {message}"):
        Pipeline.from_pretrained(model_copy)


@pytest.mark.parametrize(
    "component, key, value, message",
    [
        ("transformer", "max_text_seq_length", 0, "max_text_seq_length must be positive, got 0"),
        ("transformer", "sample_width", 0, "sample_width must be positive, got 0"),
        ("transformer", "sample_frames", -3, "sample_frames must be positive, got -3"),
        ("vae", "scaling_factor", 0.0, "scaling_factor must be positive, got 0.0"),
        ("vae", "norm_num_groups", 0, "norm_num_groups must be positive, got 0"),
        ("vae", "temporal_compression_ratio", 2.5, "temporal_compression_ratio must be a power of two, got 2.5"),
        ("scheduler", "num_train_timesteps", 0, "num_train_timesteps must be positive, got 0"),
        ("scheduler", "beta_start", -1.0, r"beta_start must be in \[0, 1\), got -1.0"),
        ("scheduler", "snr_shift_scale", 0.0, "snr_shift_scale must be positive, got 0.0"),
    ],
)
def test_config_values_out_of_range_are_load_errors(model_copy, component, key, value, message):
    """Zero or negative sizes and scales fail on loading, naming the file, not as a division by zero or an
    empty schedule in the first generation."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = model_copy / component / name
    path.write_text(json.dumps(json.loads(path.read_text()) | {key: value}))
    with pytest.raises(LoadError, match=f"{component}/{name}: {message}$"):
        Pipeline.from_pretrained(model_copy)


def test_a_model_that_is_not_a_path_and_an_unknown_text_device_are_input_errors(tiny_rope_dir):
    with pytest.raises(InputError, match="a model is a folder path or a Hugging Face repo id, got int 5"):
        Pipeline.from_pretrained(5)
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        Pipeline.from_pretrained(tiny_rope_dir, text_device="gpu")


CONVERT = ("which cogvideox does not read: it reads safetensors files; convert them by loading the component with "
           "diffusers' or transformers' from_pretrained(folder{v}) and writing it back with save_pretrained(folder{v}), "
           "which writes safetensors")


def test_bin_weights_are_named(model_copy):
    (model_copy / "vae" / WEIGHTS).rename(model_copy / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(LoadError) as info:
        Pipeline.from_pretrained(model_copy)
    bins = "found only .bin weights (diffusion_pytorch_model.bin), " + CONVERT.format(v="")
    assert str(info.value).endswith(f"missing vae/{WEIGHTS} ({bins})")
    with pytest.raises(LoadError, match=rf"vae has no {WEIGHTS}: found only \.bin weights"):
        weight_files(model_copy / "vae")


def test_bin_variant_weights_are_named(model_copy, variant_dir, tmp_path):
    """`diffusion_pytorch_model.fp16.bin` alone in a component is named, as plain `.bin` weights are, with
    the variant to convert them in; asking for that variant says the same, not that there is none."""
    (model_copy / "vae" / WEIGHTS).rename(model_copy / "vae" / "diffusion_pytorch_model.fp16.bin")
    bins = ".bin weights ({}), " + CONVERT.format(v=", variant='fp16'")
    with pytest.raises(LoadError) as info:
        Pipeline.from_pretrained(model_copy)
    assert str(info.value).endswith(f"missing vae/{WEIGHTS} (found only {bins.format('diffusion_pytorch_model.fp16.bin')})")
    with pytest.raises(LoadError) as info:
        Pipeline.from_pretrained(model_copy, variant="fp16")
    assert str(info.value) == (f"{model_copy} has no safetensors weights of the variant 'fp16': found only "
                               + bins.format("vae/diffusion_pytorch_model.fp16.bin"))
    # The other components in fp16 safetensors: the VAE's fp16 .bin is named among what is missing.
    mixed = shutil.copytree(variant_dir, tmp_path / "mixed")
    (mixed / "vae" / WEIGHTS).rename(mixed / "vae" / "diffusion_pytorch_model.fp16.bin")
    with pytest.raises(LoadError) as info:
        Pipeline.from_pretrained(mixed, variant="fp16")
    only = bins.format("diffusion_pytorch_model.fp16.bin")
    assert str(info.value).endswith(f"missing vae/{WEIGHTS} (or its fp16 variant; found only {only})")
    with pytest.raises(LoadError) as info:
        weight_files(mixed / "vae", variant="fp16")
    assert str(info.value).endswith(f"nor {WEIGHTS}; found only {only}")


def test_a_folder_saved_with_a_variant_is_told_how_to_be_read(model_copy, tmp_path):
    """`save_pretrained(variant="fp16")` names the weights `*.fp16.safetensors` (or shards and an index
    `*.safetensors.index.fp16.json`), which only `variant="fp16"` reads. Without it, the error names the
    variant the folder holds and how to ask for it; with it, the folder loads."""
    from diffusers import CogVideoXTransformer3DModel

    vae = model_copy / "vae"
    (vae / WEIGHTS).rename(vae / "diffusion_pytorch_model.fp16.safetensors")
    transformer = model_copy / "transformer"
    reference = CogVideoXTransformer3DModel.from_pretrained(transformer)
    (transformer / WEIGHTS).unlink()
    reference.save_pretrained(transformer, variant="fp16", max_shard_size="20KB")
    with pytest.raises(LoadError) as info:
        Pipeline.from_pretrained(model_copy)
    hint = "found only the weights of the variant fp16; load them with variant='fp16' (--variant fp16)"
    assert str(info.value).endswith(f"missing transformer/{WEIGHTS} ({hint}), vae/{WEIGHTS} ({hint})")
    loaded = Pipeline.from_pretrained(model_copy, variant="fp16").transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())


@pytest.fixture(scope="module")
def variant_dir(tiny_rope_dir, tmp_path_factory):
    return make_variant_model(tiny_rope_dir, tmp_path_factory.mktemp("variant") / "model")


def test_a_variant_loads_as_diffusers_loads_it(variant_dir):
    """`variant="fp16"`: the transformer's single fp16 file, the T5's fp16 shards, and the VAE, which has
    no fp16 file, its plain one: the tensors of diffusers' `from_pretrained(variant="fp16")`. Without the
    variant, the plain weights, as diffusers without it."""
    reference = diffusers.DiffusionPipeline.from_pretrained(variant_dir, variant="fp16", torch_dtype=torch.float32)
    plain = diffusers.DiffusionPipeline.from_pretrained(variant_dir, torch_dtype=torch.float32)
    for want, variant in ((reference, "fp16"), (plain, None)):
        got = Pipeline.from_pretrained(variant_dir, variant=variant)
        for name in ("transformer", "vae", "text_encoder"):
            ours_state = getattr(got, name).state_dict() if name != "text_encoder" else got.text_encoder.model.state_dict()
            theirs = getattr(want, name).state_dict()
            assert ours_state.keys() == theirs.keys(), name
            assert all(torch.equal(ours_state[k], theirs[k].float()) for k in theirs), (name, variant)
    ours_fp16 = Pipeline.from_pretrained(variant_dir, variant="fp16").transformer.state_dict()
    ours_plain = Pipeline.from_pretrained(variant_dir).transformer.state_dict()
    assert not all(torch.equal(ours_fp16[k], ours_plain[k]) for k in ours_plain)  # the two are told apart


def _legacy_shards(component, stem):
    """Rename a component's fp16 shards and index to the names older diffusers wrote:
    `{stem}-00001-of-0000N.fp16.safetensors` and `{stem}.safetensors.fp16.index.json`."""
    index = component / f"{stem}.safetensors.index.fp16.json"
    data = json.loads(index.read_text())
    renamed = {}
    for name in set(data["weight_map"].values()):
        shard = name.removeprefix(f"{stem}.fp16").removesuffix(".safetensors")  # -00001-of-0000N
        renamed[name] = f"{stem}{shard}.fp16.safetensors"
        (component / name).rename(component / renamed[name])
    data["weight_map"] = {key: renamed[name] for key, name in data["weight_map"].items()}
    (component / f"{stem}.safetensors.fp16.index.json").write_text(json.dumps(data))
    index.unlink()


def test_legacy_variant_shards_load_as_diffusers_loads_them(variant_dir, tmp_path, monkeypatch):
    """Shards named `diffusion_pytorch_model-00001-of-00002.fp16.safetensors` with the index
    `diffusion_pytorch_model.safetensors.fp16.index.json` (older diffusers' `save_pretrained(variant=)`;
    diffusers still reads them) are the fp16 variant too, for the T5's `model...` files as well: loaded
    from a folder, they are the tensors diffusers loads (the T5's: those of the files before renaming,
    as transformers does not read the old names), and from the hub they are what is fetched."""
    import fnmatch

    import huggingface_hub
    from diffusers import CogVideoXTransformer3DModel
    from huggingface_hub.errors import LocalEntryNotFoundError
    from transformers import T5EncoderModel

    legacy = shutil.copytree(variant_dir, tmp_path / "legacy")
    transformer = legacy / "transformer"
    fp16 = CogVideoXTransformer3DModel.from_pretrained(transformer, variant="fp16", torch_dtype=torch.float16)
    (transformer / "diffusion_pytorch_model.fp16.safetensors").unlink()
    fp16.save_pretrained(transformer, variant="fp16", max_shard_size="20KB")
    _legacy_shards(transformer, "diffusion_pytorch_model")
    _legacy_shards(legacy / "text_encoder", "model")
    shards = sorted(p.name for p in transformer.glob("diffusion_pytorch_model-*-of-*.fp16.safetensors"))
    assert len(shards) > 1

    got = Pipeline.from_pretrained(legacy, variant="fp16")
    want = {
        "transformer": CogVideoXTransformer3DModel.from_pretrained(transformer, variant="fp16").state_dict(),
        "vae": diffusers.AutoencoderKLCogVideoX.from_pretrained(legacy / "vae").state_dict(),  # no fp16 files
        "text_encoder": T5EncoderModel.from_pretrained(variant_dir / "text_encoder", variant="fp16").state_dict(),
    }
    plain = Pipeline.from_pretrained(legacy).transformer.state_dict()
    assert not all(torch.equal(plain[k], want["transformer"][k].float()) for k in plain)  # not the plain ones
    for name, theirs in want.items():
        ours = (got.text_encoder.model if name == "text_encoder" else getattr(got, name)).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k].float()) for k in theirs), name

    repo_files = sorted(p.relative_to(legacy).as_posix() for p in legacy.rglob("*") if p.is_file())

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        folder = tmp_path / "snapshot"
        for name in repo_files:
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(legacy / name, folder / name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: repo_files)
    folder = resolve_model_dir("tiny/legacy", variant="fp16")
    fetched = _weight_files_in(folder)
    assert fetched == {
        "transformer/diffusion_pytorch_model.safetensors.fp16.index.json",
        *(f"transformer/{name}" for name in shards),
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors.fp16.index.json",
        *(f"text_encoder/model-0000{i}-of-00003.fp16.safetensors" for i in (1, 2, 3)),
    }
    fetched_state = Pipeline.from_pretrained(folder, variant="fp16").transformer.state_dict()
    assert all(torch.equal(fetched_state[k], want["transformer"][k].float()) for k in fetched_state)


def _weight_files_in(folder) -> set[str]:
    """The weight files and shard indexes a downloaded folder holds, relative to it."""
    return {p.relative_to(folder).as_posix() for pattern in ("*.safetensors", "*.index*.json")
            for p in folder.rglob(pattern)}  # fmt: skip


def test_an_unknown_variant_and_a_component_without_weights_are_named(variant_dir, tiny_rope_dir, tmp_path):
    """A variant no component has is refused, naming those there are (diffusers refuses it too, naming
    none); a component with neither the variant's weights nor plain ones is named with both."""
    with pytest.raises(LoadError, match=rf"^{variant_dir} has no weights of the variant 'ema'; its weights come in "
                                        r"the variant\(s\) fp16$"):
        Pipeline.from_pretrained(variant_dir, variant="ema")
    with pytest.raises(LoadError, match=rf"^{tiny_rope_dir} has no weights of the variant 'fp16'; it has no "
                                        "variants: load it without one$"):
        Pipeline.from_pretrained(tiny_rope_dir, variant="fp16")
    with pytest.raises(InputError, match="a variant is a name like fp16"):
        Pipeline.from_pretrained(variant_dir, variant="../fp16")
    damaged = shutil.copytree(variant_dir, tmp_path / "model")
    (damaged / "vae" / WEIGHTS).unlink()
    (damaged / "text_encoder" / "model.fp16-00002-of-00003.safetensors").unlink()
    with pytest.raises(LoadError, match=rf"missing vae/{WEIGHTS} \(or its fp16 variant\), "
                                        "text_encoder/model.fp16-00002-of-00003.safetensors$"):
        Pipeline.from_pretrained(damaged, variant="fp16")
    with pytest.raises(LoadError, match=rf"vae has no weights: neither the fp16 variant "
                                        rf"\(diffusion_pytorch_model.fp16.safetensors\) nor {WEIGHTS}$"):
        weight_files(damaged / "vae", variant="fp16")


def test_mismatched_components(model_copy):
    config = json.loads((model_copy / "vae" / "config.json").read_text())
    config["latent_channels"] = 8
    (model_copy / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="4-channel latents but the VAE has 8 latent channels"):
        Pipeline.from_pretrained(model_copy)

    with pytest.raises(LoadError, match="64-wide text embeddings but the T5 text encoder produces 32"):
        check_components(TransformerConfig(in_channels=16, text_embed_dim=64), VAEConfig(), 32)
    # A default frame count the VAE would not give back: the first default call would be refused.
    with pytest.raises(LoadError, match=r"sample_frames 10 is not of the form 8k\+1"):
        check_components(TransformerConfig(in_channels=16, sample_frames=10), VAEConfig(), 4096)


def test_sharded_save_and_load(ours, tmp_path):
    folder = ours.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (folder / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == "diffusion_pytorch_model-00001-of-%05d.safetensors" % len(shards)
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.transformer.state_dict())

    again = Pipeline.from_pretrained(folder)
    for name in ("transformer", "vae"):
        a, b = getattr(ours, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    # The reference reads what we write: same layout, same model.
    ref = load_reference_pipeline(folder)
    want = ours("a cat", **SMALL, seed=4, progress=False, output_type="latent").latents
    got = ref("a cat", **SMALL, generator=torch.Generator().manual_seed(4), output_type="latent").frames
    assert torch.equal(got, want)

    # And we read shards the reference writes.
    ref_folder = tmp_path / "reference-sharded"
    ref.save_pretrained(ref_folder, max_shard_size="20KB")
    assert len(list((ref_folder / "transformer").glob("*.safetensors"))) > 1
    theirs = Pipeline.from_pretrained(ref_folder).transformer.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in ours.transformer.state_dict().items())

    (folder / "transformer" / shards[-1]).unlink()
    with pytest.raises(LoadError, match=f"not a CogVideoX model folder: missing transformer/{shards[-1]}"):
        Pipeline.from_pretrained(folder)


def test_saving_over_a_folder_in_the_other_layout_leaves_no_stale_weights(ours, tmp_path):
    folder = ours.save_pretrained(tmp_path / "model")
    ours.save_pretrained(folder, max_shard_size="20KB")  # single files -> shards
    for component, stem in (("transformer", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):  # fmt: skip
        assert not (folder / component / f"{stem}.safetensors").exists(), component
        assert (folder / component / f"{stem}.safetensors.index.json").exists(), component
    ours.save_pretrained(folder)  # and back
    assert not list(folder.glob("*/*.index.json")) and not list(folder.glob("*/*-of-*.safetensors"))
    again = Pipeline.from_pretrained(folder).text_encoder.model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in ours.text_encoder.model.state_dict().items())


def test_a_quantised_pipeline_is_not_saved(tiny_rope_dir, tmp_path):
    pipe = Pipeline.from_pretrained(tiny_rope_dir).accelerate(quantize="int8")
    with pytest.raises(InputError, match="cannot save a pipeline whose transformer is quantised"):
        pipe.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_read_tensors_gives_back_every_kind_of_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(33, 17, generator=g).bfloat16(),
        "w.f32": torch.randn(5000, generator=g),
        "w.f16": torch.randn(3, 4, 5, generator=g).half(),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "fp8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    got = dict(read_tensors(path))  # each tensor holds its own map: valid after the file is done
    assert got.keys() == tensors.keys()
    for name, want in tensors.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name

    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(LoadError, match="the file ends inside tensor .*truncated"):
        list(read_tensors(path))
    path.write_bytes(b"\x05")
    with pytest.raises(LoadError, match="not a safetensors file"):
        list(read_tensors(path))


@pytest.mark.parametrize(
    "head", [b"\xff" * 8 + b"{}", (10**6).to_bytes(8, "little") + b'{"w": '], ids=["2**64 - 1", "cut off"]
)
def test_a_header_length_past_the_end_of_the_file_is_a_load_error(model_copy, head):
    """A cut-off download, or a file of another kind, whose first 8 bytes promise a header longer than
    the file: a load error naming the file, before any memory is asked for it."""
    (model_copy / "vae" / WEIGHTS).write_bytes(head)
    with pytest.raises(LoadError, match=f"vae/{WEIGHTS}: the file ends inside its safetensors header"):
        Pipeline.from_pretrained(model_copy)


def test_a_header_nested_too_deep_is_a_load_error_naming_the_file(model_copy):
    """"[[[[..." exhausts the JSON parser's recursion: a RecursionError traceback, not a message."""
    path = model_copy / "vae" / WEIGHTS
    nested = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(len(nested).to_bytes(8, "little") + nested)
    with pytest.raises(LoadError, match=f"cannot read {path}: damaged safetensors header"):
        Pipeline.from_pretrained(model_copy)


def edit_header(path, edit):
    """Rewrite the JSON header of a safetensors file through `edit(header)`, its tensor bytes unchanged."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])


def _first(header):
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _second_onto_first(header):
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda h: h[_first(h)].pop("data_offsets"), "the entry of tensor"),
        (lambda h: h[_first(h)].update(shape="8"), "the entry of tensor"),
        (lambda h: h.update({_first(h): 5}), "the entry of tensor"),
        (lambda h: h[_first(h)].update(data_offsets=[-32, 0]), "the entry of tensor"),
        (_second_onto_first, "starts at byte 0 of the data, not 32"),
    ],
    ids=["no offsets", "shape not a list", "entry not an object", "negative offsets", "overlapping tensors"],
)
def test_a_header_that_lies_is_a_load_error_naming_the_file_and_tensor(model_copy, edit, why):
    """Entries of the wrong form were a KeyError or TypeError; byte ranges before the data or over another
    tensor's bytes loaded the header's or that tensor's bytes as weights, silently."""
    path = model_copy / "vae" / WEIGHTS
    edit_header(path, edit)
    with pytest.raises(LoadError, match=rf"cannot read {path}: damaged safetensors header \(.*{why}"):
        Pipeline.from_pretrained(model_copy)


def test_integer_tensors_in_place_of_weights_are_a_load_error_naming_the_file_and_tensor(model_copy):
    path = model_copy / "vae" / WEIGHTS
    bias = "decoder.conv_in.conv.bias"
    edit_weights(path, lambda t: t.update({bias: t[bias].to(torch.int32)}))
    with pytest.raises(LoadError, match=f"{path}: tensor decoder.conv_in.conv.bias holds I32 values but the model's "
                                        "decoder.conv_in.conv.bias is floating-point"):
        Pipeline.from_pretrained(model_copy)
    # A float tensor of another precision is cast, as the reference casts it.
    edit_weights(path, lambda t: t.update({k: v.double() for k, v in t.items()}))
    want = load_file(path)
    got = Pipeline.from_pretrained(model_copy).vae.state_dict()
    assert all(torch.equal(got[k], want[k].float()) for k in want)


def test_an_index_whose_weight_map_names_no_files_is_a_load_error(ours, tmp_path):
    folder = ours.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"proj_out.bias": 5}}))
    with pytest.raises(LoadError, match=r"missing transformer/.*index.json \(unreadable\)"):
        Pipeline.from_pretrained(folder)
    with pytest.raises(LoadError, match="is not a safetensors index"):
        weight_files(folder / "transformer")


@pytest.mark.parametrize(
    "name", ["model_index.json", "transformer/config.json", "scheduler/scheduler_config.json", f"vae/{WEIGHTS}",
             "text_encoder/model.safetensors"],
)  # fmt: skip
def test_an_unreadable_file_is_a_load_error_naming_it(tiny_rope_dir, monkeypatch, name):
    """A file of another user's download, or of mode 000 (simulated: the tests may run as root)."""
    import builtins
    import io

    denied = str(tiny_rope_dir / name)
    real_open = builtins.open

    def open_or_deny(file, *args, **kwargs):
        if isinstance(file, str | os.PathLike) and os.fspath(file) == denied:
            raise PermissionError(13, "Permission denied", denied)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_or_deny)
    monkeypatch.setattr(io, "open", open_or_deny)
    with pytest.raises(LoadError, match=f"cannot read {denied}: Permission denied"):
        Pipeline.from_pretrained(tiny_rope_dir)


def rss_file_bytes():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident file pages from /proc (Linux)")
def test_a_cast_load_keeps_one_tensor_of_the_file_resident_at_a_time(tmp_path):
    """Loading with a cast maps each tensor on its own and drops the map once converted; one map of the
    whole file (`safe_open`) would keep every page read until the file closed (here: all 64 MiB)."""
    layers = 8
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 2048, bias=False) for _ in range(layers)])  # 8 MiB each
    folder = tmp_path / "m"
    save_weights(model, folder, max_shard_size="1GB")
    with torch.device("meta"):
        empty = torch.nn.Sequential(*[torch.nn.Linear(1024, 2048, bias=False) for _ in range(layers)])

    baseline, peak = rss_file_bytes(), 0
    original = torch.Tensor.to

    def to_and_watch(tensor, *args, **kwargs):
        nonlocal peak
        peak = max(peak, rss_file_bytes() - baseline)
        return original(tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", to_and_watch)
        load_weights(empty, weight_files(folder), torch.bfloat16, torch.device("cpu"), "m")
    tensor_bytes = 1024 * 2048 * 4
    assert peak <= 2 * tensor_bytes, f"{peak / 2**20:.0f} MiB of the file resident at once"
    for a, b in zip(model.parameters(), empty.parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(b, a.detach().bfloat16())


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident file pages from /proc (Linux)")
def test_a_mapped_weight_gives_its_pages_back_when_replaced(tmp_path):
    """Loaded without a cast, the weights are the file's pages; replacing them one by one (as offloading
    does when it packs them into one host buffer) frees each tensor's pages at once, not at the end."""
    layers = 8
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 2048, bias=False) for _ in range(layers)])  # 8 MiB each
    save_weights(model, tmp_path, max_shard_size="1GB")
    with torch.device("meta"):
        loaded = torch.nn.Sequential(*[torch.nn.Linear(1024, 2048, bias=False) for _ in range(layers)])
    load_weights(loaded, weight_files(tmp_path), torch.float32, torch.device("cpu"), "m")
    baseline = rss_file_bytes()
    for p in loaded.parameters():
        float(p.detach().sum())  # read: the pages become resident
    tensor_bytes = 1024 * 2048 * 4
    assert rss_file_bytes() - baseline >= layers * tensor_bytes * 0.9
    with torch.no_grad():
        for i, p in enumerate(loaded.parameters()):
            p.data = p.data.clone()
            left = layers - 1 - i
            assert rss_file_bytes() - baseline <= (left + 0.5) * tensor_bytes, f"after {i + 1} replaced"
    for a, b in zip(model.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_exact_dtype_load_on_the_cpu_maps_the_file(tmp_path):
    """No cast, CPU: the weights are the file's pages (no copy); writing to them never touches the file."""
    model = torch.nn.Linear(64, 64)
    save_weights(model, tmp_path)
    before = (tmp_path / WEIGHTS).read_bytes()
    with torch.device("meta"):
        loaded = torch.nn.Linear(64, 64)
    load_weights(loaded, weight_files(tmp_path), torch.float32, torch.device("cpu"), "m")
    assert torch.equal(loaded.weight, model.weight)
    with torch.no_grad():
        loaded.weight.add_(1.0)
    assert (tmp_path / WEIGHTS).read_bytes() == before


def test_a_revision_for_a_local_model_is_said_to_be_unused(tiny_rope_dir):
    with pytest.warns(UserWarning, match=f"revision 'v2' only applies to Hugging Face repo ids; the local folder {tiny_rope_dir} is used as it is"):
        assert resolve_model_dir(tiny_rope_dir, revision="v2") == tiny_rope_dir
    with pytest.warns(UserWarning, match="the built-in demo model is used as it is"):
        resolve_model_dir(None, revision="v2")


def test_repo_id_resolves_from_the_cache_without_network(tiny_rope_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    cache = tmp_path / "hub"
    repo = cache / "models--tiny--cogvideox"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_rope_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although the model is cached")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert resolve_model_dir("tiny/cogvideox") == repo / "snapshots" / commit
    with pytest.raises(LoadError, match="tiny/missing is not in the Hugging Face cache .*offline"):
        resolve_model_dir("tiny/missing", local_files_only=True)


def test_offline_a_revision_not_cached_and_an_incomplete_snapshot_are_named(tiny_rope_dir, tmp_path, monkeypatch):
    """Offline, the error said "<repo> is not in the Hugging Face cache" for a repo that is there at another
    revision, and "incomplete" without saying what was missing; it names the revision and the files now."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--tiny--cogvideox"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = shutil.copytree(tiny_rope_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_dir("tiny/cogvideox", revision=commit, local_files_only=True) == snapshot
    with pytest.raises(LoadError, match=r"^tiny/cogvideox at revision 'v2' is not in the Hugging Face cache "
                                        r"\(.*\) and downloads are off \(offline mode\)"):
        resolve_model_dir("tiny/cogvideox", revision="v2", local_files_only=True)
    (snapshot / "transformer" / WEIGHTS).unlink()
    with pytest.raises(LoadError, match=rf"^tiny/cogvideox is incomplete in the Hugging Face cache \({snapshot}: "
                                        rf"missing transformer/{WEIGHTS}\) and downloads are off"):
        resolve_model_dir("tiny/cogvideox", local_files_only=True)


def test_repo_id_offline_mode(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(LoadError, match="THUDM/CogVideoX-2b is not in the Hugging Face cache"):
        Pipeline.from_pretrained("THUDM/CogVideoX-2b")


def test_demo_model(tiny_rope_dir, tmp_path, monkeypatch):
    import cogvideox.demo

    monkeypatch.setattr(cogvideox.demo, "DEMO_MODEL_DIR", tmp_path / "absent", raising=False)
    with pytest.raises(LoadError, match="demo model is not installed"):
        resolve_model_dir(None)
    monkeypatch.setattr(cogvideox.demo, "DEMO_MODEL_DIR", tiny_rope_dir)
    assert resolve_model_dir(None) == tiny_rope_dir


def test_an_incomplete_cached_snapshot_with_the_hub_unreachable_says_so(tiny_rope_dir, tmp_path, monkeypatch):
    """A download cut off before the VAE weights arrived (a dangling link into blobs/), then a run with
    no network: huggingface_hub hands back the snapshot as it is; the error must say the cache is
    incomplete, not that the folder is not a CogVideoX model."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--THUDM--CogVideoX-2b"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for i, file in enumerate(sorted(p for p in tiny_rope_dir.rglob("*") if p.is_file())):
        blob, link = repo / "blobs" / f"{i:040x}", snapshot / file.relative_to(tiny_rope_dir)
        shutil.copyfile(file, blob)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # the cache's layout: links into blobs/
    (snapshot / "vae" / WEIGHTS).resolve().unlink()  # the blob never finished
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def unreachable(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)
    with pytest.raises(LoadError, match=rf"THUDM/CogVideoX-2b is incomplete in the Hugging Face cache \(.*missing vae/{WEIGHTS}\) .*the hub cannot be reached") as info:
        resolve_model_dir("THUDM/CogVideoX-2b")
    assert "not a CogVideoX model folder" not in str(info.value)


@pytest.mark.parametrize("name", ["model_index.json", "transformer/config.json", "vae/config.json",
                                  "scheduler/scheduler_config.json"])
@pytest.mark.parametrize(
    "text, why",
    [(b'{"_class_name": "\xff"}', r"is not UTF-8 text \(byte 17\)"),
     (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON: nested too deep"),
     (b'{"num_layers": ' + b"1" * 5000 + b"}", "is not valid JSON: Exceeds the limit")],
    ids=["latin-1", "nested", "huge integer"],
)
def test_a_config_json_that_json_cannot_read_is_a_load_error_naming_the_file(model_copy, name, text, why):
    """A UnicodeDecodeError, RecursionError or ValueError traceback before."""
    (model_copy / name).write_bytes(text)
    with pytest.raises(LoadError, match=f"{model_copy / name} {why}"):
        Pipeline.from_pretrained(model_copy)


def test_a_variant_from_the_hub_fetches_its_files_and_not_the_plain_ones(variant_dir, tmp_path, monkeypatch):
    """With the repo's file list known, a component that has the variant is fetched as that variant only
    (the plain duplicate would double a 5B download), one that has not as its plain weights; a variant
    the repo lacks is named, with those it has, before anything is downloaded."""
    import fnmatch

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_files = sorted(p.relative_to(variant_dir).as_posix() for p in variant_dir.rglob("*") if p.is_file())
    downloads = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        downloads.append(allow_patterns)
        folder = tmp_path / "snapshot"
        for name in repo_files:
            if any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(variant_dir / name, folder / name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, revision=None: repo_files)
    with pytest.raises(LoadError, match=r"^tiny/variants has no weights of the variant 'ema'; its weights come in "
                                        r"the variant\(s\) fp16$"):
        resolve_model_dir("tiny/variants", variant="ema")
    assert downloads == []
    folder = resolve_model_dir("tiny/variants", variant="fp16")
    fetched = _weight_files_in(folder)
    assert fetched == {
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        *(f"text_encoder/model.fp16-0000{i}-of-00003.safetensors" for i in (1, 2, 3)),
    }
    got = Pipeline.from_pretrained(folder, variant="fp16").transformer.state_dict()
    want = Pipeline.from_pretrained(variant_dir, variant="fp16").transformer.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_offline_a_revision_not_cached_names_the_cached_ones(tiny_rope_dir, tmp_path, monkeypatch):
    """Offline, a revision (or a variant) the cache lacks: the error names the revisions it holds."""
    import huggingface_hub.constants as hub

    repo = tmp_path / "hub" / "models--tiny--cogvideox"
    commit, other = "0123456789abcdef0123456789abcdef01234567", "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(tiny_rope_dir, repo / "snapshots" / commit)
    shutil.copytree(tiny_rope_dir, repo / "snapshots" / other)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(LoadError, match=r"^tiny/cogvideox at revision 'v2' is not in the Hugging Face cache \(.*\) "
                                        r"and downloads are off \(offline mode\); the cache holds it at revision\(s\) "
                                        r"main \(0123456\), fedcba9; download it once"):
        resolve_model_dir("tiny/cogvideox", revision="v2", local_files_only=True)
    with pytest.raises(LoadError, match=r"^tiny/cogvideox in the Hugging Face cache \(.*\) has no weights of the "
                                        "variant 'fp16'; it has no variants: load it without one$"):
        resolve_model_dir("tiny/cogvideox", variant="fp16", local_files_only=True)


@pytest.mark.parametrize(
    "options, message",
    [(dict(local_files_only="no"), "local_files_only must be True or False, got 'no'"),
     (dict(revision=3), r"revision must be a branch, tag or commit name \(a str\), got 3")],
)
def test_loading_options_of_the_wrong_type_are_refused(options, message):
    """`local_files_only="no"` was read as True, and `revision=3` only warned as unused by the demo model."""
    with pytest.raises(InputError, match=message):
        Pipeline.from_pretrained(None, **options)
    with pytest.raises(InputError, match=message):
        VideoAutoencoder.from_pretrained(None, **options)
