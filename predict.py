"""Evaluate a trained run with the official MedMNIST evaluator.

    python predict.py base.json                         # best.pt of the config's run directory, test split
    python predict.py adrenalmnist3d --split val
    python predict.py demo.json --checkpoint runs/demo/last.pt
    python predict.py base.json --last-k 20             # the paper's protocol: mean over the last 20 epochs

The model is rebuilt from the checkpoint's own config; the config given here supplies the run directory
and the data root, and must name the same dataset and size. Scores cover the full split in dataset
order. Writes `<run dir>/eval/<split>/`: metrics.json, predictions.npz (y_true, y_score) and, for MedMNIST
datasets, the evaluator's standard result CSV (re-scored to the same numbers by
`medmnist.Evaluator.parse_and_evaluate`). Exit codes: 0 done, 2 bad config, data or checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data import DataError
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import config_from_dict, load_config
from engine.evaluate import official_metrics, predict_scores
from engine.setup import dataset_for, load_data, model_from_config, resolve_device, run_cli


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Config keys can be overridden as in train.py: --section.key value.")
    parser.add_argument("config", nargs="?", default="base.json", help="config file (a bare name is looked up in config/)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (default: best.pt of the run directory)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split to score (default: eval.split)")
    parser.add_argument("--last-k", type=int, help="mean AUC/ACC over the last k epoch checkpoints (train.keep_last_k >= k)")
    return parser.parse_known_args(argv)


def checkpoints_to_score(args, cfg) -> tuple[list[Path], str]:
    last_k = cfg.eval.last_k if args.last_k is None else args.last_k
    if args.checkpoint is not None:
        return [args.checkpoint], "checkpoint"
    if last_k <= 0:
        return [cfg.run_dir / "best.pt"], "best validation AUC (MedMNIST protocol)"
    epochs = sorted(cfg.run_dir.glob("epoch_*.pt"))
    if len(epochs) < last_k:
        raise CheckpointError(f"--last-k {last_k} needs the last {last_k} epoch checkpoints, but {cfg.run_dir} has "
                              f"{len(epochs)}; train with --train.keep_last_k {last_k}")
    return epochs[-last_k:], f"mean over the last {last_k} epochs"


def check_same_task(cfg, info, ckpt: dict, path: Path) -> None:
    """Refuse a checkpoint trained on another dataset, size or class count than the config names."""
    trained = ckpt["dataset"]
    if (trained["name"], trained["size"]) != (info.name, info.size) or trained["num_classes"] != info.num_classes:
        raise CheckpointError(f"{path} was trained on {trained['name']} ({trained['size']}³, {trained['num_classes']} "
                              f"classes) but the config names {info.name} ({info.size}³, {info.num_classes} classes)")


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    split_name = args.split or cfg.eval.split
    device = resolve_device(cfg.train.device)
    info = dataset_for(cfg)
    paths, protocol = checkpoints_to_score(args, cfg)
    ckpts = [load_checkpoint(path, map_location=device) for path in paths]
    for path, ckpt in zip(paths, ckpts):
        check_same_task(cfg, info, ckpt, path)
    _, splits = load_data(cfg, device, splits=(split_name,))
    split = splits[split_name]
    labels = split.labels.cpu().numpy()

    results = []
    for path, ckpt in zip(paths, ckpts):
        trained_cfg = config_from_dict([(str(path), ckpt["config"])])  # rebuild from the checkpoint's own config
        model = model_from_config(trained_cfg, info).to(device)
        model.load_state_dict(ckpt["model"])
        scores = predict_scores(model, split, batch_size=cfg.eval.batch_size, device=device,
                                desc=f"{split_name} {path.name}")
        auc, acc = official_metrics(labels, scores, info.task)
        results.append((path, ckpt["epoch"], auc, acc, scores))
        print(f"{path}: epoch {ckpt['epoch']}  {split_name} AUC {auc:.4f}  ACC {acc:.4f}")

    out_dir = cfg.run_dir / "eval" / split_name
    out_dir.mkdir(parents=True, exist_ok=True)
    auc = float(np.mean([r[2] for r in results]))  # mean over k checkpoints, divided by k
    acc = float(np.mean([r[3] for r in results]))
    scores = results[-1][4]
    if not info.is_synthetic:  # the stock evaluator: reads the labels from the .npz and writes the standard CSV
        from medmnist import Evaluator

        evaluator = Evaluator(info.name, split_name, size=info.size, root=str(info.path.parent))
        if not np.array_equal(evaluator.labels.reshape(len(labels), -1)[:, 0], labels.reshape(len(labels), -1)[:, 0]):
            raise DataError(f"the labels of {info.path} differ between medmnist's reader and ours")
        for _, epoch, _, _, epoch_scores in results:
            evaluator.evaluate(epoch_scores, save_folder=str(out_dir), run=f"{cfg.run_dir.name}-epoch{epoch}")
    np.savez(out_dir / "predictions.npz", y_true=labels, y_score=scores)
    metrics = {"split": split_name, "auc": auc, "acc": acc, "protocol": protocol,
               "checkpoint": [str(r[0]) for r in results] if len(results) > 1 else str(results[0][0]),
               "epochs": [r[1] for r in results], "per_checkpoint": [{"auc": r[2], "acc": r[3]} for r in results],
               "n_samples": int(len(labels)), "dataset": info.name, "size": info.size}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{info.name} {split_name} ({len(labels)} samples, {protocol}): AUC {auc:.4f}  ACC {acc:.4f}")
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
