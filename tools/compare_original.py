"""Side-by-side check of this project's LMTTM and TTM against the original code (LMTTM-VMI) itself.

    python tools/compare_original.py --original /path/to/LMTTM-VMI        # or set LMTTM_ORIGINAL
    python tools/compare_original.py --original ... --dim 32 --memory-tokens 32 --batch-size 8 --batches 4

Both implementations get the same weights (`original_state_from_ours`: our Linear weights are the
original's kernel-1 Conv1d weights of the TokenLearner, our head is its `cls`, ...) and run the same
consecutive batches (28³ volumes, dropout 0). Before each forward torch is seeded with the same seed for
both, so the random draws line up: the fresh positional embeddings (one read draw, then one write draw per
step) and the memory noise at the end of the forward (gamma: numpy reseeded inside, as the original).

Cases (each for LMTTM and TTM):

* `compat`: ours with `official_compat` against the original as it ran (memory carried from batch to
  batch, LMTTM's never-reset block pointer, noise at the end of every forward, batch-mixing attention,
  random positional embeddings), in eval and in train mode, every noise mode, the transformer and the mlp
  processor. Compared: logits, the carried memory and the block pointer after every batch.
* `default`: ours with its defaults against the original with exactly the documented departures
  (docs/spec/LMTTM.md §9) switched on in it: per-sample attention (its layer's `batch_first` set), our learned positional
  embeddings in place of its fresh draws, memory and pointer reset before every batch, no noise reaching
  the logits. Equal logits here show the default differs from the original only by those departures.

The tolerance is `--atol` (default 1e-5; float32 on the CPU; the summation order of some ops differs,
e.g. the head's mean and PyTorch's fused eval path of the batch-first encoder layer). The output is one
row per case with the largest absolute differences; exit status 0 when every row matches, 1 otherwise,
2 when no checkout is given or it cannot be loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from model import build_model  # noqa: E402
from tools.original import ENV_VAR, OriginalError, OriginalModel, find_checkout, load_original  # noqa: E402

UNIT = "tokenTuringMachineUnit."
# our parameter / buffer name prefix -> the original's (TokenLearner Conv1d kernel 1 <- our Linear)
NAME_MAP = [
    ("stem.conv.", "pre1.conv."),
    ("stem.net.0.", "pre2.conv."), ("stem.net.1.", "pre2.bn1."), ("stem.net.3.", "pre2.conv2."),
    ("stem.net.4.", "pre2.bn2."),
    ("reader.norm.", UNIT + "tokenLearner1.norm."),
    ("reader.hidden.", UNIT + "tokenLearner1.attention_maps.0."),
    ("reader.to_logits.", UNIT + "tokenLearner1.attention_maps.2."),
    ("reader.to_features.", UNIT + "tokenLearner1.feat_conv."),
    ("writer.norm.", UNIT + "tokenLearner2.norm."),
    ("writer.hidden.", UNIT + "tokenLearner2.attention_maps.0."),
    ("writer.to_logits.", UNIT + "tokenLearner2.attention_maps.2."),
    ("writer.to_features.", UNIT + "tokenLearner2.feat_conv."),
    ("processor.layer.", UNIT + "transformerBlock."),
    ("processor.norm.", UNIT + "norm."),
    ("processor.block.", UNIT + "mlpBlock."),
    ("processor.token_mixing.", UNIT + "mixer_sequence_block."),
    ("processor.channel_mixing.", UNIT + "mixer_channels__block."),
    ("head.", "cls."),
]
NOT_IN_ORIGINAL = ("pos_read", "pos_write", "_extra_state")  # learned embeddings (ours), carried state


def original_name(name: str) -> str | None:
    for ours, theirs in NAME_MAP:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return None


def original_state_from_ours(ours: nn.Module, original: nn.Module) -> dict[str, torch.Tensor]:
    """The original encoder's tensors that our model's weights determine, under the original's names.

    Every parameter and buffer of ours except the learned positional embeddings must have a counterpart
    of the same number of elements (a kernel-1 Conv1d weight (out, in, 1) is our Linear weight (out, in)).
    """
    theirs = original.state_dict()
    out = {}
    for name, value in ours.state_dict().items():
        if name.endswith(NOT_IN_ORIGINAL) or not isinstance(value, torch.Tensor):
            continue
        target = original_name(name)
        if target is None or target not in theirs:
            raise KeyError(f"our {name} has no counterpart in the original ({target or 'unmapped'})")
        if theirs[target].numel() != value.numel():
            raise ValueError(f"our {name} {tuple(value.shape)} does not fit the original's {target} "
                             f"{tuple(theirs[target].shape)}")
        out[target] = value.detach().clone().reshape(theirs[target].shape)
    return out


def copy_weights(ours: nn.Module, original: OriginalModel | nn.Module) -> None:
    """Load our weights into the original (`OriginalModel` or its encoder)."""
    encoder = getattr(original, "encoder", original)
    encoder.load_state_dict(original_state_from_ours(ours, encoder), strict=False)


@contextlib.contextmanager
def fixed_positional_embeddings(original: OriginalModel, read: torch.Tensor, write: torch.Tensor):
    """Make the original's per-call positional draws return `read` / `write` (chosen by length) instead.

    The original draws with `init.normal_` of its module's `init` (torch.nn.init); this swaps that
    module global for the duration.
    """
    module = sys.modules[type(original.encoder).__module__]
    real = module.init
    by_length = {read.size(1): read, write.size(1): write}
    if len(by_length) != 2:
        raise ValueError("read and write positional embeddings have the same length; cannot tell them apart")

    def normal_(tensor, mean=0.0, std=1.0, generator=None):
        with torch.no_grad():
            return tensor.copy_(by_length[tensor.size(1)])

    module.init = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})
    module.init.normal_ = normal_
    try:
        yield
    finally:
        module.init = real


def per_sample_attention(original: OriginalModel) -> None:
    """Switch the original's encoder layer to batch-first (tokens of a sample attend to each other)."""
    layer = original.encoder.tokenTuringMachineUnit.transformerBlock
    layer.batch_first = True
    layer.self_attn.batch_first = True


# ----------------------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    case: str
    logits: float  # max |Δ| over all batches
    memory: float | None  # carried memory (compat) or None
    pointer_ok: bool | None
    atol: float

    @property
    def ok(self) -> bool:
        return self.logits <= self.atol and (self.memory is None or self.memory <= self.atol) \
            and self.pointer_ok is not False

    def row(self) -> str:
        memory = "-" if self.memory is None else f"{self.memory:.2e}"
        pointer = "-" if self.pointer_ok is None else ("equal" if self.pointer_ok else "DIFFERENT")
        return f"| {self.case} | {self.logits:.2e} | {memory} | {pointer} | {'yes' if self.ok else 'NO'} |"


def make_batches(count: int, batch_size: int, size: int = 28, seed: int = 0) -> list[torch.Tensor]:
    """`count` batches of uint8-valued volumes scaled to [0, 1] (as the data pipeline feeds them)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (batch_size, 1, size, size, size), generator=g).float() / 255 for _ in range(count)]


def build_pair(checkout, kind: str, *, dim: int, memory_tokens: int, batch_size: int, processor: str = "transformer",
               noise: str = "normal", compat: bool = True, stem: str = "3d", size: int = 28, seed: int = 0):
    """(ours, original) with the same weights; dropout 0 (the draws of dropout masks cannot line up)."""
    torch.manual_seed(seed)
    ours = build_model(kind, in_channels=1, num_classes=2, input_size=size, dim=dim, memory_tokens=memory_tokens,
                       processor=processor, noise=noise, dropout=0.0, official_compat=compat, stem=stem)
    original = load_original(checkout, model=kind, dim=dim, memory_tokens=memory_tokens, batch_size=batch_size,
                             processor=processor, noise=noise, dropout=0.0, stem=stem, pos_embedding=True,
                             input_size=size)
    copy_weights(ours, original)
    return ours, original


def run_compat(checkout, kind: str, *, train: bool, dim: int, memory_tokens: int, batch_size: int, batches: int,
               processor: str = "transformer", noise: str = "normal", atol: float = 1e-5, size: int = 28,
               compat: bool = True) -> Result:
    """Ours under `official_compat` against the original as it ran, on `batches` consecutive batches."""
    ours, original = build_pair(checkout, kind, dim=dim, memory_tokens=memory_tokens, batch_size=batch_size,
                                processor=processor, noise=noise, size=size, compat=compat)
    ours.train(train)
    original.train(train)
    worst_logits, worst_memory, pointer_ok = 0.0, 0.0, None if kind == "ttm" else True
    with torch.set_grad_enabled(train):
        for i, x in enumerate(make_batches(batches, batch_size, size)):
            torch.manual_seed(1000 + i)
            a = ours(x)
            torch.manual_seed(1000 + i)
            b = original.step(x)
            worst_logits = max(worst_logits, (a - b).abs().max().item())
            if ours._carried_memory is not None:  # None: a control run without compat_carry_memory
                worst_memory = max(worst_memory, (ours._carried_memory - original.memory).abs().max().item())
            if kind == "lmttm":
                pointer_ok = pointer_ok and ours._pointer == original.pointer % ours.cfg.blocks
    mode = "train" if train else "eval"
    return Result(f"compat {kind} {processor} noise={noise} {mode}", worst_logits, worst_memory, pointer_ok, atol)


def run_default(checkout, kind: str, *, train: bool, dim: int, memory_tokens: int, batch_size: int, batches: int,
                processor: str = "transformer", atol: float = 1e-5, size: int = 28) -> Result:
    """Ours with its defaults against the original with the documented departures switched on in it.

    In train mode our per-write noise is a further documented departure, so noise is off there (`none`);
    in eval mode our default adds no noise and the original's end-of-forward noise never reaches the logits
    because its memory is reset before every batch.
    """
    noise = "none" if train else "normal"
    ours, original = build_pair(checkout, kind, dim=dim, memory_tokens=memory_tokens, batch_size=batch_size,
                                processor=processor, noise=noise, compat=False, size=size)
    with torch.no_grad():  # learned embeddings with values, so that a wrong slot or order shows
        ours.pos_read.normal_(std=0.02)
        ours.pos_write.normal_(std=0.02)
    if processor == "transformer":
        per_sample_attention(original)
    ours.train(train)
    original.train(train)
    worst = 0.0
    with torch.set_grad_enabled(train), fixed_positional_embeddings(original, ours.pos_read.detach(),
                                                                     ours.pos_write.detach()):
        for i, x in enumerate(make_batches(batches, batch_size, size)):
            original.reset_state()
            torch.manual_seed(1000 + i)
            a = ours(x)
            torch.manual_seed(1000 + i)
            b = original.step(x)
            worst = max(worst, (a - b).abs().max().item())
    mode = "train" if train else "eval"
    return Result(f"default {kind} {processor} {mode}", worst, None, None, atol)


def all_cases(checkout, *, dim: int, memory_tokens: int, batch_size: int, batches: int, atol: float, size: int = 28,
              noises=("normal", "uniform", "laplace", "exp", "gamma", "poisson", "none")) -> list[Result]:
    common = dict(dim=dim, memory_tokens=memory_tokens, batch_size=batch_size, batches=batches, atol=atol, size=size)
    results = []
    for kind in ("lmttm", "ttm"):
        for train in (False, True):
            results.append(run_compat(checkout, kind, train=train, **common))
        for noise in noises:
            if noise != "normal":
                results.append(run_compat(checkout, kind, train=False, noise=noise, **common))
        for train in (False, True):
            results.append(run_compat(checkout, kind, train=train, processor="mlp", **common))
        for processor in ("transformer", "mlp"):
            for train in (False, True):
                results.append(run_default(checkout, kind, train=train, processor=processor, **common))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", help=f"path of an LMTTM-VMI checkout (default: ${ENV_VAR})")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--memory-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3, help="consecutive batches per case")
    parser.add_argument("--size", type=int, default=28, help="input volume side (28: 9 steps of 81 tokens)")
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    try:
        checkout = find_checkout(args.original)
        if checkout is None:
            print(f"compare_original: no checkout of the original code; pass --original PATH or set {ENV_VAR}",
                  file=sys.stderr)
            return 2
        torch.set_num_threads(1)  # tiny tensors: more threads only spin on a shared machine
        results = all_cases(checkout, dim=args.dim, memory_tokens=args.memory_tokens, batch_size=args.batch_size,
                            batches=args.batches, atol=args.atol, size=args.size)
    except (OriginalError, KeyError, ValueError) as err:
        print(f"compare_original: {err}", file=sys.stderr)
        return 2
    print(f"original: {checkout}; D = {args.dim}, M = {args.memory_tokens}, batch {args.batch_size}, "
          f"input {args.size}³, "
          f"{args.batches} consecutive batches per case, dropout 0, tolerance {args.atol:g}\n")
    print("| case | max abs diff, logits | max abs diff, carried memory | block pointer | match |")
    print("|---|---|---|---|---|")
    for r in results:
        print(r.row())
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)} of {len(results)} cases match")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
