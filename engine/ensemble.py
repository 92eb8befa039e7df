"""The seeds of one config trained together in one process (`train.seeds`): S members, one batched model.

Each member is what `train.py --train.seed s --output.name <name>-seed<s>` alone would train: its own
initialisation (the model is built after `seed_everything(s)`), data order (the shuffle of seed s), optimizer
state, gradient clipping, validation, checkpoints and records, in its own run directory `<name>-seed<s>`
(config.json says train.seed = s, output.name = <name>-seed<s>, train.seeds = null), so predict.py,
--last-k, tools/aggregate.py and a rerun of the single command treat it as that single run.

How: the members' parameters are stacked along a new leading axis (`torch.func.stack_module_state`) and one
forward runs all of them on their own batches, (S, B, ...) -> (S, B, K), with `torch.func.vmap` over
`functional_call` (chosen by measurement over a member axis written into the modules: see the README). The
loss is the sum of the members' mean losses, so each member's gradient is its own; Adam, AdamW and SGD act
elementwise, so one optimizer over the stacked parameters is S independent optimizers; gradient clipping
uses each member's own norm. Dropout and noise draw with `randomness="different"`: every member gets its own
draws, but not the draws its single run would take. So with dropout 0 and noise `none` a member's weights
equal its single run's (to float rounding; tests/test_ensemble.py); otherwise the same command gives the
same weights.

An epoch is committed for all members together: every member's best.pt and epoch file, then every member's
next last.pt as a pending file, then the pending files renamed over last.pt. A kill inside the renames is
completed on resume (`settle_pending`), so all members resume from the same epoch and the RNG state of that
epoch, exactly as an uninterrupted run. A member whose loss becomes non-finite stops alone: its folder keeps
its last committed epoch and gets `diverged.json`; the others go on (exit code 3 at the end, as a single
run's). Rerunning the command resumes it from its last.pt, like a single run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
import time

import torch
from torch.func import functional_call, stack_module_state, vmap

from data import batches, check_split, data_md5
from engine.checkpoint import load_weights
from engine.config import Config, ConfigError, config_to_dict, load_config
from engine.distributed import Distributed
from engine.evaluate import official_metrics, predict_scores, task_loss, uses_full_batches
from engine.rundir import (CONFIG_JSON, FAULTS, RunDirError, RunDirectory, atomic_save, atomic_write_json,
                           checkpoint_epoch, interrupt_of)
from engine.saver import CheckpointSaver, complete_finished_run, is_finished, read_resume
from engine.setup import load_data, model_from_config, restore_rng_state, seed_everything
from engine.training import Job, learning_rate, make_optimizer, write_curves
from model import executed_parameter_count
from model.classical import is_classical

DIVERGED = "diverged.json"   # a member that stopped on a non-finite loss (removed when it resumes)
PENDING = ".last.pt.pending.tmp"  # a member's next last.pt, written before any member's last.pt is replaced

SUPPORTED = {"lmttm", "ttm"}
WHY_NOT = {  # models train.seeds refuses, and why (a prefix of the registered name)
    "resnet": "its BatchNorm layers keep running statistics, a buffer every forward updates in place, which the "
              "batched members cannot share",
    "medmamba": "its BatchNorm layers keep running statistics, and its selective scan is a custom "
                "torch.autograd.Function without a vmap batching rule",
    "vit_mam": "it is not checked against single runs with train.seeds yet",
    "logreg": "it is a scikit-learn baseline fitted in one pass, not trained by gradient steps",
    "hgb": "it is a scikit-learn baseline fitted in one pass, not trained by gradient steps",
}


def check_supported(cfg: Config, dist: Distributed) -> list[int]:
    """The seeds of `train.seeds`, or a ConfigError naming what cannot train as an ensemble and why."""
    seeds = list(cfg.train.seeds or [])
    name = cfg.model_name
    if name not in SUPPORTED or is_classical(cfg.model):
        why = next((text for prefix, text in WHY_NOT.items() if name.startswith(prefix)),
                   "it is not one of the models checked with train.seeds")
        raise ConfigError(f"train.seeds cannot train model {name}: {why}. Supported: {', '.join(sorted(SUPPORTED))}; "
                          f"train the seeds of {name} as separate runs (--train.seed S)")
    if getattr(cfg.model, "stem", "3d") == "3dBN":
        raise ConfigError("train.seeds cannot train the 3dBN stem: its BatchNorm running statistics are updated in "
                          "place by every forward, which the batched members cannot share; use --model.stem 3d or "
                          "separate runs")
    if uses_full_batches(cfg.model) or getattr(cfg.model, "compat_carry_memory", False):
        raise ConfigError("train.seeds cannot train with the batch-dependent compat options (compat_batch_attention, "
                          "compat_carry_memory, compat_global_pointer): they keep state on the module between calls; "
                          "train these seeds as separate runs")
    if dist.enabled:
        raise ConfigError("train.seeds runs in one process; use python train.py, not torchrun")
    if cfg.train.compile != "none":
        raise ConfigError("train.seeds does not support train.compile; use --train.compile none")
    if not seeds or len(set(seeds)) != len(seeds) or any(not 0 <= s <= 2**32 - 1 for s in seeds):
        raise ConfigError(f"train.seeds = {cfg.train.seeds} must be a non-empty list of distinct seeds in "
                          f"[0, 2**32 - 1]")
    return seeds


def member_config(cfg: Config, seed: int) -> Config:
    """The config of the single run a member is: train.seed = seed, no train.seeds, and the run directory
    `--train.seed s` alone would use: with output.name N, N-seed<s> (a sweep's run names); without, the default
    name of the same command with --train.seed s instead of --train.seeds (engine/runname.py)."""
    train = dataclasses.replace(cfg.train, seed=seed, seeds=None)
    if cfg.output.name or not cfg.source:
        name = f"{cfg.run_name}-seed{seed}"
    else:
        given = {section: dict(values) for section, values in cfg.overrides.items()}
        given.setdefault("train", {}).pop("seeds", None)
        given["train"]["seed"] = seed
        name = load_config(cfg.source, given).run_name
    return dataclasses.replace(cfg, train=train, output=dataclasses.replace(cfg.output, name=name))


def member_run_dirs(cfg: Config) -> list:
    """The run directories of the members of `cfg.train.seeds` (that of each single run)."""
    return [member_config(cfg, seed).run_dir for seed in cfg.train.seeds]


def shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of a (seed, epoch): the same formula as a single run's (train.train_one_epoch)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@dataclasses.dataclass(eq=False)  # compared by identity
class Member:
    seed: int
    cfg: Config
    run: RunDirectory
    resume: dict | None = None
    job: object = None        # engine.training.Job of this member (its own model and optimizer, synced from the stack)
    saver: CheckpointSaver | None = None
    loss: float = math.nan
    stopped: str = ""         # why it stopped (non-finite loss), "" while it trains


# ----------------------------------------------------------------------------------------------------------
# the stacked model
# ----------------------------------------------------------------------------------------------------------

class Stack:
    """The parameters of some members stacked on axis 0, their optimizer, and the batched forward."""

    def __init__(self, members: list[Member], cfg: Config):

        models = [m.job.model for m in members]
        self.members = members
        params, self.buffers = stack_module_state(models)
        self.names = list(params)
        self.params = params
        self.optimizer = make_optimizer(cfg, list(params.values()))
        self._load_optimizer_state()  # the members' optimizer states (after a resume)
        self.base = copy.deepcopy(models[0]).to("meta")
        self.base.train()
        self.forward = vmap(self._one, randomness="different")

    def _one(self, params, buffers, x):
        return functional_call(self.base, (params, buffers), (x,))

    def _load_optimizer_state(self) -> None:
        """Stack the members' optimizer states (empty for a new run) into the stack's optimizer."""
        states = [m.job.optimizer.state for m in self.members]
        member_params = [list(m.job.model.parameters()) for m in self.members]
        for i, name in enumerate(self.names):
            per = [states[j].get(member_params[j][i]) for j in range(len(self.members))]
            if any(s is None for s in per):
                continue
            stacked = {}
            for key, value in per[0].items():
                if isinstance(value, torch.Tensor) and value.dim() == self.params[name].dim() - 1:
                    stacked[key] = torch.stack([s[key] for s in per])
                else:
                    stacked[key] = value.clone() if isinstance(value, torch.Tensor) else value
            self.optimizer.state[self.params[name]] = stacked

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def clip(self, max_norm: float) -> None:
        """Per-member gradient clipping: torch.nn.utils.clip_grad_norm_ on each member's own gradients."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)  # (S,)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def sync_members(self) -> None:
        """Copy each member's slice of the parameters and optimizer state into its own model and optimizer
        (what its checkpoints and its validation use)."""
        for j, m in enumerate(self.members):
            mine = list(m.job.model.parameters())
            for i, name in enumerate(self.names):
                stacked = self.params[name]
                mine[i].copy_(stacked[j])
                state = self.optimizer.state.get(stacked)
                if state is None:
                    continue
                m.job.optimizer.state[mine[i]] = {
                    k: (v[j].clone() if isinstance(v, torch.Tensor) and v.dim() == stacked.dim() else
                        v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
            for group in m.job.optimizer.param_groups:
                group["lr"] = self.optimizer.param_groups[0]["lr"]


def member_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each member's mean training loss (S,) of logits (S, B, K) and targets (S, B[, L])."""
    return torch.stack([task_loss(logits[j].float(), y[j]) for j in range(len(logits))])


def train_epoch(stack: Stack, split, cfg: Config, epoch: int, device, check_every: int = 25) -> Stack | None:
    """One epoch of every member of the stack on its own shuffled batches; sets each member's mean loss. A member
    whose loss sum is non-finite at a check (every `check_every` steps and at the end) is marked stopped and
    dropped from the stack, and the others finish the epoch. Returns the stack of the members still training
    (None when none is left)."""
    members = list(stack.members)
    orders = {m.seed: iter(batches(split, cfg.train.batch_size, shuffle=True, device=device,
                                   generator=shuffle_generator(m.seed, epoch))) for m in members}
    total = {m.seed: torch.zeros((), device=device) for m in members}
    seen, steps = 0, -(-len(split) // cfg.train.batch_size)
    amp = cfg.train.amp and device.type == "cuda"

    def check(step: int) -> Stack | None:
        bad = [m for m in stack.members if not math.isfinite(total[m.seed].item() / seen)]
        for m in bad:
            m.stopped = f"the training loss became {total[m.seed].item() / seen} in epoch {epoch + 1} (by step {step})"
        if not bad:
            return stack
        stack.sync_members()
        alive = [m for m in stack.members if not m.stopped]
        return Stack(alive, cfg) if alive else None

    for step in range(1, steps + 1):
        pairs = [next(orders[m.seed]) for m in stack.members]
        x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])  # (S, B, ...), (S, B)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp):
            losses = member_losses(stack.forward(stack.params, stack.buffers, x), y)
        stack.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        if cfg.train.grad_clip > 0:
            stack.clip(cfg.train.grad_clip)
        stack.optimizer.step()
        for m, loss in zip(stack.members, losses.detach().unbind()):
            total[m.seed] += loss * y.size(1)
        seen += y.size(1)
        if step % check_every == 0 or step == steps:
            stack = check(step)
            if stack is None:
                return None
    for m in stack.members:
        m.loss = total[m.seed].item() / seen
    stack.sync_members()
    return stack


# ----------------------------------------------------------------------------------------------------------
# the run directories of the members
# ----------------------------------------------------------------------------------------------------------

def settle_pending(members: list[Member]) -> None:
    """Finish or undo an epoch commit a kill interrupted: when some member's last.pt already holds the epoch of
    the pending files, the renames had started and the others' pending files are renamed over their last.pt
    (all pending files were complete by then); otherwise the pending files are removed (the epoch is redone)."""
    epochs = [checkpoint_epoch(m.run.last) or 0 for m in members if m.run.locked and m.run.last.exists()]
    top = max(epochs, default=0)
    for m in members:
        pending = m.run.path / PENDING
        if not (m.run.locked and pending.exists()):
            continue
        epoch = checkpoint_epoch(pending)
        if epoch is not None and epoch == top and (checkpoint_epoch(m.run.last) or 0) < epoch:
            os.replace(pending, m.run.last)
            print(f"{m.run.path}: completed the commit of epoch {epoch} that a kill interrupted")
        else:
            pending.unlink()


def open_members(cfg: Config, seeds: list[int], restart: bool, exits: contextlib.ExitStack) -> list[Member]:
    """Lock the members' existing run directories (moved aside with --restart), settle an interrupted commit,
    and read each one's last.pt."""
    members = []
    for seed in seeds:
        mcfg = member_config(cfg, seed)
        run = exits.enter_context(RunDirectory(mcfg.run_dir))
        run.open_existing(restart=restart)
        members.append(Member(seed, mcfg, run))
    settle_pending(members)
    for m in members:
        m.resume = read_resume(m.cfg, m.run) if m.run.locked else None
    return members


def prepare_members(cfg: Config, members: list[Member], device: torch.device) -> None:
    """Load the data once; build each member's model (after seed_everything(its seed), as its single run
    does) and optimizer, as a engine.training.Job."""

    info, splits = load_data(cfg, device)
    check_split(info, "train", splits["train"], need_all_classes=False)
    check_split(info, "val", splits["val"], need_all_classes=True)
    md5 = data_md5(cfg.data.name, root=cfg.data.root, size=cfg.data.size)
    executed = None
    for m in members:
        seed_everything(m.seed)
        model = model_from_config(m.cfg, info).to(device)
        if executed is None:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                executed = executed_parameter_count(copy.deepcopy(model),
                                                    splits["train"].images[:1].float().to(device) / 255)
        m.job = Job(info, splits, md5, model, make_optimizer(m.cfg, model.parameters()), executed, device, model,
                    model, cfg.eval.batch_size, False)
    print(f"{cfg.model_name} on {info.name} ({info.size_text}, {info.num_classes} classes, {info.task}); "
          f"train/val/test {len(splits['train'])}/{len(splits['val'])}/{len(splits['test'])}; device {device}; "
          f"{len(members)} seeds in one process ({', '.join(str(m.seed) for m in members)}); "
          f"parameters (executed path) {executed:,} each")


def start_members(members: list[Member]) -> None:
    """Create and lock the new folders, read last.pt again, and resume each member (or clear what an
    uncommitted first epoch left)."""
    for m in members:
        m.run.open()
    settle_pending(members)
    for m in members:
        m.resume = read_resume(m.cfg, m.run)
        m.run.begin()
        (m.run.path / DIVERGED).unlink(missing_ok=True)
        if m.resume is not None:
            load_weights(m.job.model, m.resume, m.run.last)
            m.job.optimizer.load_state_dict(m.resume["optimizer"])
            print(f"resuming {m.run.path} after epoch {m.resume['epoch']}")
        m.saver = CheckpointSaver(m.run.path, m.cfg.train.keep_last_k, m.resume)
        if m.resume is None:
            m.saver.discard_uncommitted()
        atomic_write_json(config_to_dict(m.cfg), m.run.path / CONFIG_JSON)
        m.saver.sync_resumed()


def restore_rng(cfg: Config, members: list[Member]) -> None:
    """The RNG of the first epoch to train: the one its members' last.pt saved, or seeded from the first seed."""
    first = min(m.saver.epoch for m in members)
    saved = next((m.resume["rng"] for m in members if m.saver.epoch == first and m.resume), None)
    if saved is None:
        seed_everything(members[0].seed)
    else:
        note = restore_rng_state(saved)
        if note:
            print(note)


def commit(members: list[Member], results: dict, epochs: int) -> None:
    """Commit one epoch of these members together: best.pt and epoch files, every pending last.pt, then the
    renames over last.pt (`settle_pending` completes them after a kill), then the records."""
    staged = []
    for m in members:
        state, row, val_auc, seconds = results[m.seed]
        staged.append(m.saver.stage(state, row, val_auc, seconds))
    for m, (state, _) in zip(members, staged):
        atomic_save(state, m.run.path / PENDING)
    for m in members:
        os.replace(m.run.path / PENDING, m.run.last)  # the commit point of the member's epoch
        FAULTS.point(m.run.last, "replaced")
    for m, (state, improved) in zip(members, staged):
        m.saver.finish(state, final=state["epoch"] == epochs)
        row = state["metrics"][-1]
        print(f"seed {m.seed}: epoch {row['epoch']:3d}/{epochs}  loss {float(row['train_loss']):.4f}  "
              f"val AUC {float(row['val_auc']):.4f}  val ACC {float(row['val_acc']):.4f}  "
              f"{float(row['time_s']):.1f}s{'  *best*' if improved else ''}", flush=True)


def mark_diverged(m: Member, epoch: int) -> None:
    atomic_write_json({"seed": m.seed, "epoch": epoch + 1, "error": m.stopped,
                       "committed_epoch": m.saver.epoch, "resume": "rerun the same command to resume it"},
                      m.run.path / DIVERGED)
    print(f"error: seed {m.seed}: {m.stopped}. This member stopped; {m.run.committed_note()} The other seeds go "
          f"on. Try a lower --train.lr or --train.grad_clip 1.0.", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------

def train(cfg: Config, restart: bool, dist: Distributed, device: torch.device, exits: contextlib.ExitStack) -> int:
    """train.py with train.seeds: every member's epochs, committed together; the exit code (3 when a member
    stopped on a non-finite loss, 130 / 143 on Ctrl-C / SIGTERM)."""
    seeds = check_supported(cfg, dist)
    members = open_members(cfg, seeds, restart, exits)
    todo = []
    for m in members:
        if is_finished(m.cfg, m.resume):
            complete_finished_run(m.cfg, m.run, m.resume)
        else:
            todo.append(m)
    if not todo:
        return 0
    prepare_members(cfg, todo, device)
    start_members(todo)
    todo = [m for m in todo if not is_finished(m.cfg, m.resume)]  # another process may have finished one
    if todo:
        restore_rng(cfg, todo)
    try:
        run_epochs(cfg, todo, device)
    except KeyboardInterrupt as err:
        what, code = interrupt_of(err)
        print(f"\n{what}; the epoch in progress is abandoned by every seed. Each seed's last.pt holds its last "
              f"finished epoch. Rerun the same command to resume.", file=sys.stderr)
        return code
    except RunDirError as err:
        for m in todo:
            m.run.discard_if_empty()
        raise RunDirError(f"{err}. Stopped; each seed's last.pt holds its last finished epoch. Free space or fix "
                          f"the folder, then rerun the same command.") from None

    for m in todo:
        if not m.stopped:
            print(f"seed {m.seed}: best val AUC {m.saver.best_auc:.4f} at epoch {m.saver.best_epoch}; {m.run.path}")
            write_curves(m.cfg, m.run.path)
    stopped = [m for m in todo if m.stopped]
    if stopped:
        print(f"error: {len(stopped)} of {len(members)} seeds stopped on a non-finite loss "
              f"({', '.join(str(m.run.path) for m in stopped)}; see {DIVERGED} there)", file=sys.stderr)
    return 3 if stopped else 0


def run_epochs(cfg: Config, members: list[Member], device: torch.device) -> None:
    """Train -> validate -> commit, epoch after epoch; a member joins the stack at the epoch it resumes from."""

    stack = None
    first = min((m.saver.epoch for m in members), default=cfg.train.epochs)
    for epoch in range(first, cfg.train.epochs):
        active = [m for m in members if not m.stopped and m.saver.epoch == epoch]
        if not active:
            continue
        if stack is None or stack.members != active:
            if stack is not None:
                stack.sync_members()
            stack = Stack(active, cfg)
        t0 = time.time()
        lr = learning_rate(cfg, epoch)
        stack.set_lr(lr)
        stack = train_epoch(stack, active[0].job.splits["train"], cfg, epoch, device)
        for m in active:
            if m.stopped:
                mark_diverged(m, epoch)
        done = stack.members if stack is not None else []
        results = {}
        for m in done:
            job = m.job
            scores = predict_scores(job.model, job.splits["val"], batch_size=job.eval_batch, device=device,
                                    amp=cfg.train.amp)
            val_auc, val_acc = official_metrics(job.splits["val"].labels.cpu().numpy(), scores, job.info.task)
            results[m.seed] = (val_auc, val_acc)
        seconds = time.time() - t0
        for m in done:
            val_auc, val_acc = results[m.seed]
            row = {"epoch": epoch + 1, "train_loss": f"{m.loss:.6f}", "val_auc": f"{val_auc:.6f}",
                   "val_acc": f"{val_acc:.6f}", "lr": f"{lr:.3g}", "time_s": f"{seconds:.2f}"}
            results[m.seed] = (m.job.state(m.cfg, Distributed.single()), row, val_auc, seconds)
        commit(done, results, cfg.train.epochs)
