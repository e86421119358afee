"""Guards that a region of code reads no tensor value back to the host: what the training step and
the augment stage promise (one sync per log interval, none per step). bench.py's `syncs` mode and
the tests use them.

    with sync_free(device):      # CUDA: any synchronising call raises; CPU: host reads raise HostRead
        train_step(...)
"""
from __future__ import annotations

import contextlib

import torch


class HostRead(AssertionError):
    """A tensor's value read on the host inside a guarded region (no_host_reads)."""


@contextlib.contextmanager
def no_host_reads():
    """Inside: every way a tensor's value reaches Python (.item, .cpu, .tolist, .numpy, bool / int /
    float / index of a tensor, bincount, boolean-mask indexing) raises HostRead. On CUDA each is a
    device sync; on the CPU this is how a test sees one (there is no sync-debug mode). Patches
    torch.Tensor for the whole process while inside: not for use beside other threads' tensor work."""
    def refuse(name):
        def fn(*args, **kwargs):
            raise HostRead(f"host read in a sync-free region: {name}")
        return fn
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
            raise HostRead("host read in a sync-free region: boolean-mask indexing")
        return getitem(self, index)
    patches = {name: refuse(name) for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__int__",
                                              "__float__", "__index__")}
    patches["__getitem__"] = checked_getitem
    saved = {name: getattr(torch.Tensor, name) for name in patches}
    bincount = torch.bincount
    try:
        for name, fn in patches.items():
            setattr(torch.Tensor, name, fn)
        torch.bincount = refuse("bincount")
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.bincount = bincount


@contextlib.contextmanager
def sync_free(device: torch.device):
    """CUDA: torch's sync-debug mode "error" (any synchronising CUDA call raises); CPU: no_host_reads."""
    if device.type != "cuda":
        with no_host_reads():
            yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
