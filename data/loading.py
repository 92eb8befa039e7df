"""Loading MedMNIST splits (3D volumes and 2D images) into memory and iterating over them in batches."""

from __future__ import annotations

import sys
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data.download as _download
from data.info import SPLIT_NAMES, DataError, DatasetInfo, dataset_info
from data.synthetic import make_synthetic_split, make_synthetic_split_2d

Device = torch.device | str | None


@dataclass
class Split:
    """One split held in memory.

    `images` is uint8 (N, C, S, S, S) with C = 1 for volumes (the axes after the channel keep the stored
    order, so axis 2 is the depth axis of the volume) and (N, C, S, S) with C = 1 or 3 for images.
    `labels` is int64 (N,) class indices, or (N, L) of 0/1 for a multi-label task (ChestMNIST).
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: Device) -> Split:
        """The same split with both tensors on `device` (still uint8 images)."""
        return Split(self.images.to(device), self.labels.to(device))


# Files whose split sizes differ from the official ones were already reported.
_size_warned: set[Path] = set()
# Training splits of a single class already reported (file, size).
_one_class_warned: set[tuple[str, int]] = set()
# MD5 of dataset files, keyed by (path, mtime_ns, size in bytes).
_md5_cache: dict[tuple[str, int, int], str] = {}


def _missing_file_error(info: DatasetInfo) -> DataError:
    assert info.path is not None
    not_a_folder = " (data.root is a file, not a folder)" if info.path.parent.is_file() else ""
    return DataError(
        f"{info.filename} not found in {info.path.parent}{not_a_folder} (download disabled). "
        f"{_download.manual_download_hint(info.url, info.path, info.md5)}"
    )


def _corrupt_file_error(info: DatasetInfo, error: BaseException) -> DataError:
    reason = f"{type(error).__name__}: {error}"
    if "pickle" in str(error):  # never pass on numpy's advice to load pickled data unsafely
        try:
            with open(info.path, "rb") as f:
                head = f.read(2)
        except OSError:
            head = b""
        if head[:1] == b"\x80":  # the opcode every pickle of protocol 2 or later starts with
            reason = "it holds pickled Python objects, which a MedMNIST file never does; they were not loaded"
        elif head == b"PK":  # a real .npz whose arrays are Python objects (pickles)
            reason = ("its arrays hold pickled Python objects, which a MedMNIST file never does; they were not "
                      "loaded")
        else:  # numpy tries the pickle reader on anything that is neither a zip archive nor a .npy file
            reason = f"it is not a valid .npz (zip) file: it starts with {head!r}, not with a zip archive's b'PK'"
    return DataError(
        f"Cannot read {info.path} as a MedMNIST .npz file ({reason}). "
        f"The file is probably corrupt or truncated: delete it and download it again "
        f"(expected MD5 {info.md5}, from {info.url})."
    )


def check_arrays(info: DatasetInfo, split: str, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Check the shapes, dtypes and label range of one stored split; return labels as int64 (N,), or (N, L)
    for a multi-label task."""
    where = f"{info.path}: {split}_images"
    expected = (info.size,) * info.dims + ((3,) if info.dims == 2 and info.in_channels == 3 else ())
    if images.ndim != len(expected) + 1 or images.dtype != np.uint8 or images.shape[1:] != expected:
        raise DataError(
            f"{where} has shape {images.shape} and dtype {images.dtype}; expected uint8 (N, {', '.join(map(str, expected))}). "
            f"Is this the right file for size {info.size}?"
        )
    if info.is_multilabel:
        if labels.ndim != 2 or labels.shape[1] != info.num_classes or labels.dtype.kind not in "iu":
            raise DataError(f"{info.path}: {split}_labels has shape {labels.shape} and dtype {labels.dtype}; "
                            f"{info.name} is multi-label: expected integer labels (N, {info.num_classes}) of 0/1.")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{info.path}: {split}_images has {images.shape[0]} images but {split}_labels has "
                            f"{labels.shape[0]} rows.")
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise DataError(f"{info.path}: {split}_labels of multi-label {info.name} must be 0 or 1, found values "
                            f"in [{labels.min()}, {labels.max()}].")
        return labels.astype(np.int64)
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)) or labels.dtype.kind not in "iu":
        raise DataError(
            f"{info.path}: {split}_labels has shape {labels.shape} and dtype {labels.dtype}; "
            f"expected integer labels of shape (N, 1) or (N,)."
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{info.path}: {split}_images has {images.shape[0]} volumes (shape {images.shape}) but "
            f"{split}_labels has {labels.shape[0]} labels (shape {labels.shape})."
        )
    flat = labels.reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= info.num_classes):
        raise DataError(
            f"{info.path}: {split}_labels (shape {labels.shape}) has values in [{flat.min()}, {flat.max()}]; "
            f"{info.name} has {info.num_classes} classes, so labels must lie in [0, {info.num_classes - 1}]."
        )
    return flat


def read_npz(info: DatasetInfo, splits: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read and check the requested splits of the dataset file."""
    assert info.path is not None
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        loaded = np.load(info.path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single array: a .npy file renamed .npz
            raise DataError(
                f"{info.path} holds a single array of shape {getattr(loaded, 'shape', '?')} (a .npy file), not a "
                f"MedMNIST .npz archive with train/val/test images and labels. Replace it with the released file "
                f"(MD5 {info.md5}, from {info.url})."
            )
        with loaded as npz:
            available = set(npz.files)
            for split in splits:
                missing = [key for key in (f"{split}_images", f"{split}_labels") if key not in available]
                if missing:
                    raise DataError(
                        f"{info.path} has no key {', '.join(missing)} (keys: {', '.join(sorted(available))}). "
                        f"Delete it and download it again (expected MD5 {info.md5}, from {info.url})."
                    )
                arrays[split] = (npz[f"{split}_images"], npz[f"{split}_labels"])
    except DataError:
        raise
    except (OSError, ValueError, EOFError, TypeError, AttributeError, zipfile.BadZipFile, zlib.error) as error:
        raise _corrupt_file_error(info, error) from error
    return arrays


def _warn_unofficial_sizes(info: DatasetInfo, sizes: dict[str, int]) -> None:
    assert info.path is not None
    differing = {split: n for split, n in sizes.items() if n != info.n_samples.get(split)}
    if not differing or info.path in _size_warned:
        return
    _size_warned.add(info.path)
    found = ", ".join(f"{split}={n}" for split, n in differing.items())
    official = ", ".join(f"{split}={info.n_samples[split]}" for split in differing)
    warnings.warn(
        f"{info.path}: split sizes {found} differ from the official {info.name} sizes {official}. "
        f"This is not the released file (expected MD5 {info.md5}).",
        stacklevel=3,
    )


def load_splits(
    name: str,
    *,
    root: str | Path,
    size: int = 28,
    download: bool = True,
    splits: Sequence[str] = SPLIT_NAMES,
) -> dict[str, Split]:
    """Load the requested splits of dataset `name` into memory, keyed by split name.

    Real datasets are read from ``root/<name>.npz`` (``<name>_64.npz`` for size 64), which is
    downloaded first when missing and `download` is true. The file's structure is checked
    (not its MD5, see `data_md5`); any problem raises DataError. `synthetic3d` is generated in
    memory and ignores `root` and `download`.
    """
    info = dataset_info(name, size=size, root=root)
    splits = tuple(splits)
    unknown = [split for split in splits if split not in SPLIT_NAMES]
    if unknown:
        raise DataError(f"Unknown split(s) {', '.join(map(repr, unknown))}: choose from {', '.join(SPLIT_NAMES)}.")

    if info.is_synthetic:
        result = {}
        for split in splits:
            images, labels = (make_synthetic_split if info.dims == 3 else make_synthetic_split_2d)(split, size)
            result[split] = Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        return result

    assert info.path is not None and info.url is not None and info.md5 is not None
    try:
        is_file, exists, is_dir = info.path.is_file(), info.path.exists(), info.path.is_dir()
    except OSError as error:  # e.g. a data.root too long for the file system
        raise DataError(f"Cannot use {str(info.path)[:120]!r} as the dataset file: {error.strerror or error}.") from None
    if exists and not is_file:
        raise DataError(f"{info.path} is a {'directory' if is_dir else 'special file'}, not the dataset "
                        f"file; move it away. {_download.manual_download_hint(info.url, info.path, info.md5)}")
    if not info.path.is_file():
        if not download:
            raise _missing_file_error(info)
        _download.download_file(info.url, info.path, info.md5)

    result = {}
    for split, (images, labels) in read_npz(info, splits).items():
        flat_labels = check_arrays(info, split, images, labels)
        if images.ndim == 4 and info.dims == 2:  # RGB (N, S, S, 3) -> channels first (N, 3, S, S)
            tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        else:  # (N, S, S, S) -> (N, 1, S, S, S), grey (N, S, S) -> (N, 1, S, S): views, the stored axis order kept
            tensor = torch.from_numpy(images).unsqueeze(1)
        result[split] = Split(tensor, torch.from_numpy(flat_labels))
        check_split(info, split, result[split], need_all_classes=False)
    _warn_unofficial_sizes(info, {split: len(data) for split, data in result.items()})
    return result


def check_split(info: DatasetInfo, split_name: str, split: Split, *, need_all_classes: bool) -> None:
    """Raise DataError if `split` is empty or, with `need_all_classes`, lacks a class of the task.

    The official AUC (``medmnist.getAUC``: one-vs-rest per class, or binary) is undefined unless every
    class has at least one sample, so a split scored by AUC (validation during training, the split
    predict.py scores) needs all of them.
    """
    where = f"{info.path}" if info.path is not None else info.name
    if len(split) == 0:
        raise DataError(f"the {split_name} split of {where} is empty (0 samples); nothing can be trained or "
                        f"scored on it. Use the released {info.name} file" + (f" (MD5 {info.md5})." if info.md5 else "."))
    if need_all_classes and split.labels.dim() == 2:  # multi-label: each label's AUC needs both values
        counts = split.labels.detach().cpu().sum(0)
        one_sided = [j for j, c in enumerate(counts.tolist()) if c in (0, len(split))]
        if one_sided:
            raise DataError(f"the {split_name} split of {where} has label(s) {one_sided[:10]} always 0 or always 1; "
                            f"their AUC is undefined. Use a split where every label occurs and is absent"
                            + (f", e.g. the released file (MD5 {info.md5})." if info.md5 else "."))
    elif not need_all_classes and split_name == "train" and split.labels.dim() == 1:  # legal, learns nothing
        present = torch.unique(split.labels.detach().cpu()).tolist()
        if len(present) == 1 and (where, len(split)) not in _one_class_warned:
            _one_class_warned.add((where, len(split)))
            print(f"warning: the {split_name} split of {where} holds only class {int(present[0])} "
                  f"({len(split)} samples); a model trained on it can only ever predict that class", file=sys.stderr)
    elif need_all_classes:
        present = sorted(int(c) for c in torch.unique(split.labels.detach().cpu()).tolist())
        missing = [c for c in range(info.num_classes) if c not in present]
        if missing:
            raise DataError(
                f"the {split_name} split of {where} has only classes {present} of {info.num_classes} "
                f"({info.task}; {len(missing)} class(es) absent: {missing[:10]}); AUC is undefined when a class "
                f"has no sample. Use a split with every class" + (f", e.g. the released file (MD5 {info.md5})." if info.md5 else ".")
            )


def batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: Device = None,
    drop_last: bool = False,
    pad_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of `split`.

    `x` is float32 in [0, 1] (the uint8 values divided by 255) of shape (B, C, S, S, S) (images:
    (B, C, S, S)) and `y` is int64 (B,) (multi-label: (B, L)), both on `device` (default: where the split is). Without `shuffle` the
    batches follow the dataset order; with it the order is ``torch.randperm(N, generator=generator)``
    (a CPU generator). The last, smaller batch is yielded unless `drop_last`; with `pad_last` it is
    completed to `batch_size` samples by wrapping around to the first samples of the order (as often
    as needed when `batch_size` > N), so every batch is full and made of real volumes: the samples
    past position N of the concatenated batches are padding for the caller to discard. The uint8
    images are indexed first, moved to `device`, and only then converted to float.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if drop_last and pad_last:
        raise ValueError("drop_last and pad_last exclude each other")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if pad_last and end - start < batch_size:  # positions start .. start + B - 1, wrapped around N
            index = torch.arange(start, start + batch_size) % n
            index = (index if order is None else order[index]).to(split.images.device)
            images, labels = split.images[index], split.labels[index]
        elif order is None:
            images, labels = split.images[start:end], split.labels[start:end]
        else:
            index = order[start:end].to(split.images.device)
            images, labels = split.images[index], split.labels[index]
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        yield images.to(torch.float32).div_(255.0), labels


def data_md5(name: str, *, root: str | Path, size: int = 28) -> str | None:
    """MD5 of the dataset file, to record provenance; None for `synthetic3d`.

    Computed once per process for each (path, modification time, file size).
    """
    if name == "csv":  # your own files (data/csv_dataset.py): no released file to compare with
        return None
    info = dataset_info(name, size=size, root=root)
    if info.is_synthetic:
        return None
    assert info.path is not None
    try:
        stat = info.path.stat()
    except FileNotFoundError:
        raise _missing_file_error(info) from None
    key = (str(info.path), stat.st_mtime_ns, stat.st_size)
    if key not in _md5_cache:
        _md5_cache[key] = _download.file_md5(info.path)
    return _md5_cache[key]
