"""Shared set-up of train.py and predict.py: device, seeds, data and model from a resolved config."""

from __future__ import annotations

import dataclasses
import random
import sys

import numpy as np
import torch

from data import DatasetInfo, dataset_info, load_splits
from engine.config import Config, ConfigError
from model import build_model


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else must be a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device = {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available here; use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_for(cfg: Config) -> DatasetInfo:
    """The dataset's info, checking `data.out_class_num` against the class count of medmnist.INFO."""
    info = dataset_info(cfg.data.name, size=cfg.data.size, root=cfg.data.root)
    if cfg.data.out_class_num is not None and cfg.data.out_class_num != info.num_classes:
        raise ConfigError(f"data.out_class_num = {cfg.data.out_class_num} contradicts {cfg.data.name}, "
                          f"which has {info.num_classes} classes ({info.task}); remove the key or fix it")
    return info


def load_data(cfg: Config, device: torch.device, splits=("train", "val", "test")):
    """(info, {split: Split}) with the uint8 splits on `device` when `data.device_cache`."""
    info = dataset_for(cfg)
    loaded = load_splits(cfg.data.name, root=cfg.data.root, size=cfg.data.size, download=cfg.data.download,
                         splits=splits)
    if cfg.data.device_cache:
        loaded = {name: split.to(device) for name, split in loaded.items()}
    return info, loaded


def model_from_config(cfg: Config, info: DatasetInfo) -> torch.nn.Module:
    return build_model(cfg.model_name, in_channels=info.in_channels, num_classes=info.num_classes,
                       input_size=info.size, **dataclasses.asdict(cfg.model))


def run_cli(main) -> None:
    """Run a script's `main()` and exit with its code; a bad config, data file or checkpoint exits 2
    with its message and no traceback."""
    from data import DataError
    from engine.checkpoint import CheckpointError

    try:
        sys.exit(main())
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
