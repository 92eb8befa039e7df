"""Load the original LMTTM-VMI model (github.com/hongkai-wei/LMTTM-VMI) from a user's checkout, on the CPU.

Nothing of the original is vendored here: `load_original(checkout, ...)` imports the checkout's own
`model/LMTTM.py` or `model/TTM.py` and builds its `TokenTuringMachineEncoder`, for side-by-side checks
(`tools/compare_original.py`, `tests/test_original.py`). What it takes care of:

* CUDA is hard-coded in the original (`.cuda()` in constructors and in `forward`). `cpu_only()` turns
  `torch.Tensor.cuda` and `torch.nn.Module.cuda` into no-ops while the model is built and while it runs
  (the returned `OriginalModel` enters it around every forward).
* The constructor builds a torchvision ResNet-18 stem that the default `3d` stem never runs; torchvision
  cannot be imported in this project, so a stub `torchvision.models.resnet18` (an empty module) stands in
  during the import.
* The original's `model` package is imported under a private module name, and its `config.configure`
  import is served from the checkout under a private name too, so neither clashes with this project's
  own `model` and `config` packages (`sys.modules` is restored afterwards).
* Its config object is a nested dict in `config/base.json`'s layout, built from the arguments.
* Its weights get the original's training-script init: Xavier-uniform weights and zero biases for every
  Linear, Conv1d, Conv2d and Conv3d (`seed` seeds torch first, as its train.py seeded 3407).

    from tools.original import load_original
    net = load_original("/path/to/LMTTM-VMI", model="lmttm", dim=16, memory_tokens=16, batch_size=4)
    logits, memory = net(x, None)      # the original's signature: (input, memory_tokens) -> (logits, memory)
    logits = net.step(x)               # or: carry the memory from call to call, as its train.py did
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch
from torch import nn

ENV_VAR = "LMTTM_ORIGINAL"
MODEL_FILES = {"lmttm": "LMTTM", "ttm": "TTM"}
PROCESSORS = ("transformer", "mlp", "mixer")
NOISE_MODES = ("normal", "uniform", "laplace", "exp", "gamma", "poisson", "none")


class OriginalError(RuntimeError):
    """The checkout is missing, incomplete or cannot be imported."""


def find_checkout(path: str | os.PathLike | None = None) -> Path | None:
    """`path`, else the `LMTTM_ORIGINAL` environment variable, as a checkout directory; None if neither is set."""
    value = path if path is not None else os.environ.get(ENV_VAR)
    if not value:
        return None
    checkout = Path(value).expanduser()
    missing = [f for f in ("model/LMTTM.py", "model/TTM.py", "model/TokenLearner.py", "config/configure.py")
               if not (checkout / f).is_file()]
    if missing:
        raise OriginalError(f"{checkout} is not an LMTTM-VMI checkout (missing {', '.join(missing)})")
    return checkout


# ----------------------------------------------------------------------------------------------------------
# CPU patch
# ----------------------------------------------------------------------------------------------------------

def _tensor_stays(self, *args, **kwargs):
    return self


@contextlib.contextmanager
def cpu_only():
    """Make `Tensor.cuda()` and `Module.cuda()` return their argument unchanged (restored on exit)."""
    saved = torch.Tensor.cuda, nn.Module.cuda
    torch.Tensor.cuda, nn.Module.cuda = _tensor_stays, _tensor_stays
    try:
        yield
    finally:
        torch.Tensor.cuda, nn.Module.cuda = saved


# ----------------------------------------------------------------------------------------------------------
# import
# ----------------------------------------------------------------------------------------------------------

def _stub_torchvision() -> dict[str, types.ModuleType]:
    """Stand-ins for `torchvision` and `torchvision.models` (resnet18 -> an empty module; never run)."""
    package = types.ModuleType("torchvision")
    package.__path__ = []  # a package, so `import torchvision.models` resolves through sys.modules
    models = types.ModuleType("torchvision.models")

    def resnet18(*args, **kwargs):
        return nn.Module()

    models.resnet18 = resnet18
    package.models = models
    return {"torchvision": package, "torchvision.models": models}


@contextlib.contextmanager
def _swapped_modules(entries: dict[str, types.ModuleType]):
    """Put `entries` into sys.modules for the duration, then restore what was there (or remove them)."""
    missing = object()
    saved = {name: sys.modules.get(name, missing) for name in entries}
    sys.modules.update(entries)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _load_file(name: str, path: Path, *, package_dir: Path | None = None) -> types.ModuleType:
    kwargs = {"submodule_search_locations": [str(package_dir)]} if package_dir is not None else {}
    spec = importlib.util.spec_from_file_location(name, path, **kwargs)
    if spec is None or spec.loader is None:
        raise OriginalError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_original(checkout: str | os.PathLike, model: str = "lmttm") -> types.ModuleType:
    """The checkout's `model/LMTTM.py` (model="lmttm") or `model/TTM.py` (model="ttm") as a module.

    Imported once per checkout under `_lmttm_original_<hash>.<LMTTM|TTM>`; the `torchvision` stub and the
    checkout's `config.configure` are visible only while it imports.
    """
    if model not in MODEL_FILES:
        raise ValueError(f"unknown original model {model!r}; choose one of {sorted(MODEL_FILES)}")
    checkout = find_checkout(checkout)
    if checkout is None:
        raise OriginalError(f"no checkout given (pass a path or set {ENV_VAR})")
    checkout = checkout.resolve()
    package = "_lmttm_original_" + hashlib.sha1(str(checkout).encode()).hexdigest()[:10]
    name = f"{package}.{MODEL_FILES[model]}"
    if name in sys.modules:
        return sys.modules[name]
    if package not in sys.modules:
        _load_file(package, checkout / "model" / "__init__.py", package_dir=checkout / "model")
    configure = sys.modules.get(f"{package}_configure") or _load_file(
        f"{package}_configure", checkout / "config" / "configure.py")
    config_package = types.ModuleType("config")
    config_package.__path__ = []
    config_package.configure = configure
    temporary = {**_stub_torchvision(), "config": config_package, "config.configure": configure}
    real_torchvision = "torchvision" in sys.modules
    if real_torchvision:  # someone imported the real one: leave it alone
        temporary = {k: v for k, v in temporary.items() if not k.startswith("torchvision")}
    try:
        with _swapped_modules(temporary), cpu_only():
            return importlib.import_module(name)
    except ImportError as err:
        sys.modules.pop(name, None)
        raise OriginalError(f"cannot import {checkout / 'model' / (MODEL_FILES[model] + '.py')}: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# loading definitions only (for originals whose files run demo code at import)
# ----------------------------------------------------------------------------------------------------------

class _DropPath(nn.Module):
    """Stand-in for timm's `DropPath`: zero a sample's branch with probability `drop_prob` in training, scale
    the rest by 1 / (1 - p); the identity in eval or at p = 0 (the only uses the comparisons make)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = float(drop_prob or 0.0)

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def stub_timm() -> dict[str, types.ModuleType]:
    """Stand-ins for `timm.models.layers` (DropPath, to_2tuple, trunc_normal_ = torch's trunc_normal_).

    timm is not a dependency of this project; the originals import only these three names from it.
    """
    package, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
    package.__path__, models.__path__ = [], []
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = _DropPath, _to_2tuple, nn.init.trunc_normal_
    package.models, models.layers = models, layers
    return {"timm": package, "timm.models": models, "timm.models.layers": layers}


class Definitions(types.SimpleNamespace):
    """What `load_definitions` executed: the namespace's names as attributes, plus `skipped` (line ranges of
    the top-level statements not run) and `failed_imports` (import lines that raised ImportError)."""


def load_definitions(source: str, filename: str, *, keep: set[str] | None = None,
                     namespace: dict | None = None, modules: dict[str, types.ModuleType] | None = None) -> Definitions:
    """Run only the imports, functions and classes of a Python source, never its other top-level code.

    Top-level `import` statements run (with `modules` visible in sys.modules meanwhile; one that raises
    ImportError is recorded and skipped), then every `def` / `class` (only those named in `keep`, if given)
    and every plain `NAME = ...` assignment named in `keep`. Everything else at top level (try blocks,
    attribute assignments, demo code that builds models on CUDA or prints) is not executed; its lines are
    listed in `skipped`. `namespace` is pre-filled (e.g. a replacement for a name the skipped code imported).
    """
    import ast

    tree = ast.parse(source, filename)
    env: dict = {"__name__": "_original_" + Path(filename).stem, "__file__": filename, "__builtins__": __builtins__}
    env.update(namespace or {})
    skipped, failed = [], []
    with _swapped_modules(modules or {}):
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                run, is_import = True, True
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                run, is_import = keep is None or node.name in keep, False
            elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
                run, is_import = keep is not None and all(t.id in keep for t in node.targets), False
            else:
                run, is_import = False, False
            if not run:
                if not isinstance(node, ast.Expr) or not isinstance(getattr(node, "value", None), ast.Constant):
                    skipped.append((node.lineno, node.end_lineno))
                continue
            code = compile(ast.Module(body=[node], type_ignores=[]), filename, "exec")
            try:
                exec(code, env)
            except ImportError:
                if not is_import:
                    raise
                failed.append(node.lineno)
    missing = sorted((keep or set()) - set(env))
    if missing:
        raise OriginalError(f"{filename} does not define {', '.join(missing)}")
    names = {k: v for k, v in env.items() if not k.startswith("__")}
    return Definitions(**names, skipped=skipped, failed_imports=failed)


# ----------------------------------------------------------------------------------------------------------
# build
# ----------------------------------------------------------------------------------------------------------

def original_config(*, model: str = "lmttm", dim: int, memory_tokens: int, batch_size: int, num_classes: int = 2,
                    processor: str = "transformer", noise: str = "normal", blocks: int = 4, read_tokens: int = 8,
                    patch_size: int = 3, dropout: float = 0.2, in_channels: int = 1, input_size: int = 28,
                    stem: str = "3d", memory_mode: str = "TL", pos_embedding: bool = True,
                    carry_memory: bool = True, **model_keys) -> dict:
    """The original's config (nested dict, the layout of its config/base.json) for these settings.

    `noise="none"` turns its `load_memory_add_noise` off; `pos_embedding` sets both
    `Read_use_positional_embedding` and `Write_use_positional_embedding`; `carry_memory` is its
    `train.load_memory_tokens` (what `OriginalModel.step` follows). Further keyword arguments set keys of
    its `model` section by their original names.
    """
    if processor not in PROCESSORS:
        raise ValueError(f"unknown processor {processor!r}; choose one of {list(PROCESSORS)}")
    if noise not in NOISE_MODES:
        raise ValueError(f"unknown noise {noise!r}; choose one of {list(NOISE_MODES)}")
    section = {
        "model": model, "drop_r": dropout, "preprocess_mode": stem, "process_unit": processor,
        "memory_mode": memory_mode, "in_channels": in_channels, "dim": dim, "memory_tokens_size": memory_tokens,
        "num_blocks": blocks, "summerize_num_tokens": read_tokens, "step": 28, "out_class_num": num_classes,
        "patch_size": patch_size, "Read_use_positional_embedding": pos_embedding,
        "Write_use_positional_embedding": pos_embedding, "load_memory_add_noise": noise != "none",
        "load_memory_add_noise_mode": "None" if noise == "none" else noise,
    }
    unknown = sorted(set(model_keys) - set(section))
    if unknown:
        raise ValueError(f"unknown keys of the original's model section: {', '.join(unknown)}")
    section.update(model_keys)
    return {"batch_size": batch_size, "dataset_name": "adrenalmnist3d", "model": section,
            "train": {"epoch": 20, "optimizer": "Adam", "lr": 1e-4, "weight_decay": 1e-4,
                      "load_memory_tokens": carry_memory, "input_H": input_size, "input_W": input_size}}


def original_init(module: nn.Module) -> None:
    """The original train.py's init: Xavier-uniform weights, zero biases (Linear, Conv1d/2d/3d)."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class OriginalModel(nn.Module):
    """The original `TokenTuringMachineEncoder`, run on the CPU.

    `forward(x, memory_tokens=None)` is the original's own call: returns (logits, memory). `step(x)`
    carries the memory from call to call as its train.py did (`train.load_memory_tokens`).
    """

    def __init__(self, encoder: nn.Module, config: dict, kind: str):
        super().__init__()
        self.encoder = encoder
        self.config = config
        self.kind = kind
        self.memory: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, memory_tokens: torch.Tensor | None = None):
        with cpu_only():
            return self.encoder(x, memory_tokens)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        carry = self.config["train"]["load_memory_tokens"]
        logits, memory = self(x, self.memory if carry else None)
        self.memory = memory
        return logits

    @property
    def pointer(self) -> int | None:
        """LMTTM's block pointer (`current_flag`, never reset in the original); None for TTM."""
        dnc = getattr(self.encoder, "simpleDNC", None)
        return None if dnc is None else dnc.current_flag

    def reset_state(self) -> None:
        """Forget the carried memory and reset the block pointer (the original never did)."""
        self.memory = None
        if getattr(self.encoder, "simpleDNC", None) is not None:
            self.encoder.simpleDNC.current_flag = 0


def load_original(checkout: str | os.PathLike, *, model: str = "lmttm", dim: int, memory_tokens: int,
                  batch_size: int, num_classes: int = 2, processor: str = "transformer", noise: str = "normal",
                  blocks: int = 4, read_tokens: int = 8, patch_size: int = 3, dropout: float = 0.2,
                  seed: int | None = None, init: bool = True, **more) -> OriginalModel:
    """Build the original `TokenTuringMachineEncoder` (`model` = "lmttm" or "ttm") from `checkout` on the CPU.

    `more` goes to `original_config` (in_channels, input_size, stem, memory_mode, pos_embedding,
    carry_memory, or keys of the original's model section). `seed` seeds torch before the build; `init`
    applies the original's Xavier init. Every batch must have `batch_size` samples (the original's
    shapes depend on it).
    """
    module = import_original(checkout, model)
    config = original_config(model=model, dim=dim, memory_tokens=memory_tokens, batch_size=batch_size,
                             num_classes=num_classes, processor=processor, noise=noise, blocks=blocks,
                             read_tokens=read_tokens, patch_size=patch_size, dropout=dropout, **more)
    if seed is not None:
        torch.manual_seed(seed)
    with cpu_only():
        encoder = module.TokenTuringMachineEncoder(config)
    if init:
        encoder.apply(original_init)
    return OriginalModel(encoder, config, model)
