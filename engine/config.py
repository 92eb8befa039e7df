"""Typed, strict JSON configs with inheritance and command-line overrides.

A config file is a JSON object with the sections `data`, `model`, `train`, `eval`, `output`, and an
optional `"extends": "base.json"` (resolved next to the file). Sections are dataclasses below; the
`model` section is the config dataclass of the model named by `model.name` (see `model.registry`).

Resolution order: the defaults of the dataclasses, then each file from the root of the `extends` chain
down, then `--section.key value` overrides. When a layer changes `model.name`, the inherited model keys
the new model does not accept are dropped (so `--model.name ttm` keeps `dim` but drops `blocks`); a key a
layer sets itself must be accepted. Unknown keys, wrong types and out-of-range values are errors
(`ConfigError`) that name the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from model import MODELS, get_model_entry

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

__all__ = ["ConfigError", "DataConfig", "TrainConfig", "EvalConfig", "OutputConfig", "Config", "load_config",
           "resolve_config_path", "parse_overrides", "config_from_dict", "config_to_dict", "describe_config"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the accepted values."""


# ----------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    name: str = field(default="adrenalmnist3d", metadata={
        "help": "MedMNIST 3D flag (organmnist3d, nodulemnist3d, adrenalmnist3d, fracturemnist3d, "
                "vesselmnist3d, synapsemnist3d), MedMNIST 2D flag (pathmnist, chestmnist, dermamnist, octmnist, "
                "pneumoniamnist, retinamnist, breastmnist, bloodmnist, tissuemnist, organamnist, organcmnist, "
                "organsmnist; for 2-D models), a built-in offline dataset `synthetic3d` / `synthetic2d`, or `csv`: your own "
                "files listed in `data.csv` (docs/own-data.md)"})
    root: str = field(default="~/.medmnist", metadata={
        "help": "folder holding the MedMNIST .npz files (relative paths are taken from the working directory)"})
    size: int = field(default=28, metadata={"choices": [28, 64, 128, 224], "help": "side: volumes 28 (MedMNIST v2) "
                                             "or 64 (MedMNIST+); images 28, 64, 128 or 224"})
    out_class_num: Optional[int] = field(default=None, metadata={
        "min": 1, "help": "optional check: must equal the class count of the dataset (from medmnist.INFO)"})
    download: bool = field(default=True, metadata={"help": "download a missing file (MD5-checked)"})
    csv: str = field(default="", metadata={
        "help": "with name `csv`: the CSV of your files (relative paths are taken from the working directory), with "
                "columns `path` (relative to the CSV), `label` (class index or name; or "
                "several `label_<name>` 0/1 columns: multi-label) and optional `split` (train/val/test)"})
    classes: list[str] = field(default_factory=list, metadata={
        "help": "`csv`: the class names in index order; empty = derived from the labels (integers 0..max, or the "
                "sorted names)"})
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2], metadata={
        "help": "`csv` without a split column: train/val/test fractions of the seeded stratified split"})
    split_seed: int = field(default=0, metadata={"min": 0, "max": 2**32 - 1, "help": "`csv`: seed of that split"})
    skip_bad: bool = field(default=False, metadata={
        "help": "`csv`: leave out (and list) files that cannot be read, instead of stopping"})
    window: Optional[list[float]] = field(default=None, metadata={
        "help": "`csv`: intensity window [low, high] (as predict.py --window); null = each volume's min/max"})
    resample: bool = field(default=True, metadata={
        "help": "`csv`: resample anisotropic NIfTI volumes to isotropic voxels before the resize (as predict.py --input)"})
    channels: int = field(default=1, metadata={"choices": [1, 3], "help": "`csv` of 2-D images: grey (1) or RGB (3)"})
    cache_dir: str = field(default="", metadata={
        "help": "`csv`: folder of the preprocessed .npz cache and the split file; empty = `<csv stem>_cache/` beside "
                "the CSV"})
    workers: int = field(default=4, metadata={"min": 1, "max": 64, "help": "`csv`: threads preprocessing the files"})
    device_cache: bool = field(default=True, metadata={
        "help": "keep the uint8 splits on the training device (they are small); false keeps them in host memory"})


@dataclass
class TrainConfig:
    epochs: int = field(default=100, metadata={"min": 1, "help": "paper Table 4 (the original base.json has 20)"})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "training batch size"})
    optimizer: str = field(default="adam", metadata={"choices": ["adam", "adamw", "sgd"], "help": "optimizer"})
    lr: float = field(default=1e-4, metadata={"min": 0.0, "help": "learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"min": 0.0, "help": "weight decay (original code; not in the paper)"})
    momentum: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0, "help": "SGD momentum, in [0, 1] (sgd only)"})
    scheduler: str = field(default="none", metadata={
        "choices": ["none", "multistep"],
        "help": "`multistep` multiplies the lr by `gamma` at each fraction of `milestones` (MedMNIST baseline recipe)"})
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75], metadata={
        "help": "fractions of the epochs at which `multistep` decays the lr"})
    gamma: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0, "help": "lr factor of `multistep`, in [0, 1] (a decay)"})
    seed: int = field(default=3407, metadata={
        "min": 0, "max": 2**32 - 1, "help": "seed of weights, shuffling, dropout and noise"})
    seeds: Optional[list[int]] = field(default=None, metadata={
        "help": "train one run per seed in one process, as one batched model (lmttm, ttm): the run of seed s goes "
                "to `<output.name>-seed<s>` and equals `--train.seed s` alone (README: Seeds in one process); "
                "null = one run of train.seed"})
    device: str = field(default="auto", metadata={"help": "`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ..."})
    amp: bool = field(default=False, metadata={"help": "bfloat16 autocast on CUDA (an addition; off = float32 as the paper)"})
    grad_clip: float = field(default=0.0, metadata={"min": 0.0, "help": "max gradient norm; 0 = off (as the original)"})
    keep_last_k: int = field(default=0, metadata={
        "min": 0, "help": "also keep the weights of the last k epochs (for predict.py --last-k, the paper's protocol)"})
    deterministic: bool = field(default=True, metadata={
        "help": "deterministic algorithms and no cuDNN autotuning (as the original); exact seeds and resume on CUDA "
                "too, at some speed cost there (nothing on the CPU)"})
    compile: str = field(default="none", metadata={
        "choices": ["none", "default", "reduce-overhead", "max-autotune"],
        "help": "torch.compile mode of the model's forward (an addition; `none` = eager). Checkpoints are the same "
                "either way: a compiled run resumes eagerly and vice versa"})
    dist_timeout_min: float = field(default=10.0, metadata={
        "min": 0.01, "max": 1440.0, "help": "torchrun only: minutes a rank waits for the others at a collective "
                                            "before stopping with one error line (a frozen or lost rank)"})
    tf32: bool = field(default=False, metadata={
        "help": "TF32 matrix products and convolutions on CUDA (an addition: faster on Ampere and newer GPUs, "
                "about 1e-3 relative error per product; off = float32 as the paper)"})


@dataclass
class EvalConfig:
    batch_size: int = field(default=64, metadata={"min": 1, "help": "evaluation batch size (results do not depend on it by default)"})
    split: str = field(default="test", metadata={"choices": ["train", "val", "test"], "help": "split predict.py scores"})
    last_k: int = field(default=0, metadata={
        "min": 0, "help": "0: MedMNIST protocol (best-validation-AUC checkpoint); k > 0: mean of the last k epoch checkpoints"})
    ci_resamples: int = field(default=2000, metadata={
        "min": 0, "help": "bootstrap resamples of the confidence intervals in predict.py's metrics.json (auc_ci, "
                          "acc_ci; stratified by class, seeded); 0 = no intervals"})
    ci_level: float = field(default=0.95, metadata={"min": 0.5, "max": 0.999, "help": "confidence level of those intervals"})


@dataclass
class OutputConfig:
    dir: str = field(default="runs", metadata={"help": "parent folder of run directories"})
    name: str = field(default="", metadata={
        "help": "run directory name; empty = the config file's name plus the settings the command line changes, "
                "e.g. runs/adrenalmnist3d-dim64-epochs4 (see the README)"})
    plots: bool = field(default=True, metadata={
        "help": "PNG plots (needs matplotlib; a note if missing): curves.png at the end of training; roc.png, "
                "confusion.png and reliability.png beside predict.py's metrics.json"})
    tensorboard: bool = field(default=False, metadata={
        "help": "TensorBoard scalars per epoch in <run dir>/tensorboard/ (needs the tensorboard package)"})


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "output": OutputConfig}


@dataclass
class Config:
    """A resolved config: one dataclass per section, `model` being the chosen model's dataclass."""

    data: DataConfig
    model_name: str
    model: Any
    train: TrainConfig
    eval: EvalConfig
    output: OutputConfig
    source: str = ""  # the config file it came from (for the default run name)
    default_name: str = ""  # set by load_config: the file's name plus the changed settings (engine/runname.py)
    overrides: dict = dataclasses.field(default_factory=dict)  # set by load_config: the command line's settings

    @property
    def run_name(self) -> str:
        """output.name, else the default name from the settings, else the config file's name."""
        return self.output.name or self.default_name or (Path(self.source).stem if self.source else self.data.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir).expanduser() / self.run_name


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------

def _suggest(key: str, accepted) -> str:
    close = difflib.get_close_matches(key, list(accepted), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; accepted keys: {', '.join(sorted(accepted))}"


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(where: str, f: dataclasses.Field, value):
    """Check `value` against the field's type and metadata; return it, coerced where lossless (int -> float)."""
    tp = f.type if not isinstance(f.type, str) else eval(f.type, {"list": list, "float": float, "int": int,  # noqa: S307
                                                                  "str": str, "bool": bool, "None": None,
                                                                  "Optional": Optional})
    origin = typing.get_origin(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item)}, got {value!r}")
        return [_check_scalar(f"{where}[{i}]", item, v, {}) for i, v in enumerate(value)]
    return _check_scalar(where, tp, value, f.metadata)


# Bound of every int key without a stated maximum: values beyond it are typos (or 1e23 read as an int), and
# would overflow torch, numpy or the memory long after the config was accepted.
INT_LIMIT = 2**31 - 1


def _check_scalar(where: str, tp, value, meta):
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int) and abs(value) > 2**53:
            raise ConfigError(f"{where} = {value} is too large for a float key")
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        hint = " (a whole number)" if tp is int and isinstance(value, float) else ""
        raise ConfigError(f"{where} must be {_type_name(tp)}{hint}, got {value!r} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if tp is int and "max" not in meta and abs(value) > INT_LIMIT:
        raise ConfigError(f"{where} = {value} is out of range (at most {INT_LIMIT})")
    if tp is str and "\x00" in value:
        raise ConfigError(f"{where} contains a NUL character: {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where} = {value!r} is not accepted; choose one of {meta['choices']}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where} = {value!r} is below its minimum {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where} = {value!r} is above its maximum {meta['max']}")
    return value


def _apply_section(where: str, cls: type, current: dict, layer: dict) -> dict:
    if not isinstance(layer, dict):
        raise ConfigError(f"{where} must be a JSON object, got {layer!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = dict(current)
    for key, value in layer.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}{_suggest(key, fields)}")
        out[key] = _check_value(f"{where}.{key}", fields[key], value)
    return out


# ----------------------------------------------------------------------------------------------------------
# resolution
# ----------------------------------------------------------------------------------------------------------

def resolve_config_path(name: str | Path) -> Path:
    """A path that exists is used as is; a bare name (`base`, `base.json`) is looked up in `config/`."""
    if not isinstance(name, (str, Path)) or not str(name):
        raise ConfigError(f"a config file must be named by a non-empty path, got {name!r}")
    if "\x00" in str(name):
        raise ConfigError(f"config file name {str(name)!r} contains a NUL character")
    path = Path(name).expanduser()
    try:
        if path.is_file():
            return path
        if path.exists():
            raise ConfigError(f"config file {str(name)!r} is a {'directory' if path.is_dir() else 'special file'}, "
                              f"not a JSON file")
        for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.json"):
            if candidate.is_file():
                return candidate
    except OSError as err:  # e.g. a name too long for the file system
        raise ConfigError(f"cannot use config path {str(name)[:80]!r}: {err.strerror or err}") from None
    raise ConfigError(f"config file {str(name)!r} not found (looked in the working directory and in {CONFIG_DIR})")


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """`object_pairs_hook` of json: a key given twice in one object is an error (json keeps the last silently)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_json_file(path: Path) -> Any:
    """The JSON content of a config file; every way it can be unreadable is a one-line ConfigError."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                          f"save it as UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: key {err.args[0]!r} appears twice in one JSON object; keep one") from None
    except RecursionError:
        raise ConfigError(f"{path} is not a config: its JSON is nested too deeply") from None


def _read_layers(path: Path, seen=()) -> list[tuple[str, dict]]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config files extend each other in a cycle: {' -> '.join(map(str, (*seen, path)))}")
    raw = _parse_json_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object (with sections such as \"train\"), "
                          f"not a {type(raw).__name__}")
    parent = raw.pop("extends", None)
    layers = []
    if parent is not None:
        if not isinstance(parent, str) or not parent.strip() or "\x00" in parent:
            raise ConfigError(f"{path}: \"extends\" must name a config file (a non-empty string such as "
                              f"\"base.json\"), got {json.dumps(parent)}")
        sibling = path.parent / Path(parent).expanduser()
        try:
            parent_path = sibling if sibling.is_file() else resolve_config_path(parent)
        except ConfigError as err:
            raise ConfigError(f"{path}: \"extends\": {err}") from None
        layers = _read_layers(parent_path, (*seen, path))
    return [*layers, (str(path), raw)]


def config_from_dict(layers: list[tuple[str, dict]], source: str = "") -> Config:
    """Merge `(origin, dict)` layers over the defaults into a validated `Config`."""
    values: dict[str, dict] = {name: {} for name in SECTIONS}
    model_name, model_values = "lmttm", {}
    accepted = {*SECTIONS, "model"}
    for origin, layer in layers:
        for section, content in layer.items():
            if section not in accepted:
                raise ConfigError(f"{origin}: unknown section {section!r}{_suggest(section, accepted)}")
            if section == "model":
                if not isinstance(content, dict):
                    raise ConfigError(f"{origin}: section model must be a JSON object")
                content = dict(content)
                new_name = content.pop("name", model_name)
                if new_name not in MODELS:
                    raise ConfigError(f"{origin}: model.name = {new_name!r} is not a registered model"
                                      f"{_suggest(new_name, MODELS)}")
                entry = get_model_entry(new_name)
                if new_name != model_name:  # keep the inherited keys the new model also accepts
                    names = {f.name for f in dataclasses.fields(entry.config_cls)}
                    model_values = {k: v for k, v in model_values.items() if k in names}
                    model_name = new_name
                try:
                    model_values = _apply_section("model", entry.config_cls, model_values, content)
                except ConfigError as err:
                    raise ConfigError(f"{origin}: {err}") from None
            else:
                try:
                    values[section] = _apply_section(section, SECTIONS[section], values[section], content)
                except ConfigError as err:
                    raise ConfigError(f"{origin}: {err}") from None
    try:
        model_cfg = get_model_entry(model_name).config_cls(**model_values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model {model_name}: {err}") from None
    _check_milestones(values["train"].get("milestones"))
    _check_run_name(values["output"].get("name"))
    return Config(data=DataConfig(**values["data"]), model_name=model_name, model=model_cfg,
                  train=TrainConfig(**values["train"]), eval=EvalConfig(**values["eval"]),
                  output=OutputConfig(**values["output"]), source=source)


def _check_milestones(milestones: list[float] | None) -> None:
    """`multistep` decays at epoch round(m * epochs) for each m: fractions in (0, 1], strictly increasing."""
    if not milestones:
        return
    for i, m in enumerate(milestones):
        if not 0 < m <= 1:
            raise ConfigError(f"train.milestones[{i}] = {m!r} is not a fraction of the epochs in (0, 1]; "
                              f"e.g. [0.5, 0.75] decays the lr at half and three quarters of the run")
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ConfigError(f"train.milestones = {milestones} must be strictly increasing")


# Longest accepted run directory name, in bytes: a file name may have 255, and `--restart` renames the run to
# `<name>.old-YYYYmmdd-HHMMSS` (20 more); the rest is room for the files other tools put beside it.
RUN_NAME_MAX_BYTES = 200


def _check_run_name(name: str | None) -> None:
    """output.name becomes one folder inside output.dir: a single path component, short enough for any file system."""
    if not name:
        return
    separators = [sep for sep in {"/", "\\", os.sep, os.altsep} if sep and sep in name]
    if separators:
        raise ConfigError(f"output.name = {name!r} must be a single folder name without {separators[0]!r}; "
                          f"put the parent folders in output.dir")
    if name.strip() in (".", ".."):
        raise ConfigError(f"output.name = {name!r} is not a folder name; choose a name for the run")
    size = len(os.fsencode(name))
    if size > RUN_NAME_MAX_BYTES:
        raise ConfigError(f"output.name is {size} bytes long; the run directory name must have at most "
                          f"{RUN_NAME_MAX_BYTES} bytes ({name[:40]!r}...)")


_OVERRIDE_KEY = re.compile(r"--[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_]")


def parse_overrides(args: list[str]) -> dict:
    """`['--train.epochs', '5', '--model.dim=64']` -> `{'train': {'epochs': 5}, 'model': {'dim': 64}}`.

    Values are read as JSON (numbers, true/false, null, lists) and otherwise kept as strings.
    """
    out: dict[str, dict] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"cannot read override {arg!r}; write overrides as --section.key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            if _OVERRIDE_KEY.match(args[i + 1]):
                raise ConfigError(f"override {arg} has no value (it is followed by {args[i + 1]}); "
                                  f"write {arg} VALUE")
            value, i = args[i + 1], i + 1
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise ConfigError(f"cannot read override {arg!r}; write overrides as --section.key value")
        if name in out.get(section, {}):  # as a key repeated in a JSON file: refused, not "the last one wins"
            raise ConfigError(f"--{key} is given twice on the command line ({json.dumps(out[section][name])} and "
                              f"{value}); give it once")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(section, {})[name] = parsed
        i += 1
    return out


def load_config(name: str | Path, overrides: list[str] | dict | None = None) -> Config:
    """Load a config file (bare name or path) with its `extends` chain and command-line overrides."""
    from engine.runname import run_name_of

    path = resolve_config_path(name)
    layers = _read_layers(path)
    given = (parse_overrides(overrides) if isinstance(overrides, list) else overrides) if overrides else {}
    cfg = config_from_dict([*layers, ("command line", given)] if given else layers, source=str(path))
    try:
        base = config_to_dict(config_from_dict(layers, source=str(path))) if given else None
    except ConfigError:  # the file alone does not resolve: every override names the run
        base = None
    cfg.default_name = run_name_of(path, config_to_dict(cfg), base, given)
    cfg.overrides = given
    _check_run_name(cfg.default_name)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as a JSON-ready dict that `config_from_dict` reads back to the same config."""
    return {"data": dataclasses.asdict(cfg.data), "model": {"name": cfg.model_name, **dataclasses.asdict(cfg.model)},
            "train": dataclasses.asdict(cfg.train), "eval": dataclasses.asdict(cfg.eval),
            "output": dataclasses.asdict(cfg.output)}


def describe_config(model_names=None, cfg: Config | None = None) -> str:
    """Markdown tables of every key with its default and meaning (used by `train.py --help-config`). With
    `cfg`, the tables of its sections and model only, with a column of its resolved values (`value`)."""
    lines = []
    resolved = config_to_dict(cfg) if cfg is not None else None

    def table(title, cls, section):
        header = "| key | value | default | meaning |" if resolved else "| key | default | meaning |"
        lines.extend([f"### `{title}`", "", header, "|---|---|---|---|" if resolved else "|---|---|---|"])
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            meta = f.metadata
            extra = f" (one of {', '.join(map(str, meta['choices']))})" if "choices" in meta else ""
            value = f" `{json.dumps(resolved[section][f.name])}` |" if resolved else ""
            lines.append(f"| `{f.name}` |{value} `{json.dumps(default)}` | {meta.get('help', '')}{extra} |")
        lines.append("")

    if cfg is not None:
        lines.extend([f"Resolved config of {cfg.source or 'the defaults'} with the given overrides; run directory "
                      f"{cfg.run_dir}", ""])
    for name, cls in SECTIONS.items():
        table(name, cls, name)
    groups: dict[type, list[str]] = {}  # models sharing one config dataclass share one table
    for name in ([cfg.model_name] if cfg is not None else model_names or sorted(MODELS)):
        groups.setdefault(get_model_entry(name).config_cls, []).append(name)
    for cls, names in groups.items():
        table(f"model` with `name` one of: `{'`, `'.join(names)}", cls, "model")
    return "\n".join(lines)
