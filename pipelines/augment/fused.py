"""One augment branch as a single traceable function, for torch.compile (`Augmenter(compile=True)`).

The eager stage (engine.py) runs each op as its own kernels, on the subset of samples it touches,
and streams a float32 temporary through memory per step: ~46 MB moved per 224-px MSCN view. Here the
whole branch, uint8 crop to the network's input dtype, is written so that inductor can fuse it into
a few loops over the pixels: every op runs on every row and is selected per sample with 0/1 weights
(where / lerp; no indexing whose size the host must know), and the two gaussian filters are written
as sums of shifted slices with reflect padding (inductor fuses a stencil into one loop; a conv2d is
an opaque library call with its own temporaries). What stays in memory: the uint8 input, the float
image before each filter (each filter reads its input K times, so inductor keeps it), one plane per
filter pass, the masks' noise (drawn by the engine with the eager stage's generator calls, so the
outputs agree), and the outputs.

The values are the eager stage's to float rounding (tests/test_augment_fused.py): the same formulas
in the same order, except the filters' sums (shifted slices vs conv2d accumulation) and what the
compiler reorders.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.augment import masks as M
from pipelines.augment import ops as A


def _col(v: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) for per-sample weights."""
    return v.view(-1, 1, 1, 1)


def stencil_blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable gaussian with reflect padding as shifted sums: x (N, C, H, W), taps (N or 1, K).
    The same filter as ops.gaussian_blur (torchvision's), in a form a compiler fuses into two loops."""
    n, c, h, w = x.shape
    k = taps.shape[1]
    p = k // 2
    t = taps.to(x.dtype)
    xp = F.pad(x, (0, 0, p, p), mode="reflect")
    y = _col(t[:, 0]) * xp[:, :, 0:h, :]
    for i in range(1, k):
        y = y + _col(t[:, i]) * xp[:, :, i:i + h, :]
    yp = F.pad(y, (p, p, 0, 0), mode="reflect")
    z = _col(t[:, 0]) * yp[:, :, :, 0:w]
    for i in range(1, k):
        z = z + _col(t[:, i]) * yp[:, :, :, i:i + w]
    return z


class FusedBranch:
    """Branch `bi` of an Augmenter as one function of a chunk's rows (static settings from the
    recipe; per-sample parameters as dense tensors). `forward` is plain torch: eager it equals the
    engine's path (slowly: every op on every row); `compiled` is its torch.compile."""

    def __init__(self, aug, bi: int):
        r = aug.recipe
        self.b, self.mean, self.std, self.dtype = r.branches[bi], r.mean, r.std, aug.dtype
        self.blur_kernel, self.highpass_kernel = aug.blur_kernel[bi], aug.highpass_kernel[bi]
        # dynamo keeps its compiled graphs (and its recompile limit, 8) per code object: a copy of
        # `forward` per branch keeps every branch's graphs (one per chunk size) apart
        fn = FusedBranch.forward
        code = fn.__code__.replace(co_name=f"fused_branch_{bi}")
        own = types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__), self)
        self.compiled = torch.compile(own, dynamic=False, fullgraph=True)

    def forward(self, x8: torch.Tensor, p: dict, masks: list) -> list[torch.Tensor]:
        """x8: uint8 (n, 3, H, W) rows of the branch's source; p: per-sample tensors of those rows
        (flip, gray, blur, solarize, jitter_on: (n,) float 0/1; jitter (n, 4) factors, order (n, 4);
        blur_sigma (n,); highpass_sigma (n,) or a float); masks: per copy None (unmasked) or
        (cells (n, 3, G, G) bool, grid (n,), noise (n, 3, H, W) bfloat16 or None unless the fill is
        noise). -> per copy (n, 3, H, W) in the output dtype, channels-last. (Writing into the
        outputs in place instead makes inductor store a float32 result and copy it: more bytes.)"""
        b, outs = self.b, []
        x = x8.to(torch.float32) * (1.0 / 255.0)
        if b.flip:
            x = torch.where(_col(p["flip"]) > 0, x.flip(-1), x)
        if b.color:
            ones = torch.ones_like(p["jitter"][:, :1])
            with_identity = torch.cat([p["jitter"][:, :3], ones], 1)        # hue slot: blend factor 1
            for slot in range(4):
                op = p["order"][:, slot:slot + 1]                            # (n, 1)
                factor = with_identity.gather(1, op)[:, 0]
                x = A.blend_slot(x, factor, (op[:, 0] == A.SATURATION).to(x.dtype),
                                 (op[:, 0] == A.CONTRAST).to(x.dtype))
                if b.color.hue > 0:
                    on = (op[:, 0] == A.HUE) & (p["jitter_on"] > 0)
                    x = torch.where(_col(on), A.adjust_hue(x, p["jitter"][:, 3]), x)
        if b.grayscale:
            x = torch.where(_col(p["gray"]) > 0, A.grayscale(x).expand_as(x), x)
        if b.blur:
            taps = A.gaussian_kernel1d(p["blur_sigma"], self.blur_kernel)
            x = torch.where(_col(p["blur"]) > 0, stencil_blur(x, taps), x)
        if b.solarize:
            x = torch.where(_col(p["solarize"]) > 0, A.solarize(x, b.solarize.threshold), x)
        if b.highpass:
            s = p["highpass_sigma"]
            sigma = s if isinstance(s, torch.Tensor) else torch.full((1,), float(s), device=x.device)
            x = x - stencil_blur(x, A.gaussian_kernel1d(sigma, self.highpass_kernel))
            x = A.normalize(x, (0.0, 0.0, 0.0), self.std)
        else:
            x = A.normalize(x, self.mean, self.std)
        h, w = x.shape[2:]
        for copy_i in range(b.copies):
            m = masks[copy_i] if b.mask else None
            if m is None:                                                   # no mask op
                outs.append(x.to(self.dtype).contiguous(memory_format=A.CL))
                continue
            cells, grid, noise = m
            weight = M.cells_to_pixels(cells, grid, h, w, x.dtype)          # 0 outside the masked rows
            if b.mask.fill == "zero":
                value = torch.zeros_like(x)
            elif b.mask.fill == "mean":
                value = x.mean((2, 3), keepdim=True).expand_as(x)
            else:
                value = noise.to(x.dtype)
            outs.append(torch.lerp(x, value, weight).to(self.dtype).contiguous(memory_format=A.CL))
        return outs


# ---- bytes moved ----------------------------------------------------------------------------------

class _CountBytes(TorchDispatchMode):
    """Sums, over every aten op that runs, the bytes of its tensor arguments (read) and results
    (written): the memory traffic of the eager stage if no op found its inputs in cache. Views
    (slices, reshapes) and allocations move nothing and are not counted."""

    def __init__(self):
        super().__init__()
        self.read = self.written = 0

    UNTOUCHED = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided}
    OVERWRITE = {torch.ops.aten.copy_, torch.ops.aten.fill_, torch.ops.aten.zero_}   # first argument

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket in self.UNTOUCHED:           # no data moves
            return out
        size = lambda t: t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0   # noqa: E731
        inputs = args[1:] if func.overloadpacket in self.OVERWRITE else args             # not read
        self.read += sum(size(t) for t in pytree.tree_leaves((inputs, kwargs)))
        self.written += sum(size(t) for t in pytree.tree_leaves(out))
        return out


def bytes_per_view(aug, views: list[torch.Tensor]) -> float:
    """Bytes one call of `aug` reads and writes per output view, computed from its ops (not timed).

    Eager: `_CountBytes` over every op of one call. Compiled: inductor's own count for each graph it
    generates (GraphLowering.count_bytes: every fused kernel's input and output buffers), plus
    `_CountBytes` over the eager work around the graphs (draws, noise, copies into the outputs).
    Measured on one chunk of rows, where each branch's graph runs once and its results are the
    outputs (as on a GPU, where a compiled stage takes the batch in one chunk; CPU chunks add a copy
    into the outputs, 2 x the output's bytes): the branch functions are compiled afresh for it, with
    the compile caches off (a graph loaded from a cache is not counted)."""
    rows = [v[:aug.chunk or None] for v in views]
    n_views = len(aug.recipe.view_branches()) * rows[0].shape[0]
    if aug.fused is None:
        with _CountBytes() as c:
            aug(rows)
        return (c.read + c.written) / n_views
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics
    from torch.utils._python_dispatch import _disable_current_modes
    fresh = type(aug)(aug.recipe, list(aug.sizes), aug.device, aug.dtype, 0, 0, aug.chunk, compile=True)

    def uncounted(fn):
        def call(*args):
            with _disable_current_modes():                                # inductor counts these
                return fn(*args)
        return call

    fresh._fused_fn = [uncounted(fn) for fn in fresh._fused_fn]
    torch._logging.set_logs(inductor_metrics=True)                        # enables count_bytes
    try:
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            metrics.reset()
            with _CountBytes() as c:
                fresh(rows)
            compiled = metrics.num_bytes_accessed
    finally:
        torch._logging.set_logs()
    return (compiled + c.read + c.written) / n_views
