"""LMTTM: Linked Memory Token Turing Machine (Wei et al., Computer Methods and Programs in Biomedicine
262 (2025) 108640; reference code github.com/hongkai-wei/LMTTM-VMI), as specified in docs/spec/LMTTM.md §3.

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
        "help": "original: the block pointer lives on the module and is never reset (docs/spec/LMTTM.md §9.3); "
                "null = official_compat"})

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

    #: run `forward_cached` (default); False runs `forward_plain`, the step-by-step reference (tests compare them)
    fast_path = True

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
        if self.fast_path and not self.cfg.compat_random_pos:
            return self.forward_cached(x)
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The step-by-step forward of spec §3 (`read`, processor, `write` at every step)."""
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

    def forward_cached(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as `forward_plain` with fewer operations (same logits to float rounding).

        * Every summariser step before the softmax is per token, and a token's positional slot is fixed: an
          input token always sits at the same read and write positions, and a block always at read positions
          [:m] and at write positions [s·m, (s+1)·m) in slot s (current, past, future). So the inputs' read and
          write terms of all T steps are computed in one batch, and a block's read terms and its write terms
          for the three slots are computed once when the block is written (and for the initial memory) and
          reused until it is written again, instead of at every step. The three slots' write terms share
          their D × D products (`TokenSummariser.slot_terms`); the zero initial memory's terms are computed
          once for all blocks and samples.
        * The softmax of the reads and the write runs over the last (contiguous) axis.
        * The last step's write is skipped (nothing reads it) unless the memory is carried
          (`compat_carry_memory`). The logits are unchanged; in training, the skipped write's dropout and
          noise draws are not taken, so later draws of torch's RNG differ from `forward_plain`'s.

        RNG draws otherwise happen in the plain order (reader dropout, processor, writer dropout, noise).
        `compat_random_pos` draws fresh positions at every read and write, so it runs `forward_plain`.
        """
        cfg, m, k, r = self.cfg, self.block_tokens, self.cfg.blocks, self.cfg.read_tokens
        tokens = self.stem(x)  # (B, T, n, D)
        batch, steps, n, dim = tokens.shape
        memory = self.initial_memory(tokens)  # (B, M, D)
        pr, pw = self.pos_read, self.pos_write  # (1, m + n, D), (1, 3m + n + 3r, D) or None
        carry = cfg.compat_carry_memory
        last_write = steps - 1 if carry else steps - 2  # the last step whose write is read later (or kept)

        # inputs: read terms at read positions [m:], write terms at write positions [3m, 3m + n), all steps
        in_rl, in_rf = self.reader.token_terms(tokens if pr is None else tokens + pr[:, m:])  # (B,T,n,r|D)
        in_wl, in_wf = self.writer.token_terms(
            tokens if pw is None else tokens + pw[:, 3 * m: 3 * m + n])  # (B,T,n,m|D)
        # per-step views by unbind (one gradient stack in backward; slicing [:, t] would allocate and zero a
        # full-size gradient per step)
        in_rl, in_rf, in_wl, in_wf = (u.unbind(1) for u in (in_rl, in_rf, in_wl, in_wf))
        out_pos = None if pw is None else pw[:, 3 * m + n:]  # (1, 3r, D)
        slot_pos = None if pw is None else pw[0, : 3 * m].view(3, m, dim)  # write slots cur, past, future

        def block_terms(block: torch.Tensor, write: bool):
            """Read terms (.., m, r|D) and write terms per slot (.., 3, m, m|D) (slot-free without positions)."""
            read = self.reader.token_terms(block if pr is None else block + pr[:, :m])
            if not write:
                return read, None
            if slot_pos is None:
                return read, self.writer.token_terms(block)
            logits, features = self.writer.slot_terms(block, slot_pos)  # = token_terms(block + slot_pos[s])
            return read, (logits.unbind(-3), features.unbind(-3))  # per slot

        # initial memory: zeros (the same terms for every block and sample) unless carried
        if carry:
            terms = [block_terms(block, last_write >= 0) for block in memory.chunk(k, dim=1)]
            read_terms, write_terms = [u[0] for u in terms], [u[1] for u in terms]
        else:
            zero = memory.new_zeros(1, m, dim)
            (rl, rf), written = block_terms(zero, last_write >= 0)
            expand = lambda t: t.expand(batch, *t.shape[1:])  # noqa: E731
            read_terms = [(expand(rl), expand(rf))] * k
            if written is not None:
                written = tuple(expand(u) if slot_pos is None else tuple(map(expand, u)) for u in written)
            write_terms = [written] * k
        blocks = list(memory.chunk(k, dim=1)) if carry else None

        def slot(b: int, s: int, which: int) -> torch.Tensor:
            terms = write_terms[b][which]
            return terms if slot_pos is None else terms[s]

        start = self._pointer if cfg.compat_global_pointer else 0
        outputs = []
        for t, (current, past, future) in enumerate(block_schedule(steps, k, start)):
            linked = (current, past, future)
            # read: softmax over [block ‖ inputs] of each of the 3 reads; the inputs' part in one product
            # (logits transposed, (B, 3, r, m + n): the softmax over the last axis is the fast one on CPU)
            logits = torch.cat([torch.stack([read_terms[b][0] for b in linked], dim=1).transpose(-1, -2),
                                in_rl[t].unsqueeze(1).transpose(-1, -2).expand(-1, 3, -1, -1)], dim=-1)
            weights = logits.softmax(dim=-1)  # (B, 3, r, m + n)
            pooled = weights[..., :m] @ torch.stack([read_terms[b][1] for b in linked], dim=1)  # (B, 3, r, D)
            pooled = torch.baddbmm(pooled.view(batch, 3 * r, dim),
                                   weights[..., m:].reshape(batch, 3 * r, n), in_rf[t])  # (B, 3r, D)
            out = self.processor(self.reader.dropout(pooled))  # (B, 3r, D)
            outputs.append(out)
            if t > last_write:
                break
            out_l, out_f = self.writer.token_terms(out if out_pos is None else out + out_pos)
            new = self.writer.pool_pieces(
                [slot(current, 0, 0), slot(past, 1, 0), slot(future, 2, 0), in_wl[t], out_l],
                [slot(current, 0, 1), slot(past, 1, 1), slot(future, 2, 1), in_wf[t], out_f])
            new = self.noise_after_write(new)  # (B, m, D)
            if carry:
                blocks[future] = new
            if t < steps - 1:
                read_terms[future], write_terms[future] = block_terms(new, t + 1 <= last_write)
        if cfg.compat_global_pointer:
            self._pointer = (start + steps) % k
        if carry:
            self.finish_memory(torch.cat(blocks, dim=1))
        return self.classify(outputs)


@register_model("lmttm", LMTTMConfig, help="Linked Memory Token Turing Machine (the paper's model)")
def build_lmttm(cfg: LMTTMConfig, *, in_channels: int, num_classes: int, input_size: int) -> LMTTM:
    return LMTTM(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
