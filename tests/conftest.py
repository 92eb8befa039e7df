"""Test-wide settings: one torch thread per process keeps the tiny models fast on a 2-core machine
(two threads spin against each other, and against the subprocesses some tests start).

`--device DEV` (default cpu) is the device of the tests marked `device` (their `device` fixture). With a
device other than cpu only those tests run: `python -m pytest --device cuda` checks the CUDA path
(tools/gpu_check.py runs it on a GPU machine); `python -m pytest -m device` runs the same tests on the CPU."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the tests marked `device` (cpu, cuda, cuda:1, ...); with another device than "
                          "cpu only those tests run")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on the --device device (cpu by default); the only tests "
                                       "run with --device cuda")
    device = torch.device(config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: CUDA is not available here")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cpu":
        return
    kept = [item for item in items if item.get_closest_marker("device")]
    dropped = [item for item in items if not item.get_closest_marker("device")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture
def device(request) -> torch.device:
    """The --device device (a CUDA device that is not there stops the session: a usage error, not a skip)."""
    return torch.device(request.config.getoption("--device"))
