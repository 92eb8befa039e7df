"""Stems: a volume (B, C, S, S, S) -> per-step input tokens (B, T, n, D) (docs/spec/LMTTM.md §1).

Axis 2 of the input (the depth axis of a MedMNIST volume) becomes time: with the default patch of 3 a
28³ volume gives T = 9 steps of n = 9 × 9 = 81 tokens, each token a 3 × 3 × 3 patch (the 28th slice, row
and column are dropped, as in the original). `depth_patch_size = 1` gives the paper's "28 frames" reading:
T = 28 steps of 81 tokens, each a 1 × 3 × 3 patch.
"""

from __future__ import annotations

from einops import rearrange
from torch import nn


class Stem3d(nn.Module):
    """Conv3d(C -> D, kernel = stride = patch) + ReLU: the original `3d` stem."""

    def __init__(self, *, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        x = self.conv(x).relu()  # (B, D, T, h, w)
        return rearrange(x, "b d t h w -> b t (h w) d").contiguous()  # contiguous: D is the per-token axis


class Stem3dBN(nn.Module):
    """Conv3d(C -> 64, kernel = stride = patch) -> BN -> ReLU -> Conv3d(64 -> D, 3, same) -> BN -> ReLU."""

    def __init__(self, *, in_channels: int, dim: int, patch: tuple[int, int, int], hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, hidden, kernel_size=patch, stride=patch), nn.BatchNorm3d(hidden), nn.ReLU(),
            nn.Conv3d(hidden, dim, kernel_size=3, padding=1), nn.BatchNorm3d(dim), nn.ReLU())

    def forward(self, x):
        return rearrange(self.net(x), "b d t h w -> b t (h w) d").contiguous()


STEMS = {"3d": Stem3d, "3dBN": Stem3dBN}


def build_stem(name: str, *, in_channels: int, dim: int, patch: tuple[int, int, int]) -> nn.Module:
    if name not in STEMS:
        raise ValueError(f"unknown stem {name!r}; choose one of {sorted(STEMS)}")
    return STEMS[name](in_channels=in_channels, dim=dim, patch=patch)


def steps_and_tokens(input_size: int, patch: tuple[int, int, int]) -> tuple[int, int]:
    """(T, n) for a cubic input of side `input_size`; the remainder that a patch does not cover is dropped."""
    pd, ph, pw = patch
    if input_size < max(patch):
        raise ValueError(f"input size {input_size} is smaller than one patch {patch}")
    return input_size // pd, (input_size // ph) * (input_size // pw)
