"""Time grids of the three official codebase conventions, and the NFE <-> grid-length rules.

* ddim codebase (spec PFDIFF.md §1.2): ``uniform`` = int(linspace(0, 999, L)), ``quad`` =
  int(linspace(0, sqrt(800), L)**2); ascending lists, sampled backwards, then one step to ᾱ = 1.
* guided-diffusion (spec §2.4): ``ddim{M}`` respacing (integer stride from 0, with the official
  replacements for M = 37, 43, 45, 57, 58) and plain section respacing ("M" or "a,b,c").
* DPM-Solver (spec §2.1): ``time_uniform``, ``logSNR``, ``time_quadratic`` in continuous time.

Rules of what finishes cleanly (spec §1.4-1.5, §2.3 item 4, §2.4), s = k + 1:
* ddim:   NFE = L (DDIM) or 1 + ceil((L-1)/s) (PFDiff); every L finishes (defined tails).
* guided: NFE = M or 1 + (M-1)/s; PFDiff finishes only if (M-1) % s == 0.
* dpm_solver singlestep: NFE = sum of the processed orders; PFDiff finishes only if (K-1) % s == 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from pfdiff_bench.errors import GridError
from pfdiff_bench.schedules import VPSchedule

DDIM_GRIDS = ("uniform", "quad")
GUIDED_GRIDS = ("ddim_respacing", "section_respacing")
DPM_GRIDS = ("time_uniform", "logSNR", "time_quadratic")
PFDIFF_VARIANTS = ((1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3))

# guided-diffusion's hand-made replacements for ddim{M} with no exact stride (spec §2.4)
_RESPACING_EXCEPTIONS = {37: (27, (999,)), 43: (23, (989,)), 45: (22, (990,)), 57: (17, (986, 969)), 58: (17, (986,))}


# ---------------------------------------------------------------- ddim codebase
def ddim_uniform(length: int, num_timesteps: int = 1000) -> list[int]:
    """``[int(v) for v in np.linspace(0, 999, L)]`` (ascending), spec §1.2."""
    _check_length(length)
    return [int(v) for v in np.linspace(0, num_timesteps - 1, length)]


def ddim_quad(length: int, num_timesteps: int = 1000) -> list[int]:
    """``[int(v) for v in np.linspace(0, sqrt(800), L) ** 2]`` (ascending; repeats 0 from L ~ 30), spec §1.2."""
    _check_length(length)
    top = 0.8 * num_timesteps
    return [int(v) for v in np.linspace(0, np.sqrt(top), length) ** 2]


# ---------------------------------------------------------------- guided-diffusion
def ddim_respacing(count: int, num_timesteps: int = 1000) -> list[int]:
    """``space_timesteps(1000, "ddim{M}")`` as patched in PFDiff's guided-diffusion (ascending)."""
    _check_length(count)
    steps = _respacing_or_none(count, num_timesteps)
    if steps is None:
        raise GridError(f"no 'ddim{count}' respacing exists (no integer stride gives exactly {count} steps); "
                        f"nearby lengths that work: {_nearby(count, lambda m: _has_respacing(m, num_timesteps))}")
    return steps


def _respacing_or_none(count: int, num_timesteps: int) -> list[int] | None:
    for stride in range(1, num_timesteps):
        steps = range(0, num_timesteps, stride)
        if len(steps) == count:
            return list(steps)
    if num_timesteps == 1000 and count in _RESPACING_EXCEPTIONS:
        stride, removed = _RESPACING_EXCEPTIONS[count]
        return [v for v in range(0, num_timesteps, stride) if v not in removed]
    return None


def section_respacing(sections: Sequence[int] | int, num_timesteps: int = 1000) -> list[int]:
    """``space_timesteps(1000, "a,b,c")``: evenly strided sections, Python ``round`` (ascending)."""
    counts = [int(sections)] if isinstance(sections, int) else [int(c) for c in sections]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or size < count:
            raise GridError(f"cannot take {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return sorted(steps)


def _has_respacing(count: int, num_timesteps: int = 1000) -> bool:
    return count >= 1 and _respacing_or_none(count, num_timesteps) is not None


# ---------------------------------------------------------------- DPM-Solver
def dpm_time_steps(schedule: VPSchedule, skip_type: str, t_T: float, t_0: float, n: int) -> torch.Tensor:
    """``get_time_steps``: n + 1 continuous times from t_T down to t_0 (spec §2.1)."""
    if n < 1:
        raise GridError("a DPM-Solver grid needs at least one interval")
    if skip_type == "logSNR":
        lam_T = float(schedule.marginal_lambda(torch.tensor(t_T, dtype=torch.float64)))
        lam_0 = float(schedule.marginal_lambda(torch.tensor(t_0, dtype=torch.float64)))
        return schedule.inverse_lambda(torch.linspace(lam_T, lam_0, n + 1, dtype=torch.float64))
    if skip_type == "time_uniform":
        return torch.linspace(t_T, t_0, n + 1, dtype=torch.float64)
    if skip_type == "time_quadratic":
        return torch.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1, dtype=torch.float64) ** 2
    raise GridError(f"unknown DPM-Solver grid {skip_type!r}; accepted: {', '.join(DPM_GRIDS)}")


def singlestep_orders(steps: int, order: int, method: str) -> list[int]:
    """Per-interval orders: ``singlestep_fixed`` = [order]*(steps//order); ``singlestep`` = DPM-Solver-fast."""
    if order not in (1, 2, 3):
        raise GridError(f"DPM-Solver order must be 1, 2 or 3 (got {order})")
    if method == "singlestep_fixed":
        return [order] * (steps // order)
    if method != "singlestep":
        raise GridError(f"unknown singlestep method {method!r}")
    if order == 3:
        k = steps // 3 + 1
        return {0: [3] * (k - 2) + [2, 1], 1: [3] * (k - 1) + [1], 2: [3] * (k - 1) + [2]}[steps % 3]
    if order == 2:
        return [2] * (steps // 2) if steps % 2 == 0 else [2] * (steps // 2) + [1]
    return [1] * steps


def singlestep_outer_grid(schedule: VPSchedule, skip_type: str, t_T: float, t_0: float, steps: int,
                          orders: list[int], method: str) -> torch.Tensor:
    """Outer grid of the singlestep solvers (``get_orders_and_timesteps_for_singlestep_solver``).

    For ``singlestep`` with a time-based skip type the official code takes the points of a ``steps``
    grid at the cumulative orders; otherwise the grid has len(orders) intervals.
    """
    if method == "singlestep" and skip_type != "logSNR":
        fine = dpm_time_steps(schedule, skip_type, t_T, t_0, steps)
        return fine[torch.cumsum(torch.tensor([0] + orders), 0)]
    return dpm_time_steps(schedule, skip_type, t_T, t_0, len(orders))


# ---------------------------------------------------------------- NFE rules
def pfdiff_grid_length(nfe: int, k: int) -> int:
    """L = (k+1)·N − k: the grid length the official scripts use for N NFE (spec §1.5)."""
    return (k + 1) * nfe - k


def ddim_convention_nfe(length: int, pfdiff: tuple[int, int] | None) -> int:
    """NFE of the ddim codebase on a grid of L points: L, or 1 + ceil((L−1)/s) (spec §1.5)."""
    if pfdiff is None:
        return length
    return 1 + math.ceil((length - 1) / (pfdiff[0] + 1))


def dpm_processed_steps(orders: list[int], pfdiff: tuple[int, int] | None) -> list[int]:
    """Outer-step indices the DPM-Solver PFDiff loop processes (spec §2.3): 0, 1, 1+s, ... while ≤ K−s."""
    if pfdiff is None:
        return list(range(len(orders)))
    s, count = pfdiff[0] + 1, len(orders)
    return [i for i in range(count) if i <= count - s and (i == 0 or (i - 1) % s == 0)]


def _check_length(length: int) -> None:
    if length < 1:
        raise GridError(f"a grid needs at least 1 point (got {length})")


def _nearby(value: int, ok, span: int = 12) -> str:
    vals = [v for v in range(max(1, value - span), value + span + 1) if ok(v)]
    return ", ".join(map(str, vals)) or "none"
