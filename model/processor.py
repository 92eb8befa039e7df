"""Processors (the paper's MAFA unit, docs/spec/LMTTM.md §5): read tokens (B, R, D) -> output tokens (B, R, D).

Each processor runs one block `repeats` times with the same weights, as the original code does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerProcessor(nn.Module):
    """One post-norm encoder layer (ReLU, feed-forward 3D) applied `repeats` times (weight sharing).

    `batch_attention=True` reproduces the original code's defect (spec §9.1): its sequence-first layer was
    fed batch-first tensors, so the samples of a batch attend to each other and a sample's tokens do not.
    """

    def __init__(self, *, dim: int, num_tokens: int, heads: int, dropout: float, repeats: int,
                 batch_attention: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim = {dim} must be divisible by heads = {heads}")
        self.layer = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=3 * dim, dropout=dropout,
                                                activation="relu", batch_first=True, norm_first=False)
        self.repeats = repeats
        self.batch_attention = batch_attention

    #: with gradients, run the layer by `block` (same maths and random draws as the layer's own forward,
    #: less per-call overhead); False always calls `self.layer` (tests compare them)
    fast_path = True

    def block(self, x):
        """`self.layer(x)` written out (post-norm), without `nn.MultiheadAttention`'s argument handling."""
        layer, attn = self.layer, self.layer.self_attn
        batch, tokens, dim = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(batch, tokens, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D / H) each
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        # token-major (N, B, D) as nn.MultiheadAttention lays it out, so that dropout1 draws its mask in the
        # same memory order (same random draws)
        a = attn.out_proj(a.permute(2, 0, 1, 3).reshape(tokens, batch, dim)).transpose(0, 1)
        x = layer.norm1(x + layer.dropout1(a))
        ff = layer.linear2(layer.dropout(F.relu(layer.linear1(x))))
        return layer.norm2(x + layer.dropout2(ff))

    def forward(self, x):
        if self.batch_attention:
            x = x.transpose(0, 1)  # (R, B, D): the batch axis becomes the attended sequence
        # the layer's fused inference kernel when no gradient is needed; else the written-out block
        step = self.block if self.fast_path and torch.is_grad_enabled() else self.layer
        for _ in range(self.repeats):
            x = step(x)
        return x.transpose(0, 1) if self.batch_attention else x


class MLPProcessor(nn.Module):
    """`repeats` × [shared LayerNorm -> (LN, Linear D->3D, Dropout, GELU, Linear 3D->D, GELU, Dropout)], then
    the shared LayerNorm; no residual, as in the original."""

    def __init__(self, *, dim: int, num_tokens: int, heads: int, dropout: float, repeats: int,
                 batch_attention: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Dropout(dropout), nn.GELU(),
                                   nn.Linear(3 * dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.repeats = repeats

    def forward(self, x):
        for _ in range(self.repeats):
            x = self.block(self.norm(x))
        return self.norm(x)


class MixerProcessor(nn.Module):
    """MLP-Mixer block applied `repeats` times, then LayerNorm.

    Token mixing acts over the processor's own token count (hidden 6 × tokens) and channel mixing over D
    (hidden 3D), with the standard Mixer residuals x += token(norm(x)); x += channel(norm(x)). Kept from the
    original: the hidden sizes, the GELU after each MLP and one LayerNorm shared by both mixings. Changed:
    the original sized token mixing for 8 tokens (it breaks LMTTM's 24; here it follows `num_tokens`) and
    added its channel residual to the block input instead of the token-mixed tensor.
    """

    def __init__(self, *, dim: int, num_tokens: int, heads: int, dropout: float, repeats: int,
                 batch_attention: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.token_mixing = nn.Sequential(nn.Linear(num_tokens, 6 * num_tokens), nn.GELU(), nn.Dropout(dropout),
                                          nn.Linear(6 * num_tokens, num_tokens), nn.GELU())
        self.channel_mixing = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Dropout(dropout),
                                            nn.Linear(3 * dim, dim), nn.GELU())
        self.dropout = nn.Dropout(dropout)
        self.repeats = repeats

    def forward(self, x):
        for _ in range(self.repeats):
            x = x + self.dropout(self.token_mixing(self.norm(x).transpose(1, 2)).transpose(1, 2))  # (B, R, D)
            x = x + self.dropout(self.channel_mixing(self.norm(x)))
        return self.norm(x)


from model.memory_attention import TransformerMAMProcessor  # noqa: E402

PROCESSORS = {"transformer": TransformerProcessor, "mlp": MLPProcessor, "mixer": MixerProcessor,
              "transformer_mam": TransformerMAMProcessor}


def build_processor(name: str, **kwargs) -> nn.Module:
    if name not in PROCESSORS:
        raise ValueError(f"unknown processor {name!r}; choose one of {sorted(PROCESSORS)}")
    return PROCESSORS[name](**kwargs)


