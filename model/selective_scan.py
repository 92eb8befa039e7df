"""The selective scan of Mamba (S6) in pure PyTorch, with the semantics of `mamba_ssm`'s `selective_scan_fn`,
and the cross-scan / cross-merge token orders of SS2D (K = 4) and its 3D extension SS3D (K = 6).

Spec: docs/spec/MEDMAMBA.md §4-5. For every batch b, direction k, channel c, time t and state n:

    Δ      = softplus(delta + delta_bias)          (softplus only when `delta_softplus`)
    h_t    = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t,   h_{-1} = 0
    y_t    = <C_t, h_t> + D u_t
    out_t  = y_t · SiLU(z_t)                       (only when z is given)

Shapes (K directions are their own axis; B and C are shared by the channels of a direction and are
broadcast, never copied per channel):

    u, delta, z     (batch, K, d, L)
    A               (K, d, N)       (real; S4D-real has A = -exp(A_log) < 0)
    B, C            (batch, K, N, L)
    D, delta_bias   (K, d)
    output          (batch, K, d, L); with `return_last_state`, also h_{L-1} of shape (batch, K, d, N)

A 3-D call (u of shape (batch, d, L), B/C (batch, N, L), A (d, N), D (d,)) is the K = 1 case and returns
(batch, d, L).

Forms (all give the same numbers, fp32 or fp64, values and gradients):
- "sequential": one loop over the time slices (unbound once), fused: each step computes exp(Δ_t A), the state
  and y_t on (batch, K, d, N) tensors that stay in cache, writing into preallocated storage; a custom autograd
  Function whose backward is the reverse recurrence run the same way (recomputing exp(Δ_t A)), so autograd
  records one node, not L of them, and no (L, batch, K, d, N) intermediate but the states is ever built.
  The fastest form on a CPU (spec §5); see tools/bench_scan.py.
- "chunked": the same Function with the two recurrences solved by a chunked parallel scan (a Hillis-Steele
  scan inside chunks of `chunk` steps, all chunks at once; the chunk ends are chained by the same scan,
  recursively). Only products of the decays exp(ΔA) ≤ 1 appear, never their inverses, so it is as safe
  numerically as the loop. About 2·log2(chunk) + a few kernel launches per level instead of L: the GPU form.
- "mamba_ssm": the CUDA kernel of the `mamba_ssm` package, used only when it is importable and the tensors
  are on CUDA; never required.
- "auto" (default): on CUDA "mamba_ssm" if importable (and the tensors are not fp64), else "chunked";
  on CPU "sequential".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "METHODS",
    "selective_scan",
    "mamba_ssm_available",
    "cross_scan",
    "cross_merge",
    "cross_scan_2d",
    "cross_merge_2d",
    "cross_scan_3d",
    "cross_merge_3d",
    "ORDERS_2D",
    "ORDERS_3D",
]

METHODS = ("auto", "sequential", "chunked", "mamba_ssm")

_MAMBA_SSM = None  # cached: the imported selective_scan_fn, or False when not importable


def mamba_ssm_available() -> bool:
    """Whether `mamba_ssm`'s CUDA selective scan can be imported (and CUDA exists)."""
    global _MAMBA_SSM
    if _MAMBA_SSM is None:
        _MAMBA_SSM = False
        if torch.cuda.is_available():
            try:
                from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
            except Exception:  # not installed, or built for another torch/CUDA
                pass
            else:
                _MAMBA_SSM = selective_scan_fn
    return _MAMBA_SSM is not False


# ---------------------------------------------------------------------------------------------------------------
# Linear recurrences h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along dim 0, two ways.


def _recurrence_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sequential: slices unbound once, each step one fused multiply-add into preallocated storage."""
    h = torch.empty_like(b)
    hs, as_, bs = h.unbind(0), a.unbind(0), b.unbind(0)
    hs[0].copy_(bs[0])
    prev = hs[0]
    for t in range(1, len(hs)):
        torch.addcmul(bs[t], as_[t], prev, out=hs[t])
        prev = hs[t]
    return h


def _recurrence_chunked(a: torch.Tensor, b: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Chunked parallel scan. Inside chunks of `chunk` steps a Hillis-Steele scan of the pairs (a, b) under
    (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2); the chunks' end states are chained by the same function on
    the (shorter) sequence of chunk ends, then carried into every step of the next chunk."""
    L = a.shape[0]
    if L == 1:
        return b.clone()
    T = min(chunk, L)
    nc = -(-L // T)
    pad = nc * T - L
    if pad:  # identity steps (a = 1, b = 0) at the end
        a = torch.cat([a, a.new_ones((pad,) + a.shape[1:])])
        b = torch.cat([b, b.new_zeros((pad,) + b.shape[1:])])
    a = a.reshape((nc, T) + a.shape[1:])
    b = b.reshape((nc, T) + b.shape[1:])
    off = 1
    while off < T:  # Hillis-Steele along dim 1, all chunks at once
        b = torch.cat([b[:, :off], torch.addcmul(b[:, off:], a[:, off:], b[:, :-off])], 1)
        a = torch.cat([a[:, :off], a[:, off:] * a[:, :-off]], 1)
        off *= 2
    # a[:, j] is now the product of the decays from the chunk start to step j, b[:, j] the state at step j
    # from a zero state at the chunk start.
    if nc > 1:
        ends = _recurrence_chunked(a[:, -1], b[:, -1], chunk)  # true state at each chunk's last step
        carry = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])  # state entering each chunk
        b = torch.addcmul(b, a, carry.unsqueeze(1))
    h = b.reshape((nc * T,) + b.shape[2:])
    return h[:L] if pad else h


class _Recurrence(torch.autograd.Function):
    """h = scan(a, b) along dim 0 with a hand-written backward (the reverse recurrence), so autograd records
    one node instead of L of them. Inputs and output are time-major and contiguous."""

    @staticmethod
    def forward(ctx, a, b, chunk):
        ctx.chunk = chunk
        h = _recurrence_loop(a, b) if chunk == 0 else _recurrence_chunked(a, b, chunk)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, gh):
        a, h = ctx.saved_tensors
        gh = gh.contiguous()
        # g_t = dLoss/dh_t in total: g_t = gh_t + a_{t+1} g_{t+1}, a reverse recurrence.
        a_next = torch.cat([a[1:], torch.zeros_like(a[:1])]).flip(0)
        if ctx.chunk == 0:
            g = _recurrence_loop(a_next.contiguous(), gh.flip(0).contiguous()).flip(0)
        else:
            g = _recurrence_chunked(a_next, gh.flip(0), ctx.chunk).flip(0)
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(a)
            grad_a[0].zero_()
            torch.mul(g[1:], h[:-1], out=grad_a[1:])
        return grad_a, g, None


class _FusedScan(torch.autograd.Function):
    """The CPU form: y_t = <C_t, h_t>, h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, one pass over time with every
    per-step tensor (batch, K, d, N) small enough to stay in cache; only the states h_t are stored (written
    once, read once by the backward). The backward runs the reverse recurrence
    g_t = dL/dh_t = C_t dy_t + exp(Δ_{t+1} A) g_{t+1} in one reverse pass, recomputing exp(Δ_t A), and collects
    every input's gradient on the way. Inputs u, delta (batch, K, d, L), A (K, d, N), B, C (batch, K, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        nb, K, d, L = u.shape
        N = A.shape[-1]
        dt = delta.permute(3, 0, 1, 2).contiguous()  # (L, b, K, d)
        ut = u.permute(3, 0, 1, 2).contiguous()
        du = (dt * ut).unsqueeze(-1)  # (L, b, K, d, 1)
        Bt = B.permute(3, 0, 1, 2).unsqueeze(3).contiguous()  # (L, b, K, 1, N)
        Ct = C.permute(3, 0, 1, 2).unsqueeze(-1).contiguous()  # (L, b, K, N, 1)
        H = u.new_empty(L, nb, K, d, N)
        Y = u.new_empty(L, nb, K, d, 1)
        dA = u.new_empty(nb, K, d, N)
        dts, dus = dt.unsqueeze(-1).unbind(0), du.unbind(0)
        Bs, Cs, Hs, Ys = Bt.unbind(0), Ct.unbind(0), H.unbind(0), Y.unbind(0)
        torch.mul(dus[0], Bs[0], out=Hs[0])
        torch.matmul(Hs[0], Cs[0], out=Ys[0])
        for t in range(1, L):
            torch.mul(dts[t], A, out=dA).exp_()
            h = Hs[t]
            torch.mul(dA, Hs[t - 1], out=h)
            h.addcmul_(dus[t], Bs[t])
            torch.matmul(h, Cs[t], out=Ys[t])
        ctx.save_for_backward(dt, ut, A, Bt, Ct, H)
        return Y.squeeze(-1).permute(1, 2, 3, 0), H[-1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh_last):
        dt, ut, A, Bt, Ct, H = ctx.saved_tensors
        L, nb, K, d, N = H.shape
        gy = gy.permute(3, 0, 1, 2).unsqueeze(-2).contiguous()  # (L, b, K, 1, d)
        du = (dt * ut).unsqueeze(-2)  # (L, b, K, 1, d)
        g_du = H.new_empty(L, nb, K, d, 1)
        g_dtA = H.new_zeros(L, nb, K, d)
        g_B = H.new_empty(L, nb, K, 1, N)
        g_C = H.new_empty(L, nb, K, 1, N)
        acc_A = H.new_zeros(nb, K, d, N)
        g = H.new_empty(nb, K, d, N)
        carry = gh_last.contiguous() if gh_last is not None else H.new_zeros(nb, K, d, N)
        dA = H.new_empty(nb, K, d, N)
        q = H.new_empty(nb, K, d, N)
        dts = dt.unsqueeze(-1).unbind(0)
        Crow = Ct.transpose(-1, -2)  # (L, b, K, 1, N) views
        Bcol = Bt.transpose(-1, -2)  # (L, b, K, N, 1)
        gys, dus, Hs = gy.unbind(0), du.unbind(0), H.unbind(0)
        for t in range(L - 1, -1, -1):
            torch.addcmul(carry, gys[t].transpose(-1, -2), Crow[t], out=g)  # g_t
            torch.matmul(gys[t], Hs[t], out=g_C[t])  # dL/dC_t = sum_d dy_t h_t
            torch.matmul(dus[t], g, out=g_B[t])  # dL/dB_t = sum_d Δ_t u_t g_t
            torch.matmul(g, Bcol[t], out=g_du[t])  # dL/d(Δ_t u_t) = <g_t, B_t>
            if t == 0:
                break
            torch.mul(dts[t], A, out=dA).exp_()
            torch.mul(g, dA, out=carry)  # dL/dh_{t-1} through the decay
            torch.mul(carry, Hs[t - 1], out=q)  # dL/d(Δ_t A) elementwise
            acc_A.addcmul_(q, dts[t])
            q.mul_(A)
            torch.sum(q, -1, out=g_dtA[t])
        g_du = g_du.squeeze(-1)
        g_delta = (g_dtA + g_du * ut).permute(1, 2, 3, 0)
        g_u = (g_du * dt).permute(1, 2, 3, 0)
        return g_u, g_delta, acc_A.sum(0), g_B.squeeze(3).permute(1, 2, 3, 0), g_C.squeeze(3).permute(1, 2, 3, 0)


def _pure_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk):
    """The pure-PyTorch forms, shapes as in the module docstring (K axis present)."""
    dtype = u.dtype
    # fp32 at least (spec §4: "fp32 scan"); fp64 stays fp64.
    ct = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (x.to(ct) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[None, :, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if chunk == 0:
        y, h_last = _FusedScan.apply(u, delta, A, B, C)
        return _finish(y, u, D, z, ct, dtype, h_last if return_last_state else None)
    # Time-major layout (L, batch, K, d, N): every time slice is one contiguous block.
    dt = delta.permute(3, 0, 1, 2).unsqueeze(-1)  # (L, b, K, d, 1)
    a = torch.exp(dt * A)  # (L, b, K, d, N)
    Bt = B.permute(3, 0, 1, 2).unsqueeze(3)  # (L, b, K, 1, N), broadcast over d
    b = (dt * u.permute(3, 0, 1, 2).unsqueeze(-1)) * Bt
    h = _Recurrence.apply(a.contiguous(), b.contiguous(), chunk)  # (L, b, K, d, N)
    Ct = C.permute(3, 0, 1, 2)  # (L, b, K, N)
    y = torch.einsum("lbkdn,lbkn->bkdl", h, Ct)
    return _finish(y, u, D, z, ct, dtype, h[-1] if return_last_state else None)


def _finish(y, u, D, z, ct, dtype, h_last):
    """The skip term D ⊙ u and the gate SiLU(z), under autograd."""
    if D is not None:
        y = y + u * D.to(ct)[None, :, :, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype)
    if h_last is not None:
        return y, h_last
    return y


def _mamba_ssm_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The CUDA kernel: fold K into the channel axis; B and C become K groups of d channels each."""
    nb, K, d, L = u.shape
    flat = lambda x: None if x is None else x.reshape(nb, K * d, L)  # noqa: E731
    out = _MAMBA_SSM(
        flat(u).contiguous(),
        flat(delta).contiguous(),
        A.reshape(K * d, -1).contiguous(),
        B.contiguous(),
        C.contiguous(),
        None if D is None else D.reshape(K * d).float(),
        None if z is None else flat(z).contiguous(),
        None if delta_bias is None else delta_bias.reshape(K * d).float(),
        delta_softplus,
        return_last_state,
    )
    if return_last_state:
        y, last = out
        return y.reshape(nb, K, d, L), last.reshape(nb, K, d, -1)
    return out.reshape(nb, K, d, L)


def _check(u, delta, A, B, C, D, z, delta_bias):
    nb, K, d, L = u.shape
    N = A.shape[-1]
    want = {
        "delta": (delta, (nb, K, d, L)),
        "A": (A, (K, d, N)),
        "B": (B, (nb, K, N, L)),
        "C": (C, (nb, K, N, L)),
        "D": (D, (K, d)),
        "z": (z, (nb, K, d, L)),
        "delta_bias": (delta_bias, (K, d)),
    }
    for name, (x, shape) in want.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(
                f"selective_scan: {name} has shape {tuple(x.shape)}, expected {shape} "
                f"(u is (batch={nb}, K={K}, d={d}, L={L}), N={N})"
            )


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    method: str = "auto",
    chunk: int = 32,
):
    """The selective scan (see the module docstring for the formula and shapes). `method` is one of
    METHODS; `chunk` is the chunk length of the "chunked" form."""
    if method not in METHODS:
        raise ValueError(f"selective_scan: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if chunk < 2:
        raise ValueError(f"selective_scan: chunk must be at least 2, got {chunk}")
    squeeze = u.dim() == 3
    if squeeze:  # K = 1 without its axis
        u, delta, z = (None if x is None else x.unsqueeze(1) for x in (u, delta, z))
        A, D, delta_bias = (None if x is None else x.unsqueeze(0) for x in (A, D, delta_bias))
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    if u.dim() != 4:
        raise ValueError(f"selective_scan: u must be (batch, K, d, L) or (batch, d, L), got {tuple(u.shape)}")
    _check(u, delta, A, B, C, D, z, delta_bias)
    if method == "auto":
        if u.is_cuda:
            usable = u.dtype != torch.float64 and mamba_ssm_available()  # the kernel has no fp64
            method = "mamba_ssm" if usable else "chunked"
        else:
            method = "sequential"
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if method == "mamba_ssm":
        if not (u.is_cuda and mamba_ssm_available()):
            raise RuntimeError("selective_scan: method 'mamba_ssm' needs CUDA tensors and an importable mamba_ssm")
        out = _mamba_ssm_scan(*args)
    else:
        out = _pure_scan(*args, chunk=0 if method == "sequential" else chunk)
    if squeeze:
        if return_last_state:
            return out[0].squeeze(1), out[1].squeeze(1)
        return out.squeeze(1)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cross-scan / cross-merge: K token orders of a 2D or 3D map, forward and reversed.

# Axis orders of the spatial axes, slowest first. 2D: row-major (H-W) and column-major (W-H) rasters.
# 3D (SS3D, this project's extension): the D-H-W, H-W-D and W-D-H rasters.
ORDERS_2D = ((0, 1), (1, 0))
ORDERS_3D = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


def cross_scan(x: torch.Tensor, orders) -> torch.Tensor:
    """x (batch, C, *spatial), channels first → (batch, K, C, L) with K = 2·len(orders): each order's raster,
    then the same rasters reversed (SS2D's order of directions)."""
    nb, c = x.shape[:2]
    if x.dim() - 2 != len(orders[0]):
        raise ValueError(
            f"cross_scan: x has shape {tuple(x.shape)}, expected (batch, C) + {len(orders[0])} spatial axes"
        )
    seqs = [x.permute(0, 1, *(2 + i for i in order)).reshape(nb, c, -1) for order in orders]
    fwd = torch.stack(seqs, 1)  # (batch, K/2, C, L)
    return torch.cat([fwd, fwd.flip(-1)], 1)


def cross_merge(y: torch.Tensor, spatial, orders) -> torch.Tensor:
    """Inverse of `cross_scan` for the outputs: undo the reversals and transposes and SUM the K sequences.
    y (batch, K, C, L) → (batch, C, *spatial)."""
    nb, K, c, L = y.shape
    m = len(orders)
    if K != 2 * m or L != math.prod(spatial):
        raise ValueError(
            f"cross_merge: y has shape {tuple(y.shape)}, expected (batch, {2 * m}, C, {math.prod(spatial)})"
        )
    y = y[:, :m] + y[:, m:].flip(-1)  # undo the reversals
    out = None
    for k, order in enumerate(orders):
        shaped = y[:, k].reshape(nb, c, *(spatial[i] for i in order))
        inverse = [order.index(i) for i in range(len(order))]
        back = shaped.permute(0, 1, *(2 + i for i in inverse))
        out = back if out is None else out + back
    return out


def cross_scan_2d(x: torch.Tensor) -> torch.Tensor:
    """(batch, C, H, W) → (batch, 4, C, H·W)."""
    return cross_scan(x, ORDERS_2D)


def cross_merge_2d(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(batch, 4, C, H·W) → (batch, C, H, W), the 4 directions summed."""
    return cross_merge(y, (H, W), ORDERS_2D)


def cross_scan_3d(x: torch.Tensor) -> torch.Tensor:
    """(batch, C, D, H, W) → (batch, 6, C, D·H·W)."""
    return cross_scan(x, ORDERS_3D)


def cross_merge_3d(y: torch.Tensor, D: int, H: int, W: int) -> torch.Tensor:
    """(batch, 6, C, D·H·W) → (batch, C, D, H, W), the 6 directions summed."""
    return cross_merge(y, (D, H, W), ORDERS_3D)
