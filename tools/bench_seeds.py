"""`tools/benchmark.py --seeds S`: S seeds trained as one batched model (train.seeds, engine/ensemble.py)
against S single runs, per LMTTM / TTM case.

    python tools/benchmark.py --cases lmttm:dim=64,memory_tokens=64 --seeds 3 --threads 2

Each measurement runs in its own subprocess (`--case`, as benchmark.py's): the ensemble's training step
(the engine's own `Stack`: S members on their own batches of `--batch-size`, forward, per-member losses,
backward, one Adam step) with `--threads` threads, and a single model's step with 1 thread. The S single
runs are credited with perfect packing on the same cores: `--threads` of them at once at their 1-thread
speed, i.e. total samples/s = threads x single samples/s (an upper bound for separate runs). Wall and
process CPU time per step are both reported; on a shared machine the CPU time (work done) is the steadier.
"""

from __future__ import annotations

import json
import time
import types

import torch

from engine.config import load_config


def _config(name: str, kwargs: dict, batch: int, seeds: list[int]):
    return load_config("base.json", {"model": {"name": name, **kwargs},
                                     "train": {"batch_size": batch, "seeds": seeds, "device": "cpu"}})


def _timed(step, warmup: int, iters: int) -> tuple[float, float]:
    """Median wall seconds and mean process CPU seconds per call."""
    for _ in range(warmup):
        step()
    walls, cpu0 = [], time.process_time()
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        walls.append(time.perf_counter() - t0)
    walls.sort()
    return walls[len(walls) // 2], (time.process_time() - cpu0) / iters


def run_seeds_case(spec: dict) -> dict:
    """One measurement (`spec["mode"]`: "ensemble" or "single"), in a fresh process."""
    from engine import ensemble  # noqa: PLC0415
    from engine.setup import model_from_config  # noqa: PLC0415
    from data import dataset_info  # noqa: PLC0415
    from engine.training import make_optimizer  # noqa: PLC0415

    torch.set_num_threads(spec["threads"])
    seeds = list(range(spec["seeds"])) if spec["mode"] == "ensemble" else [0]
    cfg = _config(spec["name"], spec["kwargs"], spec["batch_size"], seeds)
    info = dataset_info("adrenalmnist3d", size=28)
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = model_from_config(cfg, info)
        job = types.SimpleNamespace(model=model, optimizer=make_optimizer(cfg, model.parameters()))
        members.append(ensemble.Member(seed, cfg, None, job=job))
    stack = ensemble.Stack(members, cfg)
    x = torch.rand(len(seeds), spec["batch_size"], 1, 28, 28, 28)
    y = torch.randint(0, 2, (len(seeds), spec["batch_size"]))

    def step():
        losses = ensemble.member_losses(stack.forward(stack.params, stack.buffers, x), y)
        stack.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        stack.optimizer.step()

    if spec["mode"] == "single":  # a plain single model, exactly as train.py runs it
        model, opt = members[0].job.model, members[0].job.optimizer

        def step():  # noqa: F811
            loss = torch.nn.functional.cross_entropy(model(x[0]), y[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    wall, cpu = _timed(step, spec.get("warmup") or 1, spec.get("iters") or 3)
    samples = len(seeds) * spec["batch_size"]
    return {**spec, "wall_s_per_step": wall, "cpu_s_per_step": cpu, "samples_per_s": samples / wall,
            "cpu_s_per_sample": cpu / samples}


def seeds_report(cases: list, seeds: int, threads: int, args, run_subprocess) -> int:
    """The table of `--seeds`: per case, the ensemble and the S single runs (see the module docstring)."""
    print(f"# {seeds} seeds in one process vs {seeds} single runs ({threads} threads in total, batch "
          f"{args.batch_size} per member, CPU)\n")
    print("| case | ensemble samples/s (total / per member) | single run samples/s (1 thread) | "
          f"{seeds} single runs, {threads} at once, samples/s | speed-up (wall) | CPU s/sample ensemble / single | "
          "speed-up (CPU time) |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for name, kwargs in cases:
        base = {"name": name, "kwargs": kwargs, "device": "cpu", "batch_size": args.batch_size, "warmup": args.warmup,
                "iters": args.iters, "seeds": seeds, "bench_seeds": True}
        ens = run_subprocess({**base, "mode": "ensemble", "threads": threads})
        one = run_subprocess({**base, "mode": "single", "threads": 1})
        if "error" in ens or "error" in one:
            print(f"| {name} {kwargs} | error: {ens.get('error') or one.get('error')} |||||")
            failed = True
            continue
        packed = min(threads, seeds) * one["samples_per_s"]
        print(f"| {name} {json.dumps(kwargs)} | {ens['samples_per_s']:.1f} / {ens['samples_per_s'] / seeds:.1f} | "
              f"{one['samples_per_s']:.1f} | {packed:.1f} | {ens['samples_per_s'] / packed:.2f}x | "
              f"{ens['cpu_s_per_sample'] * 1e3:.2f} / {one['cpu_s_per_sample'] * 1e3:.2f} ms | "
              f"{one['cpu_s_per_sample'] / ens['cpu_s_per_sample']:.2f}x |", flush=True)
    return 1 if failed else 0
