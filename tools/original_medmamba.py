"""Side by side with the original MedMamba (github.com/YubiaoYue/MedMamba, `MedMamba.py`) and MedMambaSE
(github.com/Tanjim-Islam/MedMambaSE, the model cells of `main.ipynb`), loaded from a user's checkouts on the CPU.

    python tools/original_medmamba.py --medmamba PATH/TO/MedMamba --mamba PATH/TO/mamba --medmambase PATH/TO/MedMambaSE
    # or set MEDMAMBA_ORIGINAL, MAMBA_ORIGINAL, MEDMAMBASE_ORIGINAL; --quick: batch 1, no 224² training steps

Nothing of the originals is vendored. How they are loaded (`tools.original.load_definitions`):

* `MedMamba.py` imports `mamba_ssm`'s CUDA `selective_scan_fn` and builds three models on CUDA at import (its
  last lines). Only its imports, functions and classes run; its `selective_scan_fn` is the pure-PyTorch
  `selective_scan_ref` of a state-spaces/mamba checkout (`mamba_ssm/ops/selective_scan_interface.py`, of
  which only that function runs, so neither the CUDA extension nor triton is needed).
* MedMambaSE's notebook brings its own `selective_scan_ref` (a copy of mamba's) in its first code cell; the
  cells that define the scan and `VSSM` run, the training cells (torchvision, data folders) do not.
* Both import `DropPath`, `to_2tuple`, `trunc_normal_` from timm, which this project does not depend on:
  stand-ins from `tools.original.stub_timm` (DropPath is never active here: eval mode, or drop-path 0 for
  the training step; trunc_normal_ is torch's). Both set `DropPath.__repr__` at import: not run.

The weights are ours, copied by name (`original_name`, one small table; A_log (K, d, N) and D (K, d) are the
originals' flattened (K·d, N) and (K·d)); every BatchNorm gets random running statistics and affine
parameters, every LayerNorm random affine parameters, and the SSM's D and A_log are perturbed, so that a
swapped or missing tensor shows. Compared: eval-mode logits on a 3-channel input at the originals' sizes, and
the gradients of every parameter after one training step (cross-entropy, batch statistics, drop-path 0) at
64² by default: the reference scan's backward is O(L²) (hours at 224² on a CPU).

What cannot match by design: an odd side at a patch merging (the originals crop the last row / column with a
printed warning, ours pads with zeros; the `28² patch 2` row shows it and the first stage that differs) and
the 3-D variants (no original exists).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from model import build_model  # noqa: E402
from tools.original import OriginalError, load_definitions, stub_timm  # noqa: E402

ENV = {"medmamba": "MEDMAMBA_ORIGINAL", "mamba": "MAMBA_ORIGINAL", "medmambase": "MEDMAMBASE_ORIGINAL"}
MARKER = {"medmamba": "MedMamba.py", "mamba": "mamba_ssm/ops/selective_scan_interface.py",
          "medmambase": "main.ipynb"}
# our variant: (original file, depths, widths)
VARIANTS = {
    "medmamba_t": ("medmamba", [2, 2, 4, 2], [96, 192, 384, 768]),
    "medmamba_s": ("medmamba", [2, 2, 8, 2], [96, 192, 384, 768]),
    "medmamba_b": ("medmamba", [2, 2, 12, 2], [128, 256, 512, 1024]),
    "medmambase": ("medmambase", [2, 2, 2, 2], [96, 192, 384, 768]),
}
# our name -> the original's: model level (prefixes), then inside a block (exact names first, then prefixes)
TOP_NAMES = [("patch_embed.", "patch_embed.proj."), ("patch_norm.", "patch_embed.norm."), ("head.", "head.")]
BLOCK_NAMES = [
    ("ssm.A_log", "self_attention.A_logs"), ("ssm.D", "self_attention.Ds"),
    ("ssm.dt_proj_weight", "self_attention.dt_projs_weight"), ("ssm.dt_proj_bias", "self_attention.dt_projs_bias"),
    ("ssm.conv.", "self_attention.conv2d."), ("ssm.", "self_attention."), ("norm.", "ln_1."),
    ("conv.", "conv33conv33conv11."), ("se.", "se.fc."), ("mix.", "finalconv11."),
]


def find_checkout(kind: str, path: str | os.PathLike | None = None) -> Path | None:
    """`path`, else the environment variable of `kind` (medmamba, mamba, medmambase); None if neither is set."""
    value = path if path is not None else os.environ.get(ENV[kind])
    if not value:
        return None
    checkout = Path(value).expanduser()
    if not (checkout / MARKER[kind]).is_file():
        raise OriginalError(f"{checkout} is not a {kind} checkout (missing {MARKER[kind]})")
    return checkout


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------

def reference_scan(mamba: str | os.PathLike):
    """`selective_scan_ref` of a state-spaces/mamba checkout (only that function and the file's imports run)."""
    path = find_checkout("mamba", mamba) / MARKER["mamba"]
    return load_definitions(path.read_text(), str(path), keep={"selective_scan_ref"}).selective_scan_ref


def load_medmamba(checkout: str | os.PathLike, mamba: str | os.PathLike):
    """MedMamba.py's definitions, its `selective_scan_fn` being mamba's reference scan."""
    path = find_checkout("medmamba", checkout) / MARKER["medmamba"]
    return load_definitions(path.read_text(), str(path), namespace={"selective_scan_fn": reference_scan(mamba)},
                            modules=stub_timm())


def load_medmambase(checkout: str | os.PathLike):
    """The code cells of MedMambaSE's main.ipynb that define its scan and its model (not the training cells)."""
    path = find_checkout("medmambase", checkout) / MARKER["medmambase"]
    cells = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    wanted = [c for c in cells if re.search(r"^def selective_scan_fn\b|^class VSSM\b", c, re.M)]
    if len(wanted) != 2:
        raise OriginalError(f"{path}: expected one cell defining selective_scan_fn and one defining VSSM")
    return load_definitions("\n\n".join(wanted), str(path), modules=stub_timm())


# ----------------------------------------------------------------------------------------------------------
# weights by name
# ----------------------------------------------------------------------------------------------------------

def original_name(name: str, depths) -> str:
    """The original's name of our parameter or buffer `name` (stages.i.j: block j of stage i, or its merging)."""
    for ours, theirs in TOP_NAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    match = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", name)
    if match is None:
        raise KeyError(f"our {name} has no counterpart in the original")
    stage, index, rest = int(match[1]), int(match[2]), match[3]
    if index >= depths[stage]:
        return f"layers.{stage}.downsample.{rest}"
    for ours, theirs in BLOCK_NAMES:
        if rest == ours or (ours.endswith(".") and rest.startswith(ours)):
            return f"layers.{stage}.blocks.{index}.{theirs}{rest[len(ours):] if ours.endswith('.') else ''}"
    raise KeyError(f"our {name} has no counterpart in the original")


def copy_weights(ours: nn.Module, original: nn.Module, depths) -> None:
    """Load our state into the original; every tensor of either side must have exactly one counterpart."""
    theirs = original.state_dict()
    state = {}
    for name, value in ours.state_dict().items():
        target = original_name(name, depths)
        if target not in theirs or theirs[target].numel() != value.numel():
            raise KeyError(f"our {name} {tuple(value.shape)} does not fit the original's {target}")
        state[target] = value.detach().clone().reshape(theirs[target].shape)
    original.load_state_dict(state, strict=True)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial normalisation statistics and affine parameters, perturbed SSM D and A_log."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(("ssm.D", "ssm.A_log")):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def build_pair(files: dict, variant: str, *, input_size: int, num_classes: int = 6, depths=None, widths=None,
               patch_size: int = 4, drop_path_rate: float = 0.0, seed: int = 0):
    """(ours, original) with the same weights. `files`: {"medmamba": defs, "medmambase": defs} as loaded."""
    kind, default_depths, default_widths = VARIANTS[variant]
    depths, widths = depths or default_depths, widths or default_widths
    torch.manual_seed(seed)
    ours = build_model(variant, in_channels=3, num_classes=num_classes, input_size=input_size, depths=depths,
                       widths=widths, patch_size=patch_size, drop_path_rate=drop_path_rate, scan="sequential")
    randomize(ours, seed)
    original = files[kind].VSSM(patch_size=patch_size, in_chans=3, num_classes=num_classes, depths=depths,
                                dims=widths, drop_path_rate=drop_path_rate)
    copy_weights(ours, original, depths)
    return ours, original


# ----------------------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    case: str
    logits: float
    grads: float | None  # max |Δ| over every parameter's gradient after one training step
    grad_scale: float | None  # max |gradient|, for scale
    first_stage: str  # the first of patch embedding / stage i whose output differs beyond atol, or "-"
    atol: float
    expect_match: bool = True
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        matched = self.logits <= self.atol and (self.grads is None or self.grads <= self.atol * max(1.0, self.grad_scale))
        return matched == self.expect_match

    def row(self) -> str:
        grads = "-" if self.grads is None else f"{self.grads:.1e} (of {self.grad_scale:.1e})"
        verdict = ("yes" if self.ok else "NO") if self.expect_match else \
            ("differs, as documented" if self.ok else "UNEXPECTEDLY EQUAL")
        return f"| {self.case} | {self.logits:.1e} | {grads} | {self.first_stage} | {verdict} |"


def _stage_outputs(model: nn.Module, modules: list[nn.Module]):
    outputs, handles = [], [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach())) for m in modules]
    return outputs, handles


def compare_eval(ours, original, x, atol):
    """(max |Δ logits|, first differing stage) in eval mode; the originals' crop warnings are swallowed."""
    ours.eval(), original.eval()
    mine, h1 = _stage_outputs(ours, [ours.patch_norm, *ours.stages])
    theirs, h2 = _stage_outputs(original, [original.patch_embed, *original.layers])
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        a, b = ours(x), original(x)
    for h in h1 + h2:
        h.remove()
    first = "-"
    for i, (p, q) in enumerate(zip(mine, theirs)):
        if p.shape != q.shape or (p - q).abs().max().item() > atol:
            first = "patch embedding" if i == 0 else f"stage {i} {tuple(p.shape[1:3])} vs {tuple(q.shape[1:3])}"
            break
    return (a - b).abs().max().item(), first


def _relu_inputs(model: nn.Module):
    inputs = []
    handles = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().clone()))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    return inputs, handles


def compare_gradients(ours, original, x, target, depths):
    """(max |Δ grad|, max |grad|, kinks) after one cross-entropy backward in training mode (batch statistics).

    `kinks`: ReLU inputs whose sign differs between the two (values within float error of 0, where the
    derivative jumps): there the gradients legitimately differ by the whole upstream gradient. The ReLU
    modules are matched in call order (MedMambaSE's in-place SE ReLU is seen after it ran: the same sign test).
    """
    ours.train(), original.train()
    ours.zero_grad(), original.zero_grad()
    mine, h1 = _relu_inputs(ours)
    theirs_in, h2 = _relu_inputs(original)
    F.cross_entropy(ours(x), target).backward()
    F.cross_entropy(original(x), target).backward()
    for h in h1 + h2:
        h.remove()
    kinks = sum(int(((a > 0) != (b > 0)).sum()) for a, b in zip(mine, theirs_in))
    theirs = dict(original.named_parameters())
    worst = scale = 0.0
    for name, p in ours.named_parameters():
        q = theirs[original_name(name, depths)]
        worst = max(worst, (p.grad - q.grad.reshape(p.shape)).abs().max().item())
        scale = max(scale, p.grad.abs().max().item())
    return worst, scale, kinks


def run_case(files, variant, *, input_size, batch_size=1, train=True, train_size=None, atol=1e-4, label=None,
             expect_match=True, **build) -> Result:
    """Eval logits at `input_size` (batch `batch_size`), then one training step's gradients (batch 2) at
    `train_size` (default: the same): the reference scan's backward costs O(L²) (every step's slice of the
    (B, K·d, L, N) tensors gets a full-size gradient), hours at 224² on a CPU."""
    start = time.perf_counter()
    ours, original = build_pair(files, variant, input_size=input_size, **build)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=g)
    logits, first = compare_eval(ours, original, x, atol)
    grads = scale = None
    train_size = train_size or input_size
    skipped = 0
    for _ in range(3 if train else 0):  # an input whose ReLU inputs are all clear of the kink at 0 on both sides
        x2 = torch.randn(2, 3, train_size, train_size, generator=g)
        grads, scale, kinks = compare_gradients(ours, original, x2, torch.tensor([0, 1]), VARIANTS[variant][1]
                                                if build.get("depths") is None else build["depths"])
        if not kinks:
            break
        skipped += 1
    case = label or f"{variant} {input_size}²" + (f" (train step {train_size}²)" if train and train_size != input_size
                                                  else "")
    if skipped:
        case += (f"; {skipped} training input(s) skipped: a ReLU input within float error of 0" if skipped < 3 else
                 "; every training input had a ReLU input within float error of 0")
    return Result(case, logits, grads, scale, first, atol, expect_match, time.perf_counter() - start)


def all_cases(files: dict, *, quick: bool = False, train_size: int = 64, atol: float = 1e-4):
    """Yield the results: the 2-D variants at their own settings (eval: MedMamba 224², MedMambaSE 128² as its
    notebook; the training step at `train_size`), then an odd side (MedMamba-T at 28², patch 2: 14 -> 7 ->
    crop vs pad), which differs by design. `quick`: no training steps."""
    if "medmambase" in files:
        yield run_case(files, "medmambase", input_size=128, train=not quick, train_size=train_size, atol=atol)
    if "medmamba" in files:
        yield run_case(files, "medmamba_t", input_size=28, patch_size=2, train=False, atol=atol,
                       label="medmamba_t 28², patch 2 (odd side 7: crop vs pad)", expect_match=False)
        for variant in ("medmamba_t", "medmamba_s", "medmamba_b"):
            yield run_case(files, variant, input_size=224, train=not quick, train_size=train_size, atol=atol)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--medmamba", help=f"YubiaoYue/MedMamba checkout (default: ${ENV['medmamba']})")
    parser.add_argument("--mamba", help=f"state-spaces/mamba checkout, for its reference scan (default: ${ENV['mamba']})")
    parser.add_argument("--medmambase", help=f"Tanjim-Islam/MedMambaSE checkout (default: ${ENV['medmambase']})")
    parser.add_argument("--quick", action="store_true", help="eval logits only, no training steps")
    parser.add_argument("--train-size", type=int, default=64,
                        help="input side of the training step (the original's reference scan is O(L²) backward)")
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    try:
        files = {}
        medmamba, mamba = find_checkout("medmamba", args.medmamba), find_checkout("mamba", args.mamba)
        if medmamba is not None:
            if mamba is None:
                raise OriginalError(f"MedMamba needs a state-spaces/mamba checkout too (--mamba or ${ENV['mamba']})")
            files["medmamba"] = load_medmamba(medmamba, mamba)
        medmambase = find_checkout("medmambase", args.medmambase)
        if medmambase is not None:
            files["medmambase"] = load_medmambase(medmambase)
        if not files:
            print("original_medmamba: no checkout; pass --medmamba PATH --mamba PATH and/or --medmambase PATH "
                  f"(or set {', '.join(ENV.values())})", file=sys.stderr)
            return 2
    except (OriginalError, KeyError, ValueError, SyntaxError) as err:
        print(f"original_medmamba: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"eval: batch 1, 3 channels, 6 classes, random BN statistics; training step: batch 2, drop-path 0, "
          f"{args.train_size}²; "
          f"tolerance {args.atol:g} (gradients: relative to the largest when it exceeds 1)\n")
    print("| case | max abs diff, logits (eval) | max abs diff, gradients (train step) | first stage that differs | match |")
    print("|---|---|---|---|---|", flush=True)
    ok = True
    for r in all_cases(files, quick=args.quick, train_size=args.train_size, atol=args.atol):  # one row as each case finishes (minutes on a CPU)
        print(r.row(), flush=True)
        ok = ok and r.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
