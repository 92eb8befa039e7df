"""A 3D Vision Transformer classifier with Memory-Attention (MAM): the registered model `vit_mam`.

Spec docs/spec/MAM.md §3.2-3 (our adaptation; the original MAM is segmentation only):

    patch embedding Conv3d k = s = `patch`     28³ -> 7³ = 343 tokens, 64³ -> 16³ (patch 4)
    + learned positional embedding (N(0, 0.02²)), dropout
    `depth` pre-norm encoder blocks  x += Attn(LN(x)); x += MLP(LN(x))   (MLP: D -> ratio·D, GELU, -> D)
    final LayerNorm, mean over the tokens (or a class token), linear head

`mam` chooses the attention: `sts` (default) threads one MAM memory through all blocks (model/memory_attention.py),
`none` is the plain ViT with the same parameters (the ablation baseline), `ists` resets the memory at every
stage. `stages` > 1 makes the network hierarchical: the blocks are split evenly into stages, and between two
stages a patch merging (Conv3d k = s = 2 on the token grid, zero-padded to an even side, then LayerNorm)
halves the grid and doubles the width; there the memory changes shape, so only `ists` (or `none`) is
accepted (the original's STS "memory merging" adds parameters and is not offered). Attention is global within
each stage: at these token counts (343 at 28³) windows would not save anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from model.memory_attention import MemoryAttention, thread_memory
from model.registry import register_model

__all__ = ["ViTConfig", "ViT3d", "SIZES", "build_vit_mam"]

SIZES = {"tiny": (64, 4, 4), "small": (192, 6, 6), "base": (384, 8, 8)}  # (width, depth, heads)


@dataclass
class ViTConfig:
    mam: str = field(default="sts", metadata={
        "choices": ["none", "sts", "ists"],
        "help": "Memory-Attention: sts = one memory through all blocks, ists = reset at every stage, none = plain ViT"})
    size: str = field(default="small", metadata={
        "choices": list(SIZES),
        "help": "preset (width, depth, heads): tiny 64/4/4, small 192/6/6 (28³), base 384/8/8 (64³)"})
    embed_dim: Optional[int] = field(default=None, metadata={"min": 1, "help": "token width; null = from size"})
    depth: Optional[int] = field(default=None, metadata={"min": 1, "help": "encoder blocks; null = from size"})
    num_heads: Optional[int] = field(default=None, metadata={"min": 1, "help": "attention heads; null = from size"})
    mlp_ratio: float = field(default=4.0, metadata={"min": 0.0, "help": "MLP hidden width / token width"})
    patch: int = field(default=4, metadata={
        "min": 1, "help": "patch embedding kernel = stride; must divide the volume side (28³ -> 7³ tokens)"})
    pool: str = field(default="mean", metadata={"choices": ["mean", "cls"], "help": "mean of the tokens or a class token"})
    drop_rate: float = field(default=0.1, metadata={
        "min": 0.0, "max": 1.0, "help": "dropout after the positional embedding, the attention and the MLP"})
    stages: int = field(default=1, metadata={
        "min": 1, "help": "hierarchical stages (patch merging between them, width x2); > 1 needs mam ists or none"})

    def __post_init__(self):
        if self.mam not in ("none", "sts", "ists"):
            raise ValueError(f"unknown mam {self.mam!r}; choose one of ['none', 'sts', 'ists']")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {list(SIZES)}")
        if self.pool not in ("mean", "cls"):
            raise ValueError(f"unknown pool {self.pool!r}; choose one of ['mean', 'cls']")
        if self.stages > 1 and self.mam == "sts":
            raise ValueError("mam = sts with stages > 1 would need a learned memory resizing between stages "
                             "(not offered); use mam = ists")
        if self.stages > 1 and self.pool == "cls":
            raise ValueError("pool = cls needs stages = 1 (patch merging has no place for a class token)")
        width, depth, heads = self.resolved()
        if width % heads:
            raise ValueError(f"embed_dim = {width} must be divisible by num_heads = {heads}")
        if depth < self.stages:
            raise ValueError(f"depth = {depth} is smaller than stages = {self.stages}")

    def resolved(self) -> tuple[int, int, int]:
        """(width, depth, heads): the explicit keys, else the `size` preset."""
        width, depth, heads = SIZES[self.size]
        return (self.embed_dim or width, self.depth or depth, self.num_heads or heads)


class Block(nn.Module):
    """Pre-norm encoder block whose attention carries the MAM memory: (x, M) -> (x, M')."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop: float):
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MemoryAttention(dim, heads)
        self.drop = nn.Dropout(drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim),
                                 nn.Dropout(drop))

    def forward(self, x, memory=None, *, use_memory: bool = True):
        a, memory = self.attn(self.norm1(x), memory, use_memory=use_memory)
        x = x + self.drop(a)
        return x + self.mlp(self.norm2(x)), memory


class PatchMerging(nn.Module):
    """Tokens on a g³ grid (B, g³, D) -> ((g+1)//2)³ tokens of width 2D: Conv3d k = s = 2 (zero pad), LayerNorm."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.pad = grid % 2
        self.reduce = nn.Conv3d(dim, 2 * dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x):
        b, n, d = x.shape
        g = self.grid
        x = x.transpose(1, 2).reshape(b, d, g, g, g)
        if self.pad:
            x = nn.functional.pad(x, (0, 1, 0, 1, 0, 1))
        return self.norm(self.reduce(x).flatten(2).transpose(1, 2))


class ViT3d(nn.Module):
    def __init__(self, cfg: ViTConfig, *, in_channels: int, num_classes: int, input_size: int):
        super().__init__()
        if input_size % cfg.patch:
            raise ValueError(f"vit_mam: patch = {cfg.patch} must divide the volume side {input_size}")
        width, depth, heads = cfg.resolved()
        self.cfg = cfg
        grid = input_size // cfg.patch
        self.patch_embed = nn.Conv3d(in_channels, width, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, grid ** 3 + (cfg.pool == "cls"), width))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        per_stage = [depth // cfg.stages + (i < depth % cfg.stages) for i in range(cfg.stages)]
        self.stages, self.merges = nn.ModuleList(), nn.ModuleList()
        for i, blocks in enumerate(per_stage):
            if i:
                self.merges.append(PatchMerging(width, grid))
                width, grid = 2 * width, (grid + 1) // 2
            self.stages.append(nn.ModuleList(Block(width, heads, cfg.mlp_ratio, cfg.drop_rate) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear layers N(0, 0.02²) truncated, zero biases; the attention's stacked query/key/value projection
        keeps `nn.MultiheadAttention`'s Xavier-uniform init (at 0.02 the queries are so small that attention
        starts uniform and the MAM memory has no effect early in training)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, MemoryAttention):
                m.reset_parameters()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm(thread_memory(self.stages, x, self.cfg.mam, self.merges))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))


@register_model("vit_mam", ViTConfig,
                help="3D ViT with Memory-Attention (mam sts; mam none = the plain ViT; stages > 1 with mam ists: "
                     "hierarchical); small 2.7 M parameters at 28³")
def build_vit_mam(cfg: ViTConfig, *, in_channels: int, num_classes: int, input_size: int) -> nn.Module:
    return ViT3d(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
