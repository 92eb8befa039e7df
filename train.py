"""Train a model (LMTTM by default) on a MedMNIST 3D dataset.

    python train.py base.json                                   # paper defaults on config/base.json's dataset
    python train.py adrenalmnist3d --train.epochs 50 --model.dim 64 --model.memory_tokens 64
    python train.py demo.json                                   # offline synthetic demo, about a minute on a CPU
    torchrun --nproc_per_node 4 train.py base.json              # DistributedDataParallel (engine/distributed.py)

The run directory (`output.dir/output.name`; by default runs/<config name>-<the settings the overrides change>,
see engine/runname.py and --print-config) receives train.log (what the run printed), config.json, metrics.csv,
last.pt (every epoch), best.pt (best validation AUC) and, at the end, train_summary.json. Rerunning the
same command resumes from last.pt; a finished run is left as it is (`--restart` starts it over, keeping
the old directory under a new name). The run directory is created only when training starts and is locked
while it runs (a second train.py on it is refused). Exit codes: 0 done, 2 bad config, data, checkpoint or
output folder, 3 non-finite loss, 130 Ctrl-C, 143 SIGTERM (last.pt of the last finished epoch stays resumable),
141 the output's reader went away (`| head`; no message).
"""

from __future__ import annotations

if __name__ == "__main__":  # an interrupt while the imports below run: one line, nothing written (run_cli takes over)
    import engine.early_interrupts

    engine.early_interrupts.install()

import argparse
import contextlib
import copy
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import batches, check_split, data_md5
from engine.checkpoint import CheckpointError, load_checkpoint, load_weights, package_versions
from engine.config import Config, ConfigError, config_from_dict, config_to_dict, describe_config, load_config
from engine import distributed, runlog
from engine.distributed import Distributed
from engine.evaluate import official_metrics, predict_scores, task_loss, uses_full_batches
from engine.plots import MissingDependency, TensorBoard, plot_curves
from engine.rundir import (RunDirError, RunLock, Terminated, atomic_save, atomic_write_json, atomic_write_text,
                           json_safe, remove_stale_temporaries)
from engine.setup import (apply_determinism, apply_tf32, compile_model, load_data, model_from_config, resolve_device,
                          restore_rng_state, rng_state, run_cli, seed_everything)
from model import MODELS, count_parameters, executed_parameter_count
from model.classical import is_classical

METRICS_HEADER = ["epoch", "train_loss", "val_auc", "val_acc", "lr", "time_s"]
# keys that may differ between a run and its resumption (everything else must match the checkpoint)
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "device"), ("train", "keep_last_k"), ("data", "root"),
                     ("data", "download"), ("data", "device_cache"), ("eval", "batch_size"), ("eval", "split"),
                     ("eval", "last_k"), ("train", "compile"), ("train", "tf32")}


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


def train_one_epoch(model, optimizer, split, cfg: Config, epoch: int, device, *, forward=None,
                    check_every: int = 25, dist: Distributed | None = None) -> float:
    """One pass over the shuffled training split; returns the mean loss. Raises NonFiniteLoss.

    `forward` is the callable that runs the model (the compiled module with `train.compile`, else the model).
    The loss is summed on the device; it is read back (a host synchronisation) only every `check_every`
    steps and at the end, where a non-finite sum stops the epoch: nothing of it is saved, and last.pt keeps
    the last good epoch. Models whose predictions depend on the batch (the original's compat options) see
    full batches only: the last partial batch is dropped, as the original's loader did. Under torchrun
    (`dist`), every rank trains on its shard of the same global batch (engine/distributed.py) and the returned
    loss is the global mean.
    """
    dist = dist or Distributed.single()
    model.train()
    forward = model if forward is None else forward
    shuffle = torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch)  # same order on resume
    amp = cfg.train.amp and device.type == "cuda"
    full = uses_full_batches(cfg.model)
    steps = len(split) // cfg.train.batch_size if full else -(-len(split) // cfg.train.batch_size)
    total, seen = torch.zeros((), device=device), 0
    bar = tqdm(batches(split, cfg.train.batch_size, shuffle=True, generator=shuffle, device=device, drop_last=full),
               total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, dynamic_ncols=True,
               disable=None if dist.leader else True)

    def check(step: int) -> None:
        mean = dist.sum(total).item() / seen
        if not math.isfinite(mean):
            raise NonFiniteLoss(f"the training loss became {mean} in epoch {epoch + 1} (by step {step} of {steps})")
        bar.set_postfix(loss=f"{mean:.4f}")

    for step, (x, y) in enumerate(bar, start=1):
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            if dist.enabled:  # this rank's shard; DDP's mean over ranks is the global batch's gradient
                xs, ys, weight = dist.shard(x, y)
                summed = task_loss(forward(xs).float(), ys, reduction="sum")
                loss = summed * weight
            else:
                loss = task_loss(forward(x).float(), y)  # cross-entropy (BCE for multi-label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        total += summed.detach() * (weight > 0) if dist.enabled else loss.detach() * len(y)
        seen += len(y)
        if step % check_every == 0:
            check(step)
    check(steps)
    return dist.sum(total).item() / seen


def check_resumable(cfg: Config, ckpt: dict, path: Path) -> None:
    """Refuse to resume a run directory that holds a run of another config (a key the checkpoint's config
    lacks, because it was added later, counts as its default)."""
    mine, theirs = config_to_dict(cfg), ckpt["config"]
    defaults = config_to_dict(config_from_dict([]))
    missing = object()

    def theirs_value(s, k):
        value = theirs.get(s, {}).get(k, missing)
        return defaults.get(s, {}).get(k) if value is missing else value

    diffs = [f"{s}.{k}: {theirs_value(s, k)!r} -> {v!r}" for s in ("data", "model", "train", "eval")
             for k, v in mine[s].items() if (s, k) not in RESUMABLE_CHANGES and theirs_value(s, k) != v]
    if diffs:
        raise CheckpointError(f"{path} was trained with another config ({'; '.join(diffs)}). Use another "
                              f"--output.name, or --restart to start this run over (the old one is kept aside).")


def metrics_csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=METRICS_HEADER, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def metrics_rows_of(ckpt: dict, run_dir: Path) -> list[dict]:
    """The metrics rows of the epochs a checkpoint holds: its own copy, or (a checkpoint written before
    the rows lived in it) the rows of metrics.csv up to its epoch."""
    if "metrics" in ckpt:
        return [dict(r) for r in ckpt["metrics"]]
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: r.get(k, "") for k in METRICS_HEADER} for r in csv.DictReader(f)
                if r.get("epoch", "").isdigit() and int(r["epoch"]) <= ckpt["epoch"]]


def summary_of(ckpt: dict) -> dict:
    """train_summary.json, a function of the final last.pt only (so it can always be rewritten from it)."""
    return json_safe({"finished": True, "epochs": ckpt["epoch"], "best_epoch": ckpt["best_epoch"],
                      "best_val_auc": ckpt["best_val_auc"], "param_count": ckpt.get("param_count"),
                      "data_md5": ckpt.get("dataset", {}).get("md5"), "versions": ckpt.get("versions"),
                      "seconds": round(float(ckpt.get("train_seconds", 0.0)), 2)})


def sync_records(run_dir: Path, ckpt: dict, *, finished: bool) -> list[str]:
    """Make metrics.csv (and, for a finished run, train_summary.json) agree with last.pt; return what was
    rewritten. A kill between last.pt and these files loses nothing: they are rebuilt from last.pt."""
    fixed = []
    rows = metrics_rows_of(ckpt, run_dir)
    metrics = run_dir / "metrics.csv"
    text = metrics_csv_text(rows)
    if "metrics" in ckpt and (not metrics.is_file() or metrics.read_text() != text):
        atomic_write_text(text, metrics)
        fixed.append("metrics.csv")
    if finished:
        summary_path = run_dir / "train_summary.json"
        try:
            current = json.loads(summary_path.read_text())
        except (OSError, ValueError):
            current = None
        if current != summary_of(ckpt):
            atomic_write_json(summary_of(ckpt), summary_path)
            fixed.append("train_summary.json")
    return fixed


def prune_epoch_files(run_dir: Path, epoch: int, keep: int) -> None:
    """Keep exactly the epoch files of epochs epoch-keep+1 .. epoch (also after a resume that lowered k)."""
    for p in run_dir.glob("epoch_*.pt"):
        number = p.stem[len("epoch_"):]
        if number.isdigit() and not epoch - keep < int(number) <= epoch:
            p.unlink(missing_ok=True)


def read_resume(cfg: Config, run_dir: Path) -> dict | None:
    """last.pt of the run directory, checked against the config; None for a new run."""
    last_path = run_dir / "last.pt"
    if not last_path.exists():
        return None
    resume = load_checkpoint(last_path)
    check_resumable(cfg, resume, last_path)
    return resume


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Any config key can be overridden: --section.key value "
                                            "(e.g. --train.epochs 5 --model.dim 64). See --help-config.")
    parser.add_argument("config", nargs="?", help="config file (a bare name is looked up in config/; default base.json)")
    parser.add_argument("--restart", action="store_true", help="start the run over; the old run directory is renamed, not deleted")
    parser.add_argument("--help-config", action="store_true", help="print every config key with its default (and, "
                        "with a config, its resolved value) and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config (the config, its "
                        "`extends` and the overrides; output.name = the run directory's name) as JSON and exit")
    parser.add_argument("--list-models", action="store_true", help="print the registered models and exit")
    return parser.parse_known_args(argv)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    if args.help_config:
        print(describe_config(cfg=load_config(args.config, overrides) if args.config else None))
        return 0
    args.config = args.config or "base.json"
    if args.print_config:
        return print_config(load_config(args.config, overrides))
    if args.list_models:
        for name, entry in sorted(MODELS.items()):
            print(f"{name:16s} {entry.help}")
        return 0
    runlog.attach(load_config(args.config, overrides).run_dir, "train.py", argv)  # <run dir>/train.log
    with contextlib.ExitStack() as stack:  # releases the run directory's lock on any exit
        return _train(args, overrides, stack)


def print_config(cfg: Config) -> int:
    """--print-config: the resolved config as JSON, with the run directory's name as output.name."""
    resolved = config_to_dict(cfg)
    resolved["output"]["name"] = cfg.run_name
    print(json.dumps(resolved, indent=2))
    return 0


def _train(args, overrides, stack: contextlib.ExitStack) -> int:
    # setup: config, device, the run directory if it exists ---------------------------------------------
    cfg = load_config(args.config, overrides)
    apply_determinism(cfg.train.deterministic)  # before anything touches CUDA
    apply_tf32(cfg.train.tf32)
    dist, device_name = distributed.from_environment(cfg.train.device)  # torchrun: one process per rank
    stack.callback(dist.close)
    device = resolve_device(device_name)
    say = print if dist.leader else (lambda *a, **k: None)  # rank 0 alone logs and writes the run directory
    run_dir = cfg.run_dir
    last_path = run_dir / "last.pt"
    lock = None
    if dist.leader and (run_dir.exists() or run_dir.is_symlink()):
        lock = stack.enter_context(RunLock(run_dir))
        if args.restart:
            aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            lock.release()  # the lock file moved with the old run
            lock = None
            print(f"--restart: moved the previous run to {aside}")
    if dist.enabled and (is_classical(cfg.model) or uses_full_batches(cfg.model)):
        raise ConfigError(f"{cfg.model_name} with these options cannot train under torchrun: scikit-learn baselines "
                          f"and the batch-dependent compat options run in one process; use python train.py")
    if is_classical(cfg.model):  # a scikit-learn baseline: fitted by engine/classical.py (same run rules)
        from engine import classical

        return classical.train(cfg, run_dir, lock, stack)
    resume = read_resume(cfg, run_dir) if lock is not None else None
    if dist.share(resume is not None and resume["epoch"] >= cfg.train.epochs):
        return _already_finished(cfg, run_dir, resume) if dist.leader else 0

    # data and model (nothing is written until they are ready) -------------------------------------------
    seed_everything(cfg.train.seed)
    info, splits = load_data(cfg, device)
    check_split(info, "train", splits["train"], need_all_classes=False)
    check_split(info, "val", splits["val"], need_all_classes=True)  # model selection needs a defined AUC
    md5 = data_md5(cfg.data.name, root=cfg.data.root, size=cfg.data.size)
    model = model_from_config(cfg, info).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        executed = executed_parameter_count(copy.deepcopy(model), splits["train"].images[:1].float().to(device) / 255)
    say(f"{cfg.model_name} on {info.name} ({info.size_text}, {info.num_classes} classes, {info.task}); "
        f"train/val/test {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}; device {device}"
        f"{f'; torchrun: {dist.world_size} processes' if dist.enabled else ''}")
    if md5 is not None:
        say(f"data file {info.path} MD5 {md5} "
            f"({'as in medmnist.INFO' if md5 == info.md5 else f'NOT the released file, which has {info.md5}'})")
    say(f"parameters (executed path): {executed:,}")
    if executed != count_parameters(model):
        say(f"warning: {count_parameters(model) - executed:,} parameters of the model get no gradient in a "
            f"training step (they never change); training goes on")
    optimizer = make_optimizer(cfg, model.parameters())
    full_batches = uses_full_batches(cfg.model)  # the original's compat: every batch at the training batch size
    eval_batch = cfg.train.batch_size if full_batches else cfg.eval.batch_size
    if full_batches and len(splits["train"]) < cfg.train.batch_size:
        raise ConfigError(f"the compat options of this model run full batches only (as the original), but the "
                          f"training split has {len(splits['train'])} samples, fewer than train.batch_size = "
                          f"{cfg.train.batch_size}; lower the batch size")
    if dist.enabled:  # DDP trains; rank 0 evaluates alone with the unwrapped model (a DDP forward waits for all)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_forward, forward = compile_model(ddp, cfg.train.compile), model
    else:
        forward = train_forward = compile_model(model, cfg.train.compile)

    # the run directory: created and locked only now --------------------------------------------------------
    created = False
    if dist.leader and lock is None:
        created = not run_dir.exists()
        lock = stack.enter_context(RunLock(run_dir))
        resume = read_resume(cfg, run_dir)  # another process may have trained here meanwhile
    if dist.share(resume is not None and resume["epoch"] >= cfg.train.epochs):
        return _already_finished(cfg, run_dir, resume) if dist.leader else 0
    if dist.share(resume is not None) and not dist.leader:
        resume = read_resume(cfg, run_dir)  # the other ranks resume from the file rank 0 checked
    if dist.leader:
        stale = remove_stale_temporaries(run_dir)
        if stale:
            print(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")
        (run_dir / "train_summary.json").unlink(missing_ok=True)  # the run is not finished (any more)

    start_epoch, best_auc, best_epoch, rows, seconds_before = 0, -math.inf, -1, [], 0.0
    if resume is not None:
        load_weights(model, resume, last_path)
        optimizer.load_state_dict(resume["optimizer"])
        note = restore_rng_state(resume["rng"])
        if note:
            say(note)
        start_epoch, best_auc, best_epoch = resume["epoch"], resume["best_val_auc"], resume["best_epoch"]
        rows, seconds_before = metrics_rows_of(resume, run_dir), float(resume.get("train_seconds", 0.0))
        say(f"resuming {run_dir} after epoch {start_epoch} (best val AUC {best_auc:.4f} at epoch {best_epoch})")
    elif dist.leader:  # a new run: whatever an earlier attempt left before committing its first epoch is stale
        for name in ("metrics.csv", "best.pt"):
            (run_dir / name).unlink(missing_ok=True)
        prune_epoch_files(run_dir, 0, 0)
    resumed = resume is not None
    del resume

    def checkpoint(epoch: int, train_seconds: float) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_val_auc": best_auc, "best_epoch": best_epoch, "config": config_to_dict(cfg),
                "dataset": {"name": info.name, "size": info.size, "num_classes": info.num_classes,
                            "task": info.task, "md5": md5},
                "param_count": executed, "versions": package_versions(), "rng": rng_state(),
                "world_size": dist.world_size,
                "metrics": [dict(r) for r in rows], "train_seconds": train_seconds}

    # epoch loop: train -> validate -> save (best.pt, epoch file, then last.pt = the commit) -> records ------
    # last.pt holds the epoch's metrics row and the training time: metrics.csv and train_summary.json are
    # rewritten from it, so an interrupt anywhere loses nothing and a resume redoes at most one epoch.
    epoch = start_epoch
    board = stack.enter_context(contextlib.closing(
        TensorBoard(run_dir, cfg.output.tensorboard and dist.leader, start_epoch)))
    try:
        if dist.leader:
            atomic_write_json(config_to_dict(cfg), run_dir / "config.json")
            if resumed:  # metrics.csv as last.pt has it (a row a kill kept out of it comes back)
                sync_records(run_dir, checkpoint(start_epoch, seconds_before), finished=False)
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.time()
            lr = learning_rate(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            dist.reseed(cfg.train.seed, epoch)  # torchrun only: each rank's dropout/noise stream
            loss = train_one_epoch(model, optimizer, splits["train"], cfg, epoch, device, forward=train_forward,
                                   dist=dist)
            if not dist.leader:
                dist.barrier()  # rank 0 validates and commits the epoch
                continue
            scores = predict_scores(forward, splits["val"], batch_size=eval_batch, device=device,
                                    amp=cfg.train.amp, full_batches=full_batches)
            val_auc, val_acc = official_metrics(splits["val"].labels.cpu().numpy(), scores, info.task)
            seconds = time.time() - t0
            improved = val_auc > best_auc
            if improved:
                best_auc, best_epoch = val_auc, epoch + 1
            rows.append({"epoch": epoch + 1, "train_loss": f"{loss:.6f}", "val_auc": f"{val_auc:.6f}",
                         "val_acc": f"{val_acc:.6f}", "lr": f"{lr:.3g}", "time_s": f"{seconds:.2f}"})
            board.log(rows[-1])
            seconds_before += seconds
            state = checkpoint(epoch + 1, seconds_before)
            if improved:
                atomic_save(state, run_dir / "best.pt")
            if cfg.train.keep_last_k:
                atomic_save({k: state[k] for k in ("model", "epoch", "config", "dataset", "versions")},
                            run_dir / f"epoch_{epoch + 1:04d}.pt")
            atomic_save(state, last_path)  # the commit point of the epoch
            prune_epoch_files(run_dir, epoch + 1, cfg.train.keep_last_k)
            sync_records(run_dir, state, finished=epoch + 1 == cfg.train.epochs)
            print(f"epoch {epoch + 1:3d}/{cfg.train.epochs}  loss {loss:.4f}  val AUC {val_auc:.4f}  "
                  f"val ACC {val_acc:.4f}  {seconds:.1f}s{'  *best*' if improved else ''}", flush=True)
            dist.barrier()
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted (Ctrl-C)"
        print(f"\n{what} in epoch {epoch + 1}; that epoch is abandoned. {_committed(last_path)} "
              f"Rerun the same command to resume.", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except NonFiniteLoss as err:
        print(f"error: {err}. Stopped; {_committed(last_path)} Try a lower --train.lr "
              f"or --train.grad_clip 1.0.", file=sys.stderr)
        return 3
    except RunDirError as err:
        committed = _committed(last_path)
        if created and not last_path.exists():  # this call made the folder and no epoch got in: leave nothing
            lock.release()
            _discard_empty_run(run_dir)
        raise RunDirError(f"{err}. Stopped in epoch {epoch + 1}; {committed} "
                          f"Free space or fix the folder, then rerun the same command.") from None

    if not dist.leader:
        return 0
    print(f"done: best val AUC {best_auc:.4f} at epoch {best_epoch}; checkpoints in {run_dir}")
    write_curves(cfg, run_dir)
    return 0


def write_curves(cfg: Config, run_dir: Path) -> None:
    """curves.png of the finished run (output.plots); a note, not an error, without matplotlib."""
    if not cfg.output.plots:
        return
    try:
        print(f"wrote {plot_curves(run_dir)}")
    except MissingDependency as err:
        print(f"note: no curves.png: {err}")


def _discard_empty_run(run_dir: Path) -> None:
    """Remove a run directory this call created when it holds nothing but its own start-up files."""
    own = {".lock", "config.json", "metrics.csv", "best.pt", runlog.LOG_NAME}
    try:
        for p in run_dir.iterdir():
            if p.name in own or (p.name.startswith(".") and p.name.endswith(".tmp")):
                p.unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError:
        pass  # best effort: a folder we cannot clean up is left as it is


def _committed(last_path: Path) -> str:
    return (f"{last_path} holds the last finished epoch." if last_path.exists()
            else "No epoch had finished; nothing to resume from.")


def _already_finished(cfg: Config, run_dir: Path, resume: dict) -> int:
    # finish what a kill after the last commit left undone: the records, and the epoch files beyond the
    # k the run was trained with
    prune_epoch_files(run_dir, resume["epoch"], int(resume["config"].get("train", {}).get("keep_last_k", 0)))
    stale = remove_stale_temporaries(run_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")
    fixed = sync_records(run_dir, resume, finished=True)
    if fixed:
        print(f"rebuilt {', '.join(fixed)} of {run_dir} from last.pt (an interrupted write had left it behind)")
    print(f"{run_dir} already finished {resume['epoch']} epochs (train.epochs = {cfg.train.epochs}); "
          f"nothing to do. Use --restart to train it again; to continue it, add --output.name {run_dir.name} "
          f"--train.epochs N (another --train.epochs makes another default run name).")
    return 0


if __name__ == "__main__":
    run_cli(main)
