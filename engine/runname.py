"""The default run directory name: the config file's name plus the settings the command line changes.

Without `--output.name`, `python train.py adrenalmnist3d.json --model.dim 64 --train.epochs 4` trains into
`runs/adrenalmnist3d-dim64-epochs4`: the same command finds its folder again (resume, `predict.py` with the
same arguments), and commands that train something else never share one.

- A token per override whose value differs from what the config file alone resolves to, in a fixed order
  (data, model, train; each section in the order of its keys), so the order of the overrides does not matter
  and an override equal to the file's value changes nothing. `data.name` and `model.name` give their value
  (`-ttm`), a number follows its key (`dim64`), anything else follows it after `_` (`optimizer_sgd`,
  `amp_true`).
- Keys that do not change what a run computes are left out (`NAME_NEUTRAL`): the output keys, the evaluation
  keys (predict.py's), where the data is (`data.root`, `data.download`, `data.device_cache`), the device and
  `train.compile`. They are also the keys a run may change when it resumes.
- A run started by torchrun with N > 1 processes ends in `-ddpN` (its per-rank dropout streams make it
  another run than the single-process one); `predict.py` scores it with `--output.name`.
- A name longer than `MAX_READABLE` characters, or one whose values need characters a folder name should not
  have, keeps its first tokens and ends in `-` + 8 hex digits of a hash of every changed setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

NAME_NEUTRAL = {("data", "root"), ("data", "download"), ("data", "device_cache"), ("train", "device"),
                ("train", "compile")}
NEUTRAL_SECTIONS = {"output", "eval"}
SECTION_ORDER = ("data", "model", "train")
MAX_READABLE = 64
_SAFE = re.compile(r"[A-Za-z0-9._+]+")


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) or value is None:
        return json.dumps(value)
    if isinstance(value, list):
        return "_".join(_value_text(v) for v in value)
    return str(value)


def _token(section: str, key: str, value) -> str:
    text = _value_text(value)
    if key == "name":
        return text
    return f"{key}{text}" if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{key}_{text}"


def changed_settings(resolved: dict, base: dict | None, overrides: dict) -> list[tuple[str, str, object]]:
    """[(section, key, value)] of the overridden keys whose resolved value differs from the file's resolution
    (`base`, a `config_to_dict`; None when the file alone does not resolve), in the canonical order."""
    out = []
    for section in SECTION_ORDER:
        given = overrides.get(section) or {}
        if not isinstance(given, dict):
            continue
        keys = list(resolved.get(section, {}))
        for key in sorted(given, key=lambda k: keys.index(k) if k in keys else len(keys)):
            if (section, key) in NAME_NEUTRAL or key not in resolved.get(section, {}):
                continue
            value = resolved[section][key]
            missing = object()
            before = missing if base is None else base.get(section, {}).get(key, missing)
            if before is missing or before != value:
                out.append((section, key, value))
    return out


def default_run_name(stem: str, changed: list[tuple[str, str, object]], world_size: int | None = None) -> str:
    """`stem` plus a token per changed setting (see the module docstring)."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    tokens = [_token(s, k, v) for s, k, v in changed]
    if world_size > 1:
        tokens.append(f"ddp{world_size}")
    readable = "-".join([stem, *tokens])
    keys = [k for _, k, _ in changed if k != "name"]
    unsafe = (any(not _SAFE.fullmatch(t) for t in tokens) or len(set(keys)) < len(keys)
              or any(isinstance(v, list) for _, _, v in changed))
    if len(readable) <= MAX_READABLE and not unsafe:
        return readable
    digest = hashlib.sha256(json.dumps([[s, k, v] for s, k, v in changed] + [world_size],
                                       sort_keys=True).encode()).hexdigest()[:8]
    kept = stem
    for t in tokens:
        t = re.sub(r"[^A-Za-z0-9._+]", "_", t)
        if len(kept) + len(t) + 1 > MAX_READABLE - 9:
            break
        kept += "-" + t
    return f"{kept[:MAX_READABLE - 9]}-{digest}"


def run_name_of(path: str | Path, resolved: dict, base: dict | None, overrides: dict) -> str:
    """The default run name of config file `path` resolved with `overrides` (see `default_run_name`)."""
    return default_run_name(Path(path).stem, changed_settings(resolved, base, overrides))
