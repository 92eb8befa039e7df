"""Config loading: strict keys, types, ranges, inheritance, overrides and the shipped config files."""

from __future__ import annotations

import json

import pytest

from data import dataset_info
from engine.config import (CONFIG_DIR, ConfigError, config_from_dict, config_to_dict, load_config, parse_overrides)
from engine.setup import dataset_for

DATASET_CLASSES = {"organmnist3d": 11, "nodulemnist3d": 2, "adrenalmnist3d": 2, "fracturemnist3d": 3,
                   "vesselmnist3d": 2, "synapsemnist3d": 2}


def write(path, content):
    path.write_text(json.dumps(content))
    return path


def test_base_json_states_the_defaults():
    assert config_to_dict(load_config("base.json")) == config_to_dict(config_from_dict([]))
    cfg = load_config("base")
    assert (cfg.model_name, cfg.model.dim, cfg.model.memory_tokens, cfg.model.blocks) == ("lmttm", 448, 448, 4)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.seed) == (1e-4, 1e-4, 32, 3407)


@pytest.mark.parametrize("name,classes", sorted(DATASET_CLASSES.items()))
def test_dataset_configs_differ_from_base_only_in_the_dataset(name, classes):
    raw = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert raw == {"extends": "base.json", "data": {"name": name}}
    cfg = load_config(f"{name}.json")
    assert cfg.data.name == name and cfg.run_dir.name == name
    assert dataset_info(name).num_classes == classes


def test_every_shipped_config_loads():
    files = sorted(CONFIG_DIR.rglob("*.json"))
    assert len(files) >= 8
    for path in files:
        load_config(path)


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch.*did you mean 'epochs'"):
        load_config(write(tmp_path / "c.json", {"extends": str(CONFIG_DIR / "base.json"), "train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key model\.memory_token.*'memory_tokens'"):
        load_config("base.json", ["--model.memory_token", "64"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian'.*'train'"):
        load_config("base.json", {"trian": {"epochs": 1}})


def test_wrong_types_and_ranges_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.epochs must be int, got 'ten'"):
        load_config("base.json", ["--train.epochs", "ten"])
    with pytest.raises(ConfigError, match=r"train\.epochs = 0 is below its minimum 1"):
        load_config("base.json", ["--train.epochs", "0"])
    with pytest.raises(ConfigError, match=r"model\.noise = 'gauss' is not accepted; choose one of"):
        load_config("base.json", ["--model.noise", "gauss"])
    with pytest.raises(ConfigError, match=r"data\.size = 32 is not accepted"):
        load_config("base.json", ["--data.size", "32"])
    with pytest.raises(ConfigError, match=r"model\.name = 'lmtm' is not a registered model.*'lmttm'"):
        load_config("base.json", ["--model.name", "lmtm"])
    assert load_config("base.json", ["--train.lr", "1"]).train.lr == 1.0  # int -> float is lossless


def test_model_size_errors_are_config_errors():
    with pytest.raises(ConfigError, match="memory_tokens = 100 must be divisible by blocks = 3"):
        load_config("base.json", ["--model.memory_tokens", "100", "--model.blocks", "3"])


def test_out_class_num_must_match_the_dataset():
    cfg = load_config("organmnist3d.json", ["--data.out_class_num", "2"])
    with pytest.raises(ConfigError, match=r"out_class_num = 2 contradicts organmnist3d, which has 11 classes"):
        dataset_for(cfg)
    assert dataset_for(load_config("organmnist3d.json", ["--data.out_class_num", "11"])).num_classes == 11


def test_overrides_parse_json_values():
    assert parse_overrides(["--train.epochs", "5", "--model.dim=64", "--train.milestones", "[0.3, 0.6]",
                            "--data.root", "/x/y", "--model.depth_patch_size", "null"]) == {
        "train": {"epochs": 5, "milestones": [0.3, 0.6]}, "model": {"dim": 64, "depth_patch_size": None},
        "data": {"root": "/x/y"}}
    with pytest.raises(ConfigError, match="--section.key value"):
        parse_overrides(["epochs", "5"])
    with pytest.raises(ConfigError, match="has no value"):
        parse_overrides(["--train.epochs"])


def test_switching_model_keeps_shared_keys_and_drops_the_rest():
    cfg = load_config("base.json", ["--model.dim", "64", "--model.name", "ttm"])
    assert cfg.model_name == "ttm" and cfg.model.dim == 64 and not hasattr(cfg.model, "blocks")
    with pytest.raises(ConfigError, match=r"unknown key model\.blocks"):
        load_config("base.json", ["--model.name", "ttm", "--model.blocks", "4"])
    baseline = load_config("baselines/resnet18_3d.json")
    assert baseline.model_name == "resnet18_3d" and baseline.train.scheduler == "multistep"


def test_extends_chain_and_relative_parent(tmp_path):
    write(tmp_path / "parent.json", {"extends": str(CONFIG_DIR / "base.json"), "train": {"epochs": 7}})
    child = write(tmp_path / "child.json", {"extends": "parent.json", "model": {"dim": 32}})
    cfg = load_config(child, ["--train.seed", "1"])
    assert (cfg.train.epochs, cfg.model.dim, cfg.train.seed, cfg.run_dir.name) == (7, 32, 1, "child-seed1")
    write(tmp_path / "a.json", {"extends": "b.json"})
    write(tmp_path / "b.json", {"extends": "a.json"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.json")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("no_such_config.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_resolved_config_round_trips():
    cfg = load_config("demo.json", ["--model.official_compat", "true"])
    assert cfg.model.compat_random_pos and cfg.model.compat_global_pointer  # the preset switches all on
    again = config_from_dict([("saved", config_to_dict(cfg))])
    assert config_to_dict(again) == config_to_dict(cfg)


def test_configuration_reference_lists_every_config_key():
    from pathlib import Path

    from engine.config import describe_config

    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    section = page.split("<!-- config-keys:start -->")[1].split("<!-- config-keys:end -->")[0]
    assert section.strip() == describe_config().strip(), \
        "docs/configuration.md is stale: put the output of `python train.py --help-config` between its markers"


def test_a_key_repeated_on_the_command_line_is_refused():
    with pytest.raises(ConfigError, match=r"--train.lr is given twice on the command line \(1 and 2\)"):
        parse_overrides(["--train.lr", "1", "--train.lr", "2"])
    with pytest.raises(ConfigError, match="given twice"):
        load_config("base.json", ["--model.dim=64", "--model.dim", "64"])
    assert parse_overrides(["--train.lr", "1", "--eval.batch_size", "2"]) == {"train": {"lr": 1}, "eval": {"batch_size": 2}}


@pytest.mark.parametrize("key", ["momentum", "gamma"])
def test_momentum_and_gamma_are_at_most_one(key):
    assert getattr(load_config("base.json", [f"--train.{key}", "1"]).train, key) == 1
    with pytest.raises(ConfigError, match=f"train.{key} = 1.5 is above its maximum 1.0"):
        load_config("base.json", [f"--train.{key}", "1.5"])


def test_amp_on_the_cpu_is_said_to_be_ignored(capsys):
    import torch

    from engine.setup import load_data

    cfg = load_config("demo.json", ["--train.amp", "true"])
    load_data(cfg, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "train.amp is ignored" in err and err.count("\n") == 1
    load_data(load_config("demo.json"), torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_a_model_too_big_for_memory_is_a_config_error(monkeypatch):
    from engine import setup

    def out_of_memory(*args, **kwargs):  # what torch's CPU allocator raises for a huge tensor
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 160000000000 bytes.")

    cfg = load_config("demo.json", ["--model.dim", "200000"])
    monkeypatch.setattr(setup, "build_model", out_of_memory)
    with pytest.raises(ConfigError, match=r"model lmttm is too big to build in memory \(.*dim=200000.*\): .*"
                                          r"160000000000 bytes"):
        setup.model_from_config(cfg, dataset_for(cfg))
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(ConfigError, match="too big to build in memory"):
        setup.model_from_config(cfg, dataset_for(cfg))
