"""Throughput benchmarking: loaders, the augment stage, the model, the whole training step.

    python bench.py loader --backend torchvision --data DIR --views 2 --size 224 --batch-size 256 --batches 20
    python bench.py loader --compare torchvision,dali,ffcv --data DIR ...     # side by side, ratios to the first
    python bench.py augment --recipe mscn --batch-size 256 --size 224 --device cpu
    python bench.py train --compare torchvision,dali,ffcv --set data=DIR arch=resnet18 ...  # vs model-only
    python bench.py model --config configs/demo_fmnist.yaml,configs/fmnist_simmim.yaml --set size=32   # methods side by side
    python bench.py loader ... --sweep workers=1,2 --sweep batch_size=32,64    # one row per combination
    python bench.py readme --results runs/bench --readme README.md   # the numbers table of a `make bench` run
    python bench.py scale --files 10000,100000 --out /tmp/scale   # loaders, converters, train.py as files grow

Every mode excludes warm-up batches (and pipeline start-up: worker spawn, numba/DALI compile) from
the rates and reports them separately as startup_s; rates are images/s (an image = all of its
views; views/s in augment mode), with seconds per batch p50/p95, CPU use, peak host RSS and, on
CUDA, peak GPU memory. Each run writes --json (default runs/bench/<mode>.json), a markdown table
next to it (.md, also printed) and a bar chart (.png). `ratio` is a row's rate over the first row's:
goals are ratios measured side by side in one run, since these machines are shared and noisy.
Loader mode: `ratio_tv2` is the rate over backend torchvision-v2's (the plain ImageFolder +
transforms.v2 pipeline a user would write), when it is compared; host_cpu_ms is the CPU time of the
whole process and its workers per image over the measured batches, host_cpu_ex_decode_ms the same
minus decode_ms, the decode's share: on the CPU DALI's decode threads' CPU time, measured; for the
others the full PIL decodes an image needs, timed on what the loader decodes: the split's files, or
for FFCV the images its .beton stores (at the converter's --max-res).
"""
from __future__ import annotations

import argparse
import os

from masksiam.errors import ArgumentParser, command
from bench.augment import AUGMENT_SWEEPS
from bench.explain import EXPLAIN_DELAYS
from bench.loader import LOADER_BACKENDS, LOADER_SWEEPS
from bench.readme import BEGIN, END


# what each mode measures: `bench.py MODE --help`
DESCRIPTIONS = {
    "loader": """Images/s of a loader backend alone (or of several side by side, --compare): decode,
crops and flips of the training split into uint8 batches on --device, no augment stage, no model.
Rows: images/s, ratio to the first row (ratio_tv2: to the plain torchvision-v2 pipeline), seconds
per batch p50 / p95, CPU use, host_cpu_ms (CPU ms per image of the process and its workers) and
host_cpu_ex_decode_ms (the same minus decode_ms: the full decodes an image costs, timed on what the
backend decodes: the split's files, the .beton's stored images for FFCV, DALI's threads on CPU),
peak host RSS, start-up seconds; on CUDA peak GPU memory.""",
    "augment": """Views/s of an augment recipe's batched stage on --device, on random uint8 crops (no
loader, no model), against the same recipe applied per sample with torchvision.transforms.v2
(speedup); memory traffic per view (mb_per_view, computed from the ops), optional profile.""",
    "model": """The training step alone on synthetic uint8 batches already on the device: forward,
loss, backward and optimizer step of the config's method, its augment stage replaced by its
model-only twin. The ceiling a loader has to feed; --config A,B side by side.""",
    "train": """train.py's real loop end to end on the config, one row per loader (--compare), beside
the model-only ceiling of the same config (model mode): efficiency = end to end / ceiling.""",
    "explain": """Each stage of the pipeline alone on your config (read, decode, loader, augment,
model), then end to end: which stage bounds the run, in words and as a waterfall of ms per image.""",
    "syncs": """A few train.py steps with the step path guarded against host-device syncs (CUDA:
sync-debug mode raises; CPU: host reads of tensors are refused): names the first sync, or says
none. --strict exits 1 when one is found.""",
    "scale": """What the loaders, the converters and train.py cost as the number of files grows: N small
JPEGs hard-linked into --classes folders (reused under --out), then, each in a fresh process: convert.py
webdataset / ffcv (wall time, peak memory of the process tree), each loader (start-up with no split
index and cached, first batch, the rank's and each worker's memory after the first batch and after
--batches batches, bytes resident per file), train.py's time to its first step. Several sizes: the
growth per file between them and the linear extrapolation to 14 M files. Writes OUT/scale.json, .md.""",
    "readme": f"""Rewrite the {BEGIN} ... {END} block of README.md from a bench run's JSON files
(loader, augment, train, model): only that block changes.""",
}


def _run_args(p, config_help: str = "a train.py config (configs/*.yaml)") -> None:
    """The arguments of the modes that run train.py's own pieces on a config: --config, --set,
    --out-dir, --device."""
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train.py overrides")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="train.py overrides after the flags, as train.py and eval.* take them (same as --set)")
    p.add_argument("--out-dir", default="runs/bench-tmp")
    p.add_argument("--device", default="auto")


@command("bench.py")
def main(argv: list[str] | None = None) -> dict:
    parser = ArgumentParser(prog="bench.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    sweep_help = "KEY=V1,V2: one row (group) per value; repeat for the cartesian product"

    def mode(name: str, help_text: str):
        return sub.add_parser(name, help=help_text, description=DESCRIPTIONS[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = mode("loader", "images/s of a loader backend (or several, side by side)")
    p.add_argument("--backend", default="torchvision", choices=list(LOADER_BACKENDS))
    p.add_argument("--compare", default="", help="comma-separated backends, ratios to the first")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--ffcv-path", default="", help="the .beton for ffcv (default DATA/SPLIT.beton)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--crops", default="", help="multi-crop views, e.g. 2x224@0.14-1,6x96@0.05-0.14 "
                   "(the config's crops=; replaces --views/--size)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--sweep", action="append", default=[], help=f"{sweep_help} ({', '.join(LOADER_SWEEPS)})")
    p.add_argument("--repeats", type=int, default=1, help="measure every backend this many times, "
                   "alternating the order; rows average them")
    p.add_argument("--json", default="runs/bench/loader.json", help="also writes .md and .png next to it")

    p = mode("augment", "views/s of an augment recipe vs per-sample torchvision v2")
    p.add_argument("--recipe", default="mscn", help="a recipe name or yaml path; comma-separated for several")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="output dtype")
    p.add_argument("--reference-images", type=int, default=32,
                   help="images per batch for the per-sample torchvision reference (0 = skip it)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--chunk", type=int, default=0,
                   help="rows per chunk (0 = the default: cache-sized on CPU, ~16 MiB on GPUs, compiled GPUs the batch)")
    p.add_argument("--compile", action="store_true",
                   help="each recipe branch as one torch.compile'd function (pipelines/augment/fused.py)")
    p.add_argument("--no-bytes", dest="bytes", action="store_false",
                   help="skip mb_per_view, the memory traffic per output view computed from the ops "
                        "(with --compile it compiles the branches once more, caches off)")
    p.add_argument("--profile", action="store_true", help="also profile one batch: time per stage, top ops")
    p.add_argument("--sweep", action="append", default=[], help=f"{sweep_help} ({', '.join(AUGMENT_SWEEPS)})")
    p.add_argument("--json", default="runs/bench/augment.json", help="also writes .md and .png next to it")

    for name, help_text in (("model", "the training step on synthetic data on the device: the ceiling"),
                            ("train", "the real loop end to end, per loader, vs model-only")):
        p = mode(name, help_text)
        _run_args(p, "a train.py config (configs/*.yaml); model mode: comma-separated for several, side by side")
        p.add_argument("--compare", default="", help="train mode: comma-separated loaders, end to end each")
        p.add_argument("--batches", type=int, default=20, help="measured steps (a multiple of --warmup)")
        p.add_argument("--warmup", type=int, default=5, help="steps excluded, also the logging interval")
        p.add_argument("--sweep", action="append", default=[],
                       help=f"{sweep_help} (train.py config keys: batch_size, workers, ...)")
        p.add_argument("--json", default=f"runs/bench/{name}.json", help="also writes .md and .png next to it")

    p = mode("explain", "each stage alone, then together, on your config: which one bounds the run")
    _run_args(p)
    p.add_argument("--batches", type=int, default=20, help="measured batches per stage (a multiple of --warmup)")
    p.add_argument("--warmup", type=int, default=5, help="batches excluded per stage")
    p.add_argument("--delay", action="append", default=[], metavar="STAGE=SECONDS",
                   help=f"sleep this long per batch in one stage ({', '.join(EXPLAIN_DELAYS)}): to see the "
                        f"verdict move, and for tests")
    p.add_argument("--json", default="runs/bench/explain.json", help="also writes .md and .png (the waterfall)")

    p = mode("syncs", "a few train.py steps with the step path sync-free (CUDA: sync-debug error; CPU: "
                      "host reads refused): names the first host sync")
    _run_args(p)
    p.add_argument("--steps", type=int, default=4, help="guarded steps")
    p.add_argument("--skip", type=int, default=2, help="unguarded warm-up steps first (autotuning, lazy init)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when a sync is found")
    p.add_argument("--json", default="runs/bench/syncs.json")

    p = mode("scale", "loaders, converters and train.py's start as the number of files grows")
    p.add_argument("--files", required=True, help="files per dataset; comma-separated for several sizes")
    p.add_argument("--loaders", default="torchvision,dali,ffcv", help="comma-separated (ffcv needs --converters ffcv)")
    p.add_argument("--converters", default="webdataset,ffcv", help="comma-separated convert.py commands ('' = none)")
    p.add_argument("--workers", type=int, default=2, help="loader workers / threads, convert.py webdataset's and train.py's")
    p.add_argument("--classes", type=int, default=1000, help="class folders")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=32, help="crop size (px)")
    p.add_argument("--batches", type=int, default=40, help="batches read after the first (0 = the rest of the epoch)")
    p.add_argument("--no-train", action="store_true", help="skip train.py's time to first step")
    p.add_argument("--out", default="runs/bench/scale", help="datasets, converted copies, scale.json and .md")
    p.add_argument("--keep", action="store_true", help="keep the datasets and converted copies (reused next time)")

    p = mode("readme", f"rewrite the {BEGIN} block of README.md from a bench run's JSON")
    p.add_argument("--results", default="runs/bench", help="folder of the run's loader/augment/train .json; "
                   "comma-separated for several (e.g. runs/bench,runs/gpu_check: the GPU rows too)")
    p.add_argument("--readme", default="README.md", help="only the marked block changes; never created")

    args = parser.parse_args(argv)
    if getattr(args, "overrides", None):            # key=value after the flags: one grammar with train.py
        args.set = [*args.set, *args.overrides]
    import bench                       # each mode's command, by the name the package gives it: cmd_<mode>
    return getattr(bench, f"cmd_{args.mode}")(args)
