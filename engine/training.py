"""Pieces of a training that train.py and engine/ensemble.py share: the optimizer, the learning rate as a pure
function of the epoch (so a resume is exact), what a training holds in memory (`Job`), and the curves of a
finished run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from data import DatasetInfo, Split
from engine.checkpoint import package_versions
from engine.config import Config, config_to_dict
from engine.distributed import Distributed
from engine.plots import MissingDependency, plot_curves
from engine.setup import rng_state


def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def learning_rate(cfg: Config, epoch: int) -> float:
    """The lr of a (0-based) epoch: a pure function of the epoch, so resuming is exact."""
    t = cfg.train
    if t.scheduler == "multistep":
        return t.lr * t.gamma ** sum(epoch >= round(m * t.epochs) for m in t.milestones)
    return t.lr


@dataclasses.dataclass
class Job:
    """What a training holds in memory: the data, the model and its optimizer, and how to run them."""

    info: DatasetInfo
    splits: dict[str, Split]
    md5: str | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    executed: int          # parameters on the executed path (the run's param_count)
    device: torch.device
    forward: Callable        # validation: the (compiled) model, never the DDP wrapper
    train_forward: Callable  # training: the (compiled) model or its DDP wrapper
    eval_batch: int
    full_batches: bool

    def state(self, cfg: Config, dist: Distributed) -> dict:
        """The training state a checkpoint holds (the saver adds the epoch and the run's records)."""
        info = self.info
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": config_to_dict(cfg),
                "dataset": {"name": info.name, "size": info.size, "num_classes": info.num_classes,
                            "task": info.task, "md5": self.md5},
                "param_count": self.executed, "versions": package_versions(), "rng": rng_state(),
                "world_size": dist.world_size}


def write_curves(cfg: Config, run_dir: Path) -> None:
    """curves.png of the finished run (output.plots); a note, not an error, without matplotlib."""
    if not cfg.output.plots:
        return
    try:
        print(f"wrote {plot_curves(run_dir)}")
    except MissingDependency as err:
        print(f"note: no curves.png: {err}")
