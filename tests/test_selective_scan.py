"""model/selective_scan.py against the textbook per-step selective scan (written here, independently, one
channel-direction-time step at a time in the notation of docs/spec/MEDMAMBA.md §4.5), values and gradients; and the
cross-scan / cross-merge token orders of 2D (K = 4) and 3D (K = 6)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from model.selective_scan import (
    cross_merge,
    cross_merge_2d,
    cross_merge_3d,
    cross_scan,
    cross_scan_2d,
    cross_scan_3d,
    mamba_ssm_available,
    selective_scan,
)

FORMS = [("sequential", 32), ("chunked", 4), ("chunked", 3), ("chunked", 64)]


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Per-step reference: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <C_t, h_t> + D u_t, × SiLU(z_t).
    u, delta, z (b, K, d, L); A (K, d, N); B, C (b, K, N, L); D, delta_bias (K, d)."""
    nb, K, d, L = u.shape
    N = A.shape[-1]
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, :, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(delta))  # softplus written out
    h = u.new_zeros(nb, K, d, N)
    ys = []
    for t in range(L):
        dt = delta[:, :, :, t]  # (b, K, d)
        dA = torch.exp(dt[..., None] * A[None])  # (b, K, d, N)
        dBu = dt[..., None] * B[:, :, None, :, t] * u[:, :, :, t, None]
        h = dA * h + dBu
        y = (h * C[:, :, None, :, t]).sum(-1)
        if D is not None:
            y = y + D[None] * u[:, :, :, t]
        ys.append(y)
    y = torch.stack(ys, -1)
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, h


def make_inputs(nb=2, K=3, d=4, L=11, N=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(nb, K, d, L),
        delta=0.5 * r(nb, K, d, L),
        # S4D-real: negative A, spread over a decade as log(1..N) gives
        A=-torch.exp(0.5 * r(K, d, N)) * torch.arange(1, N + 1, dtype=dtype),
        B=r(nb, K, N, L),
        C=r(nb, K, N, L),
        D=r(K, d),
        z=r(nb, K, d, L),
        delta_bias=0.3 * r(K, d),
    )


def grads(fn, inputs, seed=1):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    kw = {k: leaves.get(k) for k in inputs}
    y = fn(kw)
    if isinstance(y, tuple):
        y = y[0]
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    (y * w).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def assert_close(a, b, name=""):
    scale = b.abs().max().clamp_min(1e-12)
    err = (a - b).abs().max() / scale
    assert err <= 1e-5, f"{name}: relative error {err:.3g}"


OPTION_SETS = [
    dict(z=True, D=True, delta_bias=True, delta_softplus=True),
    dict(z=False, D=True, delta_bias=True, delta_softplus=True),
    dict(z=True, D=False, delta_bias=False, delta_softplus=True),
    dict(z=False, D=False, delta_bias=False, delta_softplus=False),
    dict(z=True, D=True, delta_bias=True, delta_softplus=False),
]


@pytest.mark.parametrize("method,chunk", FORMS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "bare")
def test_forms_equal_reference_values_and_gradients(method, chunk, opts):
    inputs = make_inputs()
    for key in ("z", "D", "delta_bias"):
        if not opts[key]:
            inputs[key] = None
    sp = opts["delta_softplus"]
    if not sp:  # raw Δ must be positive without softplus
        inputs["delta"] = inputs["delta"].abs() + 0.05
        if inputs["delta_bias"] is not None:
            inputs["delta_bias"] = inputs["delta_bias"].abs()
    y_ref, g_ref = grads(lambda kw: reference_scan(**kw, delta_softplus=sp), inputs)
    y, g = grads(lambda kw: selective_scan(**kw, delta_softplus=sp, method=method, chunk=chunk), inputs)
    assert y.shape == y_ref.shape
    assert_close(y, y_ref, "output")
    assert set(g) == set(g_ref)
    for k in g_ref:
        assert g[k] is not None, k
        assert_close(g[k], g_ref[k], f"grad {k}")


@pytest.mark.parametrize("method,chunk", FORMS)
def test_float32_and_last_state(method, chunk):
    inputs = make_inputs(nb=2, K=6, d=3, L=37, N=4, seed=3)
    y_ref, h_ref = reference_scan(**inputs, delta_softplus=True)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    y, h = selective_scan(**inputs32, delta_softplus=True, return_last_state=True, method=method, chunk=chunk)
    assert y.dtype == torch.float32 and h.shape == (2, 6, 3, 4)
    assert_close(y.double(), y_ref, "output fp32")
    assert_close(h.double(), h_ref, "last state fp32")


def test_reversed_direction_is_the_flipped_scan():
    """A direction fed the time-reversed sequence (as the cross-scan's reversed rasters are) gives the
    reference's result on the reversed inputs, and differs from the forward one (the scan is causal)."""
    inputs = make_inputs(K=1, L=9, seed=5)
    rev = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    both = {k: (torch.cat([inputs[k], rev[k]], 1) if k in ("u", "delta", "B", "C", "z") else torch.cat([v, v], 0))
            for k, v in inputs.items()}
    for method in ("sequential", "chunked"):
        y = selective_scan(**both, delta_softplus=True, method=method, chunk=4)
        y_fwd, _ = reference_scan(**inputs, delta_softplus=True)
        y_rev, _ = reference_scan(**rev, delta_softplus=True)
        assert_close(y[:, :1], y_fwd)
        assert_close(y[:, 1:], y_rev)
        assert not torch.allclose(y[:, 1:].flip(-1), y[:, :1], atol=1e-3)


def test_three_dim_call_is_k_equal_one():
    inputs = make_inputs(K=1, seed=7)
    y4 = selective_scan(**inputs, delta_softplus=True)
    flat = {k: (v.squeeze(0) if k in ("A", "D", "delta_bias") else v.squeeze(1)) for k, v in inputs.items()}
    y3 = selective_scan(**flat, delta_softplus=True)
    assert y3.shape == (2, 4, 11)
    torch.testing.assert_close(y3, y4.squeeze(1), rtol=0, atol=0)


def test_b_and_c_are_shared_by_the_channels_of_a_direction():
    """B/C of direction k act on every channel of k and on no other direction: changing B of direction 0
    changes all channels of direction 0 and leaves directions 1.. unchanged."""
    inputs = make_inputs(K=3, seed=9)
    y = selective_scan(**inputs, delta_softplus=True)
    B2 = inputs["B"].clone()
    B2[:, 0] += 1.0
    y2 = selective_scan(**{**inputs, "B": B2}, delta_softplus=True)
    assert torch.equal(y2[:, 1:], y[:, 1:])
    assert ((y2[:, 0] - y[:, 0]).abs().amax(-1) > 0).all()


def test_large_decays_stay_finite():
    """Strong decays (Δ·A down to -700 per step) must not overflow the chunked form (no division by a
    cumulative decay) and match the loop."""
    inputs = make_inputs(L=40, seed=11)
    inputs["delta"] = inputs["delta"] * 8 + 5
    inputs["A"] = inputs["A"] * 10
    a = selective_scan(**inputs, delta_softplus=True, method="sequential")
    b = selective_scan(**inputs, delta_softplus=True, method="chunked", chunk=8)
    assert torch.isfinite(b).all()
    assert_close(b, a)


def test_bad_arguments_raise_clear_errors():
    inputs = make_inputs()
    with pytest.raises(ValueError, match="unknown method"):
        selective_scan(**inputs, method="parallel")
    with pytest.raises(ValueError, match="B has shape"):
        selective_scan(**{**inputs, "B": inputs["B"][:, :, :, :5]})
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        if mamba_ssm_available():
            pytest.skip("mamba_ssm present")
        selective_scan(**inputs, method="mamba_ssm")


@pytest.mark.skipif(not mamba_ssm_available(), reason="mamba_ssm not importable on CUDA")
def test_mamba_ssm_equals_pure_scan():
    inputs = {k: v.float().cuda() for k, v in make_inputs(nb=2, K=4, d=8, L=50, N=16, seed=13).items()}
    y_ref, g_ref = grads(lambda kw: selective_scan(**kw, delta_softplus=True, method="chunked"), inputs)
    y, g = grads(lambda kw: selective_scan(**kw, delta_softplus=True, method="mamba_ssm"), inputs)
    assert (y - y_ref).abs().max() <= 1e-4 * y_ref.abs().max()
    for k in g_ref:
        assert (g[k] - g_ref[k]).abs().max() <= 1e-3 * g_ref[k].abs().max(), k


# ---------------------------------------------------------------------------------------------------------------
# Cross-scan / cross-merge


def test_cross_scan_2d_orders_by_hand():
    H, W = 2, 3
    x = torch.arange(H * W).reshape(1, 1, H, W)
    seqs = cross_scan_2d(x)[0, :, 0].tolist()
    assert seqs == [
        [0, 1, 2, 3, 4, 5],  # row-major
        [0, 3, 1, 4, 2, 5],  # column-major
        [5, 4, 3, 2, 1, 0],
        [5, 2, 4, 1, 3, 0],
    ]


def test_cross_scan_3d_orders_are_distinct_permutations():
    D, H, W = 2, 3, 4
    L = D * H * W
    x = torch.arange(L).reshape(1, 1, D, H, W)
    seqs = cross_scan_3d(x)[0, :, 0]
    assert seqs.shape == (6, L)
    for s in seqs:
        assert sorted(s.tolist()) == list(range(L))
    assert len({tuple(s.tolist()) for s in seqs}) == 6
    # D-H-W raster is the natural flatten; H-W-D raster: D fastest; W-D-H raster: H fastest
    d, h, w = torch.meshgrid(torch.arange(D), torch.arange(H), torch.arange(W), indexing="ij")
    idx = (d * H * W + h * W + w)
    assert seqs[0].tolist() == idx.flatten().tolist()
    assert seqs[1].tolist() == idx.permute(1, 2, 0).flatten().tolist()
    assert seqs[2].tolist() == idx.permute(2, 0, 1).flatten().tolist()
    for k in range(3):
        assert seqs[k + 3].tolist() == seqs[k].flip(0).tolist()


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 4, 5), (2, 3, 1, 4, 2)])
def test_cross_scan_then_merge_of_identity_is_k_times_input(shape):
    x = torch.randn(shape, dtype=torch.float64)
    spatial = shape[2:]
    if len(spatial) == 2:
        y = cross_merge_2d(cross_scan_2d(x), *spatial)
        K = 4
    else:
        y = cross_merge_3d(cross_scan_3d(x), *spatial)
        K = 6
    assert y.shape == x.shape
    torch.testing.assert_close(y, K * x, rtol=1e-12, atol=1e-12)


def _cumulative_pipeline(x, orders):
    """cross-scan → a causal, non-symmetric linear scan (decay 0.5) → cross-merge."""
    xs = cross_scan(x, orders)
    nb, K, c, L = xs.shape
    u = xs
    delta = torch.ones_like(u)
    A = torch.full((K, c, 1), math.log(0.5), dtype=x.dtype)
    ones = torch.ones(nb, K, 1, L, dtype=x.dtype)
    y = selective_scan(u, delta, A, ones, ones)
    return cross_merge(y, x.shape[2:], orders)


@pytest.mark.parametrize("axis", [2, 3, 4])
def test_3d_flip_along_any_axis_changes_output(axis):
    """With a causal scan, flipping the volume along any one axis is not undone by the merged output:
    no axis is ignored by the six directions."""
    x = torch.randn(1, 2, 3, 4, 5, dtype=torch.float64)
    from model.selective_scan import ORDERS_3D

    y = _cumulative_pipeline(x, ORDERS_3D)
    y_flip = _cumulative_pipeline(x.flip(axis), ORDERS_3D).flip(axis)
    assert (y - y_flip).abs().max() > 1e-3
    # flipping all three axes at once maps each raster onto its reverse: the six directions are closed
    # under it, so the merged output is exactly equivariant
    all_axes = (2, 3, 4)
    y_all = _cumulative_pipeline(x.flip(all_axes), ORDERS_3D).flip(all_axes)
    torch.testing.assert_close(y_all, y, rtol=1e-10, atol=1e-10)


def test_every_3d_direction_contributes():
    """Removing any one of the six directions from the merge changes the output."""
    x = torch.randn(1, 1, 3, 3, 3, dtype=torch.float64)
    from model.selective_scan import ORDERS_3D

    xs = cross_scan(x, ORDERS_3D)
    ys = torch.cumsum(xs, -1)
    full = cross_merge(ys, (3, 3, 3), ORDERS_3D)
    for k in range(6):
        mask = torch.ones(6, dtype=x.dtype)
        mask[k] = 0
        part = cross_merge(ys * mask[None, :, None, None], (3, 3, 3), ORDERS_3D)
        assert (part - full).abs().max() > 1e-6


def test_cross_merge_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="expected"):
        cross_merge_3d(torch.zeros(1, 4, 2, 24), 2, 3, 4)
    with pytest.raises(ValueError, match="spatial"):
        cross_scan_3d(torch.zeros(1, 2, 3, 4))


@pytest.mark.parametrize("method,chunk", FORMS[:2])
def test_gradient_through_the_last_state(method, chunk):
    """A loss on both outputs (y and the returned last state) back-propagates like the reference's."""
    inputs = make_inputs(K=2, L=7, seed=17)
    g = torch.Generator().manual_seed(2)
    wy = torch.randn(2, 2, 4, 7, generator=g, dtype=torch.float64)
    wh = torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64)

    def loss_grads(fn):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y, h = fn(leaves)
        ((y * wy).sum() + (h * wh).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    ref = loss_grads(lambda kw: reference_scan(**kw, delta_softplus=True))
    got = loss_grads(lambda kw: selective_scan(**kw, delta_softplus=True, return_last_state=True,
                                               method=method, chunk=chunk))
    for k in ref:
        assert_close(got[k], ref[k], f"grad {k}")


def test_auto_picks_the_sequential_form_on_cpu():
    inputs = {k: v.float() for k, v in make_inputs(L=40, seed=19).items()}
    auto = selective_scan(**inputs, delta_softplus=True)
    seq = selective_scan(**inputs, delta_softplus=True, method="sequential")
    chunked = selective_scan(**inputs, delta_softplus=True, method="chunked", chunk=4)
    assert torch.equal(auto, seq)
    assert not torch.equal(auto, chunked)  # a different summation order: the forms are distinguishable
    assert_close(chunked.double(), seq.double())
