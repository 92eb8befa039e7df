"""`official_compat` as the original ran it: full batches (docs/spec/LMTTM.md §9.5), and settings that contradict it.

The original dropped the last partial batch everywhere and ran every batch at the configured batch size.
Here evaluation of a batch-dependent model runs at a fixed batch size with the last batch padded by the
split's first samples and the padding's scores discarded; the references below are the same full
batches run by hand, and a probe model that reports which samples it saw.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data import Split, batches
from engine.config import ConfigError, config_from_dict, config_to_dict
from engine.evaluate import predict_scores, uses_full_batches
from model import build_model, get_model_entry

REPO = Path(__file__).resolve().parents[1]


def _split(n: int, size: int = 6) -> Split:
    """Volume i is filled with the value i (so a model can tell which sample it got); label i % 2."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1, 1).expand(n, 1, size, size, size).contiguous()
    return Split(images, torch.arange(n) % 2)


def _ids(x: torch.Tensor) -> list[int]:
    return [round(v) for v in (x[:, 0, 0, 0, 0] * 255).tolist()]


class Probe(nn.Module):
    """Logits (id, -id) of each volume; records the ids of every batch it is called with."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[int]] = []

    def forward(self, x):
        ids = torch.tensor(_ids(x), dtype=torch.float32)
        self.calls.append([int(i) for i in ids])
        return torch.stack([ids / 10, -ids / 10], dim=1)


# ----------------------------------------------------------------------------------------------------------
# batches(pad_last=True)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch, expected", [
    (10, 4, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]),
    (8, 4, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # nothing to pad
    (3, 7, [[0, 1, 2, 0, 1, 2, 0]]),  # batch larger than the split: wraps around more than once
])
def test_pad_last_wraps_around_to_the_first_samples(n, batch, expected):
    got = [_ids(x) for x, _ in batches(_split(n), batch, pad_last=True)]
    assert got == expected
    labels = [y.tolist() for _, y in batches(_split(n), batch, pad_last=True)]
    assert labels == [[i % 2 for i in ids] for ids in expected]


def test_pad_last_follows_the_shuffled_order():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    got = [_ids(x) for x, _ in batches(_split(10), 4, shuffle=True, generator=torch.Generator().manual_seed(5),
                                       pad_last=True)]
    assert got == [order[0:4], order[4:8], order[8:10] + order[0:2]]


def test_pad_last_and_drop_last_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        next(batches(_split(5), 2, drop_last=True, pad_last=True))


# ----------------------------------------------------------------------------------------------------------
# predict_scores(full_batches=True)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch", [(10, 4), (3, 7), (8, 4)])
def test_full_batches_score_every_sample_once_in_order_and_discard_the_padding(n, batch):
    probe = Probe()
    scores = predict_scores(probe, _split(n), batch_size=batch, device="cpu", full_batches=True)
    assert all(len(call) == batch for call in probe.calls)  # every forward at the fixed batch size
    assert scores.shape == (n, 2)
    ids = np.arange(n) / 10
    expected = np.exp(np.stack([ids, -ids], 1)) / np.exp(np.stack([ids, -ids], 1)).sum(1, keepdims=True)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)  # sample i's score in row i, padding gone
    plain = Probe()
    predict_scores(plain, _split(n), batch_size=batch, device="cpu")
    assert [len(c) for c in plain.calls][-1] == (n % batch or batch)  # the default keeps the partial batch


@pytest.mark.parametrize("overrides", [
    dict(official_compat=True),  # every option, random draws seeded below
    dict(compat_batch_attention=True, compat_global_pointer=True),
])
def test_full_batch_scores_equal_the_same_full_batches_run_directly(overrides):
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=6, dim=16, memory_tokens=16,
                        patch_size=2, **overrides)
    reference = copy.deepcopy(model).eval()
    split = _split(10)
    torch.manual_seed(11)
    scores = predict_scores(model, split, batch_size=4, device="cpu", full_batches=True)
    torch.manual_seed(11)
    with torch.no_grad():
        direct = [reference(x).softmax(-1) for x in (split.images[idx].float() / 255
                                                      for idx in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]))]
    direct = torch.cat(direct)[:10].numpy()
    np.testing.assert_array_equal(scores, direct)
    # control: the last two samples really depend on the batch they run in (a 2-sample batch differs)
    partial = copy.deepcopy(reference)
    partial.reset_state()
    torch.manual_seed(11)
    with torch.no_grad():
        for idx in ([0, 1, 2, 3], [4, 5, 6, 7]):
            partial(split.images[idx].float() / 255)
        alone = partial(split.images[[8, 9]].float() / 255).softmax(-1).numpy()
    assert np.abs(alone - direct[8:]).max() > 1e-4


def test_uses_full_batches_follows_the_batch_dependent_options():
    lmttm = get_model_entry("lmttm").config_cls
    assert not uses_full_batches(lmttm())
    assert uses_full_batches(lmttm(official_compat=True))
    assert uses_full_batches(lmttm(official_compat=True, processor="mlp"))  # carried memory, pointer
    for name in ("compat_batch_attention", "compat_carry_memory", "compat_global_pointer"):
        assert uses_full_batches(lmttm(**{name: True})), name
    assert not uses_full_batches(lmttm(compat_random_pos=True))  # random, but not batch-dependent
    assert uses_full_batches(get_model_entry("ttm").config_cls(compat_carry_memory=True))
    assert not uses_full_batches(get_model_entry("resnet18_3d").config_cls())


# ----------------------------------------------------------------------------------------------------------
# contradictory settings
# ----------------------------------------------------------------------------------------------------------

def _model_cfg(**model):
    return config_from_dict([("test", {"model": {"name": "lmttm", **model}})])


@pytest.mark.parametrize("option", ["compat_batch_attention", "compat_random_pos", "compat_carry_memory",
                                    "compat_global_pointer"])
def test_official_compat_with_an_option_switched_off_is_rejected(option):
    with pytest.raises(ConfigError, match=f"official_compat = true contradicts {option} = false"):
        _model_cfg(official_compat=True, **{option: False})
    assert getattr(_model_cfg(official_compat=True, **{option: True}).model, option) is True
    assert getattr(_model_cfg(**{option: True}).model, option) is True  # alone, without the preset
    assert getattr(_model_cfg().model, option) is False


@pytest.mark.parametrize("processor", ["mlp", "mixer"])
def test_batch_attention_needs_attention(processor):
    with pytest.raises(ConfigError, match="needs the transformer processor"):
        _model_cfg(processor=processor, compat_batch_attention=True)
    with pytest.raises(ConfigError, match=f"processor '{processor}' has no attention"):
        _model_cfg(processor=processor, official_compat=True, compat_batch_attention=True)
    cfg = _model_cfg(processor=processor, official_compat=True).model  # the preset leaves it off, says so
    assert (cfg.compat_batch_attention, cfg.compat_random_pos, cfg.compat_carry_memory,
            cfg.compat_global_pointer) == (False, True, True, True)


@pytest.mark.parametrize("model", [dict(official_compat=True), dict(official_compat=True, processor="mlp"),
                                   dict(official_compat=True, name="ttm"), dict(compat_carry_memory=True), {}])
def test_resolved_compat_config_round_trips(model):
    cfg = _model_cfg(**model)
    again = config_from_dict([("saved config.json", config_to_dict(cfg))])
    assert again.model == cfg.model and again.model_name == cfg.model_name


def test_train_py_rejects_a_contradiction_in_one_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"data": {"name": "synthetic3d"}, "model": {"dim": 16, "memory_tokens": 16}}')
    proc = subprocess.run([sys.executable, "train.py", str(path), "--output.dir", str(tmp_path / "runs"),
                           "--model.official_compat", "true", "--model.compat_random_pos", "false"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: model lmttm: official_compat = true contradicts compat_random_pos = false; leave compat_random_pos "
        "unset (null) or set official_compat = false"]
    assert not (tmp_path / "runs").exists()
