"""Scores of a model on a full split, in dataset order, and the official MedMNIST metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.evaluator import getACC, getAUC
from tqdm import tqdm

from data import Split, batches


# compat options under which a prediction depends on the batch it is computed in: the other samples
# (batch attention), the batch size (the carried memory has one row per batch position) or the number of
# forward calls before it (the never-reset block pointer)
BATCH_DEPENDENT_OPTIONS = ("compat_batch_attention", "compat_carry_memory", "compat_global_pointer")


def uses_full_batches(model_cfg) -> bool:
    """True when the model's predictions depend on the batch (any of `BATCH_DEPENDENT_OPTIONS` on).

    Such a model runs as the original code ran it: every batch at the training batch size, in training
    (drop the last partial batch) and in evaluation (`predict_scores(..., full_batches=True)`).
    """
    return any(bool(getattr(model_cfg, name, False)) for name in BATCH_DEPENDENT_OPTIONS)


@torch.no_grad()
def predict_scores(model: torch.nn.Module, split: Split, *, batch_size: int, device, amp: bool = False,
                   desc: str | None = None, full_batches: bool = False) -> np.ndarray:
    """Scores (N, K) for every sample of `split` in dataset order (the model is put in eval mode): softmax
    probabilities, or per-label sigmoid probabilities for a multi-label split (labels (N, L)).

    With `full_batches` every forward gets exactly `batch_size` samples: the last partial batch is
    completed with the split's first samples (wrapping around; real volumes, as the original's batches
    always were) and the scores of that padding are discarded, so every sample is scored exactly once.
    """
    model.eval()
    scores = []
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and torch.device(device).type == "cuda")
    with autocast:
        for x, _ in tqdm(batches(split, batch_size, device=device, pad_last=full_batches),
                         total=-(-len(split) // batch_size), desc=desc, leave=False,
                         disable=True if desc is None else None, dynamic_ncols=True):
            logits = model(x).float()
            scores.append((logits.sigmoid() if split.labels.dim() == 2 else logits.softmax(dim=-1)).cpu())
    return torch.cat(scores)[: len(split)].numpy()


def task_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The training loss: cross-entropy for class indices y (B,); for multi-label targets y (B, L) binary
    cross-entropy with logits, averaged over the labels of a sample ("mean": and over the samples; "sum":
    summed over the samples)."""
    if y.dim() == 1:
        return F.cross_entropy(logits, y, reduction=reduction)
    per_sample = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none").mean(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def official_metrics(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[float, float]:
    """(AUC, ACC) with medmnist's own getAUC / getACC (binary tasks use the last score column)."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    return float(getAUC(labels, scores, task)), float(getACC(labels, scores, task))
