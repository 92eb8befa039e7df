"""Ctrl-C or SIGTERM while a script's imports run (torch and medmnist take seconds): one line and exit 130/143.

Installed by train.py and predict.py before their heavy imports (this module imports only the standard
library); `engine.setup.run_cli` installs the normal handlers once `main` runs. `os._exit` is used because
a library's bare `except:` met during the imports would otherwise swallow the KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_in_imports(signum, frame):
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
    sys.stderr.write(f"\n{what} before any result was written\n")
    os._exit(143 if signum == signal.SIGTERM else 130)


def install() -> None:
    signal.signal(signal.SIGTERM, _interrupted_in_imports)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupted_in_imports)
