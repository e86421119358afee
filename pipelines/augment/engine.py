"""The batched augment stage: the `Augmenter` built from a recipe (pipelines/augment/recipes.py).

    aug = build_augmenter("mscn", size=224, device=device, dtype=torch.bfloat16, seed=0, rank=rank)
    aug.sources                    # loader views (crops) the recipe consumes
    out = aug(batch.views)         # V x (N, 3, H, W) uint8 channels-last, on the device
    out.views                      # float (N, 3, H, W) channels-last, normalised: the encoder inputs
    out.pairs                      # [(i, j)]: view pairs for the loss
    out.mixed, out.mix_lam, out.mix_source   # MixMask / Un-Mix (else None)
    out.mim_masks                  # SimMIM patch masks aligned with out.views (else None)

Normalisation and the high-pass filter: normalising is (x - mean) / std per channel and the filter
is linear, so high-passing the normalised image is (x - blur(x)) / std: the mean cancels, and the
filtered image is centred on 0, which MSCN makes "no information" (seed 001, Sec. 4.3). Masks are
filled in that space: `zero` fill means "nothing here" after a high-pass, and the dataset mean
colour without one; noise is N(0, noise_std^2) in normalised units.

Randomness: a torch.Generator on the device, seeded from (seed, rank), draws every per-sample
parameter; a CPU generator seeded the same way makes the few per-batch decisions the host must know
(subset sizes, the hue slot rotation), so nothing waits for the device. Same seed, same rank, same
device and batch shape: same output; state_dict() / load_state_dict() carry both generators.

An op "with probability p" (and "masked with probability p") touches a random subset of the batch
whose size is p * N, stochastically rounded: each sample's chance is exactly p, and the count per
batch does not vary as with independent coin flips. Expensive ops run on that subset only. The
choices inside a mask (grid or focal, channel-wise or shared) are independent per sample.

On CPU the batch is processed in chunks of a few images, so every op's working set stays in cache
(the whole batch would stream each intermediate through memory), by a pool of single-threaded
workers, one per torch thread; on GPUs in one piece. All parameters are drawn for the whole batch
first; only the noise fill is drawn per chunk, from a generator seeded by one draw per call and the
chunk's first row, so results do not depend on which worker ran first or on the number of threads
(they do depend on the chunk size, which is fixed for a device and image size, or set with `chunk=`).
"""
from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from pipelines.augment import masks as M
from pipelines.augment import mixing as X
from pipelines.augment import ops as A
from pipelines.augment.recipes import BranchSpec, Recipe, RecipeError, load_recipe, with_mix

# ---- the augmenter --------------------------------------------------------------------------------

@dataclass
class AugmentOutput:
    views: list[torch.Tensor]                   # float (N, 3, H, W) channels-last, normalised
    pairs: list[tuple[int, int]]
    mixed: Optional[torch.Tensor] = None        # views[mix_source] mixed with its reversed batch
    mix_lam: Optional[torch.Tensor] = None      # (N,) fraction of each mixed image from itself
    mix_source: Optional[int] = None
    mim_masks: Optional[list[Optional[torch.Tensor]]] = None   # (N, H/p, W/p) bool, True = masked
    params: Optional[list["ViewParams"]] = None  # per view, what was drawn (aug(views, return_params=True))
    mix_params: Optional["MixParams"] = None


@dataclass
class ViewParams:
    """What the stage drew for one output view: per-sample tensors (N leading, on the device).

    Replaying them reproduces the view (tests/test_recipes.py does, with torchvision.transforms.v2
    functional). Sample i of source view `source`, as float [0, 1] (to_dtype(scale=True)):

        flip[i]          horizontal_flip
        jitter[i]        for op in jitter_order[i]: adjust_brightness / contrast / saturation / hue
                         (op ids ops.BRIGHTNESS, CONTRAST, SATURATION, HUE) by jitter_factors[i, op]
        grayscale[i]     rgb_to_grayscale(img, 3)
        blur[i]          gaussian_blur(img, [blur_kernel] * 2, [blur_sigma[i]] * 2)
        solarize[i]      solarize(img, solarize_threshold)
        then             normalize(img, mean, std); with a high-pass (highpass_sigma not None):
                         normalize(img - gaussian_blur(img, [highpass_kernel] * 2, [highpass_sigma[i]] * 2),
                         0, std)
        masked[i]        the elements of mask_pixels()[i] replaced by the fill (mask_fill; the noise
                         values themselves are not kept)

    Ops a branch does not have read all False (jitter_factors the identity 1, 1, 1, 0)."""
    branch: int
    source: int                                  # the loader view (crop) it was made from
    size: int
    flip: torch.Tensor                           # (N,) bool
    jitter: torch.Tensor                         # (N,) bool
    jitter_factors: torch.Tensor                 # (N, 4) brightness, contrast, saturation factor, hue shift
    jitter_order: torch.Tensor                   # (N, 4) int64: op id in each of the four slots
    grayscale: torch.Tensor                      # (N,) bool
    blur: torch.Tensor                           # (N,) bool
    blur_sigma: Optional[torch.Tensor]           # (N,) px at this view's size (None: no blur op)
    blur_kernel: int
    solarize: torch.Tensor                       # (N,) bool
    solarize_threshold: float
    highpass_sigma: Optional[torch.Tensor]       # (N,) px (None: no high-pass)
    highpass_kernel: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    masked: torch.Tensor                         # (N,) bool: this copy masked at all
    mask_cells: Optional[torch.Tensor] = None    # (N, 3, Gmax, Gmax) bool, sample i uses its grid[i] block
    mask_grid: Optional[torch.Tensor] = None     # (N,) int64 cells per side
    mask_fill: Optional[str] = None
    noise_std: float = 0.0
    mim_mask: Optional[torch.Tensor] = None      # (N, H/p, W/p) bool (SimMIM)

    def mask_pixels(self) -> Optional[torch.Tensor]:
        """(N, 3, H, W) bool, True where the fill replaced the view's pixels (None: no mask op)."""
        if self.mask_cells is None:
            return None
        return M.cells_to_pixels(self.mask_cells, self.mask_grid, self.size, self.size, torch.bool)


@dataclass
class MixParams:
    """What was drawn for the mixed view: view `view` mixed with `view` of the reversed batch."""
    kind: str                                    # mixmask | unmix
    view: int
    lam: torch.Tensor                            # (N,) = AugmentOutput.mix_lam
    cells: Optional[torch.Tensor] = None         # MixMask: (N, 1, G, G) bool, True = from the reversed batch
    use_mixup: Optional[torch.Tensor] = None     # Un-Mix: (N,) bool, mixup (else cutmix)
    mixup_lam: Optional[torch.Tensor] = None     # Un-Mix: (N,) the Beta draw
    boxes: Optional[torch.Tensor] = None         # Un-Mix: (N, 4) cutmix box top, bottom, left, right


@dataclass
class _BranchDraw:
    """One branch's random parameters for a whole batch (N leading), drawn before any pixel work."""
    flip: Optional[torch.Tensor] = None                 # subset indices
    jitter_subset: Optional[torch.Tensor] = None        # subset indices
    jitter: Optional[torch.Tensor] = None               # (N, 4) factors, identity outside the subset
    order: Optional[torch.Tensor] = None                # (N, 4) op per slot
    hue: list[Optional[torch.Tensor]] = field(default_factory=lambda: [None] * 4)
    gray: Optional[torch.Tensor] = None
    blur: Optional[torch.Tensor] = None
    blur_sigma: Optional[torch.Tensor] = None           # (N,) px
    solarize: Optional[torch.Tensor] = None
    highpass_sigma: Optional[torch.Tensor | float] = None
    # per copy: cells (N, 3, G, G), grid (N,), indices of the masked samples
    masks: list[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=list)


def _stream_seed(seed: int, rank: int, stream: str) -> int:
    digest = hashlib.sha256(f"masksiam-augment/{seed}/{rank}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _stage(name: str):
    """A named range in torch.profiler traces (bench.py augment --profile); ~1 us when not profiling."""
    return torch.profiler.record_function(f"augment.{name}")


@functools.lru_cache(maxsize=None)
def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """One pool of single-threaded chunk workers per process (and size), shared by augmenters."""
    return ThreadPoolExecutor(workers, thread_name_prefix="augment", initializer=torch.set_num_threads,
                              initargs=(1,))


def _chunk_index(idx: Optional[torch.Tensor], c0: int, c1: int, n: int) -> Optional[torch.Tensor]:
    """Subset indices that fall in rows [c0, c1), relative to c0 (host sync: CPU chunking only)."""
    if idx is None or (c0 == 0 and c1 == n):
        return idx
    return idx[(idx >= c0) & (idx < c1)] - c0


class Augmenter:
    """The batched augment stage of one recipe, for one image size, device and rank."""

    def __init__(self, recipe: Recipe, size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0, rank: int = 0,
                 chunk: Optional[int] = None, compile: bool = False):
        self.recipe, self.size, self.dtype = recipe, size, dtype
        self.kernels = A.compiled_kernels() if compile else A.EAGER
        self.device = torch.device(device)
        self.sources = recipe.sources
        self.scale = size / recipe.ref_size                    # pixel quantities scale with the image
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(_stream_seed(seed, rank, "device"))
        self.host_gen = torch.Generator()
        self.host_gen.manual_seed(_stream_seed(seed, rank, "host"))
        # CPU: ~2.5 MiB of float32 image per chunk keeps each op's working set in cache (4 images at
        # 224 px), at most 64 images so that small ones still make chunks for every worker; chunks
        # run on a pool of single-threaded workers, one per torch thread. The chunk size depends on
        # the image size only, so results do not depend on the number of threads.
        cpu = self.device.type == "cpu"
        self.chunk = chunk or (min(64, max(1, (5 << 19) // (3 * size * size * 4))) if cpu else 0)
        self.workers = torch.get_num_threads() if cpu else 1
        self._pool = _cpu_pool(self.workers) if self.workers > 1 else None
        self.view_branch = recipe.view_branches()
        self.mix_source = self.view_branch.index(recipe.mix.branch) if recipe.mix else None
        self.blur_kernel = [A.blur_kernel_size(size, b.blur.kernel) if b.blur else 0 for b in recipe.branches]
        self.highpass_kernel = [A.highpass_kernel_size(b.highpass.sigma[1] * self.scale, size) if b.highpass else 0
                                for b in recipe.branches]
        for i, b in enumerate(recipe.branches):
            if b.blur and self.blur_kernel[i] // 2 >= size:
                raise RecipeError(f"recipe {recipe.name}: blur kernel {self.blur_kernel[i]} too large for {size} px")
        if recipe.simmim and size % recipe.simmim.patch:
            raise RecipeError(f"recipe {recipe.name}: image size {size} is not a multiple of the SimMIM "
                              f"patch {recipe.simmim.patch} px; set simmim.patch to a divisor of {size}")

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"device": self.gen.get_state(), "host": self.host_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["device"])
        self.host_gen.set_state(state["host"])

    # -- random parameters ---------------------------------------------------------------------

    def _subset(self, p: float, n: int) -> Optional[torch.Tensor]:
        return A.random_subset(n, A.subset_size(p, n, self.host_gen), self.gen, self.device)

    def _draw_branch(self, b: BranchSpec, n: int) -> _BranchDraw:
        d, dev, gen = _BranchDraw(), self.device, self.gen
        if b.flip:
            d.flip = self._subset(b.flip, n)
        if b.color:
            c = b.color
            jit = d.jitter_subset = self._subset(c.p, n)
            on = A.subset_mask(n, jit, dev)[:, None]
            factors = torch.stack([A.uniform(n, max(0.0, 1 - c.brightness), 1 + c.brightness, gen, dev),
                                   A.uniform(n, max(0.0, 1 - c.contrast), 1 + c.contrast, gen, dev),
                                   A.uniform(n, max(0.0, 1 - c.saturation), 1 + c.saturation, gen, dev),
                                   A.uniform(n, -c.hue, c.hue, gen, dev)], 1)
            identity = A.const((1.0, 1.0, 1.0, 0.0), dev)
            d.jitter = torch.where(on, factors, identity)
            d.order = A.const((A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE), dev, torch.long).repeat(n, 1)
            if jit is not None:
                # hue slots are stratified over the jittered samples in a random order (jitter_order)
                k = jit.numel()
                members = jit[torch.randperm(k, generator=gen, device=dev)]
                rotation = int(torch.randint(4, (1,), generator=self.host_gen))
                d.order[members] = A.jitter_order(k, gen, dev, rotation)
                if c.hue > 0:
                    for slot, start, end in A.hue_groups(k, rotation):     # the grouping jitter_order used
                        d.hue[slot] = members[start:end].sort().values if end > start else None
        if b.grayscale:
            d.gray = self._subset(b.grayscale, n)
        if b.blur:
            d.blur = self._subset(b.blur.p, n)
            lo, hi = b.blur.sigma
            d.blur_sigma = A.uniform(n, lo * self.scale, hi * self.scale, gen, dev)
        if b.solarize:
            d.solarize = self._subset(b.solarize.p, n)
        if b.highpass:
            lo, hi = b.highpass.sigma
            d.highpass_sigma = lo * self.scale if lo == hi else A.uniform(n, lo * self.scale, hi * self.scale, gen, dev)
        if b.mask:
            m = b.mask
            for _ in range(b.copies):
                ratio = A.uniform(n, m.ratio[0], m.ratio[1], gen, dev)
                focal = torch.rand(n, generator=gen, device=dev) < m.focal
                side = A.uniform(n, m.focal_side[0], m.focal_side[1], gen, dev)
                channelwise = torch.rand(n, generator=gen, device=dev) < m.channelwise
                masked = self._subset(m.p, n)                                  # views masked at all
                cells, grid = M.mscn_cells(n, m.grid, ratio, focal, side, channelwise,
                                           A.subset_mask(n, masked, dev), gen)
                d.masks.append((cells, grid, masked))
        return d

    # -- pixels --------------------------------------------------------------------------------

    def _base_view(self, x8: torch.Tensor, bi: int, d: _BranchDraw, c0: int, c1: int, n: int) -> torch.Tensor:
        """uint8 rows [c0, c1) of one branch's source -> float32 in the network's input space (planar,
        or channels-last for a branch that only normalises)."""
        b, r = self.recipe.branches[bi], self.recipe
        sub = lambda idx: _chunk_index(idx, c0, c1, n)                          # noqa: E731
        if not (b.flip or b.color or b.grayscale or b.blur or b.solarize or b.highpass):
            # normalise only (SimMIM, plain): one pass from uint8, in the loader's channels-last layout
            with _stage("highpass_normalize"):
                return A.normalize(x8.to(torch.float32), [255.0 * m for m in r.mean], [255.0 * s for s in r.std])
        x = A.to_float(x8)
        if b.flip:
            A.apply_to(x, sub(d.flip), A.hflip)
        if b.color and d.order is not None:
            with _stage("color_jitter"):
                x = A.color_jitter(x, d.jitter[c0:c1], d.order[c0:c1], [sub(h) for h in d.hue], self.kernels)
        if b.grayscale:
            with _stage("grayscale"):
                A.apply_to(x, sub(d.gray), A.to_grayscale)
        if b.blur:
            k = self.blur_kernel[bi]
            with _stage("blur"):
                A.apply_to(x, sub(d.blur), lambda im, s: A.gaussian_blur(im, s, k), d.blur_sigma[c0:c1])
        if b.solarize:
            t = b.solarize.threshold
            with _stage("solarize"):
                A.apply_to(x, sub(d.solarize), lambda im: A.solarize(im, t))
        with _stage("highpass_normalize"):
            if b.highpass:
                s = d.highpass_sigma if not isinstance(d.highpass_sigma, torch.Tensor) else d.highpass_sigma[c0:c1]
                x = A.highpass(x, s, self.highpass_kernel[bi])
                return A.normalize(x, (0.0, 0.0, 0.0), r.std)                  # the mean cancels
            return A.normalize(x, r.mean, r.std)

    def _write_copies(self, outs: list[torch.Tensor], first: int, base: torch.Tensor, bi: int,
                      d: _BranchDraw, c0: int, c1: int, n: int, gen: torch.Generator) -> None:
        """Branch bi's views for rows [c0, c1): the base, masked and filled per copy, written to the
        channels-last outputs (converting to their dtype). Only the masked samples are filled."""
        b = self.recipe.branches[bi]
        h, w = base.shape[2:]
        for copy_i in range(b.copies):
            out = outs[first + copy_i][c0:c1]
            rows = _chunk_index(d.masks[copy_i][2], c0, c1, n) if b.mask else None
            if rows is None or rows.numel() == 0:
                out.copy_(base)
                continue
            with _stage("mask_fill"):
                cells, grid = d.masks[copy_i][0][c0:c1], d.masks[copy_i][1][c0:c1]
                if rows.numel() == c1 - c0:
                    mask = M.cells_to_pixels(cells, grid, h, w, base.dtype)
                    out.copy_(M.fill(base, mask, b.mask.fill, b.mask.noise_std, gen))
                    continue
                mask = M.cells_to_pixels(cells[rows], grid[rows], h, w, base.dtype)
                out.copy_(base)
                out[rows] = M.fill(base[rows], mask, b.mask.fill, b.mask.noise_std, gen).to(out.dtype)

    def _check(self, views: list[torch.Tensor]) -> int:
        if len(views) < self.sources:
            raise ValueError(f"recipe {self.recipe.name} needs {self.sources} loader views per image, got "
                             f"{len(views)} (set views={self.sources} in the config)")
        n = views[0].shape[0]
        for i, v in enumerate(views[:self.sources]):
            if v.dtype != torch.uint8 or v.ndim != 4 or v.shape[1] != 3 or v.shape[0] != n:
                raise ValueError(f"augment: view {i} must be (N, 3, H, W) uint8 like view 0, got "
                                 f"{tuple(v.shape)} {v.dtype}")
            if v.shape[2] != self.size or v.shape[3] != self.size:
                raise ValueError(f"augment: view {i} is {v.shape[2]}x{v.shape[3]}, the augmenter was built "
                                 f"for size {self.size}")
            if v.device != self.device and not (v.device.type == self.device.type == "cuda"):
                raise ValueError(f"augment: view {i} is on {v.device}, the augmenter on {self.device}")
        return n

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        step = self.chunk or n
        return [(c0, min(n, c0 + step)) for c0 in range(0, n, step)]

    def _run_chunks(self, fn, n: int) -> None:
        """fn(c0, c1) for every chunk: inline in one piece on GPUs; on CPU spread over a pool of
        single-threaded workers, one per torch thread. Cache-sized chunks on separate cores beat
        every op splitting its few hundred thousand elements over the cores (1.4x on 2 cores)."""
        chunks = self._chunks(n)
        if self._pool is None or len(chunks) == 1:
            for c0, c1 in chunks:
                fn(c0, c1)
            return
        for future in [self._pool.submit(fn, c0, c1) for c0, c1 in chunks]:
            future.result()                                                   # re-raises errors

    def _noise_seed(self) -> Optional[int]:
        """CPU: one draw per call seeds the noise of every chunk (`_noise_gen`), so the noise does
        not depend on which worker runs a chunk first. GPUs draw from the device generator."""
        if self.device.type != "cpu":
            return None
        return int(torch.randint(2**62, (1,), generator=self.gen))

    def _noise_gen(self, seed: Optional[int], c0: int) -> torch.Generator:
        if seed is None:
            return self.gen
        return torch.Generator().manual_seed(seed + c0)

    def _params(self, draws: list[_BranchDraw], n: int, size: int, mim) -> list[ViewParams]:
        """The public record of the draws (`ViewParams`), one per output view."""
        r, dev = self.recipe, self.device
        mask = lambda idx: A.subset_mask(n, idx, dev)                           # noqa: E731
        identity = A.const((1.0, 1.0, 1.0, 0.0), dev).expand(n, 4)
        plain_order = A.const((A.BRIGHTNESS, A.CONTRAST, A.SATURATION, A.HUE), dev, torch.long).expand(n, 4)
        params = []
        for v, bi in enumerate(self.view_branch):
            b, d = r.branches[bi], draws[bi]
            copy_i = v - self.view_branch.index(bi)
            hp = d.highpass_sigma
            if hp is not None and not isinstance(hp, torch.Tensor):
                hp = torch.full((n,), float(hp), device=dev)
            p = ViewParams(
                branch=bi, source=b.source, size=size, flip=mask(d.flip),
                jitter=mask(d.jitter_subset), jitter_factors=identity if d.jitter is None else d.jitter,
                jitter_order=plain_order if d.order is None else d.order, grayscale=mask(d.gray),
                blur=mask(d.blur), blur_sigma=d.blur_sigma, blur_kernel=self.blur_kernel[bi],
                solarize=mask(d.solarize), solarize_threshold=b.solarize.threshold if b.solarize else 0.5,
                highpass_sigma=hp, highpass_kernel=self.highpass_kernel[bi], mean=r.mean, std=r.std,
                masked=mask(d.masks[copy_i][2] if b.mask else None),
                mim_mask=mim[v] if mim is not None else None)
            if b.mask:
                p.mask_cells, p.mask_grid = d.masks[copy_i][0], d.masks[copy_i][1]
                p.mask_fill, p.noise_std = b.mask.fill, b.mask.noise_std
            params.append(p)
        return params

    @torch.no_grad()
    def __call__(self, views: list[torch.Tensor], return_params: bool = False) -> AugmentOutput:
        """The views of one batch; return_params=True also records what was drawn for each view
        (`AugmentOutput.params`, `mix_params`: for tests, and for debugging an augmentation)."""
        n = self._check(views)
        r, dev, (h, w) = self.recipe, self.device, views[0].shape[2:]
        draws = [self._draw_branch(b, n) for b in r.branches]
        mix = self._draw_mix(n) if r.mix else None
        mim = self._draw_simmim(n) if r.simmim else None
        outs = [torch.empty((n, 3, h, w), dtype=self.dtype, device=dev, memory_format=A.CL)
                for _ in self.view_branch]
        first_view = [self.view_branch.index(i) for i in range(len(r.branches))]
        noise_seed = self._noise_seed()

        def chunk(c0: int, c1: int) -> None:
            gen = self._noise_gen(noise_seed, c0)
            for bi, b in enumerate(r.branches):
                base = self._base_view(views[b.source][c0:c1], bi, draws[bi], c0, c1, n)
                self._write_copies(outs, first_view[bi], base, bi, draws[bi], c0, c1, n, gen)

        self._run_chunks(chunk, n)
        result = AugmentOutput(views=outs, pairs=list(r.pairs), mim_masks=mim)
        if mix is not None:
            result.mixed, result.mix_lam = self._mix(outs[self.mix_source], mix)
            result.mix_source = self.mix_source
        if return_params:
            result.params = self._params(draws, n, h, mim)
            if mix is not None:
                result.mix_params = MixParams(r.mix.kind, self.mix_source, result.mix_lam, mix.get("cells"),
                                              mix.get("use_mixup"), mix.get("lam"), mix.get("boxes"))
        return result

    # -- mixing and SimMIM ---------------------------------------------------------------------

    def _draw_mix(self, n: int) -> dict:
        m, dev, gen = self.recipe.mix, self.device, self.gen
        if m.kind == "mixmask":
            return {"cells": X.block_cells(n, m.grid, m.ratio, gen, dev, m.min_cells, m.aspect, m.rects)}
        lam = X.sample_beta(m.beta, m.beta, n, gen, dev)
        use_mixup = torch.rand(n, generator=gen, device=dev) < m.mixup_p
        boxes, box_lam = X.cutmix_boxes(lam, self.size, self.size, gen)
        return {"lam": lam, "use_mixup": use_mixup, "boxes": boxes, "box_lam": box_lam}

    def _mix(self, v: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix view v (N, 3, H, W) with v.flip(0), chunk by chunk (row i meets row N-1-i)."""
        n = v.shape[0]
        mixed = torch.empty_like(v)

        def chunk(c0: int, c1: int) -> None:
            x, rev = v[c0:c1], v[n - c1:n - c0].flip(0)
            if "cells" in p:
                mixed[c0:c1] = X.mixmask(x, p["cells"][c0:c1], rev)
            else:
                mixed[c0:c1] = X.unmix(x.float(), p["lam"][c0:c1], p["use_mixup"][c0:c1],
                                       p["boxes"][c0:c1], rev.float())

        with _stage("mix"):
            self._run_chunks(chunk, n)
        if "cells" in p:
            return mixed, X.block_lam(p["cells"], self.size, self.size)
        return mixed, torch.where(p["use_mixup"], p["lam"], p["box_lam"])

    def _draw_simmim(self, n: int) -> list[Optional[torch.Tensor]]:
        s = self.recipe.simmim
        side = self.size // s.patch
        chosen = set(range(len(self.recipe.branches)) if s.branches is None else s.branches)
        return [M.simmim_masks(n, side, side, s.ratio, self.gen, self.device) if bi in chosen else None
                for bi in self.view_branch]

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def eval_transform(self, x: torch.Tensor, highpass: Optional[bool] = None) -> torch.Tensor:
        """Deterministic eval input: uint8 (N, 3, H, W) -> normalised float (self.dtype), through the
        recipe's high-pass filter when it has one (MSCN evaluates on high-passed images, seed 001
        A.2; a sigma range uses its midpoint). `highpass` forces the filter on or off."""
        spec = next((b.highpass for b in self.recipe.branches if b.highpass), None)
        use = spec is not None if highpass is None else highpass
        sigma = (sum(spec.sigma) / 2 if spec else 5.0) * x.shape[-1] / self.recipe.ref_size
        out = torch.empty(x.shape, dtype=self.dtype, device=x.device, memory_format=A.CL)
        kernel = A.highpass_kernel_size(sigma, min(x.shape[-2:]))

        def chunk(c0: int, c1: int) -> None:
            f = A.to_float(x[c0:c1])
            if use:
                out[c0:c1] = A.normalize(A.highpass(f, sigma, kernel), (0.0, 0.0, 0.0), self.recipe.std)
            else:
                out[c0:c1] = A.normalize(f, self.recipe.mean, self.recipe.std)

        self._run_chunks(chunk, x.shape[0])
        return out


def build_augmenter(recipe: str | Path | Recipe, size: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0, rank: int = 0,
                    mix: Optional[str] = None, chunk: Optional[int] = None, compile: bool = False) -> Augmenter:
    """The Augmenter of a recipe (a name in pipelines/recipes/, a yaml path, or a Recipe).

    mix: "mixmask" / "unmix" adds that mixing (paper defaults) to a recipe without it (config `mix`);
    None or "none" keeps the recipe's own. chunk: rows per CPU chunk (default: sized to the cache).
    compile: torch.compile the colour-jitter kernels (2-4x faster jitter; tens of seconds of compile
    on first use, cached on disk; the outputs equal the eager ones to float rounding)."""
    r = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    return Augmenter(with_mix(r, mix), size, device, dtype, seed, rank, chunk, compile)
