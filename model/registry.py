"""Model registry: one named constructor per model, each with a dataclass of its keyword arguments.

A new model is one file plus one `@register_model` decorator::

    @dataclass
    class MyNetConfig:
        width: int = field(default=64, metadata={"min": 1, "help": "channels of the first stage"})

    @register_model("mynet", MyNetConfig, help="one line shown by `train.py --list-models`")
    def build_mynet(cfg: MyNetConfig, *, in_channels: int, num_classes: int, input_size: int) -> nn.Module:
        return MyNet(...)

The config dataclass is the single source of truth for the model section of a JSON config: its fields
are the accepted keys, their types are checked, `metadata["choices"]`, `metadata["min"]` and
`metadata["max"]` bound the values, and `metadata["help"]` documents them (docs/configuration.md and `--help-config`).
Only the modules that the chosen variant runs may be built (unused parameters break DDP and inflate counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["ModelEntry", "MODELS", "register_model", "get_model_entry", "build_model", "count_parameters",
           "executed_parameter_count"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, the dataclass of its arguments and its constructor."""

    name: str
    config_cls: type
    build: Callable[..., nn.Module]
    help: str = ""
    dims: int = 3
    """Spatial dimensions of the input the model takes: 3 for volumes (N, C, D, H, W), 2 for images (N, C, H, W)."""


MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, *, help: str = "", dims: int = 3):
    """Decorator that registers `build(cfg, *, in_channels, num_classes, input_size) -> nn.Module`.

    `dims` is 3 for a volume model (input (N, C, S, S, S)) and 2 for an image model (input (N, C, S, S)).
    """
    if dims not in (2, 3):
        raise ValueError(f"register_model({name!r}): dims must be 2 or 3, got {dims!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"register_model({name!r}): config_cls must be a dataclass, got {config_cls!r}")

    def decorator(build):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelEntry(name=name, config_cls=config_cls, build=build, help=help, dims=dims)
        return build

    return decorator


def get_model_entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_model(name: str, *, in_channels: int, num_classes: int, input_size: int, **kwargs) -> nn.Module:
    """Build a registered model; `kwargs` are fields of its config dataclass (defaults for the rest)."""
    entry = get_model_entry(name)
    cfg = entry.config_cls(**kwargs)
    return entry.build(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (every built module runs, so this is the executed-path count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def executed_parameter_count(model: nn.Module, example: torch.Tensor) -> int:
    """Parameters that receive a gradient from one training forward/backward on `example`.

    This measures the executed path instead of trusting the module tree; it equals `count_parameters`
    for every registered model (a test asserts it). The model's gradients are cleared afterwards.
    """
    was_training = model.training
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(example)
    out.float().mean().backward()
    n = sum(p.numel() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return n
