"""Train a model (LMTTM by default) on a MedMNIST 3D dataset.

    python train.py base.json                                   # paper defaults on config/base.json's dataset
    python train.py adrenalmnist3d --train.epochs 50 --model.dim 64 --model.memory_tokens 64
    python train.py demo.json                                   # offline synthetic demo, about a minute on a CPU
    torchrun --nproc_per_node 4 train.py base.json              # DistributedDataParallel (engine/distributed.py)
    python train.py base.json --train.seeds [0,1,2]             # 3 seeds as one batched model (engine/ensemble.py)

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
import json
import math
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import batches, check_split, data_md5
from engine.checkpoint import load_weights
from engine.config import Config, ConfigError, config_to_dict, describe_config, load_config
from engine import distributed, ensemble, runlog
from engine.distributed import Distributed
from engine.evaluate import official_metrics, predict_scores, task_loss, uses_full_batches
from engine.plots import TensorBoard
from engine.rundir import CONFIG_JSON, RunDirError, RunDirectory, atomic_write_json, interrupt_of
from engine.saver import CheckpointSaver, complete_finished_run, is_finished, read_resume
from engine.training import Job, learning_rate, make_optimizer, write_curves
from engine.setup import (apply_determinism, apply_tf32, compile_model, load_data, model_from_config, resolve_device,
                          restore_rng_state, run_cli, seed_everything)
from model import MODELS, count_parameters, executed_parameter_count
from model.classical import is_classical


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# pieces of the loop
# ----------------------------------------------------------------------------------------------------------

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
    shuffle = ensemble.shuffle_generator(cfg.train.seed, epoch)  # same order on resume
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
    cfg = load_config(args.config, overrides)
    runlog.attach(ensemble.member_run_dirs(cfg) if cfg.train.seeds is not None else cfg.run_dir, "train.py",
                  argv)  # <run dir>/train.log (of every member with train.seeds)
    with contextlib.ExitStack() as stack:  # releases the run directory's lock on any exit
        return _train(args, overrides, stack)


def print_config(cfg: Config) -> int:
    """--print-config: the resolved config as JSON, with the run directory's name as output.name."""
    resolved = config_to_dict(cfg)
    resolved["output"]["name"] = cfg.run_name
    print(json.dumps(resolved, indent=2))
    return 0


def _train(args, overrides, stack: contextlib.ExitStack) -> int:
    # setup: config, device, the run directory if it exists, then data and model (nothing written yet) -----
    cfg = load_config(args.config, overrides)
    apply_determinism(cfg.train.deterministic)  # before anything touches CUDA
    apply_tf32(cfg.train.tf32)
    dist, device_name = distributed.from_environment(cfg.train.device, cfg.train.dist_timeout_min)  # torchrun
    stack.push(dist)  # Distributed.__exit__: the process group is torn down after a clean end
    device = resolve_device(device_name)
    if cfg.train.seeds is not None:  # the seeds of one config trained together (engine/ensemble.py)
        return ensemble.train(cfg, args.restart, dist, device, stack)
    if dist.enabled and (is_classical(cfg.model) or uses_full_batches(cfg.model)):
        raise ConfigError(f"{cfg.model_name} with these options cannot train under torchrun: scikit-learn baselines "
                          f"and the batch-dependent compat options run in one process; use python train.py")
    if is_classical(cfg.model):  # a scikit-learn baseline: fitted by engine/classical.py (same run rules)
        from engine import classical

        return classical.train(cfg, restart=args.restart)
    run = stack.enter_context(RunDirectory(cfg.run_dir, leader=dist.leader))  # rank 0 alone writes it
    run.open_existing(restart=args.restart)
    resume = read_resume(cfg, run) if run.locked else None
    if dist.share(is_finished(cfg, resume)):
        return complete_finished_run(cfg, run, resume) if dist.leader else 0
    job = prepare_job(cfg, dist, device)
    if dist.leader and not run.locked:  # the run directory: created and locked only now
        run.open()
        resume = read_resume(cfg, run)  # another process may have trained here meanwhile
    if dist.share(is_finished(cfg, resume)):
        return complete_finished_run(cfg, run, resume) if dist.leader else 0
    if dist.share(resume is not None) and not dist.leader:
        resume = read_resume(cfg, run)  # the other ranks resume from the file rank 0 checked
    saver = start_run(cfg, run, job, resume, dist)
    del resume

    # the epoch loop, then the end of the run ----------------------------------------------------------------
    code = run_epochs(cfg, run, job, saver, dist, stack)
    if code or not dist.leader:
        return code
    print(f"done: best val AUC {saver.best_auc:.4f} at epoch {saver.best_epoch}; checkpoints in {run.path}")
    write_curves(cfg, run.path)
    return 0


def prepare_job(cfg: Config, dist: Distributed, device: torch.device) -> Job:
    """Load the data and build the model and optimizer (nothing is written)."""
    say = print if dist.leader else (lambda *a, **k: None)  # rank 0 alone logs
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
    if full_batches and len(splits["train"]) < cfg.train.batch_size:
        raise ConfigError(f"the compat options of this model run full batches only (as the original), but the "
                          f"training split has {len(splits['train'])} samples, fewer than train.batch_size = "
                          f"{cfg.train.batch_size}; lower the batch size")
    if dist.enabled:  # DDP trains; rank 0 evaluates alone with the unwrapped model (a DDP forward waits for all)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_forward, forward = compile_model(ddp, cfg.train.compile), model
    else:
        forward = train_forward = compile_model(model, cfg.train.compile)
    return Job(info, splits, md5, model, optimizer, executed, device, forward, train_forward,
               cfg.train.batch_size if full_batches else cfg.eval.batch_size, full_batches)


def start_run(cfg: Config, run: RunDirectory, job: Job, resume: dict | None, dist: Distributed) -> CheckpointSaver:
    """Resume the job from last.pt, or clear what an uncommitted first epoch left; the run's saver."""
    run.begin()
    if resume is not None:
        load_weights(job.model, resume, run.last)
        job.optimizer.load_state_dict(resume["optimizer"])
        note = restore_rng_state(resume["rng"])
        if note and dist.leader:
            print(note)
        if dist.leader:
            print(f"resuming {run.path} after epoch {resume['epoch']} (best val AUC {resume['best_val_auc']:.4f} "
                  f"at epoch {resume['best_epoch']})")
    saver = CheckpointSaver(run.path, cfg.train.keep_last_k, resume)
    if resume is None and dist.leader:
        saver.discard_uncommitted()
    return saver


def run_epochs(cfg: Config, run: RunDirectory, job: Job, saver: CheckpointSaver, dist: Distributed,
               stack: contextlib.ExitStack) -> int:
    """train -> validate -> save (best.pt, epoch file, then last.pt = the commit) -> records, epoch after epoch;
    the exit code. last.pt holds the epoch's metrics row and the training time: metrics.csv and
    train_summary.json are rewritten from it, so an interrupt anywhere loses nothing and a resume redoes at most
    one epoch."""
    epoch = saver.epoch
    board = stack.enter_context(contextlib.closing(
        TensorBoard(run.path, cfg.output.tensorboard and dist.leader, saver.epoch)))
    try:
        if dist.leader:
            atomic_write_json(config_to_dict(cfg), run.path / CONFIG_JSON)
            saver.sync_resumed()
        for epoch in range(saver.epoch, cfg.train.epochs):
            t0 = time.time()
            lr = learning_rate(cfg, epoch)
            for group in job.optimizer.param_groups:
                group["lr"] = lr
            dist.reseed(cfg.train.seed, epoch)  # torchrun only: each rank's dropout/noise stream
            loss = train_one_epoch(job.model, job.optimizer, job.splits["train"], cfg, epoch, job.device,
                                   forward=job.train_forward, dist=dist)
            if not dist.leader:
                dist.barrier()  # rank 0 validates and commits the epoch
                continue
            scores = predict_scores(job.forward, job.splits["val"], batch_size=job.eval_batch, device=job.device,
                                    amp=cfg.train.amp, full_batches=job.full_batches)
            val_auc, val_acc = official_metrics(job.splits["val"].labels.cpu().numpy(), scores, job.info.task)
            seconds = time.time() - t0
            row = {"epoch": epoch + 1, "train_loss": f"{loss:.6f}", "val_auc": f"{val_auc:.6f}",
                   "val_acc": f"{val_acc:.6f}", "lr": f"{lr:.3g}", "time_s": f"{seconds:.2f}"}
            board.log(row)
            improved = saver.save(job.state(cfg, dist), row, val_auc, seconds, final=epoch + 1 == cfg.train.epochs)
            print(f"epoch {epoch + 1:3d}/{cfg.train.epochs}  loss {loss:.4f}  val AUC {val_auc:.4f}  "
                  f"val ACC {val_acc:.4f}  {seconds:.1f}s{'  *best*' if improved else ''}", flush=True)
            dist.barrier()
    except KeyboardInterrupt as err:
        what, code = interrupt_of(err)
        print(f"\n{what} in epoch {epoch + 1}; that epoch is abandoned. {run.committed_note()} "
              f"Rerun the same command to resume.", file=sys.stderr)
        return code
    except NonFiniteLoss as err:
        print(f"error: {err}. Stopped; {run.committed_note()} Try a lower --train.lr "
              f"or --train.grad_clip 1.0.", file=sys.stderr)
        return 3
    except RunDirError as err:
        committed = run.committed_note()
        board.close()
        run.discard_if_empty()  # this call made the folder and no epoch got in: leave nothing
        raise RunDirError(f"{err}. Stopped in epoch {epoch + 1}; {committed} "
                          f"Free space or fix the folder, then rerun the same command.") from None
    return 0


if __name__ == "__main__":
    run_cli(main)
