"""Memory-Attention (MAM, docs/spec/MAM.md): the layer against hand-written attention, STS vs ISTS, the
LMTTM/TTM processor `transformer_mam`, the 3D ViT `vit_mam`, and both end to end through train.py/predict.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import predict
import train
from engine.config import ConfigError, load_config
from model import build_model, count_parameters, executed_parameter_count
from model.memory_attention import MemoryAttention, TransformerMAMProcessor, memory_attention, thread_memory
from model.processor import TransformerProcessor
from model.vit import Block

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------
# hand-written references (no code shared with model/memory_attention.py)
# ----------------------------------------------------------------------------------------------------------

def projections(x, w, b):
    """Query, key, value of x (B, N, D) from a stacked (3D, D) weight, written out per matrix."""
    d = x.shape[-1]
    return [x @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3)]


def attention_ref(q, k, v, w_out, b_out, heads):
    """softmax(q_h k_hᵀ / sqrt(d_h)) v_h per head, heads concatenated, then the output projection."""
    d = q.shape[-1]
    hd = d // heads
    outs = []
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd), dim=-1)
        outs.append(weights @ v[..., s])
    return torch.cat(outs, dim=-1) @ w_out.T + b_out


def random_attention(dim=12, heads=3, seed=0):
    torch.manual_seed(seed)
    layer = MemoryAttention(dim, heads).double()
    with torch.no_grad():  # non-zero biases, so a wrong bias path shows
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer.eval()


def postnorm_ref(layer: nn.TransformerEncoderLayer, x, q_extra=None):
    """Post-norm encoder layer (eval): LN(x + attn(x)), LN(· + W2 relu(W1 ·)); returns (out, projected q).

    `q_extra` is added to the projected queries (the MAM memory)."""
    attn = layer.self_attn
    q, k, v = projections(x, attn.in_proj_weight, attn.in_proj_bias)
    q = q if q_extra is None else q + q_extra
    a = attention_ref(q, k, v, attn.out_proj.weight, attn.out_proj.bias, attn.num_heads)
    y = F.layer_norm(x + a, (x.shape[-1],), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    ff = F.relu(y @ layer.linear1.weight.T + layer.linear1.bias) @ layer.linear2.weight.T + layer.linear2.bias
    return F.layer_norm(y + ff, (x.shape[-1],), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps), q


# ----------------------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------------------

def test_memory_off_is_plain_attention_on_the_same_weights():
    layer = random_attention()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    out, memory = layer(x, None, use_memory=False)
    assert memory is None
    q, k, v = projections(x, layer.in_proj_weight, layer.in_proj_bias)
    torch.testing.assert_close(out, attention_ref(q, k, v, layer.out_proj.weight, layer.out_proj.bias, 3))
    split = lambda t: t.reshape(2, 7, 3, 4).transpose(1, 2)  # noqa: E731
    sdpa = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(2, 7, 12)
    torch.testing.assert_close(out, layer.out_proj(sdpa))
    mha = nn.MultiheadAttention(12, 3, batch_first=True).double().eval()
    mha.load_state_dict(layer.state_dict())  # same parameter names: plain-attention weights load unchanged
    torch.testing.assert_close(out, mha(x, x, x, need_weights=False)[0])
    # a given memory is ignored when the memory is off
    torch.testing.assert_close(layer(x, torch.randn_like(x), use_memory=False)[0], out)
    # first layer of a chain (M_0 = 0): memory on equals memory off, and M_1 = Q_1
    out_on, m1 = layer(x, None)
    torch.testing.assert_close(out_on, out)
    torch.testing.assert_close(m1, q)


def test_queries_of_layer_l_are_the_sum_of_the_projected_queries_of_layers_up_to_l():
    layers = [random_attention(seed=s) for s in range(4)]
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    memory, inputs, outputs = None, [], []
    for layer in layers:  # a chain: each layer reads the previous output (with a residual, as in a block)
        inputs.append(x)
        out, memory = layer(x, memory)
        outputs.append(out)
        x = x + out
    queries = [projections(xi, lay.in_proj_weight, lay.in_proj_bias)[0] for xi, lay in zip(inputs, layers)]
    for l, layer in enumerate(layers):
        q_tilde = sum(queries[: l + 1])  # Q̃_l = Q_1 + ... + Q_l
        _, k, v = projections(inputs[l], layer.in_proj_weight, layer.in_proj_bias)
        torch.testing.assert_close(outputs[l], attention_ref(q_tilde, k, v, layer.out_proj.weight,
                                                             layer.out_proj.bias, 3))
    torch.testing.assert_close(memory, sum(queries))  # M_L, not normalised


def test_memory_of_the_wrong_shape_is_refused():
    layer = random_attention()
    with pytest.raises(ValueError, match="does not match the queries"):
        layer(torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 4, 12, dtype=torch.float64))


def test_gradients_reach_earlier_layers_through_the_memory_queries_only():
    first, second = random_attention(seed=1), random_attention(seed=2)
    x1, x2 = (torch.randn(2, 5, 12, dtype=torch.float64) for _ in range(2))
    for use_memory in (True, False):
        for p in (*first.parameters(), *second.parameters()):
            p.grad = None
        _, memory = first(x1, None, use_memory=use_memory)
        out, _ = second(x2, memory, use_memory=use_memory)  # the second layer does not read the first's output
        out.square().sum().backward()
        grad = first.in_proj_weight.grad
        if not use_memory:
            assert grad is None
            continue
        assert grad[:12].abs().sum() > 0  # query rows: through the memory (not detached)
        assert torch.count_nonzero(grad[12:]) == 0  # keys and values do not enter the memory
        assert first.out_proj.weight.grad is None


class Recorder(nn.Module):
    """A block that adds the memory it receives to the token values and records it."""

    def __init__(self, log, name, scale):
        super().__init__()
        self.log, self.name, self.scale = log, name, scale

    def forward(self, x, memory, *, use_memory=True):
        self.log.append((self.name, None if memory is None else memory.clone()))
        q = self.scale * x
        if not use_memory:
            return x + q, None
        memory = q if memory is None else q + memory
        return x + memory, memory


def run_stages(strategy):
    log = []
    stages = [[Recorder(log, "a1", 1.0), Recorder(log, "a2", 2.0)], [Recorder(log, "b1", 3.0), Recorder(log, "b2", 4.0)]]
    out = thread_memory(stages, torch.ones(1, 2, 3), strategy)
    return out, dict(log)


def test_ists_resets_the_memory_at_every_stage_and_sts_does_not():
    out_sts, seen_sts = run_stages("sts")
    out_ists, seen_ists = run_stages("ists")
    out_none, seen_none = run_stages("none")
    assert seen_sts["a1"] is None and seen_ists["a1"] is None
    assert seen_sts["b1"] is not None and seen_ists["b1"] is None  # ISTS starts stage 2 from M = 0
    torch.testing.assert_close(seen_sts["b1"], torch.full((1, 2, 3), 5.0))  # M after a1, a2: 1 + 4
    torch.testing.assert_close(seen_ists["b2"], torch.full((1, 2, 3), 21.0))
    assert all(m is None for m in seen_none.values())
    # by hand: x = 1; a1: m = 1, x = 2; a2: m = 4 + 1 = 5, x = 7; b1 (STS): m = 21 + 5 = 26, x = 33;
    # b2: m = 132 + 26 = 158, x = 191. ISTS: b1: m = 21, x = 28; b2: m = 112 + 21 = 133, x = 161.
    torch.testing.assert_close(out_sts, torch.full((1, 2, 3), 191.0))
    torch.testing.assert_close(out_ists, torch.full((1, 2, 3), 161.0))
    torch.testing.assert_close(out_none, torch.ones(1, 2, 3) * 2 * 3 * 4 * 5)  # x + s x, s = 1..4


def test_sts_across_a_shape_change_is_refused_and_strategies_are_checked():
    blocks = [[Recorder([], "a", 1.0)], [Recorder([], "b", 1.0)]]
    with pytest.raises(ValueError, match="use ists"):
        thread_memory(blocks, torch.ones(1, 4, 3), "sts", transitions=[lambda x: x[:, :2]])
    assert thread_memory(blocks, torch.ones(1, 4, 3), "ists", transitions=[lambda x: x[:, :2]]).shape == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown MAM strategy"):
        thread_memory(blocks, torch.ones(1, 4, 3), "both")


# ----------------------------------------------------------------------------------------------------------
# the LMTTM/TTM processor
# ----------------------------------------------------------------------------------------------------------

def processors(repeats=3, seed=0):
    torch.manual_seed(seed)
    plain = TransformerProcessor(dim=16, num_tokens=6, heads=4, dropout=0.2, repeats=repeats).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    mam = TransformerMAMProcessor(dim=16, num_tokens=6, heads=4, dropout=0.2, repeats=repeats).double()
    mam.load_state_dict(plain.state_dict())  # same names and shapes: strict load
    return plain.eval(), mam.eval()


def test_mam_processor_has_the_plain_processors_parameters_and_equals_it_with_the_memory_off():
    plain, mam = processors()
    assert [(n, p.shape) for n, p in plain.named_parameters()] == [(n, p.shape) for n, p in mam.named_parameters()]
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    mam.memory = False
    torch.testing.assert_close(mam(x), plain(x))
    mam.memory = True
    assert not torch.allclose(mam(x), plain(x), atol=1e-3)  # the memory changes the result...
    plain1, mam1 = processors(repeats=1)
    torch.testing.assert_close(mam1(x), plain1(x))  # ...but not for one application (M_0 = 0)


def test_mam_processor_threads_the_memory_through_the_repeats_against_a_direct_formula():
    _, mam = processors()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    y, memory = x, None
    for _ in range(3):  # Q̃_l = Q_l + M_{l-1}, M_l = Q̃_l, with the one weight-tied layer
        y, memory = postnorm_ref(mam.layer, y, q_extra=memory)
    torch.testing.assert_close(mam(x), y)
    torch.testing.assert_close(mam(x), y)  # a second call starts from M = 0 again (no hidden state)


def test_mam_processor_refuses_batch_attention_and_the_config_says_so():
    with pytest.raises(ValueError, match="not offered with transformer_mam"):
        TransformerMAMProcessor(dim=8, num_tokens=3, heads=2, dropout=0.0, repeats=3, batch_attention=True)
    with pytest.raises(ConfigError, match="compat_batch_attention needs the transformer processor"):
        load_config("demo.json", {"model": {"processor": "transformer_mam", "compat_batch_attention": True}})
    with pytest.raises(ConfigError, match="divisible by heads"):
        load_config("demo.json", {"model": {"processor": "transformer_mam", "dim": 20, "heads": 8}})
    cfg = load_config("demo.json", {"model": {"processor": "transformer_mam", "official_compat": True}})
    assert cfg.model.compat_batch_attention is False and cfg.model.compat_carry_memory is True


TINY_TTM = dict(dim=16, memory_tokens=16, heads=2, read_tokens=4)


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_memory_is_reset_at_every_step_and_parameters_equal_the_plain_processor(name, monkeypatch):
    torch.manual_seed(0)
    plain = build_model(name, in_channels=1, num_classes=3, input_size=28, **TINY_TTM)
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=3, input_size=28, processor="transformer_mam", **TINY_TTM)
    assert count_parameters(model) == count_parameters(plain)
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())  # strict: identical names and shapes
    seen = []
    block = model.processor.block

    def spy(x, memory, **kwargs):
        seen.append(memory is None)
        return block(x, memory, **kwargs)

    monkeypatch.setattr(model.processor, "block", spy)
    model.eval()(torch.rand(2, 1, 28, 28, 28))
    assert seen == [True, False, False] * model.steps  # fresh at each step, carried through the 3 repeats


# ----------------------------------------------------------------------------------------------------------
# the ViT
# ----------------------------------------------------------------------------------------------------------

TINY_VIT = dict(embed_dim=16, depth=3, num_heads=2, mlp_ratio=2.0)


def vit(seed=0, input_size=28, num_classes=3, **kwargs):
    torch.manual_seed(seed)
    return build_model("vit_mam", in_channels=1, num_classes=num_classes, input_size=input_size,
                       **{**TINY_VIT, **kwargs})


def test_vit_parameter_count_by_hand_and_mam_adds_none():
    d, h, n, k = 16, 32, 7 ** 3, 3  # width, MLP hidden, tokens at 28³ with patch 4, classes
    block = 4 * d + (3 * d * d + 3 * d + d * d + d) + (d * h + h + h * d + d)  # 2 LN, attention, MLP
    expected = (64 * d + d) + n * d + 3 * block + 2 * d + (d * k + k)  # patch embed, pos, blocks, LN, head
    for mam in ("sts", "none", "ists"):
        model = vit(mam=mam)
        assert count_parameters(model) == expected
        assert executed_parameter_count(model, torch.rand(2, 1, 28, 28, 28)) == expected  # every one gets a gradient
    assert vit(pool="cls").pos_embed.shape == (1, n + 1, d)
    assert vit(input_size=64).pos_embed.shape == (1, 16 ** 3, d)  # 64³ -> 16³ tokens
    small = build_model("vit_mam", in_channels=1, num_classes=2, input_size=28)
    assert count_parameters(small) == 2_748_290  # size small: 192 wide, 6 blocks, 6 heads


def test_vit_block_with_the_memory_off_is_a_standard_pre_norm_encoder_layer():
    torch.manual_seed(0)
    block = Block(16, 2, 2.0, 0.0).double().eval()
    ref = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=True).double().eval()
    ref.self_attn.load_state_dict(block.attn.state_dict())
    for mine, theirs in ((block.mlp[0], ref.linear1), (block.mlp[3], ref.linear2), (block.norm1, ref.norm1),
                         (block.norm2, ref.norm2)):
        with torch.no_grad():
            for p in mine.parameters():
                p.normal_(0, 0.3)
        theirs.load_state_dict(mine.state_dict())
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, memory = block(x, torch.randn_like(x), use_memory=False)
    assert memory is None
    torch.testing.assert_close(out, ref(x))


def test_vit_sts_changes_the_result_from_the_second_block_on():
    x = torch.rand(2, 1, 28, 28, 28)
    for depth, same in ((1, True), (3, False)):
        sts, plain = vit(depth=depth, mam="sts").eval(), vit(depth=depth, mam="none").eval()
        plain.load_state_dict(sts.state_dict())
        assert torch.allclose(sts(x), plain(x), atol=1e-6) == same


def test_hierarchical_vit_resets_the_memory_at_every_stage(monkeypatch):
    model = vit(mam="ists", stages=3, depth=5).eval()
    assert [len(s) for s in model.stages] == [2, 2, 1]
    assert model.head.in_features == 64  # width doubled twice
    seen = []
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            attn = block.attn
            original = attn.forward

            def spy(x, memory=None, *, use_memory=True, _f=original, _tag=(s, b)):
                seen.append((_tag, memory is None))
                return _f(x, memory, use_memory=use_memory)

            monkeypatch.setattr(attn, "forward", spy)
    assert model(torch.rand(1, 1, 28, 28, 28)).shape == (1, 3)
    assert seen == [((0, 0), True), ((0, 1), False), ((1, 0), True), ((1, 1), False), ((2, 0), True)]


def test_vit_config_errors_are_clear():
    for overrides, message in (({"mam": "sts", "stages": 2}, "use mam = ists"),
                               ({"patch": 3}, "must divide the volume side 28"),
                               ({"embed_dim": 10, "num_heads": 4}, "divisible by num_heads"),
                               ({"mam": "memory"}, "mam")):
        with pytest.raises((ConfigError, ValueError), match=message):
            cfg = load_config("vit_mam.json", {"model": overrides, "data": {"name": "synthetic3d"}})
            build_model("vit_mam", in_channels=1, num_classes=3, input_size=28,
                        **{k: getattr(cfg.model, k) for k in cfg.model.__dataclass_fields__})


@pytest.mark.parametrize("kwargs", [dict(name="vit_mam", mam="sts"), dict(name="vit_mam", mam="ists", stages=2),
                                    dict(name="lmttm", processor="transformer_mam")], ids=["sts", "ists", "lmttm"])
def test_batch_independence_in_eval(kwargs):
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    torch.manual_seed(0)
    extra = TINY_VIT if name == "vit_mam" else TINY_TTM
    model = build_model(name, in_channels=1, num_classes=3, input_size=28, **extra, **kwargs).eval()
    x = torch.rand(4, 1, 28, 28, 28)
    with torch.no_grad():
        whole = model(x)
        for i in range(4):
            torch.testing.assert_close(model(x[i:i + 1]), whole[i:i + 1], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# end to end on synthetic3d
# ----------------------------------------------------------------------------------------------------------

VIT_ARGS = ["--model.name", "vit_mam", "--model.embed_dim", "16", "--model.depth", "2", "--model.num_heads", "2"]
TTM_ARGS = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--model.processor",
            "transformer_mam"]


@pytest.mark.parametrize("config, extra", [
    ("demo.json", TTM_ARGS),
    ("demo.json", TTM_ARGS + ["--model.name", "ttm"]),
    ("vit_mam.json", VIT_ARGS + ["--model.mam", "sts"]),
    ("vit_mam.json", VIT_ARGS + ["--model.mam", "none"]),
    ("vit_mam.json", VIT_ARGS + ["--model.mam", "ists", "--model.stages", "2"]),
], ids=["lmttm_mam", "ttm_mam", "vit_sts", "vit_none", "vit_ists"])
def test_train_and_predict_end_to_end(tmp_path, config, extra):
    args = [config, "--data.name", "synthetic3d", *extra, "--train.epochs", "1", "--train.batch_size", "32",
            "--train.lr", "0.001", "--output.dir", str(tmp_path), "--output.name", "run"]
    assert train.main(args) == 0
    assert predict.main(args) == 0
    result = json.loads((tmp_path / "run" / "eval" / "test" / "metrics.json").read_text())
    assert result["n_samples"] == 60
    (only,) = result["per_checkpoint"]  # one checkpoint: best.pt
    assert (only["auc"], only["acc"]) == (result["auc"], result["acc"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    for key, value in zip(extra[::2], extra[1::2]):  # the run is the model asked for
        assert str(saved[key.split(".")[1]]) == value, key


def test_bad_mam_config_exits_2_with_one_line():
    done = subprocess.run([sys.executable, "train.py", "vit_mam.json", "--data.name", "synthetic3d",
                           "--model.stages", "2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "use mam = ists" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("size, input_size, expected", [("small", 28, "2,748,290"), ("base", 64, "15,795,074"),
                                                        ("tiny", 28, "226,306")])
def test_vit_parameter_counts_stated_in_the_docs(size, input_size, expected):
    model = build_model("vit_mam", in_channels=1, num_classes=2, input_size=input_size, size=size)
    assert f"{count_parameters(model):,}" == expected
    section = (REPO / "docs" / "models.md").read_text().split("## Memory-Attention (MAM)")[1].split("\n## ")[0]
    assert expected in section
