"""Numbers the README and the docs state, checked against their sources: medmnist.INFO, the config files, the model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from medmnist import INFO

from engine.config import load_config
from model import build_model, count_parameters

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
GETTING_STARTED = (REPO / "docs" / "getting-started.md").read_text()  # the dataset table
MODELS = (REPO / "docs" / "models.md").read_text()  # the parameter counts


def _dataset_rows() -> dict[str, list[str]]:
    rows = {}
    for line in GETTING_STARTED.splitlines():
        m = re.match(r"\| `(\w+)\.json` \| ([^|]+) \| (\d+) \| ([\w-]+) \| (\d+) / (\d+) / (\d+) \|", line)
        if m:
            rows[m.group(1)] = list(m.groups()[1:])
    return rows


@pytest.mark.parametrize("flag", ["organmnist3d", "nodulemnist3d", "adrenalmnist3d", "fracturemnist3d",
                                  "vesselmnist3d", "synapsemnist3d"])
def test_dataset_table_matches_medmnist_info(flag):
    row = _dataset_rows()[flag]
    info = INFO[flag]
    n = info["n_samples"]
    assert row[0].strip().lower() == flag
    assert int(row[1]) == len(info["label"])
    assert row[2] == info["task"]
    assert [int(v) for v in row[3:]] == [n["train"], n["val"], n["test"]]
    assert load_config(f"{flag}.json").data.name == flag


def test_majority_class_rate_of_adrenal_test():
    """'229 of the 298 test volumes (0.768) are one class' is a property of the released file; here the sizes."""
    assert INFO["adrenalmnist3d"]["n_samples"]["test"] == 298
    assert f"{229 / 298:.3f}" == "0.768" and "229 of the 298" in README


@pytest.mark.parametrize("name, pos, expected", [("lmttm", "none", "2,884,226"), ("ttm", "none", "3,034,754"),
                                                 ("lmttm", "learned", "3,168,258"), ("ttm", "learned", "3,512,322")])
def test_parameter_counts_stated_in_the_docs(name, pos, expected):
    model = build_model(name, in_channels=1, num_classes=2, input_size=28, dim=448, memory_tokens=448,
                        pos_embedding=pos)
    assert f"{count_parameters(model):,}" == expected
    assert expected in MODELS
    if pos == "learned":  # the README's model zoo gives the default (learned) counts
        assert expected in README


@pytest.mark.parametrize("name, kwargs, expected", [
    ("lmttm", dict(dim=64, memory_tokens=64), "77,826"),
    ("vit_mam", dict(size="small"), "2,748,290"),
    ("medmamba3d", {}, "3,209,090"),
    ("medmambase3d", {}, "2,037,122"),
])
def test_model_zoo_counts_in_the_readme(name, kwargs, expected):
    """The README's model zoo (1 channel, 2 classes, 28³) against the built model."""
    model = build_model(name, in_channels=1, num_classes=2, input_size=28, **kwargs)
    assert f"{count_parameters(model):,}" == expected
    zoo = README.split("## Model zoo")[1].split("\n## ")[0]
    assert expected in zoo and f"`{name}`" in zoo
