"""Process-group helpers shared by the engines and the trainer. With one process they are no-ops,
so the plain `python -m train.pretrain` path never needs a process group (or deepspeed)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment (deepspeed, torchrun), else (0, 0, 1)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum scalar statistics over ranks (in float64), so rank 0 can log the global batch's numbers."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def shutdown() -> None:
    """End a launcher-started run cleanly: wait for every rank, then tear the process group down.

    Exiting with the group alive leaves its communication threads to die with the interpreter, which
    now and then aborts a rank at exit ("terminate called without an active exception", status -6)
    after the work is done and saved.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def init_process_group(device: torch.device) -> None:
    """Start the default process group for a launcher-started run (torchrun without DeepSpeed)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)


def ensure_launcher_env() -> None:
    """DeepSpeed expects a launcher's environment; give a bare single process one (else it tries MPI)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
