"""Predictions on your own scans: read NIfTI / NumPy / image files, preprocess them as MedMNIST volumes were
made, score them with a trained checkpoint and write one CSV row per file.

    python predict.py adrenalmnist3d.json --input scan.nii.gz more_scans/ volume.npy
    python predict.py adrenalmnist3d.json --input ct/ --window -1000 400 --save-preprocessed seen/ --out ct.csv

Reading (`read_array`):
- NIfTI (`.nii`, `.nii.gz`, nibabel): reoriented to the closest canonical orientation (RAS+, nibabel's
  `as_closest_canonical`), then the axes are ordered (S, A, R): axis 0, the model's depth axis, runs from
  inferior to superior (a stack of axial slices), rows from posterior to anterior, columns from left to right.
  So two files of the same anatomy stored with different axis flips or orders give the same volume.
- NumPy: `.npy`, or `.npz` holding exactly one array; taken as stored (axis 0 = depth for a volume).
- Images (2D models): `.png`, `.jpg`, `.jpeg`, `.bmp`, `.tif`, `.tiff` via Pillow (grey or RGB; alpha dropped).

Preprocessing (`preprocess`), the MedMNIST recipe:
1. shape: a volume needs 3 axes; a 4-D array with one singleton channel axis (first or last) is squeezed, one
   with several channels is refused. An image needs 2 axes (grey) or 3 with 1, 3 or 4 channels last; grey
   becomes RGB by repetition and RGB grey by ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B) as the model needs;
2. intensity to [0, 1]: (x - min) / (max - min) over the whole volume, or with `window=(low, high)` (CT
   Hounsfield units, say) clipped to [low, high] and scaled by that range; a constant input becomes zeros;
3. size: resized to the checkpoint's input size (28³ or 64³; images 28²..224²) with trilinear (bilinear)
   interpolation, `torch.nn.functional.interpolate(..., align_corners=False)`; an input already at that size
   is not resampled;
4. quantised like the MedMNIST files, `round(255 x)` as uint8, and fed to the model as uint8 / 255, exactly
   as predict.py feeds MedMNIST splits: a volume taken from a MedMNIST file (0..255, every volume spans the
   full range) passes unchanged and gets the same probabilities as predict.py gives it.
All of it in float32 (a `.npy` is memory-mapped and converted slab by slab): a large volume costs about one
float32 copy of itself (2 GiB for 800³), never a float64 one.

A file that cannot be used (unreadable, empty, not a regular file such as a FIFO or /dev/zero, NaN or Inf
or complex values, wrong number of axes, an axis of length 1, several channels, not enough memory) gets a
one-line reason in the CSV's `error` column and on stderr; the other files are still scored, and the
exit code is 1 if any file failed (0 otherwise; 2 for a bad config or checkpoint, as predict.py).
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine import spacing as spacing_module

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy", ".npz")


class InputError(Exception):
    """One input file cannot be used; the message is the one-line reason."""


@dataclass
class Item:
    """One input: the path as given (or found in a folder), and what became of it."""

    path: str
    image: np.ndarray | None = None  # uint8 (C, S, S[, S]) after preprocessing
    error: str | None = None
    note: str = ""  # what was done beyond the recipe (engine/spacing.py's resampling)


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def collect(paths, dims: int) -> list[Item]:
    """Every input file: files as given, folders searched recursively for readable suffixes (sorted).
    A missing path, or a folder without any usable file, is an error item."""
    suffixes = VOLUME_SUFFIXES if dims == 3 else IMAGE_SUFFIXES
    items = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and suffix_of(p) in suffixes)
            if not found:
                items.append(Item(str(given), error=f"folder holds no {' / '.join(suffixes)} file"))
            items += [Item(str(p)) for p in found]
        elif path.is_file():
            items.append(Item(str(given)))
        elif path.exists():  # a FIFO, a device such as /dev/zero, a socket: never read (it may not end)
            items.append(Item(str(given), error="not a regular file (a FIFO, device or socket); give a file"))
        else:
            items.append(Item(str(given), error="no such file or folder"))
    return items


def _pickle_reason(path: Path) -> str:
    """Why numpy wanted to unpickle `path`: it is a pickle, its arrays hold Python objects, or it is no NumPy
    file at all (numpy tries the pickle reader on anything that is neither a zip archive nor a .npy file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        head = b""
    if head[:1] == b"\x80":  # the opcode every pickle of protocol 2 or later starts with
        return "it holds pickled Python objects, which were not loaded"
    if head[:2] == b"PK" or head == b"\x93NUMPY":
        return "its arrays hold pickled Python objects, which were not loaded"
    return f"it is not a NumPy file (it starts with {head!r}, not with b'PK' or b'\\x93NUMPY')"


def read_array(path: str | Path) -> np.ndarray:
    """The array stored in `path` (module docstring); InputError with the reason if it cannot be read."""
    path = Path(path)
    kind = suffix_of(path)
    try:
        if path.stat().st_size == 0:
            raise InputError("empty file (0 bytes)")
        if kind in (".nii", ".nii.gz"):
            import nibabel

            image = nibabel.as_closest_canonical(nibabel.load(str(path)))
            data = np.asarray(image.get_fdata(dtype=np.float32))  # float32: an 800³ volume is 2 GB, not 4
            return np.transpose(data, (2, 1, 0, *range(3, data.ndim))) if data.ndim >= 3 else data  # RAS -> SAR
        if kind == ".npy":  # memory-mapped: preprocess reads it slab by slab
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if kind == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if len(names) != 1:
                    raise InputError(f".npz holds {len(names)} arrays ({', '.join(names[:5]) or 'none'}); "
                                     f"save one array per file")
                return archive[names[0]]
        if kind in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                if image.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr"):
                    image = image.convert("RGB")
                return np.asarray(image)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is this file's problem, reported in one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "pickle" in reason or "Python objects" in reason:  # never pass on numpy's advice to load it unsafely
            reason = _pickle_reason(path)
        raise InputError(f"cannot read {kind or 'the'} file: {reason}") from None
    raise InputError(f"unknown file type {kind or '(no suffix)'}: use .nii, .nii.gz, .npy, .npz or an image")


def _grey_or_rgb(array: np.ndarray, in_channels: int) -> np.ndarray:
    """(C, H, W) float of an image array (H, W) or (H, W, 1|3|4)."""
    if array.ndim == 2:
        image = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        image = np.moveaxis(array[..., :3] if array.shape[-1] == 4 else array, -1, 0)
    else:
        raise InputError(f"is {array.ndim}-D with shape {tuple(array.shape)}; a 2-D model needs an image of "
                         f"shape (H, W) or (H, W, 1|3|4)")
    if image.shape[0] == in_channels:
        return image
    if in_channels == 3:  # grey -> RGB
        return np.repeat(image, 3, axis=0)
    return (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]  # RGB -> grey (ITU-R 601 luma)


SLAB = 16  # volume slices converted and checked at a time (bounded temporaries for large volumes)


def _as_float32(array: np.ndarray) -> np.ndarray:
    """A float32 copy of `array`, converted slab by slab along axis 0; InputError on NaN or Inf values."""
    x = np.empty(array.shape, dtype=np.float32)
    bad = 0
    for start in range(0, max(array.shape[0], 1), SLAB):
        slab = x[start:start + SLAB]
        slab[...] = array[start:start + SLAB]
        bad += int(np.count_nonzero(~np.isfinite(slab)))
    if bad:
        raise InputError(f"contains {bad} NaN or Inf value{'s' if bad > 1 else ''}")
    return x


def preprocess(array: np.ndarray, *, dims: int, size: int, in_channels: int = 1,
               window: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 (C, size, size[, size]) as MedMNIST stores it (module docstring); InputError if unusable.
    Works in float32, in place where it can: the peak memory is about one float32 copy of the input."""
    if array.size == 0:
        raise InputError(f"empty array (shape {tuple(array.shape)})")
    if np.iscomplexobj(array):
        raise InputError(f"holds complex values ({array.dtype}); save a real array, e.g. the magnitude (np.abs)")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise InputError(f"holds {array.dtype} values, not numbers")
    if array.ndim == 0:
        raise InputError("is a single number, not an image or a volume")
    x = _as_float32(array)
    if dims == 3:
        if x.ndim == 4 and 1 in (x.shape[0], x.shape[-1]):
            x = x[..., 0] if x.shape[-1] == 1 else x[0]
        elif x.ndim == 4:
            raise InputError(f"is 4-D with shape {tuple(x.shape)}: several channels or time points; the model takes "
                             f"one-channel volumes, so save one 3-D volume per file")
        if x.ndim != 3:
            raise InputError(f"is {x.ndim}-D with shape {tuple(x.shape)}; a 3-D model needs a volume (3 axes)")
        x = x[None]
    else:
        x = _grey_or_rgb(x, in_channels).astype(np.float32, copy=False)
    if min(x.shape[1:]) < 2:
        raise InputError(f"has shape {tuple(array.shape)}: an axis of length 1 is no {'volume' if dims == 3 else 'image'}; "
                         f"the model needs at least 2 voxels along each of its {dims} axes")
    if window is not None:
        low, high = window
        np.clip(x, low, high, out=x)
    else:
        low, high = float(x.min()), float(x.max())
    if high > low:
        x -= np.float32(low)
        x /= np.float32(high - low)
    else:
        x[...] = 0
    target = (size,) * dims
    if x.shape[1:] != target:  # interpolate reads the float32 array in place: only the small output is new
        mode = "trilinear" if dims == 3 else "bilinear"
        x = F.interpolate(torch.from_numpy(np.ascontiguousarray(x))[None], size=target, mode=mode,
                          align_corners=False)[0].numpy()
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def predict_inputs(paths, *, model, info, batch_size: int, device, amp: bool = False,
                   full_batches: bool = False, window=None, out: Path, save_preprocessed: Path | None = None,
                   spacing=None, resample: bool = True) -> int:
    """Score every input file with `model` (trained on `info`'s dataset, whose `dims` the files must have) and
    write the CSV `out`; returns the exit code (1 if a file failed). The scores are the engine's own
    (`predict_scores`: softmax, or per-label sigmoid for a multi-label task)."""
    from tqdm import tqdm

    from data.loading import Split
    from engine.evaluate import predict_scores
    from engine.rundir import atomic_write_bytes

    dims = info.dims

    if window is not None and not window[1] > window[0]:
        raise ValueError(f"--window {window[0]} {window[1]}: the high end must be above the low end")
    items = collect(paths, dims)
    for item in tqdm(items, desc="reading", disable=None, leave=False, dynamic_ncols=True):
        if item.error is not None:
            continue
        try:
            if dims == 3:  # voxel spacing: engine/spacing.py
                array, item.note = read_volume(item.path, spacing=spacing, resample=resample)
            else:
                array = read_array(item.path)
            item.image = preprocess(array, dims=dims, size=info.size, in_channels=info.in_channels, window=window)
        except InputError as err:
            item.error = str(err)
        except MemoryError:  # this file only: the others are still scored
            item.error = "not enough memory to read and preprocess it"
        except Exception as err:  # noqa: BLE001 - any other failure is this file's error row, not a lost call
            item.error = f"cannot preprocess it: {type(err).__name__}: {str(err).strip()[:200]}"
    good = [item for item in items if item.error is None]
    scores = None
    if good:  # placeholder labels of the task's shape ((N,) or (N, L)) select the engine's softmax or sigmoid
        images = torch.from_numpy(np.stack([item.image for item in good]))
        labels = torch.zeros((len(good), info.num_classes) if info.is_multilabel else len(good), dtype=torch.long)
        scores = predict_scores(model, Split(images, labels), batch_size=batch_size, device=device, amp=amp,
                                desc="scoring", full_batches=full_batches)
    if save_preprocessed is not None and good:
        save_preprocessed.mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            if item.error is None:  # numbered: files of the same name in different folders never collide
                np.save(save_preprocessed / f"{i:04d}_{Path(item.path).name.split('.')[0]}.npy",
                        item.image.astype(np.float32) / 255)

    k = info.num_classes
    multilabel = info.is_multilabel
    header = ["path", "label", "label_name", *[f"prob_{c}" for c in range(k)], "error", "notes"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    row_scores = iter(scores if scores is not None else [])
    for item in items:
        if item.error is not None:
            writer.writerow([item.path, "", "", *[""] * k, item.error, item.note])
            print(f"error: {item.path}: {item.error}", file=sys.stderr)
            continue
        p = next(row_scores)
        chosen = [c for c in range(k) if p[c] > 0.5] if multilabel else [int(np.argmax(p))]
        writer.writerow([item.path, ";".join(map(str, chosen)),
                         ";".join(info.label_names.get(str(c), str(c)) for c in chosen),
                         *[f"{v:.6g}" for v in p], "", item.note])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(text.getvalue().encode(), out)
    failed = len(items) - len(good)
    print(f"scored {len(good)} of {len(items)} input file(s){f'; {failed} failed (see the error column)' if failed else ''}"
          f"; wrote {out}")
    return 1 if failed else 0


def read_volume(path: str | Path, *, spacing=None, resample: bool = True,
                tolerance: float = spacing_module.TOLERANCE) -> tuple[np.ndarray, str]:
    """(array, note) of one volume file: `read_array`'s array, resampled to isotropic voxels (engine/spacing.py)
    when `resample`; `spacing` is the voxel size of .npy / .npz files (NIfTI files carry their own)."""
    array = read_array(path)
    if not resample:
        return array, ""
    if suffix_of(Path(path)) in (".nii", ".nii.gz"):
        try:
            spacing = spacing_module.nifti_spacing(path)
        except Exception as err:  # noqa: BLE001 - read_array read it, so this is a header problem of this file
            raise InputError(f"cannot read the voxel spacing: {err}") from None
    if spacing is None:
        return array, ""
    if array.ndim == 4 and 1 in (array.shape[0], array.shape[-1]):  # one channel: as preprocess squeezes it
        array = array[..., 0] if array.shape[-1] == 1 else array[0]
    if array.ndim != 3 or array.dtype.kind not in "biuf":
        return array, ""  # preprocess names the problem
    try:
        return spacing_module.resample_isotropic(array, spacing, tolerance)
    except ValueError as err:
        raise InputError(str(err)) from None
