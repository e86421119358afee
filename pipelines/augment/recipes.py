"""Augmentation recipes: the yaml schema (recipes/*.yaml) and its validated specs.

The batched stage built from a recipe is `engine.Augmenter` (pipelines/augment/engine.py).

A recipe lists branches; branch b transforms loader view `source` (default b) and emits `copies`
views (MSCN's multi-mask: one augmented view, several independent masks). Per branch, in order:

    flip -> colour jitter -> grayscale -> blur -> solarize      on [0, 1] images
    -> high-pass + normalise, or normalise                      into the network's input space
    -> mask + fill                                              per copy

A yaml recipe:

    base: simclr                  # optional: start from another recipe (dicts merge, branches merge
                                  # element by element, other values replace)
    ref_size: 224                 # pixel quantities (blur and high-pass sigma) are given at this
                                  # image size and scale with the real one (multi-crop: the global
                                  # crops'); kernels are relative to each view's side
    normalize: {mean: [...], std: [...]}
    common: {...}                 # branch keys shared by every branch, overridden per branch
    branches:
      - {source: 0, copies: 2, color: {...}, grayscale: 0.2, blur: {...}, solarize: 0.2,
         highpass: {sigma: 5}, mask: {...}, flip: 0.0}
    pairs: cross                  # all pairs of views from different branches, or [[i, j], ...],
                                  # or multicrop: each global view with every other view
    mix: {kind: mixmask, branch: 0, grid: 8, ratio: 0.5}  # or {kind: unmix, mixup_p: 0.5, beta: 1}
    simmim: {patch: 32, ratio: 0.6}  # + branches: [0] (which are masked), disjoint: true (LUT)

Multi-crop (SwAV / DINO: 2 global + 6 local crops from the loader, e.g. 2 x 224 and 6 x 96 px): a
branch marked `local: true` works on a local crop; `repeat: k` stands for k such branches on k
consecutive loader views (sources s, s + 1, ...; s defaults to the branch's position). `pairs:
multicrop` compares each global view (a view of a branch that is not local) with every view of
another branch, global or local, as SwAV and DINO do; the global view comes first in each pair, so
a method that embeds its target from global views only can read the pair (i, j) as "j predicts i":

    base: simclr
    branches: [{}, {}, {repeat: 6, local: true}]
    pairs: multicrop

A probability given alone is shorthand (`grayscale: 0.2`, `blur: 0.5`, `solarize: 0.2`); `null`
turns an op off. Ranges are [lo, hi] or one number.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from masksiam.config import ConfigError
from masksiam.yamlio import coerce, dataclass_from, read_layers
from pipelines.augment import masks as M
from pipelines.augment import ops as A

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
Range = tuple[float, float]


class RecipeError(ConfigError):
    """A recipe file is wrong; the message names the file and the key (a config error: exit code 2)."""


# ---- specs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColorSpec:
    p: float = 0.8
    brightness: float = 0.4          # factor uniform in [max(0, 1 - b), 1 + b]
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1                 # shift uniform in [-h, h] turns, h <= 0.5


@dataclass(frozen=True)
class BlurSpec:
    p: float = 0.5
    sigma: Range = (0.1, 2.0)        # px at ref_size, uniform per sample
    kernel: float = 0.1              # kernel side as a fraction of the image side (odd)


@dataclass(frozen=True)
class SolarizeSpec:
    p: float = 0.2
    threshold: float = 0.5


@dataclass(frozen=True)
class HighpassSpec:
    sigma: Range = (5.0, 5.0)        # px at ref_size; a range draws one per sample (eval: midpoint)


@dataclass(frozen=True)
class MaskSpec:
    p: float = 1.0                   # probability that a view is masked at all
    ratio: Range = (0.15, 0.15)      # fraction of grid cells masked, uniform per sample
    grid: tuple[int, ...] = (7, 8)   # cells per side, one drawn per sample
    focal: float = 0.4               # probability of a focal mask instead of the grid mask
    focal_side: Range = (0.5, 0.8)   # side of the kept square, fraction of the image side
    channelwise: float = 0.8         # probability of independent masks per colour channel
    fill: str = "noise"              # zero | mean | noise
    noise_std: float = 0.5           # std of the noise fill, normalised units


@dataclass(frozen=True)
class BranchSpec:
    source: int = 0
    copies: int = 1
    flip: float = 0.0                # the loaders flip already; extra flips here if wanted
    color: Optional[ColorSpec] = None
    grayscale: float = 0.0
    blur: Optional[BlurSpec] = None
    solarize: Optional[SolarizeSpec] = None
    highpass: Optional[HighpassSpec] = None
    mask: Optional[MaskSpec] = None
    local: bool = False              # a local crop (multi-crop): `pairs: multicrop` pairs it with globals only


@dataclass(frozen=True)
class MixSpec:
    kind: str = "mixmask"            # mixmask | unmix
    branch: int = 0                  # the first view of this branch is mixed
    grid: int = 8                    # MixMask: cells per side
    ratio: float = 0.5               # MixMask: fraction of cells from the reversed batch
    min_cells: int = 4               # MixMask: smallest block
    aspect: Range = (0.3, 1 / 0.3)   # MixMask: block aspect ratio range
    rects: int = 8                   # MixMask: candidate blocks per sample
    mixup_p: float = 0.5             # Un-Mix: mixup, else cutmix, per sample
    beta: float = 1.0                # Un-Mix: lam ~ Beta(beta, beta)


@dataclass(frozen=True)
class SimMIMSpec:
    patch: int = 32                  # mask patch side in pixels (the image side must be a multiple)
    ratio: float = 0.6               # exactly ceil(ratio * patches) masked per sample
    branches: Optional[tuple[int, ...]] = None   # branches whose views get masks (None = all)
    disjoint: bool = False           # LUT: the masked views' visible cells disjoint (one size, ratio >= 1 - 1/views)


@dataclass(frozen=True)
class Recipe:
    name: str
    branches: tuple[BranchSpec, ...]
    pairs: tuple[tuple[int, int], ...]
    mean: tuple[float, ...] = A.IMAGENET_MEAN
    std: tuple[float, ...] = A.IMAGENET_STD
    ref_size: int = 224
    mix: Optional[MixSpec] = None
    simmim: Optional[SimMIMSpec] = None
    description: str = ""

    @property
    def sources(self) -> int:
        return max(b.source for b in self.branches) + 1

    def view_branches(self) -> list[int]:
        """The branch of each output view, in output order."""
        return [i for i, b in enumerate(self.branches) for _ in range(b.copies)]


# ---- yaml -> specs --------------------------------------------------------------------------------

_SHORTHAND = {"blur": "p", "solarize": "p", "color": "p", "mask": "p"}
_BRANCH_KEYS = {f.name for f in dataclasses.fields(BranchSpec)}
_TOP_KEYS = {"base", "description", "ref_size", "normalize", "common", "branches", "pairs", "mix", "simmim"}


def _merge(a: Any, b: Any, key: str = "") -> Any:
    """Recursive merge of b over a: dicts by key, `branches` lists element by element."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge(a[k], v, k) if k in a else copy.deepcopy(v)
        return out
    if key == "branches" and isinstance(a, list) and isinstance(b, list):
        return [_merge(a[i], b[i]) if i < len(a) else copy.deepcopy(b[i]) for i in range(len(b))] + \
            copy.deepcopy(a[len(b):])
    return copy.deepcopy(b)


def _expand_shorthand(branch: dict, where: str) -> dict:
    if not isinstance(branch, dict):
        raise RecipeError(f"{where}: a branch must be a mapping of op: settings, got {branch!r}")
    out = {}
    for k, v in branch.items():
        if k in _SHORTHAND and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = {_SHORTHAND[k]: v}
        out[k] = v
    return out


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union:                                   # Optional[Spec]
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or value is False:
            return None
        return _coerce({} if value is True else value, inner, where)
    if dataclasses.is_dataclass(typ):
        return _spec(typ, value, where)
    if typ == Range:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (float(value), float(value))
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] <= value[1]:
            return (float(value[0]), float(value[1]))
        raise RecipeError(f"{where}: expected a number or a range [lo, hi] with lo <= hi, got {value!r}")
    if origin is tuple:                                          # tuple[int, ...]: grid sizes, branch indices
        items = value if isinstance(value, (list, tuple)) else [value]
        least = 0 if where.endswith(".branches") else 1
        if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in items):
            raise RecipeError(f"{where}: expected integers >= {least}, got {value!r}")
        return tuple(items)
    return coerce(value, typ, where, RecipeError)             # scalars: the config's rules


def _spec(cls, data: Any, where: str):
    return dataclass_from(cls, data, where, RecipeError, _coerce)


def _check_probability(value: float, where: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise RecipeError(f"{where}: a probability must be in [0, 1], got {value}")


def _validate(recipe: Recipe, where: str) -> None:
    for i, b in enumerate(recipe.branches):
        at = f"{where}: branches[{i}]"
        if b.source < 0 or b.copies < 1:
            raise RecipeError(f"{at}: source must be >= 0 and copies >= 1")
        for name, p in (("flip", b.flip), ("grayscale", b.grayscale), ("color.p", b.color and b.color.p),
                        ("blur.p", b.blur and b.blur.p), ("solarize.p", b.solarize and b.solarize.p),
                        ("mask.p", b.mask and b.mask.p), ("mask.focal", b.mask and b.mask.focal),
                        ("mask.channelwise", b.mask and b.mask.channelwise)):
            _check_probability(float(p or 0.0), f"{at}.{name}")
        if b.color and not 0.0 <= b.color.hue <= 0.5:
            raise RecipeError(f"{at}.color.hue: must be in [0, 0.5], got {b.color.hue}")
        if b.blur and b.blur.sigma[0] <= 0:
            raise RecipeError(f"{at}.blur.sigma: must be > 0")
        if b.highpass and b.highpass.sigma[0] <= 0:
            raise RecipeError(f"{at}.highpass.sigma: must be > 0")
        if b.mask:
            if b.mask.fill not in M.FILLS:
                raise RecipeError(f"{at}.mask.fill: {b.mask.fill!r} is not one of {', '.join(M.FILLS)}")
            if not (0 <= b.mask.ratio[0] and b.mask.ratio[1] <= 1 and 0 < b.mask.focal_side[0]
                    and b.mask.focal_side[1] <= 1):
                raise RecipeError(f"{at}.mask: ratio must lie in [0, 1] and focal_side in (0, 1]")
    views = sum(b.copies for b in recipe.branches)
    for i, j in recipe.pairs:
        if not (0 <= i < views and 0 <= j < views) or i == j:
            raise RecipeError(f"{where}: pair ({i}, {j}) does not name two different views of {views}")
    if recipe.mix:
        if recipe.mix.kind not in ("mixmask", "unmix"):
            raise RecipeError(f"{where}: mix.kind {recipe.mix.kind!r} is not one of mixmask, unmix")
        if not 0 <= recipe.mix.branch < len(recipe.branches):
            raise RecipeError(f"{where}: mix.branch {recipe.mix.branch} is not a branch index")
        _check_probability(recipe.mix.ratio, f"{where}: mix.ratio")
        _check_probability(recipe.mix.mixup_p, f"{where}: mix.mixup_p")
        if recipe.mix.beta <= 0:
            raise RecipeError(f"{where}: mix.beta must be > 0")
    if recipe.simmim:
        _check_probability(recipe.simmim.ratio, f"{where}: simmim.ratio")
        for b in recipe.simmim.branches or ():
            if not 0 <= b < len(recipe.branches):
                raise RecipeError(f"{where}: simmim.branches names branch {b}, which does not exist")
        if recipe.simmim.disjoint:
            chosen = range(len(recipe.branches)) if recipe.simmim.branches is None else recipe.simmim.branches
            views = sum(recipe.branches[b].copies for b in chosen)
            if views * (1 - recipe.simmim.ratio) > 1 + 1e-9:
                raise RecipeError(f"{where}: simmim.disjoint with {views} masked views needs simmim.ratio >= "
                                  f"{1 - 1 / views:.2f} (disjoint visible cells), got {recipe.simmim.ratio}")
            if any(recipe.branches[b].local for b in chosen):
                raise RecipeError(f"{where}: simmim.disjoint needs masked views of one size (no local branch)")


def _recipe_path(name_or_path: str | Path, child: Path | None = None) -> Path:
    """A recipe name (a built-in) or a yaml path -> its file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
        raise RecipeError(f"recipe {name_or_path!r}: no file {path}" + (f" (base of {child})" if child else "")
                          + f" (built-in recipes: {names})")
    return path


def _load_yaml(name_or_path: str | Path) -> tuple[dict, str]:
    """The recipe's dict with its `base` chain merged in (masksiam.yamlio), and the file it came from."""
    path = _recipe_path(name_or_path)
    data: dict = {}
    for layer, values in read_layers(path, error=RecipeError, what="recipe", resolve=_recipe_path):
        unknown = sorted(set(values) - _TOP_KEYS)
        if unknown:
            raise RecipeError(f"recipe {layer}: unknown key(s) {', '.join(unknown)}; valid keys: "
                              f"{', '.join(sorted(_TOP_KEYS))}")
        data = _merge(data, values)
    return data, str(path)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (pipelines/augment/recipes/<name>.yaml) or a yaml file, validated."""
    data, where = _load_yaml(name_or_path)
    common = _expand_shorthand(data.get("common") or {}, f"{where}: common")
    raw = data.get("branches")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{where}: `branches` must be a non-empty list")
    branches = []
    for i, b in enumerate(raw):
        merged = _merge(common, _expand_shorthand(b or {}, f"{where}: branches[{i}]"))
        repeat = merged.pop("repeat", 1)
        if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
            raise RecipeError(f"{where}: branches[{i}].repeat: expected a positive integer, got {repeat!r}")
        source = merged.pop("source", len(branches))
        for r in range(repeat):                            # `repeat: k`: k branches, consecutive sources
            one = {**merged, "source": source + r if isinstance(source, int) and not isinstance(source, bool)
                   else source}
            branches.append(_spec(BranchSpec, one, f"{where}: branches[{i}]"))
    norm = data.get("normalize") or {}
    if set(norm) - {"mean", "std"}:
        raise RecipeError(f"{where}: normalize takes mean and std only")
    mean = tuple(float(v) for v in norm.get("mean", A.IMAGENET_MEAN))
    std = tuple(float(v) for v in norm.get("std", A.IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise RecipeError(f"{where}: normalize needs 3 means and 3 positive stds")
    view_branch = [i for i, b in enumerate(branches) for _ in range(b.copies)]
    pairs = data.get("pairs", "cross")
    if pairs == "cross":
        pairs = [(i, j) for i in range(len(view_branch)) for j in range(i + 1, len(view_branch))
                 if view_branch[i] != view_branch[j]]
    elif pairs == "multicrop":
        is_global = [not branches[b].local for b in view_branch]
        if not any(is_global):
            raise RecipeError(f"{where}: pairs: multicrop needs a global view (a branch without local: true)")
        # (global i, other j): every global with every view of another branch, global pairs once
        pairs = [(i, j) for i in range(len(view_branch)) if is_global[i] for j in range(len(view_branch))
                 if view_branch[i] != view_branch[j] and (not is_global[j] or j > i)]
    elif not (isinstance(pairs, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs)):
        raise RecipeError(f"{where}: pairs must be `cross`, `multicrop` or a list of [i, j] view pairs")
    mix = _coerce(data.get("mix"), Optional[MixSpec], f"{where}: mix")
    simmim = _coerce(data.get("simmim"), Optional[SimMIMSpec], f"{where}: simmim")
    ref_size = data.get("ref_size", 224)
    if not isinstance(ref_size, int) or ref_size <= 0:
        raise RecipeError(f"{where}: ref_size must be a positive integer")
    recipe = Recipe(name=Path(where).stem, branches=tuple(branches),
                    pairs=tuple((int(i), int(j)) for i, j in pairs), mean=mean, std=std,
                    ref_size=ref_size, mix=mix, simmim=simmim, description=str(data.get("description", "")))
    _validate(recipe, where)
    return recipe


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def with_mix(recipe: Recipe, kind: Optional[str]) -> Recipe:
    """The recipe with its own mixing, or with MixMask / Un-Mix (their defaults) on branch 0."""
    if kind in (None, "none"):
        return recipe
    if kind not in ("mixmask", "unmix"):
        raise RecipeError(f"mix {kind!r} is not one of none, mixmask, unmix")
    if recipe.mix and recipe.mix.kind == kind:
        return recipe
    return dataclasses.replace(recipe, mix=MixSpec(kind=kind))
