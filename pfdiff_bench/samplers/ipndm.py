"""iPNDM (improved pseudo numerical methods, Adams–Bashforth on ε through the DDIM map) as
qsh-zh/deis ``th_deis`` (a30709f, ``get_sampler(method="ipndm")``) computes it: spec BASELINES.md §4.4.

Same DEIS time and ᾱ (:class:`~pfdiff_bench.samplers.deis.DeisSDE`) as tAB-DEIS; the official sampler
always uses the time-uniform grid (``"t"``, k = 1) and ignores ``ts_phase`` / ``ts_order``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from pfdiff_bench.samplers.deis import DeisSDE, call_eps

# Adams–Bashforth weights for 1..4 values, newest first
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm_orders(steps: int, order: int = 4) -> list[int]:
    """Number of ε values of each step: min(i + 1, order); no lower-order final steps."""
    return [min(i + 1, order) for i in range(steps)]


def sample_ipndm(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 sde: DeisSDE, ts: Sequence[float], order: int = 4) -> torch.Tensor:
    """iPNDM over the grid ``ts`` (τ_0 = T ... τ_N = ε), one ε call per step: NFE = N.

    ``order`` caps the Adams–Bashforth combination (4 = the official method; 1 = DDIM).
    """
    if order not in AB_WEIGHTS:
        raise ValueError(f"iPNDM order must be 1, 2, 3 or 4 (got {order})")
    hist: list[torch.Tensor] = []
    for i, q in enumerate(ipndm_orders(len(ts) - 1, order)):
        a_i, a_n = float(sde.alpha_bar(float(ts[i]))), float(sde.alpha_bar(float(ts[i + 1])))
        hist = ([call_eps(eps_fn, sde, x, ts[i])] + hist)[:order]
        # DDIM (order-0 exponential integrator) map applied to the AB combination of ε
        d = math.sqrt(1.0 - a_n) - math.sqrt(a_n / a_i) * math.sqrt(1.0 - a_i)
        x = math.sqrt(a_n / a_i) * x + sum((d * w) * e for w, e in zip(AB_WEIGHTS[q], hist))
    return x
