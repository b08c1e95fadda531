"""CFG, Ulysses and ring parallelism against the single-process model, on 2 and 4 gloo processes.

Each parallel layout must give the single-process result up to the order of fp32 sums: the tests allow
a relative error (max |a - b| / max |b|) of 1e-5 on the transformer output and the final latents, and
uint8 frames within 1/255. The sequence length of the tiny model (5 text + 36 video tokens = 41)
divides by neither 2 nor 4, so the padding path is tested too.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import free_port, join_or_fail, start_processes

from cogvideox.errors import InputError
from cogvideox.models.config import TransformerConfig
from cogvideox.models.transformer import CogVideoXTransformer
from cogvideox.parallel import Layout, build_mesh, parallelize, parse_layout
from cogvideox.parallel.cfg import CFGParallel
from cogvideox.parallel.sequence import SequenceParallel

TOLERANCE = 1e-5

TINY = dict(
    num_attention_heads=4,
    attention_head_dim=16,
    num_layers=2,
    text_embed_dim=24,
    time_embed_dim=16,
    sample_height=6,
    sample_width=8,
    sample_frames=9,
    max_text_seq_length=5,
)
CONFIGS = {
    "rope": TransformerConfig(**TINY, use_rotary_positional_embeddings=True),
    "sincos": TransformerConfig(**TINY),
}
LAYOUTS = {
    2: ["cfg=2", "ulysses=2", "ring=2"],
    4: ["cfg=2,ulysses=2", "cfg=2,ring=2", "ring=4", "ulysses=4", "ulysses=2,ring=2"],
}


def _transformer(variant: str) -> CogVideoXTransformer:
    torch.manual_seed(0)
    model = CogVideoXTransformer(CONFIGS[variant]).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero or unit init left to hide a misplaced tensor
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(model: CogVideoXTransformer):
    """A [uncond ; cond] batch of 2: latents [2, 3, 16, 6, 8] (36 video tokens), 5 text tokens."""
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, 16, 6, 8, generator=g)
    text = torch.randn(2, 5, 24, generator=g)
    timestep = torch.tensor([500, 500])
    rope = model.rotary_embedding(3, 6, 8)
    return latents, text, timestep, rope


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def _spawn(worker, world: int, *args, deadline_s: float = 600) -> None:
    """`worker(rank, world, *args)` on `world` gloo processes; a run still going after `deadline_s`
    (a process waiting in a collective the others skipped) is killed and fails the test."""
    context = start_processes(_init_and_run, (world, free_port(), worker, args), world)
    join_or_fail(context, deadline_s, f"{worker.__name__} on {world} processes")


def _init_and_run(rank: int, world: int, port: int, worker, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------
# The transformer under every layout


PIPELINE_LAYOUTS = {2: "cfg=2", 4: "cfg=2,ulysses=2"}
CALL = dict(
    prompt=["a cat sits on the mat", "a dog runs through the park"],
    num_frames=9,
    height=64,
    width=64,
    num_inference_steps=2,
    guidance_scale=6.0,
    seed=3,
    progress=False,
)


def _tiled(pipe):
    pipe.vae.enable_tiling(32, 32, 0.25, 0.25)  # 8x8 latents in 4x4 tiles, stride 3: 3 x 3 = 9 tiles
    return pipe


def _worker(rank: int, world: int, folder: str, out_file: str) -> None:
    """Every layout of this world size on the bare transformer, then the whole pipeline on one layout."""
    from cogvideox.pipeline import Pipeline

    results = {}
    for variant in CONFIGS:
        model = _transformer(variant)
        latents, text, timestep, rope = _inputs(model)
        for spec in LAYOUTS[world]:
            if variant == "sincos" and spec not in ("ulysses=2", "ulysses=2,ring=2"):
                continue  # the sin-cos model only differs before the blocks: one layout per world
            mesh = build_mesh(parse_layout(spec))
            sequence = SequenceParallel(model, mesh)
            denoiser = CFGParallel(model, mesh)
            with torch.no_grad():
                results[variant, spec] = denoiser(latents, text, timestep, image_rotary_emb=rope)
            sequence.remove()
            # Afterwards the model is the exact single-process one again.
            with torch.no_grad():
                results[variant, spec, "removed"] = model(latents, text, timestep, image_rotary_emb=rope)

    mesh = build_mesh(parse_layout(PIPELINE_LAYOUTS[world]))
    pipe = parallelize(_tiled(Pipeline.from_pretrained(folder, dtype="fp32", device="cpu")), mesh)
    out = pipe(**CALL)
    unseeded = pipe(**(CALL | dict(seed=None)))  # rank 0's random seed, shared
    results["pipeline"] = (out.latents, out.frames, unseeded.seed, unseeded.latents)

    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out_file)


@pytest.fixture(scope="module", params=[2, 4], ids=["2-processes", "4-processes"])
def parallel_run(request, tiny_rope_dir, tmp_path_factory):
    """(world size, each rank's results) of one run of `_worker` on that many gloo processes."""
    world = request.param
    out_file = str(tmp_path_factory.mktemp(f"parallel-{world}") / "results.pt")
    _spawn(_worker, world, str(tiny_rope_dir), out_file)
    return world, torch.load(out_file, weights_only=False)


def test_every_layout_matches_one_process(parallel_run):
    world, per_rank = parallel_run
    checked = 0
    for variant in CONFIGS:
        model = _transformer(variant)
        latents, text, timestep, rope = _inputs(model)
        with torch.no_grad():
            want = model(latents, text, timestep, image_rotary_emb=rope)
        for spec in LAYOUTS[world]:
            if (variant, spec) not in per_rank[0]:
                continue
            for rank, results in enumerate(per_rank):
                got = results[variant, spec]
                assert got.shape == want.shape
                error = _relative_error(got, want)
                assert error <= TOLERANCE, f"{variant} {spec} rank {rank}: relative error {error:.2e}"
                # Hooks removed: bit for bit the single-process model.
                assert torch.equal(results[variant, spec, "removed"], want)
                checked += 1
    assert checked == world * (len(LAYOUTS[world]) + 1)


def test_pipeline_matches_one_process(parallel_run, tiny_rope_dir):
    """T5 prompts split, denoising on the layout, VAE tiles split: the single-process (tiled) result."""
    from cogvideox.parallel.decode import tile_count
    from cogvideox.pipeline import Pipeline

    world, per_rank = parallel_run
    pipe = _tiled(Pipeline.from_pretrained(tiny_rope_dir, dtype="fp32", device="cpu"))
    assert tile_count(pipe.vae, 8, 8) == 9  # the decode really is split
    want = pipe(**CALL)
    first_seed, first_unseeded = per_rank[0]["pipeline"][2:]
    for rank, results in enumerate(per_rank):
        latents, frames, seed, unseeded = results["pipeline"]
        assert _relative_error(latents, want.latents) <= TOLERANCE, rank
        assert len(frames) == len(want.frames) == 2
        for got, expected in zip(frames, want.frames):
            assert got.shape == expected.shape == (9, 64, 64, 3)
            assert abs(got.astype(int) - expected.astype(int)).max() <= 1, rank
        assert seed == first_seed and torch.equal(unseeded, first_unseeded), "ranks drew different seeds"


def _tile_settings(pipe):
    """The pipeline with `_tiled`'s tile settings kept on its VAE but tiling off: what turns tiling on
    later (the group's agreement, the retry in tiles after running out of memory) tiles with these."""
    _tiled(pipe).vae.disable_tiling()
    return pipe


class _OutOfMemoryOnce:
    """A VAE decode whose first call fails as CUDA's does when memory runs out."""

    def __init__(self, decode) -> None:
        self.decode, self.failed = decode, False

    def __call__(self, z):
        if not self.failed:
            self.failed = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.decode(z)


def _decode_agreement_worker(rank: int, world: int, folder: str, out_file: str) -> None:
    """Two ways one process's decode could part from the others': its VAE alone tiles (the memory
    plan is per GPU), or its untiled decode alone runs out of memory (then all retry in tiles)."""
    import warnings

    from cogvideox.pipeline import Pipeline

    mesh = build_mesh(parse_layout("cfg=2"))
    results = {}
    pipe = _tile_settings(Pipeline.from_pretrained(folder, dtype="fp32", device="cpu"))
    if rank == 1:
        pipe.vae.enable_tiling()
    results["one tiles"] = parallelize(pipe, mesh)(**CALL).frames
    assert pipe.vae.use_tiling == (rank == 1), "the group's agreement changed a VAE for good"

    pipe = _tile_settings(Pipeline.from_pretrained(folder, dtype="fp32", device="cpu"))
    if rank == 1:
        pipe.vae.decode = _OutOfMemoryOnce(pipe.vae.decode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results["one runs out"] = parallelize(pipe, mesh)(**CALL).frames
    results["warned"] = any("decoding again in tiles" in str(w.message) for w in caught)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out_file)


def test_the_group_decodes_alike(tiny_rope_dir, tmp_path):
    """Tiling on in one process only, or one process out of memory: every process decodes in tiles
    (split), none is left waiting in a collective, and the frames are the single-process tiled ones."""
    from cogvideox.pipeline import Pipeline

    out_file = str(tmp_path / "results.pt")
    _spawn(_decode_agreement_worker, 2, str(tiny_rope_dir), out_file, deadline_s=240)
    per_rank = torch.load(out_file, weights_only=False)
    want = _tiled(Pipeline.from_pretrained(tiny_rope_dir, dtype="fp32", device="cpu"))(**CALL).frames
    for rank, results in enumerate(per_rank):
        assert results["warned"], rank  # each process says it decodes again in tiles
        for case in ("one tiles", "one runs out"):
            for got, expected in zip(results[case], want, strict=True):
                assert abs(got.astype(int) - expected.astype(int)).max() <= 1, (case, rank)


# ------------------------------------------------------------------------------------------------------
# Layouts: parsing and the mistakes they catch


def test_parse_layout():
    assert parse_layout("cfg=2,ulysses=2") == Layout(cfg=2, ulysses=2, ring=1)
    assert parse_layout(" ring=3 , CFG=2 ") == Layout(cfg=2, ring=3)
    assert parse_layout(None) == Layout() and parse_layout("").size == 1
    assert parse_layout("cfg=2,ulysses=3,ring=2").size == 12
    assert str(parse_layout("ulysses=2")) == "cfg=1,ulysses=2,ring=1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("tensor=2", "kinds: cfg, ulysses, ring"),
        ("ulysses", "kind=degree pairs"),
        ("ring=0", "positive integer"),
        ("ring=two", "positive integer"),
        ("cfg=2,cfg=2", "cfg appears twice"),
    ],
)
def test_bad_layouts_say_what_is_wrong(text, message):
    with pytest.raises(InputError, match=message):
        parse_layout(text)


def test_layout_checks():
    with pytest.raises(InputError, match="cfg is 1 or 2"):
        Layout(cfg=4).check()
    with pytest.raises(InputError, match="guidance is off"):
        Layout(cfg=2).check(guidance=False)
    # 2B has 30 heads: ulysses=4 cannot split them, and the message offers the way out.
    with pytest.raises(InputError, match=r"does not divide the model's 30 attention heads.*2, 3, 5, 6.*ring=4"):
        Layout(ulysses=4).check(heads=30)
    Layout(ulysses=6).check(heads=30)
    Layout(ring=4).check(heads=30)
    with pytest.raises(InputError, match="needs 4 processes per video, but 6 were started"):
        Layout(cfg=2, ulysses=2).check(world_size=6)
    Layout(cfg=2, ulysses=2).check(world_size=8)  # two groups side by side


def test_parallel_layout_needs_processes():
    assert not dist.is_initialized()
    with pytest.raises(InputError, match="torchrun --nproc-per-node 2"):
        build_mesh(Layout(cfg=2))
    mesh = build_mesh(Layout())
    assert mesh.is_leader and mesh.group is None and mesh.layout.size == 1


# ------------------------------------------------------------------------------------------------------
# run_batch from Python under torch.distributed


def _run_batch_worker(rank: int, world: int, folder: str) -> None:
    """`run_batch` without `mesh`: on a parallel pipeline, then on a plain one."""
    from pathlib import Path

    from cogvideox import Pipeline
    from cogvideox.batch import run_batch

    pipe = Pipeline.from_pretrained(None, device="cpu")
    call = {"progress": False, "num_inference_steps": 2, "num_frames": 9}
    prompts = ["a red ball", "a blue ball", "a green ball"]
    run_batch(parallelize(pipe, build_mesh(parse_layout("cfg=2"))), prompts, Path(folder) / "cfg", **call)
    run_batch(pipe, prompts, Path(folder) / "plain", **call)


def test_run_batch_without_a_mesh_makes_each_video_once(tmp_path):
    """A parallel pipeline's own mesh is the batch's; a plain pipeline under torch.distributed gives each
    process its own prompts. Without them every process made every video and the manifest listed each
    video once per process."""
    import json

    _spawn(_run_batch_worker, 2, str(tmp_path), deadline_s=240)
    for kind in ("cfg", "plain"):
        lines = (tmp_path / kind / "manifest.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2], kind


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_ring_blocks_merge_to_attention_over_all_keys(dtype, tolerance):
    """Each ring block runs in the fused kernel, which gives its output and the log-sum-exp of its scores;
    merged by those, uneven blocks give attention over all the keys, as the fp32 online-softmax path does."""
    from cogvideox.parallel import ring

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=gen) for _ in range(3))
    k, v = torch.cat([k, 2 * k[:, :, :13]], dim=2), torch.cat([v, v[:, :, :13]], dim=2)  # 50 keys
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    kernel = ring.fused_kernel(q)
    assert kernel is not None
    merged, online = ring._LogSumExp(q), ring._Softmax(q)
    for block in (slice(0, 20), slice(20, 21), slice(21, 50)):
        merged.add(*kernel(q, k[:, :, block], v[:, :, block], 16**-0.5))
        online.add(q, k[:, :, block], v[:, :, block], 16**-0.5)
    for got in (merged.result(dtype), online.result(dtype)):
        assert got.dtype == dtype
        assert ((got.float() - want).norm() / want.norm()).item() < tolerance


class _MergeAsBefore:
    """The log-sum-exp merge as it first was (fp32 accumulators from -inf and zeros, new tensors each
    block): the reference for the cheaper one."""

    def __init__(self, q):
        self.lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32)
        self.o = torch.zeros(q.shape, dtype=torch.float32)

    def add(self, out, lse):
        new = torch.logaddexp(self.lse, lse)
        self.o = self.o * torch.exp(self.lse - new).unsqueeze(-1) + out.float() * torch.exp(lse - new).unsqueeze(-1)
        self.lse = new

    def result(self, dtype):
        return self.o.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_ring_merge_equals_the_first_formula(dtype, blocks):
    """The merge keeps the first block as the kernel gave it and updates one fp32 accumulator in place from
    the second on: the same result as the first formula up to fp32 rounding (one block: exactly), and the
    kernel's outputs are left as they were."""
    from cogvideox.parallel import ring

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 29, 16, generator=gen).to(dtype)
    keys = [torch.randn(2, 3, n, 16, generator=gen).to(dtype) for n in (11, 1, 23)[:blocks]]
    kernel = ring.fused_kernel(q)
    outputs = [kernel(q, k, 0.5 * k + 1, 16**-0.5) for k in keys]
    copies = [(out.clone(), lse.clone()) for out, lse in outputs]
    merged, before = ring._LogSumExp(q), _MergeAsBefore(q)
    for out, lse in outputs:
        merged.add(out, lse)
        before.add(out, lse)
    assert torch.allclose(merged.o.float(), before.o, rtol=1e-6, atol=1e-6)
    assert torch.allclose(merged.lse, before.lse, rtol=1e-6, atol=1e-6)
    got, want = merged.result(dtype), before.result(dtype)
    assert got.dtype == dtype and got.shape == q.shape
    if blocks == 1:
        assert torch.equal(got, want)
    else:  # a last-bit difference in fp32 may round a bf16 result to its neighbour
        assert torch.allclose(got.float(), want.float(), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    for (out, lse), (out_copy, lse_copy) in zip(outputs, copies):
        assert torch.equal(out, out_copy) and torch.equal(lse, lse_copy)


def test_ring_merge_of_no_block_is_zero():
    from cogvideox.parallel import ring

    q = torch.randn(1, 2, 5, 8)
    assert torch.equal(ring._LogSumExp(q).result(torch.bfloat16), torch.zeros(1, 2, 5, 8, dtype=torch.bfloat16))


def test_ring_kernel_choice():
    """Flash is the default; cuDNN attention is asked for by name, exists on the GPU only (None on the CPU,
    where the ring takes another path), and is called as PyTorch declares it (checked on meta tensors): its
    log-sum-exp, [B, H, Lq, 1] in recent PyTorch, comes back as flash's [B, H, Lq] fp32."""
    from cogvideox.parallel import ring

    q = torch.randn(2, 3, 5, 8)
    assert ring.fused_kernel(q) is ring.fused_kernel(q, "flash") is ring._flash_cpu
    assert ring.fused_kernel(q, "cudnn") is None
    with pytest.raises(ValueError, match="cudnn"):
        ring.fused_kernel(q, "cuDNN")
    # A ring of one sends nothing: the kernel asked for on the CPU, flash or (not there) cuDNN, whose blocks
    # then go through the fp32 online softmax, gives attention over the valid keys.
    k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :4], v[:, :, :4])
    for kernel in ring.KERNELS:
        got = ring.ring_attention(q, k, v, [4], 0, (0,), None, kernel=kernel)
        assert torch.allclose(got, want, atol=1e-6), kernel
    q, k = (torch.empty(2, 3, n, 64, device="meta", dtype=torch.bfloat16) for n in (7, 9))
    out, lse = ring._cudnn_cuda(q, k, k, 0.125)
    assert out.shape == (2, 3, 7, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32
