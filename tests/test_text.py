"""TextEncoder against the reference pipeline's prompt encoding, on a tiny offline T5."""

import shutil
import warnings

import pytest
import torch
from helpers import make_tiny_t5
from safetensors.torch import load_file, save_file

from cogvideox import LoadError
from cogvideox.text import TextEncoder

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a cat sits on the mat", "", "a panda plays a small guitar in the bamboo forest, Zebra!"]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    tokenizer, model = make_tiny_t5(root / "text_encoder", root / "tokenizer", d_model=32)
    return root, tokenizer, model


def reference_embeds(tokenizer, model, prompts, max_sequence_length=226):
    pipe = diffusers.CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None
    )
    with torch.no_grad():  # as under the reference's __call__ (it matters for float16 on the CPU)
        return pipe._get_t5_prompt_embeds(
            prompts, max_sequence_length=max_sequence_length, device=torch.device("cpu")
        )


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_encode_matches_reference(tiny_t5):
    _, tokenizer, model = tiny_t5
    got = TextEncoder(tokenizer, model).encode(PROMPTS)
    want = reference_embeds(tokenizer, model, PROMPTS)
    assert got.shape == (3, 226, 32) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-6
    # The pad positions are encoded without a mask: they are not zero and differ between prompts.
    assert got[0, -1].abs().sum() > 0
    assert not torch.allclose(got[0, -1], got[2, -1])


def test_single_string_is_a_batch_of_one(tiny_t5):
    _, tokenizer, model = tiny_t5
    encoder = TextEncoder(tokenizer, model)
    one = encoder.encode("a cat sits on the mat", max_sequence_length=64)
    assert one.shape == (1, 64, 32)
    batch = encoder.encode(PROMPTS, max_sequence_length=64)
    torch.testing.assert_close(one[0], batch[0], rtol=1e-5, atol=1e-6)


def test_from_pretrained_round_trip(tiny_t5):
    root, tokenizer, model = tiny_t5
    loaded = TextEncoder.from_pretrained(root / "text_encoder", root / "tokenizer")
    assert not loaded.model.training
    assert loaded.tokenizer(PROMPTS).input_ids == tokenizer(PROMPTS).input_ids
    assert torch.equal(loaded.encode(PROMPTS), TextEncoder(tokenizer, model).encode(PROMPTS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_from_pretrained_loads_in_the_requested_dtype(tiny_t5, dtype):
    from transformers import T5EncoderModel

    root, tokenizer, _ = tiny_t5
    loaded = TextEncoder.from_pretrained(root / "text_encoder", root / "tokenizer", dtype=dtype)
    assert loaded.dtype == dtype
    param_dtypes = {p.dtype for p in loaded.model.parameters()}
    # In float16 transformers keeps T5's FFN output projections (`wo`) in float32, as for the reference.
    assert param_dtypes == ({dtype} if dtype == torch.bfloat16 else {dtype, torch.float32})
    got = loaded.encode(PROMPTS[:1])
    assert got.dtype == dtype
    ref_model = T5EncoderModel.from_pretrained(str(root / "text_encoder"), dtype=dtype)
    assert torch.equal(got, reference_embeds(tokenizer, ref_model, PROMPTS[:1]))
    # Asking for another output dtype only casts the result.
    assert torch.equal(loaded.encode(PROMPTS[:1], dtype=torch.float32), got.float())


def test_from_pretrained_builds_on_meta_ties_the_embedding_and_is_strict(tiny_t5, tmp_path):
    root, tokenizer, model = tiny_t5
    loaded = TextEncoder.from_pretrained(root / "text_encoder", root / "tokenizer")
    assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight
    assert {k: v.shape for k, v in loaded.model.named_parameters()} == {
        k: v.shape for k, v in model.named_parameters()
    }
    state = load_file(root / "text_encoder" / "model.safetensors")
    assert "encoder.embed_tokens.weight" not in state  # save_pretrained leaves the tied alias out

    def folder_with(tensors, name):
        folder = tmp_path / name
        shutil.copytree(root / "text_encoder", folder)
        save_file(tensors, folder / "model.safetensors")
        return folder

    # A checkpoint that holds the alias as well loads to the same model.
    both = folder_with(state | {"encoder.embed_tokens.weight": state["shared.weight"].clone()}, "both")
    again = TextEncoder.from_pretrained(both, root / "tokenizer")
    assert again.model.encoder.embed_tokens.weight is again.model.shared.weight
    assert torch.equal(again.encode(PROMPTS), loaded.encode(PROMPTS))
    # Sharded as transformers writes big encoders: the index names the shards.
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert torch.equal(TextEncoder.from_pretrained(sharded, root / "tokenizer").encode(PROMPTS), loaded.encode(PROMPTS))
    # Strict: an unexpected, a missing or a mis-shaped tensor is an error that names it.
    extra = folder_with(state | {"encoder.block.0.extra.weight": torch.zeros(2)}, "extra")
    with pytest.raises(LoadError, match=r"unexpected 1 tensor\(s\): encoder.block.0.extra.weight"):
        TextEncoder.from_pretrained(extra, root / "tokenizer")
    missing = folder_with({k: v for k, v in state.items() if k != "encoder.final_layer_norm.weight"}, "missing")
    with pytest.raises(LoadError, match=r"missing 1 tensor\(s\): encoder.final_layer_norm.weight"):
        TextEncoder.from_pretrained(missing, root / "tokenizer")
    wrong = folder_with(state | {"encoder.final_layer_norm.weight": torch.zeros(5)}, "wrong")
    with pytest.raises(LoadError, match=r"encoder.final_layer_norm.weight \(checkpoint \[5\], model \[32\]\)"):
        TextEncoder.from_pretrained(wrong, root / "tokenizer")


def test_truncation_warns_with_the_dropped_token_count(tiny_t5):
    _, tokenizer, model = tiny_t5
    encoder = TextEncoder(tokenizer, model)
    assert len(tokenizer("cat").input_ids) == 2  # one piece plus the end token
    prompt = " ".join(["cat"] * 20 + ["dog"] * 5)  # 25 pieces + end token = 26 tokens
    with pytest.warns(UserWarning) as record:
        got = encoder.encode(["a cat", prompt], max_sequence_length=16)
    assert len(record) == 1
    message = str(record[0].message)
    assert "the prompt 'cat cat cat cat cat cat cat cat cat cat ...' is 25 tokens long" in message
    assert "last 10 tokens were dropped" in message
    # The kept part is 15 pieces (the end token takes the 16th slot): 5 cats and 5 dogs were cut.
    assert "'cat cat cat cat cat dog dog dog dog dog'" in message
    assert rel_err(got, reference_embeds(tokenizer, model, ["a cat", prompt], 16)) <= 1e-6


def test_truncation_warning_quotes_only_the_start_of_a_long_cut(tiny_t5):
    _, tokenizer, model = tiny_t5
    prompt = " ".join(["cat"] * 15 + ["dog"] * 400)
    with pytest.warns(UserWarning) as record:
        TextEncoder(tokenizer, model).encode(prompt, max_sequence_length=16)
    message = str(record[0].message)
    assert "last 400 tokens were dropped: 'dog dog" in message and message.endswith(" ...'")
    assert len(message) < 300


def test_no_warning_when_the_prompt_fits(tiny_t5):
    _, tokenizer, model = tiny_t5
    prompt = " ".join(["cat"] * 15)  # exactly 16 tokens with the end token
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextEncoder(tokenizer, model).encode(prompt, max_sequence_length=16)


def test_bad_inputs_get_clear_errors(tiny_t5):
    root, tokenizer, model = tiny_t5
    encoder = TextEncoder(tokenizer, model)
    with pytest.raises(ValueError, match="at least one prompt"):
        encoder.encode([])
    with pytest.raises(TypeError, match="prompt 1 must be a string"):
        encoder.encode(["a cat", 3])
    with pytest.raises(ValueError, match="max_sequence_length"):
        encoder.encode("a cat", max_sequence_length=0)
    with pytest.raises(FileNotFoundError, match="text encoder folder not found"):
        TextEncoder.from_pretrained(root / "missing", root / "tokenizer")
