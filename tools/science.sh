#!/usr/bin/env bash
# `make science`: the science table on the embedded Fashion-MNIST (not part of the test suite).
#
# Every method is pretrained at one budget: EPOCHS (default 1) epochs of the 60,000 training images
# at 28 px (MIM methods: 32 px), ResNet-18 at 1/4 width with the small stem, batch 256: the recipes
# of configs/demo_fmnist.yaml and configs/fmnist_*.yaml, once per seed in SEEDS (default "0 1").
# Each pretrained backbone is evaluated three ways, always on the same MAX_VAL validation images:
#   knn      train.py's final kNN (k=200, t=0.1; bank of MAX_TRAIN training images)
#   linear   eval.linear --fast --bn --preset $LIN_PRESET: classifier on cached center-crop features of
#            MAX_TRAIN images, LIN_EPOCHS epochs, ONE preset for every row (default mixmask, MoCo's
#            protocol; the inputs high-passed only for MSCN runs, as they train), BatchNorm on the
#            features at the preset's bn_lr (0.1) so that one lr serves contrastive, BYOL and MIM features
#   ft10     eval.finetune --fraction 0.1: 10 % of the labels (class-balanced, seeded), FT_EPOCHS
#            epochs of the semi-supervised protocol (milestones moved to the same fractions)
# against two baselines per seed, on the same network:
#   random      the three evaluations of the untrained network (same seed)
#   supervised  eval.finetune --scratch: training from scratch with every label for EPOCHS epochs
#               (torchvision's SGD recipe: lr 0.1, momentum 0.9, wd 1e-4, cosine), the same budget
# Results: $OUT/<method>-seed<S>/ (runs and their eval/), $OUT/logs/ (train.py's output),
# $OUT/report.{md,json,png} (eval.report:
# mean +- half the range over seeds), with the machine and the wall time in the title.
#
# Wall time, measured 2026-12-01 on a 2-core EPYC: 2.5-3.5 min per method and seed on the idle machine
# (pretraining epoch and its three evaluations; MixMAE 6), so 13 methods x 2 seeds at EPOCHS=1 take
# under 2 hours; the README's table (6 methods x 2 seeds + 7 x 1 + baselines) took 90 min, partly contended.
# Runs resume (resume=true) and evaluations are redone, so an interrupted `make science` continues.
# SMOKE=1 checks the script in a few minutes (2 steps per run, tiny evaluations): not science.
# SPREAD (default: every method) names the methods run with every seed in SEEDS; the others run with the
# first seed only (a shorter table that still gives the run-to-run spread of the comparisons it names).
# BASELINES=0 skips the random-init and supervised baselines (a second call that adds methods to a table).
# PY, DATA / FMNIST, OUT, EPOCHS, SEEDS, METHODS, SPREAD, BASELINES, LIN_PRESET, LIN_EPOCHS, FT_EPOCHS, MAX_TRAIN,
# MAX_VAL override.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
FMNIST=${FMNIST:-$DATA/fashion-mnist}
OUT=${OUT:-runs/science}
EPOCHS=${EPOCHS:-1}
SEEDS=${SEEDS:-0 1}
LIN_EPOCHS=${LIN_EPOCHS:-30}
LIN_PRESET=${LIN_PRESET:-mixmask}
FT_EPOCHS=${FT_EPOCHS:-5}
MAX_TRAIN=${MAX_TRAIN:-10000}
MAX_VAL=${MAX_VAL:-2000}
SMOKE=${SMOKE:-0}
METHODS=${METHODS:-simclr moco byol simsiam barlow vicreg mscn_simclr mscn_byol mixmask unmix simmim mixmae simmim_lut}
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
        simmim) echo "configs/fmnist_simmim.yaml" ;;
        mixmae) echo "configs/fmnist_mixmae.yaml" ;;
        simmim_lut) echo "configs/fmnist_simmim_lut.yaml" ;;
        *) echo "science.sh: unknown method $1" >&2; return 1 ;;
    esac
}

train_extra=(knn_max_train="$MAX_TRAIN" knn_max_val="$MAX_VAL")
lin_extra=(--preset "$LIN_PRESET" --epochs "$LIN_EPOCHS" --max-train "$MAX_TRAIN")
ft_extra=(--epochs "$FT_EPOCHS")
sup_extra=(--epochs "$EPOCHS")
if [ "$SMOKE" = 1 ]; then
    MAX_VAL=32
    train_extra=(max_steps=2 batch_size=32 workers=0 knn_max_train=64 knn_max_val=$MAX_VAL)
    lin_extra=(--preset "$LIN_PRESET" --epochs 1 --max-train 64 --batch-size 32)
    ft_extra=(--epochs 1 --max-train 32 --batch-size 16)
    sup_extra=(--epochs 1 --max-train 32 --batch-size 16)
fi
common_eval=(--data "$FMNIST" --max-val "$MAX_VAL" --no-progress)
knn_train=$MAX_TRAIN
[ "$SMOKE" = 1 ] && knn_train=64
mkdir -p "$OUT/logs"

evaluate() {   # checkpoint, result folder, seed, extra flags for both (--random-init)
    local ckpt=$1 dir=$2 seed=$3; shift 3
    "$PY" -m eval.linear --checkpoint "$ckpt" --fast --bn --name linear --out "$dir" "${common_eval[@]}" "${lin_extra[@]}" "$@"
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
    "$PY" -m eval.knn --checkpoint "$base" --random-init --name knn --data "$FMNIST" --out "$OUT/random-seed$seed/eval" \
        --max-val "$MAX_VAL" --max-train "$knn_train" --no-progress
    evaluate "$base" "$OUT/random-seed$seed/eval" "$seed" --random-init
    "$PY" -m eval.finetune --checkpoint "$base" --scratch \
        --name supervised --out "$OUT/supervised-seed$seed/eval" "${common_eval[@]}" "${sup_extra[@]}"
done

wall=$((SECONDS - start))
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
"$PY" -m eval.report "$OUT"/*-seed* --out "$OUT" \
    --title "Fashion-MNIST, $EPOCHS epoch(s) of pretraining, seeds $SEEDS; $(nproc) cores ($cpu), wall $((wall / 60)) min$( [ "$SMOKE" = 1 ] && echo ', SMOKE run: not science')"
echo "science: $wall s; $OUT/report.md, $OUT/report.png"
