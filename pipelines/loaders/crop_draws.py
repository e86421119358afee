"""LoaderSpec.boxes for a whole batch in one vectorised call: the same numbers, bit for bit.

    boxes = batch_boxes(spec, epoch, indices, heights, widths)   # (n, V, 5) int64 = spec.boxes per row

The crops every loader draws are defined per sample (spec.py): sample_rng(seed, epoch, index), a
numpy Generator (PCG64 seeded through SeedSequence), then per view RandomResizedCrop.get_params's
ten tries and a flip (common.random_resized_crop_params). Making one Generator per sample and
drawing from it in Python costs tens of microseconds of interpreter time per image, on the thread
that feeds DALI. This module computes the same streams for n samples at once in numpy:

    seed        SeedSequence's hash of the words [seed, epoch, index, 0xC0], vectorised (uint32)
    stream      PCG64 (128-bit LCG, XSL-RR output) jumped straight to each output k:
                state_k = M^k state_0 + S_k inc, S_k = M^0 + ... + M^(k-1) (mod 2^128), so any output
                of any sample is a few uint64 array operations, no sequential loop over samples
    draws       numpy's own rules: doubles are (out >> 11) / 2^53; integers(0, r + 1) is Lemire's
                method on 32-bit halves (low half first, the high half kept for the next integer,
                across views), no draw when r == 0; exp through math.exp, as the scalar code does

A sample whose integer draw would need Lemire's rejection step (probability below r / 2^32 per
draw) is drawn again with spec.boxes; tests/test_dali_plan.py checks the whole batch against
spec.boxes on thousands of samples, edge sizes and seeds.
"""
from __future__ import annotations

import math

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)

# numpy/random/bit_generator.pyx (SeedSequence) and pcg64.h (the 128-bit LCG's multiplier)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _XSHIFT, _POOL = 0xCA01F9DD, 0x4973F715, 16, 4
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_MASK128 = (1 << 128) - 1
_SALT = 0xC0  # common.sample_rng's fourth word


def _words(value: int) -> list[int]:
    """SeedSequence's uint32 words of one non-negative int, least significant first (0 -> [0])."""
    out = [value & 0xFFFFFFFF]
    value >>= 32
    while value:
        out.append(value & 0xFFFFFFFF)
        value >>= 32
    return out


def seed_states(entropy: np.ndarray) -> np.ndarray:
    """(n, L) uint32 entropy words -> (n, 4) uint64 = SeedSequence(words).generate_state(4, uint64)."""
    n, length = entropy.shape
    u32 = np.uint32
    hash_const = _INIT_A

    def hashmix(value):  # (n,) uint32; the constant advances once per call, the same for every row
        nonlocal hash_const
        value = value ^ u32(hash_const)
        hash_const = (hash_const * _MULT_A) & 0xFFFFFFFF
        value = value * u32(hash_const)
        return value ^ (value >> u32(_XSHIFT))

    def mix(x, y):
        r = u32(_MIX_L) * x - u32(_MIX_R) * y
        return r ^ (r >> u32(_XSHIFT))

    with np.errstate(over="ignore"):
        zero = np.zeros(n, u32)
        pool = [hashmix(entropy[:, i] if i < length else zero) for i in range(_POOL)]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        for src in range(_POOL, length):
            for dst in range(_POOL):
                pool[dst] = mix(pool[dst], hashmix(entropy[:, src]))
        state = np.empty((n, 8), u32)
        hash_const = _INIT_B
        for i in range(8):
            value = pool[i % _POOL] ^ u32(hash_const)
            hash_const = (hash_const * _MULT_B) & 0xFFFFFFFF
            value = value * u32(hash_const)
            state[:, i] = value ^ (value >> u32(_XSHIFT))
    return state.astype("<u4").view("<u8").astype(np.uint64)


# ---- 128-bit arithmetic on (hi, lo) pairs of uint64 arrays (wrapping, as the LCG's mod 2^128) ----

def _mulhi64(x, y):
    x0, x1, y0, y1 = x & _M32, x >> np.uint64(32), y & _M32, y >> np.uint64(32)
    p01, p10 = x0 * y1, x1 * y0
    mid = ((x0 * y0) >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    return x1 * y1 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))


def _mul128(ah, al, bh, bl):
    return _mulhi64(al, bl) + al * bh + ah * bl, al * bl


def _add128(ah, al, bh, bl):
    lo = al + bl
    return ah + bh + (lo < al).astype(np.uint64), lo


def _split(values) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([v >> 64 for v in values], np.uint64),
            np.array([v & 0xFFFFFFFFFFFFFFFF for v in values], np.uint64))


_jumps: dict[str, np.ndarray] = {}


def _jump_tables(k: int):
    """M^j and S_j = M^0 + ... + M^(j-1) (mod 2^128) for j = 0..k-1, as (hi, lo) uint64 arrays."""
    if "mh" not in _jumps or len(_jumps["mh"]) < k:
        size = max(k, 2 * len(_jumps.get("mh", ())), 64)
        powers, sums, p, s = [], [], 1, 0
        for _ in range(size):
            powers.append(p)
            sums.append(s)
            s = (s + p) & _MASK128
            p = (p * _PCG_MULT) & _MASK128
        (_jumps["mh"], _jumps["ml"]), (_jumps["sh"], _jumps["sl"]) = _split(powers), _split(sums)
    return _jumps["mh"], _jumps["ml"], _jumps["sh"], _jumps["sl"]


class _Streams:
    """The PCG64 output streams of n samples (numpy's default_rng(words)), read at any position."""

    def __init__(self, seeds: np.ndarray, first: int):
        """seeds: (n, 4) uint64 from seed_states; first: outputs 0..first-1 of every row computed now."""
        with np.errstate(over="ignore"):
            one = np.uint64(1)
            # pcg64_set_seed: initstate = seeds[0:2], initseq = seeds[2:4] (hi, lo); inc = initseq << 1 | 1;
            # state = 0; step; state += initstate; step  ->  state_0 = (inc + initstate) M + inc
            self.inc_h = (seeds[:, 2] << one) | (seeds[:, 3] >> np.uint64(63))
            self.inc_l = (seeds[:, 3] << one) | one
            mh, ml = np.uint64(_PCG_MULT >> 64), np.uint64(_PCG_MULT & 0xFFFFFFFFFFFFFFFF)
            sh, sl = _add128(self.inc_h, self.inc_l, seeds[:, 0], seeds[:, 1])
            sh, sl = _mul128(sh, sl, mh, ml)
            self.h, self.l = _add128(sh, sl, self.inc_h, self.inc_l)
        rows = np.repeat(np.arange(len(seeds)), first)
        self.block = self._compute(rows, np.tile(np.arange(first), len(seeds))).reshape(len(seeds), first)

    def _compute(self, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Output `pos` (0 = the first draw) of each row: XSL-RR of state_(pos+1), one LCG step
        past state_pos (the draw steps first, then outputs)."""
        k = pos + 1
        mh, ml, sh, sl = _jump_tables(int(k.max(initial=0)) + 1)
        with np.errstate(over="ignore"):
            ah, al = _mul128(self.h[rows], self.l[rows], mh[k], ml[k])            # M^k state_0 ...
            bh, bl = _mul128(self.inc_h[rows], self.inc_l[rows], sh[k], sl[k])   # ... + S_k inc
            hi, lo = _add128(ah, al, bh, bl)
            x, rot = hi ^ lo, hi >> np.uint64(58)
            return (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))

    def take(self, rows: np.ndarray, pos: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows), np.uint64)
        near = pos < self.block.shape[1]
        out[near] = self.block[rows[near], pos[near]]
        if not near.all():
            out[~near] = self._compute(rows[~near], pos[~near])
        return out


def _doubles(raw: np.ndarray) -> np.ndarray:
    return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def batch_boxes(spec, epoch: int, indices, heights, widths) -> np.ndarray:
    """(n,) sample indices and image sizes -> (n, V, 5) int64 rows (top, left, h, w, flip): for each
    sample exactly spec.boxes(epoch, index, height, width)."""
    indices = np.asarray(indices, np.int64)
    heights, widths = np.asarray(heights, np.int64), np.asarray(widths, np.int64)
    n, views = len(indices), spec.views
    out = np.empty((n, views, 5), np.int64)
    if n == 0:
        return out
    # the emulation covers one-word indices and spans below 2^32 (numpy's 32-bit integer path)
    if (spec.seed < 0 or epoch < 0 or indices.min() < 0 or indices.max() >= 1 << 32
            or heights.max() >= 1 << 32 or widths.max() >= 1 << 32):
        for r in range(n):
            out[r] = spec.boxes(epoch, int(indices[r]), int(heights[r]), int(widths[r]))
        return out
    words = _words(spec.seed) + _words(epoch)
    entropy = np.empty((n, len(words) + 2), np.uint32)
    entropy[:, :len(words)] = words
    entropy[:, -2], entropy[:, -1] = indices, _SALT
    streams = _Streams(seed_states(entropy), first=4 * views + 1)  # each view usually takes 4 outputs

    rows = np.arange(n)
    pos = np.zeros(n, np.int64)             # outputs consumed per row
    has_half = np.zeros(n, bool)            # PCG64's next_uint32 keeps the high half of an output
    half = np.zeros(n, np.uint64)
    redo = np.zeros(n, bool)                # Lemire's rejection step needed: spec.boxes draws these
    area = (heights * widths).astype(np.float64)
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    in_ratio = widths / heights
    lo_ratio, hi_ratio = min(spec.ratio), max(spec.ratio)

    def integers(sel: np.ndarray, span: np.ndarray) -> np.ndarray:
        """rng.integers(0, span + 1) of rows `sel` (span > 0): Lemire on a 32-bit draw."""
        buffered = has_half[sel]
        raw = np.where(buffered, half[sel], 0)
        fresh = sel[~buffered]
        if fresh.size:
            draw = streams.take(fresh, pos[fresh])
            pos[fresh] += 1
            raw[~buffered] = draw & _M32
            half[fresh] = draw >> np.uint64(32)
        has_half[sel] = ~buffered
        excl = span.astype(np.uint64) + np.uint64(1)
        m = raw * excl
        leftover = m & _M32
        threshold = (np.uint64(1 << 32) - excl) % excl
        redo[sel[leftover < threshold]] = True
        return (m >> np.uint64(32)).astype(np.int64)

    for v, scale in enumerate(spec.view_scales):
        box = np.zeros((n, 4), np.int64)
        todo = rows
        for _ in range(10):  # RandomResizedCrop.get_params' tries, on the rows still without a box
            if not todo.size:
                break
            u_area = _doubles(streams.take(todo, pos[todo]))
            u_ratio = _doubles(streams.take(todo, pos[todo] + 1))
            pos[todo] += 2
            target = area[todo] * (scale[0] + (scale[1] - scale[0]) * u_area)
            aspect = np.fromiter(map(math.exp, (log_lo + (log_hi - log_lo) * u_ratio).tolist()),
                                 np.float64, len(todo))
            w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
            h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
            ok = (w > 0) & (w <= widths[todo]) & (h > 0) & (h <= heights[todo])
            hit = todo[ok]
            box[hit, 2], box[hit, 3] = h[ok], w[ok]
            for col, span in ((0, heights[hit] - h[ok]), (1, widths[hit] - w[ok])):  # top, then left
                draw = span > 0
                box[hit[draw], col] = integers(hit[draw], span[draw])
            todo = todo[~ok]
        if todo.size:  # ten misses: the central crop at the clamped aspect ratio
            hh, ww, ir = heights[todo], widths[todo], in_ratio[todo]
            w = np.where(ir < lo_ratio, ww, np.where(ir > hi_ratio, np.rint(hh * hi_ratio).astype(np.int64), ww))
            h = np.where(ir < lo_ratio, np.rint(ww / lo_ratio).astype(np.int64), hh)
            box[todo] = np.stack([(hh - h) // 2, (ww - w) // 2, h, w], 1)
        out[:, v, :4] = box
        out[:, v, 4] = _doubles(streams.take(rows, pos)) < spec.flip_prob
        pos += 1
    for r in np.flatnonzero(redo):
        out[r] = spec.boxes(epoch, int(indices[r]), int(heights[r]), int(widths[r]))
    return out
