"""The batched augment stage: the `Augmenter` built from a recipe (pipelines/augment/recipes.py).

    aug = build_augmenter("mscn", size=224, device=device, dtype=torch.bfloat16, seed=0, rank=rank)
    aug.sources                    # loader views (crops) the recipe consumes
    out = aug(batch.views)         # V x (N, 3, S_v, S_v) uint8 channels-last, on the device
    out.views                      # float (N, 3, S, S) channels-last, normalised: the encoder inputs
    out.pairs                      # [(i, j)]: view pairs for the loss
    out.groups                     # [[view, ...], ...]: the views of each size, largest size first
    out.mixed, out.mix_lam, out.mix_source   # MixMask / Un-Mix (else None)
    out.mim_masks                  # SimMIM patch masks aligned with out.views (else None)
    out = aug(views, return_params=True)     # + out.params: what was drawn per view (ViewParams)

Multi-crop: `size` is one int (every loader view that size) or one size per loader view in crop
order, e.g. [224, 224, 96, 96, 96, 96, 96, 96] for SwAV / DINO's 2 global + 6 local crops. Each
branch works at the size of its source view. Pixel quantities (blur and high-pass sigma) are given
at the recipe's ref_size and scale with the largest (global) size for every view: a local crop is
a small region resized to few pixels, at about the globals' pixel scale, and SwAV / DINO blur
every crop with the same sigma in pixels. Kernel sides and mask grids follow each view's own size.

Normalisation and the high-pass filter: normalising is (x - mean) / std per channel and the filter
is linear, so high-passing the normalised image is (x - blur(x)) / std: the mean cancels, and the
filtered image is centred on 0, which MSCN makes "no information" (Jing et al. 2022, Sec. 4.3). Masks are
filled in that space: `zero` fill means "nothing here" after a high-pass, and the dataset mean
colour without one; noise is N(0, noise_std^2) in normalised units.

compile=True runs each branch as one torch.compile'd function (fused.py): every op on every row,
selected per sample with 0/1 weights, the filters as stencils, so that inductor fuses the branch into
a few loops from the uint8 crop to the output dtype; the same draws and values as the eager ops
(float rounding apart). pipelines/augment/ahead.py augments batch k + 1 on a side CUDA stream while k trains.

Randomness: a CPU generator seeded from (seed, rank) makes every decision the host must know: which
samples an op touches (subset sizes and members), the hue slot rotation. A torch.Generator on the
device, seeded the same way, draws every per-sample parameter (factors, sigmas, masks). Same seed,
same rank, same device and batch shape: same output; state_dict() / load_state_dict() carry both.

An op "with probability p" (and "masked with probability p") touches a random subset of the batch
whose size is p * N, stochastically rounded: each sample's chance is exactly p, and the count per
batch does not vary as with independent coin flips. Expensive ops run on that subset only, except
the blur off the CPU (`constant_shapes`): there it runs on whole chunks and selects the blurred rows,
so that its conv keeps one shape per chunk size, which cudnn.benchmark autotunes once (a subset's
size changes every call). The choices inside a mask (grid or focal, channel-wise or shared) are
independent per sample. GPUs are launch-bound on the eager ops (thousands of small kernels per
batch): compile=True (fused.py) is their fast path; eager stays for the CPU and for debugging.

No host-device sync per call on GPUs: subsets are drawn on the host, and all of a call's index
tensors (whole-batch and per-chunk) reach the device in one pinned, non-blocking copy; nothing reads
a device value back (no .item(), bincount, nonzero or boolean indexing). What remains: the first
call of a shape copies a few cached constants (`ops.const`) to the device.

Chunks: the batch is processed in row chunks, so that every op's working set stays in cache (CPU:
~2.5 MiB of float32 image, at most 64 images, on a pool of single-threaded workers, one per torch
thread) or an fp32 temporary stays near L2 size (GPU: ~16 MiB, 27 images at 224 px, in order on
the current stream). All parameters are drawn for the whole batch first, so chunking changes
nothing but the noise fill: CPU chunks draw it from a generator seeded by one draw per call and the
chunk's first row (independent of the number of workers and which one runs first), GPUs from the
device generator chunk after chunk. Results therefore depend on the chunk size (fixed for a device
and image size, or set with `chunk=`) only in the noise-filled elements of masked views.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from pipelines.augment import masks as M
from pipelines.augment import mixing as X
from pipelines.augment import ops as A
from pipelines.augment.fused import FusedBranch
from pipelines.augment.plan import SUBSET_OPS, BranchDraw, Plan, relative_to_chunk, stream_seed, upload
from pipelines.augment.recipes import BranchSpec, Recipe, RecipeError, load_recipe, with_mix
from pipelines.augment.types import AugmentOutput, MixParams, ViewParams

# ---- the augmenter --------------------------------------------------------------------------------

def _stage(name: str):
    """A named range in torch.profiler traces (bench.py augment --profile); ~1 us when not profiling."""
    return torch.profiler.record_function(f"augment.{name}")


@functools.lru_cache(maxsize=None)
def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """One pool of single-threaded chunk workers per process (and size), shared by augmenters."""
    return ThreadPoolExecutor(workers, thread_name_prefix="augment", initializer=torch.set_num_threads,
                              initargs=(1,))


def chunk_pool(device: torch.device | str) -> Optional[ThreadPoolExecutor]:
    """The CPU's chunk workers, one per torch thread; None on GPUs (or one thread): chunks run inline."""
    workers = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    return _cpu_pool(workers) if workers > 1 else None


def run_chunks(fn, rows: list[tuple[int, int]], pool: Optional[ThreadPoolExecutor]) -> None:
    """fn(chunk index, c0, c1) for every chunk: inline, in order, on GPUs; on CPU spread over a
    pool of single-threaded workers, one per torch thread. Cache-sized chunks on separate cores
    beat every op splitting its few hundred thousand elements over the cores (1.4x on 2 cores)."""
    if pool is None or len(rows) == 1:
        for ci, (c0, c1) in enumerate(rows):
            fn(ci, c0, c1)
        return
    for future in [pool.submit(fn, ci, c0, c1) for ci, (c0, c1) in enumerate(rows)]:
        future.result()                                                   # re-raises errors


def default_chunk(device: torch.device | str, size: int) -> int:
    """Rows per chunk for images of `size` px (the largest view): CPU ~2.5 MiB of float32 image
    (4 images at 224 px, at most 64, so small images still make a chunk for every worker); GPUs
    ~16 MiB per float32 temporary (27 images at 224 px), near L2 size instead of ~300 MB a batch."""
    per_image = 3 * size * size * 4
    if torch.device(device).type == "cpu":
        return min(64, max(1, (5 << 19) // per_image))
    return max(1, (16 << 20) // per_image)


class Augmenter:
    """The batched augment stage of one recipe, for given view sizes, device and rank."""

    def __init__(self, recipe: Recipe, size: int | Sequence[int], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, rank: int = 0,
                 chunk: Optional[int] = None, compile: bool = False, constant_shapes: Optional[bool] = None):
        self.recipe, self.dtype = recipe, dtype
        self.device = torch.device(device)
        # eager blur over whole chunks (default off the CPU, see `_base_view`); the CPU blurs the subset only
        self.constant_shapes = self.device.type != "cpu" if constant_shapes is None else constant_shapes
        self.sources = recipe.sources
        if isinstance(size, int):
            sizes = [size] * self.sources
        else:
            sizes = [int(s) for s in size]
            if len(sizes) < self.sources:
                raise RecipeError(f"recipe {recipe.name} takes {self.sources} loader views, got sizes for "
                                  f"{len(sizes)}: {sizes}")
        if min(sizes) <= 0:
            raise RecipeError(f"recipe {recipe.name}: view sizes must be positive, got {sizes}")
        self.sizes = tuple(sizes[:self.sources])              # per loader view (crop order)
        self.size = max(self.sizes)                           # the global crops' size
        self.scale = self.size / recipe.ref_size              # pixel quantities scale with it
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(stream_seed(seed, rank, "device"))
        self.host_gen = torch.Generator()
        self.host_gen.manual_seed(stream_seed(seed, rank, "host"))
        cpu = self.device.type == "cpu"
        # compiled on a GPU: the whole batch in one call (the fused loops keep few temporaries, and
        # its results become the outputs without a copy)
        self.chunk = chunk or (0 if compile and not cpu else default_chunk(self.device, self.size))
        self.workers = torch.get_num_threads() if cpu else 1
        self._pool = chunk_pool(self.device)
        self.view_branch = recipe.view_branches()
        self.branch_size = [self.sizes[b.source] for b in recipe.branches]
        self.view_size = [self.branch_size[bi] for bi in self.view_branch]
        self.first_view = [self.view_branch.index(i) for i in range(len(recipe.branches))]
        self.mix_source = self.view_branch.index(recipe.mix.branch) if recipe.mix else None
        self.blur_kernel = [A.blur_kernel_size(s, b.blur.kernel) if b.blur else 0
                            for b, s in zip(recipe.branches, self.branch_size)]
        self.highpass_kernel = [A.highpass_kernel_size(b.highpass.sigma[1] * self.scale, s) if b.highpass else 0
                                for b, s in zip(recipe.branches, self.branch_size)]
        for i, (b, s) in enumerate(zip(recipe.branches, self.branch_size)):
            if b.blur and self.blur_kernel[i] // 2 >= s:
                raise RecipeError(f"recipe {recipe.name}: blur kernel {self.blur_kernel[i]} too large for {s} px")
        if recipe.simmim:
            chosen = set(range(len(recipe.branches)) if recipe.simmim.branches is None else recipe.simmim.branches)
            for bi in sorted(chosen):
                s = self.branch_size[bi]
                if s % recipe.simmim.patch:
                    raise RecipeError(f"recipe {recipe.name}: image size {s} is not a multiple of the SimMIM "
                                      f"patch {recipe.simmim.patch} px; set simmim.patch to a divisor of {s}")
        # compile: each branch as one torch.compile'd function (fused.py), else the eager ops
        self.fused = [FusedBranch(self, bi) for bi in range(len(recipe.branches))] if compile else None
        self._fused_fn = [f.compiled for f in self.fused] if compile else None
        groups: dict[int, list[int]] = {}
        for v, s in enumerate(self.view_size):
            groups.setdefault(s, []).append(v)
        self.groups = [groups[s] for s in sorted(groups, reverse=True)]

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"device": self.gen.get_state(), "host": self.host_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["device"])
        self.host_gen.set_state(state["host"])

    # -- the host plan -------------------------------------------------------------------------

    def _subset(self, p: float, n: int) -> Optional[np.ndarray]:
        """A random subset of p * n samples (stochastically rounded), sorted; None when empty."""
        k = A.subset_size(p, n, self.host_gen)
        if k <= 0:
            return None
        if k >= n:
            return np.arange(n, dtype=np.int64)
        return np.sort(torch.randperm(n, generator=self.host_gen)[:k].numpy())

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        step = self.chunk or n
        return [(c0, min(n, c0 + step)) for c0 in range(0, n, step)]

    def _plan(self, n: int) -> Plan:
        branches = []
        for b in self.recipe.branches:
            p = dict.fromkeys(SUBSET_OPS)
            p.update(members=None, rotation=0, hue=[None] * 4, masked=[])
            if b.flip:
                p["flip"] = self._subset(b.flip, n)
            if b.color:
                jit = p["jitter"] = self._subset(b.color.p, n)
                if jit is not None:
                    # hue slots are stratified over the jittered samples in a random order (jitter_order)
                    k = len(jit)
                    members = p["members"] = jit[torch.randperm(k, generator=self.host_gen).numpy()]
                    p["rotation"] = int(torch.randint(4, (1,), generator=self.host_gen))
                    if b.color.hue > 0:
                        for slot, start, end in A.hue_groups(k, p["rotation"]):    # jitter_order's grouping
                            p["hue"][slot] = np.sort(members[start:end]) if end > start else None
            if b.grayscale:
                p["gray"] = self._subset(b.grayscale, n)
            if b.blur:
                p["blur"] = self._subset(b.blur.p, n)
            if b.solarize:
                p["solarize"] = self._subset(b.solarize.p, n)
            if b.mask:
                p["masked"] = [self._subset(b.mask.p, n) for _ in range(b.copies)]   # views masked at all
            branches.append(p)
        rows = self._chunks(n)
        chunks = [[{**{op: relative_to_chunk(p[op], c0, c1) for op in SUBSET_OPS},
                    "hue": [relative_to_chunk(h, c0, c1) for h in p["hue"]],
                    "masked": [relative_to_chunk(m, c0, c1) for m in p["masked"]]} for p in branches]
                  for c0, c1 in rows]
        # CPU: one draw seeds the noise of every chunk (`_noise_gen`), so the noise does not depend
        # on which worker runs a chunk first; GPUs draw it from the device generator
        seed = int(torch.randint(2**62, (1,), generator=self.gen)) if self.device.type == "cpu" else None
        return Plan(n, rows, branches, chunks, seed)

    # -- random parameters ---------------------------------------------------------------------

    def _draw_branch(self, bi: int, p: dict, n: int) -> BranchDraw:
        b, d, dev, gen = self.recipe.branches[bi], BranchDraw(), self.device, self.gen
        if b.color:
            c = b.color
            factors = torch.stack([A.uniform(n, max(0.0, 1 - c.brightness), 1 + c.brightness, gen, dev),
                                   A.uniform(n, max(0.0, 1 - c.contrast), 1 + c.contrast, gen, dev),
                                   A.uniform(n, max(0.0, 1 - c.saturation), 1 + c.saturation, gen, dev),
                                   A.uniform(n, -c.hue, c.hue, gen, dev)], 1)
            identity = A.const((1.0, 1.0, 1.0, 0.0), dev)
            d.jitter = torch.where(A.subset_mask(n, p["jitter"], dev)[:, None], factors, identity)
            d.order = A.const((A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE), dev, torch.long).repeat(n, 1)
            if p["members"] is not None:
                d.order[p["members"]] = A.jitter_order(p["members"].numel(), gen, dev, p["rotation"])
        if b.blur:
            lo, hi = b.blur.sigma
            d.blur_sigma = A.uniform(n, lo * self.scale, hi * self.scale, gen, dev)
        if b.highpass:
            lo, hi = b.highpass.sigma
            d.highpass_sigma = lo * self.scale if lo == hi else A.uniform(n, lo * self.scale, hi * self.scale, gen, dev)
        if b.mask:
            m = b.mask
            for copy_i in range(b.copies):
                ratio = A.uniform(n, m.ratio[0], m.ratio[1], gen, dev)
                focal = torch.rand(n, generator=gen, device=dev) < m.focal
                side = A.uniform(n, m.focal_side[0], m.focal_side[1], gen, dev)
                channelwise = torch.rand(n, generator=gen, device=dev) < m.channelwise
                apply = A.subset_mask(n, p["masked"][copy_i], dev)
                d.masks.append(M.mscn_cells(n, m.grid, ratio, focal, side, channelwise, apply, gen))
        return d

    # -- pixels --------------------------------------------------------------------------------

    def _base_view(self, x8: torch.Tensor, bi: int, d: BranchDraw, q: dict, c0: int, c1: int) -> torch.Tensor:
        """uint8 rows [c0, c1) of one branch's source -> float32 in the network's input space (planar,
        or channels-last for a branch that only normalises). q: the chunk's relative indices."""
        b, r = self.recipe.branches[bi], self.recipe
        if not (b.flip or b.color or b.grayscale or b.blur or b.solarize or b.highpass):
            # normalise only (SimMIM, plain): one pass from uint8, in the loader's channels-last layout
            with _stage("highpass_normalize"):
                return A.normalize(x8.to(torch.float32), [255.0 * m for m in r.mean], [255.0 * s for s in r.std])
        x = A.to_float(x8)
        if b.flip:
            A.apply_to(x, q["flip"], A.hflip)
        if b.color and d.order is not None:
            with _stage("color_jitter"):
                x = A.color_jitter(x, d.jitter[c0:c1], d.order[c0:c1], q["hue"])
        if b.grayscale:
            with _stage("grayscale"):
                A.apply_to(x, q["gray"], A.to_grayscale)
        if b.blur:
            k = self.blur_kernel[bi]
            with _stage("blur"):
                if self.constant_shapes and q["blur"] is not None:
                    # every row of the chunk through the conv, the blurred ones selected: one conv
                    # shape per chunk size, where the subset's shape would change call to call
                    # (and cudnn.benchmark autotune each new one)
                    on = A.subset_mask(c1 - c0, q["blur"], x.device).view(-1, 1, 1, 1)     # (c, 1, 1, 1)
                    x = torch.where(on, A.gaussian_blur(x, d.blur_sigma[c0:c1], k), x)
                else:
                    A.apply_to(x, q["blur"], lambda im, s: A.gaussian_blur(im, s, k), d.blur_sigma[c0:c1])
        if b.solarize:
            t = b.solarize.threshold
            with _stage("solarize"):
                A.apply_to(x, q["solarize"], lambda im: A.solarize(im, t))
        with _stage("highpass_normalize"):
            if b.highpass:
                s = d.highpass_sigma if not isinstance(d.highpass_sigma, torch.Tensor) else d.highpass_sigma[c0:c1]
                x = A.highpass(x, s, self.highpass_kernel[bi])
                return A.normalize(x, (0.0, 0.0, 0.0), r.std)                  # the mean cancels
            return A.normalize(x, r.mean, r.std)

    def _write_copies(self, outs: list[torch.Tensor], base: torch.Tensor, bi: int, d: BranchDraw,
                      q: dict, c0: int, c1: int, gen: torch.Generator) -> None:
        """Branch bi's views for rows [c0, c1): the base, masked and filled per copy, written to the
        channels-last outputs (converting to their dtype). Only the masked samples are filled."""
        b = self.recipe.branches[bi]
        h, w = base.shape[2:]
        for copy_i in range(b.copies):
            out = outs[self.first_view[bi] + copy_i][c0:c1]
            rows = q["masked"][copy_i] if b.mask else None
            if rows is None:
                out.copy_(base)
                continue
            with _stage("mask_fill"):
                cells, grid = d.masks[copy_i][0][c0:c1], d.masks[copy_i][1][c0:c1]
                noise = self._noise(b, base.shape, gen)
                if rows.numel() == c1 - c0:
                    mask = M.cells_to_pixels(cells, grid, h, w, base.dtype)
                    out.copy_(M.fill(base, mask, b.mask.fill, noise=None if noise is None else noise.float()))
                    continue
                mask = M.cells_to_pixels(cells[rows], grid[rows], h, w, base.dtype)
                out.copy_(base)
                out[rows] = M.fill(base[rows], mask, b.mask.fill,
                                   noise=None if noise is None else noise[rows].float()).to(out.dtype)

    def _noise(self, b: BranchSpec, shape, gen: torch.Generator) -> Optional[torch.Tensor]:
        """The noise fill of a chunk with masked rows: (c, 3, H, W) for all of its rows (shape fixed
        by the chunk, as the fused path needs; unmasked rows' values go unused), in bfloat16: half
        the bytes of float32, and ample precision for noise (8 significant bits)."""
        if b.mask.fill != "noise":
            return None
        return torch.randn(shape, generator=gen, device=self.device, dtype=torch.bfloat16).mul_(b.mask.noise_std)

    def _dense(self, bi: int, p: dict, d: BranchDraw, n: int) -> dict:
        """The fused path's per-sample parameters of branch bi: subsets as (N,) 0/1 floats."""
        b, dev = self.recipe.branches[bi], self.device
        flag = lambda idx: A.subset_mask(n, idx, dev).float()                  # noqa: E731
        out = {}
        if b.flip:
            out["flip"] = flag(p["flip"])
        if b.color:
            out.update(jitter_on=flag(p["jitter"]), jitter=d.jitter, order=d.order)
        if b.grayscale:
            out["gray"] = flag(p["gray"])
        if b.blur:
            out.update(blur=flag(p["blur"]), blur_sigma=d.blur_sigma)
        if b.solarize:
            out["solarize"] = flag(p["solarize"])
        if b.highpass and isinstance(d.highpass_sigma, torch.Tensor):
            out["highpass_sigma"] = d.highpass_sigma
        return out

    def _fused_chunk(self, outs: list[torch.Tensor], x8: torch.Tensor, bi: int, dense: dict, d: BranchDraw,
                     q: dict, c0: int, c1: int, gen: torch.Generator) -> None:
        """Branch bi's views for rows [c0, c1) through its fused function (`fused.FusedBranch`)."""
        b = self.recipe.branches[bi]
        p = {k: v[c0:c1] for k, v in dense.items()}
        if b.highpass and not isinstance(d.highpass_sigma, torch.Tensor):
            p["highpass_sigma"] = d.highpass_sigma
        masks = []
        for copy_i in range(b.copies if b.mask else 0):
            shape = (c1 - c0, 3, *x8.shape[2:])
            # the eager path's draws: noise only for a chunk with masked rows (zeros otherwise: the
            # mask weights of unmasked rows are 0, and one shape keeps one compiled graph)
            noise = self._noise(b, shape, gen) if q["masked"][copy_i] is not None else None
            if noise is None and b.mask.fill == "noise":
                noise = torch.zeros(shape, device=self.device, dtype=torch.bfloat16)
            masks.append((d.masks[copy_i][0][c0:c1], d.masks[copy_i][1][c0:c1], noise))
        with _stage("fused_branch"):
            ys = self._fused_fn[bi](x8, p, masks)
        whole = c1 - c0 == outs[0].shape[0]
        for copy_i, y in enumerate(ys):
            v = self.first_view[bi] + copy_i
            if whole:
                outs[v] = y                                     # one chunk: the result is the output
            else:
                outs[v][c0:c1].copy_(y)

    def _check(self, views: list[torch.Tensor]) -> int:
        if len(views) < self.sources:
            raise ValueError(f"recipe {self.recipe.name} needs {self.sources} loader views per image, got "
                             f"{len(views)} (set views={self.sources} in the config)")
        n = views[0].shape[0]
        for i, v in enumerate(views[:self.sources]):
            if v.dtype != torch.uint8 or v.ndim != 4 or v.shape[1] != 3 or v.shape[0] != n:
                raise ValueError(f"augment: view {i} must be (N, 3, H, W) uint8 like view 0, got "
                                 f"{tuple(v.shape)} {v.dtype}")
            if v.shape[2] != self.sizes[i] or v.shape[3] != self.sizes[i]:
                raise ValueError(f"augment: view {i} is {v.shape[2]}x{v.shape[3]}, the augmenter was built "
                                 f"for size {self.sizes[i]} (view sizes {list(self.sizes)})")
            if v.device != self.device and not (v.device.type == self.device.type == "cuda"):
                raise ValueError(f"augment: view {i} is on {v.device}, the augmenter on {self.device}")
        return n

    def _run_chunks(self, fn, rows: list[tuple[int, int]]) -> None:
        run_chunks(fn, rows, self._pool)

    def _noise_gen(self, seed: Optional[int], c0: int) -> torch.Generator:
        if seed is None:
            return self.gen
        return torch.Generator().manual_seed(seed + c0)

    def _params(self, plan: Plan, draws: list[BranchDraw], mim) -> list[ViewParams]:
        """The public record of the draws (`ViewParams`), one per output view."""
        r, dev, n = self.recipe, self.device, plan.n
        mask = lambda idx: A.subset_mask(n, idx, dev)                           # noqa: E731
        identity = A.const((1.0, 1.0, 1.0, 0.0), dev).expand(n, 4)
        plain_order = A.const((A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE), dev, torch.long).expand(n, 4)
        params = []
        for v, bi in enumerate(self.view_branch):
            b, d, p = r.branches[bi], draws[bi], plan.branches[bi]
            copy_i = v - self.first_view[bi]
            hp = d.highpass_sigma
            if hp is not None and not isinstance(hp, torch.Tensor):
                hp = torch.full((n,), float(hp), device=dev)
            vp = ViewParams(
                branch=bi, source=b.source, size=self.view_size[v], flip=mask(p["flip"]),
                jitter=mask(p["jitter"]), jitter_factors=identity if d.jitter is None else d.jitter,
                jitter_order=plain_order if d.order is None else d.order, grayscale=mask(p["gray"]),
                blur=mask(p["blur"]), blur_sigma=d.blur_sigma, blur_kernel=self.blur_kernel[bi],
                solarize=mask(p["solarize"]), solarize_threshold=b.solarize.threshold if b.solarize else 0.5,
                highpass_sigma=hp, highpass_kernel=self.highpass_kernel[bi], mean=r.mean, std=r.std,
                masked=mask(p["masked"][copy_i] if b.mask else None),
                mim_mask=mim[v] if mim is not None else None)
            if b.mask:
                vp.mask_cells, vp.mask_grid = d.masks[copy_i]
                vp.mask_fill, vp.noise_std = b.mask.fill, b.mask.noise_std
            params.append(vp)
        return params

    @torch.no_grad()
    def __call__(self, views: list[torch.Tensor], return_params: bool = False) -> AugmentOutput:
        """The views of one batch; return_params=True also records what was drawn for each view
        (`AugmentOutput.params`, `mix_params`: for tests, and for debugging an augmentation)."""
        n = self._check(views)
        return self._run(views, self._plan(n), return_params)

    def _run(self, views: list[torch.Tensor], plan: Plan, return_params: bool = False) -> AugmentOutput:
        """Everything after the host plan: device draws and pixels, without a host-device sync."""
        r, dev, n = self.recipe, self.device, plan.n
        plan.branches, plan.chunks = upload([plan.branches, plan.chunks], dev)
        draws = [self._draw_branch(bi, p, n) for bi, p in enumerate(plan.branches)]
        mix = self._draw_mix(n) if r.mix else None
        mim = self._draw_simmim(n) if r.simmim else None
        outs = [torch.empty((n, 3, s, s), dtype=self.dtype, device=dev, memory_format=A.CL) for s in self.view_size]
        dense = [self._dense(bi, p, d, n) for bi, (p, d) in enumerate(zip(plan.branches, draws))] \
            if self.fused else None

        def chunk(ci: int, c0: int, c1: int) -> None:
            gen = self._noise_gen(plan.noise_seed, c0)
            for bi, b in enumerate(r.branches):
                q, x8 = plan.chunks[ci][bi], views[b.source][c0:c1]
                if dense is not None:
                    self._fused_chunk(outs, x8, bi, dense[bi], draws[bi], q, c0, c1, gen)
                    continue
                base = self._base_view(x8, bi, draws[bi], q, c0, c1)
                self._write_copies(outs, base, bi, draws[bi], q, c0, c1, gen)

        self._run_chunks(chunk, plan.chunks_rows)
        result = AugmentOutput(views=outs, pairs=list(r.pairs), groups=[list(g) for g in self.groups], mim_masks=mim)
        if mix is not None:
            result.mixed, result.mix_lam = self._mix(outs[self.mix_source], mix, plan.chunks_rows)
            result.mix_source = self.mix_source
        if return_params:
            result.params = self._params(plan, draws, mim)
            if mix is not None:
                result.mix_params = MixParams(r.mix.kind, self.mix_source, result.mix_lam, mix.get("cells"),
                                              mix.get("use_mixup"), mix.get("lam"), mix.get("boxes"))
        return result

    # -- mixing and SimMIM ---------------------------------------------------------------------

    def _draw_mix(self, n: int) -> dict:
        m, dev, gen = self.recipe.mix, self.device, self.gen
        if m.kind == "mixmask":
            return {"cells": X.block_cells(n, m.grid, m.ratio, gen, dev, m.min_cells, m.aspect, m.rects)}
        size = self.view_size[self.mix_source]
        lam = X.sample_beta(m.beta, m.beta, n, gen, dev)
        use_mixup = torch.rand(n, generator=gen, device=dev) < m.mixup_p
        boxes, box_lam = X.cutmix_boxes(lam, size, size, gen)
        return {"lam": lam, "use_mixup": use_mixup, "boxes": boxes, "box_lam": box_lam}

    def _mix(self, v: torch.Tensor, p: dict, rows: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix view v (N, 3, H, W) with v.flip(0), chunk by chunk (row i meets row N-1-i)."""
        n, size = v.shape[0], v.shape[-1]
        mixed = torch.empty_like(v)

        def chunk(ci: int, c0: int, c1: int) -> None:
            x, rev = v[c0:c1], v[n - c1:n - c0].flip(0)
            if "cells" in p:
                mixed[c0:c1] = X.mixmask(x, p["cells"][c0:c1], rev)
            else:
                mixed[c0:c1] = X.unmix(x.float(), p["lam"][c0:c1], p["use_mixup"][c0:c1],
                                       p["boxes"][c0:c1], rev.float())

        with _stage("mix"):
            self._run_chunks(chunk, rows)
        if "cells" in p:
            return mixed, X.block_lam(p["cells"], size, size)
        return mixed, torch.where(p["use_mixup"], p["lam"], p["box_lam"])

    def _draw_simmim(self, n: int) -> list[Optional[torch.Tensor]]:
        s = self.recipe.simmim
        chosen = set(range(len(self.recipe.branches)) if s.branches is None else s.branches)
        if s.disjoint:                   # LUT: the masked views' visible cells disjoint (recipes.SimMIMSpec)
            views = [v for v, bi in enumerate(self.view_branch) if bi in chosen]
            cells = self.view_size[views[0]] // s.patch
            drawn = dict(zip(views, M.disjoint_simmim_masks(n, cells, cells, s.ratio, len(views), self.gen,
                                                            self.device)))
            return [drawn.get(v) for v in range(len(self.view_branch))]
        return [M.simmim_masks(n, size // s.patch, size // s.patch, s.ratio, self.gen, self.device)
                if bi in chosen else None for bi, size in zip(self.view_branch, self.view_size)]


def build_augmenter(recipe: str | Path | Recipe, size: int | Sequence[int], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0, rank: int = 0,
                    mix: Optional[str] = None, chunk: Optional[int] = None, compile: bool = False,
                    constant_shapes: Optional[bool] = None) -> Augmenter:
    """The Augmenter of a recipe (a name in pipelines/augment/recipes/, a yaml path, or a Recipe).

    size: the loader views' side in px, one int for all or one per view (multi-crop, crop order).
    mix: "mixmask" / "unmix" adds that mixing (paper defaults) to a recipe without it (config `mix`);
    None or "none" keeps the recipe's own. chunk: rows per chunk (default `default_chunk`).
    compile: each branch as one torch.compile'd function (fused.py: a few fused loops from uint8 to the
    output dtype; tens of seconds of compile per branch and chunk size on first use, cached on disk by
    inductor; the outputs equal the eager ones to float rounding). constant_shapes: the eager blur
    runs on every row of a chunk and selects the blurred ones, so that its conv has one shape per
    chunk size (default: on GPUs, where cudnn.benchmark autotunes every new shape; the CPU blurs the
    drawn subset only, which is cheaper there)."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return Augmenter(with_mix(r, mix), size, device, dtype, seed, rank, chunk, compile, constant_shapes)
