"""Evaluate a trained run with the official MedMNIST evaluator.

    python predict.py base.json                         # best.pt of the config's run directory, test split
    python predict.py adrenalmnist3d --split val
    python predict.py demo.json --checkpoint runs/demo/last.pt
    python predict.py base.json --last-k 20             # the paper's protocol: mean over the last 20 epochs
    python predict.py base.json --last-k 20 --protocol original   # the original code's evaluation (comparison only)
    python predict.py base.json --input scan.nii.gz scans/  # your own volumes -> <run dir>/input_predictions.csv

The model is rebuilt from the checkpoint's own config; the config given here supplies the run directory
and the data root, and must name the same dataset and size. Scores cover the full split in dataset
order. Writes `<run dir>/eval/<split>/` (best.pt; `eval/<split>-last<k>/` with --last-k k, and a folder
named after the checkpoint with --checkpoint, see `eval_folder`): metrics.json, predictions.npz (y_true,
y_score), for MedMNIST datasets the evaluator's standard result CSV (re-scored to the same numbers by
`medmnist.Evaluator.parse_and_evaluate`), and roc.png, confusion.png, reliability.png (output.plots; the
expected calibration error is in metrics.json, beside `auc_ci` / `acc_ci`: stratified bootstrap intervals,
eval.ci_resamples and eval.ci_level, of the mean with --last-k). `--protocol original` reproduces the
original code's evaluation instead (engine/protocols.py), clearly labelled, into
`eval/<split>[-last<k>]-original-protocol/metrics.json`; it exists to measure that protocol's effect
(REPRODUCTION.md), not to report results. `--input` scores the user's own files instead (engine/inputs.py).
A run that train.py is training is refused, and so is a best.pt that the run's last.pt does not commit
(engine/saver.py). Exit codes: 0 done, 1 some --input file could not be scored, 2 bad config, data,
checkpoint or output folder, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

if __name__ == "__main__":  # an interrupt while the imports below run: one line, nothing written (run_cli takes over)
    import engine.early_interrupts

    engine.early_interrupts.install()

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data import DataError, check_split, data_md5
from data.info import dims_of, size_text
from engine import stats
from engine.checkpoint import CheckpointError, load_checkpoint, load_weights
from engine.config import ConfigError, config_from_dict, load_config
from engine.evaluate import official_metrics, predict_scores, uses_full_batches
from engine.inputs import predict_inputs
from engine.plots import ECE_BINS, MissingDependency, calibration, plot_evaluation
from engine.protocols import original_mean, original_protocol_scores
from engine.rundir import (BEST, ESTIMATOR, EVAL_DIR, INPUT_PREDICTIONS, LAST, OLD_ESTIMATOR, RunDirError,
                           SharedRunLock, atomic_write_bytes, atomic_write_json, epoch_file_name)
from engine.saver import committed_best
from engine.setup import apply_determinism, dataset_for, load_data, model_from_config, resolve_device, run_cli
from model.classical import is_classical


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Config keys can be overridden as in train.py: --section.key value.")
    parser.add_argument("config", nargs="?", default="base.json", help="config file (a bare name is looked up in config/)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to evaluate (default: best.pt of the run directory)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="split to score (default: eval.split)")
    parser.add_argument("--last-k", type=int, help="mean AUC/ACC over the epoch checkpoints of the last k epochs (trained with train.keep_last_k >= k)")
    parser.add_argument("--protocol", choices=["medmnist", "original"], default="medmnist",
                        help="`medmnist` (default): the full split in dataset order. `original`: the ORIGINAL CODE's "
                             "evaluation, for comparison only (shuffled, last partial batch dropped, carried state "
                             "kept, mean over k checkpoints divided by k - 1); see REPRODUCTION.md")
    parser.add_argument("--protocol-seed", type=int, default=0, help="shuffle seed of --protocol original")
    own = parser.add_argument_group("your own scans (engine/inputs.py; see docs/own-data.md)")
    own.add_argument("--input", nargs="+", metavar="PATH", help="score these files and folders instead of a split: "
                     "NIfTI (.nii, .nii.gz), NumPy (.npy, .npz with one array), images for 2-D models")
    own.add_argument("--out", type=Path, help="CSV of --input's predictions (default: <run dir>/input_predictions.csv)")
    own.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                     help="intensity window (e.g. CT -1000 400): clip to it and scale it to [0, 1], instead of the "
                          "volume's min/max")
    own.add_argument("--input-spacing", nargs=3, type=float, metavar=("X", "Y", "Z"),
                     help="voxel size (mm) of .npy/.npz volumes along their axes 0, 1, 2 (NIfTI files carry their "
                          "own); anisotropic volumes are resampled to isotropic voxels before the resize")
    own.add_argument("--no-resample", action="store_true",
                     help="keep anisotropic voxels as they are (no resampling to isotropic spacing before the resize)")
    own.add_argument("--save-preprocessed", type=Path, metavar="DIR",
                     help="write what the model saw, one .npy per input (float in [0, 1], (C, S, S, S))")
    why = parser.add_argument_group("explanation maps (engine/explain.py; see the README)")
    why.add_argument("--explain", type=int, metavar="N", help="also write maps of where the model looked for the "
                     "first N samples of the split: eval/<split>/explain/<method>/NNNN.png and .npy (with --input: "
                     "the first N files scored, <CSV name>_explain/<method>/NNNN_<file>.png beside the CSV)")
    why.add_argument("--explain-method", choices=["attention", "gradcam", "occlusion"], default="attention",
                     help="attention: LMTTM/TTM read weights (default); gradcam: last conv/stem feature map; "
                          "occlusion: any model")
    why.add_argument("--occlusion-cube", type=int, metavar="VOXELS", help="occluding cube side (default: side / 7)")
    why.add_argument("--occlusion-stride", type=int, metavar="VOXELS", help="occlusion step (default: the cube side)")
    return parser.parse_known_args(argv)


def checkpoints_to_score(args, cfg) -> tuple[list[tuple[Path, int | None]], str]:
    """[(path, expected epoch or None)] and the protocol's description."""
    last_k = cfg.eval.last_k if args.last_k is None else args.last_k
    if args.last_k is not None and args.last_k < 1:
        raise ConfigError(f"--last-k {args.last_k}: give a positive number of epoch checkpoints to average "
                          f"(leave --last-k out to score best.pt, the MedMNIST protocol)")
    if args.checkpoint is not None:
        if args.last_k is not None:
            raise ConfigError("--checkpoint and --last-k exclude each other: score one checkpoint, or the last k "
                              "epochs of the run")
        return [(args.checkpoint, None)], "checkpoint"
    if last_k <= 0:
        return [(committed_best(cfg.run_dir), None)], "best validation AUC (MedMNIST protocol)"
    last_path = cfg.run_dir / LAST
    if not last_path.is_file():
        raise CheckpointError(f"--last-k {last_k} needs the run's last.pt to know its last epoch; {last_path} does not exist")
    n = load_checkpoint(last_path)["epoch"]
    if n < last_k:
        raise CheckpointError(f"--last-k {last_k} needs the last {last_k} epoch checkpoints, but {cfg.run_dir} "
                              f"has trained only {n} epochs")
    wanted = [(cfg.run_dir / epoch_file_name(e), e) for e in range(n - last_k + 1, n + 1)]
    missing = [p.name for p, _ in wanted if not p.is_file()]
    if missing:
        raise CheckpointError(f"--last-k {last_k} needs the last {last_k} epoch checkpoints of {cfg.run_dir} (epochs "
                              f"{n - last_k + 1}..{n}), but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              f"missing; train with --train.keep_last_k {last_k}")
    return wanted, f"mean over the last {last_k} epochs ({n - last_k + 1}..{n})"


def eval_folder(args, cfg, split_name: str, n_checkpoints: int) -> Path:
    """Where the results go. The run's own protocol results: `eval/<split>/` (best.pt) and
    `eval/<split>-last<k>/` (--last-k k). Any other checkpoint (`--checkpoint`): `eval/<split>-<name>/`
    for a file of this run (e.g. `eval/test-last`), `eval/<split>-<its folder>-<name>-<hash>/` for a file
    of another run (hash: 8 hex digits of its absolute path), so they never replace the run's own results."""
    base = cfg.run_dir / EVAL_DIR
    if args.checkpoint is None:
        return base / (split_name if n_checkpoints == 1 and (cfg.eval.last_k if args.last_k is None else args.last_k) <= 0
                       else f"{split_name}-last{n_checkpoints}")
    path = Path(args.checkpoint).expanduser().resolve()
    own = cfg.run_dir.expanduser().resolve()
    if path == own / BEST:
        return base / split_name
    if path.parent == own:
        return base / f"{split_name}-{path.stem}"
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    return base / f"{split_name}-{path.parent.name[:40]}-{path.stem[:40]}-{digest}"


def check_same_task(cfg, info, ckpt: dict, path: Path) -> None:
    """Refuse a checkpoint trained on another dataset, size or class count than the config names."""
    trained = ckpt["dataset"]
    if (trained["name"], trained["size"]) != (info.name, info.size) or trained["num_classes"] != info.num_classes:
        shape = size_text(trained["size"], dims_of(trained["name"]))
        raise CheckpointError(f"{path} was trained on {trained['name']} ({shape}, {trained['num_classes']} "
                              f"classes) but the config names {info.name} ({info.size_text}, {info.num_classes} classes)")


def load_trained_model(cfg, info, path: Path):
    """(model, its training config, epoch) of a checkpoint of `info`'s task, rebuilt from the checkpoint's own
    config and loaded on the CPU."""
    ckpt = load_checkpoint(path, map_location="cpu")
    check_same_task(cfg, info, ckpt, path)
    trained_cfg = config_from_dict([(str(path), ckpt["config"])])
    model = model_from_config(trained_cfg, info)
    load_weights(model, ckpt, path)
    return model, trained_cfg, ckpt.get("epoch")


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    split_name = args.split or cfg.eval.split
    apply_determinism(cfg.train.deterministic)
    device = resolve_device(cfg.train.device)
    info = dataset_for(cfg)
    if args.explain is not None:
        _check_explain(args, cfg, info)
    with SharedRunLock(cfg.run_dir):  # refused while train.py holds the run
        if args.input:
            return _predict_inputs(args, cfg, device, info)
        return _evaluate(args, cfg, split_name, device, info)


def _predict_inputs(args, cfg, device, info) -> int:
    """--input: the checkpoint (best.pt by default) on the user's own files; one CSV row per file."""
    given = [name for name, value in (("--split", args.split), ("--last-k", args.last_k)) if value is not None]
    if args.protocol != "medmnist":
        given.append("--protocol")
    if given:
        raise ConfigError(f"--input scores your own files with one checkpoint; it excludes {', '.join(given)}")
    if is_classical(cfg.model):
        raise ConfigError(f"--input needs a neural-network checkpoint; {cfg.model_name} is a scikit-learn baseline")
    model, trained_cfg, _ = load_trained_model(cfg, info, args.checkpoint or committed_best(cfg.run_dir))
    full = uses_full_batches(trained_cfg.model)
    out, window = args.out or cfg.run_dir / INPUT_PREDICTIONS, tuple(args.window) if args.window else _data_window(cfg)
    resample = not args.no_resample and not (cfg.data.name == "csv" and not cfg.data.resample)
    what = "the predictions"
    try:
        code = predict_inputs(args.input, model=model.to(device), info=info,
                              batch_size=trained_cfg.train.batch_size if full else cfg.eval.batch_size, device=device,
                              amp=trained_cfg.train.amp, full_batches=full, window=window, spacing=args.input_spacing,
                              resample=resample, out=out,
                              save_preprocessed=args.save_preprocessed)
        if args.explain:  # after the CSV is written; maps beside it, in <CSV name>_explain/<method>/
            from engine.explain import explain_inputs

            what = "the explanation maps"
            explain_inputs(model, args.input, info, out.parent / f"{out.stem}_explain", method=args.explain_method,
                           count=args.explain, window=window, device=device, cube=args.occlusion_cube,
                           stride=args.occlusion_stride, spacing=args.input_spacing, resample=resample)
        return code
    except ValueError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise RunDirError(f"cannot write {what}: {err}") from None


def _data_window(cfg):
    """The intensity window a CSV dataset was prepared with (data.window; data.resample likewise), so --input
    prepares files as the training files were."""
    return tuple(cfg.data.window) if cfg.data.name == "csv" and cfg.data.window else None


def _evaluate(args, cfg, split_name, device, info) -> int:
    if _is_classical_run(args, cfg):  # a scikit-learn baseline (engine/classical.py): no torch checkpoint
        return _evaluate_classical(args, cfg, split_name, info)
    checkpoints, protocol = checkpoints_to_score(args, cfg)
    first = load_checkpoint(checkpoints[0][0])  # fail on a wrong checkpoint before loading any data
    check_same_task(cfg, info, first, checkpoints[0][0])
    recorded_md5 = first["dataset"].get("md5")
    del first
    _, splits = load_data(cfg, device, splits=(split_name,))
    warn_if_data_changed(cfg, info, recorded_md5)
    split = splits[split_name]
    check_split(info, split_name, split, need_all_classes=True)
    labels = split.labels.cpu().numpy()

    results = []
    shuffle = torch.Generator().manual_seed(args.protocol_seed)  # --protocol original: one loader, reshuffled per checkpoint
    for path, expected_epoch in checkpoints:  # one checkpoint in memory at a time, loaded on the CPU
        model, trained_cfg, epoch = load_trained_model(cfg, info, path)
        if expected_epoch is not None and epoch != expected_epoch:
            raise CheckpointError(f"{path} holds epoch {epoch}, not epoch {expected_epoch}: it is not "
                                  f"a checkpoint of this run's last epochs")
        model.to(device)
        if args.protocol == "original":  # the original code's evaluation, reproduced for comparison only
            torch.manual_seed(args.protocol_seed)
            scored_labels, scores = original_protocol_scores(model, split, batch_size=trained_cfg.train.batch_size,
                                                             generator=shuffle, device=device)
            check_finite(scores, path)
            auc, acc = official_metrics(scored_labels, scores, info.task)
        else:
            # batch-dependent compat models run full batches at their training batch size (padding discarded);
            # the numerics of validation during training: autocast exactly when the run trained with train.amp
            full = uses_full_batches(trained_cfg.model)
            scores = predict_scores(model, split, batch_size=trained_cfg.train.batch_size if full else cfg.eval.batch_size,
                                    device=device, amp=trained_cfg.train.amp, desc=f"{split_name} {path.name}",
                                    full_batches=full)
            check_finite(scores, path)
            auc, acc = official_metrics(labels, scores, info.task)
        del model
        results.append((path, epoch, auc, acc, scores))
        print(f"{path}: epoch {epoch}  {split_name} AUC {auc:.4f}  ACC {acc:.4f}")

    out_dir = eval_folder(args, cfg, split_name, len(results))
    if args.protocol == "original":
        return _write_original_protocol(out_dir.with_name(f"{out_dir.name}-original-protocol"), results, info,
                                        split_name, len(labels), args.protocol_seed)
    code = write_results(out_dir, cfg, info, split_name, labels, results, protocol)
    if args.explain:  # from a fresh copy of the last checkpoint, after the results are written
        _explain(args, load_trained_model(cfg, info, checkpoints[-1][0])[0], split, info, out_dir, results, device)
    return code


def _check_explain(args, cfg, info) -> None:
    from engine.explain import check_request

    if args.protocol != "medmnist":
        raise ConfigError("--explain maps the first samples of a split scored with the MedMNIST protocol; it "
                          "excludes --protocol original")
    check_request(args.explain_method, args.explain, cfg.model_name, cfg.model, info.size, args.occlusion_cube,
                  args.occlusion_stride)


def _explain(args, source, split, info, out_dir: Path, results: list, device) -> None:
    """--explain N: maps of the first N samples under out_dir/explain/ (engine/explain.py)."""
    from engine.explain import explain_split

    explain_split(source, split, info, out_dir / "explain", method=args.explain_method, count=args.explain,
                  scores=results[-1][4], device=device, cube=args.occlusion_cube, stride=args.occlusion_stride)


def write_results(out_dir: Path, cfg, info, split_name: str, labels: np.ndarray, results: list, protocol: str) -> int:
    """The results of `results` = [(path, epoch, auc, acc, scores)] in `out_dir`: the official evaluator's CSV
    (MedMNIST files), predictions.npz (of the last entry), metrics.json (AUC/ACC and the expected calibration
    error: means over the entries) and, with output.plots, roc.png, confusion.png and reliability.png of the
    last entry's scores (engine/plots.py). Written into a temporary folder beside `out_dir`, then swapped in
    as one unit: `out_dir` holds this prediction's files only (no CSV of an earlier one), and a failure (full
    disk) leaves the earlier results as they were, with no partial file."""
    ci = intervals(cfg, info, labels, results)  # before anything is written
    tmp = _fresh_folder(out_dir)
    stage = {"what": "the results"}
    try:
        metrics = _write_result_files(tmp, stage, cfg, info, split_name, labels, results, protocol, ci)
        _swap_in(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, RunDirError)):
            reason = (err.strerror or str(err)) if isinstance(err, OSError) else str(err).rsplit(": ", 1)[-1]
            raise RunDirError(f"cannot write {stage['what']} of {out_dir}: {reason}; the folder was left as it "
                              f"was") from None
        raise
    auc_ci, acc_ci = ("", "") if ci is None else (f" [{ci['auc'][0]:.4f}, {ci['auc'][1]:.4f}]",
                                                  f" [{ci['acc'][0]:.4f}, {ci['acc'][1]:.4f}]")
    print(f"{info.name} {split_name} ({len(labels)} samples, {protocol}): AUC {metrics['auc']:.4f}{auc_ci}  "
          f"ACC {metrics['acc']:.4f}{acc_ci}  ECE {metrics['ece']:.4f}"
          + ("" if ci is None else f"  ({cfg.eval.ci_level:.0%} bootstrap intervals)"))
    print(f"wrote {out_dir}")
    return 0


def _fresh_folder(out_dir: Path) -> Path:
    """A new temporary folder beside `out_dir` (those a killed prediction left over an hour ago are removed)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for old in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
            if old.is_dir() and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    except OSError as err:
        raise RunDirError(f"cannot create {out_dir}: {err.strerror or err}") from None


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp` (two renames; the earlier folder is deleted once the new one is in place)."""
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; results are ordinary folders
    old = None
    if out_dir.is_dir() and not out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old.", suffix=".tmp"))
        os.rename(out_dir, old / out_dir.name)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:
            os.rename(old / out_dir.name, out_dir)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_result_files(out_dir: Path, stage: dict, cfg, info, split_name, labels, results, protocol,
                        ci: dict | None) -> dict:
    auc = float(np.mean([r[2] for r in results]))  # mean over k checkpoints, divided by k
    acc = float(np.mean([r[3] for r in results]))
    scores = results[-1][4]
    if info.is_medmnist:  # the stock evaluator: reads the labels from the .npz and writes the standard CSV
        from medmnist import Evaluator

        evaluator = Evaluator(info.name, split_name, size=info.size, root=str(info.path.parent))
        if not np.array_equal(evaluator.labels.reshape(len(labels), -1)[:, 0], labels.reshape(len(labels), -1)[:, 0]):
            raise DataError(f"the labels of {info.path} differ between medmnist's reader and ours")
        stage["what"] = "the official evaluator's CSV"
        for _, epoch, _, _, epoch_scores in results:
            evaluator.evaluate(epoch_scores, save_folder=str(out_dir), run=f"{cfg.run_dir.name}-epoch{epoch}")
    stage["what"] = "predictions.npz"
    buffer = io.BytesIO()
    np.savez(buffer, y_true=labels, y_score=scores)
    atomic_write_bytes(buffer.getvalue(), out_dir / "predictions.npz")
    eces = [calibration(labels, r[4], info.task)["ece"] for r in results]
    metrics = {"split": split_name, "auc": auc, "acc": acc, "ece": float(np.mean(eces)), "ece_bins": ECE_BINS,
               "protocol": protocol,
               "checkpoint": [str(r[0]) for r in results] if len(results) > 1 else str(results[0][0]),
               "epochs": [r[1] for r in results],
               "per_checkpoint": [{"auc": r[2], "acc": r[3], "ece": e} for r, e in zip(results, eces)],
               "n_samples": int(len(labels)), "dataset": info.name, "size": info.size}
    if ci is not None:
        metrics.update(auc_ci=ci["auc"], acc_ci=ci["acc"], ci={k: v for k, v in ci.items() if k not in ("auc", "acc")})
    stage["what"] = "metrics.json"
    atomic_write_json(metrics, out_dir / "metrics.json")
    if cfg.output.plots:  # of the scores in predictions.npz (the last checkpoint of --last-k)
        stage["what"] = "the plots"
        try:
            plot_evaluation(out_dir, labels, scores, info.task, f"{info.name} {split_name} (n = {len(labels)})",
                            info.label_names)
        except MissingDependency as err:
            print(f"note: no roc.png, confusion.png, reliability.png: {err}")
    return metrics


def check_finite(scores: np.ndarray, path: Path) -> None:
    """Refuse scores holding NaN or inf (a checkpoint whose weights diverged) before the evaluator sees them."""
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64)).all(axis=tuple(range(1, np.ndim(scores))))
    if bad.any():
        raise CheckpointError(f"{path} gives NaN or infinite scores for {int(bad.sum())} of {len(bad)} samples: "
                              f"its weights hold NaN/inf (a diverged run?); score another checkpoint")


def warn_if_data_changed(cfg, info, recorded_md5) -> None:
    """One warning line when the data file is not the one the checkpoint was trained on (its MD5 differs)."""
    if not recorded_md5:
        return
    md5 = data_md5(cfg.data.name, root=cfg.data.root, size=cfg.data.size)
    if md5 is not None and md5 != recorded_md5:
        print(f"warning: {info.path} has MD5 {md5}, but the model was trained on a file with MD5 {recorded_md5}: "
              f"the data changed since training", file=sys.stderr)


def intervals(cfg, info, labels: np.ndarray, results: list) -> dict | None:
    """Bootstrap intervals (engine/stats.py) of the AUC and ACC of `results` = [(path, epoch, auc, acc,
    scores)], of their mean over the entries (--last-k) with the same resamples; None with eval.ci_resamples 0.
    The resampled metrics are checked against the official ones on the unresampled scores first."""
    if cfg.eval.ci_resamples <= 0:
        return None
    for _, _, auc, acc, scores in results:
        mine = stats.metrics(labels, scores, info.task)
        if abs(mine[0] - auc) > 1e-9 or abs(mine[1] - acc) > 1e-9:
            raise RuntimeError(f"engine/stats.py's metrics {mine} differ from the official ({auc}, {acc})")
    return stats.confidence_intervals(labels, [r[4] for r in results], info.task, n_resamples=cfg.eval.ci_resamples,
                                      level=cfg.eval.ci_level)


def _is_classical_run(args, cfg) -> bool:
    """A scikit-learn run: the config names one, or the file to score (default: the run's) is an estimator."""
    if is_classical(cfg.model):
        return True
    if args.checkpoint is not None:
        return Path(args.checkpoint).suffix in (".npz", ".joblib")
    return not (cfg.run_dir / BEST).exists() and any(
        (cfg.run_dir / name).is_file() for name in (ESTIMATOR, OLD_ESTIMATOR))


def _evaluate_classical(args, cfg, split_name: str, info) -> int:
    """Score the run's fitted scikit-learn estimator (arrays only, its SHA-256 checked) like a best.pt."""
    from engine import classical

    if args.last_k is not None or cfg.eval.last_k > 0:
        raise ConfigError("a scikit-learn run has no epoch checkpoints: leave out --last-k and eval.last_k")
    if args.protocol != "medmnist":
        raise ConfigError("--protocol original applies to the token Turing machines only, not to a scikit-learn run")
    own = cfg.run_dir / ESTIMATOR
    path = own if args.checkpoint is None else Path(args.checkpoint)
    payload = classical.load_estimator(path)
    check_same_task(cfg, info, payload, path)
    _, splits = load_data(cfg, torch.device("cpu"), splits=(split_name,))
    split = splits[split_name]
    check_split(info, split_name, split, need_all_classes=True)
    labels = split.labels.cpu().numpy()
    warn_if_data_changed(cfg, info, payload["dataset"].get("md5"))
    scores = classical.predict_proba(payload, split)
    check_finite(scores, path)
    auc, acc = official_metrics(labels, scores, info.task)
    print(f"{path}: {payload['model']}  {split_name} AUC {auc:.4f}  ACC {acc:.4f}")
    if path.expanduser().resolve() == own.expanduser().resolve():
        out_dir = cfg.run_dir / EVAL_DIR / split_name
    else:
        out_dir = eval_folder(args, cfg, split_name, 1)
    protocol = f"{payload['model']} estimator fitted by train.py (hyper-parameters chosen on the validation split)"
    results = [(path, 1, auc, acc, scores)]
    code = write_results(out_dir, cfg, info, split_name, labels, results, protocol)
    if args.explain:
        _explain(args, payload, split, info, out_dir, results, "cpu")
    return code


def _write_original_protocol(out_dir: Path, results: list, info, split_name: str, n_split: int, seed: int) -> int:
    """metrics.json of `--protocol original`, labelled as such, in its own folder (never eval/<split>/)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"cannot create {out_dir}: {err.strerror or err}") from None
    aucs, accs = [r[2] for r in results], [r[3] for r in results]
    k, scored = len(results), len(results[0][4])
    metrics = {"split": split_name, "protocol": "ORIGINAL CODE'S PROTOCOL, for comparison only (not MedMNIST's)",
               "auc": original_mean(aucs), "acc": original_mean(accs),
               "divided_by": max(k - 1, 1), "auc_divided_by_k": float(np.mean(aucs)),
               "acc_divided_by_k": float(np.mean(accs)), "samples_scored": scored, "n_samples": n_split,
               "shuffle_seed": seed, "checkpoint": [str(r[0]) for r in results], "epochs": [r[1] for r in results],
               "per_checkpoint": [{"auc": a, "acc": c} for a, c in zip(aucs, accs)], "dataset": info.name,
               "size": info.size}
    atomic_write_json(metrics, out_dir / "metrics.json")
    print(f"ORIGINAL CODE'S PROTOCOL (for comparison only; shuffled, {scored} of {n_split} {split_name} samples, "
          f"carried state, {k} checkpoint(s) divided by {max(k - 1, 1)}): AUC {metrics['auc']:.4f}  "
          f"ACC {metrics['acc']:.4f}  (divided by {k}: AUC {metrics['auc_divided_by_k']:.4f}  "
          f"ACC {metrics['acc_divided_by_k']:.4f})")
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)
