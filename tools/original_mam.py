"""Side by side with the original Memory-Attention (MAM) code (github.com/CAU-COE-VEICLab/Recurrent-Attention,
formerly Memory-Attention), loaded from a user's checkout on the CPU.

    python tools/original_mam.py --original PATH/TO/Recurrent-Attention        # or set MAM_ORIGINAL

The original is segmentation code; its memory-attention layer exists in two hosts, and each is compared with
this project's operator (`model/memory_attention.py`) inside this project's pre-norm block (`model/vit.py`):

* **STS** (`DATransUnet-RecA/.../Architecture/DATransUNetRecA.py`): its ViT `Encoder` threads one memory
  through all its `Block`s (separate query / key / value Linears; LayerNorm eps 1e-6; GELU MLP; final
  LayerNorm). Ours: `Block`s chained by `thread_memory(..., "sts")`, then a LayerNorm.
* **ISTS** (`SwinUnet-RecA/networks/reca_swin_transformer_unet_encoder.py`): its `BasicLayer` (one stage of
  `RecASwinTransformerBlock`s) starts every stage from M = 0. Two stages with its `PatchMerging` between
  them; the window is the whole token map (so no shifted windows and no mask), and its relative position
  bias is set to zero: our blocks attend globally and have no such bias. Ours: `thread_memory(..., "ists")`
  with the original's own `PatchMerging` module as the transition.

Only the imports, functions and classes named in `STS_NAMES` / `ISTS_NAMES` run (`tools.original.
load_definitions`); the files' relative imports (`.configs`, `.block`) fail harmlessly and are not needed;
timm's `DropPath`, `to_2tuple`, `trunc_normal_` are stand-ins (`tools.original.stub_timm`; drop-path is 0).
Weights are ours, copied by name (`sts_name` / `ists_name`: our stacked `in_proj` is the original's query,
key and value Linears, or its `qkv` Linear), LayerNorm affine parameters and all biases random. Compared: the
output, the memory after every block (STS), and every parameter's gradient after one backward.

What differs by design, shown as controls: the LayerNorm eps (ours 1e-5, the DA-TransUNet host 1e-6; set to
1e-6 for the comparison, the row `eps as built` shows the effect), the Swin host's relative position bias,
and the memory switched off (plain attention).
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from model.memory_attention import thread_memory  # noqa: E402
from model.vit import Block  # noqa: E402
from tools.original import OriginalError, load_definitions, stub_timm  # noqa: E402

ENV_VAR = "MAM_ORIGINAL"
STS_FILE = "DATransUnet-RecA/DATransUnet-MAM/DATransUnet-MAM/Architecture/DATransUNetRecA.py"
ISTS_FILE = "SwinUnet-RecA/networks/reca_swin_transformer_unet_encoder.py"
STS_NAMES = {"swish", "ACT2FN", "Attention", "Mlp", "Block", "Encoder"}
ISTS_NAMES = {"Mlp", "window_partition", "window_reverse", "WindowRecurrentAttention", "RecASwinTransformerBlock",
              "PatchMerging", "BasicLayer"}
# inside one block: our name -> the original's (DA-TransUNet ViT block, Swin block)
STS_BLOCK = {"norm1.": "attention_norm.", "attn.out_proj.": "attn.out.", "norm2.": "ffn_norm.",
             "mlp.0.": "ffn.fc1.", "mlp.3.": "ffn.fc2."}
ISTS_BLOCK = {"norm1.": "norm1.", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
              "attn.out_proj.": "attn.proj.", "norm2.": "norm2.", "mlp.0.": "mlp.fc1.", "mlp.3.": "mlp.fc2."}


def find_checkout(path: str | os.PathLike | None = None) -> Path | None:
    value = path if path is not None else os.environ.get(ENV_VAR)
    if not value:
        return None
    checkout = Path(value).expanduser()
    missing = [f for f in (STS_FILE, ISTS_FILE) if not (checkout / f).is_file()]
    if missing:
        raise OriginalError(f"{checkout} is not a Recurrent-Attention (MAM) checkout (missing {', '.join(missing)})")
    return checkout


def load_originals(checkout) -> tuple[types.SimpleNamespace, types.SimpleNamespace]:
    """(DA-TransUNet-RecA definitions, Swin-RecA encoder definitions) from the checkout."""
    checkout = find_checkout(checkout)
    sts, ists = checkout / STS_FILE, checkout / ISTS_FILE
    return (load_definitions(sts.read_text(), str(sts), keep=STS_NAMES),
            load_definitions(ists.read_text(), str(ists), keep=ISTS_NAMES, modules=stub_timm()))


# ----------------------------------------------------------------------------------------------------------
# weights by name
# ----------------------------------------------------------------------------------------------------------

def _block_name(rest: str, table: dict) -> str:
    for ours, theirs in table.items():
        if rest == ours or (ours.endswith(".") and rest.startswith(ours)):
            return theirs + rest[len(ours):] if ours.endswith(".") else theirs
    raise KeyError(f"our block tensor {rest} has no counterpart in the original")


def sts_state(blocks: nn.ModuleList, norm: nn.LayerNorm) -> dict[str, torch.Tensor]:
    """Our STS chain's weights under the original `Encoder`'s names (in_proj split into query, key, value)."""
    state = {f"encoder_norm.{k}": v for k, v in norm.state_dict().items()}
    for i, block in enumerate(blocks):
        for name, value in block.state_dict().items():
            if name.startswith("attn.in_proj_"):
                kind = name.rsplit("_", 1)[1]  # weight / bias
                for part, chunk in zip(("query", "key", "value"), value.chunk(3)):
                    state[f"layer.{i}.attn.{part}.{kind}"] = chunk.clone()
            else:
                state[f"layer.{i}.{_block_name(name, STS_BLOCK)}"] = value.clone()
    return state


def ists_state(stages) -> dict[str, torch.Tensor]:
    """Our ISTS stages' weights under the original `BasicLayer`s' names (stage i -> BasicLayer i)."""
    return {f"{s}.blocks.{j}.{_block_name(name, ISTS_BLOCK)}": value.clone()
            for s, stage in enumerate(stages) for j, block in enumerate(stage)
            for name, value in block.state_dict().items()}


def randomize(module: nn.Module, seed: int) -> None:
    """Random LayerNorm affine parameters and biases (the inits make them 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or (name.endswith("weight") and p.dim() == 1):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    case: str
    output: float
    memory: float | None
    grads: float | None
    grad_scale: float  # max |gradient|: gradients are compared relative to it (when it exceeds 1)
    atol: float
    expect_match: bool | None = True  # None: shown for information, not a check

    @property
    def ok(self) -> bool:
        if self.expect_match is None:
            return True
        matched = self.output <= self.atol and (self.memory or 0.0) <= self.atol \
            and (self.grads or 0.0) <= self.atol * max(1.0, self.grad_scale)
        return matched == self.expect_match

    def row(self) -> str:
        fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
        verdict = ("yes" if self.ok else "NO") if self.expect_match else \
            ("differs, as documented" if self.ok else "UNEXPECTEDLY EQUAL")
        if self.expect_match is None:
            verdict = "for information"
        grads = f"{fmt(self.grads)} (of {self.grad_scale:.1e})"
        return f"| {self.case} | {fmt(self.output)} | {fmt(self.memory)} | {grads} | {verdict} |"


def _grad_diff(ours_named, theirs_named) -> tuple[float, float]:
    """(max |Δ grad|, max |grad|) over our parameters (or their chunks) and the original's of the same name."""
    theirs = dict(theirs_named)
    diff = max((p.grad - theirs[n].grad).abs().max().item() for n, p in ours_named.items())
    return diff, max(p.grad.abs().max().item() for p in ours_named.values())


def run_sts(sts, *, dim=32, heads=4, layers=3, tokens=10, batch=2, mlp_ratio=2.0, atol=1e-5, eps=1e-6,
            strategy="sts", label=None, expect_match=True, seed=0) -> Result:
    """Our STS chain against the original's ViT `Encoder` (memory threaded by its own loop)."""
    torch.manual_seed(seed)
    config = types.SimpleNamespace(hidden_size=dim, transformer={
        "num_heads": heads, "num_layers": layers, "mlp_dim": int(dim * mlp_ratio), "dropout_rate": 0.0,
        "attention_dropout_rate": 0.0})
    original = sts.Encoder(config, False)
    blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, 0.0) for _ in range(layers))
    norm = nn.LayerNorm(dim)
    randomize(blocks, seed), randomize(norm, seed + 1)
    for m in [*blocks.modules(), norm]:
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    original.load_state_dict(sts_state(blocks, norm), strict=True)
    x = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed + 2))
    a = norm(thread_memory([blocks], x, strategy))
    b, _ = original(x)
    weight = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed + 3))
    (a * weight).sum().backward()
    (b * weight).sum().backward()
    ours_named = {n: p for n, p in sts_state_params(blocks, norm)}
    grads, scale = _grad_diff(ours_named, original.named_parameters())
    memory = 0.0  # the memory after every block, each side threading it by hand
    with torch.no_grad():
        h1 = h2 = x
        m1 = m2 = None
        for mine, theirs in zip(blocks, original.layer):
            h1, m1 = mine(h1, m1, use_memory=strategy != "none")
            h2, _, m2 = theirs(h2, m2)
            if m1 is not None:
                memory = max(memory, (m1 - m2).abs().max().item())
    return Result(label or f"STS: ViT encoder, {layers} blocks", (a - b).abs().max().item(),
                  memory if strategy != "none" else None, grads, scale, atol, expect_match)


def sts_state_params(blocks, norm):
    """(original name, our parameter) pairs; the in_proj gradient is compared through views of its chunks."""
    for name, p in norm.named_parameters():
        yield f"encoder_norm.{name}", p
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            if not name.startswith("attn.in_proj_"):
                yield f"layer.{i}.{_block_name(name, STS_BLOCK)}", p
            else:
                kind = name.rsplit("_", 1)[1]
                for part, chunk in zip(("query", "key", "value"), range(3)):
                    yield f"layer.{i}.attn.{part}.{kind}", _Chunk(p, chunk)


class _Chunk:
    """The k-th third (along dim 0) of a parameter's gradient, as `.grad`."""

    def __init__(self, p, k):
        self.p, self.k = p, k

    @property
    def grad(self):
        return self.p.grad.chunk(3)[self.k]


def run_ists(ists, *, dim=16, heads=2, resolution=4, depth=2, batch=2, atol=1e-5, bias=False, strategy="ists",
             label=None, expect_match=True, seed=0) -> Result:
    """Two stages of our blocks (ISTS) against two of the original's Swin `BasicLayer`s, one window each."""
    torch.manual_seed(seed)
    merge = ists.PatchMerging((resolution, resolution), dim)
    with warnings.catch_warnings():  # its torch.meshgrid call without `indexing`
        warnings.simplefilter("ignore", UserWarning)
        original = nn.ModuleList([
            ists.BasicLayer(dim, (resolution, resolution), depth, heads, resolution, downsample=None),
            ists.BasicLayer(2 * dim, (resolution // 2, resolution // 2), depth, heads, resolution // 2)])
    stages = nn.ModuleList(nn.ModuleList(Block(d, heads, 4.0, 0.0) for _ in range(depth)) for d in (dim, 2 * dim))
    randomize(stages, seed), randomize(merge, seed + 1)
    state = ists_state(stages)
    for name, value in original.state_dict().items():
        if name.endswith("relative_position_bias_table"):
            state[name] = value if bias else torch.zeros_like(value)  # keep the original's init, or none (ours)
        elif name.endswith("relative_position_index"):
            state[name] = value
    original.load_state_dict(state, strict=True)
    x = torch.randn(batch, resolution * resolution, dim, generator=torch.Generator().manual_seed(seed + 2))
    a = thread_memory(stages, x, strategy, transitions=[merge])
    b = original[1](merge(original[0](x)))
    weight = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed + 3))
    (a * weight).sum().backward()
    ours_named = {f"{s}.blocks.{j}.{_block_name(n, ISTS_BLOCK)}": p for s, stage in enumerate(stages)
                  for j, block in enumerate(stage) for n, p in block.named_parameters()}
    ours_grads = {n: p.grad.clone() for n, p in ours_named.items()}
    for p in [*ours_named.values(), *merge.parameters()]:
        p.grad = None
    (b * weight).sum().backward()
    theirs = dict(original.named_parameters())
    grads = max((ours_grads[n] - theirs[n].grad).abs().max().item() for n in ours_grads)
    scale = max(g.abs().max().item() for g in ours_grads.values())
    return Result(label or f"ISTS: 2 Swin stages x {depth} blocks, patch merging between",
                  (a - b).abs().max().item(), None, grads, scale, atol, expect_match)


def all_cases(sts, ists, atol: float = 1e-5) -> list[Result]:
    return [
        run_sts(sts, atol=atol),
        run_sts(sts, layers=6, dim=64, heads=8, tokens=49, atol=atol, label="STS: ViT encoder, 6 blocks, 49 tokens"),
        run_ists(ists, atol=atol),
        run_ists(ists, dim=32, heads=4, resolution=8, depth=3, atol=atol,
                 label="ISTS: 2 Swin stages x 3 blocks, 8x8 -> 4x4 tokens"),
        run_sts(sts, atol=atol, eps=1e-5, label="STS, our LayerNorm eps as built (1e-5; the original's 1e-6)",
                expect_match=None),
        run_sts(sts, atol=atol, strategy="none", label="control: ours with the memory off (plain attention)",
                expect_match=False),
        run_ists(ists, atol=atol, bias=True, label="control: ISTS with the original's relative position bias",
                 expect_match=False),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", help=f"Recurrent-Attention checkout (default: ${ENV_VAR})")
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args(argv)
    try:
        checkout = find_checkout(args.original)
        if checkout is None:
            print(f"original_mam: no checkout of the original code; pass --original PATH or set {ENV_VAR}",
                  file=sys.stderr)
            return 2
        torch.set_num_threads(1)
        results = all_cases(*load_originals(checkout), atol=args.atol)
    except (OriginalError, KeyError, ValueError, SyntaxError) as err:
        print(f"original_mam: {err}", file=sys.stderr)
        return 2
    print(f"original: {checkout}; float32, tolerance {args.atol:g}\n")
    print("| case | max abs diff, output | max abs diff, memory after each block | max abs diff, gradients | match |")
    print("|---|---|---|---|---|")
    for r in results:
        print(r.row())
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
