#!/usr/bin/env bash
# The whole GPU measurement in one call of at most 8 minutes, on any CUDA machine with its own torch
# (a bare one: no .venv, no network, no DALI / FFCV, no Debian photo packages is enough):
#
#   tools/gpu_check.sh              # results in $OUT if set, else runs/gpu_check/
#   tools/gpu_check.sh --dry-run    # the same steps in the same order at tiny sizes on the CPU (CI:
#                                   # tests/test_gpu_check.py), each limit x6
#   tools/gpu_check.sh --plan       # the steps and their limits, nothing run (--dry-run --plan: the dry run's)
#
# The first line of output says which modules import and which do not (tools/gpu_check.py preflight);
# a step whose modules do not import is skipped saying so, and the rest still run. The steps, by value:
# the environment; bench.py augment --compile of the mscn recipe (a cold inductor compile of its
# stencils takes minutes); bench.py train, end to end and model-only, ResNet-50 2 x 224 bf16 with the
# configs of the SimCLR + MSCN and BYOL runs; bench.py syncs (the step path under sync-debug "error");
# then pytest -m gpu on the test files that hold GPU tests, model-only MIM and MoCo rows (batch 128:
# MixMAE's per-source BatchNorm needs the memory), the eager augment rows, and the other compiled
# recipes as time allows. Every step has its own limit; the limits and the summary's add up to the
# budget (480 s), so each step gets at least its own, plus what the steps before it left unused
# (never what the steps after it are promised). A step with limit 0 runs only on such leftovers.
#
# Data: data/gpu_check_photos (carry it to the machine; build it once where the Debian photo
# packages are: `python tools/gpu_check.py photos --out data/gpu_check_photos --real-only`);
# GPU_CHECK_DATA=DIR uses another ImageFolder. When it is missing, the photos step runs convert.py
# photos and, where that fails (no packages), writes synthetic JPEGs with Pillow instead; the summary
# says which. DALI rows run where nvidia.dali imports, FFCV's where ffcv imports and DATA/train.beton exists.
#
# Output (at most 8 files of at most 16 MB): gpu_check.md (preflight, environment, steps, every table),
# gpu_check.json, gpu_check.log (every command's output), augment.json, model.json, train.json
# (bench.py's format: `python bench.py readme --results runs/bench,DIR` puts the GPU rows in the README
# table), augment.png, train.png. Nothing is installed; the python is $GPU_CHECK_PYTHON, else
# .venv/bin/python if there is one, else python3; PYTHONPATH gets the repository (no install needed).
# Exit status: 0 when every step that ran passed (a limit-0 step cut by the budget is no failure).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY=0; PLAN_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --plan) PLAN_ONLY=1 ;;
    *) echo "usage: tools/gpu_check.sh [--dry-run] [--plan]" >&2; exit 2 ;;
  esac
done

# ---- the plan: step:limit (seconds on a GPU) in the order the steps run, most valuable first -------
PLAN=(environment:25 augment-compiled-mscn:180 photos:20 train-simclr:55 train-byol:35
      syncs-simclr-mscn:25 syncs-byol-mixmask:25 cuda-tests:35 model-rest:40 augment-eager:25
      augment-compiled-rest:0)
SUMMARY_S=15                                   # the summary's own limit, the last of the budget
BUDGET_S=480                                   # one 8-minute call
SCALE=1; [[ $DRY == 1 ]] && SCALE=6            # the dry run: a shared 2-core CPU, every limit x6
BUDGET=${GPU_CHECK_BUDGET_S:-$(( BUDGET_S * SCALE ))}
SUMMARY_LIMIT=$(( SUMMARY_S * SCALE ))
declare -A LIMIT
NAMES=()
for entry in "${PLAN[@]}"; do NAMES+=("${entry%%:*}"); LIMIT[${entry%%:*}]=$(( ${entry##*:} * SCALE )); done
if [[ $PLAN_ONLY == 1 ]]; then
  for name in "${NAMES[@]}"; do printf '%s\t%s\n' "$name" "${LIMIT[$name]}"; done
  printf 'summary\t%s\nbudget\t%s\n' "$SUMMARY_LIMIT" "$BUDGET"
  exit 0
fi

PY=${GPU_CHECK_PYTHON:-python3}
[[ -z ${GPU_CHECK_PYTHON:-} && -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
DEST=${OUT:-runs/gpu_check}
mkdir -p "$DEST" && DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$DEST/gpu_check.log"
: > "$LOG"; : > "$WORK/steps.tsv"
printf '%s\n' "${NAMES[@]}" > "$WORK/order.txt"   # the summary orders each mode's rows by step
mkdir -p "$WORK"/{augment,model,train,syncs,configs}
T0=$(date +%s)
NEXT=0                                         # index in NAMES of the next step: steps run in plan order

# record NAME EXIT SECONDS NOTE: one row of the steps table
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${LIMIT[$1]}" "$4" >> "$WORK/steps.tsv"; }
# take NAME: the step must be the plan's next one (the dry run and the GPU run keep one order)
take() {
  if [[ ${NAMES[$NEXT]:-} != "$1" ]]; then
    echo "tools/gpu_check.sh: step $1 is out of the plan's order (expected ${NAMES[$NEXT]:-none})" >&2; exit 3
  fi
  NEXT=$(( NEXT + 1 ))
}
# note NAME WHY: the step is skipped, saying why
note() { take "$1"; record "$1" skipped 0 "$2"; echo "[gpu_check] $1: skipped ($2)" >&2; }
# missing MODULE...: the first module the preflight found not to import, with its error ("" when none;
# a module it did not get to counts as importing: the step then fails or passes on its own)
missing() {
  local m v w
  for m in "$@"; do
    v=HAVE_${m//./_} w=WHY_${m//./_}
    if [[ ${!v:-1} == 0 ]]; then echo "$m does not import: ${!w}"; return; fi
  done
}
# step NAME "MODULES" CMD...: run CMD when MODULES import, with the time this step may use: the budget
# left after the summary's and the later steps' limits. Logs its output; records exit status and seconds
# (124: timed out).
step() {
  local name=$1 needs=$2; shift 2
  local why; why=$(missing $needs)
  if [[ -n $why ]]; then note "$name" "$why"; return 0; fi
  take "$name"
  local later=0 i
  for (( i = NEXT; i < ${#NAMES[@]}; i++ )); do later=$(( later + ${LIMIT[${NAMES[$i]}]} )); done
  local limit=$(( BUDGET - SUMMARY_LIMIT - later - ($(date +%s) - T0) ))
  if (( limit < 10 )); then
    record "$name" skipped 0 "the ${BUDGET} s budget was spent"; echo "[gpu_check] $name: skipped (no time left)" >&2
    return 0
  fi
  local t=$(date +%s)
  echo "=== $name (limit ${limit} s): $*" >> "$LOG"
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$? took=$(( $(date +%s) - t )) why=""
  if [[ $rc == 124 || $rc == 137 ]]; then
    why="stopped at its ${limit} s"
    (( ${LIMIT[$name]} == 0 )) && { why="$why: it runs on time left over, and none was left"; rc=cut; }
  fi
  record "$name" "$rc" "$took" "$why"
  echo "[gpu_check] $name: exit $rc after $took s" >&2
}

# ---- sizes: the GPU run and the dry run take the same steps -----------------------------------------
DATA=${GPU_CHECK_DATA:-$([[ $DRY == 1 ]] && echo "$WORK/photos" || echo "data/gpu_check_photos")}
if [[ $DRY == 1 ]]; then
  DEVICE=cpu; WORKERS=2; PRESET=dry
  AUG=(--batch-size 8 --size 32 --batches 1 --warmup 1 --dtype float32)
  # one row per step where the GPU run has several (each train.py run costs seconds here)
  EAGER_RECIPES=mscn,simclr,byol,mixmask,simmim_8px; REST_RECIPES=simclr; REST_MODELS=(simmim)
  LOADERS=torchvision
  # one network shape for every config: 32 px, a narrow ResNet-10, fp32 (no bf16 autocast on the CPU)
  # no method keys here: each method takes only its own (its defaults are small enough at 32 px)
  NET=(arch=resnet10 width=8 stem=small size=32 precision=fp32)
  TRAIN=(batch_size=8 workers=$WORKERS); REST_BATCH=8; SYNC_BATCH=4; MIM_8PX=_8px
  STEPS=(--warmup 1 --batches 1)
  # the dry run checks the script, not the compiler: inductor on a shared CPU takes minutes per recipe
  COMPILE_ENV=(TORCHDYNAMO_DISABLE=1)
else
  DEVICE=cuda; WORKERS=$(nproc); PRESET=gpu
  AUG=(--batch-size 256 --size 224 --batches 20 --warmup 3 --dtype bfloat16)
  EAGER_RECIPES=mscn,simclr,byol,mixmask,simmim; REST_RECIPES=simclr,byol,mixmask,simmim
  REST_MODELS=(simmim mixmae moco); LOADERS=torchvision,synthetic
  NET=(arch=resnet50 size=224 precision=bf16 channels_last=true)      # the configs' own heads
  TRAIN=(batch_size=256 workers=$WORKERS); REST_BATCH=128; SYNC_BATCH=64; MIM_8PX=
  STEPS=(--warmup 5 --batches 20)
  COMPILE_ENV=()
fi
BENCH=(env "${COMPILE_ENV[@]}" "$PY" bench.py)
BENCH_NEEDS="torch masksiam torchvision numpy yaml tqdm psutil"
RUNS="$WORK/runs"
COMMON=(--out-dir "$RUNS" --device "$DEVICE")

# ---- 1. the environment: which modules import (the first line of output), the machine -------------
take environment
t=$(date +%s)
if command -v "$PY" > /dev/null; then
  timeout --kill-after=5 "${LIMIT[environment]}" "$PY" tools/gpu_check.py preflight "$WORK" > "$WORK/preflight.out" 2>> "$LOG"
  rc=$?
else
  rc=127; echo "$PY: not found" > "$WORK/preflight.out"
fi
# preflight.txt is written after each import: it says what was found even if an import hung or killed it
if [[ ! -s "$WORK/preflight.txt" ]]; then
  echo "[gpu_check] preflight: $PY could not check any import (exit $rc): $(head -c 300 "$WORK/preflight.out" | tr '\n' ' ')" > "$WORK/preflight.txt"
elif [[ $rc != 0 ]]; then
  sed -i "1s/\$/ (the preflight ended with exit $rc)/" "$WORK/preflight.txt"
fi
cat "$WORK/preflight.txt"
{ echo "=== environment: $PY tools/gpu_check.py preflight"; cat "$WORK/preflight.out"; } >> "$LOG"
[[ -f "$WORK/have.sh" ]] && source "$WORK/have.sh"
record environment "$rc" $(( $(date +%s) - t )) ""

# ---- 2. the compiled augment stage of mscn: its cold compile is the longest step -------------------
step augment-compiled-mscn "$BENCH_NEEDS" "${BENCH[@]}" augment --device "$DEVICE" --recipe mscn --compile \
  "${AUG[@]}" --reference-images 0 --json "$WORK/augment/augment-compiled-mscn.json"

# ---- 3. the JPEG folder: carried, else convert.py photos, else synthetic JPEGs ----------------------
if [[ -d "$DATA/train" ]]; then note photos "$DATA is there"
else
  step photos "numpy PIL torch masksiam" "$PY" tools/gpu_check.py photos --out "$DATA" --preset "$PRESET" \
    --photo-root "${GPU_CHECK_PHOTO_ROOT:-/}" --real-timeout-s $(( LIMIT[photos] / 2 )) --workers "$WORKERS"
fi

echo "$DATA" > "$WORK/data.txt"                # the summary says what the end-to-end rows read
# ---- 4. end to end per loader and model-only: the configs of the SimCLR + MSCN and BYOL runs -------
[[ ${HAVE_nvidia_dali:-0} == 1 && $DRY == 0 ]] && LOADERS+=,dali
[[ ${HAVE_ffcv:-0} == 1 && $DRY == 0 && -f "$DATA/train.beton" ]] && LOADERS+=,ffcv
step train-simclr "$BENCH_NEEDS PIL" "${BENCH[@]}" train "${COMMON[@]}" "${STEPS[@]}" --compare "$LOADERS" \
  --config configs/mscn_simclr_rn50_in1k.yaml --json "$WORK/train/train-simclr.json" \
  --set data="$DATA" "${NET[@]}" "${TRAIN[@]}"
step train-byol "$BENCH_NEEDS PIL" "${BENCH[@]}" train "${COMMON[@]}" "${STEPS[@]}" --compare torchvision \
  --config configs/byol_rn50_in1k.yaml --json "$WORK/train/train-byol.json" \
  --set data="$DATA" "${NET[@]}" "${TRAIN[@]}"

# ---- 5. the step path free of host syncs (CUDA: sync-debug "error") --------------------------------
step syncs-simclr-mscn "$BENCH_NEEDS" "${BENCH[@]}" syncs "${COMMON[@]}" --steps 3 --skip 2 \
  --config configs/mscn_simclr_rn50_in1k.yaml --json "$WORK/syncs/syncs-simclr-mscn.json" \
  --set data="$DATA" loader=synthetic "${NET[@]}" batch_size=$SYNC_BATCH
step syncs-byol-mixmask "$BENCH_NEEDS" "${BENCH[@]}" syncs "${COMMON[@]}" --steps 3 --skip 2 \
  --config configs/byol_rn50_in1k.yaml --json "$WORK/syncs/syncs-byol-mixmask.json" \
  --set data="$DATA" loader=synthetic "${NET[@]}" batch_size=$SYNC_BATCH recipe=mixmask

# ---- 6. the CUDA tests: the files that hold GPU tests (the dry run: one, collected and skipped)
mapfile -t GPU_TESTS < <(grep -lE 'mark\.gpu' tests/test_*.py)
# the dry run: one file, the one with the lightest imports
[[ $DRY == 1 ]] && GPU_TESTS=("$(printf '%s\n' "${GPU_TESTS[@]}" | grep -m1 -x tests/test_masks.py || echo "${GPU_TESTS[0]}")")
# unset: on a machine without DALI / FFCV their tests skip instead of failing collection (conftest.py)
step cuda-tests "$BENCH_NEEDS pytest skimage" env -u CI -u MASKSIAM_REQUIRE_LOADERS -u MASKSIAM_DEVICE \
  "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"

# ---- 7. model-only SimMIM, MixMAE and MoCo v2 (their configs, ResNet-50, batch 128) ----------------
CONFIGS=(); declare -A BASE=([simmim]=simmim_rn50_in1k [mixmae]=mixmae_rn50x3_in1k [moco]=mocov2_rn50_in1k)
for name in "${REST_MODELS[@]}"; do           # WORK/configs/NAME.yaml: the row's label is "model-only NAME"
  { echo "base: $ROOT/configs/${BASE[$name]}.yaml"
    [[ $name == simmim || $name == mixmae ]] && echo "recipe: $name$MIM_8PX"; } > "$WORK/configs/$name.yaml"
  CONFIGS+=("$WORK/configs/$name.yaml")
done
step model-rest "$BENCH_NEEDS" "${BENCH[@]}" model "${COMMON[@]}" "${STEPS[@]}" --config "$(IFS=,; echo "${CONFIGS[*]}")" \
  --json "$WORK/model/model-rest.json" --set data="$DATA" "${NET[@]}" batch_size=$REST_BATCH

# ---- 8. the augment stage eager, every recipe; then the other recipes compiled, as time allows ------
step augment-eager "$BENCH_NEEDS" "${BENCH[@]}" augment --device "$DEVICE" --recipe "$EAGER_RECIPES" \
  "${AUG[@]}" --reference-images 0 --json "$WORK/augment/augment-eager.json"
step augment-compiled-rest "$BENCH_NEEDS" "${BENCH[@]}" augment --device "$DEVICE" --recipe "$REST_RECIPES" \
  --compile "${AUG[@]}" --reference-images 0 --json "$WORK/augment/augment-compiled-rest.json"

# ---- 9. the summary: at most 8 files in DEST ----------------------------------------------------------
timeout --kill-after=5 "$SUMMARY_LIMIT" "$PY" tools/gpu_check.py summary "$WORK" "$DEST" "$DRY" "$BUDGET" \
  "$(( $(date +%s) - T0 ))" >> "$LOG" 2>&1 || echo "[gpu_check] summary: failed (gpu_check.log)" >&2
# the log is the eighth file; keep it under 16 MB
if [[ $(stat -c %s "$LOG") -gt 16000000 ]]; then tail -c 15000000 "$LOG" > "$WORK/log" && mv "$WORK/log" "$LOG"; fi
cat "$DEST/gpu_check.md" 2>/dev/null
echo "[gpu_check] wrote $(ls "$DEST" | tr '\n' ' ')in $DEST" >&2
! awk -F'\t' '$2 != "0" && $2 != "skipped" && $2 != "cut"' "$WORK/steps.tsv" | grep -q .
