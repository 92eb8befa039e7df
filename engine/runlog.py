"""`<run dir>/train.log`, and a quiet end when the reader of the output goes away.

`capture()` (entered by `engine.setup.run_cli`) copies everything the process prints to `sys.stdout` and
`sys.stderr` (Python warnings included) while passing it through unchanged; `attach(run_dirs)` (train.py,
once the config is known) names the file. The copy is appended to `<run dir>/train.log` from the moment the
run starts writing its folder under its lock (`start`, from `RunDirectory.begin`; what was printed before is
written first, and a call refused before that appends nothing), after one header line per invocation:

    ==== 2026-11-29 23:10:04 UTC  host myhost  python 3.12.3  torch 2.13.0  pid 4242: python train.py demo.json

Progress bars (text with carriage returns or terminal escapes) are left out. The file is opened for each
write, so a run directory renamed by `--restart` keeps its own log and the new one starts its own (with the
header again). Only
rank 0 of a torchrun run writes. Output written straight to the file descriptors (by C code) is not copied.

`quiet_broken_pipe()`: when stdout is a pipe whose reader has exited (`train.py ... | head`), the process
ends with exit code 141 (128 + SIGPIPE, as a shell tool killed by SIGPIPE) and no message.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import socket
import sys
import time
from pathlib import Path

LOG_NAME = "train.log"  # engine.rundir.TRAIN_LOG names it for the run directory
BROKEN_PIPE_EXIT = 141
_PENDING_LIMIT = 1 << 20  # characters kept while the run directory does not exist yet


class _Tee:
    """A text stream that writes to `stream` and hands each write to `copy`."""

    def __init__(self, stream, copy):
        self._stream, self._copy = stream, copy

    def write(self, text):
        self._copy(text)
        return self._stream.write(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, ... of the real stream
        return getattr(self._stream, name)


class RunLog:
    def __init__(self):
        self.logs: list[_Log] = []  # one per run directory (several for train.seeds: one per member)
        self.pending: list[str] = []  # what was printed before attach
        self.size = 0
        self.header = ""
        self.line_open = False  # the last text copied did not end a line

    def attach(self, run_dirs: list[Path], command: list[str]) -> None:
        if os.environ.get("RANK", "0") not in ("", "0"):
            return
        import torch

        self.header = (f"==== {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}  host {socket.gethostname()}  "
                       f"python {platform.python_version()}  torch {torch.__version__}  pid {os.getpid()}: "
                       f"{shlex.join(['python', *command])}\n")
        self.logs = [_Log(Path(run_dir) / LOG_NAME, list(self.pending), self.size) for run_dir in run_dirs]
        self.pending, self.size = [], 0
        self.flush_pending()

    def copy(self, text: str) -> None:
        if not text or "\r" in text or "\x1b" in text:  # progress bars
            return
        self.line_open = not text.endswith("\n")
        for log in self.logs or [self]:
            if log.size < _PENDING_LIMIT:
                log.pending.append(text)
                log.size += len(text)
        self.flush_pending()

    def flush_pending(self) -> None:
        for log in self.logs:
            log.flush(self.header)


class _Log:
    """The train.log of one run directory and what is still to be appended to it."""

    def __init__(self, path: Path, pending: list[str], size: int):
        self.path, self.pending, self.size = path, pending, size
        self.folder: int | None = None  # the run directory the header went into (its inode)
        self.started = False  # the run owns its folder and writes (`start`): a refused call appends nothing

    def flush(self, header: str) -> None:
        if not self.pending or not self.started:
            return
        try:
            folder = os.stat(self.path.parent).st_ino  # a new folder (after --restart) gets its own header
        except OSError:
            return  # the run directory does not exist yet: kept until it does
        text = (header if folder != self.folder else "") + "".join(self.pending)
        self.folder, self.pending, self.size = folder, [], 0
        try:
            with open(self.path, "a", encoding="utf-8", errors="replace") as f:
                f.write(text)
        except OSError:
            pass  # a full disk or a vanished folder: the run itself reports what matters


_active: RunLog | None = None


@contextlib.contextmanager
def capture():
    """Copy stdout and stderr for `attach` while the block runs (nothing is written until then)."""
    global _active
    log, saved = RunLog(), (sys.stdout, sys.stderr, _active)
    sys.stdout, sys.stderr = _Tee(sys.stdout, log.copy), _Tee(sys.stderr, log.copy)
    _active = log
    try:
        yield log
    finally:
        log.flush_pending()
        sys.stdout, sys.stderr, _active = saved


def attach(run_dirs: Path | list[Path], script: str, argv: list[str] | None = None) -> None:
    """Append what this process prints to `<run dir>/train.log` of each of `run_dirs` (several: the members of
    train.seeds) within `capture()`; otherwise nothing. The header names the command `python script *argv`
    (argv: sys.argv[1:] by default)."""
    if _active is not None:
        dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
        _active.attach(dirs, [script, *(sys.argv[1:] if argv is None else argv)])


def start(run_dir: Path) -> None:
    """The run of `run_dir` starts writing (engine.rundir.RunDirectory.begin, under its lock): its train.log
    gets what was printed so far and what follows."""
    if _active is not None:
        for log in _active.logs:
            if log.path.parent == Path(run_dir):
                log.started = True
        _active.flush_pending()


def quiet_broken_pipe() -> None:
    """The reader of stdout is gone: stop printing there (also at exit), and exit 141 without a message."""
    if _active is not None:
        _active.copy(f"{chr(10) if _active.line_open else ''}stopped: the output's reader went away (broken pipe)\n")
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    os.dup2(devnull, stream.fileno())
    except OSError:
        pass
    sys.exit(BROKEN_PIPE_EXIT)
