"""Train a model (LMTTM by default) on a MedMNIST 3D dataset.

    python train.py base.json                                   # paper defaults on config/base.json's dataset
    python train.py adrenalmnist3d --train.epochs 50 --model.dim 64 --model.memory_tokens 64
    python train.py demo.json                                   # offline synthetic demo, about a minute on a CPU

The run directory (`output.dir/output.name`, default runs/<config name>) receives config.json, metrics.csv,
last.pt (every epoch), best.pt (best validation AUC) and, at the end, train_summary.json. Rerunning the
same command resumes from last.pt; a finished run is left as it is (`--restart` starts it over, keeping
the old directory under a new name). Exit codes: 0 done, 2 bad config/data/checkpoint, 3 non-finite loss,
130 interrupted (last.pt of the last finished epoch stays resumable).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import batches, data_md5
from engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, package_versions
from engine.config import Config, config_to_dict, describe_config, load_config
from engine.evaluate import official_metrics, predict_scores
from engine.setup import load_data, model_from_config, resolve_device, run_cli, seed_everything
from model import MODELS, count_parameters, executed_parameter_count

METRICS_HEADER = ["epoch", "train_loss", "val_auc", "val_acc", "lr", "time_s"]
# keys that may differ between a run and its resumption (everything else must match the checkpoint)
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "device"), ("train", "keep_last_k"), ("data", "root"),
                     ("data", "download"), ("data", "device_cache"), ("eval", "batch_size"), ("eval", "split"),
                     ("eval", "last_k")}


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# pieces of the loop
# ----------------------------------------------------------------------------------------------------------

def make_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def learning_rate(cfg: Config, epoch: int) -> float:
    """The lr of a (0-based) epoch: a pure function of the epoch, so resuming is exact."""
    t = cfg.train
    if t.scheduler == "multistep":
        return t.lr * t.gamma ** sum(epoch >= round(m * t.epochs) for m in t.milestones)
    return t.lr


def train_one_epoch(model, optimizer, split, cfg: Config, epoch: int, device) -> float:
    """One pass over the shuffled training split; returns the mean loss. Raises NonFiniteLoss."""
    model.train()
    shuffle = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)  # same order on resume
    amp = cfg.train.amp and device.type == "cuda"
    total, seen = 0.0, 0
    steps = -(-len(split) // cfg.train.batch_size)
    bar = tqdm(batches(split, cfg.train.batch_size, shuffle=True, generator=shuffle, device=device), total=steps,
               desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True, disable=None)
    for x, y in bar:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), y)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the training loss became {loss.item()} in epoch {epoch + 1} after {seen} samples")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        total += loss.item() * len(y)
        seen += len(y)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / seen


def check_resumable(cfg: Config, ckpt: dict, path: Path) -> None:
    """Refuse to resume a run directory that holds a run of another config."""
    mine, theirs = config_to_dict(cfg), ckpt["config"]
    diffs = [f"{s}.{k}: {theirs.get(s, {}).get(k)!r} -> {v!r}" for s in ("data", "model", "train", "eval")
             for k, v in mine[s].items() if (s, k) not in RESUMABLE_CHANGES and theirs.get(s, {}).get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained with another config ({'; '.join(diffs)}). Use another "
                              f"--output.name, or --restart to start this run over (the old one is kept aside).")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_metrics_row(path: Path, row: dict, keep_through_epoch: int | None = None) -> None:
    """Append a row to metrics.csv; `keep_through_epoch` first drops rows of epochs a resume repeats."""
    rows = []
    if path.exists():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f)]
        if keep_through_epoch is not None:
            rows = [r for r in rows if int(r["epoch"]) <= keep_through_epoch]
    rows.append(row)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRICS_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any config key can be overridden: --section.key value "
                                            "(e.g. --train.epochs 5 --model.dim 64). See --help-config.")
    parser.add_argument("config", nargs="?", default="base.json", help="config file (a bare name is looked up in config/)")
    parser.add_argument("--restart", action="store_true", help="start the run over; the old run directory is renamed, not deleted")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    parser.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    if args.help_config:
        print(describe_config())
        return 0
    if args.list_models:
        for name, entry in sorted(MODELS.items()):
            print(f"{name:16s} {entry.help}")
        return 0

    # setup: config, run directory, device, seed ----------------------------------------------------------
    cfg = load_config(args.config, overrides)
    run_dir = cfg.run_dir
    last_path = run_dir / "last.pt"
    if args.restart and run_dir.exists():
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"--restart: moved the previous run to {aside}")
    resume = load_checkpoint(last_path) if last_path.exists() else None
    if resume is not None:
        check_resumable(cfg, resume, last_path)
        if resume["epoch"] >= cfg.train.epochs:
            print(f"{run_dir} already finished {resume['epoch']} epochs (train.epochs = {cfg.train.epochs}); "
                  f"nothing to do. Use --restart to train it again, or raise --train.epochs to continue.")
            return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)

    # data and model ---------------------------------------------------------------------------------------
    info, splits = load_data(cfg, device)
    md5 = data_md5(cfg.data.name, root=cfg.data.root, size=cfg.data.size)
    model = model_from_config(cfg, info).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        executed = executed_parameter_count(copy.deepcopy(model), splits["train"].images[:1].float().to(device) / 255)
    print(f"{cfg.model_name} on {info.name} ({info.size}³, {info.num_classes} classes, {info.task}); "
          f"train/val/test {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}; device {device}")
    if md5 is not None:
        print(f"data file {info.path} MD5 {md5} "
              f"({'as in medmnist.INFO' if md5 == info.md5 else f'NOT the released file, which has {info.md5}'})")
    print(f"parameters (executed path): {executed:,}")
    if executed != count_parameters(model):
        print(f"warning: {count_parameters(model) - executed:,} parameters of the model receive no gradient")
    optimizer = make_optimizer(cfg, model.parameters())

    start_epoch, best_auc, best_epoch = 0, -math.inf, -1
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        start_epoch, best_auc, best_epoch = resume["epoch"], resume["best_val_auc"], resume["best_epoch"]
        print(f"resuming {run_dir} after epoch {start_epoch} (best val AUC {best_auc:.4f} at epoch {best_epoch})")
    else:
        (run_dir / "metrics.csv").unlink(missing_ok=True)

    def checkpoint(epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_val_auc": best_auc, "best_epoch": best_epoch, "config": config_to_dict(cfg),
                "dataset": {"name": info.name, "size": info.size, "num_classes": info.num_classes,
                            "task": info.task, "md5": md5},
                "param_count": executed, "versions": package_versions(), "rng": rng_state()}

    # epoch loop: train -> validate -> log -> save --------------------------------------------------------
    t_start = time.time()
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.time()
            lr = learning_rate(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_one_epoch(model, optimizer, splits["train"], cfg, epoch, device)
            scores = predict_scores(model, splits["val"], batch_size=cfg.eval.batch_size, device=device,
                                    amp=cfg.train.amp)
            val_auc, val_acc = official_metrics(splits["val"].labels.cpu().numpy(), scores, info.task)
            seconds = time.time() - t0
            improved = val_auc > best_auc
            if improved:
                best_auc, best_epoch = val_auc, epoch + 1
            state = checkpoint(epoch + 1)
            if improved:
                atomic_save(state, run_dir / "best.pt")
            if cfg.train.keep_last_k:
                atomic_save({k: state[k] for k in ("model", "epoch", "config", "dataset", "versions")},
                            run_dir / f"epoch_{epoch + 1:04d}.pt")
                (run_dir / f"epoch_{epoch + 1 - cfg.train.keep_last_k:04d}.pt").unlink(missing_ok=True)
            atomic_save(state, last_path)
            write_metrics_row(run_dir / "metrics.csv",
                              {"epoch": epoch + 1, "train_loss": f"{loss:.6f}", "val_auc": f"{val_auc:.6f}",
                               "val_acc": f"{val_acc:.6f}", "lr": f"{lr:.3g}", "time_s": f"{seconds:.2f}"},
                              keep_through_epoch=epoch)
            print(f"epoch {epoch + 1:3d}/{cfg.train.epochs}  loss {loss:.4f}  val AUC {val_auc:.4f}  "
                  f"val ACC {val_acc:.4f}  {seconds:.1f}s{'  *best*' if improved else ''}", flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {last_path} holds the last finished epoch. Rerun the same command to resume.")
        return 130
    except NonFiniteLoss as err:
        print(f"error: {err}. Stopped; {last_path} keeps the last good epoch. Try a lower --train.lr "
              f"or --train.grad_clip 1.0.", file=sys.stderr)
        return 3

    summary = {"finished": True, "epochs": cfg.train.epochs, "best_epoch": best_epoch, "best_val_auc": best_auc,
               "param_count": executed, "data_md5": md5, "versions": package_versions(),
               "seconds": round(time.time() - t_start, 2)}
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done: best val AUC {best_auc:.4f} at epoch {best_epoch}; checkpoints in {run_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
