"""Test-wide settings: one torch thread per process keeps the tiny models fast on a 2-core machine
(two threads spin against each other, and against the subprocesses some tests start)."""

import torch

torch.set_num_threads(1)
