"""The fast forward (`forward_cached`, the default) computes the same function as the step-by-step
`forward_plain` of docs/spec/LMTTM.md §3/§4 (`fast_path = False`): same logits (1e-5) and same gradients, for LMTTM and
TTM, every processor, positional embeddings learned and none, the compat options, training (dropout 0, no
noise) and evaluation. Its levers: inputs' summariser terms of all steps at once, per-block read terms and
per-slot write terms cached until the block is written (LMTTM), the last write skipped unless the memory is
carried, the summariser softmax over the contiguous axis (`pool_pieces`). The plain path itself is checked
against a hand-written reference in tests/test_fidelity.py.
"""

from __future__ import annotations

import pytest
import torch

from model import build_model
from model.summariser import TokenSummariser

TOL = dict(atol=1e-5, rtol=1e-5)


def _build(name, *, seed=0, input_size=16, **kw):
    torch.manual_seed(seed)
    kw = {"dim": 16, "memory_tokens": 16, "read_tokens": 4, "heads": 2, "dropout": 0.0, "noise": "none", **kw}
    model = build_model(name, in_channels=1, num_classes=3, input_size=input_size, **kw)
    with torch.no_grad():  # large positional embeddings: a wrong slot or a stale cached term shows in the logits
        for pos in (model.pos_read, model.pos_write):
            if pos is not None:
                pos.normal_(std=1.0)
    return model


def _volume(batch=2, size=16, seed=1):  # 16³: 5 steps of 25 tokens
    return torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


def _run(model, x, fast: bool, *, seed=5, state=None):
    """Logits, gradients of a fixed loss, and the carried state, with the fast or the plain forward."""
    model.fast_path = fast
    model.reset_state()
    if state is not None:
        model.set_extra_state(state)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(x)
    (logits * torch.arange(1.0, 4.0)).square().sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, model.get_extra_state()


def _assert_same(model, x, **kw):
    """float32: same logits to 1e-5. float64: same logits and gradients to 1e-9 (relative to the largest
    gradient entry of each parameter), so a subtle maths difference cannot hide behind float32 rounding
    (the gradients of these tiny random models are ill-conditioned in float32: ~1e-3 relative noise)."""
    fast = _run(model, x, True, **kw)
    plain = _run(model, x, False, **kw)
    torch.testing.assert_close(fast[0], plain[0], **TOL)
    state = kw.pop("state", None)
    model.double()
    double = lambda st: None if st is None else {**st, "carried_memory": st["carried_memory"].double()}  # noqa: E731
    fast64 = _run(model, x.double(), True, state=double(state), **kw)
    plain64 = _run(model, x.double(), False, state=double(state), **kw)
    model.float()
    torch.testing.assert_close(fast64[0], plain64[0], atol=1e-10, rtol=1e-10)
    assert fast64[1].keys() == plain64[1].keys() and len(plain64[1]) == len(list(model.parameters()))
    for key, g in plain64[1].items():
        scale = g.abs().max().item() + 1e-30
        torch.testing.assert_close(fast64[1][key], g, atol=1e-9 * scale, rtol=1e-9, msg=lambda m: f"{key}: {m}")
    return fast, plain


VARIANTS = [
    {},
    {"pos_embedding": "none"},
    {"processor": "mlp"},
    {"processor": "mixer"},
    {"processor": "transformer_mam"},
    {"compat_batch_attention": True},
    {"processor_repeats": 1, "read_tokens": 1},
]
LMTTM_VARIANTS = [
    {"blocks": 2},
    {"blocks": 1},
    {"blocks": 8, "memory_tokens": 32},  # more blocks than steps between two writes of a block
    {"depth_patch_size": 1, "blocks": 4},  # 16 steps
    {"compat_global_pointer": True},
]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name,kw", [(n, v) for n in ("lmttm", "ttm") for v in VARIANTS]
                         + [("lmttm", v) for v in LMTTM_VARIANTS])
def test_fast_equals_plain(name, kw, mode):
    model = getattr(_build(name, **kw), mode)()
    fast, plain = _assert_same(model, _volume())
    assert not torch.allclose(fast[0], torch.zeros_like(fast[0]), atol=1e-3)  # not a degenerate comparison


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_fast_equals_plain_with_carried_memory(name, mode):
    """compat_carry_memory: the carried memory in and out (the last write is not skipped) and the pointer."""
    kw = {"compat_carry_memory": True} | ({"compat_global_pointer": True} if name == "lmttm" else {})
    model = getattr(_build(name, **kw), mode)()
    x = _volume()
    state = {"carried_memory": torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3)),
             "pointer": 2 if name == "lmttm" else 0}
    fast, plain = _assert_same(model, x, state=state)
    torch.testing.assert_close(fast[2]["carried_memory"], plain[2]["carried_memory"], **TOL)
    assert fast[2]["pointer"] == plain[2]["pointer"] == ((2 + 5) % 4 if name == "lmttm" else 0)
    # the carried memory is used: starting from zeros gives other logits
    assert not torch.allclose(_run(model, x, True)[0], fast[0], atol=1e-4)


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_same_random_draws_as_plain_in_training(name):
    """Dropout and memory noise on: the fast path takes torch's random draws in the plain order (reader
    dropout, processor, writer dropout, noise per step), so one seed gives the same logits. Only the skipped
    last write's draws are missing, which no logit depends on."""
    model = _build(name, dropout=0.3, noise="normal", noise_rate=0.5).train()
    x = _volume()
    fast, plain = _assert_same(model, x, seed=7)
    other = _run(model, x, True, seed=8)[0]
    assert not torch.allclose(fast[0], other, atol=1e-4)  # the draws matter


@pytest.mark.parametrize("name,writes", [("lmttm", 4), ("ttm", 4)])
def test_last_write_skipped_unless_memory_is_carried(name, writes):
    """5 steps at 16³: 4 writes are read later; the 5th only with a carried memory."""
    for carry, expected in ((False, writes), (True, writes + 1)):
        model = _build(name, compat_carry_memory=carry).eval()
        calls = []
        real = model.writer.pool_pieces
        model.writer.pool_pieces = lambda logits, features: calls.append(1) or real(logits, features)
        with torch.no_grad():
            model(_volume())
        assert len(calls) == expected


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_random_positions_run_the_plain_path(name):
    """compat_random_pos draws fresh positions at every read and write: no cached terms are valid."""
    model = _build(name, compat_random_pos=True).eval()
    x = _volume()
    torch.manual_seed(4)
    fast = model(x)
    model.fast_path = False
    torch.manual_seed(4)
    torch.testing.assert_close(fast, model(x), atol=0, rtol=0)


def test_pool_pieces_is_the_softmax_pool_of_the_concatenation():
    """pool_pieces(pieces) = softmax over all tokens of the logits, weighted sum of the features (by hand)."""
    torch.manual_seed(0)
    summariser = TokenSummariser(dim=6, num_outputs=3).eval()
    logits = [torch.randn(2, n, 3) * 3 for n in (4, 1, 5)]
    features = [torch.randn(2, n, 6) for n in (4, 1, 5)]
    all_logits, all_features = torch.cat(logits, 1), torch.cat(features, 1)
    weights = all_logits.exp() / all_logits.exp().sum(dim=1, keepdim=True)  # (2, 10, 3) over the 10 tokens
    expected = torch.einsum("bnr,bnd->brd", weights, all_features)
    torch.testing.assert_close(summariser.pool_pieces(logits, features), expected, atol=1e-6, rtol=1e-6)


EXPECTED_KEYS = {
    "_extra_state", "head.bias", "head.weight", "pos_read", "pos_write", "stem.conv.bias", "stem.conv.weight",
    *(f"processor.layer.{k}" for k in (
        "linear1.bias", "linear1.weight", "linear2.bias", "linear2.weight", "norm1.bias", "norm1.weight",
        "norm2.bias", "norm2.weight", "self_attn.in_proj_bias", "self_attn.in_proj_weight",
        "self_attn.out_proj.bias", "self_attn.out_proj.weight")),
    *(f"{s}.{k}" for s in ("reader", "writer")
      for k in ("hidden.weight", "norm.bias", "norm.weight", "to_features.weight", "to_logits.weight")),
}


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_state_dict_keys_unchanged(name):
    """Checkpoints keep their keys: the fast path adds no parameters or buffers."""
    model = _build(name)
    assert set(model.state_dict()) == EXPECTED_KEYS
    model.fast_path = False
    assert set(model.state_dict()) == EXPECTED_KEYS


@pytest.mark.parametrize("batch_attention", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_block_equals_the_layer(batch_attention, mode):
    """With gradients the transformer processor runs its written-out block: the same outputs, gradients and
    dropout draws (dropout 0.3, one seed) as nn.TransformerEncoderLayer's own forward."""
    from model.processor import TransformerProcessor
    torch.manual_seed(0)
    proc = TransformerProcessor(dim=16, num_tokens=6, heads=4, dropout=0.3, repeats=3,
                                batch_attention=batch_attention)
    getattr(proc, mode)()
    x = torch.randn(5, 6, 16)
    results = []
    for fast in (True, False):
        proc.fast_path = fast
        proc.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(9)
        out = proc(xi)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, proc.layer.self_attn.in_proj_weight.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
