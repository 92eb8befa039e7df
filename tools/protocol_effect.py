"""Score one trained run under the honest MedMNIST protocol and under the original code's protocol, side by side.

    python tools/protocol_effect.py RUN_DIR --data-root PATH [--k 20] [--repeats 5] [--json out.json]

RUN_DIR must be a run trained with `--train.keep_last_k K` (K >= k, e.g. `python train.py CONFIG ...
--train.keep_last_k 20`): train.py keeps no epoch checkpoints otherwise, and the tool says so. Printed, all on the test split:

* MedMNIST protocol (this project's default): best.pt (best validation AUC), the full split in dataset order;
* the paper's "mean over the last k epochs", honestly: each of the last k epoch checkpoints on the full split
  in order, mean divided by k (`predict.py --last-k k`);
* the original code's protocol (docs/spec/LMTTM.md §9.5-6, `engine/protocols.py`): the same k checkpoints, each scored on a
  shuffled loader that drops the last partial batch, with the checkpoint's carried memory/pointer flowing through
  the batches, and the sum divided by k - 1. Repeated with `--repeats` shuffles (seeds 0..R-1) to show its spread.

Nothing is written into the run directory. Exit codes: 0 done, 2 bad run directory, data or checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from engine.config import config_from_dict  # noqa: E402
from engine.evaluate import official_metrics, predict_scores, uses_full_batches  # noqa: E402
from engine.protocols import original_mean, original_protocol_scores  # noqa: E402
from engine.setup import load_data, model_from_config, run_cli  # noqa: E402


def build(path: Path, cfg, info):
    ckpt = load_checkpoint(path)
    trained = config_from_dict([(str(path), ckpt["config"])])
    model = model_from_config(trained, info)
    model.load_state_dict(ckpt["model"])
    return model, ckpt["epoch"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data-root", required=True, help="folder of the MedMNIST .npz files")
    parser.add_argument("--k", type=int, default=20, help="checkpoints of the last-k protocols (original: 20)")
    parser.add_argument("--repeats", type=int, default=5, help="shuffles of the original protocol")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.k < 2 or args.repeats < 1:
        parser.error("--k must be at least 2 and --repeats at least 1")

    epochs = sorted(args.run_dir.glob("epoch_*.pt"))[-args.k:]
    if len(epochs) < args.k:  # checked first: the usual mistake, a run trained without keep_last_k
        raise CheckpointError(
            f"{args.run_dir} holds {len(epochs)} epoch checkpoint(s) (epoch_NNNN.pt); --k {args.k} needs the last "
            f"{args.k}. train.py keeps them only when asked: train the run with --train.keep_last_k {args.k} "
            f"(e.g. python train.py CONFIG ... --train.keep_last_k {args.k}), or lower --k")
    best = args.run_dir / "best.pt"
    cfg = config_from_dict([(str(best), load_checkpoint(best)["config"])])
    cfg.data.root, cfg.data.download = args.data_root, False
    info, splits = load_data(cfg, torch.device("cpu"), splits=("test",))
    test = splits["test"]
    labels = test.labels.numpy()
    batch = cfg.train.batch_size
    full = uses_full_batches(cfg.model)  # compat: full batches at the training batch size, padding discarded
    rows = {}

    model, epoch = build(best, cfg, info)
    model.reset_state()  # the MedMNIST protocol: no carried state (a compat model keeps none at its start either)
    scores = predict_scores(model, test, batch_size=batch, device="cpu", full_batches=full)
    auc, acc = official_metrics(labels, scores, info.task)
    rows["MedMNIST protocol: best.pt (epoch %d), full split in order" % epoch] = (auc, acc, len(labels))

    honest = []
    for path in epochs:
        model, _ = build(path, cfg, info)
        model.reset_state()
        scores = predict_scores(model, test, batch_size=batch, device="cpu", full_batches=full)
        honest.append(official_metrics(labels, scores, info.task))
    rows[f"last {args.k} epochs, full split in order, mean / {args.k}"] = (
        float(np.mean([a for a, _ in honest])), float(np.mean([c for _, c in honest])), len(labels))

    original = []
    for seed in range(args.repeats):
        generator = torch.Generator().manual_seed(seed)
        per_ckpt = []
        for path in epochs:
            model, _ = build(path, cfg, info)  # carried state as saved in the checkpoint, as the original loads it
            torch.manual_seed(seed)
            y, scores = original_protocol_scores(model, test, batch_size=batch, generator=generator)
            per_ckpt.append(official_metrics(y, scores, info.task))
        original.append((original_mean([a for a, _ in per_ckpt]), original_mean([c for _, c in per_ckpt]),
                         float(np.mean([a for a, _ in per_ckpt])), float(np.mean([c for _, c in per_ckpt])), len(y)))
    o = np.array(original)
    rows[f"original protocol: last {args.k}, shuffled, drop-last, carried state, sum / {args.k - 1} "
         f"({args.repeats} shuffles, mean ± std)"] = (o[:, 0].mean(), o[:, 1].mean(), int(o[0, 4]), o[:, 0].std(),
                                                       o[:, 1].std())
    rows[f"  the same scores divided by {args.k} instead"] = (o[:, 2].mean(), o[:, 3].mean(), int(o[0, 4]),
                                                               o[:, 2].std(), o[:, 3].std())

    print(f"{args.run_dir} ({cfg.model_name}, {info.name} test, batch {batch}, "
          f"official_compat {getattr(cfg.model, 'official_compat', False)})")
    print("| protocol | test AUC | test ACC | samples scored |\n|---|--:|--:|--:|")
    for name, row in rows.items():
        spread = lambda i: f" ± {row[i]:.3f}" if len(row) > 3 else ""  # noqa: E731
        print(f"| {name} | {row[0]:.3f}{spread(3)} | {row[1]:.3f}{spread(4)} | {row[2]} |")
    if args.json:
        args.json.write_text(json.dumps({k: list(map(float, v)) for k, v in rows.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
