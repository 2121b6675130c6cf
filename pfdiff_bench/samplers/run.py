"""Running a :class:`~pfdiff_bench.samplers.plan.Plan`: :func:`run_sampler` dispatches to the algorithm
functions (first_order, pfdiff, dpm_solver, unipc, deis, ipndm), counts real network calls and checks them against the plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pfdiff_bench.models.base import ClassifierGrad, NoisePredictor
from pfdiff_bench.models.cfg import ClassifierFreeEps
from pfdiff_bench.models.guidance import ClassifierGuidedEps
from pfdiff_bench.samplers.deis import DeisSDE
from pfdiff_bench.samplers.dpm_solver import (DPMModelFn, sample_multistep, sample_pfdiff_singlestep,
                                               sample_singlestep)
from pfdiff_bench.samplers.first_order import EpsSpace, X0Space, sample_ddim
from pfdiff_bench.samplers.ldm import LDMSpace, sample_ldm_ddim, sample_ldm_pfdiff
from pfdiff_bench.samplers.pfdiff import sample_pfdiff
from pfdiff_bench.samplers.plan import Plan
from pfdiff_bench.schedules import DiscreteVP, VPSchedule


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int
    call_t: list[float]
    call_batch: list[int] = field(default_factory=list)  # network batch rows per call (2B for a CFG pair)


class CountingModel:
    """Counts real network calls and records the time argument of each (first element of t) and its
    batch rows (a classifier-free pair is one call of 2B rows)."""

    def __init__(self, model: NoisePredictor):
        self.model, self._t, self.rows = model, [], []

    def __call__(self, x, t, y=None):
        self._t.append(t.reshape(-1)[:1])  # kept on its device: no host sync per call
        self.rows.append(int(x.shape[0]))
        return self.model(x, t, y)

    @property
    def nfe(self) -> int:
        return len(self._t)

    def call_times(self) -> list[float]:
        return torch.cat(self._t).tolist() if self._t else []


def run_sampler(p: Plan, model: NoisePredictor, schedule: VPSchedule, x_T: torch.Tensor,
                y: Optional[torch.Tensor] = None, classifier_grad: Optional[ClassifierGrad] = None,
                guidance_scale: float = 0.0, noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                callback=None, uncond: Optional[torch.Tensor] = None) -> SampleResult:
    """Run plan ``p`` from x_T. The NFE returned is counted from real network calls.

    ``uncond`` (with ``y`` the conditional input): classifier-free guidance at ``guidance_scale`` as one
    batched call per evaluation (models/cfg.py); scale 1 runs the conditional model alone.

    ``callback(kind, j, x)``: per-step hook of the ddim/guided conventions (states and springboards).
    """
    spec = p.spec
    counter = CountingModel(model)
    alpha_fn = schedule.alpha_bar_at_model_time
    # ᾱ per grid point of the integer-grid conventions (none for dpm_solver's continuous grid)
    alphas = [schedule.alpha_bar_at_index(int(t)) for t in p.timesteps] if spec.convention == "ddim" else None
    if spec.convention == "guided":
        # guided-diffusion clips x̂0, re-derives ε, then applies condition_score (spec §2.4), with the
        # respaced diffusion's own ᾱ table
        alphas = respaced_alpha_bars(schedule, p.timesteps)
        alpha_fn = _lookup(p.timesteps, alphas, schedule.total_N)
        eps_fn = ClassifierGuidedEps(counter, classifier_grad, guidance_scale, alpha_fn,
                                     clip_denoised=spec.clip_denoised,
                                     float32_coefficients=spec.float32_coefficients)
    elif uncond is not None:
        eps_fn = ClassifierFreeEps(counter, uncond, guidance_scale)
    elif classifier_grad is not None and guidance_scale != 0.0:
        eps_fn = ClassifierGuidedEps(counter, classifier_grad, guidance_scale, alpha_fn)
    else:
        eps_fn = counter
    with torch.no_grad():  # classifier adapters enable autograd for their own gradient
        x = _dispatch(p, eps_fn, schedule, alphas, x_T, y, noise, callback)
    if counter.nfe != p.nfe:
        raise AssertionError(f"{spec.label()} made {counter.nfe} network calls, planned {p.nfe}")
    return SampleResult(x.detach(), counter.nfe, counter.call_times(), counter.rows)


def respaced_alpha_bars(schedule: DiscreteVP, timesteps: list) -> list[float]:
    """ᾱ of a respaced diffusion as ``SpacedDiffusion`` rebuilds it: β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_(i−1)}, then
    cumprod(1 − β') in float64 (equal to the table up to rounding, which float32 coefficients can feel)."""
    asc = sorted(int(t) for t in timesteps)
    out, last, prod = {}, 1.0, 1.0
    for t in asc:
        a = schedule.alpha_bar_at_index(t)
        prod *= 1.0 - (1.0 - a / last)
        last = a
        out[t] = prod
    return [out[int(t)] for t in timesteps]


def _lookup(timesteps: list, alpha_bars: list[float], size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """ᾱ of integer model times through a dense table indexed on the tensor's own device (no host sync)."""
    dense = torch.full((size,), float("nan"), dtype=torch.float64)
    dense[torch.tensor([int(t) for t in timesteps])] = torch.tensor(alpha_bars, dtype=torch.float64)
    cache: dict = {}

    def alpha_fn(t: torch.Tensor) -> torch.Tensor:
        table = cache.setdefault(t.device, dense.to(t.device))
        return table[t.long()]
    return alpha_fn


def _dispatch(p: Plan, eps_fn, schedule, alphas, x_T, y, noise, callback=None):
    spec = p.spec
    if spec.convention == "ldm":
        space = LDMSpace(eps_fn, p.timesteps, schedule.alphas_cumprod, y, numpy_ca=spec.pfdiff is None)
        return sample_ldm_ddim(space, x_T) if spec.pfdiff is None else sample_ldm_pfdiff(space, x_T, *spec.pfdiff)
    if spec.convention in ("ddim", "guided"):
        if spec.convention == "ddim":
            space = EpsSpace(eps_fn, p.timesteps, alphas, y, eta=spec.eta, noise=noise)
        else:
            space = X0Space(eps_fn, p.timesteps, alphas, y, float32_coefficients=spec.float32_coefficients)
        if spec.pfdiff is None:
            return sample_ddim(space, x_T, callback)
        return sample_pfdiff(space, x_T, *spec.pfdiff, tails=spec.convention == "ddim", callback=callback)
    if spec.convention == "deis":
        from pfdiff_bench.samplers.deis import sample_tab_deis
        from pfdiff_bench.samplers.ipndm import sample_ipndm

        sde = DeisSDE(schedule)
        fn = (lambda x, u: eps_fn(x, u, y))  # noqa: E731
        sample = sample_tab_deis if spec.solver == "deis" else sample_ipndm
        return sample(fn, x_T, sde, p.timesteps, spec.order)
    model_fn = DPMModelFn(eps_fn, schedule, spec.algorithm, y)
    ts = torch.tensor(p.timesteps, dtype=torch.float64)
    if spec.solver == "unipc":
        from pfdiff_bench.samplers.unipc import sample_unipc

        return sample_unipc(model_fn, x_T, ts, spec.order, spec.variant, spec.lower_order_final,
                            spec.final_corrector, p.orders)
    if spec.method == "multistep":
        return sample_multistep(model_fn, x_T, ts, spec.order, spec.lower_order_final)
    if spec.pfdiff is None:
        return sample_singlestep(model_fn, x_T, ts, p.orders, spec.grid)
    return sample_pfdiff_singlestep(model_fn, x_T, ts, p.orders, spec.grid, *spec.pfdiff)
