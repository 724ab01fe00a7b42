"""Process-group setup for ``torchrun`` (DDP): gloo on CPU, NCCL on CUDA."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "init_distributed", "resolve_device"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 in a single-process run).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process trains on.
        initialized_here: True when :func:`init_distributed` created the process group.

    Examples:
        >>> from qdetr.engine.distributed import DistributedContext
        >>> ctx = DistributedContext()
        >>> ctx.is_main, ctx.distributed, ctx.device
        (True, False, device(type='cpu'))
        >>> ctx.barrier()  # a no-op in a single process
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files and logs)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Waits for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Destroys the process group if this context created it."""
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local_rank: GPU index used for ``"auto"`` and ``"cuda"``.

    Returns:
        The device.

    Raises:
        RuntimeError: when CUDA is requested but not available.

    Examples:
        >>> from qdetr.engine.distributed import resolve_device
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("auto").type in ("cpu", "cuda")
        True
    """
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    if device == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistributedContext:
    """Initialises ``torch.distributed`` from the ``torchrun`` environment, if present.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. Without them (or with WORLD_SIZE=1)
    returns a single-process context. The backend is NCCL when the device is CUDA and gloo
    otherwise.

    Args:
        device: as for :func:`resolve_device`.
        timeout_s: process-group timeout in seconds.

    Returns:
        This process's context; call its ``close()`` at the end of the run.

    Examples:
        >>> from qdetr.engine.distributed import init_distributed
        >>> ctx = init_distributed("cpu")  # without torchrun: one process, no process group
        >>> ctx.world_size, ctx.rank, ctx.initialized_here
        (1, 0, False)
        >>> ctx.close()
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size <= 1:
        return DistributedContext(device=resolved)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        initialized_here = True
    return DistributedContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=resolved,
        initialized_here=initialized_here,
    )
