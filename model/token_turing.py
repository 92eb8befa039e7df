"""What TTM and LMTTM share: the config, the stem, the processor, positional embeddings, memory noise,
the classification head and the `official_compat` carried state (docs/spec/LMTTM.md §1, §5-§9).

The two models differ only in how they read from and write to memory (`ttm.py`, `lmttm.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from model.memory_noise import NOISE_MODES, add_memory_noise
from model.processor import PROCESSORS, build_processor
from model.stem import STEMS, build_stem, steps_and_tokens


# ----------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------

@dataclass
class TTMConfig:
    """Arguments of TTM (and, with `blocks`, of LMTTM). Defaults follow spec §7 (paper and original code)."""

    dim: int = field(default=448, metadata={"min": 1, "help": "token dimension D"})
    memory_tokens: int = field(default=448, metadata={"min": 1, "help": "memory size M (tokens)"})
    read_tokens: int = field(default=8, metadata={"min": 1, "help": "tokens r summarised by each read"})
    patch_size: int = field(default=3, metadata={"min": 1, "help": "stem patch (kernel = stride) in height and width"})
    depth_patch_size: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "stem patch along depth; null = patch_size (9 steps at 28³, as the code); 1 = the paper's 28 frames"})
    stem: str = field(default="3d", metadata={"choices": sorted(STEMS), "help": "input stem"})
    processor: str = field(default="transformer", metadata={"choices": sorted(PROCESSORS), "help": "processing unit (MAFA)"})
    processor_repeats: int = field(default=3, metadata={"min": 1, "help": "applications of the (weight-shared) processor block"})
    heads: int = field(default=8, metadata={"min": 1, "help": "attention heads of the transformer processor"})
    dropout: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0, "help": "dropout of summarisers and processor"})
    pos_embedding: str = field(default="learned", metadata={
        "choices": ["learned", "none"], "help": "trainable positional embeddings for reads and writes (paper); none = off"})
    noise: str = field(default="normal", metadata={"choices": list(NOISE_MODES), "help": "memory noise mode (paper Table 7)"})
    noise_rate: float = field(default=0.2, metadata={"min": 0.0, "help": "memory noise rate"})
    official_compat: bool = field(default=False, metadata={
        "help": "preset: the original code's behaviour (docs/spec/LMTTM.md §9.1-5): every compat_* option left null follows it "
                "(compat_batch_attention only with the transformer processor); training drops the last partial "
                "batch and evaluation runs full batches at the training batch size"})
    compat_batch_attention: Optional[bool] = field(default=None, metadata={
        "help": "original defect: samples of a batch attend to each other in the transformer (docs/spec/LMTTM.md §9.1); "
                "null = official_compat (off for mlp and mixer, which have no attention); true needs the "
                "transformer processor"})
    compat_random_pos: Optional[bool] = field(default=None, metadata={
        "help": "original: fresh N(0, 0.02²) positional embeddings on every call, not learned (docs/spec/LMTTM.md §9.2); "
                "null = official_compat"})
    compat_carry_memory: Optional[bool] = field(default=None, metadata={
        "help": "original: memory carried (detached) from batch to batch and saved, noise at the end of every "
                "forward in training and evaluation, frozen gamma draw (docs/spec/LMTTM.md §9.4); null = official_compat"})

    def __post_init__(self):
        # compat_* options: null follows official_compat; an explicit value that contradicts the preset is an
        # error, not silently overridden. The resolved values (true/false) read back to the same config.
        for name in self.compat_options():
            preset = self.official_compat and self.compat_preset(name)
            value = getattr(self, name)
            if value is None:
                setattr(self, name, preset)
            elif not isinstance(value, bool):
                raise ValueError(f"{name} must be true, false or null, got {value!r}")
            elif self.official_compat and value != preset:
                raise ValueError(f"official_compat = true contradicts {name} = {str(value).lower()}"
                                 + ((" (the preset leaves it off with processor transformer_mam: that defect "
                                     "belongs to the original's plain processor)" if self.processor == "transformer_mam"
                                     else f" (processor {self.processor!r} has no attention)") if value else "")
                                 + f"; leave {name} unset (null) or set official_compat = false")
        if self.compat_batch_attention and self.processor != "transformer":
            raise ValueError(f"compat_batch_attention needs the transformer processor; processor "
                             f"{self.processor!r} " + ("does not reproduce that defect of the original (MAM is "
                             "ours)" if self.processor == "transformer_mam" else "has no attention between "
                             "tokens or samples"))
        checks = [(self.stem, STEMS, "stem"), (self.processor, PROCESSORS, "processor"),
                  (self.noise, NOISE_MODES, "noise"), (self.pos_embedding, ("learned", "none"), "pos_embedding")]
        for value, accepted, key in checks:
            if value not in accepted:
                raise ValueError(f"unknown {key} {value!r}; choose one of {sorted(accepted)}")
        if self.processor in ("transformer", "transformer_mam") and self.dim % self.heads:
            raise ValueError(f"dim = {self.dim} must be divisible by heads = {self.heads}")

    @property
    def patch(self) -> tuple[int, int, int]:
        """Stem patch (depth, height, width)."""
        return (self.depth_patch_size or self.patch_size, self.patch_size, self.patch_size)

    def compat_options(self) -> list[str]:
        return [name for name in self.__dataclass_fields__ if name.startswith("compat_")]

    def compat_preset(self, name: str) -> bool:
        """What official_compat sets `name` to: on, except batch attention without the transformer processor
        (the original's mlp and mixer processors act per token, so there is no batch mixing to reproduce)."""
        return name != "compat_batch_attention" or self.processor == "transformer"


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear and Conv (spec §7)."""
    if isinstance(module, (nn.Linear, nn.Conv3d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------
# base model
# ----------------------------------------------------------------------------------------------------------

class TokenTuringMachine(nn.Module):
    """Stem, processor, head, positional embeddings, noise and carried state shared by TTM and LMTTM.

    Subclasses define `read_length`, `write_length`, `processor_tokens` and `forward`.
    """

    def __init__(self, cfg: TTMConfig, *, in_channels: int, num_classes: int, input_size: int,
                 read_length: int, write_length: int, processor_tokens: int):
        super().__init__()
        self.cfg = cfg
        patch = cfg.patch
        self.steps, self.input_tokens = steps_and_tokens(input_size, patch)  # T, n
        self.read_length, self.write_length = read_length, write_length
        self.stem = build_stem(cfg.stem, in_channels=in_channels, dim=cfg.dim, patch=patch)
        self.processor = build_processor(cfg.processor, dim=cfg.dim, num_tokens=processor_tokens, heads=cfg.heads,
                                         dropout=cfg.dropout, repeats=cfg.processor_repeats,
                                         batch_attention=cfg.compat_batch_attention)
        self.head = nn.Linear(cfg.dim, num_classes)
        if cfg.pos_embedding == "learned" and not cfg.compat_random_pos:
            self.pos_read = nn.Parameter(torch.zeros(1, read_length, cfg.dim))
            self.pos_write = nn.Parameter(torch.zeros(1, write_length, cfg.dim))
        else:
            self.pos_read = self.pos_write = None
        self._carried_memory: torch.Tensor | None = None  # only with compat_carry_memory
        self._pointer = 0  # only with LMTTM's compat_global_pointer

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        for pos in (self.pos_read, self.pos_write):
            if pos is not None:
                nn.init.normal_(pos, std=0.02)

    # positional embeddings ------------------------------------------------------------------------------------

    def position(self, which: str, like: torch.Tensor) -> torch.Tensor | None:
        """The read or write positional embedding (1, L, D), a fresh random draw in compat mode, or None."""
        if self.cfg.compat_random_pos:
            length = self.read_length if which == "read" else self.write_length
            return torch.randn(1, length, self.cfg.dim, device=like.device, dtype=like.dtype) * 0.02
        return self.pos_read if which == "read" else self.pos_write

    # memory -------------------------------------------------------------------------------------------------

    def noise_after_write(self, written: torch.Tensor) -> torch.Tensor:
        """Default: noise on the freshly written memory tokens, in training only (spec §8)."""
        if self.training and not self.cfg.compat_carry_memory:
            return add_memory_noise(written, self.cfg.noise, self.cfg.noise_rate)
        return written

    def initial_memory(self, like: torch.Tensor) -> torch.Tensor:
        """(B, M, D) zeros, or with compat_carry_memory the memory the previous call left behind.

        A carried memory of another batch size is cut to the first B rows or padded with zeros.
        """
        batch = like.size(0)
        memory = like.new_zeros(batch, self.cfg.memory_tokens, self.cfg.dim)
        if self.cfg.compat_carry_memory and self._carried_memory is not None:
            carried = self._carried_memory.to(device=like.device, dtype=like.dtype)[:batch]
            memory[: carried.size(0)] = carried
        return memory

    def finish_memory(self, memory: torch.Tensor) -> None:
        """With compat_carry_memory: add noise (training and evaluation, as the original) and keep it."""
        if self.cfg.compat_carry_memory:
            memory = add_memory_noise(memory.detach(), self.cfg.noise, self.cfg.noise_rate, frozen_gamma=True)
            self._carried_memory = memory

    def reset_state(self) -> None:
        """Forget the carried memory and pointer of the compat options (no effect by default)."""
        self._carried_memory, self._pointer = None, 0

    def get_extra_state(self):
        memory = self._carried_memory if self._carried_memory is not None else torch.zeros(0)
        return {"carried_memory": memory.cpu(), "pointer": self._pointer}

    def set_extra_state(self, state) -> None:
        memory = state["carried_memory"]
        self._carried_memory = memory if memory.numel() else None
        self._pointer = int(state["pointer"])

    def classify(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Mean over all step outputs (B, T·R, D) -> linear head -> logits (B, K) (spec §6)."""
        return self.head(torch.stack(outputs, dim=1).mean(dim=(1, 2)))
