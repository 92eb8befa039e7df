"""Speed and cost of registered models: parameters, training and evaluation throughput, peak memory, FLOPs.

    python tools/benchmark.py                                    # LMTTM and TTM at D = M = 64 and 448, CPU
    python tools/benchmark.py --cases lmttm:dim=64,memory_tokens=64 resnet18_3d:width=16 --iters 3
    python tools/benchmark.py --baselines --baseline-width 16    # add the six ResNets (narrow: a quick look)
    python tools/benchmark.py --medmamba --iters 3               # MedMamba-3D and MedMambaSE-3D
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

Side by side with the original (`--original PATH`, a checkout of github.com/hongkai-wei/LMTTM-VMI):
LMTTM and TTM cases also build the original `TokenTuringMachineEncoder` (`tools/original.py`: CPU,
torchvision stubbed, its Xavier init) with the same D, M, r, k, patch, processor, noise and dropout, in the
same subprocess, batch, input size and thread count, and do the same work (forward, cross-entropy,
backward, Adam step; evaluation forward under no_grad). The original carries its memory from batch to
batch as its train.py does (`load_memory_tokens`, detached), in training and evaluation; ours runs its
defaults. Repetitions alternate ours / original (A, B, A, B, ...) so that a busy CPU slows both alike, and
the table shows medians and the ratio ours / original. `--compile` wraps our model in `torch.compile`
(the original stays eager); the first call's time (compilation included) is shown beside the gain.
`--compile reduce-overhead` (CUDA graphs) and `max-autotune` choose another mode. `--precision tf32` sets
train.tf32's flags, `--precision bf16` runs the forwards under bfloat16 autocast as train.amp does.

Measured side by side on a 2-core CPU shared with other jobs (1 torch thread: with 2 threads on a busy
machine the threads spin against each other; the figures are medians of interleaved repetitions and the
ratio matters, not the samples/s), batch 32, 28³, training / evaluation, ours ÷ original:
LMTTM D = M = 64 1.42× / 1.80×, TTM D = M = 64 1.24× / 1.01×
(`python tools/benchmark.py --cases lmttm:dim=64,memory_tokens=64 ttm:dim=64,memory_tokens=64
--original /path/to/LMTTM-VMI --threads 1 --iters 7`), and LMTTM D = M = 448 1.84× / 1.90× (process CPU
time, 3 interleaved repetitions). Re-run on a quiet machine with `--threads 2` (drop `--cases` for all four
cases). At D = M = 64 about half of our time is the transformer processor (the same work as the
original's) and a fifth is dropout's random draws, so the per-token savings move the total little.

The output is Markdown (header lines and one table per device), ready to paste into REPRODUCTION.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.setup import apply_tf32  # noqa: E402
from model import MODELS, build_model, count_parameters, get_model_entry  # noqa: E402
from tools.bench_seeds import run_seeds_case, seeds_report  # noqa: E402

IN_CHANNELS = 1
NUM_CLASSES = 2
MEDMAMBA = ["medmamba3d", "medmambase3d"]
BASELINES = ["resnet18_2.5d", "resnet18_3d", "resnet18_acs", "resnet50_2.5d", "resnet50_3d", "resnet50_acs"]
DEFAULT_CASES = ["lmttm:dim=64,memory_tokens=64", "ttm:dim=64,memory_tokens=64",
                 "lmttm:dim=448,memory_tokens=448", "ttm:dim=448,memory_tokens=448"]
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


ORIGINAL_MODELS = ("lmttm", "ttm")


def original_kwargs(name: str, kwargs: dict, batch_size: int, size: int) -> dict:
    """`tools.original.load_original` arguments equivalent to this case's config (LMTTM and TTM only)."""
    cfg = MODELS[name].config_cls(**kwargs)
    unsupported = [key for key, value in (("stem", cfg.stem != "3d"), ("depth_patch_size", cfg.depth_patch_size),
                                          ("processor_repeats", cfg.processor_repeats != 3),
                                          ("heads", cfg.heads != 8),
                                          ("processor", cfg.processor not in ("transformer", "mlp", "mixer")))
                   if value]
    if unsupported:
        raise ValueError(f"--original: the original code has no equivalent of {', '.join(unsupported)}")
    more = {"blocks": cfg.blocks} if name == "lmttm" else {}
    return {"model": name, "dim": cfg.dim, "memory_tokens": cfg.memory_tokens, "batch_size": batch_size,
            "num_classes": NUM_CLASSES, "processor": cfg.processor, "noise": cfg.noise, "dropout": cfg.dropout,
            "read_tokens": cfg.read_tokens, "patch_size": cfg.patch_size, "input_size": size,
            "in_channels": IN_CHANNELS, "pos_embedding": cfg.pos_embedding == "learned", **more}


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


def _timed(steps: list, device: torch.device, warmup: int | None, iters: int | None):
    """Median seconds per call of each function in `steps`, their repetitions interleaved (A, B, A, B, ...).

    Returns (medians, first-call seconds, warm-up count, timed count). The first call of each is warm-up
    iteration 1 (and includes one-time costs such as compilation); automatic counts follow the slowest
    first call.
    """

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def once(step) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return time.perf_counter() - t0

    first = [once(step) for step in steps]
    if warmup is None or iters is None:
        if max(first) < AUTO_FAST_S:
            auto_warmup, auto_iters = 2, 5
        else:
            auto_warmup, auto_iters = 1, max(1, min(5, int(AUTO_BUDGET_S / max(first))))
        warmup = auto_warmup if warmup is None else warmup
        iters = auto_iters if iters is None else iters
    for _ in range(max(warmup, 1) - 1):  # the first calls above were warm-up iteration 1
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(iters):
        for i, step in enumerate(steps):
            times[i].append(once(step))
    return [statistics.median(t) for t in times], first, max(warmup, 1), iters


def _trainer(forward, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """(training step, evaluation step) of `forward` (x -> logits): the same work for every model."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step():
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()

    def eval_step():
        model.eval()
        with torch.no_grad():
            forward(x)

    return train_step, eval_step


def _with_precision(forward, precision: str, device: torch.device):
    """`bf16`: the forward under bfloat16 autocast, as train.amp (logits returned in float32); else unchanged
    (`tf32` is a global flag, set by run_case)."""
    if precision != "bf16":
        return forward

    def autocast_forward(x):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            return forward(x).float()

    return autocast_forward


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
    shape = (IN_CHANNELS,) + (size,) * get_model_entry(name).dims  # a volume, or an image for a 2-D model

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
    model.reset_state() if hasattr(model, "reset_state") else None
    del x2, y2

    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    precision, mode = spec.get("precision") or "fp32", spec.get("compile")
    apply_tf32(precision == "tf32")
    forward = model
    if mode:
        forward = torch.compile(model, mode=None if mode in (True, "default") else mode,
                                backend=spec.get("compile_backend") or "inductor")
    ours = _trainer(_with_precision(forward, precision, device), model, x, y)
    original = None
    if spec.get("original"):
        from tools.original import load_original
        net = load_original(spec["original"], seed=0, **original_kwargs(name, kwargs, batch, size)).to(device)
        original = _trainer(_with_precision(net.step, precision, device), net, x, y)  # memory carried, as its train.py

    row = {"model": name, "kwargs": kwargs, "device": device.type, "batch_size": batch, "size": size,
           "threads": torch.get_num_threads(), "parameters": params, "compile": mode or False, "precision": precision}
    for i, mode in enumerate(("train", "eval")):
        steps = [ours[i]] + ([original[i]] if original else [])
        medians, first, used_warmup, used_iters = _timed(steps, device, warmup, iters)
        row.update({f"{mode}_samples_per_s": batch / medians[0], f"{mode}_s_per_iter": medians[0],
                    f"{mode}_first_call_s": first[0], f"{mode}_warmup": used_warmup, f"{mode}_iters": used_iters})
        if original:
            row.update({f"original_{mode}_samples_per_s": batch / medians[1],
                        f"{mode}_ratio": medians[1] / medians[0]})

    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
    else:
        peak_mib = (_peak_rss_kib() - rss_before) / 1024
    row.update({
        "peak_memory_mib": peak_mib,
        "peak_memory_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "peak_rss_increase",
        "gflop_forward_per_sample": fwd_flops / 1e9, "gflop_train_per_sample": train_flops / 1e9,
    })
    return row


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
    if args.precision != "fp32" or args.compile:
        lines.append(f"- precision {args.precision}" + (f", torch.compile mode {args.compile}, backend "
                                                        f"{args.compile_backend}" if args.compile else ""))
    return lines + [
        f"- batch size {args.batch_size}, input {IN_CHANNELS}×{args.size}³, {NUM_CLASSES} classes, Adam, "
        f"cross-entropy; medians of the timed iterations after warm-up (counts in the table)"]


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


def table(rows: list[dict], device: str, show_original: bool, show_compile: bool = False) -> list[str]:
    memory = "peak CUDA alloc (MiB)" if device == "cuda" else "peak RSS (MiB)"
    cols = ["model", "settings", "params", "train samples/s", "eval samples/s"]
    if show_original:
        cols += ["original train / eval", "ratio train / eval"]
    if show_compile:
        cols.append("first call s train / eval")
    cols += [memory, "GFLOP/sample fwd", "GFLOP/sample train", "iters train; eval"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i < 2 else "--:" for i in range(len(cols))) + "|"]
    for r in rows:
        cells = [r["model"], case_label(r["model"], r["kwargs"])]
        if "error" in r:
            cells += ["failed: " + r["error"].replace("|", "/")] + [""] * (len(cols) - 3)
        else:
            cells += [fmt_params(r["parameters"]), fmt_rate(r["train_samples_per_s"]), fmt_rate(r["eval_samples_per_s"])]
            if show_original:
                if "train_ratio" in r:
                    cells += [f"{fmt_rate(r['original_train_samples_per_s'])} / "
                              f"{fmt_rate(r['original_eval_samples_per_s'])}",
                              f"{r['train_ratio']:.2f}× / {r['eval_ratio']:.2f}×"]
                else:
                    cells += ["", ""]
            if show_compile:
                cells.append(f"{r['train_first_call_s']:.1f} / {r['eval_first_call_s']:.1f}")
            cells += [f"{r['peak_memory_mib']:.0f}", f"{r['gflop_forward_per_sample']:.3g}",
                      f"{r['gflop_train_per_sample']:.3g}",
                      f"{r['train_warmup']}+{r['train_iters']}; {r['eval_warmup']}+{r['eval_iters']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def add_numerics_options(parser: argparse.ArgumentParser) -> None:
    """--compile [MODE], --compile-backend, --precision."""
    parser.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                        choices=["default", "reduce-overhead", "max-autotune"],
                        help="wrap our model in torch.compile (MODE: default, reduce-overhead, max-autotune; "
                             "default if omitted); the first call's time is shown")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (default inductor; eager: dynamo's capture only, a quick check)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                        help="fp32 (default), tf32 (TF32 matrix products and convolutions, as train.tf32) or bf16 "
                             "(bfloat16 autocast, as train.amp); tf32 changes nothing on the CPU")


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--medmamba", action="store_true",
                        help="add MedMamba-3D and MedMambaSE-3D (model/medmamba.py) at their default sizes")
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
    parser.add_argument("--original", metavar="PATH",
                        help="a checkout of github.com/hongkai-wei/LMTTM-VMI: time the original LMTTM/TTM side by side "
                             "on the CPU (same process, batch, size and threads; repetitions interleaved) and "
                             "print the ratio")
    add_numerics_options(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the header and rows as JSON")
    parser.add_argument("--seeds", type=int, metavar="S", help="S seeds as one batched model (train.seeds) vs S "
                        "single runs with the same total --threads (tools/bench_seeds.py; lmttm and ttm cases)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its row as JSON
    return parser


def checked_cases(args, parser) -> tuple[list, str | None]:
    """The cases to run and the original checkout (or None) from the options; parser.error on a bad one."""
    for option in ("batch_size", "warmup", "iters", "threads", "baseline_width"):
        value = getattr(args, option)
        if value is not None and value < (0 if option == "warmup" else 1):
            parser.error(f"--{option.replace('_', '-')} must be positive")
    try:
        cases = [parse_case(c) for c in (args.cases or ([] if args.baselines or args.medmamba else DEFAULT_CASES))]
        if args.baselines:
            cases += [parse_case(f"{name}:width={args.baseline_width}") for name in BASELINES]
        if args.medmamba:
            cases += [parse_case(name) for name in MEDMAMBA]
    except (KeyError, ValueError) as exc:
        parser.error(str(exc.args[0] if isinstance(exc, KeyError) else exc))
    original = None
    if args.original:
        from tools.original import OriginalError, find_checkout
        try:
            original = str(find_checkout(args.original))
            for name, kwargs in cases:
                if name in ORIGINAL_MODELS:
                    original_kwargs(name, kwargs, args.batch_size, args.size)
        except (OriginalError, ValueError) as exc:
            parser.error(str(exc))
    return cases, original


def run_device(device: str, cases: list, args, original: str | None) -> list:
    """Every case on one device, each in a fresh subprocess; the rows."""
    rows = []
    for name, kwargs in cases:
        spec = {"name": name, "kwargs": kwargs, "device": device, "batch_size": args.batch_size,
                "size": args.size, "threads": args.threads, "warmup": args.warmup, "iters": args.iters,
                "compile": args.compile, "precision": args.precision, "compile_backend": args.compile_backend,
                "original": original if name in ORIGINAL_MODELS and device == "cpu" else None}
        print(f"  running {name} ({case_label(name, kwargs)}) ...", file=sys.stderr, flush=True)
        rows.append(run_subprocess(spec))
    return rows


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.case:
        spec = json.loads(args.case)
        print(json.dumps(run_seeds_case(spec) if spec.get("bench_seeds") else run_case(spec)))
        return 0
    cases, original = checked_cases(args, parser)
    if args.seeds:
        return seeds_report(cases, args.seeds, args.threads or torch.get_num_threads(), args, run_subprocess)
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
        rows = run_device(device, cases, args, original)
        failed |= any("error" in row for row in rows)
        print("\n".join(table(rows, device, show_original=bool(original), show_compile=args.compile)) + "\n",
              flush=True)
        report["devices"][device] = {"header": header, "rows": rows}
    if original:
        print(f"original: github.com/hongkai-wei/LMTTM-VMI from {original}, run in the same process (memory carried "
              "from batch to batch as its train.py); samples/s are medians of interleaved repetitions; ratio = "
              "ours / original.")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
