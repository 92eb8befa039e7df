"""The CUDA path in one prepared call on a GPU machine that has torch but not this project's other requirements.

    python tools/gpu_check.py --build-carry .gpu_carry --data-root ~/.medmnist   # here: wheels + data, sizes
    python3 tools/gpu_check.py --carry .gpu_carry --out "$OUT"                   # there: every stage
    python3 tools/gpu_check.py --carry .gpu_carry --out "$OUT" --stages cells,evaluate --budget cells=420
    python tools/gpu_check.py --rehearse                                         # the same on this CPU, tiny

Stages, in order, each with its own deadline (`--budget STAGE=SECONDS`) inside a total (`--total`, default
540 s, so that one call fits a 600 s command limit); a stage that runs out is stopped (SIGTERM, then SIGKILL
of everything it started), recorded as `timeout`, and the next one still runs:

* setup: what is importable before and after installing the carried wheels offline (`pip install --no-index
  --no-deps --target`; pure-Python wheels only), the torch APIs the project uses, the GPU;
* bench: tools/benchmark.py, one call per group (LMTTM / TTM at D = M = 64 and 448; fp32, TF32, bf16; eager and
  compiled), most important first, so a timeout loses the last groups only; alone on the GPU;
* cells: the paper-size AdrenalMNIST3D cells of experiments/table2.json (LMTTM and TTM, D = M = 448, 100 epochs,
  Adam 1e-4, batch 32), all seeds at once on the one GPU (`tools/sweep.py --jobs`), keeping the last k epochs;
  they train in the background until their deadline (which leaves the evaluation its time) while
* tests: `pytest -m device --device cuda` (tests/test_device.py: end to end, exact resume, AMP, compile, compat,
  scan forms, RNG) runs;
* evaluate: predict.py on best.pt of every run (finished or stopped) and `--last-k k` where k epochs exist;
* collect (after every stage, so a killed call still leaves files): `$OUT/report.json`, `$OUT/summary.md` and
  `$OUT/gpu_check.tar.gz` (logs, the tests' JUnit XML, benchmark tables and JSON, and of each run `metrics.csv`,
  `train_summary.json`, `eval/*/metrics.json`): three files, as the machine returns at most eight.

`--rehearse` runs the same stages on the CPU at tiny sizes (a fake AdrenalMNIST3D file unless the carry has
data, a dim-16 model, 1 epoch, k = 1, one tiny benchmark case) into a temporary folder; tests/test_gpu_check.py keeps
it working. This file imports only the standard library: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# pure-Python wheels, versions from requirement.txt (submitit: tests/test_sweep_cluster.py imports it)
CARRIED = ["medmnist", "nibabel", "einops", "tqdm", "submitit"]
DATA_FILES = ["adrenalmnist3d.npz"]
CARRY_LIMIT_MIB = 64  # the working tree and the carried paths together
# module -> distribution; the project imports these (tests/test_gpu_check.py checks the list against the code)
REQUIRED = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", "pandas": "pandas", "sklearn": "scikit-learn",
            "PIL": "pillow",
            "einops": "einops", "tqdm": "tqdm", "medmnist": "medmnist", "nibabel": "nibabel", "pytest": "pytest"}
OPTIONAL = {"matplotlib": "matplotlib", "tensorboard": "tensorboard", "submitit": "submitit",
            "mamba_ssm": "mamba-ssm", "joblib": "joblib"}
# every torch attribute the project relies on that is not plain tensor arithmetic, and keyword arguments
TORCH_APIS = ["compile", "autocast", "utils.flop_counter.FlopCounterMode", "nn.functional.scaled_dot_product_attention",
              "random.fork_rng", "cuda.get_rng_state_all", "cuda.set_rng_state", "backends.cuda.matmul.allow_tf32",
              "backends.cudnn.allow_tf32", "use_deterministic_algorithms",
              "is_deterministic_algorithms_warn_only_enabled", "nn.TransformerEncoderLayer", "nn.init.trunc_normal_",
              "distributed.run", "autograd.function.once_differentiable"]
TORCH_KWARGS = {"load": ["weights_only", "mmap", "map_location"], "use_deterministic_algorithms": ["warn_only"],
                "compile": ["mode", "backend"], "random.fork_rng": ["devices"]}
STAGES = ["setup", "bench", "cells", "tests", "evaluate"]  # the cells train in the background during the tests
BUDGET = {"setup": 40, "bench": 150, "cells": 310, "tests": 110, "evaluate": 30}
COLLECT_RESERVE_S = 10
GRACE_S = 20  # after SIGTERM (train.py saves nothing half-written and exits 143), before SIGKILL
D64, D448 = "dim=64,memory_tokens=64", "dim=448,memory_tokens=448"
# (label, cases, precision, compile mode): most important first
BENCH_GROUPS = [("eager-fp32", [f"lmttm:{D448}", f"ttm:{D448}", f"lmttm:{D64}", f"ttm:{D64}"], "fp32", None),
                ("eager-bf16", [f"lmttm:{D448}", f"ttm:{D448}"], "bf16", None),
                ("eager-tf32", [f"lmttm:{D448}", f"ttm:{D448}"], "tf32", None),
                ("compiled-bf16", [f"lmttm:{D448}"], "bf16", "default"),
                ("compiled-bf16-reduce-overhead", [f"lmttm:{D448}"], "bf16", "reduce-overhead"),
                ("eager-bf16-64", [f"lmttm:{D64}", f"ttm:{D64}"], "bf16", None)]
TINY = "dim=16,memory_tokens=16,heads=2"
REHEARSAL_BENCH = [("compiled-bf16", [f"lmttm:{TINY}"], "bf16", "default")]  # compiled with dynamo's eager backend
REHEARSAL_CELLS = ["model.dim=16", "model.memory_tokens=16", "model.heads=2", "train.epochs=1"]


# ----------------------------------------------------------------------------------------------------------
# processes with deadlines


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process (tools/sweep.py forwards it to its runs), GRACE_S to end, then SIGKILL to it and
    to everything it started (also what runs in its own process group)."""
    started = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *started, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


class Job:
    """`cmd` started now in the repository, in a session of its own, its output appended to `log`."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        log.parent.mkdir(parents=True, exist_ok=True)
        self.out = log.open("a")
        self.out.write(f"$ {' '.join(cmd)}\n")
        self.out.flush()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_until(self, deadline: float) -> int | str:
        """Its exit code, or "timeout" when the monotonic `deadline` came first (it is then stopped)."""
        try:
            code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop(self.proc)
            self.out.write("\n[gpu_check] stopped at its deadline\n")
            code = "timeout"
        self.out.close()
        return code


def run_until(cmd: list[str], log: Path, deadline: float, env: dict | None = None) -> int | str:
    return Job(cmd, log, env).wait_until(deadline)


# ----------------------------------------------------------------------------------------------------------
# the carry (built here)


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirement.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def build_carry(carry: Path, data_root: Path, wheels: bool) -> int:
    """Wheels of CARRIED (pure Python, for the GPU machine's Python 3.12) and the data files into `carry`."""
    wheel_dir, data_dir = carry / "wheels", carry / "data"
    for folder in (wheel_dir, data_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if wheels:
        for old in wheel_dir.glob("*.whl"):  # one version of each: two stop the install there
            old.unlink()
        pins = pinned_versions()
        specs = [f"{name}=={pins[name]}" for name in CARRIED]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--python-version", "3.12", "--dest", str(wheel_dir), *specs])
        if done.returncode:
            print(f"error: pip download of {' '.join(specs)} failed", file=sys.stderr)
            return 1
        impure = [p.name for p in wheel_dir.glob("*.whl") if not p.name.endswith("-none-any.whl")]
        if impure:
            print(f"error: not pure-Python wheels (they may not match the GPU machine): {impure}", file=sys.stderr)
            return 1
    for name in DATA_FILES:
        source = data_root.expanduser() / name
        if not source.is_file():
            print(f"error: {source} does not exist (--data-root is the folder of the MedMNIST .npz files)",
                  file=sys.stderr)
            return 1
        shutil.copyfile(source, data_dir / name)
    files = sorted(p for p in carry.rglob("*") if p.is_file())
    for path in files:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.relative_to(carry)}")
    carried = sum(p.stat().st_size for p in files)
    tree = working_tree_bytes()
    print(f"{carried / 2**20:8.2f} MiB  carry in all; {tree / 2**20:.2f} MiB working tree; together "
          f"{(carried + tree) / 2**20:.2f} MiB of the {CARRY_LIMIT_MIB} MiB limit")
    if carried + tree > CARRY_LIMIT_MIB * 2**20:
        print("error: over the limit", file=sys.stderr)
        return 1
    return 0


def working_tree_bytes() -> int:
    """Tracked files and untracked files git does not ignore: what travels besides the carry."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    paths = [REPO / p for p in listed.stdout.split("\0") if p]
    return sum(p.stat().st_size for p in paths if p.is_file())


# ----------------------------------------------------------------------------------------------------------
# probe (runs in the environment being checked: `--probe`)


def probe() -> dict:
    """Versions of the modules the project imports, the torch APIs it uses, and the device."""
    import importlib
    import importlib.util
    import inspect
    from importlib import metadata

    modules = {}
    for module, dist in {**REQUIRED, **OPTIONAL}.items():
        try:
            if module in OPTIONAL:  # found, not imported (tensorboard and matplotlib take seconds)
                if importlib.util.find_spec(module) is None:
                    raise ModuleNotFoundError(f"No module named {module!r}")
            else:
                importlib.import_module(module)
            try:
                modules[module] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                modules[module] = "importable"
        except Exception as exc:  # noqa: BLE001 - any import failure is a finding
            modules[module] = f"MISSING: {type(exc).__name__}: {exc}"[:200]
    result = {"python": sys.version.split()[0], "modules": modules, "torch_apis_missing": []}
    if modules["torch"].startswith("MISSING"):
        return result
    import torch

    def resolve(dotted: str):
        """torch.<dotted>, importing the longest module prefix first; None if it is not there."""
        parts = f"torch.{dotted}".split(".")
        for i in range(len(parts), 0, -1):
            try:
                target = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for part in parts[i:]:
                target = getattr(target, part, None)
            return target
        return None

    result["torch_apis_missing"] = [f"torch.{d}" for d in TORCH_APIS if resolve(d) is None]
    for dotted, names in TORCH_KWARGS.items():
        target = resolve(dotted)
        if target is None:
            result["torch_apis_missing"].append(f"torch.{dotted}")
            continue
        params = inspect.signature(target).parameters
        result["torch_apis_missing"] += [f"torch.{dotted}({n}=)" for n in names if n not in params]
    result["cuda"] = torch.cuda.is_available()
    result["cuda_version"] = torch.version.cuda
    result["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return result


# ----------------------------------------------------------------------------------------------------------
# stages


class Check:
    """One call: the stages in order within their deadlines, the report collected after each."""

    def __init__(self, args):
        self.args, self.rehearse = args, args.rehearse
        self.device = "cpu" if args.rehearse else args.device
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
        self.out = Path(args.out or os.environ.get("OUT") or (self.work / "out")).resolve()
        self.collect_dir = self.work / "collect"
        for folder in (self.out, self.collect_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.carry = Path(args.carry).resolve() if args.carry else None
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.start = time.monotonic()
        self.end = self.start + args.total
        self.cells = None  # (job, deadline, start) while the cells train in the background
        self.report = {"device": self.device, "rehearse": self.rehearse, "stages": {}, "work": str(self.work)}

    def log(self, name: str) -> Path:
        return self.collect_dir / "logs" / f"{name}.log"

    def run(self) -> int:
        budget = {**BUDGET, **dict(self.args.budget)}
        for name in sorted(self.args.stages, key=STAGES.index):
            if name == "evaluate":
                self.finish_cells()
            t0 = time.monotonic()
            deadline = min(t0 + budget[name], self.end - COLLECT_RESERVE_S)
            if name == "cells" and "evaluate" in self.args.stages:  # leave the evaluation its time
                deadline = min(deadline, self.end - COLLECT_RESERVE_S - budget["evaluate"])
            print(f"[gpu_check] {name} (deadline {deadline - t0:.0f} s) ...", flush=True)
            try:
                status = getattr(self, f"stage_{name}")(deadline) if deadline > t0 else "skipped: no time left"
            except Exception as exc:  # noqa: BLE001 - a broken stage is recorded, the next one runs
                status = f"error: {type(exc).__name__}: {exc}"
            self.report["stages"][name] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
            print(f"[gpu_check] {name}: {status} ({time.monotonic() - t0:.0f} s)", flush=True)
            self.collect()
        self.finish_cells()
        self.report["total_seconds"] = round(time.monotonic() - self.start, 1)
        self.collect()
        print((self.out / "summary.md").read_text())
        return 0 if all(s["status"] == "ok" for s in self.report["stages"].values()) else 1

    def stage_setup(self, deadline: float) -> str:
        self.report["before_install"] = self.probe(deadline)
        wheels = sorted((self.carry / "wheels").glob("*.whl")) if self.carry else []
        if wheels:
            site = self.work / "site"
            code = run_until([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                             self.log("setup"), deadline, self.env)
            if code != 0:
                return f"pip install failed ({code})"
            self.env["PYTHONPATH"] = f"{site}{os.pathsep}{REPO}"
        self.report["installed"] = [w.name for w in wheels]
        after = self.report["after_install"] = self.probe(deadline)
        missing = [m for m in REQUIRED if after["modules"].get(m, "MISSING").startswith("MISSING")]
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"torch lacks {', '.join(after['torch_apis_missing'])}"] if after.get("torch_apis_missing") else []
        if self.device.startswith("cuda") and not after.get("cuda"):
            problems.append("CUDA is not available")
        return "; ".join(problems) or "ok"

    def probe(self, deadline: float) -> dict:
        try:
            done = subprocess.run([sys.executable, __file__, "--probe"], cwd=REPO, env=self.env, capture_output=True,
                                  text=True, timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return {"error": "the import probe ran out of time", "modules": {}}
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {"error": done.stderr[-500:], "modules": {}}

    def stage_tests(self, deadline: float) -> str:
        xml = self.collect_dir / "tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "device", "--device", self.device, "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "--junitxml", str(xml), "-o", "junit_family=xunit2"]
        if self.args.tests_k:
            cmd += ["-k", self.args.tests_k]
        code = run_until(cmd, self.log("tests"), deadline, self.env)
        self.report["tests"] = junit_summary(xml)
        return "ok" if code == 0 else f"exit {code}" if code != "timeout" else "timeout"

    def stage_bench(self, deadline: float) -> str:
        groups = REHEARSAL_BENCH if self.rehearse else BENCH_GROUPS
        sizes = ["--warmup", "3", "--iters", "20"]
        if self.rehearse:
            sizes = ["--batch-size", "4", "--warmup", "1", "--iters", "1"]
        bench, results = self.collect_dir / "bench", {}
        bench.mkdir(exist_ok=True)
        for label, cases, precision, mode in groups:
            if time.monotonic() >= deadline:
                results[label] = "not started"
                continue
            cmd = [sys.executable, "tools/benchmark.py", "--device", self.device, "--cases", *cases,
                   "--precision", precision, *sizes, "--json", str(bench / f"{label}.json")]
            if mode:
                cmd += ["--compile", mode] + (["--compile-backend", "eager"] if self.rehearse else [])
            code = run_until(cmd, self.log(f"bench-{label}"), deadline, self.env)
            results[label] = "ok" if code == 0 else str(code)
            md = self.log(f"bench-{label}").read_text()
            (bench / f"{label}.md").write_text(md[md.find("# Model benchmark"):] if "# Model benchmark" in md else md)
        self.report["bench"] = results
        return "ok" if all(v == "ok" for v in results.values()) else "; ".join(f"{k}: {v}" for k, v in results.items()
                                                                              if v != "ok")

    def data_root(self) -> Path:
        if self.carry and (self.carry / "data" / DATA_FILES[0]).is_file():
            return self.carry / "data"
        if not self.rehearse:
            raise FileNotFoundError(f"no {DATA_FILES[0]} in the carry's data/ (build it with --build-carry)")
        root = self.work / "fake_data"
        subprocess.run([sys.executable, __file__, "--write-fake-data", str(root)], cwd=REPO, env=self.env, check=True)
        return root

    def stage_cells(self, deadline: float) -> str:
        cmd = [sys.executable, "tools/sweep.py", "experiments/table2.json", "--jobs", str(self.args.jobs or
               2 * len(self.args.seeds)), "--devices", self.device, "--out", str(self.work / "cells")]
        for model in ("lmttm", "ttm"):
            cmd += [arg for seed in self.args.seeds for arg in ("--only", f"adrenalmnist3d-{model}-seed{seed}")]
        overrides = [f"data.root={self.data_root()}", "data.download=false", "output.plots=false",
                     f"train.keep_last_k={self.args.last_k}"] + (REHEARSAL_CELLS if self.rehearse else [])
        cmd += [arg for item in overrides for arg in ("--override", item)]
        self.cells = (Job(cmd, self.log("cells"), self.env), deadline, time.monotonic())
        return "running (while the tests run)"

    def finish_cells(self) -> None:
        """Wait for the cells started in the background (until their deadline) and record how they ended."""
        if self.cells is None:
            return
        job, deadline, t0 = self.cells
        code, self.cells = job.wait_until(deadline), None
        status = "ok" if code == 0 else "timeout" if code == "timeout" else f"exit {code}"
        self.report["stages"]["cells"] = {"status": status, "seconds": round(time.monotonic() - t0, 1)}
        print(f"[gpu_check] cells: {status} ({time.monotonic() - t0:.0f} s)", flush=True)
        self.collect()

    def stage_evaluate(self, deadline: float) -> str:
        """best.pt of every run that has one (a stopped run too) and --last-k where k epochs were done."""
        jobs = []
        for run in sorted((self.work / "cells").glob("adrenalmnist3d-*")):
            base = [sys.executable, "predict.py", "adrenalmnist3d.json", "--data.root", str(self.data_root()),
                    "--data.download", "false", "--output.plots", "false", "--train.device", self.device,
                    "--output.dir", str(run.parent), "--output.name", run.name]
            if (run / "best.pt").exists() and not (run / "eval" / "test" / "metrics.json").exists():
                jobs.append((f"{run.name}-best", base))
            if epochs_done(run) >= self.args.last_k:
                jobs.append((f"{run.name}-last{self.args.last_k}", base + ["--last-k", str(self.args.last_k)]))
        with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            codes = list(pool.map(lambda job: run_until(job[1], self.log(f"evaluate-{job[0]}"), deadline, self.env),
                                  jobs))
        failed = [f"{name}: {code}" for (name, _), code in zip(jobs, codes) if code != 0]
        return "; ".join(failed) or "ok"

    def collect(self) -> None:
        """Small files into collect/, then report.json, summary.md and the archive into the output folder."""
        for run in sorted((self.work / "cells").glob("adrenalmnist3d-*")):
            dest = self.collect_dir / "cells" / run.name
            for path in [run / "metrics.csv", run / "train_summary.json", *run.glob("eval/*/metrics.json")]:
                if path.is_file():
                    (dest / path.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, dest / path.relative_to(run))
        self.report["cells"] = cells_table(self.work / "cells", self.args.last_k)
        (self.collect_dir / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        shutil.copyfile(self.collect_dir / "report.json", self.out / "report.json")
        (self.out / "summary.md").write_text(summary(self.report, self.collect_dir))
        with tarfile.open(self.out / ".gpu_check.tar.gz.tmp", "w:gz") as tar:
            tar.add(self.collect_dir, arcname="gpu_check")
        os.replace(self.out / ".gpu_check.tar.gz.tmp", self.out / "gpu_check.tar.gz")


# ----------------------------------------------------------------------------------------------------------
# reading the results


def epochs_done(run: Path) -> int:
    path = run / "metrics.csv"
    return max(0, len(path.read_text().strip().splitlines()) - 1) if path.is_file() else 0


def junit_summary(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not xml.is_file():
        return {"error": "no JUnit XML (pytest stopped before writing it)"}
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


def cells_table(cells: Path, last_k: int) -> list[dict]:
    rows = []
    for run in sorted(cells.glob("adrenalmnist3d-*")):
        row = {"run": run.name, "epochs_done": epochs_done(run)}
        summary_path = run / "train_summary.json"
        if summary_path.is_file():
            s = json.loads(summary_path.read_text())
            row.update({k: s.get(k) for k in ("finished", "best_epoch", "best_val_auc", "seconds")})
        for folder, prefix in (("test", "test"), (f"test-last{last_k}", f"last{last_k}")):
            path = run / "eval" / folder / "metrics.json"
            if path.is_file():
                m = json.loads(path.read_text())
                row.update({f"{prefix}_auc": m.get("auc"), f"{prefix}_acc": m.get("acc")})
        rows.append(row)
    return rows


def summary(report: dict, collect_dir: Path) -> str:
    lines = [f"# gpu_check ({'rehearsal, ' if report['rehearse'] else ''}device {report['device']})", ""]
    after = report.get("after_install", {})
    if after:
        lines += [f"python {after.get('python')}, GPU {after.get('gpu')}, CUDA {after.get('cuda_version')}; "
                  f"modules: " + ", ".join(f"{k} {v}" for k, v in after.get("modules", {}).items()), ""]
    lines += ["| stage | status | seconds |", "|---|---|--:|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in report["stages"].items()]
    if "tests" in report:
        lines += ["", f"tests: {json.dumps(report['tests'])}"]
    for md in sorted((collect_dir / "bench").glob("*.md")):
        table = [line for line in md.read_text().splitlines() if line.startswith(("|", "- precision"))]
        lines += ["", f"## bench {md.stem}", *table]
    if report.get("cells"):
        keys = sorted({k for row in report["cells"] for k in row}, key=lambda k: (k != "run", k))
        lines += ["", "## cells", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in report["cells"]]
    return "\n".join(lines) + "\n"


def write_fake_data(root: Path) -> None:
    """A tiny AdrenalMNIST3D-format file (2 classes; 40 / 12 / 12 volumes) for the rehearsal."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 12), ("test", 12)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    root.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(root / DATA_FILES[0], **arrays)


# ----------------------------------------------------------------------------------------------------------
# command line


def budget_item(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in BUDGET or not seconds:
        raise argparse.ArgumentTypeError(f"expected STAGE=SECONDS with STAGE one of {', '.join(BUDGET)}")
    return name, float(seconds)


def stage_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-carry", metavar="DIR", help="here: download the wheels and copy the data into DIR")
    parser.add_argument("--data-root", metavar="PATH", help="with --build-carry: the folder of adrenalmnist3d.npz")
    parser.add_argument("--no-wheels", action="store_true", help="with --build-carry: the data only (no download)")
    parser.add_argument("--carry", metavar="DIR", help="the carry built by --build-carry (wheels/, data/)")
    parser.add_argument("--out", metavar="DIR",
                        help="where report.json, summary.md, gpu_check.tar.gz go (default: $OUT if set)")
    parser.add_argument("--work", metavar="DIR", help="working folder (default: a new temporary one)")
    parser.add_argument("--device", default="cuda", help="device of the tests, benchmark and cells (default cuda)")
    parser.add_argument("--rehearse", action="store_true", help="the same stages on the CPU at tiny sizes")
    parser.add_argument("--stages", type=stage_list, default=STAGES, help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--budget", type=budget_item, action="append", default=[], metavar="STAGE=SECONDS",
                        help=f"a stage's own time limit (defaults: {BUDGET})")
    parser.add_argument("--total", type=float, default=540.0, help="time limit of the whole call (default 540 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the cells (default 0 1 2)")
    parser.add_argument("--jobs", type=int, help="runs at once in the cells stage (default: all of them)")
    parser.add_argument("--last-k", type=int, default=20, help="epochs kept for predict.py --last-k (default 20)")
    parser.add_argument("--tests-k", metavar="EXPR", help="pytest -k expression for the tests stage")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-fake-data", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.write_fake_data:
        write_fake_data(Path(args.write_fake_data))
        return 0
    if args.build_carry:
        if not args.data_root:
            parser.error("--build-carry needs --data-root (the folder of adrenalmnist3d.npz)")
        return build_carry(Path(args.build_carry), Path(args.data_root), wheels=not args.no_wheels)
    if args.rehearse:
        args.seeds, args.last_k = args.seeds[:1], 1
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
