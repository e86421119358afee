"""What every bench mode shares: the Meter (per-batch times, CPU, memory), the device a run asks for,
the --sweep combinations and row labels, and the report every mode writes (JSON, markdown table,
bar chart)."""
from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from masksiam.errors import UsageError
from masksiam.io import atomic_write, atomic_write_text


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine_busy() -> float:
    """CPU seconds the whole machine (every process, and the hypervisor's steal) has been busy."""
    t = psutil.cpu_times()
    return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


class Meter:
    """Per-batch wall times after warm-up, CPU time of this process and its children, and their peak
    RSS, sampled by a thread from construction on (loader workers come and go between batches).
    On CUDA the peak GPU memory counts from construction too: peak_gpu_mb is torch's allocator,
    peak_gpu_device_mb the device's memory in use (cudaMemGetInfo, sampled by the same thread) above
    what it was at construction: every allocator, DALI's and nvJPEG's pools included (and any other
    process on the GPU). other_cpu_percent is the CPU the rest of the machine used meanwhile: the
    sign of a contended, untrustworthy measurement."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []
        self.proc = psutil.Process()
        self.peak_rss = 0
        if device.type == "cuda":
            torch.cuda.empty_cache()                 # a previous row's cached blocks would hide this one's
            torch.cuda.reset_peak_memory_stats(device)
            self.gpu_used0 = self.peak_gpu_used = self._gpu_used()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self._rss()
            if self.device.type == "cuda":
                self.peak_gpu_used = max(self.peak_gpu_used, self._gpu_used())

    def _gpu_used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _rss(self) -> int:
        total = self.proc.memory_info().rss
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        self.peak_rss = max(self.peak_rss, total)
        return total

    def _cpu(self) -> float:
        t = self.proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system   # + workers already gone
        for child in self.proc.children(recursive=True):
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total

    def start(self) -> None:
        sync(self.device)
        self.t0 = self.last = time.perf_counter()
        self.cpu0, self.busy0 = self._cpu(), _machine_busy()

    def tick(self) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def result(self, images_per_batch: int) -> dict:
        self._stop.set()
        self._watcher.join()
        self._rss()
        wall = time.perf_counter() - self.t0
        cpu, busy = self._cpu() - self.cpu0, _machine_busy() - self.busy0
        t = np.array(self.times)
        out = {
            "batches": len(t),
            "images_per_s": images_per_batch * len(t) / wall if wall > 0 else float("nan"),
            "s_per_batch_p50": float(np.percentile(t, 50)) if len(t) else float("nan"),
            "s_per_batch_p95": float(np.percentile(t, 95)) if len(t) else float("nan"),
            "cpu_percent": 100.0 * cpu / wall if wall > 0 else float("nan"),
            "other_cpu_percent": max(0.0, 100.0 * (busy - cpu) / wall) if wall > 0 else float("nan"),
            "peak_rss_mb": self.peak_rss / 2**20,
        }
        if self.device.type == "cuda":
            self.peak_gpu_used = max(self.peak_gpu_used, self._gpu_used())
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            out["peak_gpu_device_mb"] = (self.peak_gpu_used - self.gpu_used0) / 2**20
        return out


GPU_COLUMNS = ["peak_gpu_mb", "peak_gpu_device_mb"]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but CUDA is not available")
    return torch.device(name)


def print_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append((f"{v:.2f}" if c in ("ratio", "ratio_tv2", "speedup", "efficiency", "data_wait",
                                              "host_cpu_ms", "host_cpu_ex_decode_ms") else f"{v:,.1f}")
                         if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    return table


def machine() -> dict:
    """What the numbers were measured on (stored in every JSON; the README block quotes it)."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def combos(args, allowed: tuple[str, ...] | None = None) -> list[dict]:
    """--sweep KEY=V1,V2 (repeatable) -> the cartesian product, one {key: value} per row group ([{}]
    without sweeps). allowed: the keys a mode can sweep (None: train.py config keys, checked there)."""
    axes = []
    for item in args.sweep:
        key, _, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not key or not values:
            raise UsageError(f"--sweep {item!r}: expected KEY=V1,V2,...")
        if allowed is not None and key not in allowed:
            raise UsageError(f"{args.mode}: --sweep {key}: choose from {', '.join(allowed)}")
        cast = int if allowed is not None else str      # loader/augment keys are ints; train.py parses its own
        try:
            axes.append([(key, cast(v)) for v in values.split(",")])
        except ValueError:
            raise UsageError(f"--sweep {item!r}: {key} takes integers") from None
    return [dict(combo) for combo in itertools.product(*axes)]


def row_label(name: str, combo: dict) -> str:
    return " ".join([name, *(f"{k}={v}" for k, v in combo.items())])


# ---- reports: JSON, markdown table, chart -------------------------------------------------------

def report(mode: str, rows: list[dict], args, columns: list[str], rate: str = "images_per_s") -> dict:
    """ratio = rate / the first row's; then --json, the table (.md, and stdout) and the chart (.png)."""
    for r in rows:
        r["ratio"] = r[rate] / rows[0][rate]
    table = print_table(rows, columns)
    payload = {"mode": mode, "machine": machine(), "args": vars(args), "results": rows, "table": table}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    if mode == "augment":   # batched vs the per-sample reference (grey), per row
        bars = []
        for r in rows:
            bars.append((f"{r['label']} batched", r["views_per_s"],
                         f"x{r['speedup']:.1f} vs per-sample" if "speedup" in r else f"x{r['ratio']:.2f}", BLUE))
            if "reference_views_per_s" in r:
                bars.append((f"{r['label']} per-sample", r["reference_views_per_s"], "", GREY))
    else:                   # train: model-only (grey) is the ceiling the other rows are a fraction of
        bars = [(r["label"], r[rate], f"{r['efficiency']:.2f} of model-only" if "efficiency" in r
                 else f"x{r['ratio']:.2f}", GREY if r.get("loader") == "synthetic" else BLUE) for r in rows]
    chart(bars, out.with_suffix(".png"), f"bench.py {mode}", "views / s" if mode == "augment" else "images / s")
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")
    return payload


BLUE, GREY = "#4c72b0", "#a0a0a0"


def chart(bars: list[tuple[str, float, str, str]], out: Path, title: str, unit: str) -> None:
    """Horizontal bars (label, rate, note, colour), top to bottom in row order, labelled rate and note."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.4 * len(bars)))
    labels, rates, notes, colours = zip(*bars[::-1])
    ax.barh(range(len(bars)), rates, color=colours, tick_label=labels)
    for y, (rate, note) in enumerate(zip(rates, notes)):
        ax.text(rate, y, f" {rate:,.0f}/s  {note}", va="center", fontsize=8)
    ax.set(xlabel=unit, title=title, xlim=(0, max(rates) * 1.4))
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
