"""UniPC (multistep UniP predictor + UniC corrector, variants B(h) = h and B(h) = e^h − 1), as
wl-zhao/UniPC ``uni_pc.py`` (cf9de85) computes it: spec BASELINES.md §2.

The model function is the DPM-Solver one (:class:`~pfdiff_bench.samplers.dpm_solver.DPMModelFn`):
data prediction x0 (``dpmsolver++``, UniPC's ``algorithm_type="data_prediction"``) or noise
prediction ε (``dpmsolver``). Notation follows the paper / official code: h = λ_t − λ_s, hh = ±h,
r_k = (λ_{prev_k} − λ_s)/h, D_k = (m_{prev_k} − m_s)/r_k, B(h) the variant's scaling.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from pfdiff_bench.samplers.dpm_solver import DPMModelFn

VARIANTS = ("bh1", "bh2")


def unipc_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """Order p of each of the ``steps`` updates (warm-up 1..order−1, then ``order``; §2.2). UniPC
    lowers the final orders for every number of steps (DPM-Solver only below 10, §1.4)."""
    out = list(range(1, order))
    for i in range(order, steps + 1):
        out.append(min(order, steps + 1 - i) if lower_order_final else order)
    return out


def unipc_correctors(steps: int, final_corrector: bool = False) -> list[bool]:
    """Whether UniC runs in each update: always, except the last one in the official ``sample()``."""
    return [True] * (steps - 1) + [bool(final_corrector)]


def _f(v) -> float:
    return float(v)


def unipc_update(model_fn: DPMModelFn, x: torch.Tensor, models: Sequence[torch.Tensor], times: Sequence,
                 t: torch.Tensor, order: int, variant: str, use_corrector: bool):
    """One ``multistep_uni_pc_bh_update`` of order p = ``order`` from times[-1] to t (§2.1).

    Returns (x_t, m_t): m_t is the model value at the *predictor* point (the corrector's evaluation,
    1 NFE), reused by the caller as the history value at t; None without the corrector.
    """
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant must be one of {VARIANTS}")
    ns = model_fn.ns
    x0p = model_fn.predict_x0
    s = times[-1]
    m_s = models[-1]
    lam_s, lam_t = _f(ns.marginal_lambda(s)), _f(ns.marginal_lambda(t))
    la_s, la_t = _f(ns.marginal_log_mean_coeff(s)), _f(ns.marginal_log_mean_coeff(t))
    sig_s, sig_t = _f(ns.marginal_std(s)), _f(ns.marginal_std(t))
    alpha_t = math.exp(la_t)
    h = lam_t - lam_s
    rks, D1s = [], []
    for k in range(1, order):
        r_k = (_f(ns.marginal_lambda(times[-(k + 1)])) - lam_s) / h
        rks.append(r_k)
        D1s.append((models[-(k + 1)] - m_s) / r_k)
    rks.append(1.0)
    hh = -h if x0p else h
    h_phi_1 = math.expm1(hh)                    # H_1
    B_h = hh if variant == "bh1" else math.expm1(hh)
    # b_i = H_{i+1}·i!/B, H_{k+1} = H_k/hh − 1/k!  (i = 1..p)
    b, H_k, fact = [], h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        b.append(H_k * fact / B_h)
        fact *= i + 1
        H_k = H_k / hh - 1.0 / fact
    R = torch.tensor([[r ** i for r in rks] for i in range(order)], dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p, rhos_c = [], [0.5]
    else:
        rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
        rhos_c = torch.linalg.solve(R, bt).tolist()
    scale = (alpha_t if x0p else sig_t) * B_h       # α_t·B (x0) or σ_t·B (ε)
    if x0p:
        x_base = (sig_t / sig_s) * x - (alpha_t * h_phi_1) * m_s
    else:
        x_base = math.exp(la_t - la_s) * x - (sig_t * h_phi_1) * m_s
    pred_res = sum(rho * D for rho, D in zip(rhos_p, D1s)) if D1s else None
    x_t = x_base if pred_res is None else x_base - scale * pred_res
    if not use_corrector:
        return x_t, None
    m_t = model_fn(x_t, t)  # evaluated at the predictor point and kept as the history value (§2.1)
    corr_res = sum(rho * D for rho, D in zip(rhos_c[:-1], D1s)) if D1s else 0.0
    x_t = x_base - scale * (corr_res + rhos_c[-1] * (m_t - m_s))
    return x_t, m_t


def sample_unipc(model_fn: DPMModelFn, x: torch.Tensor, timesteps: torch.Tensor, order: int,
                 variant: str = "bh1", lower_order_final: bool = True, final_corrector: bool = False,
                 orders: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``UniPC.sample(method="multistep")`` over an explicit grid τ_0..τ_N (§2.2).

    NFE = N (one call at τ_0, the corrector's at τ_1..τ_{N−1}); N + 1 with ``final_corrector``
    (an extra call at τ_N used only by the last correction, §2.3). Requires N ≥ order.
    """
    steps = len(timesteps) - 1
    if steps < order:
        raise ValueError(f"UniPC order {order} needs at least {order} steps (got {steps})")
    orders = list(orders) if orders is not None else unipc_orders(steps, order, lower_order_final)
    correctors = unipc_correctors(steps, final_corrector)
    models, times = [model_fn(x, timesteps[0])], [timesteps[0]]
    for i in range(1, steps + 1):
        t = timesteps[i]
        x, m = unipc_update(model_fn, x, models, times, t, orders[i - 1], variant, correctors[i - 1])
        if i >= order:  # the history keeps ``order`` entries
            models, times = models[1:], times[1:]
        if i < steps:
            models.append(m if m is not None else model_fn(x, t))
            times.append(t)
    return x
