"""The speed levers on a mesh: the step cache and compiled blocks under CFG, Ulysses and ring parallelism
(2 gloo processes, the tiny 3D-RoPE pipeline, fp32).

- Step cache: every process of a group must make the same skip decision on every step (one that skipped
  while another computed would wait in the next collective for good), and it must be the single
  process's decision: the group judges the whole video, its sequence padding left out. The changes agree
  with one process's to the order of fp32 sums, the latents to a relative 1e-5 (`test_parallel.py`'s
  tolerance).
- Compiled blocks: the collectives are traced into the block's graph (Ulysses' all-to-alls), or the ring
  runs as one opaque operator, and all blocks share one graph; the output is the single-process
  output up to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from test_parallel import _relative_error, _spawn

from cogvideox.parallel import build_mesh, parallelize, parse_layout
from cogvideox.pipeline import Pipeline

TOLERANCE = 1e-5
THRESHOLD = 0.22  # skips 4 of these 10 steps; no change is nearer to it than 0.011
CALL = dict(
    prompt=["a cat sits on the mat"],
    num_frames=9,
    height=48,
    width=80,  # 16 text + 3 x 3 x 5 video tokens: 61, so the second of 2 shards ends in padding
    num_inference_steps=10,
    guidance_scale=6.0,
    seed=3,
    progress=False,
)
# (layout, compiled): the eager cache under each kind, and the compiled cache under the traced
# collectives (Ulysses) and the opaque ring.
RUNS = [("cfg=2", False), ("ulysses=2", False), ("ring=2", False), ("ulysses=2", True), ("ring=2", True)]


def _cached(folder: str, compile: bool) -> Pipeline:
    pipe = Pipeline.from_pretrained(folder, dtype="fp32", device="cpu")
    return pipe.accelerate(cache=THRESHOLD, compile=compile, attention=None)


def _record_decisions(cache) -> list[tuple[float, bool]]:
    """The (change, skip) of each judged step, as the cache's judge returns them."""
    judge = cache.judge or cache._judge
    decisions = []

    def recording(residual, reference):
        decisions.append(judge(residual, reference))
        return decisions[-1]

    cache.judge = recording
    return decisions


def _worker(rank: int, world: int, folder: str, out_file: str) -> None:
    from torch._dynamo.utils import counters

    results = {}
    for spec, compile in RUNS:
        counters.clear()
        pipe = parallelize(_cached(folder, compile), build_mesh(parse_layout(spec)))
        decisions = _record_decisions(pipe.acceleration.cache)
        out = pipe(**CALL)
        call = pipe._sequence.call
        padded = call is not None and call.shard * 2 > call.total
        graphs = counters["stats"]["unique_graphs"]
        results[spec, compile] = (out.latents, pipe.acceleration.cache.stats(), decisions, padded, graphs)
        pipe.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out_file)


@pytest.fixture(scope="module")
def lever_runs(tiny_rope_dir, tmp_path_factory):
    out_file = str(tmp_path_factory.mktemp("parallel-levers") / "results.pt")
    _spawn(_worker, 2, str(tiny_rope_dir), out_file)
    return torch.load(out_file, weights_only=False)


@pytest.fixture(scope="module")
def single_process(tiny_rope_dir):
    pipe = _cached(str(tiny_rope_dir), compile=False)
    decisions = _record_decisions(pipe.acceleration.cache)
    out = pipe(**CALL)
    return out.latents, pipe.acceleration.cache.stats(), decisions


def test_the_single_process_run_skips_some_steps(single_process):
    _, stats, decisions = single_process
    assert stats["calls"] == 10 and 0 < stats["skipped"] < 9  # the runs below decide something
    assert min(abs(change - THRESHOLD) for change, _ in decisions) > 1e-2  # no decision on a rounding edge


@pytest.mark.parametrize("spec, compile", RUNS, ids=[f"{s}{'-compiled' if c else ''}" for s, c in RUNS])
def test_the_group_skips_the_single_process_steps(lever_runs, single_process, spec, compile):
    want_latents, want_stats, want_decisions = single_process
    for rank, results in enumerate(lever_runs):
        latents, stats, decisions, padded, _ = results[spec, compile]
        assert stats == want_stats, (rank, stats)
        assert [skip for _, skip in decisions] == [skip for _, skip in want_decisions], rank
        for (change, _), (want, _) in zip(decisions, want_decisions):
            assert change == pytest.approx(want, rel=1e-5), rank
        assert _relative_error(latents, want_latents) <= TOLERANCE, rank
        if spec != "cfg=2":
            assert padded  # which must not count


@pytest.mark.parametrize("spec", ["ulysses=2", "ring=2"])
def test_compiled_blocks_share_one_graph_under_the_layout(lever_runs, spec):
    for results in lever_runs:
        assert results[spec, True][4] == 1  # both blocks, all 10 steps (the CFG batch of 2): one graph
        assert results[spec, False][4] == 0


def test_levers_come_before_parallelize(tiny_rope_dir):
    """The parallel seams wrap the fast attention and the cache: `accelerate` afterwards would replace
    the parallel attention under them, so it is refused with what to do instead."""
    from cogvideox.errors import InputError
    from cogvideox.parallel import single_process_mesh

    pipe = parallelize(Pipeline.from_pretrained(str(tiny_rope_dir), dtype="fp32", device="cpu"), single_process_mesh())
    with pytest.raises(InputError, match=r"before parallelize\(\): accelerate\(\) on the plain pipeline"):
        pipe.accelerate(cache=0.1)
    assert pipe.acceleration is None
