"""Dataset metadata: the supported names (MedMNIST 3D and 2D, and the offline `synthetic3d` / `synthetic2d`),
their MedMNIST facts and the expected file locations.

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
MEDMNIST_2D_NAMES: tuple[str, ...] = (
    "pathmnist",
    "chestmnist",
    "dermamnist",
    "octmnist",
    "pneumoniamnist",
    "retinamnist",
    "breastmnist",
    "bloodmnist",
    "tissuemnist",
    "organamnist",
    "organcmnist",
    "organsmnist",
)
SYNTHETIC_NAME = "synthetic3d"
SYNTHETIC_2D_NAME = "synthetic2d"
SYNTHETIC_NAMES: tuple[str, ...] = (SYNTHETIC_NAME, SYNTHETIC_2D_NAME)
DATASET_NAMES: tuple[str, ...] = (*MEDMNIST_3D_NAMES, SYNTHETIC_NAME, *MEDMNIST_2D_NAMES, SYNTHETIC_2D_NAME)

SIZES: tuple[int, ...] = (28, 64)
"""Volume sides of the 3D datasets (MedMNIST v2 and MedMNIST+)."""
SIZES_2D: tuple[int, ...] = (28, 64, 128, 224)
"""Image sides of the 2D datasets."""
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")

# The built-in synthetic dataset (see `data.synthetic`).
SYNTHETIC_SPLIT_SIZES: dict[str, int] = {"train": 240, "val": 60, "test": 60}
SYNTHETIC_LABEL_NAMES: dict[str, str] = {
    "0": "flat disk: short along the depth axis",
    "1": "ball: as long along depth as it is wide",
    "2": "rod: long along the depth axis",
}
SYNTHETIC_2D_LABEL_NAMES: dict[str, str] = {
    "0": "horizontal bar",
    "1": "vertical bar",
    "2": "plus sign (both bars)",
}


def dims_of(name: str) -> int:
    """2 for the 2D datasets (images), 3 for the 3D ones (volumes)."""
    return 2 if name in MEDMNIST_2D_NAMES or name == SYNTHETIC_2D_NAME else 3


def size_text(size: int, dims: int) -> str:
    """28³ for a volume side, 28² for an image side."""
    return f"{size}{'³' if dims == 3 else '²'}"


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
    """Side of the cubic volumes (28 or 64) or square images (28, 64, 128 or 224)."""
    path: Path | None
    """Expected .npz path; None for the in-memory synthetic dataset or when no root was given."""
    url: str | None
    md5: str | None
    dims: int = 3
    """3 for volumes (N, C, S, S, S), 2 for images (N, C, S, S)."""

    @property
    def is_synthetic(self) -> bool:
        """True for the built-in datasets that are generated in memory."""
        return self.name in SYNTHETIC_NAMES

    @property
    def is_medmnist(self) -> bool:
        """A MedMNIST flag (whose official evaluator and standard result CSV apply), not synthetic or a CSV dataset."""
        return self.name in MEDMNIST_3D_NAMES or self.name in MEDMNIST_2D_NAMES

    @property
    def is_multilabel(self) -> bool:
        """ChestMNIST's task: several binary labels per image, labels (N, L)."""
        return self.task.startswith("multi-label")

    @property
    def size_text(self) -> str:
        """28³ for a volume, 28² for an image."""
        return size_text(self.size, self.dims)

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
    """Describe dataset `name` at side `size` (3D: 28 or 64; 2D: 28, 64, 128 or 224).

    `root` is the folder holding the MedMNIST files (``~`` is expanded, relative paths are made
    absolute); the expected file is
    ``root / "<name>.npz"`` for size 28 and ``root / "<name>_<size>.npz"`` otherwise. Without a root,
    `path` is None. Unknown names and sizes raise DataError.
    """
    if name not in DATASET_NAMES:
        raise _unknown_name_error(name)
    dims = dims_of(name)
    sizes = SIZES if dims == 3 else SIZES_2D
    if size not in sizes:
        what = "volume" if dims == 3 else "image"
        raise DataError(f"Unsupported {what} size {size!r} for {name} ({dims}-D): choose one of "
                        f"{', '.join(map(str, sizes))}.")

    if name in SYNTHETIC_NAMES:
        labels = SYNTHETIC_LABEL_NAMES if dims == 3 else SYNTHETIC_2D_LABEL_NAMES
        return DatasetInfo(
            name=name,
            task="multi-class",
            num_classes=len(labels),
            in_channels=1,
            label_names=dict(labels),
            n_samples=dict(SYNTHETIC_SPLIT_SIZES),
            size=size,
            path=None,
            url=None,
            md5=None,
            dims=dims,
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
        dims=dims,
    )
