"""LMTTM and TTM (model/lmttm.py, model/ttm.py and their shared parts), checked against the spec
(docs/spec/LMTTM.md): shapes, the linked-memory block schedule, token counts, the shared-input fast
read, parameter counts, gradients, determinism and batch independence (and the official_compat options
that break them), memory noise statistics, config validation and device/batch-size independence.

Everything runs on the CPU with small dims; the D = M = 448 models run one batch-1 forward each.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from model import build_model, count_parameters, executed_parameter_count
from model.lmttm import LMTTM, LMTTMConfig, block_schedule
from model.memory_noise import NOISE_MODES, add_memory_noise, draw_noise
from model.ttm import TTM

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAMES = ["lmttm", "ttm"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a busy 2-core machine two OpenMP
    threads slow this file down more than tenfold. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(name="lmttm", *, input_size=28, num_classes=2, in_channels=1, dim=16, memory_tokens=16, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size, dim=dim,
                       memory_tokens=memory_tokens, **kw)


def _volume(batch=2, size=28, channels=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, size, generator=g)


# ----------------------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stem", ["3d", "3dBN"])
def test_stem_tokens_shape_28(stem):
    model = _build("lmttm", dim=32, stem=stem).eval()
    tokens = model.stem(_volume(batch=2))
    assert tokens.shape == (2, 9, 81, 32)
    assert (model.steps, model.input_tokens) == (9, 81)


def test_stem_token_layout():
    """Step t covers depth slices 3t..3t+2; token j is the 3×3×3 patch at row j // 9, col j % 9."""
    model = _build("lmttm", dim=16)
    conv = model.stem.conv
    x = _volume(batch=1)
    tokens = model.stem(x)
    for t, j in [(0, 0), (4, 40), (8, 80), (2, 17)]:
        row, col = divmod(j, 9)
        patch = x[0, :, 3 * t:3 * t + 3, 3 * row:3 * row + 3, 3 * col:3 * col + 3]
        expected = ((conv.weight * patch).sum(dim=(1, 2, 3, 4)) + conv.bias).relu()
        torch.testing.assert_close(tokens[0, t, j], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size,steps,tokens", [(28, 9, 81), (64, 21, 441)])
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_shape(name, size, steps, tokens, batch):
    model = _build(name, input_size=size, num_classes=3).eval()
    assert (model.steps, model.input_tokens) == (steps, tokens)
    with torch.no_grad():
        logits = model(_volume(batch=batch, size=size))
    assert logits.shape == (batch, 3)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------------------
# LMTTM block schedule (spec §3)
# ----------------------------------------------------------------------------------------------------------

SPEC_SCHEDULE = [(0, 3, 1), (1, 0, 2), (2, 1, 3), (3, 2, 0), (0, 3, 1), (1, 0, 2), (2, 1, 3), (3, 2, 0), (0, 3, 1)]


def test_block_schedule_matches_spec():
    assert block_schedule(9, 4) == SPEC_SCHEDULE
    # the written (future) block is the next step's current block
    assert [s[2] for s in SPEC_SCHEDULE] == [1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert block_schedule(9, 4, start=1) == SPEC_SCHEDULE[1:] + [(1, 0, 2)]
    assert block_schedule(3, 1) == [(0, 0, 0)] * 3


def _record_schedule(model: LMTTM, x: torch.Tensor, memory: torch.Tensor):
    """Run forward from `memory` (instead of zeros); return the blocks read/written per step, identified by
    comparing the `linked` tensors handed to read/write with a shadow copy of the memory blocks."""
    k = model.cfg.blocks
    shadow = list(memory.chunk(k, dim=1))
    steps = []
    real_read, real_write = model.read, model.write
    read_linked = []

    def identify(block):
        hits = [b for b in range(k) if torch.equal(block, shadow[b])]
        assert len(hits) == 1, f"a linked block matches memory blocks {hits}"
        return hits[0]

    def read(linked, inputs):
        read_linked.append(linked.clone())
        return real_read(linked, inputs)

    def write(linked, inputs, outputs):
        assert torch.equal(linked, read_linked[-1]), "write saw other blocks than the read of the same step"
        ids = tuple(identify(linked[:, i]) for i in range(3))
        new = real_write(linked, inputs, outputs)
        assert new.shape == shadow[0].shape
        # which block becomes `new` is checked by the next step's identification (and at the end)
        shadow[ids[2]] = new.detach().clone()
        steps.append(ids)
        return new

    model.read, model.write = read, write
    model.initial_memory = lambda like: memory.to(like)
    try:
        with torch.no_grad():
            model(x)
    finally:
        del model.read, model.write, model.initial_memory
    return steps, shadow


def test_forward_follows_block_schedule():
    # noise "none" + compat_carry_memory: the model keeps its final memory, unchanged, for the last check
    model = _build("lmttm", dim=16, memory_tokens=16, compat_carry_memory=True, noise="none").eval()
    model.fast_path = False  # the step-by-step path whose read/write calls this test records (the fast
                             # path's equality with it: tests/test_fast_path.py)
    torch.manual_seed(5)
    memory = torch.randn(2, 16, 16)  # four distinct blocks, so each linked block is identifiable
    steps, shadow = _record_schedule(model, _volume(batch=2), memory)
    assert steps == SPEC_SCHEDULE
    # the written blocks really went into the memory that the model ends with
    torch.testing.assert_close(model._carried_memory, torch.cat(shadow, dim=1), atol=0, rtol=0)


def test_forward_block_schedule_with_global_pointer():
    """compat_global_pointer: the second call starts where the first stopped (9 mod 4 = 1)."""
    model = _build("lmttm", dim=16, memory_tokens=16, compat_global_pointer=True).eval()
    model.fast_path = False  # the step-by-step path whose read/write calls this test records (the fast
                             # path's equality with it: tests/test_fast_path.py)
    torch.manual_seed(5)
    memory = torch.randn(1, 16, 16)
    steps, _ = _record_schedule(model, _volume(batch=1), memory)
    assert steps == SPEC_SCHEDULE and model._pointer == 1
    steps, _ = _record_schedule(model, _volume(batch=1), memory)
    assert steps == block_schedule(9, 4, start=1) and model._pointer == 2


# ----------------------------------------------------------------------------------------------------------
# token counts at the default sizes (D = M = 448, k = 4, r = 8, 28³)
# ----------------------------------------------------------------------------------------------------------

def test_lmttm_default_token_counts():
    torch.manual_seed(0)
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=28).eval()
    model.fast_path = False  # the step-by-step path whose read/write calls this test records (the fast
                             # path's equality with it: tests/test_fast_path.py)
    cfg = model.cfg
    assert (cfg.dim, cfg.memory_tokens, cfg.blocks, cfg.read_tokens) == (448, 448, 4, 8)
    assert model.block_tokens == 112
    assert model.read_length == 112 + 81 == 193
    assert model.write_length == 3 * 112 + 81 + 3 * 8 == 441
    assert model.pos_read.shape == (1, 193, 448) and model.pos_write.shape == (1, 441, 448)

    pools, writes = [], []
    real_pool = model.reader.pool

    def pool(logits, features):
        out = real_pool(logits, features)
        pools.append((tuple(logits.shape), tuple(features.shape), tuple(out.shape)))
        return out

    model.reader.pool = pool
    handle = model.writer.register_forward_hook(
        lambda mod, args, out: writes.append((tuple(args[0].shape), tuple(out.shape))))
    proc = []
    handle2 = model.processor.register_forward_hook(
        lambda mod, args, out: proc.append((tuple(args[0].shape), tuple(out.shape))))
    try:
        with torch.no_grad():
            logits = model(_volume(batch=1))
    finally:
        handle.remove(), handle2.remove()
        del model.reader.pool
    assert logits.shape == (1, 2)
    # 9 steps; each pools 3 reads over 193 tokens into 8 tokens each (24 tokens), and writes 441 -> 112
    assert pools == [((1, 3, 193, 8), (1, 3, 193, 448), (1, 3, 8, 448))] * 9
    assert writes == [((1, 441, 448), (1, 112, 448))] * 9
    assert proc == [((1, 24, 448), (1, 24, 448))] * 9


def test_ttm_default_token_counts():
    torch.manual_seed(0)
    model = build_model("ttm", in_channels=1, num_classes=2, input_size=28).eval()
    model.fast_path = False  # the step-by-step path whose read/write calls this test records (the fast
                             # path's equality with it: tests/test_fast_path.py)
    assert model.read_length == 448 + 81 == 529
    assert model.write_length == 448 + 81 + 8 == 537
    assert model.pos_read.shape == (1, 529, 448) and model.pos_write.shape == (1, 537, 448)
    seen = {"reader": [], "writer": [], "processor": []}
    handles = [getattr(model, name).register_forward_hook(
        lambda mod, args, out, name=name: seen[name].append((tuple(args[0].shape), tuple(out.shape))))
        for name in seen]
    try:
        with torch.no_grad():
            logits = model(_volume(batch=1))
    finally:
        for h in handles:
            h.remove()
    assert logits.shape == (1, 2)
    assert seen["reader"] == [((1, 529, 448), (1, 8, 448))] * 9
    assert seen["writer"] == [((1, 537, 448), (1, 448, 448))] * 9
    assert seen["processor"] == [((1, 8, 448), (1, 8, 448))] * 9


# ----------------------------------------------------------------------------------------------------------
# the shared-input fast read equals the naive three reads
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pos_embedding", ["learned", "none"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fast_read_equals_naive(pos_embedding, batch):
    model = _build("lmttm", dim=32, memory_tokens=64, read_tokens=5, pos_embedding=pos_embedding).eval()
    m, n = model.block_tokens, model.input_tokens
    assert (m, n) == (16, 81)
    torch.manual_seed(3)
    linked = torch.randn(batch, 3, m, 32)
    inputs = torch.randn(batch, n, 32)
    with torch.no_grad():
        fast = model.read(linked, inputs)
        pos = model.pos_read if model.pos_read is not None else 0
        naive = torch.cat([model.reader(torch.cat([linked[:, b], inputs], dim=1) + pos) for b in range(3)], dim=1)
    assert fast.shape == (batch, 3 * 5, 32)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=1e-5)


def test_write_equals_naive():
    model = _build("lmttm", dim=32, memory_tokens=64, read_tokens=5).eval()
    torch.manual_seed(4)
    linked, inputs, outputs = torch.randn(2, 3, 16, 32), torch.randn(2, 81, 32), torch.randn(2, 15, 32)
    with torch.no_grad():
        got = model.write(linked, inputs, outputs)
        tokens = torch.cat([linked[:, 0], linked[:, 1], linked[:, 2], inputs, outputs], dim=1)
        expected = model.writer(tokens + model.pos_write)
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# parameter counts (spec §10)
# ----------------------------------------------------------------------------------------------------------

def _expected_params(name, D, M, k, r, K, n=81, C=1, p=3, learned=False):
    m = M // k
    if name == "lmttm":
        total = 14 * D * D + D * (C * p ** 3 + 17 + r + m + K) + K
        extra = (m + n) * D + (3 * m + n + 3 * r) * D
    else:
        total = 14 * D * D + D * (C * p ** 3 + 17 + r + M + K) + K
        extra = (M + n) * D + (M + n + r) * D
    return total + (extra if learned else 0)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("D,M,k,r,K", [(448, 448, 4, 8, 2), (16, 16, 4, 8, 2), (32, 64, 2, 4, 11),
                                       (64, 96, 3, 8, 3), (24, 40, 5, 1, 1)])
def test_parameter_count_closed_form(name, learned, D, M, k, r, K):
    kw = {"blocks": k} if name == "lmttm" else {}
    model = build_model(name, in_channels=1, num_classes=K, input_size=28, dim=D, memory_tokens=M, read_tokens=r,
                        pos_embedding="learned" if learned else "none", **kw)
    assert count_parameters(model) == _expected_params(name, D, M, k, r, K, learned=learned)


def test_parameter_count_published_values():
    assert _expected_params("lmttm", 448, 448, 4, 8, 2) == 2_884_226
    assert _expected_params("ttm", 448, 448, 4, 8, 2) == 3_034_754
    for name, value in [("lmttm", 2_884_226), ("ttm", 3_034_754)]:
        model = build_model(name, in_channels=1, num_classes=2, input_size=28, pos_embedding="none")
        assert count_parameters(model) == value


# ----------------------------------------------------------------------------------------------------------
# gradients reach every parameter
# ----------------------------------------------------------------------------------------------------------

def _assert_every_parameter_has_gradient(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    logits.mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    zero = [name for name, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"parameters with an all-zero gradient: {zero}"
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("processor", ["transformer", "mlp", "mixer"])
@pytest.mark.parametrize("stem", ["3d", "3dBN"])
def test_every_parameter_gets_gradient(name, processor, stem):
    model = _build(name, dim=16, memory_tokens=16, stem=stem, processor=processor)
    x = _volume(batch=2)
    _assert_every_parameter_has_gradient(model, x)
    torch.manual_seed(0)
    assert executed_parameter_count(model, x) == count_parameters(model)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_depth_patch_one_gives_28_steps(name):
    model = _build(name, dim=16, memory_tokens=16, depth_patch_size=1)
    assert (model.steps, model.input_tokens) == (28, 81)
    x = _volume(batch=2)
    assert model.stem(x).shape == (2, 28, 81, 16)
    _assert_every_parameter_has_gradient(model, x)
    assert executed_parameter_count(model, x) == count_parameters(model)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 2)


# ----------------------------------------------------------------------------------------------------------
# determinism and batch independence (default) vs the original code's behaviour (official_compat)
# ----------------------------------------------------------------------------------------------------------

def _differ(a, b, atol=1e-6):
    return not torch.allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("stem", ["3d", "3dBN"])
def test_default_eval_deterministic_and_batch_independent(name, stem):
    model = _build(name, dim=32, memory_tokens=32, stem=stem).eval()
    x = _volume(batch=3)
    with torch.no_grad():
        a, b = model(x), model(x)
        alone = model(x[1:2])
        other = x.clone()
        other[0], other[2] = _volume(batch=2, seed=9)
        mixed = model(other)
    assert torch.equal(a, b)
    torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], a[1], atol=1e-5, rtol=0)
    assert model._carried_memory is None and model._pointer == 0


def _rest_of_batch_changed(x):
    other = x.clone()
    other[1:] = _volume(batch=x.size(0) - 1, seed=42)
    return other


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_official_compat_breaks_determinism_and_batch_independence(name):
    model = _build(name, dim=32, memory_tokens=32, official_compat=True).eval()
    cfg = model.cfg
    assert cfg.compat_batch_attention and cfg.compat_random_pos and cfg.compat_carry_memory
    if name == "lmttm":
        assert cfg.compat_global_pointer
    assert model.pos_read is None and model.pos_write is None
    x = _volume(batch=3)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert _differ(a, b)
        model.reset_state()
        c = model(x)
        model.reset_state()
        d = model(_rest_of_batch_changed(x))
    assert _differ(c[0], d[0])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compat_random_pos_alone_breaks_determinism(name):
    model = _build(name, dim=32, memory_tokens=32, compat_random_pos=True).eval()
    assert model.pos_read is None and model.pos_write is None
    x = _volume(batch=3)
    with torch.no_grad():
        a, b = model(x), model(x)
        alone = model(x[:1])
    assert _differ(a, b)
    # the draws come from torch's RNG
    with torch.no_grad():
        torch.manual_seed(7)
        c = model(x)
        torch.manual_seed(7)
        d = model(x)
    assert torch.equal(c, d)
    assert alone.shape == (1, 2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compat_batch_attention_alone_breaks_batch_independence(name):
    model = _build(name, dim=32, memory_tokens=32, compat_batch_attention=True).eval()
    x = _volume(batch=3)
    with torch.no_grad():
        a, b = model(x), model(x)
        changed = model(_rest_of_batch_changed(x))
    assert torch.equal(a, b)  # still deterministic
    assert _differ(a[0], changed[0])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compat_carry_memory(name):
    """Values, not shapes: the carried memory is the final memory plus noise (the noise part is measured
    against a twin without noise); a batch of another size starts from the cut or zero-padded memory.
    tests/test_fidelity.py checks the same against the hand-written reference."""
    model = _build(name, dim=32, memory_tokens=32, compat_carry_memory=True).eval()
    quiet = _build(name, dim=32, memory_tokens=32, compat_carry_memory=True, noise="none", seed=5).eval()
    quiet.load_state_dict(model.state_dict())
    x = _volume(batch=3)
    with torch.no_grad():
        first = model(x)
        torch.testing.assert_close(quiet(x), first, atol=0, rtol=0)  # same start (zeros), same logits
        assert model._carried_memory.shape == (3, 32, 32)
        added = model._carried_memory - quiet._carried_memory  # the noise, added in evaluation too
        assert abs(added.std().item() - 0.2) < 0.02 and abs(added.mean().item()) < 0.02
        second = model(x)
        assert _differ(first, second)
        model.reset_state()
        assert model._carried_memory is None
        torch.testing.assert_close(model(x), first, atol=0, rtol=0)
        # another batch size: rows past the carried batch start from zeros (= a fresh model's logits),
        # the first rows from the carried memory (≠ fresh)
        fresh = _build(name, dim=32, memory_tokens=32, seed=7).eval()
        fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k != "_extra_state"}, strict=False)
        x5 = _volume(batch=5, seed=3)
        five, alone = model(x5), fresh(x5)
        torch.testing.assert_close(five[3:], alone[3:], atol=1e-6, rtol=0)
        assert _differ(five[:3], alone[:3])
        assert model._carried_memory.shape == (5, 32, 32)
        one = model(x5[:1])
        assert _differ(one, alone[:1]) and model._carried_memory.shape == (1, 32, 32)


def test_compat_global_pointer_advances():
    for steps_size, steps in [(28, 9), (64, 21)]:
        model = _build("lmttm", dim=16, memory_tokens=16, input_size=steps_size, compat_global_pointer=True).eval()
        assert model.steps == steps
        x = _volume(batch=1, size=steps_size)
        expected = 0
        with torch.no_grad():
            for _ in range(3):
                model(x)
                expected = (expected + steps) % 4
                assert model._pointer == expected
        model.reset_state()
        assert model._pointer == 0
    # without the option the pointer never moves
    model = _build("lmttm", dim=16, memory_tokens=16).eval()
    with torch.no_grad():
        model(_volume(batch=1))
    assert model._pointer == 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_carried_state_survives_state_dict(name):
    kw = {"compat_global_pointer": True} if name == "lmttm" else {}
    model = _build(name, dim=16, memory_tokens=16, compat_carry_memory=True, **kw).eval()
    x = _volume(batch=2)
    with torch.no_grad():
        model(x)
    state = model.state_dict()
    assert "_extra_state" in state
    fresh = _build(name, dim=16, memory_tokens=16, compat_carry_memory=True, seed=123, **kw).eval()
    assert fresh._carried_memory is None
    fresh.load_state_dict(state)
    assert torch.equal(fresh._carried_memory, model._carried_memory)
    assert fresh._pointer == model._pointer == (1 if name == "lmttm" else 0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)
    # the default model saves an empty state and loads it back
    plain = _build(name, dim=16, memory_tokens=16).eval()
    plain2 = _build(name, dim=16, memory_tokens=16, seed=9).eval()
    plain2.load_state_dict(plain.state_dict())
    assert plain2._carried_memory is None and plain2._pointer == 0
    with torch.no_grad():
        assert torch.equal(plain(x), plain2(x))


# ----------------------------------------------------------------------------------------------------------
# memory noise (spec §8)
# ----------------------------------------------------------------------------------------------------------

NOISE_STATS = {  # mean, std of the added term at rate 0.2
    "normal": (0.0, 0.2),
    "uniform": (0.0, 0.2 / math.sqrt(12)),
    "laplace": (2.0, 0.2 * 10 * math.sqrt(2)),
    "exp": (0.2, 0.2),
    "gamma": (0.8, 0.2 * math.sqrt(8)),
    "poisson": (0.4, 0.2 * math.sqrt(2)),
}


@pytest.mark.parametrize("mode", list(NOISE_STATS))
def test_noise_statistics(mode):
    n = 200_000
    zeros = torch.zeros(2, 1000, 100)
    torch.manual_seed(0)
    added = add_memory_noise(zeros, mode, 0.2)
    assert added.shape == zeros.shape and added.dtype == zeros.dtype
    mean, std = NOISE_STATS[mode]
    assert abs(added.mean().item() - mean) < 5 * std / math.sqrt(n) + 1e-4
    assert abs(added.std().item() - std) < 0.02 * std
    torch.manual_seed(0)
    draw = draw_noise(mode, zeros)
    torch.testing.assert_close(0.2 * draw, added, atol=1e-6, rtol=1e-6)
    # torch's RNG: reproducible under a seed, fresh otherwise
    torch.manual_seed(0)
    assert torch.equal(add_memory_noise(zeros, mode, 0.2), added)
    assert not torch.equal(add_memory_noise(zeros, mode, 0.2), added)
    if mode in ("exp", "gamma", "poisson"):
        assert (added >= 0).all()
    if mode == "poisson":
        assert torch.equal(draw, draw.round())
    if mode == "uniform":
        assert added.abs().max() <= 0.1 + 1e-6


def test_noise_none_and_rate_zero():
    zeros = torch.zeros(200_000)
    assert torch.equal(add_memory_noise(zeros, "none", 0.2), zeros)
    assert torch.equal(draw_noise("none", zeros), zeros)
    assert torch.equal(add_memory_noise(zeros, "normal", 0.0), zeros)
    assert set(NOISE_MODES) == set(NOISE_STATS) | {"none"}
    with pytest.raises(ValueError, match="unknown noise mode"):
        draw_noise("cauchy", zeros)


def test_noise_dtype_and_frozen_gamma():
    like = torch.zeros(1000, dtype=torch.float64)
    for mode in NOISE_MODES:
        assert draw_noise(mode, like).dtype == torch.float64
    a = draw_noise("gamma", like, frozen_gamma=True)
    b = draw_noise("gamma", like, frozen_gamma=True)
    assert torch.equal(a, b) and a.std() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_noise_only_in_training(name):
    noisy = _build(name, dim=16, memory_tokens=16, dropout=0.0, noise="normal")
    quiet = _build(name, dim=16, memory_tokens=16, dropout=0.0, noise="none", seed=99)
    quiet.load_state_dict(noisy.state_dict())
    x = _volume(batch=2)
    with torch.no_grad():
        noisy.eval(), quiet.eval()
        torch.testing.assert_close(noisy(x), quiet(x), atol=0, rtol=0)
        eval_logits = quiet(x)
        noisy.train(), quiet.train()
        torch.manual_seed(0)
        train_noisy = noisy(x)
        train_quiet = quiet(x)
    assert _differ(train_noisy, train_quiet)
    # without noise and dropout, training and evaluation compute the same function (stem 3d has no BN)
    torch.testing.assert_close(train_quiet, eval_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["uniform", "laplace", "exp", "gamma", "poisson"])
def test_each_noise_mode_runs_in_training(mode):
    model = _build("lmttm", dim=16, memory_tokens=16, noise=mode).train()
    logits = model(_volume(batch=2))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------------------
# config validation and sizes
# ----------------------------------------------------------------------------------------------------------

def test_rejects_memory_not_divisible_by_blocks():
    with pytest.raises(ValueError, match="divisible by blocks"):
        _build("lmttm", dim=16, memory_tokens=30, blocks=4)
    with pytest.raises(ValueError, match="divisible by blocks"):
        LMTTMConfig(memory_tokens=448, blocks=5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rejects_bad_names_and_sizes(name):
    with pytest.raises(ValueError, match="unknown processor"):
        _build(name, processor="lstm")
    with pytest.raises(ValueError, match="unknown stem"):
        _build(name, stem="resnet18")
    with pytest.raises(ValueError, match="unknown noise"):
        _build(name, noise="cauchy")
    with pytest.raises(ValueError, match="smaller than one patch"):
        _build(name, input_size=2)
    with pytest.raises(ValueError, match="divisible by heads"):
        _build(name, dim=20, heads=8)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("size,steps,tokens", [(28, 9, 81), (64, 21, 441), (29, 9, 81), (3, 1, 1)])
def test_remainder_is_dropped(name, size, steps, tokens):
    model = _build(name, input_size=size).eval()
    assert (model.steps, model.input_tokens) == (steps, tokens)
    x = _volume(batch=2, size=size)
    assert model.stem(x).shape == (2, steps, tokens, 16)
    with torch.no_grad():
        assert model(x).shape == (2, 2)


def test_remainder_only_drops_last_slices():
    """At 29³ the last two slices, rows and columns (27, 28) are never seen by the stem."""
    model = _build("lmttm", input_size=29).eval()
    x = _volume(batch=2, size=29)
    with torch.no_grad():
        a = model(x)
        y = x.clone()
        y[:, :, 27:] = 5.0
        y[:, :, :, 27:] = 5.0
        y[:, :, :, :, 27:] = 5.0
        b = model(y)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# nothing tied to a device, dtype or batch size
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_device_dtype_and_batch_size(name):
    model = _build(name).to("cpu").eval()
    with torch.no_grad():
        assert model(_volume(batch=1)).shape == (1, 2)
        assert model(_volume(batch=5)).shape == (5, 2)
        model64 = model.to(torch.float64)
        out = model64(_volume(batch=2).double())
    assert out.dtype == torch.float64 and out.shape == (2, 2)
    compat = _build(name, official_compat=True).to(torch.float64)
    for batch in (3, 1, 5):
        out = compat(_volume(batch=batch).double())
        assert out.dtype == torch.float64 and out.shape == (batch, 2)
    compat.train()
    compat(_volume(batch=2).double()).mean().backward()


def test_multichannel_input():
    model = _build("lmttm", in_channels=3, num_classes=4).eval()
    with torch.no_grad():
        assert model(_volume(batch=2, channels=3)).shape == (2, 4)


def test_no_hard_coded_cuda():
    sources = sorted((ROOT / "model").glob("*.py"))
    assert sources
    offenders = [p.name for p in sources if re.search(r"\.cuda\(", p.read_text())]
    assert not offenders, f".cuda( calls in {offenders}"


def test_registry_builds_the_right_classes():
    assert isinstance(_build("lmttm"), LMTTM)
    assert isinstance(_build("ttm"), TTM)
    assert not isinstance(_build("ttm"), LMTTM)
