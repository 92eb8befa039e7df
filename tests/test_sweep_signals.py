"""tools/sweep.py and its children under signals: SIGTERM with --jobs 1 and SIGKILL to a sweep leave no
train.py running; a rerun leaves a live trainer's run alone; a failed run reads "failed"; the interrupt
summary counts each run once. Fake engines (tiny Python children), no training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.rundir import RunLock  # noqa: E402
from test_sweep import FakeEngine, small_grid  # noqa: E402
from tools import sweep  # noqa: E402

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")

# A stand-in for train.py: records its pid, then sleeps (30 s at most) until a signal ends it.
SLEEPER = """
import os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(30)
"""

# Runs tools/sweep.py's main with the real subprocess runner, every command replaced by SLEEPER.
DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tools import sweep
markers = Path(sys.argv[2])
def runner(cmd, cwd, log_path, env=None):
    name = cmd[cmd.index("--output.name") + 1]
    return sweep.subprocess_runner([sys.executable, "-c", sys.argv[3], str(markers / name)], cwd, log_path, env=env)
sys.exit(sweep.main(sys.argv[4:], runner=runner))
"""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reaper may be slow to collect an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_sweep(tmp_path, jobs: int, n_children: int):
    """A sweep in its own process group whose first `n_children` runs are sleeping; returns (proc, pids)."""
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT), str(markers), SLEEPER, str(grid_path),
                             "--out", str(tmp_path / "runs"), "--jobs", str(jobs)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while len(list(markers.iterdir())) < n_children and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)
    pids = [int(m.read_text().split()[0]) for m in markers.iterdir()]
    assert len(pids) == n_children, proc.communicate(timeout=30)
    return proc, pids


def wait_gone(pids, seconds: float = 5.0) -> list:
    deadline = time.time() + seconds
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    for p in left:  # never leave a sleeper behind, even when the check fails
        os.kill(p, signal.SIGKILL)
    return left


@linux_only
def test_sigterm_to_a_jobs_1_sweep_stops_its_child(tmp_path):
    proc, pids = start_sweep(tmp_path, jobs=1, n_children=1)
    proc.send_signal(signal.SIGTERM)                          # to the sweep alone, not to its group
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert wait_gone(pids) == []                              # no orphaned train.py
    assert "Traceback" not in err and "interrupted (SIGTERM)" in out


@linux_only
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigkill_to_a_sweep_takes_its_children_with_it(tmp_path, jobs):
    proc, pids = start_sweep(tmp_path, jobs=jobs, n_children=jobs)
    proc.kill()                                               # SIGKILL: the sweep cannot forward anything
    proc.communicate(timeout=30)
    assert wait_gone(pids) == []                              # the parent-death signal ended them


def test_rerun_leaves_a_live_trainer_alone_and_says_so(tmp_path, capsys):
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    runs = sweep.expand(small_grid())[:2]
    busy_dir = out / runs[0].name
    with RunLock(busy_dir):                                   # a train.py of an earlier sweep still running
        (busy_dir / "sweep.log").write_text("epoch   1/5 ...\n")
        engine = FakeEngine()
        rc = sweep.main([str(grid_path), "--out", str(out), "--only", runs[0].name, "--only", runs[1].name],
                        runner=engine)
        printed = capsys.readouterr().out
        assert rc == 1                                        # not everything finished
        assert [name for _, name in engine.calls] == [runs[1].name] * 2
        assert (busy_dir / "sweep.log").read_text() == "epoch   1/5 ...\n"   # its log untouched
        assert f"pid {os.getpid()}" in printed and "FAILED" not in printed and "being trained" in printed
        assert sweep.main([str(grid_path), "--out", str(out), "--status", "--only", runs[0].name]) == 0
        assert capsys.readouterr().out.strip() == f"{runs[0].name}: running (train.py, pid {os.getpid()})"
        assert sweep.main([str(grid_path), "--out", str(out), "--list", "--only", runs[0].name]) == 0
        assert capsys.readouterr().out.split() == ["running", runs[0].name]
    # the trainer has ended: the same command now runs it
    engine = FakeEngine()
    assert sweep.main([str(grid_path), "--out", str(out), "--only", runs[0].name], runner=engine) == 0
    assert engine.calls == [("train.py", runs[0].name), ("predict.py", runs[0].name)]


def test_a_failed_run_reads_failed_until_it_runs_again(tmp_path, capsys):
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    name = sweep.expand(small_grid())[0].name
    assert sweep.main([str(grid_path), "--out", str(out), "--only", name], runner=FakeEngine(fail={name})) == 1
    capsys.readouterr()
    assert sweep.main([str(grid_path), "--out", str(out), "--only", name, "--status"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{name}: failed: train.py exited with status 3; log: {out / name / 'sweep.log'}"
    assert sweep.main([str(grid_path), "--out", str(out), "--only", name, "--list"]) == 0
    assert capsys.readouterr().out.split() == ["failed", name]
    assert sweep.main([str(grid_path), "--out", str(out), "--only", name], runner=FakeEngine()) == 0
    capsys.readouterr()
    assert sweep.main([str(grid_path), "--out", str(out), "--only", name, "--status"]) == 0
    assert capsys.readouterr().out.startswith(f"{name}: finished")


@pytest.mark.parametrize("jobs", [1, 2])
def test_interrupt_summary_counts_each_run_once(tmp_path, jobs):
    """Ctrl-C while the first run(s) train: those are 'stopped', the others 'not started', none both."""
    runs = sweep.expand(small_grid())
    calls = []

    def runner(cmd, cwd, log_path, env=None):
        calls.append(cmd)
        if len(calls) == jobs:
            os.kill(os.getpid(), signal.SIGINT)               # Ctrl-C while `jobs` trainings run
        time.sleep(0.5)
        return 130

    result = sweep.run_sweep(runs, tmp_path / "out", runner=runner, cwd=tmp_path, log=lambda *a: None, jobs=jobs)
    assert result.exit_code == 130 and len(calls) == jobs
    assert len(result.stopped) == jobs and not set(result.stopped) & set(result.unstarted)
    assert len(result.stopped) + len(result.unstarted) == len(runs) and not result.failed
    header = sweep.summary_text(result).splitlines()[0]
    assert f"{jobs} stopped by Ctrl-C and {len(runs) - jobs} left unstarted" in header
    outcome = dict(result.outcomes)
    assert sum(text.startswith("stopped by") for text in outcome.values()) == jobs
    assert sum(text == "not started (Ctrl-C)" for text in outcome.values()) == len(runs) - jobs
    # a run stopped on purpose is resumable, not failed
    assert not (tmp_path / "out" / runs[0].name / "job_state.json").exists()
