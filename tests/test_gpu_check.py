"""tools/gpu_check.py: the import list against the code, deadlines that stop what a stage started, the carry,
and the whole call rehearsed on the CPU (the same stages and files as on a GPU machine, at tiny sizes)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from helpers import write_fake_medmnist

from tools import gpu_check

REPO = Path(__file__).resolve().parent.parent
OURS = {"data", "engine", "model", "tools", "train", "predict", "helpers", "reference", "conftest", "tests"}


def third_party_imports() -> dict[str, str]:
    """Top-level names of every import in the project's Python files (functions included) that are neither the
    standard library nor the project's own modules -> a file that imports it."""
    found = {}
    for path in sorted(REPO.rglob("*.py")):
        if any(part.startswith(".") or part in ("venv", "runs", "sweeps") for part in path.relative_to(REPO).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OURS and not top.startswith("test_"):
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_the_module_lists_cover_every_third_party_import():
    imported = third_party_imports()
    assert {"torch", "numpy", "einops", "medmnist", "nibabel"} <= set(imported)  # the scan sees them
    unlisted = {name: where for name, where in imported.items()
                if name not in gpu_check.REQUIRED and name not in gpu_check.OPTIONAL}
    assert not unlisted, f"imports gpu_check does not check on the GPU machine: {unlisted}"


def test_a_stage_past_its_deadline_is_stopped_with_what_it_started(tmp_path):
    """The child starts a grandchild in a session of its own (as sweep.py starts runs); both are gone after."""
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    code = gpu_check.run_until([sys.executable, "-c", script], tmp_path / "log", time.monotonic() + 3)
    assert code == "timeout" and time.monotonic() - t0 < 3 + gpu_check.GRACE_S
    assert "stopped at its deadline" in (tmp_path / "log").read_text()
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    stat = Path(f"/proc/{grandchild}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or a zombie
    assert gpu_check.run_until([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log2",
                               time.monotonic() + 60) == 3


def test_build_carry_copies_the_data_and_refuses_a_missing_file(tmp_path, capsys):
    source = write_fake_medmnist(tmp_path / "root", "adrenalmnist3d", n=(4, 2, 2))
    assert gpu_check.main(["--build-carry", str(tmp_path / "carry"), "--data-root", str(tmp_path / "root"),
                           "--no-wheels"]) == 0
    assert (tmp_path / "carry" / "data" / "adrenalmnist3d.npz").read_bytes() == source.read_bytes()
    assert "carry in all" in capsys.readouterr().out
    assert gpu_check.main(["--build-carry", str(tmp_path / "c2"), "--data-root", str(tmp_path / "nowhere"),
                           "--no-wheels"]) == 1
    assert "does not exist" in capsys.readouterr().err


def write_probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, to rehearse the offline install without a download."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpucheck_probe-1.0-py3-none-any.whl"
    files = {"gpucheck_probe/__init__.py": "VERSION = '1.0'\n",
             "gpucheck_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 1.0\n",
             "gpucheck_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n"}
    files["gpucheck_probe-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "gpucheck_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


def test_rehearsal_runs_every_stage_and_returns_the_files(tmp_path):
    write_fake_medmnist(tmp_path / "root", "adrenalmnist3d", n=(32, 8, 8))
    assert gpu_check.main(["--build-carry", str(tmp_path / "carry"), "--data-root", str(tmp_path / "root"),
                           "--no-wheels"]) == 0
    write_probe_wheel(tmp_path / "carry" / "wheels")
    work, out = tmp_path / "work", tmp_path / "out"
    budget = [arg for stage in gpu_check.STAGES for arg in ("--budget", f"{stage}=600")]
    done = subprocess.run([sys.executable, "tools/gpu_check.py", "--rehearse", "--carry", str(tmp_path / "carry"),
                           "--work", str(work), "--out", str(out), "--tests-k", "rng_state_round_trip",
                           "--total", "3000", *budget], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tar.gz", "report.json", "summary.md"]
    report = json.loads((out / "report.json").read_text())
    assert {name: s["status"] for name, s in report["stages"].items()} == {name: "ok" for name in gpu_check.STAGES}
    assert report["installed"] == ["gpucheck_probe-1.0-py3-none-any.whl"]
    assert (work / "site" / "gpucheck_probe" / "__init__.py").is_file()
    assert report["tests"]["tests"] == 1 and report["tests"]["failures"] == 0
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    for model in ("lmttm", "ttm"):
        run = f"gpu_check/cells/adrenalmnist3d-{model}-seed0"
        assert {f"{run}/metrics.csv", f"{run}/train_summary.json", f"{run}/eval/test/metrics.json",
                f"{run}/eval/test-last1/metrics.json"} <= names
        # the reported test AUC is the AUC of the saved scores (binary: the positive class's probability)
        saved = np.load(work / "cells" / f"adrenalmnist3d-{model}-seed0" / "eval" / "test" / "predictions.npz")
        row = next(r for r in report["cells"] if r["run"].endswith(f"-{model}-seed0"))
        assert row["epochs_done"] == 1 and row["finished"] is True
        assert row["test_auc"] == pytest.approx(roc_auc_score(saved["y_true"].ravel(), saved["y_score"][:, 1]))
    bench = json.loads((work / "collect" / "bench" / "compiled-bf16.json").read_text())
    rows = bench["devices"]["cpu"]["rows"]
    assert len(rows) == 1 and "error" not in rows[0] and rows[0]["precision"] == "bf16"
    assert rows[0]["compile"] == "default"
    assert "| setup | ok |" in (out / "summary.md").read_text()
