"""MedMamba and MedMambaSE (model/medmamba.py) against the spec's numbers and hand-written references: parameter
counts, SS2D / SS3D written out direction by direction with a per-step scan, the blocks' wiring, patch merging,
gradients, batch independence, and train.py / predict.py end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import predict
import train
from model import build_model, count_parameters, executed_parameter_count
from model.medmamba import SSND, ConvSSMSE, PatchMerging, SSConvSSM

torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------
# parameter counts (docs/spec/MEDMAMBA.md §2-§4, measured from the original code)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, exact, paper", [("medmamba_t", 14_457_222, 14.46), ("medmamba_s", 18_625_158, 18.63),
                                                ("medmamba_b", 39_864_838, 39.86), ("medmambase", 14_135_814, 14.14)])
def test_2d_parameter_counts_at_the_original_settings(name, exact, paper):
    n = count_parameters(build_model(name, in_channels=3, num_classes=6, input_size=224, patch_size=4))
    assert n == exact and round(n / 1e6, 2) == paper


def test_per_block_counts_of_the_spec():
    assert count_parameters(SSND(48)) == 36_480
    block = SSConvSSM(96)
    assert count_parameters(block) == 80_784 and count_parameters(block.conv) == 44_208
    se = ConvSSMSE(96)
    assert count_parameters(se) == 91_152 and count_parameters(se.se) == 1_152 and count_parameters(se.mix) == 9_312


# ----------------------------------------------------------------------------------------------------------
# SS2D / SS3D written out
# ----------------------------------------------------------------------------------------------------------

def raster(shape, order):
    """Positions of a map of `shape` visited with axis order[0] slowest (a raster), as index tuples."""
    axes = [range(shape[a]) for a in order]
    out = []
    for combo in itertools.product(*axes):
        pos = [0] * len(shape)
        for a, v in zip(order, combo):
            pos[a] = v
        out.append(tuple(pos))
    return out


def ssnd_by_hand(m: SSND, x, orders):
    """x (B, *S, d_model) -> (B, *S, d_model), every direction's sequence built from explicit positions and
    scanned step by step: h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t, y_t = <C_t, h_t> + D u_t."""
    nb, spatial = x.shape[0], x.shape[1:-1]
    xz = x @ m.in_proj.weight.T
    u_map, z = xz[..., : m.d_inner], xz[..., m.d_inner:]
    conv = F.conv2d if len(spatial) == 2 else F.conv3d
    u_map = F.silu(conv(u_map.movedim(-1, 1), m.conv.weight, m.conv.bias, padding=1, groups=m.d_inner))  # (B, d, *S)
    merged = torch.zeros(nb, m.d_inner, *spatial, dtype=x.dtype)
    directions = [(o, False) for o in orders] + [(o, True) for o in orders]
    for k, (order, reverse) in enumerate(directions):
        positions = raster(spatial, order)
        if reverse:
            positions = positions[::-1]
        A = -torch.exp(m.A_log[k])  # (d, N)
        for b in range(nb):
            h = torch.zeros(m.d_inner, m.d_state, dtype=x.dtype)
            for pos in positions:
                u = u_map[(b, slice(None), *pos)]  # (d,)
                proj = m.x_proj_weight[k] @ u
                dt, Bt, Ct = proj[: m.rank], proj[m.rank: m.rank + m.d_state], proj[m.rank + m.d_state:]
                delta = F.softplus(m.dt_proj_weight[k] @ dt + m.dt_proj_bias[k])  # (d,)
                h = torch.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bt[None, :]
                merged[(b, slice(None), *pos)] += h @ Ct + m.D[k] * u
    y = F.layer_norm(merged.movedim(1, -1), (m.d_inner,), m.out_norm.weight, m.out_norm.bias) * F.silu(z)
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("dims, shape, orders", [
    (2, (3, 4), [(0, 1), (1, 0)]),
    (3, (2, 3, 4), [(0, 1, 2), (1, 2, 0), (2, 0, 1)]),  # D-H-W, H-W-D, W-D-H rasters
])
def test_ssnd_equals_the_direction_by_direction_reference(dims, shape, orders):
    torch.manual_seed(1)
    m = SSND(8, dims=dims, d_state=4).double()
    with torch.no_grad():  # away from the init's symmetries, so a swapped direction or weight shows
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, *shape, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), ssnd_by_hand(m, x, orders), rtol=1e-5, atol=1e-7)


def test_scan_forms_give_the_same_model_output():
    torch.manual_seed(2)
    x = torch.rand(2, 1, 8, 8, 8)
    kwargs = dict(in_channels=1, num_classes=3, input_size=8, depths=[1, 1], widths=[8, 16], patch_size=2)
    a = build_model("medmamba3d", **kwargs, scan="sequential").eval()
    b = build_model("medmamba3d", **kwargs, scan="chunked").eval()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# blocks and patch merging, by hand
# ----------------------------------------------------------------------------------------------------------

def test_ss_conv_ssm_shuffles_conv_then_ssm_and_adds_the_input():
    torch.manual_seed(3)
    block = SSConvSSM(8, d_state=4).eval()
    x = torch.randn(2, 5, 5, 8)
    left, right = x[..., :4], x[..., 4:]
    conv = block.conv(left.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ssm = block.ssm(F.layer_norm(right, (4,), block.norm.weight, block.norm.bias))
    expected = torch.empty_like(x)
    expected[..., 0::2], expected[..., 1::2] = conv, ssm  # channel 2i = conv i, 2i + 1 = SSM i
    torch.testing.assert_close(block(x), expected + x)


def test_convssm_se_block_by_hand():
    torch.manual_seed(4)
    block = ConvSSMSE(32, d_state=4).eval()
    x = torch.randn(2, 4, 4, 32)
    left, right = x[..., :16], x[..., 16:]
    y_right = right + block.ssm(F.layer_norm(right, (16,), block.norm.weight, block.norm.bias))  # inner residual
    y = torch.cat([block.conv(left.permute(0, 3, 1, 2)), y_right.permute(0, 3, 1, 2)], 1)  # (B, C, H, W)
    w1, w2 = block.se[0].weight, block.se[2].weight  # C -> C/16 -> C, no biases
    gate = torch.sigmoid(torch.relu(y.mean((2, 3)) @ w1.T) @ w2.T)
    out = F.conv2d(y * gate[:, :, None, None], block.mix.weight, block.mix.bias).permute(0, 2, 3, 1) + x
    torch.testing.assert_close(block(x), out)


def test_patch_merging_gathers_neighbours_and_pads_odd_sides():
    torch.manual_seed(5)
    m = PatchMerging(3, dims=2)
    x = torch.randn(1, 4, 4, 3)
    token = torch.cat([x[0, 0, 0], x[0, 1, 0], x[0, 0, 1], x[0, 1, 1]])  # the 2x2 neighbourhood of (0, 0)
    torch.testing.assert_close(m(x)[0, 0, 0], m.reduction(m.norm(token)))
    for dims, shape in ((2, (7, 7)), (3, (7, 5, 3))):
        m = PatchMerging(3, dims=dims)
        x = torch.randn(1, *shape, 3, requires_grad=True)
        out = m(x)
        assert out.shape[1:-1] == tuple(math.ceil(s / 2) for s in shape)
        out.sum().backward()
        last = x.grad[(0, *(-1 for _ in shape))]  # the last row / column / slice is used, not cropped
        assert last.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------------------------

TINY = dict(depths=[1, 1], widths=[8, 16])


@pytest.mark.parametrize("name, shape", [("medmamba_t", (2, 3, 28, 28)), ("medmambase", (2, 1, 28, 28)),
                                         ("medmamba3d", (2, 1, 12, 12, 12)), ("medmambase3d", (2, 1, 12, 12, 12))])
def test_every_parameter_learns_and_eval_is_per_sample(name, shape):
    torch.manual_seed(6)
    m = build_model(name, in_channels=shape[1], num_classes=3, input_size=shape[-1], **TINY)
    x = torch.rand(*shape)
    assert executed_parameter_count(m, x) == count_parameters(m)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x[:1]), m(x)[:1], rtol=1e-5, atol=1e-6)  # no mixing across the batch


def test_the_3d_model_sees_every_axis_direction():
    torch.manual_seed(7)
    m = build_model("medmamba3d", in_channels=1, num_classes=3, input_size=8, **TINY, patch_size=2).eval()
    x = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        base = m(x)
        for axis in (2, 3, 4):
            assert not torch.allclose(m(x.flip(axis)), base, atol=1e-6)


def test_a_2d_model_refuses_a_volume():
    m = build_model("medmamba_t", in_channels=1, num_classes=2, input_size=28, **TINY)
    with pytest.raises(ValueError, match="2-D model"):
        m(torch.rand(1, 1, 8, 8, 8))


@pytest.mark.parametrize("config", ["medmamba/medmamba3d.json", "medmamba/medmambase3d.json"])
def test_train_and_predict_on_synthetic3d(tmp_path, config):
    args = [config, "--data.name", "synthetic3d", "--model.depths", "[1, 1]", "--model.widths", "[8, 16]",
            "--train.epochs", "1", "--train.batch_size", "32", "--output.dir", str(tmp_path), "--output.name", "run",
            "--output.plots", "false"]
    assert train.main(args) == 0
    assert predict.main(args) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    saved = np.load(tmp_path / "run" / "eval" / "test" / "predictions.npz")
    y, score = saved["y_true"].ravel(), saved["y_score"]
    assert metrics["n_samples"] == 60 and score.shape == (60, 3)
    assert metrics["auc"] == pytest.approx(np.mean([roc_auc_score(y == k, score[:, k]) for k in range(3)]))
    assert metrics["acc"] == pytest.approx(np.mean(score.argmax(1) == y))
