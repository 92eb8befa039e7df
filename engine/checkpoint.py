"""Self-describing checkpoints, loaded with `weights_only=True` (written atomically by engine/rundir.py)."""

from __future__ import annotations

import pickle
import platform
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from data.info import dims_of, size_text


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the config."""


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on (recorded in every checkpoint and run summary)."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name in ("medmnist", "numpy", "scikit-learn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


# what every checkpoint of this project holds (best.pt, last.pt and the epoch_NNNN.pt of keep_last_k)
REQUIRED_KEYS = {"model": Mapping, "config": Mapping, "epoch": int, "dataset": Mapping}
DATASET_KEYS = ("name", "size", "num_classes")


def _unreadable_reason(err: BaseException) -> str:
    """Why torch.load failed, in words, without torch's advice to retry with weights_only=False (never safe here)."""
    text = str(err)
    if isinstance(err, EOFError):
        return "it ends before its contents do (truncated)"
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return (f"it holds Python objects ({found.group(1)}) that a checkpoint of this project never contains; "
                    f"they were not loaded, since loading them could run code")
        return "it is neither a zip archive written by torch.save nor a plain pickle of tensors"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "its zip archive is truncated or corrupt"
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "weights_only" in first or not first:
        return f"torch cannot read it ({type(err).__name__})"
    return f"torch cannot read it ({type(err).__name__}: {first[:200]})"


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint of this project with `weights_only=True`; anything else is a one-line CheckpointError."""
    path = Path(path)
    try:
        is_dir, is_file, exists = path.is_dir(), path.is_file(), path.exists()
        empty = is_file and path.stat().st_size == 0
    except OSError as err:  # e.g. a path too long for the file system
        raise CheckpointError(f"cannot use checkpoint path {str(path)[:120]!r}: {err.strerror or err}") from None
    if is_dir:
        raise CheckpointError(f"checkpoint {path} is a directory; give a .pt file (e.g. {path / 'best.pt'})")
    if not is_file:
        raise CheckpointError(f"checkpoint {path} does not exist" if not exists
                              else f"checkpoint {path} is not a regular file")
    if empty:
        raise CheckpointError(f"checkpoint {path} is an empty file (0 bytes), not a checkpoint of this project; "
                              f"delete it (a complete run directory never holds one)")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"{path} is not a checkpoint of this project: {_unreadable_reason(err)}") from None
    check_checkpoint(ckpt, path)
    return ckpt


def check_checkpoint(ckpt, path: Path) -> None:
    """Raise CheckpointError unless `ckpt` has the keys (and their types) every checkpoint of this project has."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path} is not a checkpoint of this project: it holds a {type(ckpt).__name__}, "
                              f"not a dict with {', '.join(REQUIRED_KEYS)}")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint of this project: it lacks "
                              f"{', '.join(map(repr, missing))} (has {', '.join(map(repr, sorted(map(str, ckpt))))})")
    for key, kind in REQUIRED_KEYS.items():
        value = ckpt[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: {key!r} is a {type(value).__name__}, not a "
                                  f"{'dict' if kind is Mapping else kind.__name__}; not a checkpoint of this project")
    lacking = [key for key in DATASET_KEYS if key not in ckpt["dataset"]]
    if lacking:
        raise CheckpointError(f"{path}: its 'dataset' record lacks {', '.join(map(repr, lacking))}; "
                              f"not a checkpoint of this project")


def _trained_with(ckpt: dict) -> str:
    """A short description of the config and dataset a checkpoint was trained with."""
    model = dict(ckpt.get("config", {}).get("model", {})) if isinstance(ckpt.get("config"), Mapping) else {}
    name = model.pop("name", "?")
    sizes = ", ".join(f"{k}={model[k]}" for k in ("dim", "memory_tokens", "blocks", "read_tokens", "patch_size",
                                                   "depth_patch_size", "stem", "processor", "pos_embedding", "width",
                                                   "depths", "widths")
                      if k in model and model[k] is not None)
    data = ckpt.get("dataset", {}) if isinstance(ckpt.get("dataset"), Mapping) else {}
    shape = size_text(data.get("size"), dims_of(str(data.get("name"))))  # 28³ for a volume, 28² for an image
    on = (f" on {data.get('name')} ({shape}, {data.get('num_classes')} classes)" if data else "")
    return f"model {name}" + (f" ({sizes})" if sizes else "") + on


def load_weights(model: torch.nn.Module, ckpt: dict, path: Path) -> None:
    """`model.load_state_dict(ckpt["model"])`, with missing/unexpected keys and shape mismatches as one CheckpointError
    that names a few of them and the config the checkpoint was trained with."""
    theirs = ckpt["model"]
    mine = model.state_dict()
    missing = [k for k in mine if k not in theirs]
    unexpected = [k for k in theirs if k not in mine]
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in mine.items()
              if k in theirs and isinstance(v, torch.Tensor) and isinstance(theirs[k], torch.Tensor)
              and theirs[k].shape != v.shape]

    def few(items):
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    problems = [f"{len(items)} {what} ({few(items)})" for what, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches (checkpoint vs model)", shapes))
                if items]
    if problems:
        raise CheckpointError(f"{path} does not fit the model: {'; '.join(problems)}. It was trained with "
                              f"{_trained_with(ckpt)}")
    try:
        model.load_state_dict(theirs)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} does not fit the model ({first[:300]}). It was trained with "
                              f"{_trained_with(ckpt)}") from None
