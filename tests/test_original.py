"""Side by side with the original code (github.com/hongkai-wei/LMTTM-VMI), from a checkout named by the
environment variable LMTTM_ORIGINAL (skipped without one):

    LMTTM_ORIGINAL=/path/to/LMTTM-VMI python -m pytest -q tests/test_original.py

The same weights go into both implementations (tools/compare_original.py); under `official_compat` the
logits, the carried memory and the block pointer must equal the original's over consecutive batches, and
with our defaults the logits must equal the original's with the documented departures switched on in it.
Controls show that the comparison notices a difference. Tiny sizes: D = M = 16, batch 2, 15³ input (5
steps, so LMTTM's pointer does not wrap back to block 0 after one volume).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.compare_original import build_pair, make_batches, original_name, original_state_from_ours, run_compat, \
    run_default
from tools.original import ENV_VAR, OriginalError, find_checkout, load_original

REPO = Path(__file__).resolve().parents[1]
CHECKOUT = os.environ.get(ENV_VAR)
needs_original = pytest.mark.skipif(not CHECKOUT, reason=f"set {ENV_VAR} to an LMTTM-VMI checkout")
SIZE = dict(dim=16, memory_tokens=16, batch_size=2, batches=3, size=15)
ATOL = 1e-5


def test_script_without_checkout_says_so_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    proc = subprocess.run([sys.executable, "tools/compare_original.py"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and ENV_VAR in proc.stderr and "Traceback" not in proc.stderr


def test_not_a_checkout_is_rejected(tmp_path):
    with pytest.raises(OriginalError, match="not an LMTTM-VMI checkout"):
        find_checkout(tmp_path)


@needs_original
def test_loading_leaves_this_projects_modules_alone():
    import model as ours_before
    net = load_original(CHECKOUT, model="lmttm", dim=16, memory_tokens=16, batch_size=2)
    assert "torchvision" not in sys.modules  # the stub is gone again
    import model
    assert model is ours_before and Path(model.__file__).parent == REPO / "model"
    assert sys.modules.get("config") is None or "LMTTM-VMI" not in str(getattr(sys.modules["config"], "__file__", ""))
    assert torch.Tensor.cuda is not None and net.pointer == 0
    # the original's init: Xavier-uniform bound sqrt(6 / (fan_in + fan_out)), zero biases
    w = net.encoder.cls.weight
    assert w.abs().max() <= (6 / (16 + 2)) ** 0.5 and w.std() > 0.2 and not net.encoder.cls.bias.any()


@needs_original
@pytest.mark.parametrize("kind", ["lmttm", "ttm"])
def test_every_weight_of_ours_has_one_counterpart(kind):
    ours, original = build_pair(CHECKOUT, kind, dim=16, memory_tokens=16, batch_size=2, size=15)
    state = original_state_from_ours(ours, original.encoder)
    names = [n for n, _ in ours.named_parameters() if n not in ("pos_read", "pos_write")]
    assert len(state) == len(set(state)) and {original_name(n) for n in names} <= set(state)
    assert original_name("reader.hidden.weight") == "tokenTuringMachineUnit.tokenLearner1.attention_maps.0.weight"
    assert state["tokenTuringMachineUnit.tokenLearner1.feat_conv.weight"].shape == (16, 16, 1)


@needs_original
@pytest.mark.parametrize("kind", ["lmttm", "ttm"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("processor", ["transformer", "mlp"])
def test_official_compat_equals_the_original(kind, train, processor):
    result = run_compat(CHECKOUT, kind, train=train, processor=processor, atol=ATOL, **SIZE)
    assert result.ok, result.row()
    assert result.memory is not None and (kind == "ttm" or result.pointer_ok)


@needs_original
@pytest.mark.parametrize("noise", ["uniform", "laplace", "exp", "gamma", "poisson", "none"])
def test_official_compat_noise_modes_equal_the_original(noise):
    result = run_compat(CHECKOUT, "lmttm", train=False, noise=noise, atol=ATOL, **SIZE)
    assert result.ok, result.row()


@needs_original
@pytest.mark.parametrize("kind", ["lmttm", "ttm"])
@pytest.mark.parametrize("train", [False, True])
def test_default_equals_the_original_with_the_documented_departures(kind, train):
    result = run_default(CHECKOUT, kind, train=train, atol=ATOL, **SIZE)
    assert result.ok, result.row()


@needs_original
def test_the_comparison_notices_a_difference():
    # ours without official_compat against the original as it ran: logits and pointer differ
    result = run_compat(CHECKOUT, "lmttm", train=False, compat=False, atol=ATOL, **SIZE)
    assert result.logits > 1e-3 and result.pointer_ok is False
    # misaligned random draws (the fresh positional embeddings) change the logits
    ours, original = build_pair(CHECKOUT, "lmttm", dim=16, memory_tokens=16, batch_size=2, size=15)
    ours.eval(), original.eval()
    (x,) = make_batches(1, 2, 15)
    with torch.no_grad():
        torch.manual_seed(1)
        a = ours(x)
        torch.manual_seed(2)
        b = original.step(x)
    assert (a - b).abs().max() > 1e-4


@needs_original
@pytest.mark.parametrize("kind", ["lmttm", "ttm"])
def test_official_compat_gradients_equal_the_original(kind):
    ours, original = build_pair(CHECKOUT, kind, dim=16, memory_tokens=16, batch_size=2, size=15)
    ours.train(), original.train()
    x1, x2 = make_batches(2, 2, 15)
    target = torch.tensor([0, 1])
    for x in (x1, x2):  # the second batch reads the carried memory
        ours.zero_grad(), original.zero_grad()
        torch.manual_seed(7)
        torch.nn.functional.cross_entropy(ours(x), target).backward()
        torch.manual_seed(7)
        torch.nn.functional.cross_entropy(original.step(x), target).backward()
    theirs = dict(original.encoder.named_parameters())
    for name, p in ours.named_parameters():
        q = theirs[original_name(name)]
        assert q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad.reshape(p.shape), atol=1e-5, rtol=1e-4, msg=name)
