"""Shared set-up of train.py and predict.py: device, seeds, data and model from a resolved config."""

from __future__ import annotations

import dataclasses
import os
import random
import sys

import numpy as np
import torch

from data import DatasetInfo, dataset_info, load_splits
from engine import runlog
from engine.config import Config, ConfigError
from model import MODELS, build_model
from model.registry import get_model_entry


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


def apply_determinism(deterministic: bool) -> None:
    """`train.deterministic`: deterministic algorithms (as the original code) and no cuDNN autotuning.

    CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts, i.e. before the first CUDA matmul; this is
    called before anything touches the GPU. Ops that have no deterministic CUDA kernel warn (warn_only)
    instead of stopping the run. On the CPU the flags change nothing measurable."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def apply_tf32(enabled: bool) -> None:
    """`train.tf32`: TF32 for CUDA matrix products and cuDNN convolutions (no effect on the CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def compile_model(model: torch.nn.Module, mode: str):
    """`train.compile`: the callable that runs `model` (`torch.compile(model, mode=...)`, or the model itself).

    The compiled module shares the model's parameters and buffers, so checkpoints hold `model.state_dict()`
    either way (no `_orig_mod.` prefix): a compiled run resumes eagerly and vice versa."""
    if mode == "none":
        return model
    return torch.compile(model, mode=None if mode == "default" else mode)


def rng_state() -> dict:
    """The RNG state to checkpoint: the CPU generator and, when CUDA is available, every GPU's."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> str | None:
    """Restore what matches this machine; return a one-line note of what could not be restored (or None).

    The CPU generator is always restored. CUDA generators are restored by GPU index for the GPUs present on
    both machines; GPUs the checkpoint lacks keep their seeded state (the resumed run then draws other
    random numbers on them than an uninterrupted run would)."""
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(min(len(saved), here)):
        torch.cuda.set_rng_state(saved[index], index)
    if len(saved) == here:
        return None
    if not saved:
        return (f"note: the checkpoint has no CUDA RNG state (saved without CUDA); the random numbers of "
                f"{here} GPU(s) here start from the seed, so this resume is not bit-identical to an uninterrupted run")
    if here == 0:
        return (f"note: the CUDA RNG state of {len(saved)} GPU(s) in the checkpoint is not restored "
                f"(no CUDA here); the CPU RNG is")
    if here < len(saved):
        return f"note: restored the CUDA RNG state of {here} of the {len(saved)} GPUs the checkpoint was saved with"
    return (f"note: restored the CUDA RNG state of {len(saved)} GPU(s); the other {here - len(saved)} GPU(s) "
            f"here start from the seed")


def dataset_for(cfg: Config) -> DatasetInfo:
    """The dataset's info, checking `data.out_class_num` against the class count of medmnist.INFO."""
    if cfg.data.name == "csv":  # your own files (data/csv_dataset.py), preprocessed once into a cached .npz
        from data.csv_dataset import prepare

        info = prepare(cfg.data, dims=get_model_entry(cfg.model_name).dims)
    else:
        info = dataset_for_flag(cfg)
    check_dims(cfg.model_name, info)
    if cfg.data.out_class_num is not None and cfg.data.out_class_num != info.num_classes:
        raise ConfigError(f"data.out_class_num = {cfg.data.out_class_num} contradicts {cfg.data.name}, "
                          f"which has {info.num_classes} classes ({info.task}); remove the key or fix it")
    return info


def dataset_for_flag(cfg: Config) -> DatasetInfo:
    """A MedMNIST or synthetic dataset's info; `data.csv` belongs to data.name "csv" only."""
    if cfg.data.csv:
        raise ConfigError(f"data.csv is set but data.name is {cfg.data.name!r}; set data.name to \"csv\" to train "
                          f"on the files the CSV lists (or remove data.csv)")
    return dataset_info(cfg.data.name, size=cfg.data.size, root=cfg.data.root)


def load_data(cfg: Config, device: torch.device, splits=("train", "val", "test")):
    """(info, {split: Split}) with the uint8 splits on `device` when `data.device_cache`."""
    info = dataset_for(cfg)
    if info.name == "csv":
        from data.csv_dataset import load_cached_splits

        loaded = load_cached_splits(info, splits)
    else:
        loaded = load_splits(cfg.data.name, root=cfg.data.root, size=cfg.data.size, download=cfg.data.download,
                             splits=splits)
    if cfg.train.amp and device.type != "cuda" and "train" in splits and not getattr(cfg.model, "classical", False):
        print(f"warning: train.amp is true but training runs on the {device.type}: bfloat16 autocast is used on "
              f"CUDA only, so train.amp is ignored (float32)", file=sys.stderr)
    if cfg.data.device_cache:
        loaded = {name: split.to(device) for name, split in loaded.items()}
    return info, loaded


def model_from_config(cfg: Config, info: DatasetInfo) -> torch.nn.Module:
    """Build the configured model; a size the model cannot take (e.g. a patch larger than the volume) is a
    ConfigError naming the model, not a traceback."""
    try:
        return build_model(cfg.model_name, in_channels=info.in_channels, num_classes=info.num_classes,
                           input_size=info.size, **dataclasses.asdict(cfg.model))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model {cfg.model_name} cannot be built for {info.name} ({info.size_text}): {err}") from None
    except (MemoryError, RuntimeError) as err:  # RuntimeError: torch's "can't allocate memory" (CPU allocator)
        if not isinstance(err, MemoryError) and "alloc" not in str(err).lower():
            raise
        sizes = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.model).items()
                          if isinstance(v, (int, list)) and not isinstance(v, bool))
        detail = str(err).strip().splitlines()[-1][:200] if str(err).strip() else "MemoryError"
        raise ConfigError(f"model {cfg.model_name} is too big to build in memory ({sizes}): {detail}. "
                          f"Choose smaller model sizes") from None


def check_dims(model_name: str, info: DatasetInfo) -> None:
    """A 2-D model on a 3-D dataset, or the reverse: a ConfigError naming both."""
    dims = get_model_entry(model_name).dims
    if dims != info.dims:
        what = {2: "2-D images", 3: "3-D volumes"}
        fitting = sorted(name for name, entry in MODELS.items() if entry.dims == info.dims)
        raise ConfigError(f"model {model_name} takes {what[dims]}, but {info.name} holds {what[info.dims]}; "
                          f"choose a {info.dims}-D model ({', '.join(fitting)}) or a {dims}-D dataset")


def run_cli(main) -> None:
    """Run a script's `main()` and exit with its code. A bad config, data file, checkpoint or output
    folder (full disk, read-only, name too long) exits 2 with one line and no traceback; Ctrl-C exits 130
    and SIGTERM 143 (handled like Ctrl-C) with one line, wherever they arrive; a closed output pipe
    (`| head`) exits 141 silently. What the script prints is also kept for train.py's train.log."""
    from engine.rundir import handle_sigterm

    handle_sigterm()
    with runlog.capture():  # train.log: engine/runlog.py
        code = _run_main(main)
    sys.exit(code)


def _run_main(main) -> int:
    from data import DataError
    from engine.checkpoint import CheckpointError
    from engine.rundir import Terminated

    try:
        code = main()
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:  # `train.py ... | head`: the reader is gone
        runlog.quiet_broken_pipe()
    except SystemExit:  # argparse's --help and errors: the same quiet end if the pipe is closed
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            runlog.quiet_broken_pipe()
        raise
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot use{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torchrun: another rank died or froze (gloo / NCCL error)
        from engine.distributed import collective_failure

        message = collective_failure(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except Terminated:
        print("\nterminated (SIGTERM) before any result was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C) before any result was written", file=sys.stderr)
        return 130
