"""Run folders named from the settings: the same command finds its folder again, commands that train something
else never share one; --print-config and --help-config show what a command resolves to."""

from __future__ import annotations

import json

import pytest

import predict
import train
from engine.config import config_to_dict, load_config
from engine.runname import MAX_READABLE

TINY = ["--model.dim", "16", "--model.memory_tokens", "16", "--model.heads", "2", "--train.batch_size", "16",
        "--eval.batch_size", "32", "--train.epochs", "1"]


def name(config, *overrides):
    return load_config(config, list(overrides)).run_dir.name


def test_the_readme_example_and_the_rules():
    assert name("adrenalmnist3d.json") == "adrenalmnist3d"  # no overrides: the config's name, as before
    readme = "adrenalmnist3d-dim64-memory_tokens64-epochs4"
    assert name("adrenalmnist3d.json", "--model.dim", "64", "--model.memory_tokens", "64", "--train.epochs", "4") == readme
    assert name("adrenalmnist3d.json", "--train.epochs=4", "--model.memory_tokens", "64", "--model.dim", "64") == readme
    assert name("adrenalmnist3d.json", "--model.name", "ttm") == "adrenalmnist3d-ttm"
    assert name("adrenalmnist3d.json", "--train.optimizer", "sgd", "--train.amp", "true") == \
        "adrenalmnist3d-optimizer_sgd-amp_true"
    assert name("medmamba/medmamba_t_pathmnist.json", "--data.name", "chestmnist", "--data.size", "64") == \
        "medmamba_t_pathmnist-chestmnist-size64"
    # values equal to the config's own, and keys that do not change what is computed, leave the name alone
    assert name("demo.json", "--train.epochs", "10", "--model.dim", "64", "--train.lr", "0.001") == "demo"
    assert name("adrenalmnist3d.json", "--model.name", "ttm", "--model.dim", "448") == "adrenalmnist3d-ttm"
    assert name("demo.json", "--data.root", "elsewhere", "--data.download", "false", "--train.device", "cpu",
                "--train.compile", "default", "--eval.last_k", "3", "--output.dir", "x", "--output.plots", "false") == "demo"
    # --output.name wins, from the command line or a config file
    assert name("demo.json", "--train.epochs", "3", "--output.name", "mine") == "mine"


def test_long_names_end_in_a_stable_hash_of_every_setting():
    long_a = ["--train.lr", "1e-05", "--train.optimizer", "adamw", "--model.processor", "transformer_mam",
              "--model.noise", "uniform", "--train.batch_size", "16"]
    a = name("adrenalmnist3d.json", *long_a)
    assert len(a) <= MAX_READABLE and a.startswith("adrenalmnist3d-processor_transformer_mam")
    assert a == name("adrenalmnist3d.json", *reversed_pairs(long_a))  # stable, order-free
    b = name("adrenalmnist3d.json", *long_a[:-1], "64")  # differs only in a key the readable part dropped
    assert a != b and a[:-9] == b[:-9]
    lists = name("demo.json", "--train.milestones", "[0.3,0.6]")
    assert lists != name("demo.json", "--train.milestones", "[0.3,0.7]")


def reversed_pairs(args):
    pairs = [args[i:i + 2] for i in range(0, len(args), 2)]
    return [x for pair in reversed(pairs) for x in pair]


def test_torchrun_runs_get_their_own_folder(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert name("demo.json", "--train.device", "cpu") == "demo-ddp2"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert name("demo.json", "--train.device", "cpu") == "demo"


def test_print_config_prints_the_resolved_config(capsys):
    assert train.main(["demo.json", "--train.epochs", "3", "--model.heads", "4", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 3 and printed["model"]["heads"] == 4  # the overrides
    assert printed["train"]["lr"] == 0.001 and printed["data"]["name"] == "synthetic3d"  # demo.json
    assert printed["train"]["seed"] == 3407 and printed["model"]["blocks"] == 4  # base.json, the defaults
    assert printed["output"]["name"] == "demo-heads4-epochs3"
    expected = config_to_dict(load_config("demo.json", ["--train.epochs", "3", "--model.heads", "4"]))
    expected["output"]["name"] = "demo-heads4-epochs3"
    assert printed == expected


def test_help_config_shows_the_resolved_values_beside_the_defaults(capsys):
    assert train.main(["demo.json", "--train.epochs", "3", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "| `epochs` | `3` | `100` |" in out and "| `lr` | `0.001` | `0.0001` |" in out
    assert "runs/demo-epochs3" in out and "`vit_mam`" not in out  # the chosen model's table only
    assert train.main(["--help-config"]) == 0
    generic = capsys.readouterr().out
    assert "| `epochs` | `100` |" in generic and "`vit_mam`" in generic


def test_two_commands_train_apart_find_their_folders_again_and_predict_finds_each(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output.dir, runs/, lands here
    first = ["demo.json", *TINY, "--train.seed", "1"]
    second = ["demo.json", *TINY, "--train.seed", "2"]
    assert train.main(first) == 0 and train.main(second) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["demo-dim16-memory_tokens16-heads2-epochs1-seed1",
                    "demo-dim16-memory_tokens16-heads2-epochs1-seed2"]
    capsys.readouterr()
    assert train.main(first) == 0  # the same command again: its own finished run, nothing trained
    assert f"runs/{runs[0]} already finished 1 epochs" in capsys.readouterr().out
    assert predict.main(second) == 0
    assert (tmp_path / "runs" / runs[1] / "eval" / "test" / "metrics.json").is_file()
    assert not (tmp_path / "runs" / runs[0] / "eval").exists()
    trained = json.loads((tmp_path / "runs" / runs[1] / "config.json").read_text())
    assert trained["train"]["seed"] == 2
    # an old run folder (named before the names came from the settings) loads with --output.name
    (tmp_path / "runs" / runs[0]).rename(tmp_path / "runs" / "demo-old")
    assert predict.main([*first, "--output.name", "demo-old"]) == 0
    assert (tmp_path / "runs" / "demo-old" / "eval" / "test" / "metrics.json").is_file()


def test_the_readme_names_the_folders_its_commands_train_into():
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Training on a dataset")[1]
    block = section.split("```bash\n")[1].split("```")[0]
    trains = [shlex.split(line, comments=True)[2:] for line in block.splitlines() if line.startswith("python train.py")]
    paragraph = section.split("**Each command trains into its own\nfolder**")[1].split("\n\n")[0]
    said = re.findall(r"`runs/([^`]+)`", paragraph.split("The same command finds")[0])
    assert said == [name(args[0], *args[1:]) for args in trains]
