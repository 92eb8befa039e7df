"""The device-dependent path, on the `--device` device (cpu by default; `python -m pytest --device cuda` on a GPU):
training and evaluation end to end, exact resume under train.deterministic, AMP, torch.compile, the compat state,
the chunked selective scan against the sequential one, and the RNG state round trip.

Each test compares with something computed independently of the device path: the same model on the CPU in
float64, an uninterrupted run, the per-step reference scan, roc_auc_score on the saved predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from test_selective_scan import make_inputs, reference_scan

import predict
import train
from data import Split
from engine.checkpoint import load_checkpoint
from engine.evaluate import predict_scores
from engine.setup import apply_tf32, compile_model, restore_rng_state, rng_state
from model import build_model
from model.selective_scan import selective_scan

pytestmark = pytest.mark.device

TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32", "--train.lr", "0.001", "--output.plots", "false"]


def tiny(tmp_path, device, *extra, name="run", epochs=2):
    return ["demo.json", *TINY, "--train.device", str(device), "--train.epochs", str(epochs),
            "--output.dir", str(tmp_path), "--output.name", name, *extra]


def tiny_model(name="lmttm", seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(name, in_channels=1, num_classes=2, input_size=kw.pop("input_size", 28), dim=16,
                       memory_tokens=16, heads=2, **kw)


def volumes(batch=3, size=28, seed=1):
    return torch.rand(batch, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off (cuDNN's default is on), as the engine's default train.tf32 false."""
    apply_tf32(False)
    yield
    apply_tf32(False)


def test_train_then_predict_end_to_end(tmp_path, device):
    assert train.main(tiny(tmp_path, device, epochs=1)) == 0
    assert predict.main(tiny(tmp_path, device, epochs=1)) == 0
    run = tmp_path / "run"
    result = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    saved = np.load(run / "eval" / "test" / "predictions.npz")
    y, score = saved["y_true"].ravel(), saved["y_score"]
    assert score.shape == (60, 3) and result["n_samples"] == 60
    assert result["auc"] == pytest.approx(np.mean([roc_auc_score(y == k, score[:, k]) for k in range(3)]))
    ckpt = load_checkpoint(run / "best.pt")  # loads on the CPU whatever it was trained on
    assert all(v.device.type == "cpu" for v in ckpt["model"].values() if torch.is_tensor(v))
    assert ("cuda" in ckpt["rng"]) == torch.cuda.is_available()


def test_resume_is_exact_under_train_deterministic(tmp_path, device, monkeypatch):
    """Killed in epoch 2 and resumed: the same weights, bit for bit, as an uninterrupted run on this device."""
    assert train.main(tiny(tmp_path, device, name="straight")) == 0
    real, calls = train.train_one_epoch, []

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupt_second_epoch)
    assert train.main(tiny(tmp_path, device, name="resumed")) == 130
    monkeypatch.setattr(train, "train_one_epoch", real)
    assert train.main(tiny(tmp_path, device, name="resumed")) == 0
    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, b["model"][key]), key
    assert (tmp_path / "straight" / "metrics.csv").read_text().count("\n") == 3


def test_amp_is_bfloat16_on_cuda_and_off_elsewhere(tmp_path, device):
    """predict_scores(amp=True) runs bfloat16 autocast on CUDA (scores close to float32, not equal) and
    changes nothing on the CPU; a training epoch under AMP runs and keeps its float32 weights."""
    model = tiny_model(dropout=0.0, noise="none").to(device)
    images = (volumes(batch=8) * 255).to(torch.uint8)
    split = Split(images.to(device), torch.tensor([0, 1] * 4).to(device))
    fp32 = predict_scores(model, split, batch_size=8, device=device)
    amp = predict_scores(model, split, batch_size=8, device=device, amp=True)
    if device.type == "cuda":
        assert not np.array_equal(amp, fp32) and np.abs(amp - fp32).max() < 0.05
    else:
        np.testing.assert_array_equal(amp, fp32)
    assert train.main(tiny(tmp_path, device, "--train.amp", "true", epochs=1)) == 0
    weights = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    assert all(v.dtype == torch.float32 for v in weights.values() if torch.is_tensor(v) and v.is_floating_point())


def test_compiled_model_equals_eager(device):
    """train.compile's callable: the same logits and gradients as the eager model (dropout and noise off).
    On CUDA with inductor; on the CPU with dynamo's eager backend (the capture, not inductor's code, which the
    CPU suite cannot afford)."""
    model = tiny_model(input_size=14, dropout=0.0, noise="none").to(device)
    x = volumes(batch=4, size=14).to(device)
    if device.type == "cuda":
        compiled = compile_model(model, "default")
    else:
        compiled = torch.compile(model, backend="eager")
    for mode in ("train", "eval"):
        getattr(model, mode)()
        eager_out = model(x)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
        torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
        for g, e in zip(grads, eager_grads):
            torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


def test_compat_state_on_device_equals_the_cpu_in_float64(device):
    """The original's batch attention, carried memory and global pointer: two batches in a row give the
    logits and the carried state of the same model on the CPU in float64."""
    options = dict(compat_batch_attention=True, compat_carry_memory=True, compat_global_pointer=True,
                   compat_random_pos=False, noise="none", dropout=0.0)
    reference = tiny_model(**options).double().eval()
    model = tiny_model(**options).to(device).eval()
    with torch.no_grad():
        for seed in (1, 2):
            x = volumes(batch=4, seed=seed)
            expected = reference(x.double())
            torch.testing.assert_close(model(x.to(device)).cpu().double(), expected, rtol=1e-4, atol=1e-5)
    carried, expected_state = model.get_extra_state(), reference.get_extra_state()
    assert carried is not None and set(carried) == set(expected_state)
    for key, value in expected_state.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(carried[key].cpu().double(), value.double(), rtol=1e-4, atol=1e-5)
        else:
            assert carried[key] == value, key


@pytest.mark.parametrize("name", ["lmttm", "ttm"])
def test_model_on_device_equals_the_cpu_in_float64(name, device):
    model, reference = tiny_model(name).to(device).eval(), tiny_model(name).double().eval()
    x = volumes(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(device)).cpu().double(), reference(x.double()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,chunk", [("sequential", 32), ("chunked", 8), ("chunked", 64)])
def test_scan_forms_equal_the_reference_in_float64(method, chunk, device):
    """Values and gradients of each scan form in float32 on the device against the per-step reference on the
    CPU in float64."""
    inputs = make_inputs(nb=2, K=4, d=8, L=50, N=16, seed=13)
    leaves = {k: v.float().to(device).requires_grad_(True) for k, v in inputs.items() if v is not None}
    y = selective_scan(**leaves, delta_softplus=True, method=method, chunk=chunk)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    y_ref, _ = reference_scan(**ref_leaves, delta_softplus=True)
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y * w.float().to(device)).sum().backward()
    (y_ref * w).sum().backward()
    assert (y.detach().cpu().double() - y_ref).abs().max() <= 1e-4 * y_ref.abs().max()
    for key, leaf in leaves.items():
        ref = ref_leaves[key].grad
        assert (leaf.grad.cpu().double() - ref).abs().max() <= 1e-3 * ref.abs().max(), key


def test_medmamba_scan_forms_give_the_same_model_output(device):
    torch.manual_seed(2)
    kwargs = dict(in_channels=1, num_classes=3, input_size=8, depths=[1, 1], widths=[8, 16], patch_size=2)
    a = build_model("medmamba3d", **kwargs, scan="sequential").to(device).eval()
    b = build_model("medmamba3d", **kwargs, scan="chunked").to(device).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 8, 8, 8).to(device)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)


def test_rng_state_round_trip(device):
    """The checkpointed RNG state brings back the same dropout and noise draws on the device."""
    state = rng_state()
    first = torch.rand(5, device=device), torch.rand(5)
    torch.rand(7, device=device)  # move on
    assert restore_rng_state(state) is None
    again = torch.rand(5, device=device), torch.rand(5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
