"""The original code's evaluation protocol (engine/protocols.py), checked against hand-computed expectations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from data import Split
from engine.protocols import original_mean, original_protocol_scores
from model import build_model


class Recorder(nn.Module):
    """Logits [0, v] where v is the sample's first voxel; remembers every batch it saw (and counts its calls)."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        self.seen.append(v.clone())
        return torch.stack([torch.zeros_like(v), v], dim=1)


def _split(n=10, size=4):
    images = torch.zeros(n, 1, size, size, size, dtype=torch.uint8)
    images[:, 0, 0, 0, 0] = torch.arange(n, dtype=torch.uint8) * 10  # sample i carries the value 10 i
    return Split(images, torch.arange(n) % 2)


def test_scores_the_shuffled_full_batches_only():
    split, model = _split(10), Recorder()
    labels, scores = original_protocol_scores(model, split, batch_size=4, generator=torch.Generator().manual_seed(5))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:8]  # 2 full batches of 4; 2 dropped
    assert [len(b) for b in model.seen] == [4, 4]
    np.testing.assert_array_equal(labels, (order % 2).numpy())
    v = (order * 10).float() / 255
    expected = torch.stack([torch.zeros_like(v), v], 1).softmax(1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    np.testing.assert_allclose(scores.sum(1), 1, rtol=1e-6)
    assert not model.training


def test_fewer_samples_than_one_batch_is_an_error():
    with pytest.raises(ValueError, match="fewer than one batch"):
        original_protocol_scores(Recorder(), _split(3), batch_size=4, generator=torch.Generator().manual_seed(0))


def test_carried_memory_flows_through_the_split():
    """With official_compat the carried memory is not reset: scoring twice from the same state differs from
    scoring once after the state moved on."""
    torch.manual_seed(0)
    model = build_model("lmttm", in_channels=1, num_classes=2, input_size=8, dim=8, memory_tokens=8, heads=2,
                        patch_size=2, official_compat=True)
    images = torch.randint(0, 255, (8, 1, 8, 8, 8), dtype=torch.uint8)
    split = Split(images, torch.arange(8) % 2)
    assert model._carried_memory is None
    original_protocol_scores(model, split, batch_size=4, generator=torch.Generator().manual_seed(0))
    first = model._carried_memory.clone()
    assert first.abs().sum() > 0
    original_protocol_scores(model, split, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(first, model._carried_memory)


def test_original_mean_divides_by_k_minus_one():
    assert original_mean([0.6, 0.7, 0.8]) == pytest.approx(2.1 / 2)
    assert original_mean([0.5] * 20) == pytest.approx(10 / 19)
    assert original_mean([0.9]) == pytest.approx(0.9)
