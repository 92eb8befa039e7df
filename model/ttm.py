"""TTM: Token Turing Machine baseline (Ryoo et al., CVPR 2023), as the LMTTM code runs it (spec §4).

Per step t, with memory M (B, M, D) and input tokens I_t (B, n, D):
    read   Z_t = S_r([M ‖ I_t] + pos_read)              (M + n -> r tokens)
    process O_t = processor(Z_t)                        (B, r, D)
    write  M  <- S_M([M ‖ I_t ‖ O_t] + pos_write)       (M + n + r -> M tokens)
The logits are a linear head on the mean of all O_t.
"""

from __future__ import annotations

import torch

from model.registry import register_model
from model.summariser import TokenSummariser
from model.token_turing import TokenTuringMachine, TTMConfig
from model.stem import steps_and_tokens


class TTM(TokenTuringMachine):
    """Whole-memory read and write."""

    def __init__(self, cfg: TTMConfig, *, in_channels: int, num_classes: int, input_size: int):
        _, n = steps_and_tokens(input_size, cfg.patch)
        M, r = cfg.memory_tokens, cfg.read_tokens
        super().__init__(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size,
                         read_length=M + n, write_length=M + n + r, processor_tokens=r)
        self.reader = TokenSummariser(dim=cfg.dim, num_outputs=r, dropout=cfg.dropout)
        self.writer = TokenSummariser(dim=cfg.dim, num_outputs=M, dropout=cfg.dropout)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x)  # (B, T, n, D)
        memory = self.initial_memory(tokens)  # (B, M, D)
        outputs = []
        for t in range(tokens.size(1)):
            inputs = tokens[:, t]  # (B, n, D)
            read = torch.cat([memory, inputs], dim=1)  # (B, M + n, D)
            pos = self.position("read", read)
            out = self.processor(self.reader(read if pos is None else read + pos))  # (B, r, D)
            write = torch.cat([memory, inputs, out], dim=1)  # (B, M + n + r, D)
            pos = self.position("write", write)
            memory = self.noise_after_write(self.writer(write if pos is None else write + pos))  # (B, M, D)
            outputs.append(out)
        self.finish_memory(memory)
        return self.classify(outputs)


@register_model("ttm", TTMConfig, help="Token Turing Machine baseline (whole-memory read and write)")
def build_ttm(cfg: TTMConfig, *, in_channels: int, num_classes: int, input_size: int) -> TTM:
    return TTM(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
