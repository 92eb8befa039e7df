"""Token summariser S_R (TokenLearner style): N tokens -> R tokens; used for every read and write.

Spec: docs/spec/LMTTM.md §2, after Ryoo et al., "TokenLearner" (2021) as used by the LMTTM code:

    Xn     = LayerNorm(X)                              (B, N, D)
    logits = W2 · GELU(W1 · Xn)                        (B, N, R)   W1: D->D, W2: D->R, no biases
    A      = softmax over the N input tokens           (B, N, R)
    F      = GELU(Wf · X)                              (B, N, D)   on the un-normalised X
    Z      = Aᵀ F, then dropout                        (B, R, D)

Every step except the softmax is per token, so callers that summarise several token sets sharing tokens
(the three LMTTM reads share the input tokens) can compute `token_terms` once per token and `pool` the
concatenations. Parameters: 2D² + (R + 2)·D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenSummariser(nn.Module):
    """Summarise N tokens into `num_outputs` tokens with learned softmax weights over the tokens."""

    def __init__(self, *, dim: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.hidden = nn.Linear(dim, dim, bias=False)  # W1
        self.to_logits = nn.Linear(dim, num_outputs, bias=False)  # W2
        self.to_features = nn.Linear(dim, dim, bias=False)  # Wf
        self.dropout = nn.Dropout(dropout)

    def token_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token attention logits (..., N, R) and features (..., N, D) of x (..., N, D)."""
        logits = self.to_logits(F.gelu(self.hidden(self.norm(x))))
        features = F.gelu(self.to_features(x))
        return logits, features

    def slot_terms(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_terms(x.unsqueeze(-3) + slots)`: the terms of x (..., N, D) at each of S positional slots
        (S, N, D) -> (..., S, N, R), (..., S, N, D), with the D × D products of x taken once, not S times.

        LayerNorm is affine in the centred token: with xc = x - mean(x), pc = p - mean(p) and
        rstd = 1 / sqrt(mean((xc + pc)²) + eps),
            W1 · LayerNorm(x + p) = rstd · (xc·G1ᵀ + pc·G1ᵀ) + W1·b,   G1 = W1 · diag(gamma)
            Wf · (x + p)          = x·Wfᵀ + p·Wfᵀ
        so only xc·G1ᵀ and x·Wfᵀ act on x; the slot parts are per-slot constants. Same values to float
        rounding (no cancellation: the centring is done before the product).
        """
        norm, w1, wf = self.norm, self.hidden.weight, self.to_features.weight
        g1 = w1 * norm.weight  # (D, D): W1 diag(gamma)
        pc = slots - slots.mean(dim=-1, keepdim=True)
        xc = x - x.mean(dim=-1, keepdim=True)
        yc = xc.unsqueeze(-3) + pc  # (..., S, N, D): the centred x + p
        rstd = torch.rsqrt(yc.square().mean(dim=-1, keepdim=True) + norm.eps)
        hidden = torch.addcmul(F.linear(norm.bias, w1), (xc @ g1.t()).unsqueeze(-3) + pc @ g1.t(), rstd)
        logits = self.to_logits(F.gelu(hidden))
        features = F.gelu((x @ wf.t()).unsqueeze(-3) + slots @ wf.t())
        return logits, features

    def pool(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Softmax over the token axis (-2) of logits (..., N, R), weighted sum of features -> (..., R, D)."""
        weights = logits.softmax(dim=-2)
        return self.dropout(weights.transpose(-1, -2) @ features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(*self.token_terms(x))

    def pool_pieces(self, logits: list[torch.Tensor], features: list[torch.Tensor]) -> torch.Tensor:
        """`pool` of a token set given in pieces along the token axis (-2): the same result.

        The logits are concatenated transposed, (..., R, N), so that the softmax runs over the last,
        contiguous axis (several times faster on CPU than over axis -2).
        """
        weights = torch.cat([piece.transpose(-1, -2) for piece in logits], dim=-1).softmax(dim=-1)  # (..., R, N)
        return self.dropout(weights @ torch.cat(features, dim=-2))
