"""Where the work runs: device choice, torchrun process groups, mixed precision, results back to the host."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dho_pipeline.config import DEVICE_CHOICES, DEVICE_PATTERN, ConfigError


@dataclass(frozen=True)
class Runtime:
    """This process's device and its place among torchrun's processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, value: object) -> object:
        """Rank 0's `value` on every rank (a picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def pick_device(name: str = "auto", what: str = "device") -> torch.device:
    """'auto' takes CUDA when there is one, else the CPU; a device torch cannot parse or does not have raises
    ConfigError naming `what` (the config field or option that gave it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if DEVICE_PATTERN.fullmatch(name) is None:
        raise ConfigError(f"{what}: must be one of {DEVICE_CHOICES}, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ConfigError(f"{what}: {name}, but torch sees no GPU (use cpu or auto)")
        if (device.index or 0) >= count:
            raise ConfigError(f"{what}: {name}, but torch sees {count} GPU(s): cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{what}: mps, but torch sees no Apple GPU (use cpu or auto)")
    return device


def init_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device, "train.device")
    if world_size == 1:
        return Runtime(dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, dist.get_rank(), world_size)


def autocast(device: torch.device, mode: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for 'auto' (or the dtype asked for); none on the CPU or for 'off'."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    dtype = torch.float16 if mode == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


class HostCopy:
    """Tensors on their way to host memory: on CUDA the copy runs behind the queued work; `.wait()` lands them."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.host = {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda).copy_(t, non_blocking=True)
                     for name, t in tensors.items()}
        self.event = None
        if any(t.is_cuda for t in tensors.values()):
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> dict[str, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return {name: t.float().numpy() if t.is_floating_point() else t.numpy() for name, t in self.host.items()}
