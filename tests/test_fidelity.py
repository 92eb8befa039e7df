"""The model's maths against an independent, hand-written reference (tests/reference.py, docs/spec/LMTTM.md §1-§6, §8, §9).

Every test builds a tiny model, makes its weights non-trivial (random biases, LayerNorm / BatchNorm
parameters and positional embeddings, so that every term of the forward pass matters), and compares its
logits (and, for the compat options, its carried memory) with the reference computed from the same
state_dict. Models and reference run in float64, so a tolerance of 1e-9 separates "equal" from any change
of the maths. Training-mode tests use dropout 0 and feed the reference the same noise draws (the same
torch RNG stream). Also here: Xavier / LayerNorm / positional-embedding initialisation statistics, noise
statistics per mode and rate, the frozen gamma draw, and the block schedule of spec §3 written out.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import build_model
from model.memory_noise import add_memory_noise, draw_noise
from reference import reference_cfg, reference_forward, reference_schedule, weights_of

TOL = dict(atol=1e-9, rtol=1e-9)
DIM, MEM = 16, 16


def _model(name="lmttm", *, seed=0, perturb=True, input_size=28, num_classes=3, **kw):
    kw.setdefault("dim", DIM)
    kw.setdefault("memory_tokens", MEM)
    kw.setdefault("heads", 4)
    torch.manual_seed(seed)
    model = build_model(name, in_channels=1, num_classes=num_classes, input_size=input_size, **kw).double()
    if perturb:
        _perturb(model, seed + 1)
    return model


def _perturb(model, seed):
    """Non-trivial values for what initialisation sets to constants (biases 0, norms 1/0, pos 0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if key.startswith("pos_"):
                p.copy_(0.5 * noise)
            elif p.dim() == 1 and key.endswith("weight"):  # LayerNorm / BatchNorm scale
                p.copy_(1 + 0.3 * noise)
            elif key.endswith("bias"):
                p.copy_(0.1 * noise)
        for key, b in model.named_buffers():
            if key.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g, dtype=b.dtype))
            elif key.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g, dtype=b.dtype))


def _volume(batch=2, size=28, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, size, size, size, generator=g, dtype=torch.float64)


def _eval_logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _reference(model, x, **kw):
    return reference_forward(weights_of(model), reference_cfg(model), x, **kw)


# ----------------------------------------------------------------------------------------------------------
# the reference itself: a few hand-checked facts, so that it cannot silently agree with a wrong model
# ----------------------------------------------------------------------------------------------------------

SPEC_SCHEDULE_9 = [(0, 3, 1), (1, 0, 2), (2, 1, 3), (3, 2, 0), (0, 3, 1), (1, 0, 2), (2, 1, 3), (3, 2, 0), (0, 3, 1)]


def test_reference_schedule_is_spec_section_3():
    # spec §3, "0,3,1→1 | 1,0,2→2 | 2,1,3→3 | 3,2,0→0 | 0,3,1→1 | 1,0,2→2 | 2,1,3→3 | 3,2,0→0 | 0,3,1→1"
    assert reference_schedule(9, 4) == SPEC_SCHEDULE_9
    assert reference_schedule(3, 4, start=1) == SPEC_SCHEDULE_9[1:4]


def test_model_block_schedule_is_spec_section_3():
    from model.lmttm import block_schedule
    assert [tuple(s) for s in block_schedule(9, 4)] == SPEC_SCHEDULE_9


def test_reference_summariser_by_hand():
    """Z = Aᵀ F with A = softmax over tokens of W2·GELU(W1·LN(X)) and F = GELU(Wf·X), one token set of 2."""
    from reference import summarise
    D = 2
    W = {"s.norm.weight": torch.tensor([1.0, 1.0]), "s.norm.bias": torch.tensor([0.0, 0.0]),
         "s.hidden.weight": torch.eye(D), "s.to_logits.weight": torch.tensor([[1.0, 0.0]]),
         "s.to_features.weight": torch.eye(D)}
    X = torch.tensor([[[3.0, 1.0], [0.0, 2.0]]])  # LN -> [[1, -1], [-1, 1]] (up to eps)
    z = summarise(W, "s", X)
    gelu = lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    ln1 = 1 / math.sqrt(1 + 1e-5)
    l0, l1 = gelu(ln1), gelu(-ln1)
    a0 = math.exp(l0) / (math.exp(l0) + math.exp(l1))
    expected = [a0 * gelu(3.0) + (1 - a0) * gelu(0.0), a0 * gelu(1.0) + (1 - a0) * gelu(2.0)]
    torch.testing.assert_close(z, torch.tensor([[expected]]), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# whole-model forward (eval mode) = reference
# ----------------------------------------------------------------------------------------------------------

CASES = [
    # (name, options)
    ("lmttm", {}),
    ("ttm", {}),
    ("lmttm", {"processor": "mlp"}),
    ("ttm", {"processor": "mlp"}),
    ("lmttm", {"processor": "mixer"}),
    ("ttm", {"processor": "mixer"}),
    ("lmttm", {"stem": "3dBN"}),
    ("ttm", {"stem": "3dBN"}),
    ("lmttm", {"pos_embedding": "none"}),
    ("ttm", {"pos_embedding": "none"}),
    ("lmttm", {"processor_repeats": 1}),
    ("ttm", {"processor_repeats": 1}),
    ("lmttm", {"processor_repeats": 2, "processor": "mlp"}),
    ("lmttm", {"processor_repeats": 2, "processor": "mixer"}),
    ("lmttm", {"depth_patch_size": 1}),
    ("ttm", {"depth_patch_size": 1}),
    ("lmttm", {"dim": 24, "memory_tokens": 24, "blocks": 3, "read_tokens": 5, "heads": 8}),
    ("lmttm", {"dim": 32, "memory_tokens": 32, "blocks": 2, "read_tokens": 4, "heads": 8}),
    ("ttm", {"dim": 24, "memory_tokens": 20, "read_tokens": 3, "heads": 8}),
    ("lmttm", {"blocks": 1}),
    ("lmttm", {"compat_batch_attention": True}),
    ("ttm", {"compat_batch_attention": True}),
]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                                                      for n, o in CASES])
def test_forward_equals_reference(name, options):
    model = _model(name, **options)
    x = _volume(batch=3)
    torch.testing.assert_close(_eval_logits(model, x), _reference(model, x), **TOL)


def test_forward_equals_reference_at_other_input_sizes():
    """A 14³ input (4 steps of 16 tokens, the remainder dropped) and a single sample."""
    model = _model("lmttm", input_size=14)
    x = _volume(batch=1, size=14)
    torch.testing.assert_close(_eval_logits(model, x), _reference(model, x), **TOL)


def test_forward_equals_reference_float32():
    """The model as trained (float32, its own initialisation) within 1e-5 of the float64 reference."""
    torch.manual_seed(3)
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=28, dim=32, memory_tokens=32).eval()
    x = _volume(batch=2).float()
    with torch.no_grad():
        got = model(x).double()
    W = {k: v.double() for k, v in weights_of(model).items()}
    torch.testing.assert_close(got, reference_forward(W, reference_cfg(model), x.double()), atol=1e-5, rtol=1e-5)


def test_every_term_matters():
    """The perturbed test models are sensitive: changing any one parameter changes the logits (so a mutation
    that drops a term cannot hide behind a zero or unit weight)."""
    model = _model("lmttm")
    x = _volume(batch=2)
    base = _eval_logits(model, x)
    g = torch.Generator().manual_seed(0)
    insensitive = []
    for key, p in model.named_parameters():
        with torch.no_grad():
            saved = p.clone()
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))  # random: LN removes constants
            if torch.allclose(_eval_logits(model, x), base, atol=1e-7, rtol=0):
                insensitive.append(key)
            p.copy_(saved)
    assert not insensitive


# ----------------------------------------------------------------------------------------------------------
# training mode: memory noise placement (dropout 0, the reference gets the same draws)
# ----------------------------------------------------------------------------------------------------------

def _normal_noise(rate):
    def hook(step, written):
        return written + rate * torch.randn(written.shape, dtype=written.dtype)
    return hook


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
@pytest.mark.parametrize("rate", [0.2, 0.7])
def test_training_noise_after_each_write(name, rate):
    """Default: rate × N(0, 1) added to the freshly written memory after each write, in training only."""
    model = _model(name, dropout=0.0, noise="normal", noise_rate=rate).train()
    x = _volume(batch=2)
    torch.manual_seed(11)
    got = model(x).detach()
    torch.manual_seed(11)
    expected = _reference(model, x, noise=_normal_noise(rate))
    torch.testing.assert_close(got, expected, **TOL)
    # the noise matters (so the check above is not vacuous) ...
    assert not torch.allclose(expected, _reference(model, x), atol=1e-6)
    # ... and is off in evaluation
    torch.testing.assert_close(_eval_logits(model, x), _reference(model, x), **TOL)
    assert model._carried_memory is None


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_training_without_noise_equals_eval(name):
    model = _model(name, dropout=0.0, noise="none").train()
    x = _volume(batch=2)
    torch.testing.assert_close(model(x).detach(), _reference(model, x), **TOL)


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_training_uniform_noise_after_each_write(name):
    model = _model(name, dropout=0.0, noise="uniform", noise_rate=0.5).train()
    x = _volume(batch=2)
    torch.manual_seed(5)
    got = model(x).detach()
    torch.manual_seed(5)
    expected = _reference(model, x, noise=lambda t, w: w + 0.5 * (torch.rand(w.shape, dtype=w.dtype) - 0.5))
    torch.testing.assert_close(got, expected, **TOL)


# ----------------------------------------------------------------------------------------------------------
# compat options: carried memory (noise at the end of forward), global pointer, batch attention
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lmttm", "ttm"])
@pytest.mark.parametrize("training", [False, True])
def test_carry_memory_noise_at_end_of_forward(name, training):
    """compat_carry_memory: no noise after the writes; noise added once, to the final memory, which the next
    call starts from (in evaluation too)."""
    model = _model(name, dropout=0.0, compat_carry_memory=True, noise="normal", noise_rate=0.3)
    model.train(training)
    x, y = _volume(batch=2), _volume(batch=2, seed=7)
    W, cfg = weights_of(model), reference_cfg(model)
    memory = None
    for call, inp in enumerate([x, y, x]):
        torch.manual_seed(100 + call)
        with torch.no_grad():
            got = model(inp)
        logits, final = reference_forward(W, cfg, inp, memory=memory, return_memory=True)
        torch.manual_seed(100 + call)
        carried = final + 0.3 * torch.randn(final.shape, dtype=final.dtype)
        torch.testing.assert_close(got, logits, **TOL)
        torch.testing.assert_close(model._carried_memory, carried, **TOL)
        memory = carried
    model.reset_state()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(W, cfg, x), **TOL)


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_carry_memory_frozen_gamma(name):
    """The gamma draw under compat_carry_memory is numpy RandomState(3407).gamma(2, 2), every call."""
    model = _model(name, compat_carry_memory=True, noise="gamma").eval()
    x = _volume(batch=2)
    W, cfg = weights_of(model), reference_cfg(model)
    frozen = torch.from_numpy(np.random.RandomState(3407).gamma(2.0, 2.0, size=(2, MEM, DIM)))
    memory = None
    for _ in range(2):
        with torch.no_grad():
            got = model(x)
        logits, final = reference_forward(W, cfg, x, memory=memory, return_memory=True)
        torch.testing.assert_close(got, logits, **TOL)
        torch.testing.assert_close(model._carried_memory, final + 0.2 * frozen, **TOL)
        memory = final + 0.2 * frozen


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_carried_memory_of_another_batch_size_is_cut_or_padded(name):
    model = _model(name, compat_carry_memory=True, noise="none").eval()
    W, cfg = weights_of(model), reference_cfg(model)
    with torch.no_grad():
        model(_volume(batch=3))
    carried = model._carried_memory.clone()
    assert carried.shape == (3, MEM, DIM)
    x2, x5 = _volume(batch=2, seed=3), _volume(batch=5, seed=4)
    with torch.no_grad():
        got2 = model(x2)
    torch.testing.assert_close(got2, reference_forward(W, cfg, x2, memory=carried[:2]), **TOL)
    model._carried_memory = carried  # back to the batch-3 memory
    padded = torch.cat([carried, torch.zeros(2, MEM, DIM, dtype=carried.dtype)])
    with torch.no_grad():
        got5 = model(x5)
    torch.testing.assert_close(got5, reference_forward(W, cfg, x5, memory=padded), **TOL)


def test_official_compat_sequence_of_calls():
    """Batch attention + carried memory + global pointer (LMTTM, evaluation): three calls in a row."""
    model = _model("lmttm", compat_batch_attention=True, compat_carry_memory=True, compat_global_pointer=True,
                   noise="normal").eval()
    W, cfg = weights_of(model), reference_cfg(model)
    memory, start = None, 0
    for call in range(3):
        x = _volume(batch=3, seed=20 + call)
        torch.manual_seed(call)
        with torch.no_grad():
            got = model(x)
        logits, final = reference_forward(W, cfg, x, memory=memory, start=start, return_memory=True)
        previous = memory
        torch.manual_seed(call)
        memory = final + 0.2 * torch.randn(final.shape, dtype=final.dtype)
        torch.testing.assert_close(got, logits, **TOL)
        if call:  # the pointer matters: starting at block 0 again would give other logits
            assert not torch.allclose(got, reference_forward(W, cfg, x, memory=previous), atol=1e-6)
        start = (start + 9) % 4
        assert model._pointer == start


def test_global_pointer_alone_is_invisible_from_zero_memory():
    """With compat_global_pointer the second call starts at block 9 mod 4 = 1; from a zero memory the four
    blocks are interchangeable, so alone the option changes nothing (it matters with a carried memory, see
    test_official_compat_sequence_of_calls)."""
    model = _model("lmttm", compat_global_pointer=True).eval()
    x = _volume(batch=2)
    first, second = _eval_logits(model, x), _eval_logits(model, x)
    torch.testing.assert_close(first, _reference(model, x, start=0), **TOL)
    torch.testing.assert_close(second, _reference(model, x, start=1), **TOL)
    assert model._pointer == 2
    memory = torch.randn(2, MEM, DIM, dtype=torch.float64)
    assert not torch.allclose(_reference(model, x, memory=memory, start=0),
                              _reference(model, x, memory=memory, start=1), atol=1e-6)


def test_batch_attention_mixes_samples():
    model = _model("lmttm", compat_batch_attention=True).eval()
    x = _volume(batch=3)
    y = x.clone()
    y[2] = _volume(batch=1, seed=9)[0]
    a, b = _eval_logits(model, x), _eval_logits(model, y)
    torch.testing.assert_close(b, _reference(model, y), **TOL)
    assert not torch.allclose(a[0], b[0], atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# initialisation statistics (spec §7): Xavier-uniform weights, zero biases, LayerNorm 1/0, pos std 0.02
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_models():
    out = {}
    for name in ("lmttm", "ttm"):
        torch.manual_seed(0)
        out[name] = build_model(name, in_channels=1, num_classes=2, input_size=28)  # D = M = 448
    return out


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_xavier_uniform_weights(name, default_models):
    state = default_models[name].state_dict()
    matrices = {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() >= 2
                and not k.startswith("pos_")}
    assert len(matrices) >= 11  # stem conv, 3 + 3 summariser matrices, in_proj, out_proj, 2 feed-forward, head
    for key, w in matrices.items():
        receptive = math.prod(w.shape[2:])
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        n = w.numel()
        top = w.abs().max().item()
        assert top <= bound * (1 + 1e-6), f"{key}: max |w| {top} > Xavier bound {bound}"
        assert top >= bound * (1 - 12.0 / n), f"{key}: max |w| {top} well below the Xavier bound {bound}"
        var = (w.double() ** 2).mean().item()
        assert abs(var / (bound ** 2 / 3) - 1) < 6 * 0.9 / math.sqrt(n), f"{key}: variance {var} vs {bound ** 2 / 3}"
        assert abs(w.double().mean().item()) < 6 * bound / math.sqrt(3 * n), key


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_zero_biases_unit_norms_and_pos_std(name, default_models):
    model = default_models[name]
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    biases = [k for k in state if k.endswith("bias")]
    assert len(biases) >= 9
    for key in biases:
        assert torch.count_nonzero(state[key]) == 0, f"{key} is not zero"
    norm_weights = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 1]
    assert {"reader.norm.weight", "writer.norm.weight", "processor.layer.norm1.weight",
            "processor.layer.norm2.weight"} <= set(norm_weights)
    for key in norm_weights:
        assert torch.equal(state[key], torch.ones_like(state[key])), f"{key} is not 1"
    for key in ("pos_read", "pos_write"):
        pos = state[key].double()
        n = pos.numel()
        assert n > 80_000
        assert abs(pos.std().item() - 0.02) < 0.02 * 6 / math.sqrt(2 * n), f"{key} std {pos.std().item()}"
        assert abs(pos.mean().item()) < 6 * 0.02 / math.sqrt(n)
        # a normal draw, not a uniform one: the kurtosis of a normal is 3 (uniform 1.8)
        kurt = ((pos - pos.mean()) ** 4).mean().item() / pos.var().item() ** 2
        assert abs(kurt - 3) < 0.1


def test_stem_3dbn_init():
    torch.manual_seed(0)
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=28, dim=64, memory_tokens=64, stem="3dBN")
    state = model.state_dict()
    for key in ("stem.net.1", "stem.net.4"):
        assert torch.equal(state[key + ".weight"], torch.ones_like(state[key + ".weight"]))
        assert torch.count_nonzero(state[key + ".bias"]) == 0
    for key in ("stem.net.0", "stem.net.3"):
        w = state[key + ".weight"]
        receptive = math.prod(w.shape[2:])
        bound = math.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * receptive))
        assert bound * 0.97 <= w.abs().max().item() <= bound * (1 + 1e-6)
        assert torch.count_nonzero(state[key + ".bias"]) == 0


# ----------------------------------------------------------------------------------------------------------
# memory noise (spec §8): statistics per mode and rate, frozen gamma
# ----------------------------------------------------------------------------------------------------------

# mean and std of one draw (before the rate)
DRAW_STATS = {"normal": (0.0, 1.0), "uniform": (0.0, 1 / math.sqrt(12)), "laplace": (10.0, 10 * math.sqrt(2)),
              "exp": (1.0, 1.0), "gamma": (4.0, math.sqrt(8)), "poisson": (2.0, math.sqrt(2))}


@pytest.mark.parametrize("mode", list(DRAW_STATS))
@pytest.mark.parametrize("rate", [0.2, 0.5, 1.0])
def test_noise_statistics_per_mode_and_rate(mode, rate):
    n = 400_000
    memory = torch.full((4, 1000, 100), 3.0, dtype=torch.float64)
    torch.manual_seed(1)
    added = add_memory_noise(memory, mode, rate) - 3.0
    mean, std = DRAW_STATS[mode]
    assert abs(added.mean().item() - rate * mean) < 6 * rate * std / math.sqrt(n)
    assert abs(added.std().item() / (rate * std) - 1) < 0.01
    assert torch.count_nonzero(added).item() > 0.99 * n or mode == "poisson"  # every element gets noise
    if mode == "poisson":
        assert abs((added == 0).double().mean().item() - math.exp(-2)) < 0.005  # P(Poisson(2) = 0)
    # fresh draws from torch's RNG (not the frozen gamma): reproducible under a seed, new otherwise
    small = memory[:1, :10]
    torch.manual_seed(2)
    a, b = add_memory_noise(small, mode, rate), add_memory_noise(small, mode, rate)
    torch.manual_seed(2)
    assert torch.equal(add_memory_noise(small, mode, rate), a) and not torch.equal(a, b)


def test_frozen_gamma_is_numpy_3407():
    like = torch.zeros(3, 5, 7, dtype=torch.float64)
    expected = np.random.RandomState(3407).gamma(2.0, 2.0, size=(3, 5, 7))
    np.testing.assert_array_equal(draw_noise("gamma", like, frozen_gamma=True).numpy(), expected)
    # not frozen: a fresh draw from torch's RNG, different each call
    assert not torch.equal(draw_noise("gamma", like), draw_noise("gamma", like))


@pytest.mark.parametrize("mode", list(DRAW_STATS))
def test_noise_only_in_training_for_every_mode(mode):
    model = _model("lmttm", dropout=0.0, noise=mode).eval()
    x = _volume(batch=2)
    torch.testing.assert_close(_eval_logits(model, x), _reference(model, x), **TOL)
    model.train()
    with torch.no_grad():
        trained = model(x)
    assert not torch.allclose(trained, _reference(model, x), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# dropout (training only; eval-mode comparisons cannot see it)
# ----------------------------------------------------------------------------------------------------------

DROPOUTS = {"transformer": 3, "mlp": 2, "mixer": 3}  # dropout layers of the processor (spec §5)


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
@pytest.mark.parametrize("processor", list(DROPOUTS))
def test_every_dropout_has_the_configured_rate(name, processor):
    model = _model(name, processor=processor, dropout=0.3)
    found = {}
    for key, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            assert module.p == 0.3, f"{key}: p = {module.p}"
            found[key.split(".")[0]] = found.get(key.split(".")[0], 0) + 1
    assert found == {"reader": 1, "writer": 1, "processor": DROPOUTS[processor]}


def test_summariser_dropout_acts_on_its_output():
    """Training: each output element of a read is either 0 or the evaluation value / (1 - p)."""
    model = _model("lmttm", dropout=0.5)
    x = torch.randn(2, 30, DIM, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        clean = model.reader(x)
        model.train()
        torch.manual_seed(0)
        dropped = model.reader(x)
    zero = dropped == 0
    assert 0.3 < zero.double().mean().item() < 0.7
    torch.testing.assert_close(dropped[~zero], 2 * clean[~zero], **TOL)


def test_global_pointer_advances_by_the_number_of_steps():
    """28 steps (depth patch 1) over 4 blocks: the next call starts at 28 mod 4 = 0 (not at n = 81 mod 4)."""
    model = _model("lmttm", compat_global_pointer=True, compat_carry_memory=True, noise="none",
                   depth_patch_size=1).eval()
    x = _volume(batch=1)
    logits, final = _reference(model, x, return_memory=True)
    torch.testing.assert_close(_eval_logits(model, x), logits, **TOL)
    assert model._pointer == 0
    torch.testing.assert_close(_eval_logits(model, x), _reference(model, x, memory=final, start=0), **TOL)
