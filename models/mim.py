"""Masked image modeling on a torchvision ResNet: three ways to hide patches from the encoder, and a
light pixel decoder. Every piece runs on the backbone it is given (its own parameters, its key names):
the backbone stays a plain torchvision ResNet for kNN, evaluation and export.

    tok = MaskTokenEncoder(backbone, fill="zero")       # SimMIM (Xie et al. 2022 section 5), leak-free
    f = tok(backbone, x, mask)                          # (N, F, H/s, W/s), s = encoder stride (32)

    enc = SourceEncoder.sparse(mask)                    # SparK-style masked dense convolution
    f = enc(backbone, x)                                # features at hidden patches are 0
    enc = SourceEncoder.mixed(mask)                     # MixMAE's mixed partial convolution (Liu et al. 2023 A.3)
    f = enc(backbone, where(mask, x.flip(0), x))        # features of each source from that source only

    dec = PixelDecoder(backbone.num_features, s, depth, dim)
    pred = dec(f, hide)                                 # (N, 3, H, W); hide: positions given the mask token

Masks are patch masks (N, h, w) bool (True = masked / from the other image), h = H / patch, drawn
by the augment stage; a feature map of size (H', W') sees each cell as an (H'/h) x (W'/w) block.

MaskTokenEncoder: a learnable token replaces the stem output (conv + BN + ReLU + max-pool, stride 4;
stride 1 for the small stem) at masked positions. fill="none" leaves the masked pixels in the input,
so the stem's receptive field reads a few pixels across a patch border (as SimMIM on ResNet and
openmixup do); fill="zero" / "mean" replaces them first (as A2MIM), and no feature sees them.

SourceEncoder: every position of every feature map belongs to one source (a cell of the mask) or to
none. Per op, with I_s the indicator of source s at the op's input or output resolution:
    conv      y = sum_s I_s_out * conv(x * I_s_in) * r_s + bias
              r_s = k*k / (positions of source s in the window) for the mixed encoder (partial
              convolution, Liu et al.; padding counts as every source, so a window holding one
              source gives the ordinary convolution), r_s = 1 for the sparse one (SparK)
    max-pool  y = sum_s I_s_out * maxpool(x where I_s_in else -inf)
    BatchNorm statistics per source over the batch (sparse: over visible positions only, as SparK),
              running statistics updated with their count-weighted average
    ReLU, residual add: pointwise
A 1x1 convolution reads one position, which has the output's source, so it runs as it is.
Positions of no source (the sparse encoder's hidden patches) stay exactly 0 through the network.
So the features of source s are a function of the input at source s alone, exactly: the other
source enters only multiplied by 0 or selected away. The cost: the 3x3 (and 7x7 stem) convolutions
of the mixed encoder run on two copies of their input, one per source.
The mask must be at least as coarse as the encoder's stride (patch a multiple of 32 for an
ImageNet-stem ResNet, 8 for the small stem), so that every feature position has one source.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


# ---- geometry --------------------------------------------------------------------------------------

def stem_stride(backbone: ResNet) -> int:
    """Stride of conv1 + max-pool: 4 for the ImageNet stem, 1 for the small (CIFAR-style) stem."""
    pool = 1 if isinstance(backbone.maxpool, nn.Identity) else _int(backbone.maxpool.stride)
    return _int(backbone.conv1.stride) * pool


def encoder_stride(backbone: ResNet) -> int:
    """Stride of the last stage's features: 32 (ImageNet stem) or 8 (small stem)."""
    return stem_stride(backbone) * 8


def _int(v) -> int:
    return v[0] if isinstance(v, (tuple, list)) else int(v)


def expand_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, h, w) cell mask -> (N, height, width): each cell an (height/h) x (width/w) block."""
    n, h, w = mask.shape
    if height % h or width % w or height < h or width < w:
        raise ValueError(f"a {h}x{w} patch mask does not tile a {height}x{width} feature map: the patch "
                         f"must be a multiple of the encoder's stride at this resolution")
    fh, fw = height // h, width // w
    return mask[:, :, None, :, None].expand(n, h, fh, w, fw).reshape(n, height, width)


def stem(backbone: ResNet, x: torch.Tensor) -> torch.Tensor:
    return backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))


def stages(backbone: ResNet, h: torch.Tensor) -> torch.Tensor:
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        h = layer(h)
    return h


# ---- SimMIM: a mask token after the stem -----------------------------------------------------------

FILLS = ("none", "zero", "mean")


def fill_masked(x: torch.Tensor, mask: torch.Tensor, fill: str) -> torch.Tensor:
    """x (N, C, H, W) normalised pixels with the masked patches' pixels replaced, mask (N, h, w).

    none: unchanged (SimMIM / openmixup on ResNet: the stem reads across the patch border).
    zero: 0, the dataset mean colour after normalisation.
    mean: each image's per-channel mean over its visible pixels (A2MIM fills with the image mean;
          over the visible pixels only, so that the fill carries nothing of the masked ones)."""
    if fill == "none":
        return x
    px = expand_mask(mask, x.shape[2], x.shape[3])[:, None]                 # (N, 1, H, W)
    if fill == "zero":
        return x.masked_fill(px, 0.0)
    if fill != "mean":
        raise ValueError(f"fill {fill!r} is not one of {', '.join(FILLS)}")
    vis = (~px).to(x.dtype)
    mean = (x * vis).sum((2, 3), keepdim=True) / vis.sum((2, 3), keepdim=True).clamp_min(1.0)   # (N, C, 1, 1)
    return torch.where(px, mean, x)


class MaskTokenEncoder(nn.Module):
    """SimMIM on ResNet: one learnable token (C_stem,) replaces the stem output at masked positions.

    fill (FILLS) sets the masked pixels before the stem. With "none" a visible stem output whose
    receptive field crosses a patch border reads masked pixels, which the loss then scores; with
    "zero" or "mean" every feature is a function of the visible pixels alone (the stem's border
    outputs read the fill; the token replaces the rest)."""
    no_weight_decay = ("token",)                             # masksiam.optim.param_groups

    def __init__(self, backbone: ResNet, fill: str = "none"):
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"fill {fill!r} is not one of {', '.join(FILLS)}")
        self.fill = fill
        self.token = nn.Parameter(torch.zeros(1, backbone.bn1.num_features, 1, 1))
        nn.init.trunc_normal_(self.token, std=0.02)          # SimMIM's mask-token init

    def tokenized_stem(self, backbone: ResNet, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W), mask (N, h, w) -> stem output (N, C, H/4, W/4), the token where masked."""
        s = stem(backbone, fill_masked(x, mask, self.fill))
        m = expand_mask(mask, s.shape[2], s.shape[3])[:, None]
        return torch.where(m, self.token.to(s.dtype), s)

    def forward(self, backbone: ResNet, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return stages(backbone, self.tokenized_stem(backbone, x, mask))


# ---- masked dense / mixed partial convolution ------------------------------------------------------

class SourceBatchNorm(torch.autograd.Function):
    """BatchNorm in train mode with statistics per source, saving for backward only its input.

    x (N, C, H, W); ind (S, N, 1, H, W) float 0/1, the source of each position (the encoder's cached
    indicator, shared by every layer of that size); weight, bias (C,). Per source s, over its
    positions P_s (count M_s): mean_s, biased var_s, r_s = rsqrt(var_s + eps);
        y = w (x - mean_s) r_s + b        at positions of source s, 0 at positions of no source.
    Backward, with xhat = (x - mean_s) r_s (recomputed from x):
        dx = w r_s (dy - mean_Ps(dy) - xhat mean_Ps(dy xhat)),  dw = sum dy xhat,  db = sum dy.
    Autograd through the elementwise forward would keep ~6 full-size fp32 tensors per layer (the
    (S, N, C, H, W) centred input and its square, the per-position scale and shift, the fp32
    input); this keeps x and (S, C) statistics. Returns y (x's dtype) and the (S, C) mean and
    biased var, for the running statistics."""

    @staticmethod
    def forward(ctx, x, ind, weight, bias, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))                  # bf16 / fp16 -> fp32
        count = ind.sum((1, 3, 4)).clamp_min(1.0)                               # (S, 1)
        mean = (xf[None] * ind).sum((1, 3, 4)) / count                           # (S, C)
        var = (((xf[None] - mean[:, None, :, None, None]) ** 2) * ind).sum((1, 3, 4)) / count
        rstd = torch.rsqrt(var + eps)
        scale = weight.to(xf.dtype) * rstd                                        # (S, C)
        shift = bias.to(xf.dtype) - mean * scale
        # per position: its source's scale and shift (0 where no source)
        pos_scale = (ind * scale[:, None, :, None, None]).sum(0)                  # (N, C, H, W)
        pos_shift = (ind * shift[:, None, :, None, None]).sum(0)
        y = torch.addcmul(pos_shift, xf, pos_scale).to(x.dtype)
        ctx.save_for_backward(x, ind, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, ind, weight, mean, rstd = ctx.saved_tensors
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        dyf = dy.to(xf.dtype)
        count = ind.sum((1, 3, 4)).clamp_min(1.0)                               # (S, 1)

        def per_position(v):                                                     # (S, C) -> (N, C, H, W)
            return (ind * v[:, None, :, None, None]).sum(0)

        pos_rstd = per_position(rstd)                                             # 0 where no source
        xhat = (xf - per_position(mean)) * pos_rstd
        sum_dy = (dyf[None] * ind).sum((1, 3, 4))                                 # (S, C)
        sum_dy_xhat = ((dyf * xhat)[None] * ind).sum((1, 3, 4))
        dx = (pos_rstd * weight.to(xf.dtype)[None, :, None, None]) * (
            dyf - per_position(sum_dy / count) - xhat * per_position(sum_dy_xhat / count))
        dw, db = sum_dy_xhat.sum(0), sum_dy.sum(0)
        return dx.to(x.dtype), None, dw.to(weight.dtype), db.to(weight.dtype), None



class SourceEncoder:
    """A ResNet forward in which each position computes from positions of its own source only.

    cells (N, h, w) int64: the source of each mask cell, -1 = none (hidden from the encoder).
    renorm: partial-convolution renormalisation (mixed) or none (sparse). Built per batch; it holds
    the per-resolution indicators, no parameters (the backbone's BatchNorm modules keep the running
    statistics).
    """

    def __init__(self, cells: torch.Tensor, sources: int, renorm: bool):
        self.cells, self.sources, self.renorm = cells, sources, renorm
        self._ind: dict[tuple, torch.Tensor] = {}
        self._ratio: dict[tuple, torch.Tensor] = {}

    @classmethod
    def sparse(cls, mask: torch.Tensor) -> "SourceEncoder":
        """SparK's masked dense convolution: mask (N, h, w) True = hidden; one source, the visible cells."""
        return cls(torch.where(mask, -1, 0), 1, renorm=False)

    @classmethod
    def mixed(cls, mask: torch.Tensor) -> "SourceEncoder":
        """MixMAE: mask (N, h, w) True = the cell comes from the other image (source 1), else source 0."""
        return cls(mask.long(), 2, renorm=True)

    def indicator(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """(S, N, 1, height, width) 0/1 in `dtype`: position (y, x) belongs to source s."""
        key = (height, width, dtype)
        if key not in self._ind:
            ids = torch.arange(self.sources, device=self.cells.device).view(-1, 1, 1, 1)
            cells = expand_mask(self.cells, height, width)                      # (N, H, W)
            self._ind[key] = (cells[None] == ids).to(dtype)[:, :, None]
        return self._ind[key]

    def _present(self, x: torch.Tensor) -> torch.Tensor:
        """x with the positions of no source set to 0 (a no-op for the mixed encoder)."""
        if self.sources == 2:
            return x
        return x * self.indicator(x.shape[2], x.shape[3], x.dtype)[0]

    # -- ops --------------------------------------------------------------------------------------

    def conv(self, m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        k = m.kernel_size
        if k == (1, 1) or not self.renorm:
            # 1x1: one input position, of the output's source. Sparse: inputs of no source are 0
            # already; the output is re-masked (a window reaches across a hidden patch's border)
            stride = m.stride
            if k == (1, 1) and stride != (1, 1) and x.device.type == "cpu":
                # every s-th pixel at stride 1: the same values, without torch's CPU crash in the
                # strided 1x1 backward (models.resnet.SubsampledConv1x1)
                x, stride = x[:, :, ::stride[0], ::stride[1]], (1, 1)
            y = F.conv2d(x, m.weight, None, stride, m.padding, m.dilation, m.groups)
            y = self._present(y)
            return y if m.bias is None else self._present(y + m.bias.view(1, -1, 1, 1))
        n, c, h, w = x.shape
        ind_in = self.indicator(h, w, x.dtype)                                   # (S, N, 1, H, W)
        xs = (x[None] * ind_in).flatten(0, 1)                                    # (S*N, C, H, W)
        ys = F.conv2d(xs, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
        ys = ys.unflatten(0, (self.sources, n))                                  # (S, N, C', h, w)
        ratio = self._window_ratio(m, h, w, x.dtype)                             # (S, N, 1, h, w)
        ind_out = self.indicator(ys.shape[3], ys.shape[4], x.dtype)
        y = (ys * (ratio * ind_out)).sum(0)
        return y if m.bias is None else y + m.bias.view(1, -1, 1, 1)

    def _window_ratio(self, m: nn.Conv2d, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """k*k / (positions of each source in each window), padding counted as every source."""
        key = (m.kernel_size, m.stride, m.padding, m.dilation, h, w, dtype)
        if key not in self._ratio:
            ind = self.indicator(h, w, torch.float32).flatten(0, 1)              # (S*N, 1, H, W)
            ph, pw = m.padding
            ind = F.pad(ind, (pw, pw, ph, ph), value=1.0)
            ones = torch.ones(1, 1, *m.kernel_size, device=ind.device)
            count = F.conv2d(ind, ones, None, m.stride, 0, m.dilation)
            ratio = (m.kernel_size[0] * m.kernel_size[1]) / count.clamp_min(1.0)
            self._ratio[key] = ratio.unflatten(0, (self.sources, -1)).to(dtype)
        return self._ratio[key]

    def maxpool(self, m: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ind_in = self.indicator(h, w, x.dtype).bool()
        xs = torch.where(ind_in, x[None], float("-inf")).flatten(0, 1)
        ys = F.max_pool2d(xs, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        ys = ys.unflatten(0, (self.sources, n))
        ind_out = self.indicator(ys.shape[3], ys.shape[4], x.dtype).bool()
        return torch.where(ind_out, ys, 0.0).sum(0)

    def batchnorm(self, m: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm with statistics per source over the batch; positions of no source stay 0."""
        if not (m.training or m.running_mean is None):
            y = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            return self._present(y)
        if m.momentum is None:
            raise ValueError("SourceEncoder: BatchNorm with momentum=None (cumulative average) is not supported")
        ind = self.indicator(x.shape[2], x.shape[3], torch.float32)              # (S, N, 1, H, W)
        count = ind.sum((1, 3, 4))                                               # (S, 1)
        weight = m.weight if m.weight is not None else torch.ones(x.shape[1], device=x.device)
        bias = m.bias if m.bias is not None else torch.zeros(x.shape[1], device=x.device)
        y, mean, var = SourceBatchNorm.apply(x, ind, weight, bias, m.eps)
        if m.training and m.track_running_stats:
            with torch.no_grad():
                total = count.sum()
                w = count / total                                                # (S, 1)
                batch_mean = (w * mean).sum(0)
                batch_var = (w * var).sum(0) * total / (total - 1).clamp_min(1.0)  # unbiased
                m.running_mean.lerp_(batch_mean.to(m.running_mean.dtype), m.momentum)
                m.running_var.lerp_(batch_var.to(m.running_var.dtype), m.momentum)
                m.num_batches_tracked.add_(1)
        return y

    def block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(blk, Bottleneck):
            out = F.relu(self.batchnorm(blk.bn1, self.conv(blk.conv1, x)))
            out = F.relu(self.batchnorm(blk.bn2, self.conv(blk.conv2, out)))
            out = self.batchnorm(blk.bn3, self.conv(blk.conv3, out))
        elif isinstance(blk, BasicBlock):
            out = F.relu(self.batchnorm(blk.bn1, self.conv(blk.conv1, x)))
            out = self.batchnorm(blk.bn2, self.conv(blk.conv2, out))
        else:
            raise TypeError(f"SourceEncoder: unsupported block {type(blk).__name__}")
        identity = x
        if blk.downsample is not None:
            conv, bn = blk.downsample                    # torchvision: Sequential(conv1x1, BatchNorm)
            identity = self.batchnorm(bn, self.conv(conv, x))
        return F.relu(out + identity)

    def __call__(self, backbone: ResNet, x: torch.Tensor) -> torch.Tensor:
        """x (N, 3, H, W) -> stride-32 (or 8) features (N, F, H/s, W/s)."""
        h = F.relu(self.batchnorm(backbone.bn1, self.conv(backbone.conv1, self._present(x))))
        if not isinstance(backbone.maxpool, nn.Identity):
            h = self.maxpool(backbone.maxpool, h)
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
            h_in = h
            for blk in layer:
                h = self.block(blk, h)
            # the stage ran block by block, not through its own forward: its forward hooks (the
            # loop's online probe on layer4) get the output they would have seen
            for hook in layer._forward_hooks.values():
                hook(layer, (h_in,), h)
        return h

    def pool(self, f: torch.Tensor) -> torch.Tensor:
        """(N, F, h, w) -> (S, N, F): the mean feature of each source's positions in each image."""
        ind = self.indicator(f.shape[2], f.shape[3], f.dtype)                  # (S, N, 1, h, w)
        total = (f[None] * ind).sum((3, 4))
        return total / ind.sum((3, 4)).clamp_min(1.0)


# ---- decoder -----------------------------------------------------------------------------------------

class PixelDecoder(nn.Module):
    """Stride-s features (N, C, h, w) -> pixels (N, 3, h*s, w*s), pixel-shuffled.

    depth 0: SimMIM's linear head, a 1x1 conv to s*s*3 values per position. depth > 0: a 1x1 conv to
    `dim` channels, a learnable mask token at the `hide` positions, `depth` 3x3 conv-BN-ReLU blocks
    (they carry the visible neighbours' features into hidden positions, which the sparse and mixed
    encoders leave without any), then the 1x1 head.
    """
    no_weight_decay = ("token",)                             # masksiam.optim.param_groups

    def __init__(self, in_channels: int, stride: int, depth: int = 0, dim: int = 512, mask_token: bool = True):
        super().__init__()
        self.depth = depth
        out = stride * stride * 3
        if depth == 0:
            self.embed, self.token, self.blocks = None, None, None
            self.head = nn.Conv2d(in_channels, out, 1)
        else:
            self.embed = nn.Conv2d(in_channels, dim, 1)
            # no token when nothing is hidden from it (SimMIM's dense encoder): DDP wants every
            # parameter to get a gradient
            self.token = nn.Parameter(torch.zeros(1, dim, 1, 1)) if mask_token else None
            if mask_token:
                nn.init.trunc_normal_(self.token, std=0.02)
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Conv2d(dim, dim, 3, 1, 1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
            self.blocks = nn.Sequential(*layers)
            self.head = nn.Conv2d(dim, out, 1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, f: torch.Tensor, hide: Optional[torch.Tensor] = None) -> torch.Tensor:
        """f (N, C, h, w); hide (N, h, w) bool or None -> (N, 3, h*s, w*s)."""
        if self.embed is None:
            if hide is not None:
                raise ValueError("PixelDecoder: a depth-0 (linear) head has no mask token and no context; "
                                 "set decoder_depth >= 1")
            return self.shuffle(self.head(f))
        e = self.embed(f)
        if hide is not None:
            if self.token is None:
                raise ValueError("PixelDecoder: built without a mask token, asked to hide positions")
            e = torch.where(hide[:, None], self.token.to(e.dtype), e)
        return self.shuffle(self.head(self.blocks(e)))
