"""Micro-benchmark of the selective scan (model/selective_scan.py): forward + backward time of

* reference: the textbook per-step loop indexing [..., t] every step, under autograd (the function
  `reference_scan` of tests/test_selective_scan.py, the only copy of it);
* sequential: the CPU form (time slices unbound once, custom backward);
* chunked: the GPU form (chunked parallel scan, same custom backward);
* mamba_ssm: the CUDA kernel, when importable on CUDA.

    python tools/bench_scan.py                          # B=32, K=6, d=96, L=343, N=16 on CPU (docs/spec/MEDMAMBA.md §5)
    python tools/bench_scan.py --device cuda --reps 10
    python tools/bench_scan.py --batch 4 --reps 3 --threads 2

Inputs are SS3D-like: u, z ~ N(0, 1), Δ raw ~ N(0, 1) with a softplus⁻¹(dt) bias, A = -(1..N), D = 1, B, C ~
N(0, 1), fp32; each measurement is forward (with z, D, Δ-bias, softplus) then backward of a random weighted
sum, to every input's gradient. The table shows the median of `--reps` timed repetitions after one warm-up
(the reference: `--ref-reps`, default 1, no warm-up), in wall-clock seconds and in process CPU seconds (the
latter is the fairer figure on a CPU shared with other jobs, with --threads 1), each form's speed-up over
the reference, and the maximum relative difference of each form's output from the sequential form's.

Measured (`python tools/bench_scan.py --reps 2 --threads 1`, torch 2.13.0 CPU, on the project's 2-core machine
under a load average of about 7 from other jobs, so CPU seconds are the figure to read):

| form | wall s | CPU s | speed-up over reference, wall / CPU |
|---|---:|---:|---:|
| reference | 24.7 | 12.3 | 1.0× / 1.0× |
| sequential | 6.5 | 1.56 | 3.8× / 7.9× |
| chunked | 38.7 | 17.7 | 0.6× / 0.7× |

The chunked form is the GPU form (about 2·log2(chunk) + a few big-tensor passes per level instead of L
small steps); on a CPU every pass over the (L, batch, K, d, N) tensors costs more than the whole loop.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from model.selective_scan import mamba_ssm_available, selective_scan  # noqa: E402


def load_reference():
    path = REPO / "tests" / "test_selective_scan.py"
    spec = importlib.util.spec_from_file_location("_scan_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_scan


def make_inputs(b, K, d, L, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dt = torch.exp(torch.rand(K, d, generator=g) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
                   + torch.log(torch.tensor(1e-3)))
    x = dict(
        u=r(b, K, d, L),
        delta=r(b, K, d, L),
        A=-torch.arange(1, N + 1, dtype=torch.float32).repeat(K, d, 1),
        B=r(b, K, N, L),
        C=r(b, K, N, L),
        D=torch.ones(K, d),
        z=r(b, K, d, L),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # softplus⁻¹(dt)
    )
    return {k: v.to(device) for k, v in x.items()}


def step(fn, inputs, weight, sync):
    leaves = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    t0, c0 = time.perf_counter(), time.process_time()
    y = fn(leaves)
    (y * weight).sum().backward()
    sync()
    return (time.perf_counter() - t0, time.process_time() - c0), y.detach()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--d", type=int, default=96)
    p.add_argument("--L", type=int, default=343)
    p.add_argument("--N", type=int, default=16)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--ref-reps", type=int, default=1, help="timed reference repetitions (0 skips it)")
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "bench_scan.py: error: --device cuda but CUDA is not available\n")
    if min(a.batch, a.K, a.d, a.L, a.N, a.reps) < 1 or a.ref_reps < 0 or a.chunk < 2:
        p.exit(2, "bench_scan.py: error: sizes and --reps must be positive, --chunk at least 2\n")
    if a.threads:
        torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    inputs = make_inputs(a.batch, a.K, a.d, a.L, a.N, a.device)
    weight = torch.randn(a.batch, a.K, a.d, a.L, generator=torch.Generator().manual_seed(1)).to(a.device)

    forms = {
        "sequential": lambda kw: selective_scan(**kw, delta_softplus=True, method="sequential"),
        "chunked": lambda kw: selective_scan(**kw, delta_softplus=True, method="chunked", chunk=a.chunk),
    }
    if a.device == "cuda" and mamba_ssm_available():
        forms["mamba_ssm"] = lambda kw: selective_scan(**kw, delta_softplus=True, method="mamba_ssm")

    print(f"selective scan, forward + backward: batch={a.batch} K={a.K} d={a.d} L={a.L} N={a.N}, fp32, "
          f"device {a.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    times, outs = {}, {}
    for name, fn in forms.items():
        step(fn, inputs, weight, sync)  # warm-up
        runs = []
        for _ in range(a.reps):
            t, y = step(fn, inputs, weight, sync)
            runs.append(t)
        times[name], outs[name] = runs, y
    if a.ref_reps:
        ref = load_reference()
        fn = lambda kw: ref(**kw, delta_softplus=True)[0]  # noqa: E731
        runs = []
        for _ in range(a.ref_reps):
            t, y = step(fn, inputs, weight, sync)
            runs.append(t)
        times["reference"], outs["reference"] = runs, y

    base = outs["sequential"]
    scale = base.abs().max().item()
    med = {n: [statistics.median(r[i] for r in runs) for i in (0, 1)] for n, runs in times.items()}
    ref = med.get("reference")
    print()
    print("| form | wall s (median) | CPU s (median) | runs | speed-up over reference, wall / CPU "
          "| max rel. diff vs sequential |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ["reference", *forms]:
        if name not in times:
            continue
        wall, cpu = med[name]
        speed = f"{ref[0] / wall:.1f}× / {ref[1] / cpu:.1f}×" if ref else "-"
        diff = (outs[name] - base).abs().max().item() / scale
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {len(times[name])} | {speed} | {diff:.1e} |")


if __name__ == "__main__":
    main()
