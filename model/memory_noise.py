"""Memory noise (paper Table 7, docs/spec/LMTTM.md §8): `rate` × a draw of the chosen distribution, from torch's RNG.

| mode      | draw                          | mean of the added term at rate 0.2 |
|-----------|-------------------------------|------------------------------------|
| `normal`  | N(0, 1)                       | 0                                  |
| `uniform` | U(-0.5, 0.5)                  | 0                                  |
| `laplace` | Laplace(loc 10, scale 10)     | 2 (sic: the original's parameters) |
| `exp`     | Exp(1)                        | 0.2                                |
| `gamma`   | Gamma(shape 2, scale 2)       | 0.8                                |
| `poisson` | Poisson(2)                    | 0.4                                |
| `none`    | no noise                      |                                    |
"""

from __future__ import annotations

import numpy as np
import torch

NOISE_MODES = ("normal", "uniform", "laplace", "exp", "gamma", "poisson", "none")


def draw_noise(mode: str, like: torch.Tensor, *, frozen_gamma: bool = False) -> torch.Tensor:
    """A noise draw of `mode` with the shape, dtype and device of `like` (before the rate).

    `frozen_gamma` reproduces the original code's gamma noise (spec §9.4): numpy's seed was reset to 3407
    inside forward, so every call drew the same tensor.
    """
    shape, kw = like.shape, {"dtype": like.dtype, "device": like.device}
    if mode == "normal":
        return torch.randn(shape, **kw)
    if mode == "uniform":
        return torch.rand(shape, **kw) - 0.5
    if mode == "laplace":
        loc = torch.tensor(10.0, **kw)
        return torch.distributions.Laplace(loc, 10.0 * torch.ones_like(loc)).sample(shape)
    if mode == "exp":
        return torch.empty(shape, **kw).exponential_(1.0)
    if mode == "gamma":
        if frozen_gamma:
            return torch.from_numpy(np.random.RandomState(3407).gamma(2.0, 2.0, size=tuple(shape))).to(**kw)
        concentration = torch.tensor(2.0, **kw)
        return torch.distributions.Gamma(concentration, 0.5 * torch.ones_like(concentration)).sample(shape)
    if mode == "poisson":
        return torch.poisson(torch.full(shape, 2.0, **kw))
    if mode == "none":
        return torch.zeros(shape, **kw)
    raise ValueError(f"unknown noise mode {mode!r}; choose one of {list(NOISE_MODES)}")


def add_memory_noise(memory: torch.Tensor, mode: str, rate: float, *, frozen_gamma: bool = False) -> torch.Tensor:
    """memory + rate × noise (a new tensor; `none` or rate 0 returns memory itself)."""
    if mode == "none" or rate == 0:
        return memory
    return memory + rate * draw_noise(mode, memory, frozen_gamma=frozen_gamma)
