"""Is model A better than model B? Paired tests on the same test samples.

    python tools/compare.py runs/lmttm runs/ttm                     # one run each
    python tools/compare.py sweeps/t/adrenal-lmttm sweeps/t/adrenal-ttm      # sweep cells: every -seed<s> run
    python tools/compare.py 'runs/lmttm-seed*' 'runs/ttm-seed*' --json      # globs (quoted)

Reads `<run>/eval/<split>/predictions.npz` (y_true, y_score; written by predict.py) of both sides and
refuses, exit code 2, unless every run scored the same samples: same labels in the same order, same
count, same dataset and split in metrics.json. Per pair of runs (A - B):

- ΔAUC: DeLong's test for binary tasks (p-value and the CI of the difference from DeLong's variance);
  a paired stratified bootstrap for multi-class and multi-label AUC (the same resamples for A and B;
  p-value: share of resampled differences, centred on 0, at least as far from 0 as the observed one);
- ΔACC: McNemar's exact test (binomial test on the samples only one model gets right); multi-label:
  paired bootstrap. The CI of ΔACC is the paired bootstrap's.

Several runs per side (sweep cells, globs) are paired by their `-seed<s>` suffix (or in sorted order when
unnamed and as many on each side); then a combined statement: mean Δ and its standard deviation over the
pairs, in how many A is ahead and in how many the difference is significant (p < --alpha). Each pair's
p-value concerns the test-sample noise of that pair of trainings only; the spread over seeds is the
training noise. `--json` prints delta_auc, delta_auc_ci, p_value_auc, delta_acc, delta_acc_ci, p_value_acc,
n and method of the single pair; with several, n, method, each pair's in "pairs" and the "combined" summary.
--split names the folder under eval/ (`test`, `val`, or e.g. `test-last20`; predictions.npz of a --last-k
folder holds its last checkpoint's scores only). Exit codes: 0 done, 2 runs that cannot be compared.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import stats  # noqa: E402

SEED = re.compile(r"-seed(\d+)$")


class CompareError(Exception):
    """Runs that cannot be compared (exit code 2)."""


@dataclass
class Scored:
    run: Path
    y_true: np.ndarray
    y_score: np.ndarray
    info: dict  # metrics.json (empty when absent)

    @property
    def seed(self):
        m = SEED.search(self.run.name)
        return int(m.group(1)) if m else None


def run_dirs(spec: str) -> list[Path]:
    """A run directory, a glob of them, or a sweep cell (`<dir>/<cell>` standing for `<cell>-seed<s>`)."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        found = [Path(p) for p in sorted(glob.glob(str(path))) if Path(p).is_dir()]
    elif (path / "eval").is_dir():
        found = [path]
    else:
        found = sorted((p for p in path.parent.glob(f"{glob.escape(path.name)}-seed*") if SEED.search(p.name)
                        and p.is_dir()), key=lambda p: int(SEED.search(p.name).group(1)))
    if not found:
        raise CompareError(f"{spec}: no run directory (a run with an eval/ folder, a glob, or a sweep cell "
                           f"whose runs are named {path.name}-seed<s>)")
    return found


def load_scored(run: Path, split: str) -> Scored:
    path = run / "eval" / split / "predictions.npz"
    if not path.is_file():
        raise CompareError(f"{path} does not exist: score the run first (python predict.py ... --split "
                           f"{split.split('-')[0]})")
    try:
        with np.load(path) as f:
            y_true, y_score = np.asarray(f["y_true"]), np.asarray(f["y_score"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as err:
        raise CompareError(f"cannot read {path} as predict.py's predictions (y_true, y_score): {err}") from None
    if len(y_true) != len(y_score) or y_score.ndim != 2:
        raise CompareError(f"{path}: {len(y_true)} labels but scores of shape {y_score.shape}")
    try:
        info = json.loads((path.parent / "metrics.json").read_text())
    except (OSError, ValueError):
        info = {}
    return Scored(run, y_true, y_score, info)


def check_same_samples(items: list) -> None:
    """Refuse unless every scored run holds the same samples (labels, order, count, dataset, split)."""
    first = items[0]
    for other in items[1:]:
        where = f"{first.run} and {other.run}"
        for key in ("dataset", "size", "split"):
            a, b = first.info.get(key), other.info.get(key)
            if a is not None and b is not None and a != b:
                raise CompareError(f"{where} were scored on different data ({key} {a} vs {b}): not the same samples")
        if len(first.y_true) != len(other.y_true):
            raise CompareError(f"{where} hold different sample counts ({len(first.y_true)} vs "
                               f"{len(other.y_true)}): not the same samples")
        if first.y_true.shape != other.y_true.shape or not np.array_equal(first.y_true, other.y_true):
            n = len(first.y_true)
            differ = int(np.sum(first.y_true.reshape(n, -1) != other.y_true.reshape(n, -1)))
            raise CompareError(f"{where} hold different labels ({differ} differ): not the same samples, or "
                               f"not in the same order")
        if first.y_score.shape != other.y_score.shape:
            raise CompareError(f"{where} hold scores of different shapes ({first.y_score.shape} vs "
                               f"{other.y_score.shape})")


def pair_runs(side_a: list, side_b: list) -> tuple[list, list]:
    """[(a, b)] paired by seed (or in order) and the names left unpaired."""
    seeds_a, seeds_b = [s.seed for s in side_a], [s.seed for s in side_b]
    if None not in seeds_a + seeds_b and set(seeds_a) & set(seeds_b):
        by_b = {s.seed: s for s in side_b}
        pairs = [(a, by_b[a.seed]) for a in side_a if a.seed in by_b]
        left = [str(s.run) for s in side_a + side_b if s.seed not in set(seeds_a) & set(seeds_b)]
        return pairs, left
    if len(side_a) != len(side_b):
        raise CompareError(f"cannot pair {len(side_a)} run(s) with {len(side_b)}: give runs named -seed<s> with "
                           f"seeds in common, or as many runs on each side")
    return list(zip(side_a, side_b)), []


def compare_sides(dirs_a: list, dirs_b: list, split: str = "test", n_resamples: int = 2000, level: float = 0.95,
                  alpha: float = 0.05) -> dict:
    """{'pairs': [per-pair comparison], 'combined': summary, 'unpaired': [...]} of two lists of run dirs."""
    side_a = [load_scored(Path(d), split) for d in dirs_a]
    side_b = [load_scored(Path(d), split) for d in dirs_b]
    check_same_samples(side_a + side_b)
    pairs, left = pair_runs(side_a, side_b)
    task = stats.infer_task(side_a[0].y_true, side_a[0].y_score)
    results = []
    for a, b in pairs:
        r = stats.compare_scores(a.y_true, a.y_score, b.y_score, task, n_resamples=n_resamples, level=level)
        results.append({"run_a": str(a.run), "run_b": str(b.run), "seed": a.seed, **r})
    last_k = any(len(s.info.get("epochs") or []) > 1 for s in side_a + side_b)
    return {"split": split, "task": task, "pairs": results, "combined": stats.combine(results, alpha),
            "unpaired": left, "last_checkpoint_only": last_k}


def pooled_intervals(run_dirs_: list, split: str = "test", n_resamples: int = 2000, level: float = 0.95):
    """Bootstrap interval of the mean over runs (e.g. seeds) of AUC and ACC, every run scored on the same
    resamples of the test samples ("pooled": test-sample noise of the seed mean); None without scores."""
    try:
        items = [load_scored(Path(d), split) for d in run_dirs_]
        check_same_samples(items)
    except CompareError:
        return None
    task = stats.infer_task(items[0].y_true, items[0].y_score)
    return stats.confidence_intervals(items[0].y_true, [s.y_score for s in items], task, n_resamples, level)


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------

def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def _ci(ci) -> str:
    return "" if ci is None else f" [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def report_text(result: dict, level: float, alpha: float) -> str:
    pairs = result["pairs"]
    first = pairs[0]
    lines = [f"{result['split']} split, {first['n']} samples, {result['task']}; A - B, {level:.0%} intervals; "
             f"AUC: {first['method']['auc']}, ACC: {first['method']['acc']}"]
    for r in pairs:
        only = f"  (A only right on {r['discordant'][0]}, B only on {r['discordant'][1]})" if "discordant" in r else ""
        seed = "" if r["seed"] is None else f"seed {r['seed']}: "
        lines += [f"{seed}A = {r['run_a']}  B = {r['run_b']}",
                  f"  AUC {r['auc_a']:.4f} vs {r['auc_b']:.4f}  Δ {r['delta_auc']:+.4f}{_ci(r['delta_auc_ci'])}  "
                  f"p = {_p(r['p_value_auc'])}",
                  f"  ACC {r['acc_a']:.4f} vs {r['acc_b']:.4f}  Δ {r['delta_acc']:+.4f}{_ci(r['delta_acc_ci'])}  "
                  f"p = {_p(r['p_value_acc'])}"
                  + only]
    c = result["combined"]
    if len(pairs) > 1:
        lines.append(f"combined over {len(pairs)} pairs of runs:")
        for key in ("auc", "acc"):
            std, n = c[f"delta_{key}_std"], len(pairs)
            lines.append(f"  Δ{key.upper()} mean {c[f'delta_{key}_mean']:+.4f} ± "
                         f"{'n/a' if std is None else f'{std:.4f}'} (std over pairs); A ahead in "
                         f"{c[f'{key}_a_better']}/{n}, significant (p < {alpha:g}) in {c[f'{key}_significant']}/{n}")
    if result["unpaired"]:
        lines.append("unpaired (no run of the same seed on the other side): " + ", ".join(result["unpaired"]))
    if result["last_checkpoint_only"]:
        lines.append("note: a --last-k folder's predictions.npz holds its last checkpoint's scores; these tests "
                     "compare those, not the mean over the k checkpoints")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", metavar="RUN_A", help="run directory, glob of run directories, or sweep cell")
    parser.add_argument("run_b", metavar="RUN_B", help="the same for the model compared against")
    parser.add_argument("--split", default="test", help="folder under eval/ (default: test)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default 2000)")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level of the combined count")
    args = parser.parse_args(argv)
    if not 0 < args.level < 1 or not 0 < args.alpha < 1 or args.resamples < 0:
        print("error: --level and --alpha lie between 0 and 1, --resamples is 0 or more", file=sys.stderr)
        return 2
    try:
        result = compare_sides(run_dirs(args.run_a), run_dirs(args.run_b), args.split, args.resamples, args.level,
                               args.alpha)
    except (CompareError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        first = result["pairs"][0]
        flat = dict(first) if len(result["pairs"]) == 1 else {"n": first["n"], "method": first["method"]}
        print(json.dumps({**flat, **result}, indent=2))
    else:
        print(report_text(result, args.level, args.alpha))
    return 0


if __name__ == "__main__":
    sys.exit(main())
