"""The save policy of a deep-model run and the records rebuilt from its last.pt.

`CheckpointSaver` is the one writer of a run's checkpoints: after each validated epoch `save` writes best.pt
(when the validation AUC improved), the epoch's `epoch_NNNN.pt` (train.keep_last_k > 0), then last.pt, the
commit point of the epoch, and only then prunes the epoch files and rewrites metrics.csv (and, after the last
epoch, train_summary.json) from what last.pt holds. last.pt carries the metrics rows and the training time, so
a kill anywhere loses nothing: a rerun resumes from last.pt (redoing at most one epoch, exactly) and rebuilds
the records from it.

best.pt is written before the last.pt that commits it, so a kill between the two leaves a best.pt of an epoch
that is not committed (it is redone on resume). Readers score only committed checkpoints: `committed_best`
checks that best.pt holds the epoch last.pt records as the best one.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import Config, config_from_dict, config_to_dict
from engine.rundir import (BEST, LAST, METRICS_CSV, TRAIN_SUMMARY, RunDirectory, atomic_save, atomic_write_json,
                           atomic_write_text, checkpoint_epoch, epoch_file_name, epoch_of_file, json_safe)

METRICS_HEADER = ["epoch", "train_loss", "val_auc", "val_acc", "lr", "time_s"]
# keys that may differ between a run and its resumption (everything else must match the checkpoint)
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "device"), ("train", "keep_last_k"), ("data", "root"),
                     ("data", "download"), ("data", "device_cache"), ("eval", "batch_size"), ("eval", "split"),
                     ("eval", "last_k"), ("eval", "ci_resamples"), ("eval", "ci_level"), ("train", "compile"),
                     ("train", "tf32"), ("train", "dist_timeout_min")}
EPOCH_FILE_KEYS = ("model", "epoch", "config", "dataset", "versions")  # what an epoch_NNNN.pt keeps


# ----------------------------------------------------------------------------------------------------------
# resuming
# ----------------------------------------------------------------------------------------------------------

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


def read_resume(cfg: Config, run: RunDirectory) -> dict | None:
    """last.pt of the run directory, checked against the config; None for a new run (refused when the folder
    holds records of committed epochs without their last.pt)."""
    if not run.last.exists():
        run.refuse_orphaned_records()
        return None
    resume = load_checkpoint(run.last)
    check_resumable(cfg, resume, run.last)
    return resume


def is_finished(cfg: Config, resume: dict | None) -> bool:
    return resume is not None and resume["epoch"] >= cfg.train.epochs


def complete_finished_run(cfg: Config, run: RunDirectory, resume: dict) -> int:
    """A run that trained all its epochs: finish what a kill after the last commit left undone (the records,
    the epoch files beyond the k it was trained with, temporaries) and say so; exit code 0."""
    prune_epoch_files(run.path, resume["epoch"], int(resume["config"].get("train", {}).get("keep_last_k", 0)))
    run.remove_stale_temporaries()
    fixed = sync_records(run.path, resume, finished=True)
    if fixed:
        print(f"rebuilt {', '.join(fixed)} of {run.path} from {LAST} (an interrupted write had left it behind)")
    print(f"{run.path} already finished {resume['epoch']} epochs (train.epochs = {cfg.train.epochs}); "
          f"nothing to do. Use --restart to train it again; to continue it, add --output.name "
          f"{run.path.name} --train.epochs N (another --train.epochs makes another default run name).")
    return 0


# ----------------------------------------------------------------------------------------------------------
# the records rebuilt from last.pt
# ----------------------------------------------------------------------------------------------------------

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
    path = run_dir / METRICS_CSV
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
    metrics, text = run_dir / METRICS_CSV, metrics_csv_text(metrics_rows_of(ckpt, run_dir))
    if "metrics" in ckpt and (not metrics.is_file() or metrics.read_text() != text):
        atomic_write_text(text, metrics)
        fixed.append(METRICS_CSV)
    if finished:
        try:
            current = json.loads((run_dir / TRAIN_SUMMARY).read_text())
        except (OSError, ValueError):
            current = None
        if current != summary_of(ckpt):
            atomic_write_json(summary_of(ckpt), run_dir / TRAIN_SUMMARY)
            fixed.append(TRAIN_SUMMARY)
    return fixed


def prune_epoch_files(run_dir: Path, epoch: int, keep: int) -> None:
    """Keep exactly the epoch files of epochs epoch-keep+1 .. epoch (also after a resume that lowered k)."""
    for p in run_dir.glob("epoch_*.pt"):
        number = epoch_of_file(p.name)
        if number is not None and not epoch - keep < number <= epoch:
            p.unlink(missing_ok=True)


def committed_best(run_dir: Path) -> Path:
    """The run's best.pt, checked to be the one its last.pt commits. A best.pt whose epoch is not last.pt's
    best epoch (the training was killed between the two writes), or one without any last.pt, is refused."""
    best, last = run_dir / BEST, run_dir / LAST
    if not best.exists():
        return best  # the loader says that it does not exist
    if not last.exists():
        raise CheckpointError(f"{best} is not committed: {run_dir} has no {LAST} (its training stopped before the "
                              f"first epoch was saved, or {LAST} was removed); rerun train.py to train it, or name "
                              f"the file with --checkpoint to score it anyway")
    committed, epoch = load_checkpoint(last).get("best_epoch"), checkpoint_epoch(best)
    if epoch != committed:
        raise CheckpointError(f"{best} holds epoch {epoch}, but {last} commits epoch {committed} as the best: the "
                              f"training stopped inside the save of an epoch. Rerun train.py to finish it (that epoch "
                              f"is redone exactly), then score the run")
    return best


# ----------------------------------------------------------------------------------------------------------
# the save policy
# ----------------------------------------------------------------------------------------------------------

class CheckpointSaver:
    """best.pt, last.pt and the last k epoch files of one run, and what last.pt carries about the run so far
    (best AUC and epoch, the metrics rows, the training time)."""

    def __init__(self, run_dir: Path, keep_last_k: int, resume: dict | None = None):
        self.run_dir, self.keep_last_k = Path(run_dir), keep_last_k
        self.epoch, self.best_auc, self.best_epoch, self.rows, self.seconds = 0, -math.inf, -1, [], 0.0
        self.resumed = resume is not None
        if resume is not None:
            self.epoch, self.best_auc, self.best_epoch = resume["epoch"], resume["best_val_auc"], resume["best_epoch"]
            self.rows, self.seconds = metrics_rows_of(resume, self.run_dir), float(resume.get("train_seconds", 0.0))

    def discard_uncommitted(self) -> None:
        """A new run: whatever an earlier attempt left before committing its first epoch is stale."""
        for name in (METRICS_CSV, BEST):
            (self.run_dir / name).unlink(missing_ok=True)
        prune_epoch_files(self.run_dir, 0, 0)

    def sync_resumed(self) -> None:
        """metrics.csv as last.pt has it (a row a kill kept out of it comes back)."""
        if self.resumed:
            sync_records(self.run_dir, {"epoch": self.epoch, "metrics": self.rows}, finished=False)

    def save(self, state: dict, row: dict, val_auc: float, seconds: float, *, final: bool) -> bool:
        """Commit the epoch `row["epoch"]` of the training `state` (model, optimizer, config, ...); True when its
        validation AUC is the best so far."""
        state, improved = self.stage(state, row, val_auc, seconds)
        atomic_save(state, self.run_dir / LAST)  # the commit point of the epoch
        self.finish(state, final=final)
        return improved

    def stage(self, state: dict, row: dict, val_auc: float, seconds: float) -> tuple[dict, bool]:
        """`save` up to the commit: best.pt (if improved) and the epoch file; the state last.pt is to hold."""
        epoch = row["epoch"]
        improved = val_auc > self.best_auc
        if improved:
            self.best_auc, self.best_epoch = val_auc, epoch
        self.rows.append(row)
        self.seconds += seconds
        self.epoch = epoch
        state = {**state, "epoch": epoch, "best_val_auc": self.best_auc, "best_epoch": self.best_epoch,
                 "metrics": [dict(r) for r in self.rows], "train_seconds": self.seconds}
        if improved:
            atomic_save(state, self.run_dir / BEST)
        if self.keep_last_k:
            atomic_save({k: state[k] for k in EPOCH_FILE_KEYS}, self.run_dir / epoch_file_name(epoch))
        return state, improved

    def finish(self, state: dict, *, final: bool) -> None:
        """`save` after the commit: prune the epoch files, rewrite the records from the committed state."""
        prune_epoch_files(self.run_dir, state["epoch"], self.keep_last_k)
        sync_records(self.run_dir, state, finished=final)
