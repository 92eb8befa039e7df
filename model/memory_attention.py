"""Memory-Attention (MAM, docs/spec/MAM.md): self-attention whose queries carry a running memory.

For the l-th attention layer of a chain, with projected queries Q_l (per head, before the 1/sqrt(d) scale):

    M_0 = 0,    Q̃_l = Q_l + M_{l-1},    M_l = Q̃_l        (so M_l = Q_1 + ... + Q_l)

and the attention uses Q̃_l in place of Q_l; keys, values, the output projection and everything else in
the layer are unchanged. There are no new parameters, no gate and no normalisation of the growing sum, and
the memory is not detached. The memory is an explicit input and output of every call (`memory_attention`
returns `(out, memory)`), never hidden module state, so the host decides how it flows:

- **STS** (sequential transmission): one memory through every attention layer of the chain;
- **ISTS** (in-stage transmission): the memory is reset (M = 0) at the start of every stage;
- memory off: the layer is plain multi-head self-attention with the same weights.

`thread_memory` runs stages of blocks with either strategy. Two hosts use this file: the LMTTM/TTM
processor `TransformerMAMProcessor` (STS through the `processor_repeats` weight-tied applications of one
step, reset at every step) and the 3D ViT of `model/vit.py`. The original MAM (CAU-COE-VEICLab
Memory-Attention) is a segmentation method; these classifier hosts are this project's adaptation.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["memory_attention", "MemoryAttention", "thread_memory", "STRATEGIES", "TransformerMAMProcessor"]

STRATEGIES = ("none", "sts", "ists")


def memory_attention(x: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: Optional[torch.Tensor],
                     out_proj_weight: torch.Tensor, out_proj_bias: Optional[torch.Tensor], heads: int,
                     memory: Optional[torch.Tensor] = None, *, use_memory: bool = True,
                     dropout_p: float = 0.0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head self-attention of `x` (B, N, D) with the MAM memory on the queries.

    The weights are laid out as `nn.MultiheadAttention`'s (`in_proj_weight` (3D, D) stacking the query, key
    and value projections; `out_proj` (D, D)). `memory` is M_{l-1}, shaped (B, N, D) like the projected
    queries (the per-head split of D is a view, so this is the per-head memory); None means M_0 = 0.
    Returns the attention output (B, N, D) and M_l = Q + M_{l-1}; with `use_memory=False` the memory is
    neither read nor written (plain attention; returns None). `dropout_p` is the attention-weight dropout
    (pass 0 in evaluation).
    """
    batch, tokens, dim = x.shape
    if dim % heads:
        raise ValueError(f"dim = {dim} must be divisible by heads = {heads}")
    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    if use_memory:
        if memory is not None:
            if memory.shape != q.shape:
                raise ValueError(f"MAM memory of shape {tuple(memory.shape)} does not match the queries "
                                 f"{tuple(q.shape)}")
            q = q + memory
        memory = q
    else:
        memory = None

    def split(t):  # (B, N, D) -> (B, H, N, D / H)
        return t.reshape(batch, tokens, heads, dim // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), dropout_p=dropout_p)
    out = out.transpose(1, 2).reshape(batch, tokens, dim)
    return F.linear(out, out_proj_weight, out_proj_bias), memory


class MemoryAttention(nn.Module):
    """A multi-head self-attention layer with the MAM memory as explicit input and output.

    Parameters are named and initialised as `nn.MultiheadAttention(dim, heads)`'s (`in_proj_weight`,
    `in_proj_bias`, `out_proj.weight`, `out_proj.bias`), so plain-attention weights load unchanged.
    `forward(x, memory=None, use_memory=True) -> (out, memory)`.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim = {dim} must be divisible by heads = {heads}")
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None, *, use_memory: bool = True):
        return memory_attention(x, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                                self.out_proj.bias, self.heads, memory, use_memory=use_memory,
                                dropout_p=self.dropout if self.training else 0.0)


def thread_memory(stages: Iterable[Iterable[nn.Module]], x: torch.Tensor, strategy: str,
                  transitions: Optional[Iterable[nn.Module]] = None) -> torch.Tensor:
    """Run `stages` (lists of blocks `block(x, memory, use_memory=...) -> (x, memory)`) on `x`.

    `strategy`: `sts` carries one memory through every block of every stage; `ists` starts every stage
    from M = 0; `none` switches the memory off (plain attention). `transitions[i]` (optional) maps the
    tokens between stage i and i + 1 (e.g. patch merging); STS across a transition that changes the token
    shape would need a learned memory resizing, which is not offered (use ISTS there).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MAM strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    transitions = list(transitions or [])
    memory = None
    for i, stage in enumerate(stages):
        if i:
            if i - 1 < len(transitions):
                x = transitions[i - 1](x)
            if strategy == "ists":
                memory = None
            elif memory is not None and memory.shape != x.shape:
                raise ValueError("STS needs the memory to keep its shape across stages; this host changes the "
                                 "token shape between stages: use ists")
        for block in stage:
            x, memory = block(x, memory, use_memory=strategy != "none")
    return x


class TransformerMAMProcessor(nn.Module):
    """LMTTM/TTM processor `transformer_mam`: the `transformer` processor with MAM on its queries.

    Holds the same `nn.TransformerEncoderLayer` (post-norm, ReLU, feed-forward 3D, dropout, batch-first)
    under the same name `layer`, so parameter names and count equal the plain processor's and its weights
    load unchanged. The attention is computed from `layer.self_attn`'s weights by `memory_attention`, the
    rest of the post-norm layer from `layer`'s own modules. The memory flows (STS) through the `repeats`
    weight-tied applications of one call and starts from zero at every call, i.e. at every step of the
    model (the processor is called once per step). `memory=False` gives exactly the plain processor.
    The original code's batch-attention defect (`compat_batch_attention`) is not offered here.
    """

    def __init__(self, *, dim: int, num_tokens: int, heads: int, dropout: float, repeats: int,
                 batch_attention: bool = False, memory: bool = True):
        super().__init__()
        if batch_attention:
            raise ValueError("compat_batch_attention reproduces a defect of the original's plain transformer "
                             "processor; it is not offered with transformer_mam")
        if dim % heads:
            raise ValueError(f"dim = {dim} must be divisible by heads = {heads}")
        self.layer = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=3 * dim, dropout=dropout,
                                                activation="relu", batch_first=True, norm_first=False)
        self.repeats = repeats
        self.memory = memory

    def block(self, x: torch.Tensor, memory: Optional[torch.Tensor], *, use_memory: bool = True):
        """One application of the post-norm layer with MAM attention: (x, M_{l-1}) -> (x, M_l)."""
        layer, attn = self.layer, self.layer.self_attn
        a, memory = memory_attention(x, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight,
                                     attn.out_proj.bias, attn.num_heads, memory, use_memory=use_memory,
                                     dropout_p=attn.dropout if self.training else 0.0)
        x = layer.norm1(x + layer.dropout1(a))
        ff = layer.linear2(layer.dropout(F.relu(layer.linear1(x))))
        return layer.norm2(x + layer.dropout2(ff)), memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = None  # M_0 = 0 at every call (every step)
        for _ in range(self.repeats):
            x, memory = self.block(x, memory, use_memory=self.memory)
        return x
