#!/usr/bin/env bash
# The owed full-size GPU measurements in one call, most important first, each under its own time cap.
#
#   OUT=results bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#   OUT=results bash benchmarks/gpu_session.sh 900        # a total budget in seconds (default 540)
#   TINY=1 OUT=/tmp/gs bash benchmarks/gpu_session.sh     # every step with --tiny on the CPU (plumbing check)
#   STEPS=parallel-5b,core-2b OUT=results bash benchmarks/gpu_session.sh 200   # only the steps named
#   PACK=/somewhere/results.tgz OUT=results bash ...      # also packs $OUT into one archive after each step
#
# GPU time is short and may come in one piece, so the order is what the issues need most:
#   1. core_full_size 5B: our step against the reference on the same weights (time, error), end to end;
#   2. speed 5B: the exact (fused), compiled and fp8 modes against the reference eager, with 10-step DDIM
#      runs for fp8's error against the exact mode (50 steps of the exact mode alone would take half the
#      step's cap, and fp8, measured last, would not be reached);
#   3. memory 5B: none / stream / sequential(+tiling) peaks and times, bitwise check; then the VAE decode
#      (reference, ours exact, + channels-last, + cuDNN's algorithm search, + fused norms);
#   4. finetune_memory 5B LoRA against the reference with peft;
#   5. parallel_per_rank 5B; then 5B full fine-tuning and the 2B runs (LoRA, core, speed) while time is left.
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
SPEED_MODES="fused,compile,fp8"
if [ -n "${TINY:-}" ]; then
    TINY_FLAG="--tiny"
    SPEED_MODES="fused,compile,int8"  # fp8 needs compute capability 8.9+: the CPU check runs int8 in its place
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
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("diffusers", "transformers", "peft", "torchao"):
    try:
        print(name, importlib.import_module(name).__version__)
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


step core-5b           150  60 core_full_size.py --variant 5b
step speed-5b          200  90 speed.py --variant 5b --modes "$SPEED_MODES" --repeat 3 --trajectory-steps 10 --skip-t5 --skip-vae
step memory-5b         150  90 memory.py --variant 5b --modes none,stream,sequential+tiling --reference --check
step vae-5b            150  60 speed.py --variant 5b --vae-only
step finetune-5b-lora   90  60 finetune_memory.py --variant 5b --mode lora --repeat 2
step parallel-5b        60  30 parallel_per_rank.py --repeats 3
step finetune-5b-full   90  60 finetune_memory.py --variant 5b --mode full --repeat 2 --no-reference
step finetune-2b-lora   60  45 finetune_memory.py --variant 2b --mode lora --repeat 2
step core-2b            90  45 core_full_size.py --variant 2b
step speed-2b          120  60 speed.py --variant 2b --modes "$SPEED_MODES" --repeat 3 --trajectory-steps 10 --skip-t5 --skip-vae
echo "session: $(($(date +%s) - START)) s of $BUDGET"
