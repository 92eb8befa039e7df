"""<run dir>/train.log (what a run printed, one header per invocation, appended across resumes) and a quiet
end when the reader of the output goes away (`train.py ... | head`)."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

import train
from engine import runlog

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32"]


def headers(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("==== ")]


def test_train_log_holds_what_each_invocation_printed_after_its_header(tmp_path, capsys):
    args = ["demo.json", *TINY, "--output.dir", str(tmp_path), "--output.name", "run"]
    with runlog.capture():
        assert train.main([*args, "--train.epochs", "1"]) == 0
    first = capsys.readouterr().out
    with runlog.capture():
        assert train.main([*args, "--train.epochs", "2"]) == 0  # resumes
    second = capsys.readouterr().out
    log = (tmp_path / "run" / "train.log").read_text()
    (h1, h2) = headers(log)
    for h, epochs in ((h1, "1"), (h2, "2")):
        assert h.endswith(f"python train.py {' '.join(args)} --train.epochs {epochs}")
        assert f"host {socket.gethostname()}" in h and f"python {platform.python_version()}" in h
        assert f"torch {torch.__version__}" in h
    assert log == f"{h1}\n{first}{h2}\n{second}"  # exactly what was printed, in order
    assert "epoch   1/1" in first and "resuming" in second and "epoch   2/2" in second
    with runlog.capture():  # --restart: the old folder keeps its log, the new one starts its own
        assert train.main([*args, "--train.epochs", "1", "--restart"]) == 0
    third = capsys.readouterr().out
    (aside,) = tmp_path.glob("run.old-*")
    assert (aside / "train.log").read_text() == log
    (h3,) = headers((tmp_path / "run" / "train.log").read_text())
    assert h3.endswith("--train.epochs 1 --restart") and "--restart: moved the previous run to" in third
    assert (tmp_path / "run" / "train.log").read_text() == f"{h3}\n{third}"


SCRIPT = """
import sys, warnings
from pathlib import Path
from engine import runlog
run_dir = Path(sys.argv[1])
with runlog.capture():
    runlog.attach(run_dir, "train.py", ["demo.json"])
    print("before the folder")
    warnings.warn("a test warning")
    sys.stderr.write("\\repoch 1/2:  50%|#####     | 1/2\\r")
    run_dir.mkdir()
    print("folder made, run not started")
    runlog.start(run_dir)  # RunDirectory.begin: the run owns its folder and writes
    print("after", file=sys.stderr)
print("after the capture")
"""


def test_the_log_starts_when_the_run_starts_writing_and_keeps_warnings_but_not_progress_bars(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    log = (run_dir / "train.log").read_text().splitlines()
    assert log[0].startswith("==== ") and log[0].endswith("python train.py demo.json")
    assert log[1] == "before the folder" and "UserWarning: a test warning" in log[2]
    assert log[-2] == "folder made, run not started"  # written once the run starts, not before
    assert log[-1] == "after" and not any("50%" in line or "capture" in line for line in log)


def test_nothing_is_written_without_attach_or_run_directory(tmp_path):
    with runlog.capture():
        print("predict.py does not attach")
    with runlog.capture():
        runlog.attach(tmp_path / "never", "train.py", [])
        print("a config error")
    assert not any(tmp_path.iterdir())


def test_a_closed_output_pipe_ends_train_and_predict_quietly(tmp_path):
    args = ["demo.json", *TINY, "--output.dir", str(tmp_path), "--output.name", "run"]
    with runlog.capture():
        assert train.main([*args, "--train.epochs", "1"]) == 0
    for script, extra, lines in (("train.py", ["--train.epochs", "2"], 1), ("predict.py", [], 0)):
        proc = subprocess.Popen([sys.executable, script, *args, *extra], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for _ in range(lines):  # `| head -1`: one line, then the reader is gone
            assert proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 141, err
        assert err == "", f"{script} wrote to stderr: {err!r}"
    log = (tmp_path / "run" / "train.log").read_text()
    assert len(headers(log)) == 2
    assert log.endswith("\nstopped: the output's reader went away (broken pipe)\n")
