"""Helpers shared by the test files (no network, no ../shared)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data import dataset_info

SPLITS = ("train", "val", "test")


def write_fake_medmnist(
    root: str | Path,
    name: str,
    size: int = 28,
    n: Sequence[int] | str = (8, 4, 4),
    num_classes: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a MedMNIST-format .npz for dataset `name` under `root`, where `load_splits` looks; return its path.

    `n` gives the (train, val, test) sizes, or "official" for the released split sizes. Images
    are uint8 (N, size, size, size): zeros except random values in a small corner cube, so large
    files compress well. Labels are uint8 (N, 1), cycling through all `num_classes` classes
    (default: the dataset's number of classes) in a random order.
    """
    info = dataset_info(name, size=size, root=root)
    if info.path is None:
        raise ValueError(f"{name} has no file")
    counts = [info.n_samples[split] for split in SPLITS] if n == "official" else list(n)
    classes = info.num_classes if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    corner = max(1, size // 7)
    arrays: dict[str, np.ndarray] = {}
    for split, count in zip(SPLITS, counts):
        images = np.zeros((count, size, size, size), dtype=np.uint8)
        images[:, :corner, :corner, :corner] = rng.integers(0, 256, size=(count, corner, corner, corner), dtype=np.uint8)
        labels = rng.permutation(np.arange(count) % classes).astype(np.uint8).reshape(count, 1)
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels
    info.path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(info.path, **arrays)
    return info.path


def write_fake_2d(root: str | Path, name: str, size: int = 28, n=(24, 12, 12), seed=0) -> Path:
    """A MedMNIST-format 2D .npz: images (N, S, S) grey or (N, S, S, 3) RGB, labels (N, 1) or (N, L) multi-label."""
    info = dataset_info(name, size=size, root=root)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(SPLITS, n):
        shape = (count, size, size) + ((3,) if info.in_channels == 3 else ())
        arrays[f"{split}_images"] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        if info.is_multilabel:
            labels = rng.integers(0, 2, size=(count, info.num_classes))
            labels[0], labels[1] = 0, 1  # every label present and absent
        else:
            labels = rng.permutation(np.arange(count) % info.num_classes).reshape(count, 1)
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    info.path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(info.path, **arrays)
    return info.path


def override_args(defaults: Sequence[str], *extra: str) -> list[str]:
    """Command-line overrides `defaults` then `extra`, leaving out of `defaults` every key `extra` sets (the
    command line refuses a key given twice, as a JSON file does)."""
    given = {a.split("=")[0] for a in extra if a.startswith("--")}
    out, i = [], 0
    while i < len(defaults):
        key = defaults[i].split("=")[0]
        if defaults[i].startswith("--") and key in given:
            i += 1 if "=" in defaults[i] else 2
            continue
        out.append(defaults[i])
        i += 1
    return [*out, *extra]
