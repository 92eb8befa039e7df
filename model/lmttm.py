"""LMTTM: Linked Memory Token Turing Machine (Wei et al., Computer Methods and Programs in Biomedicine
262 (2025) 108640; reference code github.com/hongkai-wei/LMTTM-VMI), as specified in spec §3.

The memory (B, M, D) is split into k linked blocks of m = M / k tokens. At step t the pointer p = t mod k
names the current block; its neighbours are the past (p - 1) and future (p + 1) blocks (mod k):
    read    Z_b = S_r([block_b ‖ I_t] + pos_read) for b in (current, past, future)   (m + n -> r each)
            P_t = [Z_cur ‖ Z_past ‖ Z_future]                                         (B, 3r, D)
    process O_t = processor(P_t)                                                      (B, 3r, D)
    write   block_{p+1} <- S_m([cur ‖ past ‖ future ‖ I_t ‖ O_t] + pos_write)          (3m + n + 3r -> m)
The logits are a linear head on the mean of all O_t. The three reads share one summariser, so the input
tokens' per-token terms are computed once and shared by the three reads (exactly the same result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from model.registry import register_model
from model.stem import steps_and_tokens
from model.summariser import TokenSummariser
from model.token_turing import TokenTuringMachine, TTMConfig


@dataclass
class LMTTMConfig(TTMConfig):
    blocks: int = field(default=4, metadata={"min": 1, "help": "linked memory blocks k (M must be divisible by k)"})
    compat_global_pointer: Optional[bool] = field(default=None, metadata={
        "help": "original: the block pointer lives on the module and is never reset (§9.3); null = official_compat"})

    def __post_init__(self):
        super().__post_init__()
        if self.memory_tokens % self.blocks:
            raise ValueError(f"memory_tokens = {self.memory_tokens} must be divisible by blocks = {self.blocks} "
                             f"(each linked block holds memory_tokens / blocks tokens)")


def block_schedule(steps: int, blocks: int, start: int = 0) -> list[tuple[int, int, int]]:
    """(current, past, future) block indices of each step; the future block is the one written."""
    schedule = []
    for t in range(steps):
        p = (start + t) % blocks
        schedule.append((p, (p - 1) % blocks, (p + 1) % blocks))
    return schedule


class LMTTM(TokenTuringMachine):
    """Linked memory with the tri-temporal (past / current / future) read and a write into the future block."""

    def __init__(self, cfg: LMTTMConfig, *, in_channels: int, num_classes: int, input_size: int):
        _, n = steps_and_tokens(input_size, cfg.patch)
        m, r = cfg.memory_tokens // cfg.blocks, cfg.read_tokens
        super().__init__(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                         read_length=m + n, write_length=3 * m + n + 3 * r, processor_tokens=3 * r)
        self.block_tokens = m
        self.reader = TokenSummariser(dim=cfg.dim, num_outputs=r, dropout=cfg.dropout)  # shared by the 3 reads
        self.writer = TokenSummariser(dim=cfg.dim, num_outputs=m, dropout=cfg.dropout)
        self.reset_parameters()

    def read(self, linked: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """linked (B, 3, m, D) = current, past, future blocks; inputs (B, n, D) -> P_t (B, 3r, D)."""
        m = self.block_tokens
        pos = self.position("read", inputs)  # (1, m + n, D) or None
        if pos is not None:
            linked, inputs = linked + pos[:, None, :m], inputs + pos[:, m:]
        block_logits, block_features = self.reader.token_terms(linked)  # (B, 3, m, r), (B, 3, m, D)
        input_logits, input_features = self.reader.token_terms(inputs)  # (B, n, r), (B, n, D): once for 3 reads
        shared = lambda t: t.unsqueeze(1).expand(-1, 3, -1, -1)  # noqa: E731  (B, 3, n, ·)
        logits = torch.cat([block_logits, shared(input_logits)], dim=2)  # (B, 3, m + n, r)
        features = torch.cat([block_features, shared(input_features)], dim=2)  # (B, 3, m + n, D)
        return self.reader.pool(logits, features).flatten(1, 2)  # (B, 3, r, D) -> (B, 3r, D)

    def write(self, linked: torch.Tensor, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """New future block (B, m, D) from [cur ‖ past ‖ future ‖ I_t ‖ O_t] (B, 3m + n + 3r, D)."""
        tokens = torch.cat([linked.flatten(1, 2), inputs, outputs], dim=1)
        pos = self.position("write", tokens)
        return self.writer(tokens if pos is None else tokens + pos)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x)  # (B, T, n, D)
        memory = self.initial_memory(tokens)  # (B, M, D)
        blocks = list(memory.chunk(self.cfg.blocks, dim=1))  # k × (B, m, D)
        start = self._pointer if self.cfg.compat_global_pointer else 0
        outputs = []
        for t, (current, past, future) in enumerate(block_schedule(tokens.size(1), self.cfg.blocks, start)):
            linked = torch.stack([blocks[current], blocks[past], blocks[future]], dim=1)  # (B, 3, m, D)
            read = self.read(linked, tokens[:, t])  # (B, 3r, D)
            out = self.processor(read)  # (B, 3r, D)
            blocks[future] = self.noise_after_write(self.write(linked, tokens[:, t], out))  # (B, m, D)
            outputs.append(out)
        if self.cfg.compat_global_pointer:
            self._pointer = (start + tokens.size(1)) % self.cfg.blocks
        self.finish_memory(torch.cat(blocks, dim=1))
        return self.classify(outputs)


@register_model("lmttm", LMTTMConfig, help="Linked Memory Token Turing Machine (the paper's model)")
def build_lmttm(cfg: LMTTMConfig, *, in_channels: int, num_classes: int, input_size: int) -> LMTTM:
    return LMTTM(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
