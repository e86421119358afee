#!/usr/bin/env bash
# The whole GPU measurement in one call (issue 16 section 3), on any CUDA machine with its own torch:
#
#   tools/gpu_check.sh              # ~8 minutes on one GPU; results in $OUT, else runs/gpu_check/
#   tools/gpu_check.sh --dry-run    # every step at tiny sizes on the CPU, one row per step where the
#                                   # GPU run has several (CI: tests/test_gpu_check.py)
#
# Steps: the environment (GPU, driver, torch, CUDA, cuDNN); the CUDA tests (pytest -m gpu); bench.py
# augment on the device for mscn, simclr, byol, mixmask, simmim at batch 256 x 224 bf16, eager and
# compiled; bench.py model for ResNet-50 2 x 224 bf16 channels-last (simclr, byol, moco, simmim,
# mixmae); bench.py train end to end with the torchvision loader on a JPEG folder (data/gpu_check_photos,
# built by `convert.py photos` when missing; GPU_CHECK_DATA=DIR to use another) and with the
# synthetic loader, against model-only; bench.py syncs (the step path under sync-debug "error").
# DALI / FFCV rows run only where those libraries import (FFCV also needs DATA/train.beton); otherwise
# the summary says they were skipped. Nothing is installed; the python is .venv/bin/python if there is
# one, else python3 (the machine's torch).
#
# Output (at most 8 files of at most 16 MB): gpu_check.md (summary: environment, steps, every table,
# verdicts), gpu_check.json (all of it), gpu_check.log (every command's output), augment.json,
# model.json, train.json (bench.py's format: `python bench.py readme --results runs/bench,DIR` puts
# the GPU rows in the README table), augment.png, train.png.
# Every step has a time limit inside the 8-minute budget; a step that fails or times out is recorded
# and the rest still run. Exit status: 0 when every step that ran passed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: tools/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=python3
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
DEST=${OUT:-runs/gpu_check}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$DEST/gpu_check.log"
: > "$LOG"
: > "$WORK/steps.tsv"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; SCALE=4                      # step limits x4: a shared CPU, torch.compile on the CPU
  AUG=(--batch-size 8 --size 32 --batches 1 --warmup 1 --dtype float32)
  COMPILED_RECIPES=(simclr)
  NET=(arch=resnet10 width=8 stem=small size=32 proj_hidden=32 proj_dim=16 precision=fp32)
  MIM_NET=(arch=resnet10 width=8 stem=small size=32 precision=fp32); MIM_RECIPE=_8px   # 8 px patches
  TRAIN_BATCH=8; MODEL_BATCH=8; WORKERS=2; STEPS=(--warmup 1 --batches 1)
  # one row per step where the GPU run has several (each train.py run costs seconds here): the
  # same code paths, and the suite stays short
  SIAMESE=simclr; MIM=(simmim); SYNC_PAIRS=(simclr:mscn); OPTIONAL_LOADERS=0
  TESTS=(tests/test_ddp.py tests/test_optim.py)
  PHOTOS_ARGS=(--classes 2 --train-per-class 8 --val-per-class 2 --max-res 96)
else
  DEVICE=cuda; SCALE=1
  AUG=(--batch-size 256 --size 224 --batches 20 --warmup 3 --dtype bfloat16)
  COMPILED_RECIPES=(mscn simclr byol mixmask simmim)
  NET=(arch=resnet50 size=224 precision=bf16 channels_last=true)
  MIM_NET=("${NET[@]}"); MIM_RECIPE=
  TRAIN_BATCH=256; MODEL_BATCH=256; WORKERS=$(nproc); STEPS=(--warmup 5 --batches 20)
  SIAMESE=simclr,byol,moco; MIM=(simmim mixmae); SYNC_PAIRS=(simclr:mscn byol:mixmask); OPTIONAL_LOADERS=1
  TESTS=(tests)
  PHOTOS_ARGS=(--classes 20 --train-per-class 100 --val-per-class 5 --max-res 256)
fi
BUDGET=${GPU_CHECK_BUDGET_S:-$(( 480 * SCALE ))}    # 8 minutes on a GPU
DATA=${GPU_CHECK_DATA:-$([[ $DRY == 1 ]] && echo "$WORK/photos" || echo "data/gpu_check_photos")}
BENCH=("$PY" bench.py)
RUNS="$WORK/runs"

# step NAME LIMIT_S CMD...: run CMD with the smaller of LIMIT_S and the budget left, log its output,
# record name / exit status / seconds (rc 124: timed out; "skipped": no budget left)
step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if (( left < 10 )); then
    printf '%s\tskipped\t0\tthe %s s budget was spent\n' "$name" "$BUDGET" >> "$WORK/steps.tsv"
    return 0
  fi
  (( limit > left )) && limit=$left
  local t=$(date +%s)
  echo "=== $name (limit ${limit} s): $*" >> "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$WORK/steps.tsv"
  echo "[gpu_check] $name: exit $rc after $(( $(date +%s) - t )) s" >&2
  return 0
}
note() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$WORK/steps.tsv"; echo "[gpu_check] $1: skipped ($2)" >&2; }

# ---- 1. the environment -------------------------------------------------------------------------
step environment 60 "$PY" - "$WORK/env.json" <<'EOF'
import json, os, platform, shutil, subprocess, sys
sys.path.insert(0, ".")
import torch
import masksiam  # noqa: F401  (torchvision importable on a CPU-only torch)
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
       "cpus": len(os.sched_getaffinity(0)), "cuda_available": torch.cuda.is_available()}
try:
    import torchvision
    env["torchvision"] = torchvision.__version__
except Exception as err:
    env["torchvision"] = f"does not import: {err}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, gpus=torch.cuda.device_count(), gpu_memory_gb=round(p.total_memory / 2**30, 1),
               capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported())
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                       capture_output=True, text=True)
    env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
for name in ("nvidia.dali", "ffcv"):
    try:
        __import__(name)
        env[name] = "installed"
    except Exception as err:
        env[name] = f"not installed ({type(err).__name__})"
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env, indent=2))
EOF

# ---- 2. the CUDA tests (skipped cleanly without CUDA) -------------------------------------------
step cuda-tests 90 env MASKSIAM_DEVICE= "$PY" -m pytest -q -m gpu -p no:cacheprovider "${TESTS[@]}"

# ---- 3. the augment stage on the device, eager (compiled: step 7) --------------------------------
step augment-eager 90 "${BENCH[@]}" augment --device "$DEVICE" --recipe mscn,simclr,byol,mixmask,simmim \
  "${AUG[@]}" --reference-images 0 --json "$WORK/augment/eager.json"
# ---- 4. model-only: ResNet-50 2 x 224 bf16 channels-last, synthetic batches on the device ---------
step model-siamese 120 "${BENCH[@]}" model --device "$DEVICE" "${STEPS[@]}" --out-dir "$RUNS" \
  --json "$WORK/model/siamese.json" --sweep method=$SIAMESE \
  --set data="$DATA" "${NET[@]}" batch_size=$MODEL_BATCH views=2 recipe=simclr
for method in "${MIM[@]}"; do
  step "model-$method" 60 "${BENCH[@]}" model --device "$DEVICE" "${STEPS[@]}" --out-dir "$RUNS" \
    --json "$WORK/model/$method.json" --set data="$DATA" "${MIM_NET[@]}" batch_size=$MODEL_BATCH views=1 \
    method=$method recipe=$method$MIM_RECIPE
done

# ---- 5. end to end: the torchvision loader on JPEGs, the synthetic loader, vs model-only ---------
if [[ ! -d "$DATA/train" ]]; then
  step photos 240 "$PY" convert.py photos --out "$DATA" "${PHOTOS_ARGS[@]}" --workers "$WORKERS"
fi
LOADERS=torchvision,synthetic
if [[ $OPTIONAL_LOADERS == 0 ]]; then note dali-ffcv-rows "the dry run measures the torchvision and synthetic loaders only"
else
  if "$PY" -c "import nvidia.dali" 2>/dev/null; then LOADERS+=,dali; else note dali-rows "nvidia.dali is not installed"; fi
  if "$PY" -c "import ffcv" 2>/dev/null && [[ -f "$DATA/train.beton" ]]; then LOADERS+=,ffcv
  else note ffcv-rows "ffcv is not installed or $DATA/train.beton is missing"; fi
fi
step train 150 "${BENCH[@]}" train --device "$DEVICE" "${STEPS[@]}" --out-dir "$RUNS" --compare "$LOADERS" \
  --json "$WORK/train/train.json" --set data="$DATA" "${NET[@]}" batch_size=$TRAIN_BATCH views=2 \
  recipe=mscn method=simclr workers=$WORKERS

# ---- 6. the step path free of host syncs (CUDA: sync-debug "error") -----------------------------
for pair in "${SYNC_PAIRS[@]}"; do
  step "syncs-${pair%%:*}-${pair##*:}" 60 "${BENCH[@]}" syncs --device "$DEVICE" --steps 3 --skip 2 \
    --out-dir "$RUNS" --json "$WORK/syncs/${pair%%:*}.json" --set data="$DATA" loader=synthetic \
    "${NET[@]}" batch_size=$((MODEL_BATCH / 4 > 4 ? MODEL_BATCH / 4 : 4)) views=2 method=${pair%%:*} recipe=${pair##*:}
done

# ---- 7. the compiled augment stage: last, it gets what the budget has left (compiles take minutes) --
# the dry run takes the --compile path with torch.compile disabled: inductor on a shared CPU takes
# minutes per recipe, and the dry run checks the script, not the compiler
COMPILE_ENV=(); [[ $DRY == 1 ]] && COMPILE_ENV=(TORCHDYNAMO_DISABLE=1)
for recipe in "${COMPILED_RECIPES[@]}"; do
  step "augment-compiled-$recipe" 60 env "${COMPILE_ENV[@]}" "${BENCH[@]}" augment --device "$DEVICE" --recipe "$recipe" --compile \
    "${AUG[@]}" --reference-images 0 --json "$WORK/augment/compiled-$recipe.json"
done

# ---- 8. the summary: at most 8 files in DEST ---------------------------------------------------
"$PY" - "$WORK" "$DEST" "$DRY" "$BUDGET" "$(( $(date +%s) - T0 ))" <<'EOF' >> "$LOG" 2>&1
import json, sys
from pathlib import Path
sys.path.insert(0, ".")
import bench

work, dest, dry, budget, took = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
steps = [dict(zip(("step", "exit", "seconds", "note"), line.split("\t"))) for line in
         (work / "steps.tsv").read_text().splitlines()]
payloads = {}
for mode in ("augment", "model", "train", "syncs"):
    files = sorted((work / mode).glob("*.json"), key=lambda p: p.stat().st_mtime) if (work / mode).is_dir() else []
    parts = [json.loads(p.read_text()) for p in files]              # in the order the steps ran
    for p in parts:   # the method of a model row set with --set, not swept
        method = next((s.split("=", 1)[1] for s in p["args"].get("set", []) if s.startswith("method=")), "")
        for r in p["results"]:
            r.setdefault("method", method)
            if mode == "model":
                r["label"] = f"model-only {r['method']}"
            if mode == "augment":
                r["label"] = f"{r['recipe']}{' compiled' if r.get('compile') else ''}"
            if mode == "syncs":
                recipe = next((s.split("=", 1)[1] for s in p["args"].get("set", []) if s.startswith("recipe=")), "")
                r["label"] = f"{method} + {recipe}"
    if parts:   # one payload per mode, rows of every part (eager then compiled, methods in order)
        payloads[mode] = {**parts[0], "results": [r for p in parts for r in p["results"]]}
md = [f"# tools/gpu_check.sh{' --dry-run (CPU, tiny sizes: not a measurement)' if dry else ''}", "",
      f"{took} s of a {budget} s budget." + (" The compiled augment rows ran with torch.compile disabled "
                                            "(TORCHDYNAMO_DISABLE=1)." if dry else ""), "", "## Environment", "", "```", json.dumps(env, indent=1), "```", "",
      "## Steps", "", "| step | exit | seconds | note |", "|---|---|---|---|"]
md += [f"| {s['step']} | {s['exit']} | {s['seconds']} | {s.get('note', '')} |" for s in steps]
for mode in ("augment", "model", "train"):
    if mode not in payloads:
        md += ["", f"## {mode}", "", "no results (see the steps above and gpu_check.log)"]
        continue
    rows = payloads[mode]["results"]
    rate = "views_per_s" if mode == "augment" else "images_per_s"
    for r in rows:
        r["ratio"] = r[rate] / rows[0][rate]
    columns = {"augment": ["label", "views_per_image", "views_per_s", "ratio", "mb_per_view", "s_per_batch_p50", "startup_s",
                           "augment_gpu_mb_per_image", "peak_gpu_mb", "peak_gpu_device_mb"],
               "model": ["label", "method", "arch", "batch_size", "images_per_s", "ratio", "s_per_batch_p50",
                         "startup_s", "peak_gpu_mb", "peak_gpu_device_mb"],
               "train": ["label", "recipe", "images_per_s", "ratio", "efficiency", "data_wait", "s_per_batch_p50",
                         "startup_s", "cpu_percent", "peak_gpu_mb", "peak_gpu_device_mb"]}[mode]
    table = bench._print_table(rows, [c for c in columns if any(c in r for r in rows)])
    payloads[mode]["table"] = table
    md += ["", f"## {mode}", "", table]
    (dest / f"{mode}.json").write_text(json.dumps(payloads[mode], indent=2) + "\n")
    if mode == "augment":
        bench._chart([(r["label"], r["views_per_s"], f"x{r['ratio']:.2f}", bench.BLUE) for r in rows],
                     dest / "augment.png", "gpu_check: augment stage", "views / s")
    if mode == "train":
        bars = [(r["label"], r["images_per_s"], f"{r['efficiency']:.2f} of model-only" if "efficiency" in r else "",
                 bench.GREY if r.get("loader") == "synthetic" and "model-only" in r["label"] else bench.BLUE)
                for r in rows + payloads.get("model", {}).get("results", [])]
        bench._chart(bars, dest / "train.png", "gpu_check: end to end and model-only", "images / s")
md += ["", "## Host syncs in the step path", ""]
for r in payloads.get("syncs", {}).get("results", []):
    md.append(f"- {r['label']}, {r['device']} ({r['guard']}): " + ("none" if r["ok"] else f"FOUND: {r['error']} at "
              + " <- ".join(reversed(r["where"]))) + f" ({r['guarded_calls']})")
summary = {"dry_run": dry, "seconds": int(took), "budget_s": int(budget), "environment": env, "steps": steps,
           "results": {m: p["results"] for m, p in payloads.items()}}
(dest / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
(dest / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
EOF
# the log is the eighth file; keep it under 16 MB
if [[ $(stat -c %s "$LOG") -gt 16000000 ]]; then tail -c 15000000 "$LOG" > "$WORK/log" && mv "$WORK/log" "$LOG"; fi
cat "$DEST/gpu_check.md" 2>/dev/null
echo "[gpu_check] wrote $(ls "$DEST" | tr '\n' ' ')in $DEST" >&2
! awk -F'\t' '$2 != "0" && $2 != "skipped"' "$WORK/steps.tsv" | grep -q .
