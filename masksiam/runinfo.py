"""What is written next to every run: the resolved config, the git commit, package versions."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from masksiam.io import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ["torch", "torchvision", "numpy", "pillow", "nvidia-dali-cuda130", "ffcv", "numba",
            "pyyaml", "tqdm", "matplotlib"]


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": None, "dirty": None}
    return {"sha": sha.stdout.strip() or None if sha.returncode == 0 else None,
            "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
           "cpus": os.cpu_count(), "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def write_run_info(run_dir: str | Path, extra: dict | None = None) -> dict:
    info = {"git": git_commit(), "packages": package_versions(), "environment": environment(), **(extra or {})}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run_dir) / "run_info.json", json.dumps(info, indent=2))
    return info
