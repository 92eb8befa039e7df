"""Write the CSV of a CSV dataset (docs/own-data.md) from a folder with one subfolder per class.

    python tools/make_csv.py scans/            # scans/benign/*.nii.gz, scans/malignant/... -> scans/labels.csv

Every NIfTI / NumPy file (images with --images) under a class subfolder becomes a row `path,label` with the path
relative to the CSV's folder and the subfolder's name as the label. An existing CSV is kept unless --force.
Exit codes: 0 written, 2 nothing to write or the CSV exists.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.inputs import IMAGE_SUFFIXES, VOLUME_SUFFIXES, suffix_of  # noqa: E402
from engine.rundir import atomic_write_bytes  # noqa: E402


def rows_of(folder: Path, suffixes, base: Path) -> list[list[str]]:
    """[[path relative to `base` (the CSV's folder), class name]] of every file of a class subfolder, sorted by
    class then path."""
    rows = []
    for class_dir in sorted(p for p in folder.absolute().iterdir() if p.is_dir() and not p.name.startswith(".")):
        if class_dir.name.endswith("_cache"):  # the CSV dataset's own cache
            continue
        files = sorted(p for p in class_dir.rglob("*") if p.is_file() and suffix_of(p) in suffixes)
        rows += [[Path(os.path.relpath(p, base)).as_posix(), class_dir.name] for p in files]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder with one subfolder of files per class")
    parser.add_argument("--out", type=Path, help="CSV to write (default: FOLDER/labels.csv)")
    parser.add_argument("--images", action="store_true", help="2-D images (PNG, JPEG, TIFF, ...) instead of volumes")
    parser.add_argument("--force", action="store_true", help="replace an existing CSV")
    args = parser.parse_args(argv)
    folder = args.folder.expanduser()
    out = args.out or folder / "labels.csv"
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} exists; --force replaces it", file=sys.stderr)
        return 2
    rows = rows_of(folder, IMAGE_SUFFIXES if args.images else VOLUME_SUFFIXES, out.expanduser().absolute().parent)
    classes = sorted({label for _, label in rows})
    if len(classes) < 2:
        print(f"error: {folder} needs at least two class subfolders holding files; found {classes or 'none'}",
              file=sys.stderr)
        return 2
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    atomic_write_bytes(text.getvalue().encode(), out)
    counts = ", ".join(f"{c}: {sum(1 for _, label in rows if label == c)}" for c in classes)
    print(f"wrote {out}: {len(rows)} files ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
