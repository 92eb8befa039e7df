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

import math
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


# ----------------------------------------------------------------------------------------------------------
# MedMamba, MedMambaSE (tools/original_medmamba.py) and MAM (tools/original_mam.py): tiny sizes here, the
# originals' own sizes in the scripts.
# ----------------------------------------------------------------------------------------------------------

from tools import original_mam, original_medmamba  # noqa: E402
from tools.original import load_definitions  # noqa: E402

MEDMAMBA, MAMBA = os.environ.get("MEDMAMBA_ORIGINAL"), os.environ.get("MAMBA_ORIGINAL")
MEDMAMBASE, MAM = os.environ.get("MEDMAMBASE_ORIGINAL"), os.environ.get("MAM_ORIGINAL")
needs_medmamba = pytest.mark.skipif(not (MEDMAMBA and MAMBA),
                                    reason="set MEDMAMBA_ORIGINAL and MAMBA_ORIGINAL to MedMamba and mamba checkouts")
needs_medmambase = pytest.mark.skipif(not MEDMAMBASE, reason="set MEDMAMBASE_ORIGINAL to a MedMambaSE checkout")
needs_mam = pytest.mark.skipif(not MAM, reason="set MAM_ORIGINAL to a Recurrent-Attention checkout")
TINY_MAMBA = dict(depths=[1, 1, 2, 1], widths=[16, 32, 64, 128])


def test_load_definitions_runs_imports_functions_and_classes_only(tmp_path):
    source = (
        "import math\n"
        "try:\n    from no_such_package import fast_kernel\nexcept:\n    pass\n"
        "from another_missing_package import thing\n"
        "def double(x):\n    return 2 * kernel(x)\n"
        "class Net:\n    size = math.pi\n"
        "TABLE = {'a': 1}\n"
        "Net.size = 0\n"
        "net = Net().cuda()\n"
        "print('demo')\n"
    )
    defs = load_definitions(source, "demo.py", namespace={"kernel": lambda x: x + 1})
    assert defs.double(3) == 8 and defs.Net.size == math.pi  # the attribute assignment did not run
    assert not hasattr(defs, "net") and not hasattr(defs, "TABLE") and not hasattr(defs, "fast_kernel")
    assert defs.failed_imports == [6] and defs.skipped == [(2, 5), (11, 11), (12, 12), (13, 13), (14, 14)]
    assert load_definitions(source, "demo.py", keep={"TABLE"}).TABLE == {"a": 1}
    with pytest.raises(OriginalError, match="does not define Missing"):
        load_definitions(source, "demo.py", keep={"Missing"})


def test_medmamba_names_follow_the_originals_modules():
    depths = [2, 2, 4, 2]
    name = original_medmamba.original_name
    assert name("patch_embed.weight", depths) == "patch_embed.proj.weight"
    assert name("patch_norm.bias", depths) == "patch_embed.norm.bias"
    assert name("stages.0.2.reduction.weight", depths) == "layers.0.downsample.reduction.weight"  # after 2 blocks
    assert name("stages.2.3.ssm.A_log", depths) == "layers.2.blocks.3.self_attention.A_logs"
    assert name("stages.1.0.ssm.dt_proj_bias", depths) == "layers.1.blocks.0.self_attention.dt_projs_bias"
    assert name("stages.1.0.ssm.conv.weight", depths) == "layers.1.blocks.0.self_attention.conv2d.weight"
    assert name("stages.1.1.conv.5.running_var", depths) == "layers.1.blocks.1.conv33conv33conv11.5.running_var"
    assert name("stages.3.0.se.2.weight", depths) == "layers.3.blocks.0.se.fc.2.weight"
    assert name("stages.3.1.mix.bias", depths) == "layers.3.blocks.1.finalconv11.bias"
    with pytest.raises(KeyError):
        name("stages.0.0.unknown.weight", depths)


@pytest.mark.parametrize("script", ["tools/original_medmamba.py", "tools/original_mam.py"])
def test_other_scripts_without_checkouts_say_so_in_one_line(script):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_ORIGINAL")}
    proc = subprocess.run([sys.executable, script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "_ORIGINAL" in proc.stderr and "Traceback" not in proc.stderr


def test_not_a_medmamba_or_mam_checkout_is_rejected(tmp_path):
    for kind in ("medmamba", "mamba", "medmambase"):
        with pytest.raises(OriginalError, match=f"not a {kind} checkout"):
            original_medmamba.find_checkout(kind, tmp_path)
    with pytest.raises(OriginalError, match="not a Recurrent-Attention"):
        original_mam.find_checkout(tmp_path)


@pytest.fixture(scope="module")
def mamba_files():
    files = {}
    if MEDMAMBA and MAMBA:
        files["medmamba"] = original_medmamba.load_medmamba(MEDMAMBA, MAMBA)
    if MEDMAMBASE:
        files["medmambase"] = original_medmamba.load_medmambase(MEDMAMBASE)
    return files


@needs_medmamba
def test_medmamba_loads_without_its_demo_code_or_timm(mamba_files):
    defs = mamba_files["medmamba"]
    assert "timm" not in sys.modules and not hasattr(defs, "medmamba_t") and not hasattr(defs, "data")
    assert defs.selective_scan_fn.__name__ == "selective_scan_ref"  # mamba's reference scan, not the CUDA one
    assert defs.DropPath.__module__ == "tools.original"


@pytest.mark.parametrize("variant", [
    pytest.param("medmamba_t", marks=needs_medmamba), pytest.param("medmambase", marks=needs_medmambase)])
def test_medmamba_equals_the_original_in_eval_and_in_a_training_step(mamba_files, variant):
    r = original_medmamba.run_case(mamba_files, variant, input_size=64, atol=1e-5, **TINY_MAMBA)
    assert r.logits <= 1e-5 and r.first_stage == "-", r.row()
    assert r.grads <= 1e-5 * max(1.0, r.grad_scale), r.row()


@pytest.mark.parametrize("variant", [
    pytest.param("medmamba_t", marks=needs_medmamba), pytest.param("medmambase", marks=needs_medmambase)])
def test_the_medmamba_comparison_notices_a_difference(mamba_files, variant):
    ours, original = original_medmamba.build_pair(mamba_files, variant, input_size=64, **TINY_MAMBA)
    x = torch.randn(1, 3, 64, 64)
    assert original_medmamba.compare_eval(ours, original, x, 1e-5)[0] <= 1e-5
    with torch.no_grad():
        bn = next(m for m in ours.stages[1][0].conv if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_mean[0] += 0.5  # one statistic of one BatchNorm of the second stage
    logits, first = original_medmamba.compare_eval(ours, original, x, 1e-5)
    assert logits > 1e-4 and first.startswith("stage 2")  # the hooks count the patch embedding as output 0


@needs_medmamba
def test_odd_sides_are_cropped_by_the_original_and_padded_by_us(mamba_files, capsys):
    r = original_medmamba.run_case(mamba_files, "medmamba_t", input_size=28, patch_size=2, train=False,
                                   expect_match=False, **TINY_MAMBA)
    assert r.logits > 1e-3 and r.first_stage.startswith("stage 2 (4, 4) vs (3, 3)"), r.row()  # 14 -> 7 -> 4 or 3


@pytest.fixture(scope="module")
def mam_files():
    return original_mam.load_originals(MAM)


@needs_mam
@pytest.mark.parametrize("strategy", ["sts", "ists"])
def test_mam_equals_the_original_sts_and_ists_chains(mam_files, strategy):
    sts, ists = mam_files
    r = original_mam.run_sts(sts) if strategy == "sts" else original_mam.run_ists(ists)
    assert r.ok and r.output <= 1e-5 and (r.memory or 0.0) <= 1e-5, r.row()
    assert r.grads <= 1e-5 * max(1.0, r.grad_scale), r.row()


@needs_mam
def test_the_mam_comparison_notices_a_difference(mam_files):
    sts, ists = mam_files
    assert original_mam.run_sts(sts, strategy="none").output > 1e-2  # the memory matters from block 2 on
    assert original_mam.run_ists(ists, bias=True).output > 1e-3  # the original's relative position bias
