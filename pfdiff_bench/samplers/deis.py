"""tAB-DEIS as qsh-zh/deis ``th_deis`` (a30709f) computes it: spec BASELINES.md §4.1-4.3, §4.6.

DEIS works in its own time τ with ᾱ(τ) directly: the discrete SDE (``DiscreteVPSDE``) interpolates
the ᾱ table **linearly** in the timestep index (τ ∈ [0, 999]); the continuous one is the linear VP
(τ ∈ [1e-3, 1]). Samplers are plain functions over an explicit decreasing grid τ_0..τ_N that take
an ε predictor ``eps_fn(x, u)`` called with the model time u (:func:`model_time`); NFE = N.

The grid and quadrature nodes follow the float evaluation order of the official JAX run (fused
multiply-adds, §4.6) so that nodes that are integers in exact arithmetic fall on the same side of
the jump of the discrete ᾱ slope as in the official code.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Optional, Sequence

import torch

from pfdiff_bench.errors import GridError
from pfdiff_bench.schedules import ContinuousVP, DiscreteVP, VPSchedule

DEIS_GRIDS = ("t", "log", "rho")
DEFAULT_TS_ORDER = {"t": 2.0, "log": None, "rho": 7.0}   # the DEIS README's t/2 and the EDM ρ = 7
QUADRATURE_POINTS = 10000
_F64 = torch.float64


def fma(a: float, b: float, c: float) -> float:
    """a·b + c with one rounding (``math.fma`` is Python ≥ 3.13; exact emulation otherwise)."""
    if hasattr(math, "fma"):
        return math.fma(a, b, c)
    return float(Fraction(a) * Fraction(b) + Fraction(c))


class DeisSDE:
    """ᾱ(τ), d log ᾱ/dτ and the inverse ᾱ → τ of ``DiscreteVPSDE`` / ``VPSDE`` (§4.1)."""

    def __init__(self, schedule: VPSchedule):
        self.schedule = schedule
        if isinstance(schedule, DiscreteVP):
            self.discrete = True
            self.a = schedule.alphas_cumprod.to(_F64)
            self.n = self.a.numel()
            self.T, self.eps = float(self.n - 1), 0.0
            self.b = 2.0 - self.a       # increasing abscissae of the inverse map
        elif isinstance(schedule, ContinuousVP):
            self.discrete = False
            self.beta_0, self.beta_1 = schedule.beta_0, schedule.beta_1
            self.T, self.eps = 1.0, float(schedule.t_end_default)
        else:  # pragma: no cover - only the two schedule kinds exist
            raise GridError(f"DEIS needs a discrete or linear VP schedule, not {type(schedule).__name__}")

    def _segment(self, tau: torch.Tensor) -> torch.Tensor:
        # searchsorted(arange(n), τ, side="right") clipped to [1, n−1]
        return torch.clamp(torch.floor(tau).long() + 1, 1, self.n - 1)

    def alpha_bar(self, tau: torch.Tensor) -> torch.Tensor:
        tau = torch.as_tensor(tau, dtype=_F64)
        if not self.discrete:
            return torch.exp(2.0 * (-0.25 * tau ** 2 * (self.beta_1 - self.beta_0) - 0.5 * tau * self.beta_0))
        i = self._segment(tau)
        a0, a1 = self.a[i - 1], self.a[i]
        return torch.clamp(a0 + (tau - (i - 1).to(_F64)) * (a1 - a0), 1e-7, 1 - 1e-7)

    def d_log_alpha_bar(self, tau: torch.Tensor) -> torch.Tensor:
        tau = torch.as_tensor(tau, dtype=_F64)
        if not self.discrete:
            return -(tau * (self.beta_1 - self.beta_0) + self.beta_0)
        i = self._segment(tau)
        return (self.a[i] - self.a[i - 1]) / self.alpha_bar(tau)

    def inverse(self, abar: torch.Tensor) -> torch.Tensor:
        abar = torch.as_tensor(abar, dtype=_F64)
        if not self.discrete:
            A, B, C = 0.25 * (self.beta_1 - self.beta_0), 0.5 * self.beta_0, 0.5 * torch.log(abar)
            return (-B + torch.sqrt(B * B - 4.0 * A * C)) / 2.0 / A
        v = 2.0 - abar
        j = torch.clamp(torch.searchsorted(self.b, v.contiguous(), right=True), 1, self.n - 1)
        tau = (j - 1).to(_F64) + (v - self.b[j - 1]) / (self.b[j] - self.b[j - 1])
        return torch.clamp(tau, 0.0, self.T)

    def psi(self, tau_a, tau_b) -> torch.Tensor:
        """ψ(τ_a, τ_b) = √(ᾱ(τ_b)/ᾱ(τ_a)), the linear part of the exponential integrator."""
        return torch.sqrt(self.alpha_bar(tau_b) / self.alpha_bar(tau_a))

    def eps_integrand(self, tau: torch.Tensor) -> torch.Tensor:
        """E(τ) = −½·(d log ᾱ/dτ)/√(1 − ᾱ(τ))."""
        return -0.5 * self.d_log_alpha_bar(tau) / torch.sqrt(1.0 - self.alpha_bar(tau))

    def rho(self, tau) -> torch.Tensor:
        a = self.alpha_bar(tau)
        return torch.sqrt((1.0 / a) * (1.0 - a))

    def tau_of_rho(self, rho: torch.Tensor) -> torch.Tensor:
        return self.inverse(1.0 / (rho ** 2 + 1.0))

    def model_time(self, tau) -> torch.Tensor:
        """What the network receives: τ itself (a fractional timestep index) or the score-SDE label."""
        tau = torch.as_tensor(tau, dtype=_F64)
        return tau if self.discrete else tau * self.schedule.label_scale


def _lin(a: float, b: float, n: int) -> list[float]:
    """``linspace(a, b, n + 1)`` as XLA evaluates it: a·(1 − j·c) + j·(b·c), c = fl(1/n), two FMAs (§4.6)."""
    c = 1.0 / n
    return [fma(a, fma(-float(j), c, 1.0), float(j) * (b * c)) for j in range(n)] + [float(b)]


def deis_time_steps(sde: DeisSDE, grid: str, n: int, ts_order: Optional[float] = None,
                    t_start: Optional[float] = None, t_end: Optional[float] = None) -> list[float]:
    """``get_rev_ts(sde, N, ts_order, ts_phase)``: N + 1 decreasing DEIS times from T to ε (§4.2).

    The discrete branch keeps the fractional grid: the official code replaces it by an integer one
    only when truncation gives duplicates, which never happens for N ≤ 500 on 1000 steps.
    """
    if n < 1:
        raise GridError("a DEIS grid needs at least one step")
    T = sde.T if t_start is None else float(t_start)
    eps = sde.eps if t_end is None else float(t_end)
    if grid == "t":
        k = float(ts_order if ts_order is not None else DEFAULT_TS_ORDER["t"])
        ts = [v ** k for v in _lin(T ** (1.0 / k), eps ** (1.0 / k), n)]
    elif grid == "log":
        r_T, r_e = float(sde.rho(T)), float(sde.rho(eps))
        rhos = torch.exp(torch.tensor(_lin(math.log(r_T), math.log(r_e), n), dtype=_F64))
        ts = sde.tau_of_rho(rhos).tolist()
    elif grid == "rho":
        k = float(ts_order if ts_order is not None else DEFAULT_TS_ORDER["rho"])
        a, b = float(sde.rho(T)) ** (1.0 / k), float(sde.rho(eps)) ** (1.0 / k)
        rhos = torch.tensor([(a + (j / n) * (b - a)) ** k for j in range(n + 1)], dtype=_F64)
        ts = sde.tau_of_rho(rhos).tolist()
    else:
        raise GridError(f"unknown DEIS grid {grid!r}; accepted: {', '.join(DEIS_GRIDS)}")
    if sde.discrete and len({int(v) for v in ts}) != len(ts):
        # the official code would switch to an integer grid here (§4.2); not reproduced
        raise GridError(f"{n} DEIS steps on a {sde.n}-step table repeat integer timesteps; use fewer steps")
    return ts


def _nodes(tau_a: float, tau_b: float, m: int, discrete: bool) -> torch.Tensor:
    """``linspace(τ_a, τ_b, M, endpoint=False)`` with the official FMA rounding where it matters (§4.6)."""
    c = 1.0 / m
    j = torch.arange(m, dtype=_F64)
    u = tau_a * (1.0 - j * c) + j * (tau_b * c)
    if discrete:  # only nodes next to an integer can land on the other side of a slope jump
        near = ((u - torch.round(u)).abs() < 1e-9).nonzero().flatten().tolist()
        for idx in near:
            u[idx] = fma(tau_a, fma(-float(idx), c, 1.0), float(idx) * (tau_b * c))
    return u


def tab_orders(steps: int, order: int) -> list[int]:
    """Polynomial degree of each step: q_i = min(i, r) (warm-up 0, 1, ..., r; §4.3)."""
    return [min(i, order) for i in range(steps)]


def tab_coefficients(sde: DeisSDE, ts: Sequence[float], order: int,
                     points: int = QUADRATURE_POINTS) -> list[tuple[float, list[float]]]:
    """Per step i: (ψ(τ_i, τ_{i+1}), [C_{i,0}, ..., C_{i,q}]), the exact-integrator weights of the
    Lagrange-extrapolated ε, integrated by the official left Riemann sum of ``points`` nodes (§4.3)."""
    out = []
    for i, q in enumerate(tab_orders(len(ts) - 1, order)):
        a, b = float(ts[i]), float(ts[i + 1])
        u = _nodes(a, b, points, sde.discrete)
        base = sde.psi(u, torch.tensor(b, dtype=_F64)) * sde.eps_integrand(u)
        delta = (b - a) / points
        knots = [float(ts[i - k]) for k in range(q + 1)]
        coefs = []
        for lj in range(q + 1):
            ell = torch.ones_like(u)
            for k in range(q + 1):
                if k != lj:
                    ell = ell * (u - knots[k]) / (knots[lj] - knots[k])
            coefs.append(float((base * ell).sum()) * delta)
        out.append((float(sde.psi(a, b)), coefs))
    return out


def sample_tab_deis(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                    sde: DeisSDE, ts: Sequence[float], order: int) -> torch.Tensor:
    """tAB-DEIS of ``ab_order`` r over the grid ``ts`` (§4.3): one ε call per step, NFE = N.

    ``eps_fn(x, u)`` gets the model time u (a batch-shaped float64 tensor).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"tAB-DEIS order must be 1, 2 or 3 (got {order})")
    coefs = tab_coefficients(sde, ts, order)
    hist: list[torch.Tensor] = []
    for i, (psi, cs) in enumerate(coefs):
        hist = ([call_eps(eps_fn, sde, x, ts[i])] + hist)[:order + 1]   # newest first: ε_i, ε_{i−1}, ...
        x = psi * x + sum(c * e for c, e in zip(cs, hist))
    return x


def call_eps(eps_fn, sde: DeisSDE, x: torch.Tensor, tau: float) -> torch.Tensor:
    """One ε evaluation at DEIS time τ (the network gets the model time, one per sample)."""
    u = sde.model_time(torch.tensor(float(tau), dtype=_F64)).reshape(()).expand(x.shape[0]).to(x.device)
    return eps_fn(x, u)
