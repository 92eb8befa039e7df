"""The local launcher of tools/sweep.py: the runs of a grid on this machine, one after the other (`--jobs 1`)
or up to N at once (`--jobs N`), through one code path: N job slots each take the next run in grid order.

Every train.py/predict.py runs in its own process group with a parent-death signal (Linux), so a sweep that
is stopped in any way takes its children with it: Ctrl-C or SIGTERM starts no new run and sends the running
ones the same signal once (each resumes from its last.pt when the same command runs again); a second Ctrl-C
kills them; a sweep killed outright (SIGKILL) leaves its trainers a SIGTERM from the kernel.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from tools.grid import REPO_ROOT, Run
from tools.launch import Busy, Runner, SweepResult, busy_message, plan, prepare, run_steps, thread_env, \
    threads_per_run
from tools.run_state import LOG_FILE, commands, metrics_text, train_finished

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_signal(sig: int = signal.SIGTERM):
    """A preexec_fn that has the kernel send the child `sig` when this process dies (Linux prctl
    PR_SET_PDEATHSIG; the signal comes when the thread that started the child ends, and our threads wait for
    their children); None where the system has no prctl."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec():
        prctl(_PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # the sweep died before the signal was armed
            os.kill(os.getpid(), int(sig))
    return preexec


class Children:
    """The live child processes of a sweep, so that Ctrl-C or SIGTERM reaches each of them exactly once (they
    run in their own process groups, out of the terminal's reach) and no new one starts after it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: set = set()
        self.stopping = False

    def start(self, cmd, **popen_args):
        """Popen(cmd) in its own process group with a parent-death signal, or None once the sweep is stopping."""
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=parent_death_signal(), **popen_args)
            self.procs.add(proc)
            return proc

    def done(self, proc):
        with self.lock:
            self.procs.discard(proc)

    def stop(self, sig) -> int:
        """Send `sig` to every live child's process group; return how many were signalled."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return len(procs)


CHILDREN = Children()


def subprocess_runner(cmd: list, cwd: Path, log_path: Path, env: Optional[dict] = None) -> int:
    """Run a command, appending its stdout and stderr to log_path; return its exit status. The command runs
    in its own process group (the sweep forwards Ctrl-C and SIGTERM to it) and dies with the sweep; `env`
    (the thread settings) is its whole environment, None: this process's."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(map(str, cmd))}   # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log.flush()
        proc = CHILDREN.start(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc is None:
            log.write("not started: the sweep was interrupted\n")
            return 130
        try:
            return proc.wait()
        finally:
            CHILDREN.done(proc)


def tail(path: Path, n: int = 6) -> str:
    """The last n lines of a log, indented for the console."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("      | " + line for line in lines[-n:])


def slot_device(devices: list, slot: int) -> Optional[str]:
    return devices[slot % len(devices)] if devices else None


def run_sweep(runs: list[Run], runs_dir: Path, *, extra: Optional[dict] = None, max_runs: Optional[int] = None,
              dry_run: bool = False, runner: Runner = subprocess_runner, python: str = sys.executable,
              cwd: Path = REPO_ROOT, log=print, jobs: int = 1, devices: Optional[list] = None,
              threads: Optional[int] = None) -> SweepResult:
    """Run (or resume) the given runs; see tools/sweep.py. `runner(cmd, cwd, log_path[, env=])` executes one
    command and returns its exit status (tests pass a fake one). Up to `jobs` runs at once; `devices` are
    given to the runs as `--train.device`, job slot k using devices[k % len(devices)]; `threads` is each
    run's CPU thread count (None: cores // jobs with jobs > 1, the environment's with jobs 1; 0: the
    environment's)."""
    runs_dir = Path(runs_dir)
    devices = list(devices or [])
    result = SweepResult(one_by_one=jobs == 1)
    todo = plan(runs, runs_dir, result, extra=extra, max_runs=max_runs, log=log)
    if dry_run:
        for k, (tag, run) in enumerate(todo):  # the k-th run starts on job slot k mod jobs
            device = slot_device(devices, k % jobs)
            train_cmd, predict_cmd = commands(run, runs_dir, {**(extra or {}),
                                                              **({"train.device": device} if device else {})}, python)
            result.planned.append(run.name)
            log(f"{tag}:")
            if not train_finished(runs_dir / run.name):
                log("  " + shlex.join(map(str, train_cmd)))
            log("  " + shlex.join(map(str, predict_cmd)))
        return result
    if threads is None:
        threads = threads_per_run(jobs) if jobs > 1 else 0
    LocalLaunch(todo, runs_dir, result, extra=extra, jobs=jobs, devices=devices,
                env=thread_env(threads) if threads else None, runner=runner, python=python, cwd=cwd, log=log).run()
    result.outcomes = outcomes(runs, result)
    return result


class _Terminated(KeyboardInterrupt):
    """SIGTERM to a sweep: stop its runs like Ctrl-C (exit status 143)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


class LocalLaunch:
    """`todo` ([(tag, run)], planned, in grid order) on `jobs` job slots, each taking the next run when its
    previous one ends; slot k passes --train.device devices[k % len(devices)]. With one slot the console
    follows each step and shows the end of a failed run's log; with several it gets one line per run start,
    end and failure. Ctrl-C (or SIGTERM) starts no new run and stops the running ones with the same signal;
    a second Ctrl-C kills them."""

    def __init__(self, todo, runs_dir: Path, result: SweepResult, *, extra, jobs: int, devices: list,
                 env: Optional[dict], runner: Runner, python: str, cwd: Path, log):
        self.queue, self.runs_dir, self.result, self.extra = list(todo), runs_dir, result, extra
        self.jobs, self.devices, self.env, self.runner, self.python, self.cwd = jobs, devices, env, runner, python, cwd
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._log = log
        self.finished_slots: set = set()

    def say(self, text: str) -> None:
        with self.lock:
            self._log(text)

    def run(self) -> None:
        CHILDREN.stopping = False
        workers = [threading.Thread(target=self._slot, args=(k,), name=f"sweep-job-{k}", daemon=True)
                   for k in range(min(self.jobs, len(self.queue)))]
        in_main = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
        try:
            try:
                for w in workers:
                    w.start()
                self._wait(workers)
            except KeyboardInterrupt as err:
                self._interrupted(err, workers)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, old_term)

    def _wait(self, workers) -> None:
        # Not Thread.join: on Python 3.11 a join that Ctrl-C interrupts can mark the joined thread as ended
        # while it still runs. A worker counts once it has an ident (it runs) until it says it finished.
        while any(w.ident is not None and k not in self.finished_slots for k, w in enumerate(workers)):
            time.sleep(0.05)

    def _interrupted(self, err: KeyboardInterrupt, workers) -> None:
        sig, self.result.stopped_by = (signal.SIGTERM, "SIGTERM") if isinstance(err, _Terminated) else \
            (signal.SIGINT, "Ctrl-C")
        with self.lock:
            self.stop.set()
            self.result.unstarted.extend(run.name for _, run in self.queue)
            self.queue.clear()
        n = CHILDREN.stop(sig)
        self.say(f"\ninterrupted ({self.result.stopped_by}): stopping {n} running process(es); each run resumes "
                 f"from its last.pt when the same command is run again (Ctrl-C again kills them)")
        while True:
            try:
                self._wait(workers)
                return
            except KeyboardInterrupt:
                CHILDREN.stop(signal.SIGKILL)
                self.say("killing the running processes (their last finished epoch stays resumable)")

    def _slot(self, slot: int) -> None:
        try:
            while True:
                with self.lock:
                    if self.stop.is_set() or not self.queue:
                        return
                    tag, run = self.queue.pop(0)
                self._launch(tag, run, slot_device(self.devices, slot))
        finally:
            self.finished_slots.add(slot)

    def _launch(self, tag: str, run: Run, device: Optional[str]) -> None:
        """One run on one job slot: prepare, train and predict, record its outcome."""
        run_dir = self.runs_dir / run.name
        device_extra = {"train.device": device} if device else {}
        train_cmd, predict_cmd = commands(run, self.runs_dir, {**(self.extra or {}), **device_extra}, self.python)
        resuming = (run_dir / "last.pt").exists()
        t0 = time.time()
        try:
            prepare(run, run_dir, self.extra)
            if self.jobs > 1:
                what = ("training" + (", resuming" if resuming else "")) if not train_finished(run_dir) \
                    else "evaluating the test split"
                self.say(f"{tag}: started ({what}" + (f", {device}" if device else "") + ")")
            reason = run_steps(run_dir, train_cmd, predict_cmd, self.runner, self.cwd, env=self.env,
                               say=self._step_line(tag, resuming), stopping=self.stop.is_set)
        except Busy as err:
            with self.lock:
                busy_message(self.result, run.name, str(err), tag, self._log)
            return
        except Exception as err:  # noqa: BLE001 - one run's problem (a full disk, ...) must not stop the others
            reason = f"the sweep could not run it: {err}"
        self._record(tag, run, reason, run_dir / LOG_FILE, t0)

    def _step_line(self, tag: str, resuming: bool):
        def say(step):
            if self.jobs == 1 and step == "train":
                self.say(f"{tag}: training" + (" (resuming)" if resuming else ""))
            elif self.jobs == 1:
                self.say(f"{tag}: evaluating the test split")
        return say

    def _record(self, tag: str, run: Run, reason: Optional[str], log_path: Path, t0: float) -> None:
        with self.lock:
            if reason is None:
                self.result.done.append(run.name)
                self._log(f"{tag}: done in {time.time() - t0:.0f} s")
            elif self.stop.is_set():
                self.result.stopped.append(run.name)
                self._log(f"{tag}: stopped ({reason})")
            else:
                self.result.failed.append((run.name, reason, log_path))
                self._log(f"{tag}: FAILED: {reason}; log: {log_path}")
                text = tail(log_path) if self.jobs == 1 else ""
                if text:
                    self._log(text)


def outcomes(runs: list[Run], result: SweepResult) -> list:
    """(name, outcome line) of every run, in grid order; the lists of `result` sorted in grid order too."""
    order = {run.name: k for k, run in enumerate(runs)}
    for part in (result.done, result.failed, result.stopped, result.unstarted, result.busy):
        part.sort(key=lambda item: order[item if isinstance(item, str) else item[0]])
    failed = {name: (reason, log_path) for name, reason, log_path in result.failed}
    busy = dict(result.busy)
    lines = []
    for run in runs:
        if run.name in result.skipped:
            text = "finished before, skipped"
        elif run.name in result.not_started:
            text = "not started (--max-runs)"
        elif run.name in failed:
            reason, log_path = failed[run.name]
            text = f"FAILED: {reason}" + (f" (log: {log_path})" if log_path else "")
        elif run.name in busy:
            text = f"not started: being trained right now ({busy[run.name]})"
        elif run.name in result.unstarted:
            text = f"not started ({result.stopped_by})"
        elif run.name in result.stopped:
            text = f"stopped by {result.stopped_by}: run the same command again to resume it"
        else:
            text = "done"
        lines.append((run.name, text))
    return lines


def summary_text(result: SweepResult, dry_run: bool = False, runs_dir: Optional[Path] = None) -> str:
    """The end of a sweep: the counts, each run's outcome (several at once) or the failures (one by one),
    and the test AUC/ACC of every finished run (read from `runs_dir`)."""
    if dry_run:
        return (f"dry run: {len(result.planned)} run(s) to run, {len(result.skipped)} finished, "
                f"{len(result.not_started)} beyond --max-runs")
    lines = [f"sweep: {len(result.done)} run(s) done now, {len(result.skipped)} finished before, "
             f"{len(result.failed)} failed, {len(result.not_started)} not started (--max-runs)"
             + (f", {len(result.busy)} being trained by another process" if result.busy else "")
             + (f", {len(result.stopped)} stopped by {result.stopped_by}" if result.stopped_by else "")
             + (f" and {len(result.unstarted)} left unstarted" if result.unstarted else "")]
    if not result.one_by_one:
        lines += [f"  {name}: {text}" for name, text in result.outcomes]
        for name, reason, log_path in result.failed:
            text = tail(log_path) if log_path else ""
            if text:
                lines.append(f"  end of {name}'s log:\n{text}")
    else:
        lines += [f"  FAILED {name}: {reason}" + (f" (log: {log_path})" if log_path else "")
                  for name, reason, log_path in result.failed]
        lines += [f"  BUSY {name}: being trained right now ({who}); not started" for name, who in result.busy]
    if result.stopped_by:
        lines.append(f"stopped by {result.stopped_by}: run the same command again to resume")
    if runs_dir is not None:
        lines += metrics_lines(result, Path(runs_dir))
    return "\n".join(lines)


def metrics_lines(result: SweepResult, runs_dir: Path) -> list:
    """'finished runs:' and each finished run's test AUC and ACC (done now or before), in grid order."""
    finished = set(result.skipped) | set(result.done)
    names = [name for name, _ in result.outcomes if name in finished] or sorted(finished)
    rows = [(name, text) for name in names if (text := metrics_text(runs_dir / name))]
    if not rows:
        return []
    width = max(len(name) for name, _ in rows)
    return ["finished runs:"] + [f"  {name:{width}s}  {text}" for name, text in rows]
