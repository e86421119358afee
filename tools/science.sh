#!/usr/bin/env bash
# `make science`: the science table on the embedded Fashion-MNIST (not part of the test suite).
#
# Every method is pretrained at one budget: EPOCHS (default 1) epochs of the 60,000 training images
# at 28 px (MIM methods: 32 px), ResNet-18 at 1/4 width with the small stem, batch 256: the recipes
# of configs/demo_fmnist.yaml and configs/fmnist_*.yaml, once per seed in SEEDS (default "0 1 2").
# The default METHODS are the papers' comparisons (../shared/seeds): SimCLR vs MSCN on SimCLR, BYOL vs
# MSCN on BYOL (and MSCN's masks on BYOL without the high-pass: the collapse diagnosis), MoCo v2 vs
# MixMask, SimMIM (mask token only, leak-free, sparse) vs MixMAE vs each + LUT; simsiam, barlow,
# vicreg and unmix are known too (METHODS=...).
# Each pretrained backbone is evaluated three ways, always on the same MAX_VAL validation images, with
# ONE protocol for every row:
#   knn      train.py's final kNN (k=200, t=0.1; bank of MAX_TRAIN training images)
#   linear   eval.linear --fast --bn --preset $LIN_PRESET: classifier on cached center-crop features of
#            MAX_TRAIN images, LIN_EPOCHS epochs, the preset's BN-probe lr (bn_lr 0.1: one lr serves
#            contrastive, BYOL and MIM features); the inputs high-passed only for runs that trained on
#            high-passed images (MSCN), as the run's recipe says
#   ft10     eval.finetune --fraction 0.1: 10 % of the labels (class-balanced, seeded), FT_EPOCHS
#            epochs of the semi-supervised protocol (milestones moved to the same fractions), random
#            resized crops of area CROP_SCALE (default 0.2-1: an 8 %-area crop of a 28 px image is 8 px)
# against two baselines per seed, on the same network:
#   random      the three evaluations of the untrained network (same seed), initialised as torchvision
#               does (zero_init_residual=false): the pretraining configs zero the last BN of each block
#               (SimCLR, SimSiam, Barlow Twins), which makes an untrained block the identity and the
#               untrained network a much weaker baseline (kNN 54 % against 72 % at full width, 32 px)
#   supervised  eval.finetune --scratch: training from scratch with every label for EPOCHS epochs
#               (torchvision's SGD recipe and init: lr 0.1, momentum 0.9, wd 1e-4, cosine; crops as ft10)
# Results: $OUT/<method>-seed<S>/ (runs and their eval/), $OUT/logs/ (train.py's output),
# $OUT/report.{md,json,png} (eval.report: mean +- half the range over seeds), with the machine and the
# wall time in the title.
#
# Wall time on the idle 2-core EPYC: 2.5-3.5 min per method and seed (pretraining epoch and its three
# evaluations; MixMAE and MixMAE + LUT ~6), so the default 12 methods x 3 seeds + baselines take
# about 2 h 40 min. Runs resume (resume=true) and an evaluation whose result is newer than its
# checkpoint is not redone, so an interrupted `make science` continues where it stopped.
# SMOKE=1 checks the script in a few minutes (2 steps per run, tiny evaluations): not science.
# SPREAD (default: every method) names the methods run with every seed in SEEDS; the others run with the
# first seed only (a shorter table that still gives the run-to-run spread of the comparisons it names).
# BASELINES=0 skips the random-init and supervised baselines (a second call that adds methods to a table).
# PY, DATA / FMNIST, OUT, EPOCHS, SEEDS, METHODS, SPREAD, BASELINES, LIN_PRESET, LIN_EPOCHS, FT_EPOCHS,
# CROP_SCALE, MAX_TRAIN, MAX_VAL override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
FMNIST=${FMNIST:-$DATA/fashion-mnist}
OUT=${OUT:-runs/science}
EPOCHS=${EPOCHS:-1}
SEEDS=${SEEDS:-0 1 2}
LIN_EPOCHS=${LIN_EPOCHS:-30}
LIN_PRESET=${LIN_PRESET:-mixmask}
FT_EPOCHS=${FT_EPOCHS:-5}
CROP_SCALE=${CROP_SCALE:-0.2 1}
MAX_TRAIN=${MAX_TRAIN:-10000}
MAX_VAL=${MAX_VAL:-2000}
SMOKE=${SMOKE:-0}
METHODS=${METHODS:-simclr mscn_simclr byol mscn_byol mscn_byol_nohp moco mixmask simmim_token simmim simmim_sparse mixmae simmim_lut mixmae_lut}
SPREAD=${SPREAD:-$METHODS}
BASELINES=${BASELINES:-1}
first_seed=${SEEDS%% *}
start=$SECONDS

# method -> config file and overrides (MSCN on BYOL and Un-Mix on MoCo v2: a recipe on a base config)
config_of() {
    case $1 in
        simclr) echo "configs/demo_fmnist.yaml" ;;
        moco) echo "configs/fmnist_moco.yaml" ;;
        byol) echo "configs/fmnist_byol.yaml" ;;
        simsiam) echo "configs/fmnist_simsiam.yaml" ;;
        barlow) echo "configs/fmnist_barlow.yaml" ;;
        vicreg) echo "configs/fmnist_vicreg.yaml" ;;
        mscn_simclr) echo "configs/fmnist_mscn.yaml" ;;
        mscn_byol) echo "configs/fmnist_byol.yaml recipe=mscn_byol" ;;
        mixmask) echo "configs/fmnist_mixmask.yaml" ;;
        unmix) echo "configs/fmnist_moco.yaml recipe=unmix" ;;
        mscn_byol_nohp) echo "configs/fmnist_byol.yaml recipe=mscn_byol_nohp" ;;
        simmim_token) echo "configs/fmnist_simmim.yaml mim_fill=none" ;;
        simmim) echo "configs/fmnist_simmim.yaml" ;;
        simmim_sparse) echo "configs/fmnist_simmim_sparse.yaml" ;;
        mixmae) echo "configs/fmnist_mixmae.yaml" ;;
        simmim_lut) echo "configs/fmnist_simmim_lut.yaml" ;;
        mixmae_lut) echo "configs/fmnist_mixmae_lut.yaml" ;;
        *) echo "science.sh: unknown method $1" >&2; return 1 ;;
    esac
}

train_extra=(knn_max_train="$MAX_TRAIN" knn_max_val="$MAX_VAL")
lin_extra=(--preset "$LIN_PRESET" --epochs "$LIN_EPOCHS" --max-train "$MAX_TRAIN")
read -r -a crop <<< "$CROP_SCALE"
ft_extra=(--epochs "$FT_EPOCHS" --crop-scale "${crop[@]}")
sup_extra=(--epochs "$EPOCHS" --crop-scale "${crop[@]}")
if [ "$SMOKE" = 1 ]; then
    MAX_VAL=32
    train_extra=(max_steps=2 batch_size=32 workers=0 knn_max_train=64 knn_max_val=$MAX_VAL)
    lin_extra=(--preset "$LIN_PRESET" --epochs 1 --max-train 64 --batch-size 32)
    ft_extra=(--epochs 1 --max-train 32 --batch-size 16 --crop-scale "${crop[@]}")
    sup_extra=(--epochs 1 --max-train 32 --batch-size 16 --crop-scale "${crop[@]}")
fi
common_eval=(--data "$FMNIST" --max-val "$MAX_VAL" --no-progress)
knn_train=$MAX_TRAIN
[ "$SMOKE" = 1 ] && knn_train=64
mkdir -p "$OUT/logs"

fresh() {      # result folder, name, checkpoint: the result exists and is newer than the checkpoint
    [ -f "$1/$2.json" ] && [ "$1/$2.json" -nt "$3" ]
}

evaluate() {   # checkpoint, result folder, seed, extra flags for both (--random-init)
    local ckpt=$1 dir=$2 seed=$3; shift 3
    fresh "$dir" linear "$ckpt" ||
        "$PY" -m eval.linear --checkpoint "$ckpt" --fast --bn --name linear --out "$dir" "${common_eval[@]}" "${lin_extra[@]}" "$@"
    fresh "$dir" ft10 "$ckpt" ||
        "$PY" -m eval.finetune --checkpoint "$ckpt" --fraction 0.1 --seed "$seed" --name ft10 --out "$dir" \
            "${common_eval[@]}" "${ft_extra[@]}" "$@"
}

for seed in $SEEDS; do
    for m in $METHODS; do
        [ "$seed" = "$first_seed" ] || [[ " $SPREAD " == *" $m "* ]] || continue
        read -r -a cfg <<< "$(config_of "$m")"
        run=$OUT/$m-seed$seed
        echo "== $m seed $seed ($((SECONDS - start)) s)"
        "$PY" train.py --config "${cfg[0]}" "${cfg[@]:1}" data="$FMNIST" out_dir="$OUT" run_name="$m-seed$seed" \
            seed="$seed" epochs="$EPOCHS" resume=true progress=false "${train_extra[@]}" > "$OUT/logs/$m-seed$seed.log" 2>&1 ||
            { tail -20 "$OUT/logs/$m-seed$seed.log"; exit 1; }
        evaluate "$run/checkpoint.pt" "$run/eval" "$seed"
    done
    [ "$BASELINES" = 1 ] || continue
    # baselines on the SimCLR run's network (same arch, stem and seed; 28 px)
    base=$OUT/simclr-seed$seed/checkpoint.pt
    [ -f "$base" ] || base=$(ls "$OUT"/*-seed"$seed"/checkpoint.pt | head -1)
    echo "== random init / supervised, seed $seed ($((SECONDS - start)) s)"
    fresh "$OUT/random-seed$seed/eval" knn "$base" ||
        "$PY" -m eval.knn --checkpoint "$base" --random-init --name knn --data "$FMNIST" --out "$OUT/random-seed$seed/eval" \
            --max-val "$MAX_VAL" --max-train "$knn_train" --no-progress zero_init_residual=false
    evaluate "$base" "$OUT/random-seed$seed/eval" "$seed" --random-init zero_init_residual=false
    fresh "$OUT/supervised-seed$seed/eval" supervised "$base" ||
        "$PY" -m eval.finetune --checkpoint "$base" --scratch \
            --name supervised --out "$OUT/supervised-seed$seed/eval" "${common_eval[@]}" "${sup_extra[@]}" \
            zero_init_residual=false
done

wall=$((SECONDS - start))
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
"$PY" -m eval.report "$OUT"/*-seed* --out "$OUT" \
    --title "Fashion-MNIST, $EPOCHS epoch(s) of pretraining, seeds $SEEDS; $(nproc) cores ($cpu), wall $((wall / 60)) min$( [ "$SMOKE" = 1 ] && echo ', SMOKE run: not science')"
echo "science: $wall s; $OUT/report.md, $OUT/report.png"
