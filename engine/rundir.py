"""Run directories that survive kills, races and full disks.

* The names of a run directory's records (`LAST`, `BEST`, `TRAIN_SUMMARY`, ...) are defined here only.
* `RunDirectory`: the one owner of a run directory for train.py and engine/classical.py: its lock, `--restart`
  (the old folder is kept under a new name), the refusal of a folder whose records lost their `last.pt`, the
  clean-up of what a killed writer left, and the removal of a folder this call created when no epoch got in.
  The save policy (best/last/keep-last-k) and the records rebuilt from last.pt are engine/saver.py's.
* `RunLock`: an exclusive `fcntl.flock` on `<run dir>/.lock`, held by train.py for the whole run. The OS drops
  it when the process ends in any way (a `kill -9` included), so a stale lock never blocks the next run;
  a second train.py on the same directory, or predict.py on a run being trained, is refused.
* `atomic_write_bytes` / `atomic_write_text` / `atomic_save`: write a temporary file `.<name>.<random>.tmp`
  in the same folder, fsync it, then `os.replace` it over the target: a reader sees the old file or the new
  one, never a truncated one. `remove_stale_temporaries` deletes what a killed writer left behind.
* Test hook (documented, off by default): every atomic write passes three fault points ("partial" after
  half the bytes, "written" before the rename, "replaced" after it). With `LMTTM_FAULT_AT_WRITE=N` in the
  environment the process kills itself with SIGKILL at the N-th fault point; in-process tests set
  `FAULTS.at = N` instead, which raises `SimulatedKill` (a BaseException that no cleanup code catches).
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch

from engine import runlog
from engine.checkpoint import CheckpointError


# the records of a run directory
LOCK_NAME = ".lock"
CONFIG_JSON = "config.json"
METRICS_CSV = "metrics.csv"
TRAIN_SUMMARY = "train_summary.json"  # written last: the run is finished (the commit point of a whole run)
TRAIN_LOG = runlog.LOG_NAME            # what the runs printed (engine/runlog.py)
LAST = "last.pt"                      # every epoch: the commit point of an epoch
BEST = "best.pt"                      # the epoch of the best validation AUC, committed by last.pt
EVAL_DIR = "eval"                     # predict.py's results, one folder per split and protocol
CURVES = "curves.png"
TENSORBOARD_DIR = "tensorboard"
INPUT_PREDICTIONS = "input_predictions.csv"
ESTIMATOR = "model.npz"               # a scikit-learn run's fitted model (engine/classical.py), no .pt files
OLD_ESTIMATOR = "model.joblib"        # the same, pickled by older versions (refused, never loaded)


def epoch_file_name(epoch: int) -> str:
    """The weights of one epoch (train.keep_last_k), e.g. epoch_0007.pt."""
    return f"epoch_{epoch:04d}.pt"


def epoch_of_file(name: str) -> int | None:
    """The epoch of an epoch file's name, None for any other name."""
    number = name[len("epoch_"):-len(".pt")] if name.startswith("epoch_") and name.endswith(".pt") else ""
    return int(number) if number.isdigit() else None


class RunDirError(CheckpointError):
    """A run directory that cannot be used (busy, not a folder, not writable, disk full)."""


class SimulatedKill(BaseException):
    """Raised by the in-process fault hook: behaves like SIGKILL (no `except Exception` handler catches it)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so that the same clean-up runs; the exit code is 143."""


def interrupt_of(err: KeyboardInterrupt) -> tuple[str, int]:
    """(what happened, exit code) of an interrupt: SIGTERM 143, Ctrl-C 130."""
    return ("terminated (SIGTERM)", 143) if isinstance(err, Terminated) else ("interrupted (Ctrl-C)", 130)


# ----------------------------------------------------------------------------------------------------------
# fault injection (tests only)
# ----------------------------------------------------------------------------------------------------------

class _Faults:
    def __init__(self):
        self.count = 0     # fault points passed by this process
        self.at = None     # in-process: raise SimulatedKill at this fault point
        self.log = []      # (point, file name, stage) of every fault point passed, for tests

    def reset(self, at=None):
        self.count, self.at, self.log = 0, at, []

    def point(self, path: Path, stage: str) -> None:
        self.count += 1
        self.log.append((self.count, Path(path).name, stage))
        env = os.environ.get("LMTTM_FAULT_AT_WRITE")
        if env and env.isdigit() and int(env) == self.count:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.at is not None and self.at == self.count:
            raise SimulatedKill(f"fault point {self.count}: {Path(path).name} {stage}")


FAULTS = _Faults()


# ----------------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------------

def _os_error(err: OSError, path: Path, what: str) -> RunDirError:
    hint = {errno.ENOSPC: " (the disk is full)", errno.EDQUOT: " (disk quota exceeded)",
            errno.EROFS: " (read-only file system)", errno.EACCES: " (no write permission)",
            errno.ENAMETOOLONG: " (shorten output.name or output.dir)"}.get(err.errno, "")
    return RunDirError(f"cannot {what} {path}: {err.strerror or err}{hint}")


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """Write `data` to `path` through a fsynced temporary file and `os.replace`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600 files; results are ordinary files
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            FAULTS.point(path, "partial")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        FAULTS.point(path, "written")
        os.replace(tmp, path)
        tmp = None
    except SimulatedKill:  # a simulated kill leaves its temporary behind, as a real one would
        raise
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _os_error(err, path, "write") from None
        raise
    FAULTS.point(path, "replaced")


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj, path: Path) -> None:
    """JSON without NaN or Infinity (they are written as null): every parser reads the file."""
    atomic_write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n", path)


def json_safe(obj):
    """`obj` with every non-finite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically (see `atomic_write_bytes`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


def _is_temporary(name: str) -> bool:
    return (name.startswith(".") and name.endswith(".tmp")) or name == "metrics.tmp"


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete the temporaries (`.<name>.*.tmp`, and the older `metrics.tmp`) a killed writer left in
    `run_dir`; call only while holding its lock. Returns the names removed."""
    removed = []
    for p in Path(run_dir).iterdir():
        if p.is_file() and _is_temporary(p.name):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


# ----------------------------------------------------------------------------------------------------------
# the lock
# ----------------------------------------------------------------------------------------------------------


class RunLock:
    """Exclusive lock on a run directory for the lifetime of a training process (context manager).

    `RunLock(run_dir).acquire()` creates the folder (and its parents) if needed and raises RunDirError
    when another process holds the lock or the folder cannot be used."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd = None

    def acquire(self) -> RunLock:
        run_dir = self.run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"the run directory {run_dir} exists but is not a folder")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise RunDirError(f"cannot create the run directory {run_dir}: a file of that name is in the way "
                              f"(check output.dir and output.name)") from None
        except NotADirectoryError:
            raise RunDirError(f"cannot create the run directory {run_dir}: a part of output.dir is a file, "
                              f"not a folder") from None
        except OSError as err:
            raise _os_error(err, run_dir, "use the run directory") from None
        _lock_or_refuse(fd, fcntl.LOCK_EX, lambda holder: f"{run_dir} is in use by another process{holder} (a "
                        f"training or an evaluation); wait for it to finish, or use another --output.name")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is only informative
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc):
        self.release()
        return False


def _lock_or_refuse(fd: int, mode: int, message) -> None:
    """flock `fd` without waiting; when another process holds it, close `fd` and raise RunDirError with
    `message(holder)` (holder: " (pid N)" read from the lock file, or "")."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirError(message(holder)) from None


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


class SharedRunLock:
    """A shared lock taken by predict.py while it reads a run: refused while train.py holds the run's
    exclusive lock; creates nothing when the run has no lock file (nothing trains there)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.fd = None

    def __enter__(self):
        path = self.run_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return self
        _lock_or_refuse(fd, fcntl.LOCK_SH, lambda holder: f"{self.run_dir} is being trained right now by another "
                        f"process{holder}; its checkpoints are still changing. Evaluate it when the training has "
                        f"finished.")
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        return False


# ----------------------------------------------------------------------------------------------------------
# the owner of a run directory
# ----------------------------------------------------------------------------------------------------------

def checkpoint_epoch(path: Path) -> int | None:
    """The `epoch` a checkpoint file records (read memory-mapped, without loading its tensors); None when it
    cannot be read."""
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 - any unreadable file: no epoch
        return None
    return epoch if isinstance(epoch, int) else None


class RunDirectory:
    """A run directory from the first look to the last write (a context manager that releases its lock).

    Only the leader process (rank 0 under torchrun) locks and writes; for the other ranks every method is a
    no-op. The folder is locked early if it exists (`open_existing`: a finished run is recognised before any
    data is loaded), else created and locked only when the job is ready to write (`open`), so a call that
    fails before creates nothing."""

    def __init__(self, path: Path, *, leader: bool = True):
        self.path = Path(path)
        self.leader = leader
        self.lock: RunLock | None = None
        self.created = False  # this call created the folder (it may remove it again: `discard_if_empty`)

    @property
    def locked(self) -> bool:
        return self.lock is not None

    @property
    def last(self) -> Path:
        return self.path / LAST

    def open_existing(self, *, restart: bool = False) -> None:
        """Lock the folder if it exists; with `restart`, move it aside first (kept under a new name)."""
        if not self.leader or not (self.path.exists() or self.path.is_symlink()):
            return
        self.lock = RunLock(self.path).acquire()
        if restart:
            aside = self.path.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            self.release()  # the lock file moved with the old run
            print(f"--restart: moved the previous run to {aside}")

    def open(self) -> None:
        """Create (if needed) and lock the folder; a no-op when it is locked already."""
        if self.leader and self.lock is None:
            self.created = not self.path.exists()
            self.lock = RunLock(self.path).acquire()

    def begin(self) -> None:
        """Start writing: remove what a killed writer left; the run is not finished (any more); from here on
        what the process prints also goes to the run's train.log (a call refused before this writes nothing)."""
        if self.leader:
            self.remove_stale_temporaries()
            (self.path / TRAIN_SUMMARY).unlink(missing_ok=True)
            runlog.start(self.path)

    def remove_stale_temporaries(self) -> None:
        stale = remove_stale_temporaries(self.path)
        if stale:
            print(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale)}")

    def refuse_orphaned_records(self) -> None:
        """Without last.pt a folder may hold only what a first epoch writes before its commit (config.json,
        best.pt and epoch_0001.pt of epoch 1, temporaries), which a new run replaces. Records of committed
        epochs whose last.pt is gone (deleted, lost) are never overwritten: RunDirError pointing to --restart."""
        if not self.leader or self.last.exists() or not self.path.is_dir():
            return
        classical = [name for name in (ESTIMATOR, OLD_ESTIMATOR) if (self.path / name).exists()]
        if classical:
            raise RunDirError(f"{self.path} holds a scikit-learn run ({', '.join(classical)}), not a deep-model one; "
                              f"it is not overwritten. Use another --output.name, or --restart to start it over (the "
                              f"old folder is kept under a new name)")
        found = [name for name in (METRICS_CSV, TRAIN_SUMMARY, EVAL_DIR, CURVES, INPUT_PREDICTIONS)
                 if (self.path / name).exists()]
        found += sorted(p.name for p in self.path.glob("epoch_*.pt") if (epoch_of_file(p.name) or 0) > 1)
        if (self.path / BEST).exists() and checkpoint_epoch(self.path / BEST) != 1:
            found.append(BEST)
        if found:
            raise RunDirError(f"{self.path} holds records of an earlier run ({', '.join(found)}) but not its {LAST}, "
                              f"so it can be neither resumed nor overwritten; use --restart to start it over (the "
                              f"old folder is kept under a new name), or another --output.name")

    def committed_note(self) -> str:
        """One sentence on what a stopped run leaves to resume from."""
        return (f"{self.last} holds the last finished epoch." if self.last.exists()
                else "No epoch had finished; nothing to resume from.")

    def refuse_deep_records(self) -> None:
        """A scikit-learn fit never writes into a deep-model run's folder (last.pt, best.pt, epoch files,
        metrics.csv): RunDirError pointing to --restart or another --output.name."""
        if not self.leader or not self.path.is_dir():
            return
        found = [name for name in (LAST, BEST, METRICS_CSV) if (self.path / name).exists()]
        found += sorted(p.name for p in self.path.glob("epoch_*.pt") if epoch_of_file(p.name) is not None)
        if found:
            raise RunDirError(f"{self.path} holds a deep-model run ({', '.join(found)}), not a scikit-learn one; it is "
                              f"not overwritten. Use another --output.name, or --restart to start it over (the old "
                              f"folder is kept under a new name)")

    def discard_if_empty(self) -> None:
        """Remove the folder if this call created it and no epoch was committed: it holds nothing but this
        call's own start-up files (config.json, train.log, best.pt, epoch files, metrics.csv, tensorboard/, temporaries;
        a scikit-learn fit's model.npz, whose run is committed by train_summary.json only)."""
        if not (self.created and self.locked) or self.last.exists() or (self.path / TRAIN_SUMMARY).exists():
            return
        self.release()
        own = {LOCK_NAME, CONFIG_JSON, METRICS_CSV, BEST, ESTIMATOR, TRAIN_LOG}
        try:
            for p in self.path.iterdir():
                if p.name == TENSORBOARD_DIR and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                elif p.name in own or _is_temporary(p.name) or epoch_of_file(p.name) is not None:
                    p.unlink(missing_ok=True)
            self.path.rmdir()
        except OSError:
            pass  # best effort: a folder we cannot clean up is left as it is

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc):
        self.release()
        return False


# ----------------------------------------------------------------------------------------------------------
# SIGTERM like Ctrl-C
# ----------------------------------------------------------------------------------------------------------

def _raise_terminated(signum, frame):
    raise Terminated()


def handle_sigterm() -> None:
    """Deliver SIGTERM as a `Terminated` exception (a KeyboardInterrupt) in the main thread, and Ctrl-C as
    KeyboardInterrupt (unless SIGINT is ignored, as in a background job)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
