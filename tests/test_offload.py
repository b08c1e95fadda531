"""Offloading (`cogvideox.fast.offload`): the schedule of fetches and releases, outputs bitwise equal to the
resident run, host memory; the automatic choice (`cogvideox.fast.memory_plan`); and what an out-of-memory
error says (`cogvideox.fast.oom`).

The CPU plays the compute device: fetched weights are real copies in separate buffers, and with
`poison=True` a weight at home reads as NaN, so any use outside its fetch window changes the output.
The CUDA stream, event and page-locking paths run only on a GPU (last test).
"""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cogvideox import Pipeline, read_video
from cogvideox.cli import main
from cogvideox.errors import InputError, OutOfMemoryError
from cogvideox.fast import memory_plan, offload, oom
from cogvideox.loading import read_model_configs
from cogvideox.models.config import TransformerConfig, VAEConfig
from cogvideox.models.transformer import TRANSFORMER_PRESETS, CogVideoXTransformer

pytest.importorskip("diffusers")  # the tiny model folders are written by the reference

CPU = torch.device("cpu")
# 17 frames: 5 latent frames, which the VAE decodes in two chunks sharing a frame cache.
SMALL = dict(num_frames=17, height=32, width=48, num_inference_steps=2, max_sequence_length=16, seed=5)
PROMPT = "a cat sits on the mat"
GIB = 2**30


def resident_pipeline(folder):
    """The pipeline with every weight in its own fresh allocation. Loaded on the CPU, weights are views
    into the safetensors buffer at 8-byte alignments, and the CPU BLAS picks other kernels (other
    roundings, ~1e-7) for such pointers; a GPU load gives each tensor its own aligned block, and so do the
    offloaded copies (256-byte aligned)."""
    pipe = Pipeline.from_pretrained(folder)
    with torch.no_grad():
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder.model):
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.clone()
    return pipe


@pytest.fixture(scope="module")
def resident(tiny_rope_dir):
    """The resident run's output, the truth every mode must reproduce bit for bit."""
    return resident_pipeline(tiny_rope_dir)(PROMPT, progress=False, **SMALL)


def offloaded(folder, mode, **kwargs):
    pipe = Pipeline.from_pretrained(folder)
    pipe.offload = offload.apply(pipe, mode, CPU, record=True, poison=True, **kwargs)
    return pipe


@pytest.mark.parametrize("mode", ["model", "stream", "sequential"])
def test_modes_reproduce_the_resident_run_bitwise(tiny_rope_dir, resident, mode):
    pipe = offloaded(tiny_rope_dir, mode)
    out = pipe(PROMPT, progress=False, **SMALL)
    assert torch.equal(out.latents, resident.latents)
    assert all(np.array_equal(a, b) for a, b in zip(out.frames, resident.frames))
    # Every weight went back home after the call, and each group was released as often as fetched.
    assert pipe.offload.device_bytes() == 0
    assert all(pipe.offload.where(g.name) == "host" for g in pipe.offload.groups())
    events = pipe.offload.events
    fetched = [name for what, name in events if what in ("fetch", "prefetch")]
    released = [name for what, name in events if what == "release"]
    assert sorted(fetched) == sorted(released) and fetched
    # A second call (the server's case) works the same.
    again = pipe(PROMPT, progress=False, **SMALL)
    assert torch.equal(again.latents, resident.latents)


def test_components_take_turns_in_model_mode(tiny_rope_dir):
    pipe = offloaded(tiny_rope_dir, "model")
    pipe(PROMPT, progress=False, **SMALL)
    events = pipe.offload.events
    # T5 in, (twice called for CFG, fetched once), out when the transformer comes, which stays for every
    # step and leaves for the VAE; then the VAE goes home at the end of the call.
    assert events == [
        ("fetch", "text_encoder"),
        ("release", "text_encoder"),
        ("fetch", "transformer"),
        ("release", "transformer"),
        ("fetch", "vae"),
        ("release", "vae"),
    ]


def test_poison_catches_a_weight_used_at_home(tiny_rope_dir, resident):
    # The check the bitwise tests rely on: a weight the hooks do not bring in reads as NaN.
    pipe = offloaded(tiny_rope_dir, "model")
    pipe.offload._hooks.pop().remove()  # the VAE decoder's entry hook (registered last)
    out = pipe(PROMPT, progress=False, **SMALL)
    assert torch.equal(out.latents, resident.latents)  # T5 and the transformer were brought in
    assert not any(np.array_equal(a, b) for a, b in zip(out.frames, resident.frames))


def test_text_encoder_on_the_cpu(tiny_rope_dir, resident):
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload="stream", text_device="cpu")
    assert "text_encoder" not in pipe.offload.components
    assert pipe.text_encoder.model.device == CPU
    out = pipe(PROMPT, progress=False, **SMALL)
    assert torch.equal(out.latents, resident.latents)


# ----------------------------------------------------------------------------------------------------
# The streaming schedule, on a transformer of 5 blocks


def tiny_transformer(layers=5):
    config = TransformerConfig(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=layers, sample_width=8, sample_height=8, sample_frames=9,
        max_text_seq_length=4, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = CogVideoXTransformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 4, 8, 8)
    text = torch.randn(2, 4, 8)
    rope = model.rotary_embedding(3, 8, 8)
    return model, (x, text, torch.tensor([500, 500])), dict(image_rotary_emb=rope)


def streamed(model, lookahead):
    plan = offload.Offload("stream", CPU, lookahead=lookahead, record=True, poison=True)
    plan.add_component("transformer", model, [model], model.transformer_blocks)
    return plan


def block(i):
    return f"transformer.transformer_blocks.{i}"


def test_stream_prefetches_ahead_and_releases_after_use():
    model, args, kwargs = tiny_transformer(5)
    with torch.no_grad():
        want = model(*args, **kwargs)
    plan = streamed(model, lookahead=2)
    resident_during = []
    for b in model.transformer_blocks:  # which blocks are on the device while each block runs
        b.register_forward_hook(
            lambda *_: resident_during.append(sorted(g.name for g in plan.components["transformer"].blocks
                                                     if g.slot is not None))
        )
    with torch.inference_mode():
        first = model(*args, **kwargs)
        plan.events.append(("---", ""))
        second = model(*args, **kwargs)
    assert torch.equal(first, want) and torch.equal(second, want)

    P, R = "prefetch", "release"
    expected_first = [
        ("fetch", "transformer"),  # the embeddings and output layers, for the whole forward
        ("fetch", block(0)), (P, block(1)), (P, block(2)), (R, block(0)),
        (P, block(3)), (R, block(1)),
        (P, block(4)), (R, block(2)),
        (P, block(0)), (R, block(3)),  # wrapping round: the next forward's first blocks
        (P, block(1)), (R, block(4)),
    ]  # fmt: skip
    expected_second = [
        (P, block(2)), (R, block(0)),  # block 0 was already there: no fetch on demand
        (P, block(3)), (R, block(1)),
        (P, block(4)), (R, block(2)),
        (P, block(0)), (R, block(3)),
        (P, block(1)), (R, block(4)),
    ]  # fmt: skip
    cut = plan.events.index(("---", ""))
    assert plan.events[:cut] == expected_first
    assert plan.events[cut + 1 :] == expected_second
    # Each block was resident while it ran (post-hook order: our recorder ran before the release), and
    # never more than lookahead + 1 = 3 blocks at once, in a ring of 3 buffers.
    assert all(len(r) <= 3 for r in resident_during)
    assert len(plan.components["transformer"].ring.buffers) == 3
    plan.release_all()
    assert plan.device_bytes() == 0 and plan.components["transformer"].ring is None


def test_stream_without_lookahead_fetches_each_block_when_needed():
    model, args, kwargs = tiny_transformer(3)
    with torch.no_grad():
        want = model(*args, **kwargs)
    plan = streamed(model, lookahead=0)
    with torch.inference_mode():
        assert torch.equal(model(*args, **kwargs), want)
    assert plan.events == [("fetch", "transformer")] + [
        (what, block(i)) for i in range(3) for what in ("fetch", "release")
    ]


def test_blocks_called_out_of_order_still_get_their_weights():
    model, args, kwargs = tiny_transformer(4)
    plan = streamed(model, lookahead=1)
    video, text = torch.randn(2, 48, 32), torch.randn(2, 4, 32)
    emb = torch.randn(2, 8)
    with torch.inference_mode():
        plan._enter(plan.components["transformer"])
        for i in (2, 0, 3, 3, 1):
            got = model.transformer_blocks[i](video, text, emb)
            assert torch.isfinite(got[0]).all()  # NaN if block i had run on its poisoned home copy
    plan.release_all()
    assert plan.device_bytes() == 0


@pytest.mark.parametrize("poison", [False, True])
def test_remove_restores_plain_resident_weights(poison):
    """Every weight comes back as a plain tensor of its own with its real value (also when the parked
    copies are poisoned), and each packed host copy is let go during the removal, not after it."""
    import weakref

    model, args, kwargs = tiny_transformer(3)
    with torch.no_grad():
        want = model(*args, **kwargs)
    plan = offload.Offload("stream", CPU, lookahead=1, poison=poison)
    plan.add_component("transformer", model, [model], model.transformer_blocks)
    packed = [weakref.ref(group.host) for group in plan.groups()]
    plan.remove()
    assert not model._forward_pre_hooks and not model.transformer_blocks[0]._forward_pre_hooks
    assert all(ref() is None for ref in packed)  # freed while `plan` still exists
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs), want)


# ----------------------------------------------------------------------------------------------------
# Layers one at a time, and tied weights


def test_sequential_moves_one_layer_at_a_time_and_keeps_tied_weights_together(tiny_rope_dir):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    t5 = pipe.text_encoder.model
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied in the checkpoint
    plan = offload.Offload("sequential", CPU, record=True, poison=True)
    plan.add_component("text_encoder", t5, [t5])
    ids = torch.tensor([[5, 6, 7, 1, 0, 0]])
    tied = [g for g in plan.groups() if any(t is t5.shared.weight for t in g.tensors)]
    assert len(tied) == 1  # one group, one host copy, brought in by whichever module runs
    with torch.inference_mode():
        got = t5(input_ids=ids).last_hidden_state
    pipe2 = Pipeline.from_pretrained(tiny_rope_dir)
    with torch.inference_mode():
        want = pipe2.text_encoder.model(input_ids=ids).last_hidden_state
    assert torch.equal(got, want)
    # Strictly one layer on the device at a time: every fetch is followed by its own release.
    events = plan.events
    assert all(events[i][0] == "fetch" and events[i + 1] == ("release", events[i][1])
               for i in range(0, len(events), 2))  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Host memory: one packed copy per group, nothing else


def test_host_copy_is_the_weights_once():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(256, 512), nn.LayerNorm(512), nn.Linear(512, 256))
                            for _ in range(4)])  # fmt: skip
    model = nn.Sequential(nn.Linear(8, 256), blocks[0], blocks[1], blocks[2], blocks[3])
    model.blocks = blocks
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = offload.Offload("stream", CPU, lookahead=1)
    plan.add_component("m", model, [model], blocks)
    assert plan.weight_bytes == weights  # every tensor in exactly one group
    assert plan.host_bytes <= 1.01 * weights  # alignment only
    for group in plan.groups():  # at home, each weight is a view of its group's one host buffer
        start = group.host.data_ptr()
        for t in group.tensors:
            assert start <= t.data_ptr() < start + group.nbytes


def test_unsupported_tensor_types_are_refused():
    class Odd(torch.Tensor):
        pass

    layer = nn.Linear(2, 2)
    layer.weight = nn.Parameter(torch.zeros(2, 2).as_subclass(Odd))
    with pytest.raises(TypeError, match="cannot offload a"):
        offload.WeightGroup("x", list(layer.parameters()), lambda n: torch.empty(n, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------------
# The automatic choice

FIVE_B = {
    "text_encoder": memory_plan.ComponentSize(total=int(9.5 * GIB), rest=int(0.25 * GIB), block=int(0.38 * GIB),
                                          blocks=24, layer=int(0.25 * GIB)),
    "transformer": memory_plan.ComponentSize(total=int(10.6 * GIB), rest=int(0.06 * GIB), block=int(0.25 * GIB),
                                         blocks=42, layer=int(0.07 * GIB)),
    "vae": memory_plan.ComponentSize(total=int(0.4 * GIB), rest=int(0.4 * GIB), block=0, blocks=0,
                                 layer=int(0.01 * GIB)),
}  # fmt: skip
ACTIVATIONS = {"text": int(0.1 * GIB), "denoise": int(2.6 * GIB), "decode": int(4.5 * GIB)}


def test_peaks_per_mode():
    peak = {m: memory_plan.estimated_peak(m, FIVE_B, ACTIVATIONS) / GIB for m in offload.MODES}
    assert peak["none"] == pytest.approx(9.5 + 10.6 + 0.4 + 4.5, abs=0.01)
    assert peak["model"] == pytest.approx(10.6 + 2.6, abs=0.01)
    assert peak["stream"] == pytest.approx(0.4 + 4.5, abs=0.01)  # the VAE stage is now the largest
    assert peak["sequential"] == pytest.approx(0.01 + 4.5, abs=0.01)
    # T5 on the CPU takes its weights out of 'none'.
    assert memory_plan.estimated_peak("none", FIVE_B, ACTIVATIONS, text_on_device=False) / GIB == pytest.approx(
        10.6 + 0.4 + 4.5, abs=0.01
    )
    # Stream holds the rest plus lookahead + 1 blocks.
    assert memory_plan.resident_weight_bytes("stream", "denoise", FIVE_B, lookahead=2) == int(0.06 * GIB) + 3 * int(
        0.25 * GIB
    )


@pytest.mark.parametrize(
    "free_gib, mode",
    [(80, "none"), (30, "none"), (20, "model"), (8, "stream"), (5.05, "sequential"), (2, "sequential")],
)
def test_auto_takes_the_fastest_mode_that_fits(free_gib, mode):
    choice = memory_plan.choose_mode(FIVE_B, ACTIVATIONS, int(free_gib * GIB))
    assert choice.mode == mode and not choice.vae_tiling
    assert choice.reason.startswith(f"offload {mode!r}: {free_gib:.1f} GiB free")
    if free_gib == 2:
        assert "less than even 'sequential'" in choice.reason and "--vae-tiling" in choice.reason


TILED = {"text": int(0.1 * GIB), "denoise": int(2.6 * GIB), "decode": int(1.0 * GIB)}


@pytest.mark.parametrize(
    "free_gib, mode, tiling",
    [(30, "none", False), (26, "none", True), (20, "model", False), (5.05, "stream", True), (3, "sequential", True)],
)
def test_auto_turns_vae_tiling_on_before_it_takes_a_slower_mode(free_gib, mode, tiling):
    # 26 GiB: everything resident fits only with a tiled decode (23.1 GiB against 25.0 untiled); 5.05 GiB:
    # streaming fits with a tiled decode, where untiled only 'sequential' did.
    choice = memory_plan.choose_mode(FIVE_B, ACTIVATIONS, int(free_gib * GIB), tiled_activations=TILED)
    assert (choice.mode, choice.vae_tiling) == (mode, tiling)
    label = f"offload {mode!r}" + (" with VAE tiling" if tiling else "")
    assert choice.reason.startswith(f"{label}: {free_gib:.1f} GiB free")
    assert "'none' ~23.1" in choice.reason  # the tiled estimates are shown beside the untiled ones


def test_auto_keeps_the_weights_on_the_device_when_the_host_cannot_hold_them():
    # 20 GiB of weights: with 16 GiB of host memory, offloading is out; an 80 GB GPU takes them all.
    choice = memory_plan.choose_mode(FIVE_B, ACTIVATIONS, 80 * GIB, host_bytes=16 * GIB)
    assert choice.mode == "none"
    assert "the host's 16.0 GiB available cannot hold the 20.5 GiB of weights offloading keeps there" in choice.reason
    # Enough host memory: the device's free memory decides, as before.
    assert memory_plan.choose_mode(FIVE_B, ACTIVATIONS, 8 * GIB, host_bytes=64 * GIB).mode == "stream"
    # Neither fits: an error before anything is loaded, with both figures.
    with pytest.raises(OutOfMemoryError, match=r"fits neither on the device \(8.0 GiB free, 'none' needs ~25.0 GiB\) "
                       r"nor in host memory for offloading \(16.0 GiB available, the weights take 20.5 GiB\); "
                       r"try a smaller model") as info:  # fmt: skip
        memory_plan.choose_mode(FIVE_B, ACTIVATIONS, 8 * GIB, host_bytes=16 * GIB)
    assert info.value.stage == "load"


@pytest.mark.parametrize(
    "device, dtype, mode, text_device, available_gib, message",
    [
        ("cpu", torch.float32, "none", None, 30,
         "in fp32 on the CPU the model takes 41.0 GiB of weights, and this machine has 30.0 GiB available; "
         "try --dtype bf16 (half the memory)"),
        ("cpu", torch.bfloat16, "none", None, 16,
         "on the CPU the model takes 20.5 GiB of weights, and this machine has 16.0 GiB available; "
         "try a GPU (--device cuda), or more memory"),
        ("cuda", torch.bfloat16, "stream", None, 16,
         "offload 'stream' keeps the weights in page-locked host memory: 20.5 GiB of weights, and this machine "
         "has 16.0 GiB available; try --offload none, if the GPU can hold the whole model"),
        ("cuda", torch.bfloat16, "none", "cpu", 8,
         "T5 on the CPU takes 9.5 GiB of weights, and this machine has 8.0 GiB available; "
         "try T5 on the GPU (no --text-device cpu)"),
    ],
)  # fmt: skip
def test_weights_that_cannot_fit_in_host_memory_are_refused_before_loading(
    monkeypatch, device, dtype, mode, text_device, available_gib, message
):
    sizes = FIVE_B
    if dtype == torch.float32:
        sizes = {k: memory_plan.ComponentSize(v.total * 2, v.rest * 2, v.block * 2, v.blocks, v.layer * 2)
                 for k, v in FIVE_B.items()}  # fmt: skip
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: int(available_gib * GIB))
    with pytest.raises(OutOfMemoryError) as info:
        memory_plan.check_host_memory(mode, sizes, device, text_device, dtype)
    assert str(info.value) == "not enough host memory to load the model: " + message
    assert info.value.stage == "load"
    # With room to spare, nothing is said; a resident GPU run holds no weight on the host at all.
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: 64 * GIB)
    memory_plan.check_host_memory(mode, sizes, device, text_device, dtype)
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: 1)
    memory_plan.check_host_memory("none", sizes, "cuda", None, dtype)


def test_available_host_memory_counts_swap_only_where_it_may_be_used(monkeypatch):
    monkeypatch.setattr(memory_plan, "cgroup_room", lambda: None)  # a container's limit would cap both
    if not Path("/proc/meminfo").exists():
        assert memory_plan.available_host_memory(swap=True) is None
        return
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    pinned, pageable = memory_plan.available_host_memory(swap=False), memory_plan.available_host_memory(swap=True)
    assert 0 < pinned <= info["MemTotal"]
    assert abs(pageable - pinned - info.get("SwapFree", 0)) < 64 * 2**20  # read a moment apart


def test_the_cpu_default_drops_to_bf16_when_fp32_would_not_fit(tiny_rope_dir, monkeypatch):
    fp32 = sum(size.total for size in memory_plan.folder_sizes(tiny_rope_dir, torch.float32).values())
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: int(fp32 * 0.75))
    with pytest.warns(UserWarning, match="in fp32 the model's weights take .* loading them in bf16 instead"):
        pipe = Pipeline.from_pretrained(tiny_rope_dir, device="cpu")
    assert pipe.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    # Asked for by name, fp32 is not changed behind the user's back: it is refused, with the way out.
    with pytest.raises(OutOfMemoryError, match="in fp32 on the CPU the model takes .* try --dtype bf16"):
        Pipeline.from_pretrained(tiny_rope_dir, device="cpu", dtype="fp32")
    # Room for fp32: the default stays fp32, silently.
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: fp32 * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Pipeline.from_pretrained(tiny_rope_dir, device="cpu").dtype == torch.float32


def test_a_container_memory_limit_bounds_the_host_memory(tmp_path):
    """/proc/meminfo shows the whole machine; a container's cgroup limit is what the kernel enforces."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("17179869184\n")  # 16 GiB
    (v2 / "memory.current").write_text(str(10 * GIB))
    (v2 / "memory.stat").write_text(f"anon {8 * GIB}\ninactive_file {GIB}\nactive_file 0\n")
    assert memory_plan.cgroup_room(v2) == 16 * GIB - 10 * GIB + GIB  # the idle file cache can be reclaimed
    (v2 / "memory.max").write_text("max\n")
    assert memory_plan.cgroup_room(v2) is None

    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(8 * GIB))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(7 * GIB))
    (v1 / "memory" / "memory.stat").write_text(f"cache {3 * GIB}\ntotal_inactive_file {2 * GIB}\n")
    assert memory_plan.cgroup_room(v1) == 3 * GIB
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert memory_plan.cgroup_room(v1) is None
    assert memory_plan.cgroup_room(tmp_path / "none") is None


def test_cli_refuses_a_model_too_big_for_host_memory_in_one_line(tiny_rope_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory_plan, "available_host_memory", lambda swap: 1000)
    output = tmp_path / "cat.mp4"
    assert main(cli_args(tiny_rope_dir, output, "--device", "cpu")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("cogvideox: error: not enough host memory to load the model: on the CPU the model takes")
    assert list(tmp_path.iterdir()) == []


def test_auto_from_a_folder_reads_only_headers(tiny_rope_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    assert memory_plan.folder_sizes(tiny_rope_dir, torch.float32) == memory_plan.pipeline_sizes(pipe)
    configs = read_model_configs(tiny_rope_dir)
    # On the CPU: no offloading.
    assert memory_plan.choose_for_folder(tiny_rope_dir, configs, torch.float32, "cpu").mode == "none"
    # On a (pretend) GPU with almost nothing free, the tiny model still gets a mode and a reason.
    monkeypatch.setattr(memory_plan, "free_device_memory", lambda device: 10_000)
    choice = memory_plan.choose_for_folder(tiny_rope_dir, configs, torch.float32, "cuda")
    assert choice.mode == "sequential" and "0.0 GiB free" in choice.reason
    monkeypatch.setattr(memory_plan, "free_device_memory", lambda device: 80 * GIB)
    assert memory_plan.choose_for_folder(tiny_rope_dir, configs, torch.float32, "cuda").mode == "none"


def test_auto_tiling_reaches_the_vae(tiny_rope_dir, monkeypatch):
    """When "auto" needs a tiled decode to fit, the loaded pipeline decodes in tiles (both ways in)."""
    choice = memory_plan.Choice("none", True, "offload 'none' with VAE tiling: (pretend)")
    monkeypatch.setattr(memory_plan, "choose_for_folder", lambda *args, **kwargs: choice)
    pipe = Pipeline.from_pretrained(tiny_rope_dir, device="cpu", offload="auto")
    assert pipe.vae.use_tiling and pipe.offload is None and pipe.offload_choice == choice.reason

    monkeypatch.setattr(memory_plan, "choose_for_pipeline", lambda *args, **kwargs: choice)
    pipe.vae.disable_tiling()
    pipe.enable_offload("auto", "cpu")
    assert pipe.vae.use_tiling and pipe.offload_choice == choice.reason


def test_tiling_that_auto_turned_on_is_off_again_after_to(tiny_rope_dir, monkeypatch):
    """`to()` leaves offloading, and with it the VAE tiling "auto" turned on, which stayed on: the decode
    was tiled (slower, other frames) after the pipeline was made resident. Tiling the user asked for stays."""
    choice = memory_plan.Choice("model", True, "offload 'model' with VAE tiling: (pretend)")
    monkeypatch.setattr(memory_plan, "choose_for_folder", lambda *args, **kwargs: choice)
    monkeypatch.setattr(memory_plan, "choose_for_pipeline", lambda *args, **kwargs: choice)
    resident = resident_pipeline(tiny_rope_dir)
    z = torch.randn(1, 3, resident.vae.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(2))
    plain = resident.decode(z)  # 32x48
    pipe = resident_pipeline(tiny_rope_dir)
    pipe.vae.enable_tiling(16, 16)  # tiles smaller than the video, for when tiling is on
    pipe.vae.disable_tiling()
    pipe.enable_offload("auto", CPU)
    assert pipe.vae.use_tiling and pipe.offload.mode == "model"
    tiled = pipe.decode(z)
    assert np.abs(tiled[0].astype(int) - plain[0].astype(int)).max() > 2
    pipe.to(CPU)
    assert not pipe.vae.use_tiling and not pipe.offload_auto and pipe.offload_choice == ""
    assert np.abs(pipe.decode(z)[0].astype(int) - plain[0].astype(int)).max() <= 1
    loaded = Pipeline.from_pretrained(tiny_rope_dir, device="cpu", offload="auto").to(CPU)
    assert not loaded.vae.use_tiling
    for mine in (Pipeline.from_pretrained(tiny_rope_dir, vae_tiling=True, offload="auto"),
                 Pipeline.from_pretrained(tiny_rope_dir, vae_tiling=True).enable_offload("auto", CPU)):  # fmt: skip
        assert mine.to(CPU).vae.use_tiling


def test_another_offload_mode_after_auto_turns_its_tiling_off_and_a_lift_keeps_it(tiny_rope_dir, tmp_path, monkeypatch):
    """A mode the user names after "auto" leaves auto's VAE tiling behind (it stayed on); "auto" again
    chooses from the user's own setting (auto's tiling is not taken for the user's); offloading lifted and
    applied again around a LoRA change keeps it."""
    chosen = [memory_plan.Choice("model", True, "offload 'model' with VAE tiling: (pretend)")]
    seen = []

    def choose(pipe, *args, **kwargs):
        seen.append(pipe.vae.use_tiling)  # the tiling "auto" sees when it chooses
        return chosen[0]

    monkeypatch.setattr(memory_plan, "choose_for_pipeline", choose)
    pipe = resident_pipeline(tiny_rope_dir)
    pipe.enable_offload("auto", CPU)
    assert pipe.vae.use_tiling and pipe.auto_tiling
    pipe.enable_offload("auto", CPU)  # again: chosen from the user's untiled VAE, not from auto's tiles
    assert seen == [False, False] and pipe.vae.use_tiling
    pipe.load_lora(_style_lora(tiny_rope_dir, tmp_path))  # lifts the offloading and applies it again
    assert pipe.vae.use_tiling and pipe.offload.mode == "model" and pipe.offload_auto
    chosen[0] = memory_plan.Choice("model", False, "offload 'model': (pretend, the decode fits)")
    pipe.enable_offload("auto", CPU)
    assert not pipe.vae.use_tiling
    chosen[0] = memory_plan.Choice("model", True, "offload 'model' with VAE tiling: (pretend)")
    pipe.enable_offload("auto", CPU)
    pipe.enable_offload("model", CPU)
    assert not pipe.vae.use_tiling and not pipe.auto_tiling and pipe.offload.mode == "model"
    pipe.vae.enable_tiling()  # the user's own: no offload mode turns it off
    pipe.enable_offload("auto", CPU)
    pipe.enable_offload("none", CPU)
    assert pipe.vae.use_tiling


def test_default_activations_grow_with_the_model_and_shrink_with_tiling():
    five_b, two_b = TRANSFORMER_PRESETS["CogVideoX-5b"], TRANSFORMER_PRESETS["CogVideoX-2b"]
    vae = VAEConfig()
    acts = memory_plan.default_activations(five_b, vae, torch.bfloat16)
    tokens = 226 + 13 * 30 * 45  # 49 x 480 x 720 -> 13 x 60 x 90 latents, 2x2 patches
    assert acts["denoise"] == 2 * tokens * 3072 * 2 * 12
    assert memory_plan.default_activations(two_b, vae, torch.bfloat16)["denoise"] < acts["denoise"]
    tiled = memory_plan.default_activations(five_b, vae, torch.bfloat16, tile=(240, 360))
    assert tiled["decode"] * 4 == acts["decode"]


def test_mode_names_are_checked():
    assert offload.check_mode(None) == "none" and offload.check_mode(" Stream ") == "stream"
    with pytest.raises(InputError, match="unknown offload mode 'fast'; use one of none, model, stream"):
        offload.check_mode("fast")


# ----------------------------------------------------------------------------------------------------
# Out of memory anyway

TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.64 GiB of which "
    "1.50 GiB is free. Including non-PyTorch memory, this process has 22.13 GiB memory in use."
)


def test_the_torch_message_is_read():
    assert oom.parse_oom(TORCH_OOM) == (2 * GIB, int(1.5 * GIB))
    assert oom.parse_oom("CUDA out of memory. Tried to allocate 20.00 MiB") == (20 * 2**20, None)
    assert oom.parse_oom("CUDA error: out of memory") == (None, None)


def raise_oom(message=TORCH_OOM):
    def fail(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(message)

    return fail


def test_oom_in_decode_names_the_stage_and_the_flag(tiny_rope_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    monkeypatch.setattr(pipe.vae, "decode", raise_oom())
    # Untiled, the decode is tried again in tiles (the denoising is not thrown away); tiled, it fails.
    with pytest.warns(UserWarning) as warned, pytest.raises(OutOfMemoryError) as info:
        pipe(PROMPT, progress=False, **SMALL)
    # The tiny model's weights are far from the 0.5 GiB short, so no offload mode would do: tile.
    assert str(warned[0].message) == (
        "out of GPU memory in VAE decoding: it asked for 2.00 GiB more with 1.50 GiB free (offload none); "
        "try --vae-tiling; decoding again in tiles, as --vae-tiling does"
    )
    error = info.value
    assert error.stage == "decode" and error.requested_bytes == 2 * GIB
    assert error.suggestion == "fewer --frames, a smaller --height/--width"
    assert not pipe.vae.use_tiling  # the fallback does not change the pipeline's settings
    pipe.vae.enable_tiling()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tiled already: no second try
        with pytest.raises(OutOfMemoryError, match="try fewer --frames, a smaller --height/--width$"):
            pipe(PROMPT, progress=False, **SMALL)


def test_an_untiled_decode_out_of_memory_gives_the_tiled_video(tiny_rope_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    pipe.vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)  # tiles smaller than the video
    want = pipe(PROMPT, progress=False, **SMALL)
    pipe.vae.disable_tiling()
    decode = pipe.vae.decode

    def decode_in_tiles_only(latents):
        if not pipe.vae.use_tiling:
            raise torch.cuda.OutOfMemoryError(TORCH_OOM)
        return decode(latents)

    monkeypatch.setattr(pipe.vae, "decode", decode_in_tiles_only)
    with pytest.warns(UserWarning, match="decoding again in tiles"):
        got = pipe(PROMPT, progress=False, **SMALL)
    assert torch.equal(got.latents, want.latents)
    np.testing.assert_array_equal(got.frames[0], want.frames[0])
    assert not pipe.vae.use_tiling


def test_oom_in_denoising_suggests_the_mode_that_frees_enough(tiny_rope_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    sizes = memory_plan.pipeline_sizes(pipe)
    short = sizes["text_encoder"].total  # 'model' frees T5 and the VAE during denoising: enough
    monkeypatch.setattr(pipe.transformer, "forward", raise_oom(f"Tried to allocate {short} B"))
    with pytest.raises(OutOfMemoryError, match=r"in denoising \(transformer\).*try --offload model$"):
        pipe(PROMPT, progress=False, **SMALL)
    # In stream mode, the weights go home after the error, and only 'sequential' is left to try.
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload="stream")
    monkeypatch.setattr(pipe.transformer.transformer_blocks[1], "forward", raise_oom("Tried to allocate 16 B"))
    with pytest.raises(OutOfMemoryError, match=r"\(offload stream\); try --offload sequential$"):
        pipe(PROMPT, progress=False, **SMALL)
    assert pipe.offload.device_bytes() == 0


def test_oom_in_text_encoding_suggests_t5_on_the_cpu(tiny_rope_dir, monkeypatch):
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload="sequential")
    monkeypatch.setattr(pipe.text_encoder.model, "forward", raise_oom("Tried to allocate 1.00 GiB"))
    with pytest.raises(OutOfMemoryError, match=r"text encoding \(T5\).*try --text-device cpu$"):
        pipe(PROMPT, progress=False, **SMALL)


# ----------------------------------------------------------------------------------------------------
# The command line


def cli_args(folder, output, *extra):
    return ["generate", PROMPT, "--model", str(folder), "--output", str(output), "--steps", "2", "--height", "32",
            "--width", "48", "--seed", "5", "--max-sequence-length", "16", "--quiet", *extra]  # fmt: skip


def test_cli_offload_flags_give_the_same_video(tiny_rope_dir, tmp_path, capsys):
    plain, offloaded_path = tmp_path / "plain.mp4", tmp_path / "offloaded.mp4"
    assert main(cli_args(tiny_rope_dir, plain)) == 0
    flags = ["--offload", "sequential", "--text-device", "cpu", "--vae-slicing"]
    assert main(cli_args(tiny_rope_dir, offloaded_path, *flags)) == 0
    assert np.array_equal(read_video(plain)[0], read_video(offloaded_path)[0])
    out = capsys.readouterr().out
    assert "offload 'sequential', T5 on cpu" in out


def test_auto_on_the_cpu_is_none(tiny_rope_dir, tmp_path, capsys):
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload="auto")
    assert pipe.offload is None and pipe.offload_choice == "offload 'none': the model computes on the CPU"
    # The CLI's default is auto; on the CPU there is nothing to say about it.
    assert main(cli_args(tiny_rope_dir, tmp_path / "a.mp4", "--vae-tiling")) == 0
    assert "offload" not in capsys.readouterr().out


def test_cli_refuses_compile_with_sequential(tiny_rope_dir, tmp_path, capsys):
    assert main(cli_args(tiny_rope_dir, tmp_path / "a.mp4", "--offload", "sequential", "--compile")) == 2
    assert "--compile does not combine with --offload sequential" in capsys.readouterr().err


def test_cli_rejects_an_unknown_mode(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "a cat", "--offload", "fast"])
    assert info.value.code == 2 and "argument --offload: invalid choice: 'fast'" in capsys.readouterr().err


def test_cli_out_of_memory_is_one_line_and_leaves_no_file(tiny_rope_dir, tmp_path, capsys, monkeypatch):
    from cogvideox.models.vae import CogVideoXVAE

    monkeypatch.setattr(CogVideoXVAE, "decode", raise_oom())
    output = tmp_path / "cat.mp4"
    assert main(cli_args(tiny_rope_dir, output, "--offload", "model")) == 1
    on_cpu, warning, error = capsys.readouterr().err.splitlines()
    assert on_cpu == ("cogvideox: warning: --offload model keeps a GPU's weights in host memory; on the CPU the "
                      "weights are there already, so it saves no memory")
    assert warning.startswith("cogvideox: warning: out of GPU memory in VAE decoding: it asked for 2.00 GiB")
    assert warning.endswith("try --vae-tiling; decoding again in tiles, as --vae-tiling does")
    assert error.startswith("cogvideox: error: out of GPU memory in VAE decoding: it asked for 2.00 GiB")
    assert error.endswith("try fewer --frames, a smaller --height/--width")
    assert list(tmp_path.iterdir()) == []  # no video, no temporary file


# ----------------------------------------------------------------------------------------------------
# The CUDA path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams, events and page-locked memory need CUDA")
def test_cuda_stream_mode_is_bitwise_and_pins_exactly():
    model, args, kwargs = tiny_transformer(6)
    model = model.cuda()
    args = tuple(a.cuda() for a in args)
    kwargs = dict(image_rotary_emb=tuple(t.cuda() for t in kwargs["image_rotary_emb"]))
    with torch.inference_mode():
        want = model(*args, **kwargs)
    plan = offload.Offload("stream", torch.device("cuda"), lookahead=2, record=True)
    plan.add_component("transformer", model, [model], model.transformer_blocks)
    assert all(g.host.is_pinned() for g in plan.groups())
    assert plan.host_bytes <= 1.1 * plan.weight_bytes
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(model(*args, **kwargs), want)
    plan.release_all()
    torch.cuda.synchronize()
    plan.remove()


@pytest.mark.parametrize("mode", ["stream", "sequential"])
def test_int8_weights_compose_with_offloading(tiny_rope_dir, mode):
    want = resident_pipeline(tiny_rope_dir).accelerate(quantize="int8")(PROMPT, progress=False, **SMALL)
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload=mode).accelerate(quantize="int8")
    assert pipe.offload.mode == mode  # quantised at home, then offloaded again
    weights = {t.dtype for g in pipe.offload.groups() for t in g.tensors}
    assert torch.int8 in weights  # the int8 layers are what moves
    out = pipe(PROMPT, progress=False, **SMALL)
    assert torch.equal(out.latents, want.latents)


@pytest.mark.parametrize("mode", ["model", "stream", "sequential"])
def test_image_and_video_inputs_go_through_the_offloaded_vae_encoder(tiny_v15_i2v_dir, tiny_rope_dir, mode):
    from helpers import sample_picture

    image = np.asarray(sample_picture())
    i2v = dict(num_frames=9, num_inference_steps=2, max_sequence_length=16, seed=3, progress=False)
    want = resident_pipeline(tiny_v15_i2v_dir)("a cat", image=image, **i2v)
    got = offloaded(tiny_v15_i2v_dir, mode)("a cat", image=image, **i2v)
    assert torch.equal(got.latents, want.latents)

    video = Pipeline.from_pretrained(tiny_rope_dir)(PROMPT, progress=False, **SMALL).frames[0]
    v2v = dict(SMALL, strength=0.7)
    want = resident_pipeline(tiny_rope_dir)("a dog runs", video=video, progress=False, **v2v)
    got = offloaded(tiny_rope_dir, mode)("a dog runs", video=video, progress=False, **v2v)
    assert torch.equal(got.latents, want.latents)
    assert all(np.array_equal(a, b) for a, b in zip(got.frames, want.frames))


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_vae_keeps_channels_last_and_fused_norms_get_their_weights(tiny_rope_dir, mode):
    from cogvideox import fast

    pipe = Pipeline.from_pretrained(tiny_rope_dir)
    z = torch.randn(1, 3, pipe.vae.config.latent_channels, 4, 6, generator=torch.Generator().manual_seed(1))
    want = pipe.decode(z)
    fast.vae_channels_last(pipe.vae)
    fast.vae_fuse_norms(pipe.vae)
    pipe.offload = offload.apply(pipe, mode, CPU, record=True, poison=True)
    weight = pipe.vae.decoder.up_blocks[0].resnets[0].conv1.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last_3d)  # the host copy keeps the layout
    got = pipe.decode(z)
    # Poisoned: a weight the fused blocks read without its module's hook would turn the video to NaN.
    assert np.abs(got[0].astype(int) - want[0].astype(int)).max() <= 1
    if mode == "sequential":  # a fused block moves as one group, its norms' weights with it
        assert "vae.decoder.up_blocks.0.resnets.0" in [g.name for g in pipe.offload.groups()]


def _style_lora(model_dir, tmp_path):
    """A LoRA "style" on to_q and to_v with random B (a fresh one changes nothing), saved: its file."""
    from cogvideox.train import lora

    source = Pipeline.from_pretrained(model_dir)
    lora.inject_lora(source.transformer, 2, 2.0, targets=("to_q", "to_v"), name="style", seed=1)
    with torch.no_grad():
        for layer in lora.lora_layers(source.transformer).values():
            layer.lora_B["style"].weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(2))
    return lora.save_lora(source.transformer, tmp_path / "style", name="style")


@pytest.mark.parametrize("mode", ["model", "stream", "sequential"])
def test_a_lora_loaded_after_offloading_is_offloaded_with_the_rest(tiny_rope_dir, tmp_path, mode):
    """`load_lora` wraps linear layers the offload hooks sit on and adds adapter weights that were not
    packed: on a GPU they would stay on the host (a device mismatch) and, in "sequential" mode, the
    wrapped base weights would never be fetched. The offloading is applied again around the load."""
    file = _style_lora(tiny_rope_dir, tmp_path)
    want = Pipeline.from_pretrained(tiny_rope_dir, lora=file)(PROMPT, progress=False, **SMALL)

    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload=mode)
    pipe.load_lora(file)
    assert pipe.offload is not None and pipe.offload.mode == mode
    managed = {id(t) for g in pipe.offload.groups() for t in g.tensors}
    assert all(id(p) in managed for p in pipe.transformer.parameters())
    got = pipe(PROMPT, progress=False, **SMALL)
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["model", "stream"])
def test_an_int8_text_encoder_composes_with_offloading(tiny_rope_dir, mode):
    want = resident_pipeline(tiny_rope_dir).accelerate(quantize_text="int8")(PROMPT, progress=False, **SMALL)
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload=mode).accelerate(quantize_text="int8")
    assert pipe.offload.mode == mode
    if mode == "stream":  # T5's blocks stream too: their int8 weights are what moves
        weights = {t.dtype for g in pipe.offload.groups() if "text" in g.name for t in g.tensors}
        assert torch.int8 in weights, weights
    out = pipe(PROMPT, progress=False, **SMALL)
    assert torch.equal(out.latents, want.latents)


def test_auto_chooses_again_once_quantising_has_shrunk_the_weights(tiny_rope_dir, monkeypatch):
    """"auto" picked an offloaded mode for the bf16/fp32 weights; `accelerate(quantize=..., quantize_text=...)`
    shrinks them, and auto then picks the faster mode they fit in (here: resident), saying so. A mode
    the user named is kept as named, and a pipeline quantised without "auto" is left where it was."""
    from cogvideox.fast import memory_plan

    full = sum(s.total for s in memory_plan.pipeline_sizes(Pipeline.from_pretrained(tiny_rope_dir)).values())

    def choose(device, sizes_fn, *args):  # a device that holds 80% of the unquantised weights
        total = sum(s.total for s in sizes_fn().values())
        mode = "none" if total <= 0.8 * full else "stream"
        return memory_plan.Choice(mode, False, f"offload {mode!r}: {total} bytes")

    monkeypatch.setattr(memory_plan, "_choose_on", choose)
    want = resident_pipeline(tiny_rope_dir).accelerate(quantize="int8", quantize_text="int8")(PROMPT, progress=False,
                                                                                           **SMALL)  # fmt: skip
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload="auto")
    assert pipe.offload.mode == "stream" and pipe.offload_auto
    pipe.accelerate(quantize="int8", quantize_text="int8")
    assert pipe.offload is None and pipe.offload_choice.startswith("after quantising, offload 'none'")
    assert torch.equal(pipe(PROMPT, progress=False, **SMALL).latents, want.latents)

    named = Pipeline.from_pretrained(tiny_rope_dir, offload="stream").accelerate(quantize="int8", quantize_text="int8")
    assert named.offload.mode == "stream" and not named.offload_auto
    exact_levers = Pipeline.from_pretrained(tiny_rope_dir, offload="auto").accelerate(cache=0.0)
    assert exact_levers.offload.mode == "stream"  # nothing shrank: no second choice


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_fuse_and_unload_of_a_lora_under_offloading_reach_the_weights_that_run(tiny_rope_dir, tmp_path, mode):
    """`unload_lora` puts plain linear layers back, which in "sequential" mode had no hook (their weights
    never fetched: NaN here, a device mismatch on a GPU); `fuse_lora` wrote weights in place rather than
    into the packed host copy that offloading reads. Both now undo the offloading around their change."""
    file = _style_lora(tiny_rope_dir, tmp_path)
    small = dict(SMALL, num_frames=9, output_type="latent", progress=False)
    plain = Pipeline.from_pretrained(tiny_rope_dir)(PROMPT, **small).latents
    live = Pipeline.from_pretrained(tiny_rope_dir, lora=file)(PROMPT, **small).latents

    pipe = Pipeline.from_pretrained(tiny_rope_dir, lora=file)
    pipe.offload = offload.apply(pipe, mode, CPU, poison=True)
    pipe.fuse_lora()
    torch.testing.assert_close(pipe(PROMPT, **small).latents, live, rtol=1e-4, atol=1e-4)
    pipe.offload.remove()
    pipe.offload = offload.apply(pipe, mode, CPU, poison=True)
    pipe.unload_lora()
    assert pipe.offload is not None and pipe.offload.mode == mode
    torch.testing.assert_close(pipe(PROMPT, **small).latents, plain, rtol=1e-4, atol=1e-4)


def test_decode_of_latents_from_the_host_under_offloading_sends_the_vae_home(tiny_rope_dir):
    """`output_type="latent"` then `decode`: the frames are the direct run's, and the VAE's weights do not
    stay on the device afterwards (a call sends every weight home; decode on its own did not)."""
    small = dict(SMALL, num_frames=9, progress=False)
    pipe = offloaded(tiny_rope_dir, "model")
    direct = pipe(PROMPT, **small)
    latents = pipe(PROMPT, output_type="latent", **small).latents.cpu()
    frames = pipe.decode(latents)
    assert all(np.array_equal(a, b) for a, b in zip(frames, direct.frames))
    assert pipe.offload.device_bytes() == 0
    with pytest.raises(InputError, match=r"latents\[None\]"):
        pipe.decode(latents[0])  # one video's latents [F, C, h, w], not a batch
    with pytest.raises(InputError, match="decode takes latents"):
        pipe.decode(latents.numpy())


def test_invert_under_offloading_sends_the_weights_home(tiny_rope_dir):
    """After `invert` no weight stays on the device (the transformer did: a 5B one is 10 GiB of a GPU)."""
    from helpers import sample_frames

    from cogvideox.inversion import invert

    pipe = offloaded(tiny_rope_dir, "model")
    frames = sample_frames(9, height=32, width=48)
    invert(pipe, frames, PROMPT, num_inference_steps=2, height=32, width=48, max_sequence_length=16,
           fixed_point_iterations=0, progress=False)  # fmt: skip
    assert pipe.offload.device_bytes() == 0


def test_a_pipeline_from_with_scheduler_follows_the_offloading_its_modules_have(tiny_rope_dir):
    """`with_scheduler` shares the modules and so their offloading. When the original offloads again (around
    `load_lora` or `accelerate`, or `enable_offload`), the other kept the removed one: its calls released
    nothing, and its `to()` or `enable_offload` failed deep inside torch."""
    small = dict(SMALL, num_frames=9, output_type="latent", progress=False)
    want = Pipeline.from_pretrained(tiny_rope_dir, scheduler="dpm")(PROMPT, **small).latents
    pipe = Pipeline.from_pretrained(tiny_rope_dir, offload="model")
    other = pipe.with_scheduler("dpm")
    pipe.enable_offload("model")
    assert torch.equal(other(PROMPT, **small).latents, want)
    assert pipe.offload.device_bytes() == 0
    assert other.offload is pipe.offload
    other.enable_offload("sequential")
    assert pipe.offload.mode == "sequential"
    other.to("cpu")
    assert pipe.offload is None and torch.equal(pipe.with_scheduler("dpm")(PROMPT, **small).latents, want)
