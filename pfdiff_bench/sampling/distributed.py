"""torchrun support: rank/world from the environment, NCCL (CUDA) or gloo (CPU) process groups."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass

import torch

from pfdiff_bench.errors import PFDiffError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False  # True when this module initialised the process group

    @property
    def active(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, values: list[float], op: str, device: torch.device) -> list[float]:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def close(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def dist_from_env(device_type: str) -> Dist:
    """Rank/world from torchrun's environment; initialise NCCL (CUDA) or gloo (CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    d = Dist(rank, world, local)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_available():
            raise PFDiffError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=60))
            d.initialised = True
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    return d


def _device_for_rank(cfg: dict, d: Dist) -> torch.device:
    from pfdiff_bench.sampling.setup import resolve_device

    dev = resolve_device(cfg["sampling"]["device"])
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", d.local_rank)
    return dev
