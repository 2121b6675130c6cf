"""DPM-Solver / DPM-Solver++ (singlestep orders 1-3, multistep), and PFDiff as the official
DPM-Solver copies compute it (spec PFDIFF.md §2.1-2.3, §8). Notation follows the DPM-Solver paper:
h = λ_t − λ_s, r1/r2 inner-step ratios, m the model value (ε for 'dpmsolver', x0 for 'dpmsolver++').

All functions take a ``model_fn(x, t)`` in continuous time t (see :class:`DPMModelFn`) and a VP
schedule ``ns``; times are float64 scalars.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pfdiff_bench.grids import dpm_processed_steps, dpm_time_steps
from pfdiff_bench.models.base import NoisePredictor
from pfdiff_bench.schedules import VPSchedule

ALGORITHMS = ("dpmsolver", "dpmsolver++")


class DPMModelFn:
    """DPM-Solver's ``model_wrapper`` + ``model_fn``: continuous t -> model time -> ε or x0 = (x − σε)/α."""

    def __init__(self, model: NoisePredictor, ns: VPSchedule, algorithm: str, y: Optional[torch.Tensor] = None):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}")
        self.model, self.ns, self.y = model, ns, y
        self.predict_x0 = algorithm == "dpmsolver++"

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        u = self.ns.model_time(t).reshape(()).expand(x.shape[0]).to(x.device)
        eps = self.model(x, u, self.y)
        if not self.predict_x0:
            return eps
        return (x - self.ns.marginal_std(t).item() * eps) / self.ns.marginal_alpha(t).item()


def _f(v: torch.Tensor) -> float:
    return float(v)


# ----------------------------------------------------------------------------- singlestep updates
def singlestep_update(model_fn: DPMModelFn, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, order: int,
                      r1: Optional[float] = None, r2: Optional[float] = None,
                      buffer: Optional[Sequence[torch.Tensor]] = None):
    """One singlestep DPM-Solver(-++) update of ``order`` from s to t (spec §2.2).

    Without ``buffer`` the stage values are evaluated fresh and ``(x_t, [m_s, m_s1, m_s2][:order])`` is
    returned. With a buffer (PFDiff's ``model_buffer``) every stage value is taken from it, no model
    call is made, and only x_t is returned (spec §2.3 item 1).
    """
    ns = model_fn.ns
    lam_s, lam_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
    h = _f(lam_t - lam_s)
    la_s, la_t = _f(ns.marginal_log_mean_coeff(s)), _f(ns.marginal_log_mean_coeff(t))
    sig_s, sig_t = _f(ns.marginal_std(s)), _f(ns.marginal_std(t))
    alpha_t = float(torch.exp(torch.tensor(la_t, dtype=torch.float64)))
    x0p = model_fn.predict_x0
    fresh = buffer is None

    def stage(i: int, xi: Optional[torch.Tensor], ti) -> torch.Tensor:
        return model_fn(xi, ti) if fresh else buffer[i]

    def inner(r: float):
        ti = ns.inverse_lambda(lam_s + r * h)
        return ti, _f(ns.marginal_log_mean_coeff(ti)), _f(ns.marginal_std(ti))

    em = torch.expm1
    T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    m_s = stage(0, x, s)
    if order == 1:
        if x0p:
            x_t = (sig_t / sig_s) * x - (alpha_t * _f(em(T(-h)))) * m_s
        else:
            x_t = _f(torch.exp(T(la_t - la_s))) * x - (sig_t * _f(em(T(h)))) * m_s
        stages = [m_s]
    elif order == 2:
        r1 = 0.5 if r1 is None else r1
        s1, la_s1, sig_s1 = inner(r1)
        alpha_s1 = _f(torch.exp(T(la_s1)))
        if x0p:
            phi_11, phi_1 = _f(em(T(-r1 * h))), _f(em(T(-h)))
            x_s1 = (sig_s1 / sig_s) * x - (alpha_s1 * phi_11) * m_s
            m_s1 = stage(1, x_s1, s1)
            x_t = (sig_t / sig_s) * x - (alpha_t * phi_1) * m_s - (0.5 / r1) * (alpha_t * phi_1) * (m_s1 - m_s)
        else:
            phi_11, phi_1 = _f(em(T(r1 * h))), _f(em(T(h)))
            x_s1 = _f(torch.exp(T(la_s1 - la_s))) * x - (sig_s1 * phi_11) * m_s
            m_s1 = stage(1, x_s1, s1)
            x_t = (_f(torch.exp(T(la_t - la_s))) * x - (sig_t * phi_1) * m_s
                   - (0.5 / r1) * (sig_t * phi_1) * (m_s1 - m_s))
        stages = [m_s, m_s1]
    elif order == 3:
        r1 = 1.0 / 3.0 if r1 is None else r1
        r2 = 2.0 / 3.0 if r2 is None else r2
        s1, la_s1, sig_s1 = inner(r1)
        s2, la_s2, sig_s2 = inner(r2)
        alpha_s1, alpha_s2 = _f(torch.exp(T(la_s1))), _f(torch.exp(T(la_s2)))
        if x0p:
            phi_11, phi_12, phi_1 = _f(em(T(-r1 * h))), _f(em(T(-r2 * h))), _f(em(T(-h)))
            phi_22 = _f(em(T(-r2 * h))) / (r2 * h) + 1.0
            phi_2 = phi_1 / h + 1.0
            x_s1 = (sig_s1 / sig_s) * x - (alpha_s1 * phi_11) * m_s
            m_s1 = stage(1, x_s1, s1)
            x_s2 = ((sig_s2 / sig_s) * x - (alpha_s2 * phi_12) * m_s
                    + r2 / r1 * (alpha_s2 * phi_22) * (m_s1 - m_s))
            m_s2 = stage(2, x_s2, s2)
            x_t = (sig_t / sig_s) * x - (alpha_t * phi_1) * m_s + (1.0 / r2) * (alpha_t * phi_2) * (m_s2 - m_s)
        else:
            phi_11, phi_12, phi_1 = _f(em(T(r1 * h))), _f(em(T(r2 * h))), _f(em(T(h)))
            phi_22 = _f(em(T(r2 * h))) / (r2 * h) - 1.0
            phi_2 = phi_1 / h - 1.0
            x_s1 = _f(torch.exp(T(la_s1 - la_s))) * x - (sig_s1 * phi_11) * m_s
            m_s1 = stage(1, x_s1, s1)
            x_s2 = (_f(torch.exp(T(la_s2 - la_s))) * x - (sig_s2 * phi_12) * m_s
                    - r2 / r1 * (sig_s2 * phi_22) * (m_s1 - m_s))
            m_s2 = stage(2, x_s2, s2)
            x_t = (_f(torch.exp(T(la_t - la_s))) * x - (sig_t * phi_1) * m_s
                   - (1.0 / r2) * (sig_t * phi_2) * (m_s2 - m_s))
        stages = [m_s, m_s1, m_s2]
    else:
        raise ValueError(f"solver order must be 1, 2 or 3 (got {order})")
    return (x_t, stages) if fresh else x_t


def inner_ratios(ns: VPSchedule, skip_type: str, s: torch.Tensor, t: torch.Tensor, order: int):
    """r1, r2 of an update from s to t: λ-fractions of ``get_time_steps(skip_type, s, t, order)`` (spec §2.2)."""
    if order <= 1:
        return None, None
    lam = ns.marginal_lambda(dpm_time_steps(ns, skip_type, float(s), float(t), order))
    h = lam[-1] - lam[0]
    r1 = float((lam[1] - lam[0]) / h)
    r2 = float((lam[2] - lam[0]) / h) if order >= 3 else None
    return r1, r2


def _update(model_fn, skip_type, x, s, t, order, buffer=None):
    r1, r2 = inner_ratios(model_fn.ns, skip_type, s, t, order)
    return singlestep_update(model_fn, x, s, t, order, r1, r2, buffer)


# ----------------------------------------------------------------------------- samplers
def sample_singlestep(model_fn: DPMModelFn, x: torch.Tensor, timesteps: torch.Tensor, orders: Sequence[int],
                      skip_type: str) -> torch.Tensor:
    """Singlestep DPM-Solver over the outer grid with per-interval orders (NFE = Σ orders)."""
    for i, order in enumerate(orders):
        x, _ = _update(model_fn, skip_type, x, timesteps[i], timesteps[i + 1], order)
    return x


def sample_pfdiff_singlestep(model_fn: DPMModelFn, x: torch.Tensor, timesteps: torch.Tensor,
                             orders: Sequence[int], skip_type: str, k: int, h: int) -> torch.Tensor:
    """PFDiff inside the official DPM-Solver copies (spec §2.3; NOT the Fig. 2 rule).

    Springboard: p = s − h intervals with the previous update's stage values (no NFE); then a fresh
    update of ``orders[n]`` from the springboard over the remaining h intervals. The caller must have
    checked that (K − 1) % s == 0, else the official code stops early on a noisy sample.
    """
    s = k + 1
    p = s - h
    steps = dpm_processed_steps(list(orders), (k, h))
    buffer = None
    for n in steps:
        order = orders[n]
        if n == 0:
            x, buffer = _update(model_fn, skip_type, x, timesteps[0], timesteps[1], order)
        else:
            x_hat = _update(model_fn, skip_type, x, timesteps[n], timesteps[n + p], order, buffer=buffer)
            x, buffer = _update(model_fn, skip_type, x_hat, timesteps[n + p], timesteps[n + s], order)
    return x


def multistep_update(model_fn: DPMModelFn, x: torch.Tensor, models: list, times: list, t: torch.Tensor,
                     order: int) -> torch.Tensor:
    """Multistep DPM-Solver(-++) update of ``order`` from times[-1] to t (spec §8)."""
    ns = model_fn.ns
    if order == 1:
        return singlestep_update(model_fn, x, times[-1], t, 1, buffer=[models[-1]])
    lam = [float(ns.marginal_lambda(v)) for v in times[-order:]] + [float(ns.marginal_lambda(t))]
    p0 = times[-1]
    la_p0, la_t = float(ns.marginal_log_mean_coeff(p0)), float(ns.marginal_log_mean_coeff(t))
    sig_p0, sig_t = float(ns.marginal_std(p0)), float(ns.marginal_std(t))
    alpha_t = float(torch.exp(torch.tensor(la_t, dtype=torch.float64)))
    h = lam[-1] - lam[-2]
    h0 = lam[-2] - lam[-3]
    r0 = h0 / h
    m0, m1 = models[-1], models[-2]
    D1_0 = (1.0 / r0) * (m0 - m1)
    em = lambda v: float(torch.expm1(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
    if model_fn.predict_x0:
        phi_1 = em(-h)
        base = (sig_t / sig_p0) * x - (alpha_t * phi_1) * m0
    else:
        phi_1 = em(h)
        base = float(torch.exp(torch.tensor(la_t - la_p0, dtype=torch.float64))) * x - (sig_t * phi_1) * m0
    scale = alpha_t if model_fn.predict_x0 else sig_t
    if order == 2:
        return base - 0.5 * (scale * phi_1) * D1_0
    if order != 3:
        raise ValueError(f"solver order must be 1, 2 or 3 (got {order})")
    h1 = lam[-3] - lam[-4]
    r1 = h1 / h
    D1_1 = (1.0 / r1) * (m1 - models[-3])
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    if model_fn.predict_x0:
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return base + (alpha_t * phi_2) * D1 - (alpha_t * phi_3) * D2
    phi_2 = phi_1 / h - 1.0
    phi_3 = phi_2 / h - 0.5
    return base - (sig_t * phi_2) * D1 - (sig_t * phi_3) * D2


def multistep_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """Order of each multistep update: warm-up 1..order−1, then ``order``; the final orders are
    lowered only when steps < 10 (this DPM-Solver's rule, spec §8 / BASELINES.md §3)."""
    out = list(range(1, order))
    for j in range(order, steps + 1):
        out.append(min(order, steps + 1 - j) if (lower_order_final and steps < 10) else order)
    return out


def sample_multistep(model_fn: DPMModelFn, x: torch.Tensor, timesteps: torch.Tensor, order: int,
                     lower_order_final: bool = True) -> torch.Tensor:
    """Multistep DPM-Solver(-++) with lower-order warm-up (spec §8). NFE = steps = len(timesteps) − 1.

    ``order=3`` with ``dpmsolver++`` is the DPM-Solver++(3M) baseline (BASELINES.md §3; the newest
    official release computes the same updates; its ``numerical_clip_alpha`` only matters for tables
    with λ < −5.1, e.g. the cosine schedule, and is not applied here).

    Only the last ``order`` model values are kept (the official history list), never the trajectory.
    """
    steps = len(timesteps) - 1
    models = [model_fn(x, timesteps[0])]
    times = [timesteps[0]]
    for j in range(1, order):
        x = multistep_update(model_fn, x, models, times, timesteps[j], j)
        models.append(model_fn(x, timesteps[j]))
        times.append(timesteps[j])
    for j in range(order, steps + 1):
        # this DPM-Solver copy lowers the final orders only when steps < 10 (spec §8)
        step_order = min(order, steps + 1 - j) if (lower_order_final and steps < 10) else order
        x = multistep_update(model_fn, x, models, times, timesteps[j], step_order)
        times = times[1:] + [timesteps[j]]
        models = models[1:] + [models[-1]]
        if j < steps:
            models[-1] = model_fn(x, timesteps[j])
    return x
