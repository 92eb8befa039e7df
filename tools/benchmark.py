"""Speed and cost of registered models: parameters, training and evaluation throughput, peak memory, FLOPs.

    python tools/benchmark.py                                    # LMTTM and TTM at D = M = 64 and 448, CPU
    python tools/benchmark.py --cases lmttm:dim=64,memory_tokens=64 resnet18_3d:width=16 --iters 3
    python tools/benchmark.py --baselines --baseline-width 16    # add the six ResNets (narrow: a quick look)
    python tools/benchmark.py --device all --json bench.json     # CPU, then CUDA when available

A case is a registered model name plus keyword arguments of its config dataclass
(`name:key=value,key=value`; values are parsed as JSON, else kept as strings). Every case runs at
`--batch-size` (default 32), input `--size`³ (default 28), 1 input channel and 2 classes, and reports:

* parameters: `count_parameters` (trainable parameters);
* training samples/s: forward + cross-entropy + backward + Adam step in `train()` mode, timed over
  `--iters` iterations after `--warmup` iterations;
* evaluation samples/s: forward in `eval()` mode under `torch.no_grad()`, timed the same way;
* peak memory: on CPU the increase of the process's peak resident set size (VmHWM) over its resident
  size before the model was built; on CUDA `torch.cuda.max_memory_allocated`. Peaks are monotonic
  within a process, so every case runs in a fresh subprocess (`--case`, internal);
* GFLOP per sample of a forward pass and of a training step (forward + backward), counted by
  `torch.utils.flop_counter.FlopCounterMode` on a batch of 2 and divided by 2 (a multiply-add counts
  as 2 FLOPs; only the ops the counter knows are counted: convolutions, matrix products, attention;
  the optimiser step is not counted).

Without `--warmup`/`--iters` the iteration counts are chosen per case: if the first warm-up
iteration (which includes one-time costs) takes under 2 s, 2 warm-up and 5 timed iterations; otherwise that one warm-up and as
many timed iterations as fit in about 10 s (1 to 5). On this project's 2-core CPU that gives 1 + 2
for LMTTM/TTM at D = M = 448 (a few seconds per training step) and 1 + 1 for full-width ResNets
(about 20 s per ResNet-18 training step). The counts used are shown in the table (`warm-up+timed`,
training; evaluation).

Reference: on a 2-core CPU the original implementation (github.com/hongkai-wei/LMTTM-VMI) does about
63 training and 290 evaluation samples/s for LMTTM at D = M = 64, and 2.8 and 10.6 at D = M = 448
(batch 32, 28³). These are printed beside LMTTM rows with those settings (other settings at their
defaults, batch 32, input 28) in the column "original (2-core CPU)" of CPU tables.

The output is Markdown (header lines and one table per device), ready to paste into README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model import MODELS, build_model, count_parameters, get_model_entry  # noqa: E402

IN_CHANNELS = 1
NUM_CLASSES = 2
BASELINES = ["resnet18_2.5d", "resnet18_3d", "resnet18_acs", "resnet50_2.5d", "resnet50_3d", "resnet50_acs"]
DEFAULT_CASES = ["lmttm:dim=64,memory_tokens=64", "ttm:dim=64,memory_tokens=64",
                 "lmttm:dim=448,memory_tokens=448", "ttm:dim=448,memory_tokens=448"]
# (dim = memory_tokens) -> (training, evaluation) samples/s of the original code, 2-core CPU, batch 32, 28³.
ORIGINAL_CPU = {64: (63.0, 290.0), 448: (2.8, 10.6)}
AUTO_FAST_S = 2.0     # a first iteration faster than this: 2 warm-up + 5 timed iterations
AUTO_BUDGET_S = 10.0  # otherwise: as many timed iterations as fit in this (1 to 5)


# ----------------------------------------------------------------------------------------------------
# cases


def parse_case(text: str) -> tuple[str, dict]:
    """`name:key=value,key=value` -> (name, kwargs); values parsed as JSON, else kept as strings."""
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"case {text!r}: expected key=value, got {item!r}")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    get_model_entry(name)  # unknown names fail here
    entry = MODELS[name]
    try:
        entry.config_cls(**kwargs)  # unknown keys and invalid values fail here, before anything runs
    except (TypeError, ValueError) as exc:
        raise ValueError(f"case {text!r}: {exc}") from None
    return name, kwargs


def case_label(name: str, kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def original_reference(name: str, kwargs: dict, batch_size: int, size: int):
    """(train, eval) samples/s of the original code for this case, or None when it has no reference."""
    if name != "lmttm" or batch_size != 32 or size != 28:
        return None
    cls = MODELS[name].config_cls
    cfg = cls(**kwargs)
    if cfg.dim != cfg.memory_tokens or cfg.dim not in ORIGINAL_CPU:
        return None
    if cfg != dataclasses.replace(cls(), dim=cfg.dim, memory_tokens=cfg.memory_tokens):
        return None  # some other setting differs from the defaults the reference was measured at
    return ORIGINAL_CPU[cfg.dim]


# ----------------------------------------------------------------------------------------------------
# one case (runs in its own subprocess)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_kib() -> int:
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _current_rss_kib() -> int:
    rss = _proc_status_kib("VmRSS")
    return rss if rss is not None else _peak_rss_kib()


def _timed(step, device: torch.device, warmup: int | None, iters: int | None) -> tuple[float, int, int]:
    """Seconds per call of `step` averaged over the timed iterations; also the counts used."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    if warmup is None or iters is None:
        if first < AUTO_FAST_S:
            auto_warmup, auto_iters = 2, 5
        else:
            auto_warmup, auto_iters = 1, max(1, min(5, int(AUTO_BUDGET_S / first)))
        warmup = auto_warmup if warmup is None else warmup
        iters = auto_iters if iters is None else iters
    for _ in range(max(warmup, 1) - 1):  # the first call above was warm-up iteration 1
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - t0) / iters, max(warmup, 1), iters


def run_case(spec: dict) -> dict:
    """Measure one case on one device; `spec` is the JSON the parent passes with `--case`."""
    device = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    name, kwargs, batch, size = spec["name"], spec["kwargs"], spec["batch_size"], spec["size"]
    warmup, iters = spec.get("warmup"), spec.get("iters")

    rss_before = _current_rss_kib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)

    model = build_model(name, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES, input_size=size, **kwargs).to(device)
    params = count_parameters(model)
    shape = (IN_CHANNELS, size, size, size)

    # FLOPs on a batch of 2 (BatchNorm needs more than one value per channel in training mode). The
    # evaluation forward is counted with gradients enabled: under no_grad, eval-mode transformer layers take
    # PyTorch's fused fast path (aten._transformer_encoder_layer_fwd), whose FLOPs the counter does not see.
    from torch.utils.flop_counter import FlopCounterMode
    x2 = torch.rand(2, *shape, device=device)
    y2 = torch.randint(0, NUM_CLASSES, (2,), device=device)
    model.eval()
    with FlopCounterMode(display=False) as counter:
        model(x2)
    fwd_flops = counter.get_total_flops() / 2
    model.train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x2), y2).backward()
    train_flops = counter.get_total_flops() / 2
    model.zero_grad(set_to_none=True)
    del x2, y2

    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    model.train()
    train_s, train_warmup, train_iters = _timed(train_step, device, warmup, iters)

    def eval_step():
        with torch.no_grad():
            model(x)

    model.eval()
    eval_s, eval_warmup, eval_iters = _timed(eval_step, device, warmup, iters)

    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    else:
        peak_mib = (_peak_rss_kib() - rss_before) / 1024
    return {
        "model": name, "kwargs": kwargs, "device": device.type, "batch_size": batch, "size": size,
        "threads": torch.get_num_threads(), "parameters": params,
        "train_samples_per_s": batch / train_s, "eval_samples_per_s": batch / eval_s,
        "train_s_per_iter": train_s, "eval_s_per_iter": eval_s,
        "train_warmup": train_warmup, "train_iters": train_iters,
        "eval_warmup": eval_warmup, "eval_iters": eval_iters,
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss_increase",
        "gflop_forward_per_sample": fwd_flops / 1e9, "gflop_train_per_sample": train_flops / 1e9,
    }


# ----------------------------------------------------------------------------------------------------
# parent: header, subprocesses, table


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_header(device: str, threads: int, args) -> list[str]:
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        where = f"GPU {name} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {cpu_name()} ({os.cpu_count()} logical cores), {threads} torch threads"
    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}", f"- device: {where}"]
    if device == "cpu" and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        busy = load > 0.75 * (os.cpu_count() or 1)
        lines.append(f"- load average (1 min) before the run: {load:.1f}"
                     + (" (the CPU is busy with other work: throughputs are low and noisy)" if busy else ""))
    return lines + [
        f"- batch size {args.batch_size}, input {IN_CHANNELS}×{args.size}³, {NUM_CLASSES} classes, Adam, "
        f"cross-entropy; timed iterations after warm-up (counts in the table)"]


def run_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"model": spec["name"], "kwargs": spec["kwargs"], "device": spec["device"], "error": tail[0]}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"model": spec["name"], "kwargs": spec["kwargs"], "device": spec["device"], "error": "no result printed"}


def fmt_rate(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def table(rows: list[dict], device: str, show_original: bool) -> list[str]:
    memory = "peak CUDA alloc (MiB)" if device == "cuda" else "peak RSS (MiB)"
    cols = ["model", "settings", "params", "train samples/s", "eval samples/s"]
    if show_original:
        cols.append("original (2-core CPU) train / eval")
    cols += [memory, "GFLOP/sample fwd", "GFLOP/sample train", "iters train; eval"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "--:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [r["model"], case_label(r["model"], r["kwargs"])]
        if "error" in r:
            cells += ["failed: " + r["error"].replace("|", "/")] + [""] * (len(cols) - 3)
        else:
            cells += [fmt_params(r["parameters"]), fmt_rate(r["train_samples_per_s"]), fmt_rate(r["eval_samples_per_s"])]
            if show_original:
                ref = r.get("original_cpu_samples_per_s")
                cells.append(f"{fmt_rate(ref[0])} / {fmt_rate(ref[1])}" if ref else "")
            cells += [f"{r['peak_memory_mib']:.0f}", f"{r['gflop_forward_per_sample']:.3g}",
                      f"{r['gflop_train_per_sample']:.3g}",
                      f"{r['train_warmup']}+{r['train_iters']}; {r['eval_warmup']}+{r['eval_iters']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Parameters, training / evaluation samples/s, peak memory and GFLOP of registered models "
                    "(Markdown table). Each case runs in a fresh subprocess.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"registered models: {', '.join(sorted(MODELS))}\n"
               f"default cases: {' '.join(DEFAULT_CASES)}")
    parser.add_argument("--cases", nargs="+", metavar="NAME[:K=V,...]",
                        help="cases to run, e.g. lmttm:dim=64,memory_tokens=64 resnet18_3d:width=16 "
                             "(values parsed as JSON, else strings); default: LMTTM and TTM at D = M = 64 and 448")
    parser.add_argument("--baselines", action="store_true",
                        help="add the six ResNet baselines (2.5D, 3D, ACS; ResNet-18 and -50) at --baseline-width")
    parser.add_argument("--baseline-width", type=int, default=64,
                        help="width of the --baselines ResNets (default 64, the MedMNIST baseline; a full-width "
                             "ResNet-18 training step takes ~20 s on a 2-core CPU, so narrow widths such as 8 or 16 "
                             "are for quick looks only)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--size", type=int, default=28, choices=[28, 64], help="input edge length (default 28)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"],
                        help="cpu (default), cuda, or all (CPU, then CUDA when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up iterations (default: automatic, 2, or 1 for slow cases)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations (default: automatic, 5, or fewer for slow cases: as many as fit in ~10 s)")
    parser.add_argument("--json", metavar="PATH", help="also write the header and rows as JSON")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its row as JSON
    args = parser.parse_args(argv)

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    for option in ("batch_size", "warmup", "iters", "threads", "baseline_width"):
        value = getattr(args, option)
        if value is not None and value < (0 if option == "warmup" else 1):
            parser.error(f"--{option.replace('_', '-')} must be positive")
    try:
        cases = [parse_case(c) for c in (args.cases or ([] if args.baselines else DEFAULT_CASES))]
        if args.baselines:
            cases += [parse_case(f"{name}:width={args.baseline_width}") for name in BASELINES]
    except (KeyError, ValueError) as exc:
        parser.error(str(exc.args[0] if isinstance(exc, KeyError) else exc))

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda: CUDA is not available")
        devices = [d for d in devices if d != "cuda"]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    report = {"torch": torch.__version__, "batch_size": args.batch_size, "size": args.size, "devices": {}}
    failed = False
    print("# Model benchmark\n")
    for device in devices:
        header = device_header(device, threads, args)
        print(f"## {device.upper()}\n")
        print("\n".join(header) + "\n", flush=True)
        rows = []
        for name, kwargs in cases:
            spec = {"name": name, "kwargs": kwargs, "device": device, "batch_size": args.batch_size,
                    "size": args.size, "threads": args.threads, "warmup": args.warmup, "iters": args.iters}
            print(f"  running {name} ({case_label(name, kwargs)}) ...", file=sys.stderr, flush=True)
            row = run_subprocess(spec)
            failed |= "error" in row
            if device == "cpu" and "error" not in row:
                row["original_cpu_samples_per_s"] = original_reference(name, kwargs, args.batch_size, args.size)
            rows.append(row)
        print("\n".join(table(rows, device, show_original=device == "cpu")) + "\n", flush=True)
        report["devices"][device] = {"header": header, "rows": rows}
    if "cpu" in devices:
        print("original (2-core CPU): samples/s of github.com/hongkai-wei/LMTTM-VMI on a 2-core CPU (batch 32, 28³).")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
