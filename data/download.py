"""MD5-checked download of the MedMNIST files with urllib (no torchvision, no requests)."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from data.info import DataError

DOWNLOAD_TIMEOUT_S = 30.0
"""Socket timeout of the download (connection and each read), in seconds."""
_CHUNK_BYTES = 1 << 20


def open_url(url: str, timeout: float) -> BinaryIO:
    """Open `url` for reading. Tests replace this module-level function to avoid the network."""
    request = urllib.request.Request(url, headers={"User-Agent": "lmttm-data/1.0"})
    return urllib.request.urlopen(request, timeout=timeout)


def file_md5(path: str | Path) -> str:
    """Hex MD5 digest of the file at `path`, read in chunks."""
    digest = hashlib.md5()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def manual_download_hint(url: str | None, dest: Path, md5: str | None) -> str:
    """The sentence telling the user how to put the file in place by hand."""
    source = f" from {url}" if url else ""
    checksum = f" (MD5 {md5})" if md5 else ""
    return f"Download it by hand{source} and copy it to {Path(dest).absolute()}{checksum}."


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP error {error.code}: {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"network error: {error.reason}"
    if isinstance(error, TimeoutError):
        return f"timed out after {DOWNLOAD_TIMEOUT_S:g} s"
    return f"{type(error).__name__}: {error}"


def download_file(url: str, dest: Path, md5: str) -> None:
    """Download `url` to `dest`, verifying its MD5 before the file appears at `dest`.

    The bytes go to a temporary ``<dest>.<random>.part`` file next to `dest`, which is renamed
    to `dest` only once the MD5 matches. On any failure (network, HTTP, timeout, MD5 mismatch,
    interruption) the temporary file is removed, nothing else is written, and a DataError
    (interruptions: the original exception) tells the user how to place the file by hand.
    """
    dest = Path(dest).absolute()
    hint = manual_download_hint(url, dest, md5)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f"{dest.name}.", suffix=".part", delete=False)
    except OSError as error:
        raise DataError(f"Cannot write {dest.name} into {dest.parent} ({error}). {hint}") from error
    part = Path(handle.name)
    finished = False
    try:
        digest = hashlib.md5()
        try:
            with handle, open_url(url, DOWNLOAD_TIMEOUT_S) as response:
                length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
                total = int(length) if length and str(length).isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=f"Downloading {dest.name}", leave=False) as progress:
                    while chunk := response.read(_CHUNK_BYTES):
                        handle.write(chunk)
                        digest.update(chunk)
                        progress.update(len(chunk))
        except (OSError, http.client.HTTPException, ValueError) as error:
            # URLError, HTTPError, TimeoutError and socket errors are all OSError subclasses.
            raise DataError(f"Could not download {dest.name} from {url} ({_failure_reason(error)}). {hint}") from error
        actual = digest.hexdigest()
        if actual != md5:
            raise DataError(
                f"The download of {dest.name} from {url} has MD5 {actual}, expected {md5}; "
                f"it was discarded. {hint}"
            )
        os.replace(part, dest)
        finished = True
    finally:
        if not finished:
            part.unlink(missing_ok=True)
