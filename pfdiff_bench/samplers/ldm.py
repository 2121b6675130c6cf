"""DDIM and PFDiff-k_h as the official latent-diffusion (Stable Diffusion) samplers compute them
(spec PFDIFF_LDM.md §L1-L8; onefly123/PFDiff ``condition/Stable Diffusion``, ``ddim.py`` and
``PFDiff_*.py``).

Differences from the ddim-codebase convention (first_order.py / pfdiff.py), all facts of that code:

* grid ``int(linspace(0, 998, S)) + 1`` (§L2), ᾱ read from the model's float32 buffer A32 (§L1);
* the last step lands on ᾱ = A32[0] (= 0.99915), not on ᾱ = 1 (§L2, "index −1");
* the four DDIM coefficients √(1−a), √a, √(1−b), √b are float32 values, the state arithmetic stays in
  the tensor's precision (§L8);
* the tails of PFDiff_2_* / PFDiff_3_* (§L6); the two-intervals-left tail that evaluates a stale or
  undefined springboard (§L7) is refused at planning time (samplers/__init__.py), never run.

Classifier-free guidance is the model function's business (models/cfg.py, §L3).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pfdiff_bench.errors import GridError
from pfdiff_bench.models.base import NoisePredictor


def ldm_uniform(length: int, num_timesteps: int = 1000) -> list[int]:
    """``make_ddim_timesteps("uniform")`` of this repository: ``[int(v) for v in linspace(0, N−2, S)] + 1``
    (ascending, 1 ... N−1; §L2). Not the upstream ``range(0, N, N // S) + 1`` (a comment there)."""
    if length < 1:
        raise GridError(f"a grid needs at least 1 point (got {length})")
    if length > num_timesteps - 1:
        raise GridError(f"the ldm grid has at most {num_timesteps - 1} points (got {length})")
    return [int(v) + 1 for v in np.linspace(0, num_timesteps - 2, length)]


def stale_tail(length: int, pfdiff: Optional[tuple[int, int]]) -> bool:
    """True when PFDiff-k_h on ``length`` points reaches the official two-intervals-left tail (§L7):
    s = k+1 ≥ 3 and (S − 1) mod s = 2 (a stale springboard for h = 1, a NameError for h > 1)."""
    if pfdiff is None:
        return False
    s = pfdiff[0] + 1
    return s >= 3 and (length - 1) % s == 2


def ldm_nfe(length: int, pfdiff: Optional[tuple[int, int]]) -> int:
    """NFE = S (DDIM) or 1 + ⌈(S − 1)/s⌉ (PFDiff), §L6."""
    if pfdiff is None:
        return length
    s = pfdiff[0] + 1
    return 1 + -(-(length - 1) // s)


def _f32_roots(a: float, b: float, numpy_ca: bool) -> tuple[float, float, float, float]:
    """c_a = √(1−a), r_a = √a, c_b = √(1−b), r_b = √b in float32 arithmetic (§L8). The baseline takes
    c_a from ``np.sqrt(1. − ddim_alphas)`` (numpy), the other roots with torch, as the official code."""
    ta, tb = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    if numpy_ca:
        c_a = float(np.sqrt(np.float32(1.0) - np.float32(a)))
    else:
        c_a = float((1 - ta).sqrt())
    return c_a, float(ta.sqrt()), float((1 - tb).sqrt()), float(tb.sqrt())


class LDMSpace:
    """The S grid points (sampling order) of an ldm run with their float32 ᾱ, plus the end A32[0].

    ``predict(x, i)`` is one evaluation E(x, τ_i) (the model time is the integer τ_i itself);
    ``step(x, ε, i, j)`` is Φ(x, ε; ᾱ(τ_i) → ᾱ(τ_j)) with j = S meaning the end point (§L4).
    """

    def __init__(self, model: NoisePredictor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                 y: Optional[torch.Tensor] = None, numpy_ca: bool = False):
        a32 = torch.as_tensor(alphas_cumprod).to(torch.float32)  # the model's float32 buffer (§L1)
        self.model, self.timesteps, self.y, self.numpy_ca = model, [int(t) for t in timesteps], y, numpy_ca
        self.alpha_bars = [float(a32[t]) for t in self.timesteps] + [float(a32[0])]

    def __len__(self) -> int:
        return len(self.timesteps)

    def predict(self, x: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(self.timesteps[i]), dtype=torch.float64, device=x.device)
        return self.model(x, t, self.y)

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int, j: int) -> torch.Tensor:
        c_a, r_a, c_b, r_b = _f32_roots(self.alpha_bars[i], self.alpha_bars[j], self.numpy_ca)
        x0 = (x - eps * c_a) / r_a           # pred_x0, in the state's precision
        return r_b * x0 + c_b * eps


def sample_ldm_ddim(space: LDMSpace, x: torch.Tensor) -> torch.Tensor:
    """Baseline ``ddim.py::ddim_sampling`` with η = 0 (§L5): S evaluations, the last step to A32[0]."""
    for n in range(len(space)):
        x = space.step(x, space.predict(x, n), n, n + 1)
    return x


def sample_ldm_pfdiff(space: LDMSpace, x: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """``PFDiff_{k}_{h}.py::ddim_sampling`` (§L6) over S points, s = k + 1.

    Regular iteration: springboard x̂ = Φ(x, Q; τ_n → τ_{n+h}) from the buffered ε, Q = E(x̂, τ_{n+h}),
    x ← Φ(x, Q; τ_n → τ_{n+s}). Tails with r = S − n intervals left: r = 3 and s = 4 → springboard at +1
    and a jump to the end ("h1jump3"); r = 1 → a plain DDIM step with a fresh evaluation ("plain1").
    r = 2 with s ≥ 3 is the official stale/undefined-springboard branch: refused, never computed.
    """
    S, s = len(space), k + 1
    if not 1 <= h <= k:
        raise GridError(f"PFDiff needs 1 <= h <= k (got k={k}, h={h})")
    if stale_tail(S, (k, h)):
        raise GridError(f"PFDiff-{k}_{h} on {S} ldm grid points reaches the official stale-springboard tail")
    q = space.predict(x, 0)
    x = space.step(x, q, 0, 1)
    n = 1
    while n <= S - 1:
        r = S - n
        if s == 4 and r == 3:
            x_hat = space.step(x, q, n, n + 1)
            q = space.predict(x_hat, n + 1)
            return space.step(x, q, n, S)
        if r == 1:
            return space.step(x, space.predict(x, n), n, S)
        x_hat = space.step(x, q, n, n + h)  # past ε -> springboard (no NFE)
        q = space.predict(x_hat, n + h)     # future ε at the springboard (1 NFE)
        x = space.step(x, q, n, n + s)      # foresight update from x_n
        n += s
    return x
