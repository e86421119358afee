"""What every method file shares: the embeddings record, precision and view helpers, hyper-parameters.

Conventions every method follows (tests/test_losses.py and tests/test_dist_losses.py check them):
- Precision: a pure loss runs with autocast and TF32 off and upcasts half-precision inputs to
  float32 (float64 stays float64, so gradcheck works), whatever context the loop calls it from.
- Views: `pairs` lists (i, j) view pairs; a loss averages over the listed pairs. Symmetric methods
  (SimCLR, BYOL, SimSiam, Barlow Twins, VICReg) include both directions of each pair as their papers
  do; MoCo v2 is asymmetric (query i, key j) unless `moco_symmetric`. Multi-mask (MSCN) lists one
  pair per masked view, e.g. [(0, 2), (1, 2)]; multi-crop lists each global view against every other.
- Distributed: each rank passes its own N samples. The loss it returns is its share L_r of the
  global loss, with mean over ranks of L_r = the loss of one process holding the whole global batch,
  and backward sends each rank d(sum_k L_k)/d(its inputs) (gathers are autograd-aware), so DDP's
  gradient averaging reproduces the full-batch gradient exactly. `logs` follow the same rule:
  average them over ranks to report global values (except `z_std`, a collapse monitor on the local
  batch). Every rank must hold the same N (drop_last), as all_gather needs.
- `logs` hold detached scalar tensors: no host sync inside a method.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
from torch import nn

from masksiam.config import ConfigError


@dataclass
class Embeddings:
    """What the Siamese network produced for one step; each present entry is (N, D) on this rank.

    z      online projector outputs, one per view (None for a view the online branch skipped)
    p      online predictor outputs (BYOL, SimSiam), else None
    zt     target-branch projector outputs (EMA network of BYOL/MoCo), no grad; None where skipped
    pairs  (i, j) view pairs the loss compares: view i predicts / is contrasted with view j
    queue  (K, D) MoCo negatives (L2-normalised keys), no grad, else None
    """
    z: list[Optional[torch.Tensor]]
    p: Optional[list[Optional[torch.Tensor]]] = None
    zt: Optional[list[Optional[torch.Tensor]]] = None
    pairs: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    queue: Optional[torch.Tensor] = None


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 unchanged (losses are computed in >= fp32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def views_in(pairs) -> list[int]:
    return sorted({v for pair in pairs for v in pair})


def both_directions(pairs) -> list[tuple[int, int]]:
    """[(0, 1)] -> [(0, 1), (1, 0)]: the symmetrised loss of BYOL / SimSiam / symmetric MoCo."""
    return list(pairs) + [(j, i) for i, j in pairs]


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor (SimSiam, Sec. 4.1): per-dimension std of the L2-normalised outputs, averaged.

    About 1/sqrt(D) for well spread embeddings, 0 when they collapse to a point. Detached, local.
    """
    z = upcast(z.detach())
    return torch.nn.functional.normalize(z, dim=1).std(0).mean()


def _device_type(x) -> str:
    if isinstance(x, Embeddings):
        x = next(t for t in x.z + (x.p or []) + (x.zt or []) if t is not None)
    return x.device.type


@contextlib.contextmanager
def _no_tf32():
    """The loop turns TF32 on for the convolutions; a loss's matmuls (65,536 queue logits, an
    8192-d Gram matrix) must stay in full float32."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


# The backward of a loss runs later, in loss.backward(), outside _no_tf32: without more, its matmuls
# (the transposes of the forward's) would run in TF32. Two identity autograd Functions fence the
# loss's graph: _EnterLossBackward on its outputs runs first in the backward (it turns TF32 off),
# _ExitLossBackward on its inputs runs once every gradient of the loss's graph reached them (it
# restores the flag), so the network's backward keeps TF32. Fences nest (a loss calling another
# pure loss): one depth count, the flag saved at the outermost. Should the exit never run (a
# backward asked for gradients of the loss's inner tensors only), a callback at the end of the
# backward pass restores it. Other branches the engine runs in between (an online probe's backward)
# run without TF32: more precise, not less.
_FENCE = {"depth": 0, "saved": False}


def _enter_backward() -> None:
    if _FENCE["depth"] == 0:
        _FENCE["saved"] = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        with contextlib.suppress(Exception):       # only inside a backward pass, which this is
            torch.autograd.Variable._execution_engine.queue_callback(_end_of_backward)
    _FENCE["depth"] += 1


def _exit_backward() -> None:
    if _FENCE["depth"] > 0:
        _FENCE["depth"] -= 1
        if _FENCE["depth"] == 0:
            torch.backends.cuda.matmul.allow_tf32 = _FENCE["saved"]


def _end_of_backward() -> None:
    if _FENCE["depth"] > 0:
        _FENCE["depth"] = 0
        torch.backends.cuda.matmul.allow_tf32 = _FENCE["saved"]


def _fence(on_backward, doc: str) -> type[torch.autograd.Function]:
    """An identity Function on a tuple of tensors whose backward calls `on_backward` first."""
    class Fence(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *ts):
            ctx.set_materialize_grads(False)    # an unused input gets no gradient, not zeros
            return tuple(t.view_as(t) for t in ts)

        @staticmethod
        def backward(ctx, *grads):
            on_backward()
            return grads
    Fence.__doc__ = doc
    return Fence


# on the loss's outputs: its backward runs first and turns TF32 off for the loss's backward;
# on the loss's inputs: its backward runs after the whole loss graph's and restores TF32
_EnterLossBackward = _fence(_enter_backward, "Identity on the loss's outputs; TF32 off for its backward.")
_ExitLossBackward = _fence(_exit_backward, "Identity on the loss's inputs; TF32 restored after its backward.")


def _differentiable(obj) -> list[torch.Tensor]:
    """The tensors that require grad in a loss's arguments or results (tensors, lists, tuples,
    dicts, dataclasses such as Embeddings)."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.requires_grad else []
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _differentiable(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _differentiable(v)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in _differentiable(getattr(obj, f.name))]
    return []


def _replace(obj, new: dict[int, torch.Tensor]):
    """obj with each tensor t replaced by new[id(t)] where present (same nesting as _differentiable)."""
    if isinstance(obj, torch.Tensor):
        return new.get(id(obj), obj)
    if isinstance(obj, list):
        return [_replace(v, new) for v in obj]
    if isinstance(obj, tuple):
        return type(obj)(*(_replace(v, new) for v in obj)) if hasattr(obj, "_fields") \
            else tuple(_replace(v, new) for v in obj)
    if isinstance(obj, dict):
        return {k: _replace(v, new) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _replace(getattr(obj, f.name), new)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _fence(fn_class, obj):
    """obj with its differentiable tensors passed through one fn_class (one node for all of them,
    so that its backward runs once, when all their gradients are in)."""
    ts = list({id(t): t for t in _differentiable(obj)}.values())
    if not ts or not torch.is_grad_enabled():
        return obj
    return _replace(obj, {id(t): o for t, o in zip(ts, fn_class.apply(*ts))})


def full_precision(fn):
    """Run a pure loss with autocast and TF32 off, whatever context the method is called from, and
    its backward with TF32 off too (the fences above)."""
    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        first, args, kwargs = _fence(_ExitLossBackward, (first, args, kwargs))
        with torch.autocast(_device_type(first), enabled=False), _no_tf32():
            result = fn(first, *args, **kwargs)
        return _fence(_EnterLossBackward, result)
    return run


# ---- settings: a method's own config keys ----------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Base of a method's `Settings`: its config keys as fields with the paper defaults. A method file
    declares `@dataclass(frozen=True) class Settings(<shared parts>)`; each field is a config key
    (flat in a yaml file or on the command line, collected in Config.method_args; masksiam/config.py
    types it by the annotation). RULES: {key: (ok(value), "what ok means")}, range checks; each
    class's own RULES add to its bases' (`rules`)."""
    RULES: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}


@dataclass(frozen=True)
class Heads(Settings):
    """The Siamese projector (models/heads.py) and predictor (BYOL, SimSiam): their widths decide
    the shapes of the heads (checkpoint compatibility: HEAD_KEYS)."""
    proj_hidden: int = 2048
    proj_dim: int = 256
    proj_layers: int = 2
    proj_bn: bool = True                   # BatchNorm after the projector's hidden layers
    proj_last_bn: bool = False             # affine-free BatchNorm after its last layer (SimCLR, SimSiam)
    pred_hidden: int = 0                   # predictor hidden width; 0 = no predictor
    RULES: ClassVar = {"proj_hidden": (lambda v: v > 0, "> 0"), "proj_dim": (lambda v: v > 0, "> 0"),
                       "proj_layers": (lambda v: v >= 1, ">= 1"),
                       "pred_hidden": (lambda v: v >= 0, ">= 0 (0 = no predictor)")}


@dataclass(frozen=True)
class EMA(Settings):
    """An EMA target network (BYOL, MoCo): momentum at the start of its schedule (models/ema.py)."""
    ema_momentum: float = 0.996
    ema_schedule: Literal["cosine", "constant"] = "cosine"   # cosine to 1 (BYOL) or constant (MoCo v2)
    RULES: ClassVar = {"ema_momentum": (lambda v: 0 <= v <= 1, "in [0, 1]")}


# the config keys that decide the shapes of the Siamese heads (checkpoint compatibility)
HEAD_KEYS = ("proj_hidden", "proj_dim", "proj_layers", "proj_bn", "proj_last_bn", "pred_hidden")


def rules(cls) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """The range checks of a Settings class: its bases' RULES, then its own."""
    out: dict = {}
    for klass in reversed(cls.__mro__):
        out.update(vars(klass).get("RULES", {}))
    return out


def defaults(cls) -> dict[str, Any]:
    """A Settings class's defaults as {key: value} (a method class's DEFAULTS)."""
    return dataclasses.asdict(cls())


def settings(method, cfg, origins: dict[str, str] | None = None):
    """method.Settings from cfg.method_args (its keys only; the others belong to other methods, which
    masksiam.config.check_method_args refuses for a user's config), each checked against its range:
    ConfigError naming the key, the value, the method and (origins: key -> where) the file."""
    names = {f.name for f in dataclasses.fields(method.Settings)}
    given = {k: v for k, v in (cfg.method_args if cfg is not None else {}).items() if k in names}
    s = method.Settings(**given)
    where = origins or {}
    for key, (ok, rule) in rules(method.Settings).items():
        if key in names and not ok(getattr(s, key)):
            src = f" (in {where[key]})" if key in where else ""
            raise ConfigError(f"config key {key!r} = {getattr(s, key)!r} must be {rule} for method {method.name!r}{src}")
    if getattr(method, "predictor", False) and s.pred_hidden == 0:
        raise ConfigError(f"method {method.name!r} needs a predictor: config key 'pred_hidden' must be > 0")
    return s


def hparams(method, cfg) -> dict[str, Any]:
    """A method's settings as the {key: value} its module holds (self.hp): cfg.method_args where
    given, else its defaults; checked as `settings` does."""
    return dataclasses.asdict(settings(method, cfg))


# ---- the Siamese forward ----------------------------------------------------------------------------

def embed(net: nn.Module, views: list[torch.Tensor], which: list[int], extra: tuple[torch.Tensor, ...] = ()):
    """views[i] for i in `which` (and the `extra` inputs, e.g. a mixed view) through `net`.

    net(x) -> (h, z, p | None). Inputs of one size go through the network as one batch (one
    forward per size: BatchNorm sees every view of that size; multi-crop's global and local views
    are two forwards). Returns z, p as lists over all views (None where a view was not embedded)
    and the extra inputs' (z, p) lists.
    """
    inputs = [views[i] for i in which] + list(extra)
    z_out: list[Optional[torch.Tensor]] = [None] * len(inputs)
    p_out: list[Optional[torch.Tensor]] = [None] * len(inputs)
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, x in enumerate(inputs):
        by_size.setdefault(tuple(x.shape[-2:]), []).append(k)
    for members in by_size.values():
        _, z_all, p_all = net(torch.cat([inputs[k] for k in members]))
        for k, zk, pk in zip(members, z_all.chunk(len(members)),
                             p_all.chunk(len(members)) if p_all is not None else [None] * len(members)):
            z_out[k], p_out[k] = zk, pk
    z, p = [None] * len(views), [None] * len(views)
    for k, i in enumerate(which):
        z[i], p[i] = z_out[k], p_out[k]
    has_p = any(t is not None for t in p_out)
    return z, (p if has_p else None), z_out[len(which):], p_out[len(which):]
