"""Scores of a model on a full split, in dataset order, and the official MedMNIST metrics."""

from __future__ import annotations

import numpy as np
import torch
from medmnist.evaluator import getACC, getAUC
from tqdm import tqdm

from data import Split, batches


@torch.no_grad()
def predict_scores(model: torch.nn.Module, split: Split, *, batch_size: int, device, amp: bool = False,
                   desc: str | None = None) -> np.ndarray:
    """Softmax scores (N, K) for every sample of `split` in dataset order (the model is put in eval mode)."""
    model.eval()
    scores = []
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and torch.device(device).type == "cuda")
    with autocast:
        for x, _ in tqdm(batches(split, batch_size, device=device), total=-(-len(split) // batch_size),
                         desc=desc, leave=False, disable=True if desc is None else None, dynamic_ncols=True):
            scores.append(model(x).float().softmax(dim=-1).cpu())
    return torch.cat(scores).numpy()


def official_metrics(labels: np.ndarray, scores: np.ndarray, task: str) -> tuple[float, float]:
    """(AUC, ACC) with medmnist's own getAUC / getACC (binary tasks use the last score column)."""
    labels = np.asarray(labels).reshape(len(labels), -1)
    return float(getAUC(labels, scores, task)), float(getACC(labels, scores, task))
