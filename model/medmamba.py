"""MedMamba (Yue & Li, arXiv 2403.03849) and MedMambaSE, in 2D and in 3D, in pure PyTorch.

Spec: docs/spec/MEDMAMBA.md (built from that description; no code of the originals is used). Both models
are a VSSM backbone: a patch embedding, stages of blocks with patch merging between them, global average pooling
and a linear head. The blocks:

- SS-Conv-SSM (MedMamba): the channels are split in two halves; the right half goes through LayerNorm and SS2D
  (the selective-scan mixer), the left half through a convolution branch; the halves are concatenated, shuffled
  (channel 2i from the convolutions, 2i+1 from the SSM) and added to the input, the block's only residual.
- ConvSSM + SE (MedMambaSE): the SSM half keeps its own residual, the convolution half has no leading BN and no
  trailing ReLU; the concatenation is scaled by a squeeze-and-excitation gate and mixed by a 1x1 convolution, then
  added to the input. No shuffle.

SS2D scans the feature map in K = 4 raster orders (row- and column-major, each reversed), each with its own
projections, and sums the K outputs (`model/selective_scan.py`). The 3D extension SS3D (this project's) scans
volumes in K = 6 orders (the D-H-W, H-W-D and W-D-H rasters, each reversed) with a depthwise 3x3x3 convolution.

Differences from the original code (documented options where they matter): no `mamba_ssm` CUDA extension (the
scan is `model/selective_scan.py`, which uses `mamba_ssm` on CUDA only if it is installed); patch merging pads an
odd side to even with zeros instead of cropping it; 3D is new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model.registry import register_model
from model.selective_scan import ORDERS_2D, ORDERS_3D, cross_merge, cross_scan, selective_scan

# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's branch with probability p and scale the rest by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


def _bn(dims: int):
    return nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d


def to_channels_first(x):  # (B, *S, C) -> (B, C, *S)
    return x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


def to_channels_last(x):  # (B, C, *S) -> (B, *S, C)
    return x.permute(0, *range(2, x.dim()), 1)


# ----------------------------------------------------------------------------------------------------------
# SS2D / SS3D
# ----------------------------------------------------------------------------------------------------------


class SSND(nn.Module):
    """The selective-scan mixer on a channels-last map (B, *S, d_model): SS2D (dims 2, K = 4), SS3D (dims 3, K = 6)."""

    def __init__(self, d_model: int, *, dims: int = 2, d_state: int = 16, scan: str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        super().__init__()
        self.dims, self.scan = dims, scan
        self.orders = ORDERS_2D if dims == 2 else ORDERS_3D
        K = 2 * len(self.orders)
        d_inner, rank = 2 * d_model, math.ceil(d_model / 16)
        self.d_inner, self.rank, self.d_state = d_inner, rank, d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = _conv(dims)(d_inner, d_inner, 3, padding=1, groups=d_inner)
        # per direction: x -> (dt, B, C), dt -> delta (own weights per direction, stacked on a K axis)
        bound = d_inner ** -0.5
        self.x_proj_weight = nn.Parameter(torch.empty(K, rank + 2 * d_state, d_inner).uniform_(-bound, bound))
        self.dt_proj_weight = nn.Parameter(torch.empty(K, d_inner, rank).uniform_(-rank ** -0.5, rank ** -0.5))
        dt = torch.exp(torch.rand(K, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K, d_inner, 1))
        self.D = nn.Parameter(torch.ones(K, d_inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x):
        spatial = x.shape[1:-1]
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, *S, d_inner) each
        x = F.silu(self.conv(to_channels_first(x)))  # (B, d_inner, *S)
        xs = cross_scan(x, self.orders)  # (B, K, d_inner, L)
        proj = torch.einsum("bkdl,krd->bkrl", xs, self.x_proj_weight)  # (B, K, r + 2N, L)
        dt, B, C = proj.split([self.rank, self.d_state, self.d_state], dim=2)
        delta = torch.einsum("bkrl,kdr->bkdl", dt, self.dt_proj_weight)  # (B, K, d_inner, L)
        y = selective_scan(xs.float(), delta.float(), -torch.exp(self.A_log.float()), B.float(), C.float(),
                           self.D.float(), delta_bias=self.dt_proj_bias.float(), delta_softplus=True,
                           method=self.scan)  # (B, K, d_inner, L), fp32
        y = to_channels_last(cross_merge(y.to(x.dtype), spatial, self.orders))  # (B, *S, d_inner), K summed
        return self.out_proj(self.out_norm(y) * F.silu(z))


# ----------------------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------------------


class _SplitBlock(nn.Module):
    """What both blocks share: the SSM half's LayerNorm, SS2D/SS3D and stochastic depth."""

    def __init__(self, dim: int, dims: int, d_state: int, drop_path: float, scan: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim // 2)
        self.ssm = SSND(dim // 2, dims=dims, d_state=d_state, scan=scan)
        self.drop_path = DropPath(drop_path)


class SSConvSSM(_SplitBlock):
    """MedMamba's block: conv half and SSM half, concatenated, channel-shuffled, plus the input."""

    def __init__(self, dim: int, *, dims: int = 2, d_state: int = 16, drop_path: float = 0.0, scan: str = "auto"):
        super().__init__(dim, dims, d_state, drop_path, scan)
        half = dim // 2
        Conv, BN = _conv(dims), _bn(dims)
        self.conv = nn.Sequential(BN(half), Conv(half, half, 3, padding=1), BN(half), nn.ReLU(),
                                  Conv(half, half, 3, padding=1), BN(half), nn.ReLU(), Conv(half, half, 1), nn.ReLU())

    def forward(self, x):  # (B, *S, C)
        left, right = x.chunk(2, dim=-1)
        right = self.drop_path(self.ssm(self.norm(right)))
        left = to_channels_last(self.conv(to_channels_first(left)))
        y = torch.stack([left, right], dim=-1).flatten(-2)  # shuffle: channel 2i = conv i, 2i + 1 = SSM i
        return y + x


class ConvSSMSE(_SplitBlock):
    """MedMambaSE's block: SSM half with its own residual, conv half, SE gate, 1x1 convolution, plus the input."""

    def __init__(self, dim: int, *, dims: int = 2, d_state: int = 16, drop_path: float = 0.0, scan: str = "auto",
                 reduction: int = 16):
        super().__init__(dim, dims, d_state, drop_path, scan)
        half = dim // 2
        Conv, BN = _conv(dims), _bn(dims)
        self.conv = nn.Sequential(Conv(half, half, 3, padding=1), BN(half), nn.ReLU(),
                                  Conv(half, half, 3, padding=1), BN(half), nn.ReLU(), Conv(half, half, 1))
        hidden = max(1, dim // reduction)
        self.se = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(),
                                nn.Linear(hidden, dim, bias=False), nn.Sigmoid())
        self.mix = Conv(dim, dim, 1)

    def forward(self, x):  # (B, *S, C)
        left, right = x.chunk(2, dim=-1)
        right = right + self.drop_path(self.ssm(self.norm(right)))
        y = torch.cat([self.conv(to_channels_first(left)), to_channels_first(right)], dim=1)  # (B, C, *S)
        gate = self.se(y.flatten(2).mean(-1))  # (B, C)
        y = y * gate.view(*gate.shape, *(1,) * (y.dim() - 2))
        return to_channels_last(self.mix(y)) + x


# ----------------------------------------------------------------------------------------------------------
# backbone
# ----------------------------------------------------------------------------------------------------------


class PatchMerging(nn.Module):
    """Gather each 2^dims neighbourhood into one token: LayerNorm(2^dims C), Linear(-> 2C, no bias). An odd side is
    padded with zeros to even (the original crops it)."""

    def __init__(self, dim: int, dims: int = 2):
        super().__init__()
        self.dims = dims
        self.norm = nn.LayerNorm(2 ** dims * dim)
        self.reduction = nn.Linear(2 ** dims * dim, 2 * dim, bias=False)

    def forward(self, x):  # (B, *S, C)
        pad = []
        for side in reversed(x.shape[1:-1]):  # F.pad lists the last axis first; C is not padded
            pad += [0, side % 2]
        x = F.pad(x, [0, 0, *pad])
        if self.dims == 2:
            parts = [x[:, i::2, j::2] for j in (0, 1) for i in (0, 1)]
        else:
            parts = [x[:, i::2, j::2, k::2] for k in (0, 1) for j in (0, 1) for i in (0, 1)]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


class VSSM(nn.Module):
    """Patch embedding, stages of `block` (patch merging between them), average pooling and a linear head."""

    def __init__(self, *, block, dims: int, in_channels: int, num_classes: int, patch_size: int, depths, widths,
                 d_state: int = 16, drop_path_rate: float = 0.1, scan: str = "auto"):
        super().__init__()
        if len(depths) != len(widths):
            raise ValueError(f"depths {list(depths)} and widths {list(widths)} must have the same length")
        if any(w % 2 or w < 2 for w in widths):
            raise ValueError(f"widths {list(widths)} must be even (a block splits its channels in two halves)")
        if any(w != 2 * v for v, w in zip(widths, widths[1:])):
            raise ValueError(f"widths {list(widths)}: each stage must double the previous (patch merging C -> 2C)")
        self.dims = dims
        self.patch_embed = _conv(dims)(in_channels, widths[0], patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(widths[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i, (depth, width) in enumerate(zip(depths, widths)):
            layers = [block(width, dims=dims, d_state=d_state, drop_path=rates[start + j], scan=scan)
                      for j in range(depth)]
            if i < len(depths) - 1:
                layers.append(PatchMerging(width, dims))
            self.stages.append(nn.Sequential(*layers))
            start += depth
        self.head = nn.Linear(widths[-1], num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):  # (B, C, H, W) or (B, C, D, H, W)
        if x.dim() != self.dims + 2:
            raise ValueError(f"this {self.dims}-D model takes (B, C{', D' if self.dims == 3 else ''}, H, W) inputs, "
                             f"got shape {tuple(x.shape)}")
        x = self.patch_norm(to_channels_last(self.patch_embed(x)))  # (B, *S, C1)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.flatten(1, -2).mean(1))  # average over the spatial positions


# ----------------------------------------------------------------------------------------------------------
# registered variants
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MedMambaConfig:
    depths: Optional[list[int]] = field(default=None, metadata={
        "help": "blocks per stage; null = the variant's (T [2,2,4,2], S [2,2,8,2], B [2,2,12,2], SE [2,2,2,2]; "
                "3D [2,2,4], SE 3D [2,2,2])"})
    widths: Optional[list[int]] = field(default=None, metadata={
        "help": "channels per stage, each twice the previous; null = the variant's ([96,192,384,768], B "
                "[128,256,512,1024]; 3D [48,96,192])"})
    patch_size: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "patch embedding kernel = stride; null = 4, or 2 for a 2-D 28x28 input (14 -> 7 -> 4 -> 2 "
                          "tokens per side; with 4 the last stage would have none)"})
    d_state: int = field(default=16, metadata={"min": 1, "max": 256, "help": "SSM state size N"})
    drop_path_rate: float = field(default=0.1, metadata={
        "min": 0.0, "max": 0.99, "help": "stochastic depth, rising linearly over the blocks to this rate"})
    scan: str = field(default="auto", metadata={
        "choices": ["auto", "sequential", "chunked"],
        "help": "selective scan form (model/selective_scan.py): auto = sequential on CPU, chunked (or mamba_ssm "
                "if installed) on CUDA; all give the same numbers"})


VARIANTS = {  # name: (dims, block, depths, widths, help)
    "medmamba_t": (2, SSConvSSM, [2, 2, 4, 2], [96, 192, 384, 768], "MedMamba-T (2-D), 14.46 M parameters at 224², 6 classes"),
    "medmamba_s": (2, SSConvSSM, [2, 2, 8, 2], [96, 192, 384, 768], "MedMamba-S (2-D), 18.63 M parameters at 224², 6 classes"),
    "medmamba_b": (2, SSConvSSM, [2, 2, 12, 2], [128, 256, 512, 1024], "MedMamba-B (2-D), 39.86 M parameters at 224², 6 classes"),
    "medmambase": (2, ConvSSMSE, [2, 2, 2, 2], [96, 192, 384, 768], "MedMambaSE (2-D), 14.14 M parameters at 224², 6 classes"),
    "medmamba3d": (3, SSConvSSM, [2, 2, 4], [48, 96, 192], "MedMamba 3-D (SS3D, K = 6), 3 stages, 3.21 M parameters (1 channel, 2 classes)"),
    "medmambase3d": (3, ConvSSMSE, [2, 2, 2], [48, 96, 192], "MedMambaSE 3-D (SS3D, K = 6), 3 stages, 2.04 M parameters (1 channel, 2 classes)"),
}


def _register(name: str):
    dims, block, depths, widths, text = VARIANTS[name]

    def build(cfg: MedMambaConfig, *, in_channels: int, num_classes: int, input_size: int) -> nn.Module:
        patch = cfg.patch_size or (2 if dims == 2 and input_size <= 32 else 4)
        return VSSM(block=block, dims=dims, in_channels=in_channels, num_classes=num_classes, patch_size=patch,
                    depths=cfg.depths or depths, widths=cfg.widths or widths, d_state=cfg.d_state,
                    drop_path_rate=cfg.drop_path_rate, scan=cfg.scan)

    build.__name__ = build.__qualname__ = f"build_{name}"
    register_model(name, MedMambaConfig, help=text, dims=dims)(build)


for _name in VARIANTS:
    _register(_name)
