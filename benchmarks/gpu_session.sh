#!/usr/bin/env bash
# The owed full-size GPU measurements in one call, most important first, each under its own time cap.
#
#   OUT=results bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#   OUT=results bash benchmarks/gpu_session.sh 900        # a total budget in seconds (default 540)
#   TINY=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh     # every step with --tiny on the CPU (plumbing check)
#   STEPS=parallel-5b,core-2b OUT=results bash benchmarks/gpu_session.sh 200   # only the steps named
#   PACK=/somewhere/results.tgz OUT=results bash ...      # also packs $OUT into one archive after each step
#
# GPU time is short and may come in one piece, so the order is what the issues still need most, the
# steps that can close an issue first (a session of 15 minutes reaches about the first four in its first
# call, the next one or two in a second):
#   1. fine-tuning: 5B LoRA compiled keeping the attention results, offloaded with the block inputs,
#      against the reference eager (the 18 GB and 0.8x targets in one run); 2B LoRA compiled against the
#      reference eager and compiled; 5B full fine-tuning with the CPU optimizer (the 40 GB target);
#   2. memory 5B: none / stream+tiling / model (the stream target: under 6 GiB at 1.15x of none); 5B LoRA
#      compiled without the attention results kept;
#   3. attention 5B: the kernels alone at the 5B shape (SDPA cuDNN, flash, FlashAttention-3, sage), then
#      the compiled exact step with cuDNN and with FlashAttention-3, and fp8 with each (the 0.65x and 0.50x
#      targets), against the reference eager in the same run;
#   4. profile 5B: where the time of the VAE decode and of a transformer step (eager and compiled) goes,
#      kernel by kernel; memory 2B; fp8 + 8-bit attention in the model;
#   5. speed 5B: the exact (fused), compiled, int8 and fp8 modes against the reference eager and against an
#      fp32 step (the bf16 noise floor), with 10-step DDIM runs for the lossy modes' error; the VAE ladder
#      (reference, ours, + 3D convolutions as 2D ones on both layouts, + fused norms, then the re-checks:
#      tiled, cuDNN's algorithm search, channels-last);
#   6. core 2B (the sin-cos table fix: bitwise?), parallel per rank (the cuDNN ring kernel), 5B LoRA eager
#      with offloaded inputs, speed 2B, the 50-step fp8 + cache run, core 5B again, and the memory modes
#      with the model card's INT8 (transformer and T5), while time is left.
# A step never starts with less than its floor left, and is stopped at its cap; each writes its JSON and
# log.txt under $OUT/STEP/, and $OUT/session.jsonl records every step's status and seconds.
#
# Packages the machine lacks (diffusers, for the reference) travel as wheels in .whl/ (written by
# scripts/gpu-wheels.sh, see BENCHMARKS.md): they are installed into /tmp/site and put on PYTHONPATH with src/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmark-results}"
mkdir -p "$OUT"
BUDGET="${1:-540}"
START=$(date +%s)
PY="${PYTHON:-python3}"
TINY_FLAG=""
SPEED_MODE_LOSSY="int8,fp8"
CACHE_MODE="fp8-cache"
SAGE_MODE="fp8-sage"
ATTENTION_MODES="compile,fa3,fp8,fp8-fa3"
if [ -n "${TINY:-}" ]; then
    TINY_FLAG="--tiny"
    SPEED_MODE_LOSSY="int8"  # fp8 needs compute capability 8.9+: the CPU check runs int8 alone
    CACHE_MODE="cache"       # and the cache without fp8
    SAGE_MODE="sage"         # and 8-bit attention without fp8 (its math emulated on the CPU)
    ATTENTION_MODES="compile,fa3"  # and FlashAttention-3 without fp8 (SDPA stands in on the CPU)
fi

# pack: $OUT as one archive at $PACK (when set), replaced whole after each step, for a machine that
# sends back only a few files: a session stopped midway still returns every step it finished.
pack() {
    [ -n "${PACK:-}" ] || return 0
    tar czf "$PACK.part" -C "$OUT" . && mv "$PACK.part" "$PACK"
}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    # Without them the steps still measure ours; only the comparisons with the reference go missing.
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "wheel install failed: the steps run without the packages of .whl/ (no reference comparisons)" >&2
    fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PY" - <<'EOF'
import importlib, importlib.metadata, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("diffusers", "transformers", "peft", "torchao", "triton", "sageattention", "fa3_fwd_interface"):
    try:
        module = importlib.import_module(name)  # sageattention has no __version__: its metadata has
        version = getattr(module, "__version__", None)
        print(name, version or importlib.metadata.version({"fa3_fwd_interface": "fa3-fwd"}.get(name, name)))
    except Exception as e:  # a missing package only removes the comparisons that need it
        print(name, "missing:", type(e).__name__)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
pack

# step NAME CAP_S FLOOR_S ARGS...: run benchmarks/ARGS[0] with the rest, if FLOOR_S seconds are left.
step() {
    local name=$1 cap=$2 floor=$3
    shift 3
    if [ -n "${STEPS:-}" ] && [[ ",$STEPS," != *",$name,"* ]]; then
        return
    fi
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt "$floor" ]; then
        echo "{\"step\": \"$name\", \"status\": \"skipped\", \"seconds_left\": $left}" >> "$OUT/session.jsonl"
        echo "== $name: skipped ($left s left, needs $floor)"
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo "== $name (cap $cap s)"
    local t0=$(date +%s)
    mkdir -p "$OUT/$name"  # each step's JSON in its own folder: two runs of one script never overwrite
    OUT="$OUT/$name" timeout --kill-after=10 "$cap" "$PY" "benchmarks/$@" $TINY_FLAG > "$OUT/$name/log.txt" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name/log.txt"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0))}" >> "$OUT/session.jsonl"
    pack
}


# Measured on 2026-11-29 (one H200, BENCHMARKS.md): core 5B/2B, speed 5B (fused, compile, fp8), memory
# 5B (none, stream, sequential+tiling), the VAE decode up to channels-last, LoRA 5B/2B, parallel 5B.
# What those runs left owed comes first; the re-checks of what changed since come after.
# The compiled training steps: the warm-up compiles the blocks' graph, forward and backward, so these take
# the longest of the LoRA steps; the JSON is written after each step, so a cap keeps what was done.
# First the setting predicted to meet both 5B LoRA targets (18 GB, 0.8x): the compiled step keeping the
# attention results (no recompute of the attention in the backward), offloaded with the block inputs.
step finetune-5b-lora-save 150 90 finetune_memory.py --variant 5b --mode lora --repeat 3 --compile --save-attention --offload-activations
step finetune-2b-lora-compile 120 80 finetune_memory.py --variant 2b --mode lora --repeat 2 --compile --reference-compile
# Full fine-tuning: the 40 GB target; the peak is written after the warm-up step.
step finetune-5b-full  150  60 finetune_memory.py --variant 5b --mode full --repeat 2 --no-reference
step memory-5b         150  90 memory.py --variant 5b --modes none,stream+tiling,model --check
# The compiled step without the attention results kept (less host traffic), should the first one fall short.
step finetune-5b-lora-compile 150 90 finetune_memory.py --variant 5b --mode lora --repeat 3 --compile --offload-activations
# FlashAttention-3 (new on 2026-11-30): the kernels alone (cuDNN, flash, fa3, sage), then compiled exact
# mode with cuDNN against fa3, and fp8 with each, against the reference eager in the same run.
step attention-5b      200 100 speed.py --variant 5b --modes "$ATTENTION_MODES" --attention-kernels --repeat 3 --trajectory-steps 0 --skip-t5 --skip-vae --no-fp32-truth
step profile-5b        120  60 kernel_profile.py --variant 5b
step memory-2b         120  60 memory.py --variant 2b --modes none,stream+tiling,sequential+tiling --reference --check
# 8-bit attention (new on 2026-11-30; its kernel alone is timed in attention-5b): fp8 + sage against an fp32 step.
step sage-5b            90  45 speed.py --variant 5b --modes "$SAGE_MODE" --no-reference --repeat 2 --trajectory-steps 0 --skip-t5 --skip-vae
step speed-5b          220  90 speed.py --variant 5b --modes "fused,compile,$SPEED_MODE_LOSSY" --repeat 3 --trajectory-steps 10 --skip-t5 --skip-vae
step vae-5b            150  60 speed.py --variant 5b --vae-only
step core-2b            60  40 core_full_size.py --variant 2b
step parallel-5b        60  30 parallel_per_rank.py --repeats 3
step finetune-5b-lora   60  40 finetune_memory.py --variant 5b --mode lora --repeat 2 --offload-activations --no-reference
step speed-2b          150  60 speed.py --variant 2b --modes "fused,compile,$SPEED_MODE_LOSSY" --repeat 3 --trajectory-steps 10 --skip-t5 --skip-vae
step cache-5b          240 150 speed.py --variant 5b --modes "fused,$CACHE_MODE" --repeat 1 --trajectory-steps 50 --skip-t5 --skip-vae --no-fp32-truth
step core-5b            90  60 core_full_size.py --variant 5b
step memory-5b-int8     150  90 memory.py --variant 5b --int8 --modes none,model,stream+tiling,sequential+tiling --check
echo "session: $(($(date +%s) - START)) s of $BUDGET"
