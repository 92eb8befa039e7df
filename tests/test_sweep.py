"""Tests of the experiment tooling (tools/sweep.py, tools/aggregate.py, tools/plots.py) with a fake engine:
no training, no data, no ../shared."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools import aggregate, launch, plots, sweep  # noqa: E402

EXPERIMENTS = sorted((ROOT / "experiments").glob("*.json"))


# ----------------------------------------------------------------------------------------------------------
# a fake engine
# ----------------------------------------------------------------------------------------------------------

def parse_cmd(cmd):
    """(script, config, {'section.key': value}) of a train.py / predict.py command line."""
    script, config, rest = Path(cmd[1]).name, cmd[2], list(cmd[3:])
    settings = {}
    for key, value in zip(rest[::2], rest[1::2]):
        try:
            settings[key[2:]] = json.loads(value)
        except json.JSONDecodeError:
            settings[key[2:]] = value
    return script, config, settings


def nested(settings):
    out = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def write_fake_run(run_dir, settings, auc=0.8, acc=0.75, train=True, evaluate=True, epochs=3, config=None):
    """The files of a run as the engine writes them; with `config`, also the sweep's settings record."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        sweep.write_settings(run_dir, config, settings)
    (run_dir / "config.json").write_text(json.dumps(nested(settings)))
    (run_dir / "last.pt").write_bytes(b"fake")
    with open(run_dir / "metrics.csv", "w") as f:
        f.write("epoch,train_loss,val_auc,val_acc,lr,time_s\n")
        for e in range(1, epochs + 1):
            f.write(f"{e},{1.0 / e:.4f},{0.5 + 0.1 * e:.4f},{0.6 + 0.05 * e:.4f},0.0001,1.0\n")
    if train:
        (run_dir / "train_summary.json").write_text(json.dumps(
            {"finished": True, "epochs": epochs, "best_epoch": epochs, "best_val_auc": 0.8, "param_count": 1234,
             "data_md5": "x", "versions": {}, "seconds": 1.0}))
    if evaluate:
        ev = run_dir / "eval" / "test"
        ev.mkdir(parents=True, exist_ok=True)
        (ev / "metrics.json").write_text(json.dumps(
            {"split": "test", "auc": auc, "acc": acc, "checkpoint": "best.pt", "protocol": "best_val_auc",
             "n_samples": 10, "dataset": settings.get("data.name"), "size": 28}))
        rng = np.random.default_rng(0)
        y_true = np.array([0, 1] * 5)
        p1 = np.clip(0.3 * y_true + rng.uniform(0, 0.7, 10), 0, 1)
        np.savez(ev / "predictions.npz", y_true=y_true, y_score=np.stack([1 - p1, p1], 1))


class FakeEngine:
    """Stands in for train.py / predict.py: writes the files the real engine writes."""

    def __init__(self, fail=(), fail_step="train"):
        self.calls = []           # (script, run name)
        self.fail = set(fail)     # run names whose `fail_step` exits 3
        self.fail_step = fail_step
        self.envs = []            # (script, run name, env) of the calls that got an environment (--jobs N)

    def __call__(self, cmd, cwd, log_path, env=None):
        script, config, s = parse_cmd(cmd)
        name = s["output.name"]
        self.calls.append((script, name))
        if env is not None:
            self.envs.append((script, name, env))
        assert Path(log_path).parent.name == name
        with open(log_path, "a") as log:
            log.write(f"fake {script} {name}\n")
        run_dir = Path(cwd) / s["output.dir"] / name
        if name in self.fail and script.startswith(self.fail_step):
            with open(log_path, "a") as log:
                log.write("RuntimeError: something broke\n")
            return 3
        settings = {k: v for k, v in s.items() if k not in ("split",)}
        if script == "train.py":
            write_fake_run(run_dir, settings, train=True, evaluate=False)
        else:
            assert s["split"] == "test" and (run_dir / "train_summary.json").exists()
            write_fake_run(run_dir, settings, auc=0.7 + 0.01 * s["train.seed"], train=True, evaluate=True)
        return 0


def small_grid(**extra):
    grid = {
        "name": "small",
        "datasets": ["adrenalmnist3d", "vesselmnist3d"],
        "seeds": [0, 1],
        "overrides": {"train.epochs": 5},
        "variants": [
            {"label": "lmttm", "overrides": {"model.name": "lmttm"}},
            {"label": "resnet18_3d", "config": "baselines/resnet18_3d.json",
             "overrides": {"model.name": "resnet18_3d"}},
        ],
        "axes": {"model.dim+model.memory_tokens": [[64, 64], [160, 160]]},
    }
    grid.update(extra)
    return grid


# ----------------------------------------------------------------------------------------------------------
# grid expansion
# ----------------------------------------------------------------------------------------------------------

def test_expand_count_names_overrides_and_configs():
    runs = sweep.expand(small_grid())
    assert len(runs) == 2 * 2 * 2 * 2
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert names[0] == "adrenalmnist3d-lmttm-dim64-mem64-seed0"
    assert names[1] == "adrenalmnist3d-lmttm-dim64-mem64-seed1"
    assert "vesselmnist3d-resnet18_3d-dim160-mem160-seed1" in names
    r = next(r for r in runs if r.name == "vesselmnist3d-resnet18_3d-dim160-mem160-seed1")
    assert r.config == "baselines/resnet18_3d.json"
    assert r.cell == "vesselmnist3d-resnet18_3d-dim160-mem160"
    assert r.settings == {"train.epochs": 5, "model.name": "resnet18_3d", "model.dim": 160,
                          "model.memory_tokens": 160, "data.name": "vesselmnist3d", "train.seed": 1}
    assert r.coords == {"dataset": "vesselmnist3d", "variant": "resnet18_3d", "model.dim": 160,
                        "model.memory_tokens": 160}
    assert runs[0].config == "adrenalmnist3d.json"


def test_commands_use_overrides_only(tmp_path):
    run = sweep.expand(small_grid())[0]
    train, predict = sweep.commands(run, tmp_path / "out", extra={"train.epochs": 1, "data.root": "../d"},
                                    python="PY")
    assert train[:3] == ["PY", "train.py", "config/adrenalmnist3d.json"]
    assert predict[:2] == ["PY", "predict.py"] and predict[-2:] == ["--split", "test"]
    _, _, s = parse_cmd(train)
    assert s["train.epochs"] == 1            # --override wins over the grid
    assert s["data.root"] == "../d"
    assert s["model.dim"] == 64 and s["model.memory_tokens"] == 64 and s["train.seed"] == 0
    assert s["output.name"] == run.name and s["output.dir"] == str((tmp_path / "out").resolve())
    assert train.count("--train.epochs") == 1


def test_axis_labels_and_value_formats():
    grid = {"name": "g", "datasets": ["d"], "seeds": [3],
            "overrides": {"model.name": "lmttm"},
            "axes": {"train.lr": [0.001, 1e-4], "model.noise": ["uniform"], "train.batch_size": [16]},
            "labels": {"train.batch_size": "batch"}}
    names = [r.name for r in sweep.expand(grid)]
    assert names == ["d-lmttm-lr0.001-noise_uniform-batch16-seed3", "d-lmttm-lr0.0001-noise_uniform-batch16-seed3"]


def test_subgrids_and_model_axis():
    grid = {"name": "g", "seeds": [0], "overrides": {"train.epochs": 7},
            "subgrids": [{"datasets": ["a"], "axes": {"model.name": ["ttm", "lmttm"], "model.dim": [352]}},
                         {"datasets": ["b"], "axes": {"model.name": ["ttm"], "model.dim": [256]},
                          "overrides": {"train.lr": 0.5}}]}
    runs = sweep.expand(grid)
    assert [r.name for r in runs] == ["a-ttm-dim352-seed0", "a-lmttm-dim352-seed0", "b-ttm-dim256-seed0"]
    assert runs[2].settings["train.epochs"] == 7 and runs[2].settings["train.lr"] == 0.5
    assert "train.lr" not in runs[0].settings


@pytest.mark.parametrize("bad, message", [
    ({"datasets": []}, "datasets"),
    ({"overrides": {"train.seed": 1}}, "set by the sweep"),
    ({"overrides": {"epochs": 1}}, "section.key"),
    ({"axes": {"model.dim+model.memory_tokens": [[64]]}}, "list of 2 values"),
    ({"variants": [{"label": "x"}, {"label": "x"}]}, "share the directory"),
    ({"colour": 1}, "unknown grid keys"),
])
def test_bad_grids_are_rejected(bad, message):
    with pytest.raises(sweep.GridError, match=message):
        sweep.expand(small_grid(**bad))


def test_paper_keys_must_be_cells():
    with pytest.raises(sweep.GridError, match="not a cell"):
        sweep.validate_grid(small_grid(paper={"values": {"adrenalmnist3d-lmttm": {"acc": 0.8}}}))
    sweep.validate_grid(small_grid(paper={"values": {"adrenalmnist3d-lmttm-dim64-mem64": {"acc": 0.8}}}))


# ----------------------------------------------------------------------------------------------------------
# running: skip finished, resume, failures
# ----------------------------------------------------------------------------------------------------------

def test_sweep_runs_then_skips_finished(tmp_path):
    runs = sweep.expand(small_grid())
    engine = FakeEngine()
    result = sweep.run_sweep(runs, tmp_path / "out", runner=engine, cwd=tmp_path, log=lambda *a: None)
    assert result.exit_code == 0 and len(result.done) == len(runs) and not result.failed
    assert len(engine.calls) == 2 * len(runs)
    for run in runs:
        d = tmp_path / "out" / run.name
        assert sweep.is_finished(d)
        assert (d / "sweep.log").read_text().count("fake") == 2
    again = FakeEngine()
    result = sweep.run_sweep(runs, tmp_path / "out", runner=again, cwd=tmp_path, log=lambda *a: None)
    assert again.calls == [] and len(result.skipped) == len(runs) and result.exit_code == 0


def test_sweep_resumes_unfinished_and_only_evaluates_trained(tmp_path):
    runs = sweep.expand(small_grid())
    out = tmp_path / "out"
    interrupted, trained, finished = runs[0], runs[1], runs[2]
    write_fake_run(out / interrupted.name, interrupted.settings, train=False, evaluate=False)
    write_fake_run(out / trained.name, trained.settings, train=True, evaluate=False)
    write_fake_run(out / finished.name, finished.settings, train=True, evaluate=True)
    engine = FakeEngine()
    result = sweep.run_sweep(runs[:3], out, runner=engine, cwd=tmp_path, log=lambda *a: None)
    assert engine.calls == [("train.py", interrupted.name), ("predict.py", interrupted.name),
                            ("predict.py", trained.name)]
    assert result.skipped == [finished.name] and result.done == [interrupted.name, trained.name]


def test_failing_run_does_not_stop_the_rest(tmp_path, capsys):
    runs = sweep.expand(small_grid())
    bad = runs[1].name
    engine = FakeEngine(fail={bad})
    result = sweep.run_sweep(runs, tmp_path / "out", runner=engine, cwd=tmp_path, log=print)
    assert [f[0] for f in result.failed] == [bad] and result.exit_code == 1
    assert len(result.done) == len(runs) - 1
    assert ("predict.py", bad) not in engine.calls          # no evaluation after a failed training
    assert "something broke" in (tmp_path / "out" / bad / "sweep.log").read_text()
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "something broke" in printed
    assert bad in sweep.summary_text(result)


def test_predict_failure_is_reported(tmp_path):
    runs = sweep.expand(small_grid())[:2]
    engine = FakeEngine(fail={runs[0].name}, fail_step="predict")
    result = sweep.run_sweep(runs, tmp_path / "out", runner=engine, cwd=tmp_path, log=lambda *a: None)
    assert result.failed[0][0] == runs[0].name and "predict.py" in result.failed[0][1]
    assert result.done == [runs[1].name]


def test_existing_run_with_other_settings_is_not_reused(tmp_path):
    runs = sweep.expand(small_grid())[:2]
    out = tmp_path / "out"
    write_fake_run(out / runs[0].name, {**runs[0].settings, "train.epochs": 2})   # swept with another setting
    engine = FakeEngine()
    result = sweep.run_sweep(runs, out, runner=engine, cwd=tmp_path, log=lambda *a: None)
    assert [f[0] for f in result.failed] == [runs[0].name] and "train.epochs" in result.failed[0][1]
    assert all(name != runs[0].name for _, name in engine.calls)
    # with the same --override the run matches and counts as finished
    result = sweep.run_sweep(runs[:1], out, extra={"train.epochs": 2}, runner=FakeEngine(), cwd=tmp_path,
                             log=lambda *a: None)
    assert result.skipped == [runs[0].name]


def test_main_cli_only_max_runs_dry_run_and_exit_code(tmp_path, capsys):
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    engine = FakeEngine()
    rc = sweep.main([str(grid_path), "--out", str(out), "--dry-run"], runner=engine)
    assert rc == 0 and engine.calls == [] and not out.exists()
    assert "train.py config/adrenalmnist3d.json" in capsys.readouterr().out

    rc = sweep.main([str(grid_path), "--out", str(out), "--only", "vessel", "--max-runs", "3",
                     "--override", "train.epochs=1"], runner=engine)
    assert rc == 0
    assert [n for s, n in engine.calls if s == "train.py"] == [
        "vesselmnist3d-lmttm-dim64-mem64-seed0", "vesselmnist3d-lmttm-dim64-mem64-seed1",
        "vesselmnist3d-lmttm-dim160-mem160-seed0"]
    cfg = json.loads((out / "vesselmnist3d-lmttm-dim64-mem64-seed0" / "config.json").read_text())
    assert cfg["train"]["epochs"] == 1 and cfg["model"]["dim"] == 64

    failing = FakeEngine(fail={"adrenalmnist3d-lmttm-dim64-mem64-seed0"})
    rc = sweep.main([str(grid_path), "--out", str(out), "--override", "train.epochs=1"], runner=failing)
    assert rc == 1
    text = capsys.readouterr().out
    assert "1 failed" in text and "adrenalmnist3d-lmttm-dim64-mem64-seed0" in text
    assert len([1 for s, _ in failing.calls if s == "train.py"]) == 16 - 3   # the three above were finished

    assert sweep.main([str(tmp_path / "missing.json")]) == 2   # unreadable grid: an error message, not a crash


def test_subprocess_runner_logs_and_returns_status(tmp_path):
    log = tmp_path / "run.log"
    rc = sweep.subprocess_runner([sys.executable, "-c", "import sys; print('hello'); sys.exit(4)"], tmp_path, log)
    assert rc == 4
    text = log.read_text()
    assert "hello" in text and "$ " in text


# ----------------------------------------------------------------------------------------------------------
# several runs at once (--jobs N, --devices)
# ----------------------------------------------------------------------------------------------------------

class MeetingEngine(FakeEngine):
    """A fake engine whose training step waits until `parties` trainings are running at the same time
    (a barrier: a sweep that runs them one after the other breaks it) and records when each step ran and
    on which device."""

    def __init__(self, parties, **kwargs):
        super().__init__(**kwargs)
        self.barrier = threading.Barrier(parties, timeout=20)
        self.steps = []           # (script, name, device, start, end)

    def __call__(self, cmd, cwd, log_path, env=None):
        script, _, s = parse_cmd(cmd)
        t0 = time.monotonic()
        if script == "train.py":
            self.barrier.wait()
        rc = super().__call__(cmd, cwd, log_path, env=env)
        self.steps.append((script, s["output.name"], s.get("train.device"), t0, time.monotonic()))
        return rc


def test_jobs_runs_overlap_devices_round_robin_and_threads(tmp_path, monkeypatch):
    runs = sweep.expand(small_grid())[:8]
    engine = MeetingEngine(4)
    monkeypatch.setattr(launch, "available_cores", lambda: 9)
    lines = []
    result = sweep.run_sweep(runs, tmp_path / "out", runner=engine, cwd=tmp_path, log=lines.append, jobs=4,
                             devices=["dev0", "dev1"])
    assert result.exit_code == 0 and result.done == [r.name for r in runs] and not result.failed
    assert sorted(engine.calls) == sorted([(s, r.name) for r in runs for s in ("train.py", "predict.py")])
    for run in runs:                  # each run: its own directory and log, train then predict
        d = tmp_path / "out" / run.name
        assert sweep.is_finished(d)
        assert (d / "sweep.log").read_text() == f"fake train.py {run.name}\nfake predict.py {run.name}\n"
        steps = [st for st in engine.steps if st[1] == run.name]
        assert [st[0] for st in steps] == ["train.py", "predict.py"] and steps[0][4] <= steps[1][3]
        assert steps[0][2] == steps[1][2]                       # both steps on the run's device
    # the four trainings that met at the barrier ran at once: their time intervals share a point
    first = sorted((st for st in engine.steps if st[0] == "train.py"), key=lambda st: st[3])[:4]
    assert max(st[3] for st in first) < min(st[4] for st in first)
    # 4 job slots over 2 devices: slots 0, 2 on dev0 and 1, 3 on dev1, so two runs per device at any time
    assert sorted(st[2] for st in first) == ["dev0", "dev0", "dev1", "dev1"]
    assert sorted(st[2] for st in engine.steps if st[0] == "train.py") == ["dev0"] * 4 + ["dev1"] * 4
    # CPU threads: 9 cores // 4 jobs
    assert {env["OMP_NUM_THREADS"] for _, _, env in engine.envs} == {"2"}
    assert {env["MKL_NUM_THREADS"] for _, _, env in engine.envs} == {"2"}
    # the console: one line per run start and one per end, nothing from the runs themselves
    assert len(lines) == 2 * len(runs) and all("fake" not in line for line in lines)
    assert sum(": started (training, dev" in line for line in lines) == len(runs)
    assert sum(": done in" in line for line in lines) == len(runs)
    # the device is no setting of the run: a later sweep without --devices finds them finished
    again = FakeEngine()
    result = sweep.run_sweep(runs, tmp_path / "out", runner=again, cwd=tmp_path, log=lambda *a: None)
    assert again.calls == [] and result.skipped == [r.name for r in runs]


def test_jobs_failure_does_not_stop_the_others_and_summary_lists_every_run(tmp_path, capsys):
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    names = [r.name for r in sweep.expand(small_grid())]
    finished, bad = names[0], names[3]
    write_fake_run(out / finished, sweep.expand(small_grid())[0].settings, config="adrenalmnist3d.json")
    engine = MeetingEngine(2, fail={bad})
    rc = sweep.main([str(grid_path), "--out", str(out), "--jobs", "2", "--threads", "3", "--max-runs", "6",
                     "--devices", "cpu"], runner=engine)
    assert rc == 1
    printed = capsys.readouterr().out
    started = [n for s, n in engine.calls if s == "train.py"]
    assert sorted(started) == sorted(names[1:7])                 # --max-runs 6: the 6 unfinished runs after names[0]
    assert ("predict.py", bad) not in engine.calls and {env["OMP_NUM_THREADS"] for *_, env in engine.envs} == {"3"}
    assert {st[2] for st in engine.steps} == {"cpu"}            # one device: every slot uses it
    summary = printed[printed.index("sweep: "):]
    assert summary.splitlines()[0] == ("sweep: 5 run(s) done now, 1 finished before, 1 failed, "
                                       "9 not started (--max-runs)")
    outcomes = dict(line.strip().split(": ", 1) for line in summary.splitlines()[1:17])
    assert list(outcomes) == names                               # every run, in grid order
    assert outcomes[finished] == "finished before, skipped"
    assert outcomes[bad].startswith("FAILED: train.py exited with status 3")
    assert [n for n, o in outcomes.items() if o == "done"] == [n for n in names[1:7] if n != bad]
    assert [n for n, o in outcomes.items() if o == "not started (--max-runs)"] == names[7:]
    assert "something broke" in summary                          # the end of the failed run's log
    assert printed.count("FAILED") == 2                          # its console line and its summary line


def test_jobs_dry_run_bad_options_and_jobs_one_unchanged(tmp_path, capsys):
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    engine = FakeEngine()
    assert sweep.main([str(grid_path), "--out", str(out), "--jobs", "3", "--devices", "cuda:0,cuda:1",
                       "--dry-run", "--max-runs", "4"], runner=engine) == 0
    printed = capsys.readouterr().out
    assert engine.calls == [] and not out.exists()
    # the k-th run starts on job slot k mod 3, whose device is cuda:(slot mod 2)
    assert [line.split("--train.device ")[1].split()[0] for line in printed.splitlines()
            if "train.py" in line] == ["cuda:0", "cuda:1", "cuda:0", "cuda:0"]
    for bad in (["--jobs", "0"], ["--threads", "-1"], ["--devices", "cuda:0,,cuda:1"],
                ["--devices", "cuda:0", "--override", "train.device=cpu"]):
        assert sweep.main([str(grid_path), "--out", str(out), *bad], runner=engine) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    # --jobs 1 (the default): the runner gets no environment, so the commands run as before
    assert sweep.main([str(grid_path), "--out", str(out), "--max-runs", "2"], runner=engine) == 0
    assert engine.envs == [] and len(engine.calls) == 4
    assert "run(s) at once" not in capsys.readouterr().out


CHILD = """
import os, signal, sys, time
marker = sys.argv[1]
got = []
def handler(signum, frame):
    got.append(signum)
    with open(marker, "a") as f:
        f.write(f"signal {signal.Signals(signum).name}\\n")
signal.signal(signal.SIGINT, handler)
signal.signal(signal.SIGTERM, handler)
with open(marker, "a") as f:
    f.write(f"started {os.getpid()}\\n")
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.3)          # a second signal in this window would be recorded
sys.exit(130 if got == [signal.SIGINT] else 143 if got else 0)
"""


@pytest.mark.parametrize("sig, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")])
def test_jobs_interrupt_stops_every_child_once(tmp_path, capsys, sig, code, name):
    """Ctrl-C (or SIGTERM) to the sweep: each running child gets the signal exactly once (the real
    subprocess runner, children in their own process groups), no new run starts, the exit status says so."""
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    markers = tmp_path / "markers"
    markers.mkdir()

    def runner(cmd, cwd, log_path, env=None):
        name_ = parse_cmd(cmd)[2]["output.name"]
        return sweep.subprocess_runner([sys.executable, "-c", CHILD, str(markers / name_)], cwd, log_path, env=env)

    def interrupt():
        deadline = time.time() + 30
        while len(list(markers.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(os.getpid(), sig)

    killer = threading.Thread(target=interrupt)
    killer.start()
    rc = sweep.main([str(grid_path), "--out", str(out), "--jobs", "2"], runner=runner)
    killer.join()
    assert rc == code
    texts = {m.name: m.read_text() for m in markers.iterdir()}
    assert len(texts) == 2                                       # the two running runs; nothing started after
    for text in texts.values():
        assert text.splitlines()[1:] == [f"signal {name}"]       # exactly once each
        pid = int(text.split()[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)                                      # and it has ended
    printed = capsys.readouterr().out
    assert "interrupted" in printed and "resume" in printed
    assert printed.count(f"not started ({'Ctrl-C' if sig == signal.SIGINT else 'SIGTERM'})") == 14
    assert printed.count("stopped by") >= 2


DRIVER = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tools import sweep
markers = Path(sys.argv[2])
def runner(cmd, cwd, log_path, env=None):
    name = cmd[cmd.index("--output.name") + 1]
    return sweep.subprocess_runner([sys.executable, "-c", sys.argv[3], str(markers / name)], cwd, log_path, env=env)
sys.exit(sweep.main(sys.argv[4:], runner=runner))
"""


def test_jobs_terminal_ctrl_c_reaches_each_child_once(tmp_path):
    """Ctrl-C in a terminal signals the whole foreground process group: the sweep's children (in their own
    groups) still get SIGINT once, from the sweep, and the sweep exits 130 with one line, no traceback."""
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT), str(markers), CHILD, str(grid_path),
                             "--out", str(tmp_path / "runs"), "--jobs", "2"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while len(list(markers.iterdir())) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)                       # what the terminal does
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    texts = [m.read_text() for m in markers.iterdir()]
    assert len(texts) == 2 and all(t.splitlines()[1:] == ["signal SIGINT"] for t in texts)
    assert "interrupted (Ctrl-C)" in out and out.count("not started (Ctrl-C)") == 14


TINY_REAL = {"model.dim": 16, "model.memory_tokens": 16, "model.heads": 2, "train.batch_size": 8,
             "eval.batch_size": 8, "train.epochs": 1, "data.download": False}


@pytest.mark.filterwarnings("ignore:.*differ from the official")
def test_jobs_two_real_engine_equals_jobs_one(tmp_path, monkeypatch):
    """A real tiny grid (two seeds, fake MedMNIST file) with --jobs 2 through train.py and predict.py in
    subprocesses; the same grid swept one run at a time gives the same metrics and scores."""
    from helpers import write_fake_medmnist

    import predict
    import train

    root = tmp_path / "data"
    write_fake_medmnist(root, "adrenalmnist3d", n=(16, 8, 8))
    grid = {"name": "real", "datasets": ["adrenalmnist3d"], "seeds": [0, 1], "overrides": TINY_REAL}
    runs = sweep.expand(grid)
    extra = {"data.root": str(root)}
    times = {}

    def timed(cmd, cwd, log_path, env=None):
        t0 = time.monotonic()
        rc = sweep.subprocess_runner(cmd, cwd, log_path, env=env)
        times[(Path(cmd[1]).name, parse_cmd(cmd)[2]["output.name"])] = (t0, time.monotonic())
        return rc

    par = sweep.run_sweep(runs, tmp_path / "jobs2", extra=extra, runner=timed, log=lambda *a: None, jobs=2,
                          devices=["cpu", "cpu"], threads=1)
    assert par.exit_code == 0 and par.done == [r.name for r in runs]
    (s0, e0), (s1, e1) = times[("train.py", runs[0].name)], times[("train.py", runs[1].name)]
    assert max(s0, s1) < min(e0, e1)                             # the two trainings overlapped

    def in_process(cmd, cwd, log_path):                          # the --jobs 1 reference, without the imports
        with open(log_path, "a") as log:
            log.write("in process\n")
        return (train if cmd[1] == "train.py" else predict).main(cmd[2:])

    monkeypatch.chdir(ROOT)
    seq = sweep.run_sweep(runs, tmp_path / "jobs1", extra=extra, runner=in_process, log=lambda *a: None)
    assert seq.exit_code == 0 and seq.done == [r.name for r in runs]
    for run in runs:
        a, b = tmp_path / "jobs2" / run.name, tmp_path / "jobs1" / run.name
        ma, mb = (json.loads((d / "eval" / "test" / "metrics.json").read_text()) for d in (a, b))
        assert (ma["auc"], ma["acc"]) == (mb["auc"], mb["acc"])
        pa, pb = (np.load(d / "eval" / "test" / "predictions.npz") for d in (a, b))
        np.testing.assert_array_equal(pa["y_score"], pb["y_score"])
        with open(a / "metrics.csv") as fa, open(b / "metrics.csv") as fb:
            ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
        assert [{k: v for k, v in r.items() if k != "time_s"} for r in ra] == \
            [{k: v for k, v in r.items() if k != "time_s"} for r in rb]
        assert json.loads((a / "config.json").read_text())["train"]["device"] == "cpu"
        log_text = (a / "sweep.log").read_text()
        assert log_text.count("$ ") == 2 and f"--output.name {run.name}" in log_text
        assert all(f"--output.name {other.name}" not in log_text for other in runs if other is not run)
    # the seeds differ, so the two runs are not the same run twice
    assert not np.array_equal(*(np.load(tmp_path / "jobs2" / r.name / "eval" / "test" / "predictions.npz")
                                ["y_score"] for r in runs))


# ----------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------

def agg_grid():
    return {"name": "agg", "datasets": ["ds1", "ds2"], "seeds": [0, 1, 2],
            "variants": [{"label": "ttm", "title": "TTM", "overrides": {"model.name": "ttm"}},
                         {"label": "lmttm", "title": "LMTTM", "overrides": {"model.name": "lmttm"}}],
            "table": {"rows": ["variant"], "cols": ["dataset"], "average_over": "dataset"},
            "paper": {"source": "test", "values": {"ds1-lmttm": {"auc": 0.81, "acc": 0.7},
                                                   "mean-ttm": {"acc": 0.5}}}}


def make_agg_runs(out):
    runs = {r.name: r for r in sweep.expand(agg_grid())}
    for seed, auc in zip((0, 1, 2), (0.80, 0.82, 0.84)):
        r = runs[f"ds1-lmttm-seed{seed}"]
        write_fake_run(out / r.name, r.settings, auc=auc, acc=0.7)
    write_fake_run(out / "ds1-ttm-seed0", runs["ds1-ttm-seed0"].settings, auc=0.6, acc=0.55)
    write_fake_run(out / "ds2-ttm-seed0", runs["ds2-ttm-seed0"].settings, auc=0.7, acc=0.65)
    write_fake_run(out / "ds2-ttm-seed1", runs["ds2-ttm-seed1"].settings, auc=0.9, acc=0.85)
    # unfinished (no eval) and one with other settings: neither counts
    write_fake_run(out / "ds2-lmttm-seed0", runs["ds2-lmttm-seed0"].settings, evaluate=False)
    r = runs["ds2-lmttm-seed1"]     # swept with --override train.epochs=2 (the grid does not set epochs)
    write_fake_run(out / r.name, {**r.settings, "train.epochs": 2}, config=r.config)
    r = runs["ds2-lmttm-seed2"]     # a directory of another model
    write_fake_run(out / r.name, {**r.settings, "model.name": "ttm"})


def test_aggregate_mean_std_seeds_missing_paper_and_diff(tmp_path):
    make_agg_runs(tmp_path)
    agg = aggregate.aggregate(agg_grid(), tmp_path)
    cells = {c.name: c for c in agg.cells}
    assert list(cells) == ["ds1-ttm", "ds1-lmttm", "ds2-ttm", "ds2-lmttm", "mean-ttm", "mean-lmttm"]
    c = cells["ds1-lmttm"]
    assert c.n == 3 and c.status == "complete"
    assert c.mean("auc") == pytest.approx(0.82) and c.std("auc") == pytest.approx(0.02)   # ddof = 1
    assert c.diff("auc") == pytest.approx(0.01) and c.diff("acc") == pytest.approx(0.0)
    assert cells["ds1-ttm"].n == 1 and cells["ds1-ttm"].std("auc") is None
    assert aggregate.fmt_ours(cells["ds1-ttm"], "auc") == "0.600 ± n/a"
    assert cells["ds2-lmttm"].n == 0 and cells["ds2-lmttm"].status == "missing"
    assert aggregate.fmt_ours(cells["ds2-lmttm"], "auc") == "missing"
    assert cells["ds2-ttm"].status == "partial" and cells["ds2-ttm"].mean("acc") == pytest.approx(0.75)
    # mean over datasets on the seeds every dataset has: ttm seed 0 only
    assert cells["mean-ttm"].seeds == [0] and cells["mean-ttm"].mean("auc") == pytest.approx(0.65)
    assert cells["mean-ttm"].diff("acc") == pytest.approx(0.1)
    assert cells["mean-lmttm"].n == 0
    assert [n for n, _ in agg.excluded] == ["ds2-lmttm-seed1", "ds2-lmttm-seed2"]
    assert "train.epochs" in agg.excluded[0][1] and "model.name" in agg.excluded[1][1]
    # aggregated with the same --override, the epochs=2 run counts
    agg = aggregate.aggregate(agg_grid(), tmp_path, {"train.epochs": 2})
    assert {c.name: c.n for c in agg.cells}["ds2-lmttm"] == 1
    assert "ds2-lmttm-seed0" in agg.unfinished


def test_aggregate_writes_markdown_and_csv(tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "tables"
    make_agg_runs(runs_dir)
    grid_path = tmp_path / "agg.json"
    grid_path.write_text(json.dumps(agg_grid()))
    assert aggregate.main([str(grid_path), "--runs", str(runs_dir), "--out", str(out)]) == 0
    with open(out / "table.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    r = rows["ds1-lmttm"]
    assert r["n_seeds"] == "3" and r["seeds"] == "0 1 2" and r["status"] == "complete"
    assert float(r["auc_mean"]) == pytest.approx(0.82) and float(r["auc_std"]) == pytest.approx(0.02)
    assert float(r["paper_auc"]) == pytest.approx(0.81) and float(r["diff_auc"]) == pytest.approx(0.01)
    assert r["param_count"] == "1234"
    assert rows["ds2-lmttm"]["n_seeds"] == "0" and rows["ds2-lmttm"]["status"] == "missing"
    assert rows["ds2-lmttm"]["auc_mean"] == "" and rows["ds1-ttm"]["paper_auc"] == ""
    md = (out / "table.md").read_text()
    assert "0.820 ± 0.020" in md and "+0.010" in md and "0.600 ± n/a" in md and "missing" in md
    assert "| LMTTM |" in md and "n/a" in md and "excluded ds2-lmttm-seed1" in md
    assert "ddof = 1" in md


# ----------------------------------------------------------------------------------------------------------
# the shipped grids
# ----------------------------------------------------------------------------------------------------------

EXPECTED_RUNS = {"table2": 6 * 14 * 3, "table4": 2 * 3 * 3, "table5": 2 * 3 * 3, "table6": 2 * 3 * 3,
                 "table7": 6 * 7 * 3, "table8": 2 * 2 * 16 * 3, "table9": 2 * 2 * 3 * 3}


def test_shipped_grids_are_all_there():
    assert {p.stem for p in EXPERIMENTS} >= set(EXPECTED_RUNS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_grid_expands_and_its_configs_exist(path):
    grid = sweep.load_grid(path)
    runs = sweep.validate_grid(grid)
    assert grid["name"] == path.stem
    if path.stem in EXPECTED_RUNS:
        assert len(runs) == EXPECTED_RUNS[path.stem]
    assert all(r.seed in (0, 1, 2) for r in runs)
    missing = sorted({r.config for r in runs if not r.config_path.is_file()})
    assert not missing, f"config files missing under config/: {missing}"
    assert (grid.get("paper") or {}).get("values"), "a shipped grid carries the paper's values"


def test_table9_cells_are_table8_cells():
    g8, g9 = (sweep.load_grid(ROOT / "experiments" / f"table{i}.json") for i in (8, 9))
    runs8 = {r.name: r.settings for r in sweep.expand(g8)}
    assert sweep.runs_dir_of(g9) == sweep.runs_dir_of(g8)
    for r in sweep.expand(g9):
        assert runs8[r.name] == r.settings


def test_shipped_grid_settings_resolve_in_the_engine():
    """Every run's config file + overrides is a valid engine config (keys, types, model names)."""
    config = pytest.importorskip("engine.config")
    seen = set()
    for path in EXPERIMENTS:
        for r in sweep.expand(sweep.load_grid(path)):
            key = (r.config, json.dumps({k: v for k, v in r.settings.items() if k != "train.seed"}, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            cfg = config.load_config(r.config_path, nested(r.settings))
            assert cfg.data.name == r.dataset
            assert cfg.model_name == r.settings.get("model.name", cfg.model_name)
            for k, v in r.settings.items():
                section, _, name = k.partition(".")
                got = config.config_to_dict(cfg)[section][name]
                assert got == v or got == pytest.approx(v), f"{path.stem} {r.name}: {k} = {got!r}, wanted {v!r}"


# ----------------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------------

def test_plots_without_matplotlib_give_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plots.MissingDependency, match="pip install matplotlib"):
        plots._pyplot()


def test_run_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    binary = tmp_path / "binary"
    write_fake_run(binary, {"data.name": "adrenalmnist3d"})
    written = plots.plot_run(binary)
    assert {p.name for p in written} == {"curves.png", "roc_test.png"}
    multi = tmp_path / "multi"
    write_fake_run(multi, {"data.name": "fracturemnist3d"})
    y = np.array([0, 1, 2] * 4)
    scores = np.random.default_rng(1).dirichlet(np.ones(3), size=len(y))
    np.savez(multi / "eval" / "test" / "predictions.npz", y_true=y, y_score=scores)
    assert plots.plot_roc(multi) == multi / "roc_test.png"
    for p in written + [multi / "roc_test.png"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.plot_run(tmp_path / "empty") == []


def test_table_plots_bars_and_heatmaps(tmp_path):
    pytest.importorskip("matplotlib")
    grid = {"name": "heat", "datasets": ["adrenalmnist3d"], "seeds": [0],
            "axes": {"model.name": ["ttm", "lmttm"], "model.memory_tokens": [64, 160], "model.dim": [64, 160]},
            "table": {"groups": ["dataset"], "rows": ["model.memory_tokens"], "cols": ["model.dim", "model.name"],
                      "heatmap": {"rows": "model.memory_tokens", "cols": "model.dim", "panels": "model.name"}},
            "paper": {"values": {"adrenalmnist3d-ttm-mem64-dim64": {"acc": 0.771}}}}
    runs_dir = tmp_path / "runs"
    for i, r in enumerate(sweep.expand(grid)):
        if r.name != "adrenalmnist3d-lmttm-mem160-dim160-seed0":   # one seed missing somewhere
            write_fake_run(runs_dir / r.name, r.settings, auc=0.7 + 0.01 * i, acc=0.75 + 0.005 * i)
    grid_path = tmp_path / "heat.json"
    grid_path.write_text(json.dumps(grid))
    out = tmp_path / "tables"
    assert aggregate.main([str(grid_path), "--runs", str(runs_dir), "--out", str(out), "--plots"]) == 0
    assert (out / "bars.png").is_file() and (out / "heatmap_adrenalmnist3d.png").is_file()
    assert (runs_dir / "adrenalmnist3d-ttm-mem64-dim64-seed0" / "curves.png").is_file()
    assert (runs_dir / "adrenalmnist3d-ttm-mem64-dim64-seed0" / "roc_test.png").is_file()
    md = (out / "table.md").read_text()
    assert "### ACC — dataset adrenalmnist3d" in md and "0.771" in md


# ----------------------------------------------------------------------------------------------------------
# what the sweep says about its runs
# ----------------------------------------------------------------------------------------------------------

def test_non_utf8_grid_is_a_clear_error(tmp_path, capsys):
    grid_path = tmp_path / "latin1.json"
    grid_path.write_bytes(json.dumps(small_grid(description="caf\u00e9"), ensure_ascii=False).encode("latin-1"))
    assert sweep.main([str(grid_path), "--list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "UTF-8" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_summary_and_status_give_each_finished_runs_test_metrics(tmp_path, capsys, jobs):
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    runs = sweep.expand(small_grid())
    before = runs[2]                      # finished before this sweep: AUC 0.61, ACC 0.52
    write_fake_run(out / before.name, before.settings, auc=0.61, acc=0.52, config=before.config)
    assert sweep.main([str(grid_path), "--out", str(out), "--max-runs", "2", "--jobs", jobs],
                      runner=FakeEngine()) == 0
    summary = capsys.readouterr().out.split("finished runs:\n")[1].splitlines()
    # FakeEngine's predict.py writes AUC 0.7 + 0.01 * seed and ACC 0.75
    assert [line.split() for line in summary] == [
        [runs[0].name, "test", "AUC", "0.700,", "ACC", "0.750"], [runs[1].name, "test", "AUC", "0.710,", "ACC", "0.750"],
        [before.name, "test", "AUC", "0.610,", "ACC", "0.520"]]
    assert sweep.main([str(grid_path), "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"{runs[1].name}: finished: test AUC 0.710, ACC 0.750"
    assert lines[2] == f"{before.name}: finished: test AUC 0.610, ACC 0.520" and lines[3] == f"{runs[3].name}: new"


def test_one_meaning_of_finished_for_list_status_dry_run_and_sweep(tmp_path, capsys):
    """A finished run made with other settings is 'mismatch' in --list and --status and FAILED in --dry-run
    and the sweep, never 'finished'."""
    grid_path = tmp_path / "small.json"
    grid_path.write_text(json.dumps(small_grid()))
    out = tmp_path / "runs"
    run = sweep.expand(small_grid())[0]
    write_fake_run(out / run.name, {**run.settings, "train.epochs": 2}, config=run.config)   # --override earlier
    only = ["--out", str(out), "--only", run.name]
    assert sweep.main([str(grid_path), *only, "--list"]) == 0
    assert capsys.readouterr().out.split() == ["mismatch", run.name]
    assert sweep.main([str(grid_path), *only, "--status"]) == 0
    assert capsys.readouterr().out.startswith(f"{run.name}: mismatch: existing run directory has other settings "
                                              "(train.epochs: run has 2, wanted 5")
    for extra in (["--dry-run"], []):
        engine = FakeEngine()
        assert sweep.main([str(grid_path), *only, *extra], runner=engine) == 1
        printed = capsys.readouterr().out
        assert engine.calls == [] and f"{run.name}: FAILED: existing run directory has other settings" in printed
    # with the override it was made with, it is finished everywhere
    assert sweep.main([str(grid_path), *only, "--override", "train.epochs=2", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["finished", run.name]
