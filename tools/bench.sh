#!/usr/bin/env bash
# `make bench`: the standard throughput comparison, sized for a 2-core CPU (about 6 minutes there on an idle machine).
#   1. data: the photos folder with every image capped at 256 px (convert.py photos --max-res 256)
#      and a .beton of the same images, so every loader decodes the same pixels at the same size
#   2. loader: torchvision (the reference) and torchvision-v2 (ImageFolder + transforms.v2, the baseline) vs DALI vs FFCV (fused multi-view decode, and FFCV's one decode per view), 2 views x 224 px, batch 64, 2 workers
#   3. augment: mscn, simclr, byol batched (batch 256 x 224 px, CPU) vs per-sample torchvision v2
#   4. train: end to end per loader vs model-only (a small ResNet-18 at 96 px)
#   5. README.md: the numbers table between <!-- bench:begin --> and <!-- bench:end -->
# Each bench step writes runs/bench/<mode>.{json,md,png}. PY, DATA and OUT override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
OUT=${OUT:-runs/bench}
PHOTOS=$DATA/photos_256
start=$SECONDS

# the 256 px folder is cut from the same crops as `convert.py photos` (same classes and files)
[ -f "$PHOTOS/.complete" ] || "$PY" convert.py photos --out "$PHOTOS" --max-res 256 --force
# rebuilt with the folder; --max-res 256 leaves these images' sizes as they are (FFCV re-encodes at quality 90)
[ "$PHOTOS/train.beton" -nt "$PHOTOS/.complete" ] ||
    "$PY" convert.py ffcv --src "$PHOTOS/train" --out "$PHOTOS/train.beton" --max-res 256 --force --no-progress

"$PY" bench.py loader --compare torchvision,torchvision-v2,dali,ffcv,ffcv-perview --data "$PHOTOS" --views 2 --size 224 --batch-size 64 \
    --workers 2 --warmup 5 --batches 80 --repeats 2 --json "$OUT/loader.json"

# the per-sample reference runs on 32 of each batch's 256 images, alternating with the batched stage
"$PY" bench.py augment --recipe mscn,simclr,byol --batch-size 256 --size 224 --device cpu --warmup 2 --batches 10 \
    --reference-images 32 --json "$OUT/augment.json"

# demo_fmnist.yaml's network (ResNet-18 at 1/4 width, SimCLR) on the photos at 96 px: ~1 min per row
# (160 steps of 64 images: an epoch of the 10,000 and a bit, logged every 10 steps)
"$PY" bench.py train --compare torchvision,dali,ffcv --warmup 10 --batches 150 --out-dir "$OUT/tmp" \
    --json "$OUT/train.json" --set "data=$PHOTOS" method=simclr recipe=simclr arch=resnet18 width=16 \
    size=96 batch_size=64 workers=2 views=2 proj_hidden=512 proj_dim=128 lr=1.0
rm -rf "$OUT/tmp"

"$PY" bench.py readme --results "$OUT" --readme README.md

echo "bench: $((SECONDS - start)) s; results in $OUT: $(cd "$OUT" && ls *.json *.md *.png | tr '\n' ' ')"
