#!/usr/bin/env bash
# The shipped model's U-Net (configs/release.yaml, 64 px) trained from scratch on a lent GPU, on the shipped VAE;
# the weights come back as half-precision shards of <= 15 MB (the device returns files of <= 16 MiB, 8 at most).
#   here:    bash ../shared/device/stage.sh --without-stlpips   # stage 2 needs no perceptual network
#            mv pokediff/pretrained/pokediff-64/unet /tmp/        # what travels must stay < 64 MiB (restore after!)
#   device:  source .devkit/setup.sh && bash benchmarks/gpu_release_stage2.sh EPOCHS MAX_MINUTES BATCH LR
#   here:    the U-Net is in <files_at>/unet (diffusers loads the shards); score it as README "The shipped model" says
# A warm start from the shipped U-Net does not fit in one call (its 27 MiB + data + kit > 64 MiB).
# Dry run on a CPU: OUT=/tmp/out RUNS=/tmp/runs bash benchmarks/gpu_release_stage2.sh 2 1 16 1e-3 runtime.max_steps=2
set -o pipefail
[ $# -ge 4 ] || { echo "error: usage: $0 EPOCHS MAX_MINUTES BATCH LR [key=value ...]" >&2; exit 2; }
E=$1 M=$2 B=$3 LR=$4; shift 4
OUT=${OUT:?set OUT to the folder that comes back}; RUNS=${RUNS:-/tmp/runs}
mkdir -p "$OUT"
python train_3stage.py --config configs/release.yaml --stage 2 --vae-checkpoint pokediff/pretrained/pokediff-64/vae \
  --output-dir "$RUNS" --experiment-name gpu_release stage2.batch_size="$B" stage2.learning_rate="$LR" \
  stage2.epochs="$E" stage2.max_minutes="$M" runtime.sample_every_epochs=100000 \
  runtime.checkpoint_every_steps=100000 "$@" 2>&1 | grep -v "it/s\]$" | tee "$OUT/train.log" || exit 1
RUN="$RUNS/gpu_release" OUT="$OUT" python - <<'PY'
import os, shutil, tempfile
from pathlib import Path
import torch
from diffusers import UNet2DConditionModel
run, out = Path(os.environ["RUN"]), Path(os.environ["OUT"])
# 8 files come back: unet/ (config, index, 2 shards), unet_best's 2 shards (same layout), train.log, losses.csv
for name in ("unet", "unet_best"):
    tmp = Path(tempfile.mkdtemp()) / name
    unet = UNet2DConditionModel.from_pretrained(run / name, torch_dtype=torch.float16)
    unet.save_pretrained(tmp, max_shard_size="15MB")
    if name == "unet":
        shutil.copytree(tmp, out / "unet")
    else:
        for shard in sorted(tmp.glob("*-of-*.safetensors")):
            shutil.copy(shard, out / f"best-{shard.name}")
shutil.copy(run / "losses.csv", out / "losses.csv")
print("brought back:", sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
PY
