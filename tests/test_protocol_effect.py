"""tools/protocol_effect.py needs the epoch checkpoints of a run trained with --train.keep_last_k; without them
it stops at once (before reading any data) with one line saying how to get them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_run_without_epoch_checkpoints_is_refused_with_the_training_option_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for e in (9, 10):  # two of the 20 it needs
        (run / f"epoch_{e:04d}.pt").write_bytes(b"")
    done = subprocess.run([sys.executable, "tools/protocol_effect.py", str(run), "--data-root", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {run} holds 2 epoch checkpoint(s)")
    assert "--train.keep_last_k 20" in line and "--k 20" in line
