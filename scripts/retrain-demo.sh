#!/usr/bin/env bash
# Retrain the shipped demo model from scratch, stage by stage as it was trained, with one command:
#
#     bash scripts/retrain-demo.sh [WORK] [OUT]      # WORK: runs/demo-retrain, OUT: WORK/model
#
# Each line below is one `python -m cogvideox.demo.build` run over the same WORK folder. Every phase keeps
# its checkpoints there, so a finished phase is loaded instead of retrained, an interrupted run resumes
# where it stopped (run the script again), and a run to more steps than a finished one continues it with
# its cosine schedule stretched to the new total, which is how the shipped model's runs grew. The
# intermediate models (the second, third and fourth checkpoints of the model card) land in WORK/models.
# On a 2-core CPU the stages took about 6 hours in all (MODEL_CARD.md lists them).
#
# TINY=1 divides every step count by 100 and encodes 64 videos instead of 6144: a check, in about eight
# minutes on 2 cores, that the stages chain (the model it writes follows no prompt).
set -euo pipefail
WORK=${1:-runs/demo-retrain}
OUT=${2:-$WORK/model}
PYTHON=${PYTHON:-python}
THREADS=${THREADS:-2}
MODELS=$WORK/models
scale=1 videos=6144
if [[ ${TINY:-0} == 1 ]]; then scale=100 videos=64; fi
n() { echo $(( $1 / scale > 0 ? $1 / scale : 1 )); }

build() {
    echo "== build $*" >&2
    "$PYTHON" -m cogvideox.demo.build --work "$WORK" --threads "$THREADS" --no-progress --videos "$videos" \
        --vae-steps "$(n 1500)" "$@"
}

# The first build: general VAE phase, then the object phase, run to 1000 steps and continued to 2000.
build --vae-object-steps "$(n 1000)" --vae-colour-steps 0 --steps 0
build --vae-object-steps "$(n 2000)" --vae-colour-steps 0 --steps 0
# The second checkpoint: the colour phase, then the 6-block transformer on its latents (4000 steps,
# continued to 6000, 8000 and 14000), the decoder-only phase (which leaves the latents, and so the
# transformer, as they are), and the transformer continued to 20000.
vae=(--vae-object-steps "$(n 2000)" --vae-colour-steps "$(n 1200)")
for steps in 4000 6000 8000 14000; do
    build "${vae[@]}" --steps "$(n $steps)" --out "$MODELS/second"
done
vae+=(--vae-decoder-steps "$(n 600)")
build "${vae[@]}" --steps "$(n 20000)" --out "$MODELS/second"
# The third: encoder and decoder trained again with latent noise (new latents), the transformer
# fine-tuned on them from the second's weights.
vae+=(--vae-joint-steps "$(n 800)" --latent-noise 0.15)
build "${vae[@]}" --transformer-init "$MODELS/second" --transformer-lr 3e-4 --steps "$(n 5000)" \
    --out "$MODELS/third"
# The fourth and the fifth (shipped): the third's transformer grown to 12 blocks, 5000 steps, continued
# to 8000.
grown=(--transformer-init "$MODELS/third" --transformer-layers 12 --transformer-lr 3e-4)
build "${vae[@]}" "${grown[@]}" --steps "$(n 5000)" --out "$MODELS/fourth"
build "${vae[@]}" "${grown[@]}" --steps "$(n 8000)" --out "$OUT"
echo "demo model retrained into $OUT; score it with: python -m cogvideox.demo.evaluate --model $OUT" >&2
