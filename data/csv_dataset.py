"""Your own cohort as a dataset: `data.name: "csv"` with `data.csv: PATH` (docs/own-data.md).

The CSV has a header row and one row per file:
- `path`: the file (NIfTI, NumPy, or an image for 2-D models), relative to the CSV's folder or absolute;
- `label`: a class index (0, 1, ...) or a class name; or, for a multi-label task, several `label_<name>` columns
  of 0/1;
- `spacing` (optional): voxel sizes "X Y Z" of a .npy / .npz volume along its axes 0, 1, 2 (predict.py's
  --input-spacing; NIfTI files carry their own);
- `split` (optional): `train`, `val` or `test`. Without it, a seeded stratified split with `data.split_fractions`
  is made once and written to `split-seed<S>-<fractions>.csv` in the cache folder; later runs reuse it (rows
  added to the CSV later are split among themselves), so a run's test files never move into training.

The class names (`data.classes`, or derived: integers 0..max, or the sorted names), the task (binary-class with 2
classes, multi-class with more, multi-label with `label_*` columns) and the class count come from the file. Each
file is preprocessed exactly as predict.py --input does it (engine/inputs.py and engine/spacing.py: orientation,
isotropic resampling, intensity scaling or window, resize, uint8 quantisation), in parallel (`data.workers`
threads), once, into a MedMNIST-format .npz in the cache folder (with a .json beside it: classes, task, the files
of each split, the files left out, the notes). The cache's name holds a hash of the CSV's bytes, the size and
modification time of every file, the split and the preprocessing settings: any change builds a new one, nothing
else does (a cache of the same settings on an older state of the files is then deleted; other settings' are
kept). The rest of the engine sees a MedMNIST-like dataset (`DatasetInfo` with name "csv").

Errors name the CSV row (the header is row 1, as in a spreadsheet) and the file; nothing is written unless the
whole dataset is good.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.info import SIZES, SIZES_2D, SPLIT_NAMES, DataError, DatasetInfo
from data.loading import Split, check_arrays, read_npz

CSV_NAME = "csv"
CACHE_VERSION = 1
_prepared: dict[str, DatasetInfo] = {}  # cache key -> info: the summary is printed once per process


@dataclass
class Row:
    """One data row of the CSV."""

    number: int  # spreadsheet row number (header = 1)
    path: str  # as written in the CSV
    file: Path  # resolved
    label: int | tuple[int, ...]
    split: str | None
    spacing: tuple[float, float, float] | None = None  # voxel size of a .npy / .npz volume (the `spacing` column)


# ----------------------------------------------------------------------------------------------------------
# reading the CSV
# ----------------------------------------------------------------------------------------------------------

def _read_table(csv_path: Path) -> tuple[bytes, list[str], list[tuple[int, list[str]]]]:
    """(bytes, header, [(row number, cells)]) of the CSV; DataError if it cannot be read."""
    try:
        data = csv_path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data.csv {csv_path}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{csv_path} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                        f"save it as UTF-8 CSV") from None
    try:
        lines = [row for row in csv.reader(io.StringIO(text))]
    except csv.Error as err:
        raise DataError(f"{csv_path} is not a readable CSV: {err}") from None
    numbered = [(i + 1, row) for i, row in enumerate(lines) if any(cell.strip() for cell in row)]
    if not numbered:
        raise DataError(f"{csv_path} is empty; it needs a header row (path,label[,split]) and one row per file")
    (_, header), rows = numbered[0], numbered[1:]
    if not rows:
        raise DataError(f"{csv_path} has a header but no rows; add one row per file")
    return data, [cell.strip() for cell in header], rows


def _label_columns(csv_path: Path, header: list[str]) -> tuple[list[int], list[str], bool]:
    """(column indices, class names from the column names, multi-label?)."""
    lower = [h.lower() for h in header]
    found = ", ".join(header) or "none"
    if "path" not in lower:
        raise DataError(f"{csv_path} has no `path` column (columns: {found}); the header needs path,label[,split]")
    multi = [i for i, h in enumerate(lower) if h.startswith("label_") and len(h) > 6]
    if "label" in lower and multi:
        raise DataError(f"{csv_path} has both a `label` column and `label_*` columns; use `label` for one class per "
                        f"file, or only `label_<name>` columns (0/1) for a multi-label task")
    if "label" in lower:
        return [lower.index("label")], [], False
    if len(multi) >= 2:
        return multi, [header[i][6:] for i in multi], True
    raise DataError(f"{csv_path} has no `label` column (columns: {found}); the header needs path,label[,split] "
                    f"(or several label_<name> columns of 0/1 for a multi-label task)")


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _class_indices(csv_path, numbers, values, declared: list[str]) -> tuple[list[int], list[str]]:
    """Class index of each label text, and the class names."""
    if declared:
        index = {name: i for i, name in enumerate(declared)}
        out = []
        for number, value in zip(numbers, values):
            if value in index:
                out.append(index[value])
            elif _is_int(value) and 0 <= int(value) < len(declared):
                out.append(int(value))
            else:
                raise DataError(f"{csv_path.name} row {number}: unknown label {value!r}; data.classes lists "
                                f"{', '.join(declared)} (or give their index 0..{len(declared) - 1})")
        return out, list(declared)
    ints = [_is_int(v) for v in values]
    if all(ints):
        labels = [int(v) for v in values]
        for number, label in zip(numbers, labels):
            if label < 0:
                raise DataError(f"{csv_path.name} row {number}: label {label} is negative; classes are 0, 1, ...")
        return labels, [str(c) for c in range(max(labels) + 1)]
    if any(ints):
        first_int = ints.index(True)
        bad = ints.index(False)
        raise DataError(f"{csv_path.name} row {numbers[bad]}: unknown label {values[bad]!r}: row "
                        f"{numbers[first_int]} has the class index {values[first_int]!r}; use class indices or "
                        f"class names throughout, or list the names in data.classes")
    names = sorted(set(values))
    index = {name: i for i, name in enumerate(names)}
    return [index[v] for v in values], names


def read_rows(csv_path: Path, declared: list[str]) -> tuple[list[Row], list[str], bool]:
    """(rows, class names, multi-label?) of the CSV, every cell checked."""
    _, header, table = _read_table(csv_path)
    label_cols, names, multilabel = _label_columns(csv_path, header)
    lower = [h.lower() for h in header]
    path_col, split_col = lower.index("path"), (lower.index("split") if "split" in lower else None)
    spacing_col = lower.index("spacing") if "spacing" in lower else None
    width = max([path_col, *label_cols, split_col or 0]) + 1
    numbers, paths, texts, splits, spacings = [], [], [], [], []
    for number, cells in table:
        if len(cells) < width:
            raise DataError(f"{csv_path.name} row {number} has {len(cells)} cells; the header has {len(header)}")
        path = cells[path_col].strip()
        if not path:
            raise DataError(f"{csv_path.name} row {number}: empty path")
        values = [cells[i].strip() for i in label_cols]
        if any(not v for v in values):
            raise DataError(f"{csv_path.name} row {number} ({path}): empty label")
        split = cells[split_col].strip().lower() if split_col is not None else None
        if split_col is not None and split not in SPLIT_NAMES:
            raise DataError(f"{csv_path.name} row {number} ({path}): split {cells[split_col].strip()!r} is not "
                            f"train, val or test")
        spacing = _spacing(csv_path, number, path, cells[spacing_col] if spacing_col is not None else "")
        numbers.append(number), paths.append(path), texts.append(values), splits.append(split), spacings.append(spacing)
    if multilabel:
        labels = []
        for number, path, values in zip(numbers, paths, texts):
            bad = [(names[j], v) for j, v in enumerate(values) if v not in ("0", "1")]
            if bad:
                raise DataError(f"{csv_path.name} row {number} ({path}): unknown label {bad[0][1]!r} in column "
                                f"label_{bad[0][0]}; multi-label columns hold 0 or 1")
            labels.append(tuple(int(v) for v in values))
        if declared and list(declared) != names:
            raise DataError(f"data.classes {declared} differs from the label_* columns of {csv_path.name} ({names})")
    else:
        labels, names = _class_indices(csv_path, numbers, [v[0] for v in texts], declared)
        if len(names) < 2:
            raise DataError(f"{csv_path.name} has a single class ({names[0]!r}); a classifier needs at least two")
    rows = [Row(n, p, _resolve(csv_path, p), lab, s, sp)
            for n, p, lab, s, sp in zip(numbers, paths, labels, splits, spacings)]
    seen: dict[Path, Row] = {}
    for row in rows:
        if row.file in seen:
            raise DataError(f"{csv_path.name} rows {seen[row.file].number} and {row.number} name the same file "
                            f"{row.file}; keep one row per file")
        seen[row.file] = row
    return rows, names, multilabel


def _spacing(csv_path: Path, number: int, path: str, text: str) -> tuple[float, float, float] | None:
    """The `spacing` cell: empty, or three positive voxel sizes separated by spaces or x."""
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    if not parts:
        return None
    try:
        sizes = tuple(float(v) for v in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or not all(np.isfinite(v) and v > 0 for v in sizes):
        raise DataError(f"{csv_path.name} row {number} ({path}): spacing {text.strip()!r} is not three positive voxel "
                        f"sizes such as \"0.7 0.7 5\"")
    return sizes


def _resolve(csv_path: Path, path: str) -> Path:
    file = Path(path).expanduser()
    return Path(os.path.abspath(file if file.is_absolute() else csv_path.parent / file))


# ----------------------------------------------------------------------------------------------------------
# the split
# ----------------------------------------------------------------------------------------------------------

def _largest_remainder(targets: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, each the floor or ceiling of its target (largest fractional parts round up)."""
    out = np.floor(targets + 1e-9).astype(int)
    order = np.argsort(-(targets - out), kind="stable")
    for j in order[: total - out.sum()]:
        out[j] += 1
    return out


def split_counts(class_sizes, fractions) -> np.ndarray:
    """(G, 3) train/val/test counts per class group: each within one sample of size x fraction, the column totals
    within one sample of N x fraction, the rows summing to the group sizes (a controlled rounding: floors, then
    the remaining samples placed one per cell by augmenting paths)."""
    sizes = np.asarray(class_sizes, dtype=int)
    f = np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    target = np.outer(sizes, f)
    counts = np.floor(target + 1e-9).astype(int)
    rows_left = sizes - counts.sum(1)
    cols_left = _largest_remainder(target.sum(0), int(sizes.sum())) - counts.sum(0)
    extra = np.zeros_like(counts)
    for _ in range(int(rows_left.sum())):
        path = _augmenting_path(extra, rows_left, cols_left, target - counts)
        if path is None:  # not expected; keep the per-class rounding
            return np.array([_largest_remainder(t, n) for t, n in zip(target, sizes)])
        for g, s, sign in path:
            extra[g, s] += sign
    return counts + extra


def _augmenting_path(extra, rows_left, cols_left, frac):
    """Breadth-first search source -> group -> split (-> group -> split ...) -> sink; [(g, s, +1 | -1)] or None."""
    groups, splits = extra.shape
    free_rows = [g for g in range(groups) if extra[g].sum() < rows_left[g]]
    parent: dict = {("g", g): None for g in free_rows}
    queue = [("g", g) for g in free_rows]
    while queue:
        kind, node = queue.pop(0)
        if kind == "g":
            for s in sorted(range(splits), key=lambda s: -frac[node, s]):
                if extra[node, s] == 0 and ("s", s) not in parent:
                    parent[("s", s)] = ("g", node)
                    queue.append(("s", s))
            continue
        if extra[:, node].sum() < cols_left[node]:  # reached the sink: walk back
            path, current = [], ("s", node)
            while parent[current] is not None:
                previous = parent[current]
                if current[0] == "s":
                    path.append((previous[1], current[1], +1))
                else:
                    path.append((current[1], previous[1], -1))
                current = previous
            return path
        for g in range(groups):
            if extra[g, node] == 1 and ("g", g) not in parent:
                parent[("g", g)] = ("s", node)
                queue.append(("g", g))
    return None


def stratified_split(keys: list, fractions, seed: int) -> list[str]:
    """Split name of each row: per class (multi-label: per label combination) the rows are shuffled with
    `numpy.random.default_rng(seed)` and cut at `split_counts`."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    order = sorted(groups)
    counts = split_counts([len(groups[k]) for k in order], fractions)
    rng = np.random.default_rng(seed)
    out = [""] * len(keys)
    for g, key in enumerate(order):
        bounds = np.cumsum(counts[g])
        for j, i in enumerate(rng.permutation(groups[key])):
            out[int(i)] = SPLIT_NAMES[int(np.searchsorted(bounds, j, side="right"))]
    return out


def _split_file(cache_dir: Path, seed: int, fractions) -> Path:
    return cache_dir / f"split-seed{seed}-{'-'.join(f'{f:g}' for f in fractions)}.csv"


def assign_splits(rows: list[Row], split_file: Path | None, fractions, seed: int) -> tuple[list[str], str]:
    """(split of each row, how it was made). With a split column: as given. Otherwise the saved split (rows not
    in it are split among themselves) or a new stratified one."""
    if split_file is None:
        return [row.split for row in rows], "split column"
    saved: dict[str, str] = {}
    if split_file.is_file():
        with split_file.open(newline="") as handle:
            saved = {r["path"]: r["split"] for r in csv.DictReader(handle)}
    new = [i for i, row in enumerate(rows) if row.path not in saved]
    fresh = stratified_split([rows[i].label for i in new], fractions, seed) if new else []
    out = [saved.get(row.path, "") for row in rows]
    for i, split in zip(new, fresh):
        out[i] = split
    if not saved:
        how = f"stratified split (seed {seed}, fractions {'/'.join(f'{f:g}' for f in fractions)})"
    else:
        how = f"the saved split {split_file.name}" + (f" ({len(new)} new row(s) split among themselves)" if new else "")
    return out, how


def _split_text(rows: list[Row], splits: list[str]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "split"])
    writer.writerows([row.path, split] for row, split in zip(rows, splits))
    return text.getvalue().encode()


def check_classes(csv_path: Path, rows: list[Row], splits: list[str], names: list[str], multilabel: bool) -> None:
    """Every class has a training sample; val and test hold every class (multi-label: every label present and
    absent), as the official AUC needs."""
    for split in SPLIT_NAMES:
        labels = [row.label for row, s in zip(rows, splits) if s == split]
        if not labels:
            raise DataError(f"the {split} split of {csv_path.name} is empty; every split needs samples")
        if multilabel:
            array = np.array(labels)
            for j, name in enumerate(names):
                ones = int(array[:, j].sum())
                if ones == 0 and split == "train":
                    raise DataError(f"label {name!r} has no training sample in {csv_path.name} (column label_{name} "
                                    f"is 0 in every train row)")
                if split != "train" and ones in (0, len(labels)):
                    raise DataError(f"the {split} split of {csv_path.name} has label {name!r} "
                                    f"{'never' if ones == 0 else 'always'} set; its AUC needs both values")
            continue
        present = set(labels)
        for c, name in enumerate(names):
            if c in present:
                continue
            if split == "train":
                raise DataError(f"class {name!r} (index {c}) has no training sample in {csv_path.name}; add one, or "
                                f"list the classes actually used in data.classes")
            raise DataError(f"the {split} split of {csv_path.name} has no sample of class {name!r} (index {c}): "
                            f"AUC is undefined without every class in val and test; add samples or change the split")


# ----------------------------------------------------------------------------------------------------------
# preprocessing and the cache
# ----------------------------------------------------------------------------------------------------------

def _stat(file: Path) -> list:
    try:
        st = file.stat()
    except OSError as err:
        return [str(file), None, err.strerror or type(err).__name__]
    return [str(file), st.st_size, st.st_mtime_ns]


def _preprocess_file(row: Row, settings: dict) -> tuple[np.ndarray | None, str, str | None]:
    """(uint8 (C, S, S[, S]) or None, note, error) of one file, exactly as predict.py --input prepares it."""
    from engine.inputs import InputError, preprocess, read_array, read_volume

    window = tuple(settings["window"]) if settings["window"] else None
    file = row.file
    try:
        if not file.is_file():
            return None, "", "no such file" if not file.exists() else "not a regular file"
        if settings["dims"] == 3:
            array, note = read_volume(file, spacing=row.spacing, resample=settings["resample"])
        else:
            array, note = read_array(file), ""
        image = preprocess(array, dims=settings["dims"], size=settings["size"], in_channels=settings["channels"],
                           window=window)
        return image, note, None
    except InputError as err:
        return None, "", str(err)
    except MemoryError:
        return None, "", "out of memory while preprocessing it"
    except Exception as err:  # noqa: BLE001 - any failure is this file's, reported with its row
        return None, "", f"{type(err).__name__}: {err}"


def _preprocess_all(rows: list[Row], settings: dict, workers: int, desc: str) -> list:
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda row: _preprocess_file(row, settings), rows)
        return list(tqdm(results, total=len(rows), desc=desc, disable=None, leave=False, dynamic_ncols=True))


def _stored(images: list[np.ndarray], dims: int) -> np.ndarray:
    """MedMNIST's layout: volumes (N, S, S, S); grey images (N, S, S); RGB images (N, S, S, 3)."""
    array = np.stack(images)  # (N, C, S, S[, S])
    if dims == 2 and array.shape[1] == 3:
        return np.ascontiguousarray(array.transpose(0, 2, 3, 1))
    return array[:, 0]


def _write_cache(npz_path: Path, meta: dict, rows, splits, images, names, multilabel, dims) -> None:
    from engine.rundir import atomic_write_bytes, atomic_write_json

    arrays = {}
    for split in SPLIT_NAMES:
        index = [i for i, s in enumerate(splits) if s == split]
        labels = np.array([rows[i].label for i in index], dtype=np.int64).reshape(len(index), -1)
        arrays[f"{split}_images"] = _stored([images[i] for i in index], dims)
        arrays[f"{split}_labels"] = labels.astype(np.uint8) if len(names) <= 256 else labels
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(buffer.getvalue(), npz_path)
    atomic_write_json(meta, npz_path.with_suffix(".json"))  # written last: the cache exists once this does
    prefix = npz_path.name.rsplit("_", 1)[0] + "_"  # <stem>_<size>[_2d]_<settings hash>_
    for old in npz_path.parent.glob(f"{prefix}*"):  # stale: the same settings on an earlier state of the files
        if old.suffix in (".npz", ".json") and old.stem != npz_path.stem and len(old.stem) == len(npz_path.stem):
            old.unlink(missing_ok=True)


def _settings(data_cfg, dims: int) -> dict:
    return {"dims": dims, "size": data_cfg.size, "channels": data_cfg.channels if dims == 2 else 1,
            "window": list(data_cfg.window) if data_cfg.window else None, "resample": bool(data_cfg.resample),
            "classes": list(data_cfg.classes), "skip_bad": bool(data_cfg.skip_bad)}


def _check_config(data_cfg, dims: int) -> Path:
    if not data_cfg.csv:
        raise DataError('data.name is "csv" but data.csv names no file; set data.csv to your CSV (docs/own-data.md)')
    sizes = SIZES if dims == 3 else SIZES_2D
    if data_cfg.size not in sizes:
        raise DataError(f"data.size {data_cfg.size} does not fit a {dims}-D model; choose one of "
                        f"{', '.join(map(str, sizes))}")
    fractions = data_cfg.split_fractions
    if len(fractions) != 3 or any(f < 0 for f in fractions) or min(fractions[1:]) <= 0 or fractions[0] <= 0:
        raise DataError(f"data.split_fractions {fractions} must be three positive train/val/test fractions")
    if data_cfg.window and (len(data_cfg.window) != 2 or not data_cfg.window[1] > data_cfg.window[0]):
        raise DataError(f"data.window {data_cfg.window} must be [low, high] with high above low")
    csv_path = Path(data_cfg.csv).expanduser()
    if not csv_path.is_file():
        raise DataError(f"data.csv {csv_path} {'is not a file' if csv_path.exists() else 'does not exist'}")
    return Path(os.path.abspath(csv_path))


def _file_failures(csv_path: Path, rows: list[Row], results: list) -> list[dict]:
    return [{"row": row.number, "path": row.path, "reason": error}
            for row, (_, _, error) in zip(rows, results) if error is not None]


def _failure_text(csv_path: Path, failed: list[dict]) -> str:
    shown = "; ".join(f"row {f['row']} ({f['path']}): {f['reason']}" for f in failed[:10])
    more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
    return f"{len(failed)} file(s) of {csv_path.name} cannot be used: {shown}{more}"


def prepare(data_cfg, *, dims: int) -> DatasetInfo:
    """The CSV dataset's info, building its cached .npz first when the CSV, a file or a setting changed."""
    csv_path = _check_config(data_cfg, dims)
    csv_bytes = csv_path.read_bytes()
    rows, names, multilabel = read_rows(csv_path, list(data_cfg.classes))
    cache_dir = (Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir
                 else csv_path.parent / f"{csv_path.stem}_cache")
    has_column = rows[0].split is not None
    split_file = None if has_column else _split_file(cache_dir, data_cfg.split_seed, data_cfg.split_fractions)
    splits, how = assign_splits(rows, split_file, data_cfg.split_fractions, data_cfg.split_seed)
    if not data_cfg.skip_bad:
        check_classes(csv_path, rows, splits, names, multilabel)
    settings = _settings(data_cfg, dims)
    # the name: the settings' hash (caches of other settings are kept: a sweep may use several at once), then the
    # hash of the CSV, the split and the files' sizes and times (an older state of the same settings is deleted)
    settings_key = _sha({"version": CACHE_VERSION, "settings": settings})
    key = _sha({"csv": hashlib.sha256(csv_bytes).hexdigest(), "splits": splits, "settings": settings_key,
                "files": [_stat(row.file) for row in rows]})
    kind = f"{data_cfg.size}{'_2d' if dims == 2 else ''}"
    npz_path = cache_dir / f"{csv_path.stem}_{kind}_{settings_key[:8]}_{key[:12]}.npz"
    if key in _prepared:
        return _prepared[key]
    meta_path = npz_path.with_suffix(".json")
    meta = _read_meta(meta_path) if npz_path.is_file() else None
    built = meta is None
    if built:
        results = _preprocess_all(rows, settings, data_cfg.workers, f"preprocessing {csv_path.name}")
        failed = _file_failures(csv_path, rows, results)
        if failed and not data_cfg.skip_bad:
            raise DataError(f"{_failure_text(csv_path, failed)}. Fix or remove those rows, or set data.skip_bad "
                            f"true to leave them out")
        keep = [i for i, r in enumerate(results) if r[2] is None]
        kept_rows, kept_splits = [rows[i] for i in keep], [splits[i] for i in keep]
        check_classes(csv_path, kept_rows, kept_splits, names, multilabel)
        meta = {"version": CACHE_VERSION, "csv": str(csv_path), "key": key, "task": _task(names, multilabel),
                "classes": names, "split": how,
                "files": {s: [r.path for r, t in zip(kept_rows, kept_splits) if t == s] for s in SPLIT_NAMES},
                "skipped": failed, "notes": {rows[i].path: results[i][1] for i in keep if results[i][1]}}
        _write_cache(npz_path, meta, kept_rows, kept_splits, [results[i][0] for i in keep], names, multilabel, dims)
    if split_file is not None and (built or not split_file.is_file()):
        from engine.rundir import atomic_write_bytes

        atomic_write_bytes(_split_text(rows, splits), split_file)
    info = DatasetInfo(name=CSV_NAME, task=meta["task"], num_classes=len(names), in_channels=settings["channels"],
                       label_names={str(i): n for i, n in enumerate(names)},
                       n_samples={s: len(meta["files"][s]) for s in SPLIT_NAMES}, size=data_cfg.size, path=npz_path,
                       url=None, md5=None, dims=dims)
    _report(csv_path, info, meta, built, split_file)
    _prepared[key] = info
    return info


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read_meta(path: Path) -> dict | None:
    """The cache's .json, or None when it is missing or unreadable (the cache is then built again)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("version") == CACHE_VERSION else None


def _task(names: list[str], multilabel: bool) -> str:
    if multilabel:
        return "multi-label, binary-class"
    return "binary-class" if len(names) == 2 else "multi-class"


def _report(csv_path: Path, info: DatasetInfo, meta: dict, built: bool, split_file: Path | None) -> None:
    n = info.n_samples
    classes = ", ".join(f"{i}: {name}" for i, name in info.label_names.items())
    print(f"csv dataset {csv_path}: {info.task}, {info.num_classes} classes ({classes}); train/val/test "
          f"{n['train']}/{n['val']}/{n['test']} from the {meta['split']}"
          f"{f' (saved in {split_file})' if split_file is not None else ''}; "
          f"{'built' if built else 'reused'} cache {info.path}")
    if meta["skipped"]:
        print(f"data.skip_bad: left out {_failure_text(csv_path, meta['skipped'])}")
    if meta["notes"]:
        print(f"note: {len(meta['notes'])} file(s) were resampled to isotropic voxels "
              f"(see {info.path.with_suffix('.json')})")


def load_cached_splits(info: DatasetInfo, splits=SPLIT_NAMES) -> dict[str, Split]:
    """The splits of a prepared CSV dataset's .npz, as `data.loading.load_splits` gives a MedMNIST file's."""
    result = {}
    try:
        arrays = read_npz(info, tuple(splits))
    except DataError as err:
        raise DataError(f"the cache of the CSV dataset is damaged ({err}); delete {info.path} and run again to "
                        f"rebuild it") from None
    for split, (images, labels) in arrays.items():
        flat = check_arrays(info, split, images, labels)
        if images.ndim == 4 and info.dims == 2:  # RGB (N, S, S, 3) -> (N, 3, S, S)
            tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        else:
            tensor = torch.from_numpy(images).unsqueeze(1)
        result[split] = Split(tensor, torch.from_numpy(flat))
    return result
