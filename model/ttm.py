"""TTM: Token Turing Machine baseline (Ryoo et al., CVPR 2023), as the LMTTM code runs it (docs/spec/LMTTM.md §4).

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

    #: run `forward_cached` (default); False runs `forward_plain`, the step-by-step reference (tests compare them)
    fast_path = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_path and not self.cfg.compat_random_pos:
            return self.forward_cached(x)
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The step-by-step forward of spec §4."""
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

    def forward_cached(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as `forward_plain` with fewer operations (same logits to float rounding).

        The summarisers act per token before the softmax, and an input token always sits at the same read
        positions [M:] and write positions [M, M + n): the inputs' read and write terms of all T steps are
        computed in one batch. The memory's terms are computed from the zero memory once for the whole
        batch at the first step (unless carried), and the last step's write is skipped (nothing reads it)
        unless the memory is carried (`compat_carry_memory`): logits unchanged; in training its dropout and
        noise draws are not taken, so later draws of torch's RNG differ from `forward_plain`'s.
        `compat_random_pos` draws fresh positions at every read and write, so it runs `forward_plain`.
        """
        tokens = self.stem(x)  # (B, T, n, D)
        batch, steps, n, _ = tokens.shape
        M = self.cfg.memory_tokens
        memory = self.initial_memory(tokens)  # (B, M, D)
        pr, pw = self.pos_read, self.pos_write
        carry = self.cfg.compat_carry_memory
        in_rl, in_rf = self.reader.token_terms(tokens if pr is None else tokens + pr[:, M:])  # (B,T,n,r|D)
        in_wl, in_wf = self.writer.token_terms(tokens if pw is None else tokens + pw[:, M: M + n])  # (B,T,n,M|D)
        in_rl, in_rf, in_wl, in_wf = (u.unbind(1) for u in (in_rl, in_rf, in_wl, in_wf))  # per-step views
        if not carry:  # the zero memory's terms are the same for every sample
            memory = memory[:1]
        outputs = []
        for t in range(steps):
            expand = (lambda u: u.expand(batch, *u.shape[1:])) if memory.size(0) != batch else (lambda u: u)
            ml, mf = self.reader.token_terms(memory if pr is None else memory + pr[:, :M])  # (B, M, r|D)
            out = self.processor(self.reader.pool_pieces([expand(ml), in_rl[t]], [expand(mf), in_rf[t]]))
            outputs.append(out)  # (B, r, D)
            if t == steps - 1 and not carry:
                break
            ml, mf = self.writer.token_terms(memory if pw is None else memory + pw[:, :M])  # (B, M, M|D)
            ol, of = self.writer.token_terms(out if pw is None else out + pw[:, M + n:])  # (B, r, M|D)
            memory = self.noise_after_write(self.writer.pool_pieces([expand(ml), in_wl[t], ol],
                                                                    [expand(mf), in_wf[t], of]))  # (B, M, D)
        if carry:
            self.finish_memory(memory)
        return self.classify(outputs)

@register_model("ttm", TTMConfig, help="Token Turing Machine baseline (whole-memory read and write)")
def build_ttm(cfg: TTMConfig, *, in_channels: int, num_classes: int, input_size: int) -> TTM:
    return TTM(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
