"""First-order (DDIM) transitions in the two official spaces, over an explicit integer grid.

A *space* knows the grid (integer model timesteps in sampling order, then the end point ᾱ = 1) and
offers two operations used by both DDIM and PFDiff (spec PFDIFF.md §1, §2.4):

* ``predict(x, i)`` - one network evaluation at grid index i; returns the quantity the buffer holds;
* ``step(x, q, i, j)`` - the DDIM map from grid index i to j carrying the buffered quantity q
  (j may be several intervals ahead; j = len(grid) is the end point ᾱ = 1).

:class:`EpsSpace` is the ddim codebase (buffer = ε, Φ_ε); :class:`X0Space` is guided-diffusion
(buffer = clipped, classifier-guided x̂0', Φ_0 with ε re-derived at the current point and
float32-rounded coefficients).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from pfdiff_bench.models.guidance import x0_coefficients
from pfdiff_bench.models.base import NoisePredictor

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


class _GridSpace:
    def __init__(self, model: NoisePredictor, timesteps: Sequence[int], alpha_bars: Sequence[float],
                 y: Optional[torch.Tensor] = None):
        if len(alpha_bars) != len(timesteps):
            raise ValueError("one ᾱ per grid point is needed")
        self.model, self.timesteps, self.y = model, list(timesteps), y
        self.alpha_bars = [float(a) for a in alpha_bars] + [1.0]  # index len(grid) = the end, ᾱ = 1

    def __len__(self) -> int:
        return len(self.timesteps)

    def _eps(self, x: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), float(self.timesteps[i]), dtype=torch.float64, device=x.device)
        return self.model(x, t, self.y)


class EpsSpace(_GridSpace):
    """ddim codebase: Φ_ε(x, ε; a→b) = √b·(x − √(1−a)ε)/√a + √(1−b)·ε (+ η noise), spec §1.3-1.4."""

    def __init__(self, model, timesteps, alpha_bars, y=None, eta: float = 0.0, noise: Optional[NoiseFn] = None):
        super().__init__(model, timesteps, alpha_bars, y)
        self.eta, self.noise = float(eta), noise or torch.randn_like

    def predict(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self._eps(x, i)

    def step(self, x: torch.Tensor, eps: torch.Tensor, i: int, j: int) -> torch.Tensor:
        a, b = self.alpha_bars[i], self.alpha_bars[j]
        if self.eta == 0.0:  # Φ_ε is linear in (x, ε): two coefficients, one temporary
            ce = math.sqrt(1 - b) - math.sqrt(b) * math.sqrt(1 - a) / math.sqrt(a)
            return torch.add(x * (math.sqrt(b) / math.sqrt(a)), eps, alpha=ce)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        c1 = self.eta * math.sqrt((1 - a / b) * (1 - b) / (1 - a))
        c2 = math.sqrt(max(1 - b - c1 * c1, 0.0))
        return math.sqrt(b) * x0 + c1 * self.noise(x) + c2 * eps


class X0Space(_GridSpace):
    """guided-diffusion: q = x̂0' = R·x − Rm·ε' (ε' guided and clip-rederived by the model adapter);
    Φ_0(x, q; i→j) = √ᾱ_j·q + √(1−ᾱ_j)·(R_i·x − q)/Rm_i, spec §2.4 (float32 coefficients)."""

    def __init__(self, model, timesteps, alpha_bars, y=None, float32_coefficients: bool = True):
        super().__init__(model, timesteps, alpha_bars, y)
        self.float32 = float32_coefficients

    def _coef(self, i: int) -> tuple[float, float]:
        r, rm = x0_coefficients(torch.tensor(self.alpha_bars[i], dtype=torch.float64), self.float32)
        return float(r), float(rm)

    def _target(self, j: int) -> tuple[float, float]:
        b = torch.tensor(self.alpha_bars[j], dtype=torch.float32 if self.float32 else torch.float64)
        return float(torch.sqrt(b)), float(torch.sqrt(1 - b))

    def predict(self, x: torch.Tensor, i: int) -> torch.Tensor:
        r, rm = self._coef(i)
        return r * x - rm * self._eps(x, i)

    def step(self, x: torch.Tensor, x0: torch.Tensor, i: int, j: int) -> torch.Tensor:
        r, rm = self._coef(i)
        sb, s1b = self._target(j)
        return sb * x0 + s1b * ((r * x - x0) / rm)


Callback = Optional[Callable[[str, int, torch.Tensor], None]]


def sample_ddim(space: _GridSpace, x: torch.Tensor, callback: Callback = None) -> torch.Tensor:
    """Plain DDIM: one fresh evaluation per grid point, the last step to ᾱ = 1 (NFE = L), spec §1.3.

    ``callback(kind, j, x)`` (optional) sees each new state with kind "state" at grid index j.
    """
    for i in range(len(space)):
        x = space.step(x, space.predict(x, i), i, i + 1)
        if callback:
            callback("state", i + 1, x)
    return x
