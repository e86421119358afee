"""bench.py syncs: a few train.py steps with the step path guarded against host-device syncs
(masksiam.syncs: CUDA sync-debug "error", CPU no_host_reads); names the first one found."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from masksiam.errors import UserError
from masksiam.io import atomic_write_text
from masksiam.syncs import HostRead, sync_free
from bench.loop import WrappedAugmenter, trains_on
from bench.meter import machine, pick_device

ROOT = Path(__file__).resolve().parent.parent      # the repository: `where` names its files
# frames not worth naming: bench's own and the guard's raise
GUARD_FILES = (str(Path(__file__).resolve().parent), str(ROOT / "masksiam" / "syncs.py"))


def sync_check(argv: list[str], device: torch.device, skip: int = 2) -> dict:
    """train.py `argv` with the per-step path sync-free after `skip` warm-up calls (cudnn autotuning,
    lazy inits): on CUDA the augment stage, the train step (forward, backward, optimizer) and the
    method's after_step hook under sync-debug "error"; on the CPU the train step and the hook under
    no_host_reads (the CPU augmenter reads its host-side plan by design). The loader, logging and
    checkpoints stay outside (they sync at intervals on purpose). -> calls guarded, ok, the error."""
    import traceback
    calls = {"augment": 0, "train_step": 0, "after_step": 0}
    seen = dict.fromkeys(calls, 0)

    def guard(name, fn, *args, **kwargs):
        seen[name] += 1
        if seen[name] <= skip:
            return fn(*args, **kwargs)
        with sync_free(device):
            result = fn(*args, **kwargs)
        calls[name] += 1
        return result

    def guarded_augmenter(build):
        def built(*args, **kwargs):
            aug = build(*args, **kwargs)
            return WrappedAugmenter(aug, lambda fn, *a, **k: guard("augment", fn, *a, **k)) \
                if device.type == "cuda" else aug
        return built

    def guarded_method(build):
        def built(*args, **kwargs):
            method = build(*args, **kwargs)
            hook = method.after_step
            method.after_step = lambda *a, **k: guard("after_step", hook, *a, **k)
            return method
        return built
    wrap = dict(build_augmenter=guarded_augmenter, build_method=guarded_method,
                train_step=lambda step: lambda *a, **k: guard("train_step", step, *a, **k))
    error, where = None, []
    try:
        import train
        with trains_on(device):
            train.main(argv, wrap=wrap)
    except (HostRead, RuntimeError) as err:       # sync-debug "error" raises RuntimeError
        error = f"{type(err).__name__}: {err}".strip()
        where = [f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}"
                 for f in traceback.extract_tb(err.__traceback__)
                 if f.filename.startswith(str(ROOT)) and "/.venv/" not in f.filename
                 and not f.filename.startswith(GUARD_FILES)][-4:]
    return {"device": str(device), "guard": "sync-debug error" if device.type == "cuda" else "no_host_reads",
            "guarded_calls": calls, "ok": error is None and calls["train_step"] > 0, "error": error, "where": where}


def cmd_syncs(args) -> dict:
    device = pick_device(args.device)
    argv = (["--config", args.config] if args.config else []) + [
        f"out_dir={args.out_dir}", "run_name=syncs", f"max_steps={args.skip + args.steps}",
        f"log_every={args.skip + args.steps}", "final_eval=false", "ckpt_every=0", "knn_every=0",
        "progress=false", "resume=false", *args.set]
    import shutil
    shutil.rmtree(Path(args.out_dir) / "syncs", ignore_errors=True)
    res = {"label": "sync-free step path", **sync_check(argv, device, args.skip), "steps": args.steps}
    line = (f"sync check on {device} ({res['guard']}): " + ("no host sync in " if res["ok"] else "FAILED in ")
            + ", ".join(f"{n} {k} calls" for k, n in res["guarded_calls"].items())
            + (f": {res['error']} at {' <- '.join(reversed(res['where']))}" if res["error"] else ""))
    print(line, flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"mode": "syncs", "machine": machine(), "args": vars(args),
                                       "results": [res], "table": line}, indent=2) + "\n")
    if not res["ok"] and args.strict:
        raise UserError(f"syncs: {line}")
    return res
