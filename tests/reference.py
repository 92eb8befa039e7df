"""A hand-written reference of TTM and LMTTM (spec `docs/spec/LMTTM.md` §1-§6, §8, §9.1/§9.3/§9.4).

It shares no code with `model/`: it reads the model's weights from `model.state_dict()` by key and
recomputes the forward pass with plain tensor operations (its own LayerNorm, GELU, softmax, attention,
stem patches, block schedule). Dropout is left out, so compare with a model in eval mode or with dropout 0.

The functions take `W`, a dict of tensors (a state_dict), and `cfg`, a dict of plain values:
    name ("ttm"/"lmttm"), dim, memory_tokens, read_tokens, blocks (LMTTM), heads, processor, repeats,
    stem ("3d"/"3dBN"), patch (depth, height, width), batch_attention (bool).
`reference_cfg(model)` builds that dict from a model's config.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

EPS = 1e-5  # LayerNorm and BatchNorm epsilon (the torch default the model uses)

# noise hook: called with (step, written tokens) after every write, returns the tokens to keep
NoiseHook = Optional[Callable[[int, torch.Tensor], torch.Tensor]]


def reference_cfg(model) -> dict:
    c = model.cfg
    return {"name": "lmttm" if hasattr(c, "blocks") else "ttm", "dim": c.dim, "memory_tokens": c.memory_tokens,
            "read_tokens": c.read_tokens, "blocks": getattr(c, "blocks", 1), "heads": c.heads,
            "processor": c.processor, "repeats": c.processor_repeats, "stem": c.stem,
            "patch": (c.depth_patch_size or c.patch_size, c.patch_size, c.patch_size),
            "batch_attention": bool(c.compat_batch_attention)}


# ----------------------------------------------------------------------------------------------------------
# elementary operations, written out
# ----------------------------------------------------------------------------------------------------------

def layer_norm(x, weight, bias):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance
    return (x - mean) / torch.sqrt(var + EPS) * weight + bias


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact (erf) GELU


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def softmax(x, dim):
    e = torch.exp(x - x.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


def linear(x, weight, bias=None):
    y = torch.einsum("...i,oi->...o", x, weight)
    return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------------------
# §1 stem
# ----------------------------------------------------------------------------------------------------------

def patchify_conv(x, weight, bias, patch):
    """Conv3d with kernel = stride = patch and no padding, as non-overlapping patches: (B, C, S, S, S) ->
    (B, O, T, h, w). The remainder a patch does not cover is dropped."""
    pd, ph, pw = patch
    B, C, S1, S2, S3 = x.shape
    T, h, w = S1 // pd, S2 // ph, S3 // pw
    p = x[:, :, :T * pd, :h * ph, :w * pw].reshape(B, C, T, pd, h, ph, w, pw)
    return torch.einsum("bctahiwj,ocaij->bothw", p, weight) + bias[None, :, None, None, None]


def batch_norm_eval(x, W, prefix):
    shape = (1, -1, 1, 1, 1)
    mean, var = W[prefix + ".running_mean"].view(shape), W[prefix + ".running_var"].view(shape)
    return (x - mean) / torch.sqrt(var + EPS) * W[prefix + ".weight"].view(shape) + W[prefix + ".bias"].view(shape)


def stem(W, cfg, x):
    """(B, C, S, S, S) -> tokens (B, T, n, D); token j of step t is the patch at row j // w, col j % w."""
    if cfg["stem"] == "3d":
        y = relu(patchify_conv(x, W["stem.conv.weight"], W["stem.conv.bias"], cfg["patch"]))
    elif cfg["stem"] == "3dBN":  # BatchNorm with running statistics (eval mode)
        y = relu(batch_norm_eval(patchify_conv(x, W["stem.net.0.weight"], W["stem.net.0.bias"], cfg["patch"]),
                                 W, "stem.net.1"))
        y = F.conv3d(y, W["stem.net.3.weight"], W["stem.net.3.bias"], padding=1)
        y = relu(batch_norm_eval(y, W, "stem.net.4"))
    else:
        raise ValueError(cfg["stem"])
    B, D, T, h, w = y.shape
    return y.permute(0, 2, 3, 4, 1).reshape(B, T, h * w, D)


# ----------------------------------------------------------------------------------------------------------
# §2 token summariser
# ----------------------------------------------------------------------------------------------------------

def summarise(W, prefix, X):
    """X (B, N, D) -> Z (B, R, D): LN on the logits branch only; softmax over the N input tokens."""
    Xn = layer_norm(X, W[prefix + ".norm.weight"], W[prefix + ".norm.bias"])
    logits = linear(gelu(linear(Xn, W[prefix + ".hidden.weight"])), W[prefix + ".to_logits.weight"])  # (B, N, R)
    A = softmax(logits, dim=1)  # over the N tokens
    Fe = gelu(linear(X, W[prefix + ".to_features.weight"]))  # (B, N, D), un-normalised X
    return torch.einsum("bnr,bnd->brd", A, Fe)  # Z[r] = sum_i A[i, r] F[i]


# ----------------------------------------------------------------------------------------------------------
# §5 processors
# ----------------------------------------------------------------------------------------------------------

def attention(W, prefix, x, heads):
    """Multi-head self-attention over axis 1 of x (S, L, D), from in_proj / out_proj weights."""
    S, L, D = x.shape
    hd = D // heads
    wq, wk, wv = W[prefix + ".in_proj_weight"].split(D, dim=0)
    bq, bk, bv = W[prefix + ".in_proj_bias"].split(D, dim=0)
    q, k, v = (linear(x, w_, b_).reshape(S, L, heads, hd) for w_, b_ in ((wq, bq), (wk, bk), (wv, bv)))
    scores = torch.einsum("sqhe,skhe->shqk", q, k) / math.sqrt(hd)
    out = torch.einsum("shqk,skhe->sqhe", softmax(scores, dim=-1), v).reshape(S, L, D)
    return linear(out, W[prefix + ".out_proj.weight"], W[prefix + ".out_proj.bias"])


def encoder_layer(W, x, heads):
    """Post-LN transformer encoder layer: LN1(x + MHA(x)), then LN2(x + W2 ReLU(W1 x)) (feed-forward 3D)."""
    p = "processor.layer"
    x = layer_norm(x + attention(W, p + ".self_attn", x, heads), W[p + ".norm1.weight"], W[p + ".norm1.bias"])
    ff = linear(relu(linear(x, W[p + ".linear1.weight"], W[p + ".linear1.bias"])),
                W[p + ".linear2.weight"], W[p + ".linear2.bias"])
    return layer_norm(x + ff, W[p + ".norm2.weight"], W[p + ".norm2.bias"])


def processor(W, cfg, x):
    """(B, R, D) -> (B, R, D); one block applied `repeats` times with the same weights."""
    kind, repeats = cfg["processor"], cfg["repeats"]
    if kind == "transformer":
        if cfg["batch_attention"]:  # §9.1: the batch axis is the attended sequence, per token position
            x = x.transpose(0, 1)
        for _ in range(repeats):
            x = encoder_layer(W, x, cfg["heads"])
        return x.transpose(0, 1) if cfg["batch_attention"] else x
    norm = lambda t: layer_norm(t, W["processor.norm.weight"], W["processor.norm.bias"])  # noqa: E731
    if kind == "mlp":  # shared LN -> [LN, Linear D->3D, GELU, Linear 3D->D, GELU], no residual; final shared LN
        for _ in range(repeats):
            h = layer_norm(norm(x), W["processor.block.0.weight"], W["processor.block.0.bias"])
            h = gelu(linear(h, W["processor.block.1.weight"], W["processor.block.1.bias"]))
            x = gelu(linear(h, W["processor.block.4.weight"], W["processor.block.4.bias"]))
        return norm(x)
    if kind == "mixer":  # x += token_mlp(LN(x)) over the token axis; x += channel_mlp(LN(x)); final LN
        for _ in range(repeats):
            t = norm(x).transpose(1, 2)  # (B, D, R)
            t = gelu(linear(gelu(linear(t, W["processor.token_mixing.0.weight"], W["processor.token_mixing.0.bias"])),
                            W["processor.token_mixing.3.weight"], W["processor.token_mixing.3.bias"]))
            x = x + t.transpose(1, 2)
            c = gelu(linear(gelu(linear(norm(x), W["processor.channel_mixing.0.weight"],
                                        W["processor.channel_mixing.0.bias"])),
                            W["processor.channel_mixing.3.weight"], W["processor.channel_mixing.3.bias"]))
            x = x + c
        return norm(x)
    raise ValueError(kind)


# ----------------------------------------------------------------------------------------------------------
# §3 / §4 memory, §6 head
# ----------------------------------------------------------------------------------------------------------

def reference_schedule(steps, blocks, start=0):
    """(current, past, future) per step: p = (start + t) mod k, past p - 1, future p + 1 (mod k)."""
    out = []
    for t in range(steps):
        p = (start + t) % blocks
        out.append((p, (p - 1 + blocks) % blocks, (p + 1) % blocks))
    return out


def add_pos(tokens, pos):
    return tokens if pos is None else tokens + pos


def lmttm_steps(W, cfg, tokens, memory, *, noise: NoiseHook = None, start=0, pos_read=None, pos_write=None):
    """LMTTM memory loop; returns (outputs per step, final memory (B, M, D))."""
    k = cfg["blocks"]
    m = cfg["memory_tokens"] // k
    blocks = [memory[:, i * m:(i + 1) * m] for i in range(k)]
    outputs = []
    for t, (cur, past, fut) in enumerate(reference_schedule(tokens.shape[1], k, start)):
        I = tokens[:, t]
        reads = [summarise(W, "reader", add_pos(torch.cat([blocks[b], I], dim=1), pos_read)) for b in (cur, past, fut)]
        O = processor(W, cfg, torch.cat(reads, dim=1))  # (B, 3r, D)
        write_in = torch.cat([blocks[cur], blocks[past], blocks[fut], I, O], dim=1)  # (B, 3m + n + 3r, D)
        new = summarise(W, "writer", add_pos(write_in, pos_write))  # (B, m, D)
        blocks[fut] = new if noise is None else noise(t, new)
        outputs.append(O)
    return outputs, torch.cat(blocks, dim=1)


def ttm_steps(W, cfg, tokens, memory, *, noise: NoiseHook = None, pos_read=None, pos_write=None):
    outputs = []
    for t in range(tokens.shape[1]):
        I = tokens[:, t]
        O = processor(W, cfg, summarise(W, "reader", add_pos(torch.cat([memory, I], dim=1), pos_read)))
        new = summarise(W, "writer", add_pos(torch.cat([memory, I, O], dim=1), pos_write))
        memory = new if noise is None else noise(t, new)
        outputs.append(O)
    return outputs, memory


def head(W, outputs):
    """Mean over every output token of every step -> Linear(D, K)."""
    stacked = torch.cat(outputs, dim=1)  # (B, T·R, D)
    return linear(stacked.sum(dim=1) / stacked.shape[1], W["head.weight"], W["head.bias"])


def check_shapes(W, cfg, in_channels, n_tokens):
    """The weights have the shapes of spec §1-§6 (the reference reads sizes from W, so check them apart)."""
    D, M, r, k = cfg["dim"], cfg["memory_tokens"], cfg["read_tokens"], cfg["blocks"]
    lmttm = cfg["name"] == "lmttm"
    m = M // k
    R = 3 * r if lmttm else r  # processor tokens
    want = {"head.bias": None}
    for prefix, outputs in (("reader", r), ("writer", m if lmttm else M)):
        want.update({f"{prefix}.norm.weight": (D,), f"{prefix}.hidden.weight": (D, D),
                     f"{prefix}.to_logits.weight": (outputs, D), f"{prefix}.to_features.weight": (D, D)})
    if cfg["stem"] == "3d":
        want["stem.conv.weight"] = (D, in_channels, *cfg["patch"])
    else:
        want.update({"stem.net.0.weight": (64, in_channels, *cfg["patch"]), "stem.net.3.weight": (D, 64, 3, 3, 3)})
    if cfg["processor"] == "transformer":
        p = "processor.layer."
        want.update({p + "self_attn.in_proj_weight": (3 * D, D), p + "self_attn.out_proj.weight": (D, D),
                     p + "linear1.weight": (3 * D, D), p + "linear2.weight": (D, 3 * D)})
    elif cfg["processor"] == "mlp":
        want.update({"processor.block.1.weight": (3 * D, D), "processor.block.4.weight": (D, 3 * D)})
    else:
        want.update({"processor.token_mixing.0.weight": (6 * R, R), "processor.token_mixing.3.weight": (R, 6 * R),
                     "processor.channel_mixing.0.weight": (3 * D, D), "processor.channel_mixing.3.weight": (D, 3 * D)})
    if "pos_read" in W:
        reads = (m if lmttm else M) + n_tokens
        want.update({"pos_read": (1, reads, D), "pos_write": (1, (3 * m + n_tokens + 3 * r) if lmttm else reads + r, D)})
    for key, shape in want.items():
        assert key in W, f"missing weight {key}"
        assert shape is None or tuple(W[key].shape) == shape, f"{key}: shape {tuple(W[key].shape)}, spec {shape}"


def reference_forward(W, cfg, x, *, memory=None, noise: NoiseHook = None, start=0, return_memory=False):
    """Logits (B, K) of TTM/LMTTM from the weights W; `memory` (B, M, D) replaces the zero initial memory.

    Learned positional embeddings are used when W has them (`pos_read`, `pos_write`).
    """
    tokens = stem(W, cfg, x)
    check_shapes(W, cfg, x.shape[1], tokens.shape[2])
    B, D = x.shape[0], cfg["dim"]
    if memory is None:
        memory = torch.zeros(B, cfg["memory_tokens"], D, dtype=tokens.dtype)
    pos = {"pos_read": W.get("pos_read"), "pos_write": W.get("pos_write")}
    if cfg["name"] == "lmttm":
        outputs, final = lmttm_steps(W, cfg, tokens, memory, noise=noise, start=start, **pos)
    else:
        outputs, final = ttm_steps(W, cfg, tokens, memory, noise=noise, **pos)
    logits = head(W, outputs)
    return (logits, final) if return_memory else logits


def weights_of(model) -> dict:
    """The model's state_dict as plain tensors (detached; the extra state left out)."""
    return {k: v.detach() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
