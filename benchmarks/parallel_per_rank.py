"""What one GPU of an N-GPU layout computes per transformer layer, measured on one GPU.

    python benchmarks/parallel_per_rank.py                # 5B at 49 x 480 x 720, bf16, N = 1, 2, 4, 8
    python benchmarks/parallel_per_rank.py --tiny         # a tiny config on the CPU (smoke test)

With N-way sequence parallelism a process runs the per-token work of a layer (AdaLN, projections, QK-norm,
RoPE, feed-forward) on 1/N of the [text ; video] tokens, and the attention over the whole sequence for
1/N of the heads (Ulysses) or its share of the score blocks (ring: the same FLOPs, in the ring's fused
kernel and log-sum-exp merge). This script times the parts separately on one GPU, for CFG batch 2 (sequence parallelism only) and batch 1 (one CFG half),
without any communication: add the all-to-all time of docs/parallel.md to get a layer's time on N GPUs.

Writes JSON to $OUT/parallel_per_rank.json (or the current folder): per N and batch, the median
milliseconds of the per-token part, of the attention part, and their sum, and the 42-layer step estimate;
the ring member's attention in the flash kernel (ring_attention_ms) and in the cuDNN kernel
(ring_cudnn_attention_ms; None with ring_cudnn_error where it does not exist or fails), each with its
relative L2 error against SDPA's output for the same inputs (ring_rel_l2, ring_cudnn_rel_l2); rewritten
after each row (a run stopped by a time cap keeps the rows it finished).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core_full_size import save_json  # noqa: E402

from cogvideox.models.config import TransformerConfig
from cogvideox.models.transformer import TRANSFORMER_PRESETS, ExpertBlock
from cogvideox.parallel import ring

TINY = TransformerConfig(
    num_attention_heads=8, attention_head_dim=16, num_layers=2, text_embed_dim=32, time_embed_dim=32,
    use_rotary_positional_embeddings=True,
)  # fmt: skip


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ring_inputs(batch: int, heads: int, local: int, head_dim: int, n: int, device, dtype):
    """A ring member's inputs: its `local` queries (all heads) and n key/value blocks of `local` tokens."""
    q = torch.randn(batch, heads, local, head_dim, device=device, dtype=dtype)
    return q, [(torch.randn_like(q), torch.randn_like(q)) for _ in range(n)]


def ring_member(q: torch.Tensor, blocks, kernel):
    """One ring member's attention, communication left out: q against each block in the fused `kernel`,
    merged by log-sum-exp (the fp32 online softmax where `kernel` is None): the same FLOPs as a Ulysses
    rank's attention, so the two columns compare the kernels."""
    scale = q.shape[-1] ** -0.5

    def attend():
        merge = ring._LogSumExp(q) if kernel is not None else ring._Softmax(q)
        for k, v in blocks:
            if kernel is not None:
                merge.add(*kernel(q, k, v, scale))
            else:
                merge.add(q, k, v, scale)
        return merge.result(q.dtype)

    return attend


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in fp32."""
    want = want.float()
    return float((got.float() - want).norm() / want.norm())


def ring_columns(q, blocks, device, repeats) -> dict:
    """The ring member's attention in each fused kernel: milliseconds and relative L2 error against SDPA's
    output for the same queries and all the keys (a wrong log-sum-exp convention shows there from N = 2
    on; at N = 1 there is nothing to merge). The cuDNN kernel does not exist on the CPU, and may fail on a
    GPU: its columns are then None with the reason under ring_cudnn_error."""
    keys, values = (torch.cat(part, dim=2) for part in zip(*blocks))
    want = F.scaled_dot_product_attention(q, keys, values)
    del keys, values
    flash = ring_member(q, blocks, ring.fused_kernel(q))
    columns = dict(ring_attention_ms=round(timed(flash, device, repeats), 3), ring_rel_l2=rel_l2(flash(), want))
    columns.update(ring_cudnn_attention_ms=None, ring_cudnn_rel_l2=None)
    kernel = ring.fused_kernel(q, "cudnn")
    if kernel is None:
        dtype = str(q.dtype).removeprefix("torch.")
        columns["ring_cudnn_error"] = f"no cuDNN attention kernel for {q.device.type} {dtype}"
        return columns
    try:
        cudnn = ring_member(q, blocks, kernel)
        error = rel_l2(cudnn(), want)  # before the timing: a failing call fails once
        columns.update(ring_cudnn_attention_ms=round(timed(cudnn, device, repeats), 3), ring_cudnn_rel_l2=error)
    except Exception as e:  # noqa: BLE001 - recorded in the JSON, the other columns and rows still measured
        columns["ring_cudnn_error"] = f"{type(e).__name__}: {e}"[:500]
    return columns


def measure(
    config: TransformerConfig, text: int, video: int, ways: list[int], batches: list[int], device, dtype, repeats,
    rows: list[dict] | None = None, save=lambda: None,
):
    """Appends a row per (batch, N) to `rows` (a new list by default), calling `save` after each."""
    block = ExpertBlock(config).to(device, dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    block.attn1.attend = lambda q, k, v: v  # the per-token part alone; attention is timed below
    heads, head_dim, dim = config.num_attention_heads, config.attention_head_dim, config.inner_dim
    total = text + video
    rows = [] if rows is None else rows
    for batch in batches:
        for n in ways:
            if heads % n:
                continue
            local = -(-total // n)
            local_text = min(text, local)  # rank 0's shard: all the text, the rest video
            x = torch.randn(batch, local - local_text, dim, device=device, dtype=dtype)
            c = torch.randn(batch, local_text, dim, device=device, dtype=dtype)
            emb = torch.randn(batch, config.time_embed_dim, device=device, dtype=dtype)
            rope = (
                torch.ones(local - local_text, head_dim, device=device),
                torch.zeros(local - local_text, head_dim, device=device),
            )
            q, k, v = (torch.randn(batch, heads // n, total, head_dim, device=device, dtype=dtype) for _ in range(3))
            with torch.no_grad():
                per_token = timed(lambda: block(x, c, emb, rope), device, repeats)
                attention = timed(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
                member = ring_inputs(batch, heads, local, head_dim, n, device, dtype)
                ring_figures = ring_columns(*member, device, repeats)
                del member
            rows.append(
                dict(
                    ways=n,
                    batch=batch,
                    tokens_per_rank=local,
                    per_token_ms=round(per_token, 3),
                    attention_ms=round(attention, 3),
                    **ring_figures,
                    layer_ms=round(per_token + attention, 3),
                    step_estimate_s=round((per_token + attention) * config.num_layers / 1e3, 4),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
            save()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    parser.add_argument("--ways", default="1,2,4,8", help="sequence-parallel degrees to time (default 1,2,4,8)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ways = [int(n) for n in args.ways.split(",")]
    if args.tiny:
        config, text, video, device, dtype = TINY, 16, 3 * 4 * 6, torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full-size run needs a CUDA GPU; use --tiny on the CPU")
        config, text, video = TRANSFORMER_PRESETS["CogVideoX-5b"], 226, 13 * 30 * 45
        device, dtype = torch.device("cuda"), torch.bfloat16
    result = dict(
        model="tiny" if args.tiny else "CogVideoX-5b",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype).removeprefix("torch."),
        text_tokens=text,
        video_tokens=video,
        layers=config.num_layers,
        rows=[],
    )
    out = Path(os.environ.get("OUT", ".")) / "parallel_per_rank.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        save_json(out, result)

    measure(config, text, video, ways, [2, 1], device, dtype, args.repeats, result["rows"], save)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
