"""Training on several processes with `torchrun` (DistributedDataParallel), detected from the environment.

    torchrun --nproc_per_node 4 train.py adrenalmnist3d.json        # 4 GPUs of one machine (NCCL)
    torchrun --nproc_per_node 2 train.py demo.json --train.device cpu  # 2 CPU processes (gloo)

`python train.py` is untouched by this module (`Distributed.single()`). Under torchrun (WORLD_SIZE > 1):
- every rank builds the same data, model and optimizer; DDP broadcasts rank 0's weights and averages gradients;
- each step's global batch is the single-process batch (`train.batch_size` samples of the same seeded
  permutation), cut into `world_size` consecutive shards (`torch.tensor_split`: when the batch does not divide
  evenly the first ranks get one sample more, and a rank left without a sample runs one sample at weight 0);
  every rank's loss is its shard's summed cross-entropy divided by the global batch size and multiplied by
  the world size, so DDP's mean over ranks is exactly the gradient of the global batch's mean loss, whatever
  the split (up to float summation order);
- the logged loss is the global mean (the ranks' sums are all-reduced);
- rank 0 alone evaluates (full validation split, unwrapped model), logs and writes the run directory; the others
  wait at a barrier after each epoch; decisions rank 0 takes from the run directory (resume, already finished)
  are broadcast;
- dropout and memory noise draw different numbers on every rank: each rank's RNG is reseeded at every epoch
  from (train.seed, epoch, rank), which also makes a resumed torchrun run exact;
- NCCL on CUDA (device cuda:LOCAL_RANK), gloo on the CPU.

Failures: a rank that dies (killed, out of memory) makes the others' next collective fail, and a rank that
freezes (stopped, hung) makes them wait `train.dist_timeout_min` minutes (default 10: far more than any
wait at a barrier while rank 0 evaluates); either way every surviving rank stops with one `error:` line
(`collective_failure`, printed by engine.setup.run_cli) and exit code 1 instead of gloo's traceback.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank, world size and local rank (single process: 0, 1, 0)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def single(cls) -> Distributed:
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in a single process) ------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def share(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value if self.leader else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over the ranks (a new tensor; the input is left alone)."""
        if not self.enabled:
            return tensor
        total = tensor.clone()
        torch_dist.all_reduce(total)
        return total

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's part of a global batch, and the weight of its summed loss (see the module docstring).
        A rank left without samples gets the batch's first sample at weight 0 (it still joins the all-reduce)."""
        n = len(y)
        part = torch.tensor_split(torch.arange(n), self.world_size)[self.rank]
        if len(part) == 0:
            return x[:1], y[:1], 0.0
        return x[part[0]:part[-1] + 1], y[part[0]:part[-1] + 1], self.world_size / n

    def reseed(self, seed: int, epoch: int) -> None:
        """Per-rank random streams for dropout and noise, a pure function of (seed, epoch, rank)."""
        if self.enabled:
            torch.manual_seed((seed * 1_000_003 + epoch) * 1_009 + self.rank)

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

    def __exit__(self, exc_type, exc, tb) -> bool:
        """ExitStack.push(dist): the process group is torn down after a clean end only. After an error (a rank
        that died or froze, a timeout) the process is ending anyway, and tearing down a group whose peer does not
        answer can block."""
        if exc_type is None:
            self.close()
        return False


def collective_failure(err: BaseException) -> str | None:
    """One line for a collective that failed because another rank died or froze; None for any other error."""
    if not isinstance(err, RuntimeError):
        return None
    text = str(err)
    if not (isinstance(err, getattr(torch_dist, "DistError", ())) or any(w in text for w in ("gloo", "NCCL", "c10d"))):
        return None
    where = f"torchrun rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return (f"{where}: another rank did not answer within train.dist_timeout_min minutes (frozen, stopped or "
                f"hung?); stopping. Rerun the same command to resume from the last saved epoch")
    detail = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    detail = detail.split("] ", 1)[-1][:160]  # without gloo's source location
    return (f"{where}: lost contact with another rank ({detail}): it died or was killed (its own output says "
            f"why); stopping. Rerun the same command to resume from the last saved epoch")


def _end_with_the_launcher() -> None:
    """Linux: this rank gets SIGTERM (and stops as on Ctrl-C, exit 143) when its parent, the torchrun launcher,
    dies, even by SIGKILL: no rank outlives a killed launcher."""
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def from_environment(device_name: str, timeout_min: float = 10.0) -> tuple[Distributed, str]:
    """(Distributed, device name) from torchrun's variables; starts the process group when WORLD_SIZE > 1.

    Under torchrun `train.device` `auto` or `cuda` means this rank's GPU, cuda:LOCAL_RANK (NCCL), and `cpu`
    runs gloo on the CPU; an explicit `cuda:N` is refused (each rank needs its own GPU). A collective waits
    at most `timeout_min` minutes for the other ranks (`train.dist_timeout_min`)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed.single(), device_name
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    _end_with_the_launcher()
    if device_name.startswith("cuda:"):
        from engine.config import ConfigError

        raise ConfigError(f"train.device = {device_name!r} under torchrun: every rank uses its own GPU "
                          f"(cuda:LOCAL_RANK); give auto, cuda or cpu")
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device_name = f"cuda:{local_rank}"
    else:
        device_name = "cpu"
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                  timeout=datetime.timedelta(minutes=timeout_min))
    return Distributed(rank, world_size, local_rank), device_name
