"""Dataset metadata: the supported names, their MedMNIST facts and the expected file locations.

The MedMNIST facts (task, labels, split sizes, download URLs and MD5 sums) come from the table
`medmnist.info.INFO` of the installed `medmnist` package, so they always match the files that
package describes.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

MEDMNIST_3D_NAMES: tuple[str, ...] = (
    "organmnist3d",
    "nodulemnist3d",
    "adrenalmnist3d",
    "fracturemnist3d",
    "vesselmnist3d",
    "synapsemnist3d",
)
SYNTHETIC_NAME = "synthetic3d"
DATASET_NAMES: tuple[str, ...] = (*MEDMNIST_3D_NAMES, SYNTHETIC_NAME)

SIZES: tuple[int, ...] = (28, 64)
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

# The built-in synthetic dataset (see `data.synthetic`).
SYNTHETIC_SPLIT_SIZES: dict[str, int] = {"train": 240, "val": 60, "test": 60}
SYNTHETIC_LABEL_NAMES: dict[str, str] = {
    "0": "flat disk: short along the depth axis",
    "1": "ball: as long along depth as it is wide",
    "2": "rod: long along the depth axis",
}


class DataError(Exception):
    """A data problem the user can fix; the message names the file involved and the fix."""


@dataclass(frozen=True)
class DatasetInfo:
    """Everything known about one dataset at one volume size before its file is opened."""

    name: str
    task: str
    """MedMNIST task string, e.g. "binary-class" or "multi-class"."""
    num_classes: int
    in_channels: int
    label_names: dict[str, str]
    n_samples: dict[str, int]
    """Official number of samples per split ("train", "val", "test")."""
    size: int
    """Side of the cubic volumes: 28 or 64."""
    path: Path | None
    """Expected .npz path; None for the in-memory synthetic dataset or when no root was given."""
    url: str | None
    md5: str | None

    @property
    def is_synthetic(self) -> bool:
        """True for the built-in dataset that is generated in memory."""
        return self.name == SYNTHETIC_NAME

    @property
    def filename(self) -> str | None:
        """File name of the dataset (``adrenalmnist3d.npz``, ``adrenalmnist3d_64.npz``); None if synthetic."""
        if self.is_synthetic:
            return None
        return npz_filename(self.name, self.size)


def npz_filename(name: str, size: int) -> str:
    """File name MedMNIST uses for dataset `name` at volume side `size`."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


@functools.cache
def medmnist_info_table() -> dict[str, dict[str, Any]]:
    """Return `medmnist.info.INFO`, loading only that module when possible.

    Importing the `medmnist` package itself also imports pandas, scikit-learn and PIL and tries
    torchvision (several seconds); the metadata table lives in the dependency-free module
    `medmnist/info.py`, which is executed on its own unless it is already imported.
    """
    module = sys.modules.get("medmnist.info")
    if module is None:
        module = _load_standalone_medmnist_info()
    return module.INFO


def _load_standalone_medmnist_info() -> ModuleType:
    try:
        package_spec = importlib.util.find_spec("medmnist")
    except (ImportError, ValueError):
        package_spec = None
    if package_spec is None or not package_spec.submodule_search_locations:
        raise DataError("The medmnist package is not installed: pip install medmnist==3.0.2")
    info_path = Path(next(iter(package_spec.submodule_search_locations))) / "info.py"
    spec = importlib.util.spec_from_file_location("_medmnist_info_standalone", info_path)
    if spec is None or spec.loader is None:
        from medmnist import info as module  # fall back to the regular (slow) import

        return module
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unknown_name_error(name: str) -> DataError:
    close = difflib.get_close_matches(name.lower(), DATASET_NAMES, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return DataError(f"Unknown dataset {name!r}.{hint} Known datasets: {', '.join(DATASET_NAMES)}.")


def dataset_info(name: str, *, size: int = 28, root: str | Path | None = None) -> DatasetInfo:
    """Describe dataset `name` at volume side `size` (28 or 64).

    `root` is the folder holding the MedMNIST files (``~`` is expanded, relative paths are made
    absolute); the expected file is
    ``root / "<name>.npz"`` for size 28 and ``root / "<name>_64.npz"`` for size 64. Without a root,
    `path` is None. Unknown names and sizes raise DataError.
    """
    if name not in DATASET_NAMES:
        raise _unknown_name_error(name)
    if size not in SIZES:
        raise DataError(f"Unsupported volume size {size!r} for {name}: choose one of {', '.join(map(str, SIZES))}.")

    if name == SYNTHETIC_NAME:
        return DatasetInfo(
            name=name,
            task="multi-class",
            num_classes=len(SYNTHETIC_LABEL_NAMES),
            in_channels=1,
            label_names=dict(SYNTHETIC_LABEL_NAMES),
            n_samples=dict(SYNTHETIC_SPLIT_SIZES),
            size=size,
            path=None,
            url=None,
            md5=None,
        )

    entry = medmnist_info_table()[name]
    suffix = "" if size == 28 else f"_{size}"
    path = None if root is None else Path(root).expanduser().absolute() / npz_filename(name, size)
    return DatasetInfo(
        name=name,
        task=entry["task"],
        num_classes=len(entry["label"]),
        in_channels=int(entry["n_channels"]),
        label_names=dict(entry["label"]),
        n_samples=dict(entry["n_samples"]),
        size=size,
        path=path,
        url=entry[f"url{suffix}"],
        md5=entry[f"MD5{suffix}"],
    )
