"""Run a grid of experiments (one paper table) with the training engine, one run directory per run.

    python tools/sweep.py experiments/table8.json                       # run (or resume) every run
    python tools/sweep.py experiments/table8.json --dry-run             # print the commands only
    python tools/sweep.py experiments/table8.json --list                # runs and their state
    python tools/sweep.py experiments/table2.json --only adrenalmnist3d --max-runs 4
    python tools/sweep.py experiments/table4.json --override data.root=~/.medmnist
    python tools/sweep.py experiments/table8.json --jobs 8 --devices cuda:0,cuda:1   # 8 runs at once, 4 per GPU
    python tools/sweep.py experiments/table2.json --launcher slurm --partition gpu --gpus-per-run 1  # tools/cluster.py
    python tools/sweep.py experiments/table2.json --status             # each run's state, from the run directories

Each run is two engine calls, made with this Python from the repository root:

    python train.py   CONFIG --key value ... --data.name D --train.seed S --output.dir OUT --output.name NAME
    python predict.py CONFIG (the same arguments) --split test

No config file is edited: every setting of a run is a command-line override. A run whose
`train_summary.json` says finished and whose `eval/test/metrics.json` exists is skipped; a run whose
training finished but was not evaluated only gets the predict step; any other run is (re)started and
the engine resumes it from `last.pt`. So an interrupted sweep resumes where it stopped: run the same
command again. A failing run does not stop the others: its output is in `<run dir>/sweep.log` (both
steps, appended), the summary at the end lists it, and the exit status is 1; `job_state.json` records the
failure for `--status` until the run is launched again. The summary ends with every finished run's test
AUC and ACC. A run that a live train.py holds (its lock) is left alone and reported (exit status 1), its
log untouched. `--list`, `--status`, `--dry-run` and the sweep share one definition of a run's state
(tools/run_state.py).

Several runs at once: `--jobs N` keeps up to N runs going (each still train.py then predict.py, in its
own directory and `sweep.log`); N job slots each take the next unfinished run in grid order when their
previous run ends. `--devices D1,D2,...` gives job slot k the device D[k mod len(D)] (passed to every run
as `--train.device`; the device is not a setting of the run, so a run may resume or be skipped on
another device). With N > 1 each run gets `--threads` CPU threads (default cores // N, at least 1) via
OMP_NUM_THREADS and MKL_NUM_THREADS. The console shows one line per run start, end or failure (not the
runs' output), and the summary lists every run's outcome. Ctrl-C (or SIGTERM) starts no new run and sends
the running ones the same signal once (they run in their own process groups); each resumes from its
last.pt when the same command runs again; the exit status is 130 (143); a second Ctrl-C kills them.
`--jobs 1` (the default) runs one run after the other, through the same code (tools/launch_local.py),
showing each step and the end of a failed run's log. On Linux every child also gets a parent-death
signal (SIGTERM), so not even a sweep killed with SIGKILL leaves a trainer running.

The sweep records each run's config file and settings in `<run dir>/sweep_settings.json`. Before a run
directory is reused, that record (both ways: a key only one side sets counts) and the run's
`config.json` (the keys the grid sets) are compared with the run's settings; a directory made with
other settings (say `--override train.epochs=2` earlier) is reported as a failure and left alone
instead of being resumed, skipped or aggregated. Keys that do not change results (`NOT_COMPARED`:
data.root, device, ...) are not compared.

Grid file (JSON)
----------------
    {
      "name": "table8",                       # required; default run folder sweeps/<name>
      "description": "free text",
      "datasets": ["adrenalmnist3d", ...],    # required; every run gets --data.name <dataset>
      "config": "{dataset}.json",             # config file under config/ ({dataset} is replaced); default shown
      "seeds": [0, 1, 2],                     # --train.seed; default [0, 1, 2]
      "overrides": {"train.epochs": 100},     # "section.key": value, for every run
      "variants": [                           # optional: model lines, each with its own config and overrides
        {"label": "lmttm", "title": "LMTTM", "overrides": {"model.name": "lmttm"}},
        {"label": "resnet18_3d", "config": "baselines/resnet18_3d.json", "overrides": {...}}
      ],
      "axes": {                               # optional: the cartesian product of the axes is run
        "model.name": ["ttm", "lmttm"],
        "model.dim+model.memory_tokens": [[64, 64], [160, 160]]   # '+' ties keys: one value list each
      },
      "labels": {"model.memory_tokens": "mem"},   # optional short names used in run names
      "subgrids": [{...}, ...],               # optional: blocks expanded one by one, each block's keys
                                              # replacing the top level's ("overrides" are merged)
      "runs_dir": "sweeps/table8",            # optional: where the runs live (several grids may share)
      "table": {...},                         # layout for tools/aggregate.py (see there)
      "paper": {"source": "...", "values": {"<cell>": {"auc": 0.9, "acc": 0.8}}}
    }

Runs are datasets x variants x axes x seeds, in that nesting order. Settings are applied in the order
grid overrides, variant overrides, axis values, `--data.name`/`--train.seed`, then `--override` from the
command line (which wins). A run's name is `<dataset>[-<variant or model.name>]-<axis labels>-seed<s>`,
e.g. `adrenalmnist3d-lmttm-mem64-dim64-seed0`: an axis value is written as label + value (`dim64`,
`lr0.0001`, `noise_uniform` for words, the bare value where the label is ""). The name without the
seed is the *cell* (`adrenalmnist3d-lmttm-mem64-dim64`); the aggregator averages a cell over its seeds
and the grid's "paper" values are keyed by cell.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, for the tools package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The public names of the sweep's modules, here too so that `from tools import sweep` keeps offering them.
from tools.grid import (CONFIG_DIR, DEFAULT_LABELS, DEFAULT_SEEDS, NOT_COMPARED, REPO_ROOT, RESERVED,  # noqa: E402,F401
                        GridError, Run, average_cell, cells, cli_value, expand, format_value, load_grid,
                        parse_override, path_arg, run_settings, runs_dir_of, select, validate_grid)
from tools.launch import (Busy, Runner, SweepResult, available_cores, plan, prepare, run_steps,  # noqa: E402,F401
                          thread_env, threads_per_run)
from tools.launch_local import CHILDREN, run_sweep, subprocess_runner, summary_text  # noqa: E402,F401
from tools.run_state import (SETTINGS_FILE, RunStatus, commands, config_mismatches, is_finished,  # noqa: E402,F401
                             live_trainer, read_json, recorded_mismatches, run_mismatches, run_status, status_line,
                             test_metrics, train_finished, write_settings)

LAUNCHERS = ("local", "slurm", "submitit-local")  # --launcher; all but local are tools/cluster.py's


def parse_devices(text: str) -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1'] (the engine checks each name when a run starts)."""
    devices = [d.strip() for d in text.split(",")]
    if not all(re.fullmatch(r"[A-Za-z0-9_:]+", d) for d in devices):
        raise GridError(f"--devices {text!r}: write device names separated by commas, e.g. cuda:0,cuda:1")
    return devices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Grid format: see the docstring of tools/sweep.py.")
    parser.add_argument("grid", help="grid file, e.g. experiments/table8.json")
    parser.add_argument("--out", help="folder of the run directories (default: the grid's runs_dir or sweeps/<name>)")
    parser.add_argument("--only", action="append", metavar="SUBSTRING",
                        help="only runs whose name contains SUBSTRING (repeat: any of them)")
    parser.add_argument("--override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="setting for every run, after the grid's (e.g. train.epochs=2, data.root=DIR)")
    parser.add_argument("--max-runs", type=int, metavar="N", help="start at most N unfinished runs")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N runs at once (default 1: one after the other)")
    parser.add_argument("--devices", metavar="DEV,DEV,...",
                        help="devices for the runs, round-robin over the job slots (--train.device of each run), "
                             "e.g. cuda:0,cuda:1; default: the config's train.device")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="with --jobs N > 1: CPU threads of each run (OMP_NUM_THREADS, MKL_NUM_THREADS); "
                             "default: cores // N, at least 1; 0 leaves the environment's")
    parser.add_argument("--batch-seeds", action="store_true",
                        help="train the runs of a cell that differ only in the seed with one train.py "
                             "--train.seeds [...] (tools/seed_batches.py; lmttm and ttm), then predict each as usual; "
                             "with --launcher slurm/submitit-local: one job per cell")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--list", action="store_true", help="print the run names and their state, run nothing")
    parser.add_argument("--status", action="store_true",
                        help="each run's state read from the run directories (queued, running, finished, failed "
                             "with its log), for sweeps on a cluster; runs nothing")
    cluster_args = parser.add_argument_group("cluster (tools/cluster.py; needs submitit)")
    cluster_args.add_argument("--launcher", choices=LAUNCHERS, default="local",
                              help="local (default): run here; slurm: one SLURM job per unfinished run (per cell with "
                                   "--batch-seeds), as a job array; submitit-local: the same jobs on this machine "
                                   "through submitit")
    cluster_args.add_argument("--partition", help="SLURM partition")
    cluster_args.add_argument("--gpus-per-run", type=int, default=0, metavar="G", help="GPUs of each job (default 0)")
    cluster_args.add_argument("--cpus-per-run", type=int, metavar="C",
                              help="CPU cores of each job, also its OMP/MKL threads (default: 4 with slurm; with "
                                   "submitit-local, which runs every job at once here, cores // jobs, at least 1)")
    cluster_args.add_argument("--time", type=int, default=240, metavar="MIN",
                              help="time limit of each job in minutes (default 240); a job out of time is requeued "
                                   "and resumes from last.pt")
    cluster_args.add_argument("--mem", type=int, metavar="GB", help="memory of each job in GB (default: the partition's)")
    cluster_args.add_argument("--slurm-array-parallelism", type=int, default=256, metavar="N",
                              help="at most N jobs of the array run at once (default 256)")
    cluster_args.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                              help="any other sbatch option, e.g. account=proj42, qos=long, constraint=a100")
    cluster_args.add_argument("--max-requeues", type=int, default=3, metavar="N",
                              help="time-outs a job may be requeued after (pre-emptions do not count; default 3)")
    cluster_args.add_argument("--resubmit", action="store_true",
                              help="also submit runs whose job_state.json says queued or running (their job is gone)")
    return parser


def main(argv=None, runner: Runner = subprocess_runner) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.jobs < 1:
            raise GridError(f"--jobs must be at least 1, got {args.jobs}")
        if args.threads is not None and args.threads < 0:
            raise GridError(f"--threads must be 0 or more, got {args.threads}")
        if args.max_runs is not None and args.max_runs < 0:
            raise GridError(f"--max-runs must be 0 or more, got {args.max_runs}")
        grid = load_grid(args.grid)
        runs = select(validate_grid(grid), args.only)
        extra = dict(parse_override(o) for o in args.override)
        devices = parse_devices(args.devices) if args.devices is not None else []
        if devices and "train.device" in extra:
            raise GridError("give the device either with --devices or with --override train.device, not both")
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    runs_dir = runs_dir_of(grid, args.out)
    if args.status:
        print("\n".join(status_line(run, runs_dir, extra) for run in runs))
        return 0
    if args.launcher != "local":
        return _launch_on_cluster(args, runs, runs_dir, extra, grid)
    if args.list:
        for run in runs:
            print(f"{run_status(run, runs_dir, extra).state:9s} {run.name}")
        return 0
    print(f"grid {grid['name']}: {len(runs)} run(s) in {runs_dir}")
    if args.jobs > 1:
        threads = args.threads if args.threads is not None else threads_per_run(args.jobs)
        print(f"up to {args.jobs} runs at once, " + (f"{threads} CPU thread(s) each" if threads else
                                                     "CPU threads as the environment says")
              + (f", devices {', '.join(devices)} round-robin over the job slots" if devices else ""))
    else:
        threads = None
    if len(devices) > args.jobs:
        print(f"note: only the first {args.jobs} of the {len(devices)} --devices are used (one per job slot; "
              f"raise --jobs to use them all)")
    try:
        if args.batch_seeds:  # one process per cell first; the sweep below then only predicts those runs
            from tools import seed_batches

            seed_batches.train_cells(runs, runs_dir, extra=extra, runner=runner, dry_run=args.dry_run)
        result = run_sweep(runs, runs_dir, extra=extra, max_runs=args.max_runs, dry_run=args.dry_run, runner=runner,
                           jobs=args.jobs, devices=devices, threads=threads)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    print(summary_text(result, args.dry_run, runs_dir))
    return result.exit_code


def _launch_on_cluster(args, runs, runs_dir: Path, extra: dict, grid: dict) -> int:
    """--launcher slurm / submitit-local (tools/cluster.py): submit; submitit-local also waits for its jobs."""
    from tools import cluster

    try:
        if args.jobs != 1 or args.devices or args.dry_run:
            raise cluster.ClusterError("--jobs, --devices and --dry-run belong to --launcher local; a cluster gives "
                                       "each run its own job (--gpus-per-run, --cpus-per-run)")
        slurm_extra = dict(cluster.parse_extra(o) for o in args.slurm_extra)
        for name, value in (("--cpus-per-run", args.cpus_per_run), ("--time", args.time),
                            ("--slurm-array-parallelism", args.slurm_array_parallelism)):
            if value is not None and value < 1:
                raise cluster.ClusterError(f"{name} must be at least 1, got {value}")
        print(f"grid {grid['name']}: {len(runs)} run(s) in {runs_dir}, launcher {args.launcher}")
        result, jobs = cluster.submit(
            runs, runs_dir, extra=extra, launcher=args.launcher, max_runs=args.max_runs, resubmit=args.resubmit,
            batch_seeds=args.batch_seeds,
            partition=args.partition, gpus_per_run=args.gpus_per_run, cpus_per_run=args.cpus_per_run,
            time_min=args.time, mem_gb=args.mem, array_parallelism=args.slurm_array_parallelism, sbatch_extra=slurm_extra,
            max_requeues=args.max_requeues, job_name=f"lmttm-{grid['name']}")
    except (cluster.ClusterError, GridError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(jobs)} job(s) submitted, {len(result.skipped)} run(s) finished before, "
          f"{len(result.not_started)} left out, {len(result.failed)} failed")
    if args.launcher == "slurm":
        print(f"follow them with: python tools/sweep.py {args.grid} --status")
        return 1 if result.failed else 0
    failed = len(result.failed)
    for name, job in jobs:  # submitit-local: the jobs are children of this process; wait for them
        try:
            job.result()
            print(f"{name}: done")
        except Exception as err:  # noqa: BLE001 - a failed job is reported, the others go on
            failed += 1
            print(f"{name}: FAILED: {str(err).strip().splitlines()[-1] if str(err).strip() else err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
