"""The original LMTTM code's evaluation protocol, reproduced so that its effect can be measured (docs/spec/LMTTM.md §9.5-6).

This is NOT how this project scores a model (that is the MedMNIST protocol: the full split in dataset
order, `engine.evaluate`). It exists for `predict.py --protocol original`, which prints both, so a reader
can see how much the original's evaluation moves the numbers of the same trained checkpoints:

* the test loader shuffles and drops the last partial batch (e.g. 288 of 298 Adrenal test samples at
  batch 32), so a different subset and order is scored for every checkpoint;
* the model's carried state (memory and block pointer, with `official_compat`) is not reset: it comes
  from the checkpoint and flows from batch to batch through the whole split;
* the evaluator is patched to take the labels of the scored (shuffled, cut) samples; that equals
  `getAUC`/`getACC` on those samples, which is what `original_protocol_scores` returns;
* the mean over the k evaluated checkpoints is their sum divided by k - 1 (the original loops over 20
  files and divides by the last loop index, 19).
"""

from __future__ import annotations

import numpy as np
import torch

from data import Split, batches


@torch.no_grad()
def original_protocol_scores(model: torch.nn.Module, split: Split, *, batch_size: int, generator: torch.Generator,
                             device=None) -> tuple[np.ndarray, np.ndarray]:
    """(labels, softmax scores) of the samples the original's test loader scores, in the order it scores them.

    Shuffled with `generator`, full batches of `batch_size` only; the model's carried state is left as it is.
    """
    model.eval()
    labels, scores = [], []
    for x, y in batches(split, batch_size, shuffle=True, generator=generator, device=device, drop_last=True):
        scores.append(model(x).float().softmax(dim=-1).cpu())
        labels.append(y.cpu())
    if not scores:
        raise ValueError(f"the split has {len(split)} samples, fewer than one batch of {batch_size}: the original's "
                         f"loader (drop_last) would score none")
    return torch.cat(labels).numpy(), torch.cat(scores).numpy()


def original_mean(values: list[float]) -> float:
    """The original's average over checkpoints: the sum divided by (number of checkpoints - 1), sic.

    With one checkpoint the original's loop index is 0 and it would divide by zero; we return the value.
    """
    return float(sum(values) / (len(values) - 1)) if len(values) > 1 else float(values[0])
