"""torchrun support: rank/world from the environment, NCCL (CUDA) or gloo (CPU) process groups.

Errors (docs/ENGINE.md "torchrun"): a step every rank does alike reports its error once, on rank 0
(``rank_zero_first`` for downloads and first loads; the others raise the quiet ``OtherRankFailed``); an
error in one rank's own share of the work (``own_share``) is tagged with that rank and reported by it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch

from pfdiff_bench.errors import OtherRankFailed, PFDiffError


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

    def all_reduce(self, values: list[float], op: str, device: Optional[torch.device] = None) -> list[float]:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        if device is None:  # NCCL reduces CUDA tensors only; gloo CPU ones
            device = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
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


T = TypeVar("T")


def _rank_zero(d: Dist, fn: Callable[..., T], then_others: bool, *args, **kwargs) -> Optional[T]:
    if not d.active:
        return fn(*args, **kwargs)
    if d.rank == 0:
        try:
            out = fn(*args, **kwargs)
        except BaseException:
            with contextlib.suppress(Exception):
                d.all_reduce([1.0], "max")  # the others are waiting on this: tell them rank 0 failed
            raise
        d.all_reduce([0.0], "max")
        return out
    (failed,) = d.all_reduce([0.0], "max")
    if failed:
        raise OtherRankFailed("rank 0 failed (it reports the error)")
    return fn(*args, **kwargs) if then_others else None


def rank_zero_first(d: Dist, fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on rank 0, then on the other ranks (which wait meanwhile).

    For steps with first-use side effects (downloads, checksum pins, "note:" lines): rank 0 fetches and
    pins, the others then find the files in place and only load them. When rank 0 fails it raises its
    error (reported once) and the others raise ``OtherRankFailed`` instead of waiting forever.
    """
    return _rank_zero(d, fn, True, *args, **kwargs)


def rank_zero_only(d: Dist, fn: Callable[..., T], *args, **kwargs) -> Optional[T]:
    """``fn`` on rank 0 while the others wait (they get None); a failure on rank 0 stops them as above."""
    return _rank_zero(d, fn, False, *args, **kwargs)


@contextlib.contextmanager
def own_share(d: Dist):
    """A block where each rank works on its own shards: a PFDiffError raised in it is this rank's alone
    (the others may not meet it), so it is tagged ``only_rank`` and reported by this rank (cli.main)."""
    try:
        yield
    except PFDiffError as exc:
        if d.world > 1 and not isinstance(exc, OtherRankFailed):
            exc.only_rank = (d.rank, d.world)
        raise
