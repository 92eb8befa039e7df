"""Bad configs, data files and checkpoints: one `error: ...` line on stderr, exit code 2, no traceback (issue 15).

The scripts are driven as users drive them: `train.main` / `predict.main` wrapped by `engine.setup.run_cli`
in-process (fast), and a few through `python train.py` / `python predict.py` subprocesses. Every case fails
before the configuration, data or checkpoint is used, so nothing here trains a model.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import override_args

import predict
import train
from data import DataError, Split, check_split, dataset_info, load_splits
from engine.checkpoint import CheckpointError, load_checkpoint, load_weights
from engine.config import CONFIG_DIR, ConfigError, load_config
from engine.setup import run_cli
from model import build_model

REPO = Path(__file__).resolve().parent.parent
BASE = str(CONFIG_DIR / "base.json")


def cli_error(main, argv, capsys) -> str:
    """Run a script's main as the command line does; assert exit code 2 and one `error:` line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# before a case's own arguments (which win): if a case were accepted, it would train a tiny model for one epoch
SAFE = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.epochs", "1"]


def train_error(tmp_path, monkeypatch, capsys, config, *argv) -> str:
    monkeypatch.chdir(tmp_path)  # a run directory, if any were made, would land in tmp_path/runs
    return cli_error(train.main, [config, *override_args(["--output.dir", str(tmp_path / "runs"), *SAFE], *argv)], capsys)


def write_json(path: Path, content) -> str:
    path.write_text(json.dumps(content))
    return str(path)


# --- config files ---------------------------------------------------------------------------------


def test_non_utf8_config_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"extends": "base.json", "output": {"name": "caf\xe9"}}')
    message = train_error(tmp_path, monkeypatch, capsys, str(path))
    assert str(path) in message and "not UTF-8" in message and "0xe9" in message


@pytest.mark.parametrize("parent", [5, ["base.json"], {}, True, "", 1.5])
def test_extends_must_name_a_file(tmp_path, monkeypatch, capsys, parent):
    path = write_json(tmp_path / "child.json", {"extends": parent})
    message = train_error(tmp_path, monkeypatch, capsys, path)
    assert path in message and '"extends" must name a config file' in message and json.dumps(parent) in message


def test_extends_a_missing_file_names_the_child(tmp_path, monkeypatch, capsys):
    path = write_json(tmp_path / "child.json", {"extends": "no_such_parent.json"})
    message = train_error(tmp_path, monkeypatch, capsys, path)
    assert path in message and "'no_such_parent.json' not found" in message


def test_config_path_that_is_a_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    message = train_error(tmp_path, monkeypatch, capsys, str(tmp_path / "configs"))
    assert "is a directory" in message and "not found" not in message


@pytest.mark.parametrize("content,expected", [
    ([1, 2], "must hold a JSON object"),
    ("text", "must hold a JSON object"),
    ({"train": None}, "train must be a JSON object, got None"),
    ({"model": None}, "section model must be a JSON object"),
])
def test_config_of_the_wrong_shape(tmp_path, monkeypatch, capsys, content, expected):
    message = train_error(tmp_path, monkeypatch, capsys, write_json(tmp_path / "c.json", content))
    assert expected in message


def test_duplicate_json_keys_are_rejected(tmp_path, monkeypatch, capsys):
    path = tmp_path / "dup.json"
    path.write_text('{"extends": "%s", "train": {"epochs": 1, "lr": 0.1, "epochs": 2}}' % BASE)
    message = train_error(tmp_path, monkeypatch, capsys, str(path))
    assert "'epochs' appears twice" in message and str(path) in message
    path.write_text('{"train": {"epochs": 1}, "train": {"lr": 0.1}}')  # duplicate sections too
    assert "'train' appears twice" in train_error(tmp_path, monkeypatch, capsys, str(path))


def test_deeply_nested_json(tmp_path, monkeypatch, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in train_error(tmp_path, monkeypatch, capsys, str(path))


def test_nan_in_a_config_file(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"train": {"lr": NaN}}')  # Python's json accepts NaN; a config must not
    with pytest.raises(ConfigError, match=r"train\.lr must be a finite number, got nan"):
        load_config(path)


# --- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,expected", [
    (["--train.seed", "1e23"], r"train.seed must be int (a whole number), got 1e+23"),
    (["--train.seed", str(10**23)], "above its maximum 4294967295"),
    (["--train.seed", str(2**32)], "above its maximum 4294967295"),  # np.random.seed's limit
    (["--train.epochs", str(10**30)], "out of range (at most 2147483647)"),
    (["--train.batch_size", str(2**40)], "out of range"),
    (["--model.dim", str(2**63)], "out of range"),
    (["--eval.last_k", "-2"], "below its minimum 0"),
    (["--train.epochs", "true"], "must be int, got True (bool)"),
    (["--train.lr", "NaN"], "train.lr must be a finite number, got nan"),
    (["--train.lr", "Infinity"], "train.lr must be a finite number, got inf"),
    (["--train.lr", "1e999"], "train.lr must be a finite number, got inf"),
    (["--train.lr", str(10**400)], "too large for a float key"),
    (["--train.grad_clip", "Infinity"], "train.grad_clip must be a finite number"),
    (["--model.dropout", "NaN"], "model.dropout must be a finite number"),
    (["--model.noise_rate", "Infinity"], "model.noise_rate must be a finite number"),
    (["--train.milestones", "[0.5, NaN]"], "train.milestones[1] must be a finite number"),
    (["--train.milestones", "[5,-1]"], "train.milestones[0] = 5.0 is not a fraction of the epochs in (0, 1]"),
    (["--train.milestones", "[0.5,-1]"], "train.milestones[1] = -1.0 is not a fraction"),
    (["--train.milestones", "[0, 0.5]"], "train.milestones[0] = 0.0 is not a fraction"),
    (["--train.milestones", "[0.75, 0.5]"], "must be strictly increasing"),
    (["--train.milestones", "[0.5, 0.5]"], "must be strictly increasing"),
    (["--output.name", "x" * 300], "output.name is 300 bytes long"),
    (["--output.name", "é" * 101], "output.name is 202 bytes long"),  # bytes, not characters
    (["--output.name", "a/b"], "must be a single folder name without '/'"),
    (["--output.name", ".."], "is not a folder name"),
    (["--output.name", "a\x00b"], "output.name contains a NUL character"),
    (["--output.dir", "a\x00b"], "output.dir contains a NUL character"),
    (["--data.root", "a\x00b"], "data.root contains a NUL character"),
    (["--train.epochs", "--model.dim", "64"], "override --train.epochs has no value (it is followed by --model.dim)"),
    (["--train.epochs"], "override --train.epochs has no value"),
])
def test_bad_values_stop_with_one_line(tmp_path, monkeypatch, capsys, override, expected):
    message = train_error(tmp_path, monkeypatch, capsys, "demo.json", *override)
    assert expected in message
    assert not (tmp_path / "runs").exists()  # nothing written


def test_accepted_edge_values():
    """The bounds are not too tight: the largest seed, milestone 1.0, a 200-byte name and no milestones pass."""
    cfg = load_config("demo.json", ["--train.seed", str(2**32 - 1), "--train.milestones", "[0.25, 1]",
                                    "--output.name", "r" * 200, "--train.lr", "1"])
    assert (cfg.train.seed, cfg.train.milestones, cfg.run_dir.name) == (2**32 - 1, [0.25, 1.0], "r" * 200)
    assert load_config("demo.json", ["--train.milestones", "[]"]).train.milestones == []
    with pytest.raises(ConfigError, match="201 bytes"):
        load_config("demo.json", ["--output.name", "r" * 201])
    # the milestones decay at round(m * epochs), as train.learning_rate does
    cfg = load_config("demo.json", ["--train.scheduler", "multistep", "--train.milestones", "[0.5, 1]",
                                    "--train.epochs", "4", "--train.lr", "1", "--train.gamma", "0.1"])
    assert [train.learning_rate(cfg, e) for e in range(4)] == pytest.approx([1, 1, 0.1, 0.1])


# --- data files -----------------------------------------------------------------------------------


def data_args(root: Path) -> list[str]:
    return ["demo.json", "--data.name", "adrenalmnist3d", "--data.root", str(root), "--data.download", "false"]


def test_npy_file_renamed_npz(tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "volumes.npy", np.zeros((4, 28, 28, 28), dtype=np.uint8))
    path = tmp_path / "adrenalmnist3d.npz"
    (tmp_path / "volumes.npy").rename(path)
    message = train_error(tmp_path, monkeypatch, capsys, *data_args(tmp_path))
    assert str(path) in message and "(a .npy file)" in message and "(4, 28, 28, 28)" in message
    assert dataset_info("adrenalmnist3d").md5 in message


def test_dataset_path_that_is_a_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "adrenalmnist3d.npz").mkdir()
    message = train_error(tmp_path, monkeypatch, capsys, *data_args(tmp_path))
    assert f"{tmp_path / 'adrenalmnist3d.npz'} is a directory" in message


@pytest.mark.parametrize("empty", ["train", "val", "test"])
def test_empty_split_is_rejected_up_front(tmp_path, monkeypatch, capsys, empty):
    arrays = {}
    for split in ("train", "val", "test"):
        n = 0 if split == empty else 4
        arrays[f"{split}_images"] = np.zeros((n, 28, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    np.savez(tmp_path / "adrenalmnist3d.npz", **arrays)
    with pytest.raises(DataError, match=f"the {empty} split of .*adrenalmnist3d.npz is empty"):
        load_splits("adrenalmnist3d", root=tmp_path, download=False)
    if empty == "train":
        message = train_error(tmp_path, monkeypatch, capsys, *data_args(tmp_path))
        assert "the train split" in message and "is empty" in message


def test_check_split_needs_every_class_for_auc():
    info = dataset_info("organmnist3d", root="/data")
    images = torch.zeros(6, 1, 28, 28, 28, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 3, 3, 10, 0])  # classes 1, 2, 4..9 absent
    split = Split(images, labels)
    check_split(info, "val", split, need_all_classes=False)  # not empty: fine without the class check
    with pytest.raises(DataError) as err:
        check_split(info, "val", split, need_all_classes=True)
    message = str(err.value)
    assert "val split of /data/organmnist3d.npz has only classes [0, 3, 10] of 11" in message
    assert "[1, 2, 4, 5, 6, 7, 8, 9]" in message and "AUC is undefined" in message
    binary = dataset_info("adrenalmnist3d")
    with pytest.raises(DataError, match=r"val split of adrenalmnist3d has only classes \[1\] of 2"):
        check_split(binary, "val", Split(images[:2], torch.tensor([1, 1])), need_all_classes=True)
    check_split(binary, "val", Split(images[:2], torch.tensor([1, 0])), need_all_classes=True)
    with pytest.raises(DataError, match="test split of adrenalmnist3d is empty"):
        check_split(binary, "test", Split(images[:0], torch.tensor([], dtype=torch.int64)), need_all_classes=False)


# --- checkpoints ----------------------------------------------------------------------------------


def tiny_model(dim=16):
    return build_model("lmttm", in_channels=1, num_classes=2, input_size=28, dim=dim, memory_tokens=16, heads=2)


def tiny_checkpoint(model) -> dict:
    cfg = {"model": {"name": "lmttm", "dim": model.cfg.dim, "memory_tokens": 16, "blocks": 4}}
    return {"model": model.state_dict(), "config": cfg, "epoch": 3,
            "dataset": {"name": "adrenalmnist3d", "size": 28, "num_classes": 2, "task": "binary-class", "md5": None}}


def predict_error(path: Path, capsys) -> str:
    return cli_error(predict.main, ["demo.json", "--checkpoint", str(path), "--output.dir", str(path.parent)], capsys)


def test_load_weights_describes_a_2d_checkpoint_with_its_image_size():
    """A MedMamba checkpoint of a 2-D dataset is described as trained on 28² images, with its stage sizes."""
    def medmamba(widths):
        return build_model("medmamba_t", in_channels=3, num_classes=9, input_size=28, depths=[1, 1], widths=widths)

    ckpt = {"model": medmamba([8, 16]).state_dict(), "epoch": 1,
            "config": {"model": {"name": "medmamba_t", "depths": [1, 1], "widths": [8, 16], "patch_size": None}},
            "dataset": {"name": "pathmnist", "size": 28, "num_classes": 9, "task": "multi-class", "md5": None}}
    with pytest.raises(CheckpointError) as err:
        load_weights(medmamba([4, 8]), ckpt, Path("run/best.pt"))
    assert "It was trained with model medmamba_t (depths=[1, 1], widths=[8, 16]) on pathmnist (28², 9 classes)" \
        in str(err.value)


def test_random_bytes_checkpoint(tmp_path, capsys):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    message = predict_error(path, capsys)
    assert f"{path} is not a checkpoint of this project" in message
    assert "weights_only" not in message and "False" not in message


def run_payload(marker: str) -> None:
    Path(marker).touch()


class Payload:
    """Unpickling this calls run_payload: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (run_payload, (self.marker,))


def test_pickle_with_code_is_refused_without_advice(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    assert pickle.loads(pickle.dumps(Payload(marker))) is None and marker.exists()  # the payload works
    marker.unlink()
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload(marker)}, path)
    message = predict_error(path, capsys)
    assert "is not a checkpoint of this project" in message and "run_payload" in message and "not loaded" in message
    assert "weights_only" not in message and not marker.exists()
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps(Payload(marker)))
    assert "weights_only" not in predict_error(plain, capsys) and not marker.exists()


def test_empty_truncated_and_directory_checkpoints(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is an empty file (0 bytes)" in predict_error(tmp_path / "empty.pt", capsys)
    torch.save(tiny_checkpoint(tiny_model()), tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:4000])
    assert "truncated or corrupt" in predict_error(tmp_path / "cut.pt", capsys)
    (tmp_path / "run").mkdir()
    assert f"checkpoint {tmp_path / 'run'} is a directory" in predict_error(tmp_path / "run", capsys)


@pytest.mark.parametrize("change,expected", [
    (lambda c: c.pop("dataset"), "lacks 'dataset'"),
    (lambda c: c.pop("epoch"), "lacks 'epoch'"),
    (lambda c: c.update(config="lmttm"), "'config' is a str, not a dict"),
    (lambda c: c.update(dataset=[1]), "'dataset' is a list, not a dict"),
    (lambda c: c.update(epoch=True), "'epoch' is a bool, not a int"),
    (lambda c: c["dataset"].pop("num_classes"), "'dataset' record lacks 'num_classes'"),
])
def test_checkpoint_missing_keys(tmp_path, capsys, change, expected):
    ckpt = tiny_checkpoint(tiny_model())
    change(ckpt)
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="c.pt"):
        load_checkpoint(tmp_path / "c.pt")
    assert expected in predict_error(tmp_path / "c.pt", capsys)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "holds a Tensor, not a dict" in predict_error(tmp_path / "tensor.pt", capsys)


def test_load_weights_names_the_mismatch_and_the_trained_config():
    trained = tiny_model(dim=32)
    ckpt = tiny_checkpoint(trained)
    model = tiny_model(dim=16)
    with pytest.raises(CheckpointError) as err:
        load_weights(model, ckpt, Path("run/best.pt"))
    message = str(err.value)
    mismatched = [k for k, v in model.state_dict().items()
                  if isinstance(v, torch.Tensor) and v.shape != trained.state_dict()[k].shape]
    assert len(mismatched) > 3
    assert f"{len(mismatched)} shape mismatches" in message and f"and {len(mismatched) - 3} more" in message
    assert "lmttm (dim=32, memory_tokens=16, blocks=4) on adrenalmnist3d (28³, 2 classes)" in message
    assert "run/best.pt does not fit the model" in message

    same = tiny_checkpoint(tiny_model(dim=16))
    key = next(iter(same["model"]))
    same["model"] = {k: v for k, v in same["model"].items() if k != key} | {"extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=rf"1 missing keys \({key}\); 1 unexpected keys \(extra\.weight\)"):
        load_weights(model, same, Path("x.pt"))

    good = tiny_checkpoint(tiny_model(dim=16))
    load_weights(model, good, Path("x.pt"))  # a fitting checkpoint loads, and exactly
    assert all(torch.equal(v, good["model"][k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))


# --- as a user runs it ----------------------------------------------------------------------------


def test_scripts_in_subprocesses(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"extends": 5, "x": "\xff"}')
    random_ckpt = tmp_path / "r.pt"
    random_ckpt.write_bytes(np.random.default_rng(1).bytes(3000))
    for args in (["train.py", str(bad)], ["predict.py", "demo.json", "--checkpoint", str(random_ckpt), "--output.dir", str(tmp_path)]):
        done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert "Traceback" not in done.stderr and "weights_only" not in done.stderr


def test_paths_too_long_for_the_file_system(tmp_path, monkeypatch, capsys):
    long = "a" * 5000  # one component longer than any file system's limit: stat raises OSError, not False
    assert "File name too long" in train_error(tmp_path, monkeypatch, capsys, long)
    message = train_error(tmp_path, monkeypatch, capsys, *data_args(tmp_path / long))
    assert "Cannot use" in message and "File name too long" in message
    with pytest.raises(CheckpointError, match="cannot use checkpoint path .*File name too long"):
        load_checkpoint(tmp_path / long)


def test_data_files_holding_pickles_and_a_root_that_is_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "adrenalmnist3d.npz").write_bytes(pickle.dumps({"train_images": [1, 2]}))
    message = train_error(tmp_path, monkeypatch, capsys, *data_args(tmp_path))
    assert "pickled Python objects" in message and "allow_pickle" not in message and "unsafe" not in message
    (tmp_path / "root_file").write_text("x")
    message = train_error(tmp_path, monkeypatch, capsys, *data_args(tmp_path / "root_file"))
    assert "data.root is a file, not a folder" in message
