#!/usr/bin/env bash
# Stage-2 recipe A/B on one frozen VAE: the same steps, seed and data; only the named overrides differ.
#   bash benchmarks/stage2_recipe.sh VAE_DIR OUT_DIR STEPS NAME "key=value ..." [NAME "key=value ..."]...
# Each variant trains stage 2 alone (configs/cpu.yaml), then is scored on the val split: colour agreement on
# val captions and on the free-form prompts, and KID vs val (benchmarks/results/stage2_<NAME>.json).
set -euo pipefail
vae=$1 out=$2 steps=$3; shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -ge 2 ]; do
  name=$1 overrides=$2; shift 2
  start=$(date +%s)
  # shellcheck disable=SC2086
  python "$here/train_3stage.py" --config "$here/configs/cpu.yaml" --stage 2 --vae-checkpoint "$vae" \
    --output-dir "$out" --experiment-name "$name" --max-steps "$steps" runtime.sample_every_epochs=1000 $overrides
  echo "$name: stage 2 wall $(( $(date +%s) - start )) s"
  python -m pokediff.eval --model "$out/$name/pipeline" --split val --diversity-samples 0 --recon-num 0 \
    --no-memorization --clip none --quiet --output "$here/benchmarks/results/stage2_$name.json"
done
