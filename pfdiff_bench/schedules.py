"""Noise schedules of the paper's experiments (spec PFDIFF.md §1.1, §2.1, §3; CHECKPOINTS.md §2).

Two kinds of VP schedule, both exposing DPM-Solver's continuous-time view (``t`` in ``[eps, T]``):

* :class:`DiscreteVP` - a table of ᾱ_n, n = 0..N-1 (DDPM linear, improved-DDPM cosine, or any user
  table). The ddim and guided conventions index it by integer timestep (``alpha_bar_at_index``, with
  index -1 meaning ᾱ = 1); DPM-Solver interpolates log α piecewise-linearly in t, with t_n = (n+1)/N.
* :class:`ContinuousVP` - the score-SDE linear VP: log α(t) = -¼t²(β1-β0) - ½tβ0.

Everything is float64; the official code's float32 roundings are emulated where they matter, by the
sampler that needs them (see ``samplers/ddim.py``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from pfdiff_bench.errors import ConfigError

_F64 = torch.float64


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM linear β (``np.linspace(1e-4, 0.02, 1000)`` in float64, spec §1.1)."""
    return torch.from_numpy(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved-DDPM cosine β: ``betas_for_alpha_bar`` with f(u) = cos((u+s)/(1+s)·π/2)², clipped at max_beta."""

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=_F64)


def interpolate(x: torch.Tensor, xp: torch.Tensor, yp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear y(x) through (xp, yp), xp increasing, extended linearly by the end segments.

    Same function as DPM-Solver's ``interpolate_fn`` (spec §2.1), written with ``searchsorted``.
    """
    k = xp.numel()
    idx = torch.searchsorted(xp, x.contiguous(), right=False)
    start = (idx - 1).clamp(0, k - 2)
    x0, x1 = xp[start], xp[start + 1]
    y0, y1 = yp[start], yp[start + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class VPSchedule:
    """Common VP quantities from ``marginal_log_mean_coeff`` (log α_t, DPM-Solver notation)."""

    T: float = 1.0
    t_end_default: float

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def marginal_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR λ_t = log α_t − log σ_t."""
        log_mean = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))
        return log_mean - log_std

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def model_time(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Continuous DPM-Solver time -> the time argument the network receives."""
        raise NotImplementedError

    def alpha_bar_at_model_time(self, u: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """ᾱ seen by a model called with time argument ``u`` (used by the analytic model)."""
        raise NotImplementedError


class DiscreteVP(VPSchedule):
    """A discrete-time VP schedule from a table of β or ᾱ (spec §2.1 'discrete').

    ``log_alpha_array`` is ½·cumsum(log(1−β)) when β are given (as DPM-Solver does), else ½·log ᾱ.
    """

    def __init__(self, betas: Sequence[float] | torch.Tensor | None = None,
                 alphas_cumprod: Sequence[float] | torch.Tensor | None = None, name: str = "custom"):
        if betas is None and alphas_cumprod is None:
            raise ConfigError("a discrete schedule needs 'betas' or 'alphas_cumprod'")
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=_F64).flatten()
            if not bool(((betas > 0) & (betas < 1)).all()):
                raise ConfigError("schedule betas must lie in (0, 1)")
            self.betas = betas
            self.log_alpha_array = 0.5 * torch.cumsum(torch.log1p(-betas), 0)
            self.alphas_cumprod = torch.cumprod(1.0 - betas, 0)
            if alphas_cumprod is not None:  # a given table is used as is (e.g. the fixtures' float64 one)
                self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=_F64).flatten()
        else:
            ac = torch.as_tensor(alphas_cumprod, dtype=_F64).flatten()
            if not bool(((ac > 0) & (ac <= 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()):
                raise ConfigError("schedule alphas_cumprod must be decreasing values in (0, 1]")
            self.alphas_cumprod = ac
            self.betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=_F64), ac[:-1]])
            self.log_alpha_array = 0.5 * torch.log(ac)
        self.name = name
        self.total_N = self.alphas_cumprod.numel()
        if self.total_N < 2:
            raise ConfigError("a discrete schedule needs at least 2 steps")
        self.t_array = torch.arange(1, self.total_N + 1, dtype=_F64) / self.total_N
        self.t_end_default = 1.0 / self.total_N
        # ascending log α for the inverse map
        self._log_alpha_flip = torch.flip(self.log_alpha_array, [0])
        self._t_flip = torch.flip(self.t_array, [0])

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DiscreteVP":
        return cls(betas=linear_betas(num_steps, beta_start, beta_end), name="linear")

    @classmethod
    def ldm_linear(cls, num_steps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> "DiscreteVP":
        """Latent diffusion's "linear" schedule (PFDIFF_LDM.md §L1): β = linspace(√start, √end, N)² in float64,
        ᾱ = cumprod(1 − β) held as the model's float32 buffer A32 (what the ldm sampler and SD's
        DPM-Solver ``NoiseScheduleVP('discrete', alphas_cumprod=A32)`` read)."""
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_steps, dtype=_F64) ** 2
        a32 = torch.cumprod(1.0 - betas, 0).to(torch.float32).to(_F64)
        return cls(alphas_cumprod=a32, name="ldm_linear")

    @classmethod
    def cosine(cls, num_steps: int = 1000) -> "DiscreteVP":
        return cls(betas=cosine_betas(num_steps), name="cosine")

    # --- integer-index view (ddim / guided conventions) ---
    def alpha_bar_at_index(self, n: int) -> float:
        """ᾱ_n for n = 0..N-1; n = -1 is the official end point ᾱ = 1."""
        return 1.0 if n < 0 else float(self.alphas_cumprod[n])

    # --- continuous view (DPM-Solver) ---
    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=_F64)
        return interpolate(t.reshape(-1), self.t_array.to(t.device), self.log_alpha_array.to(t.device)).reshape(t.shape)

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        lamb = torch.as_tensor(lamb, dtype=_F64)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        return interpolate(log_alpha.reshape(-1), self._log_alpha_flip.to(lamb.device),
                           self._t_flip.to(lamb.device)).reshape(lamb.shape)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        # DPM-Solver's discrete model_wrapper: t_input = (t - 1/N) * 1000
        return (torch.as_tensor(t, dtype=_F64) - 1.0 / self.total_N) * 1000.0

    def alpha_bar_at_model_time(self, u: torch.Tensor) -> torch.Tensor:
        """Log-linear interpolation of the ᾱ table at fractional index u (exact at integers)."""
        u = torch.as_tensor(u, dtype=_F64)
        j = torch.clamp(torch.floor(u), 0, self.total_N - 2).long()
        f = u - j.to(_F64)
        ac = self.alphas_cumprod.to(u.device)
        log_ac = torch.log(ac)
        interp = torch.exp((1 - f) * log_ac[j] + f * log_ac[j + 1])
        exact = (f == 0) | (f == 1)  # integer timesteps read the table itself, no exp/log round trip
        return torch.where(exact, ac[j + (f == 1).long()], interp)


class ContinuousVP(VPSchedule):
    """Continuous linear VP-SDE (score_sde, β0 = 0.1, β1 = 20); the model gets ``t * label_scale``."""

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0, label_scale: float = 999.0, t_end: float = 1e-3):
        if not (0 <= beta_0 < beta_1):
            raise ConfigError("continuous VP needs 0 <= beta_0 < beta_1")
        self.beta_0, self.beta_1, self.label_scale = float(beta_0), float(beta_1), float(label_scale)
        self.name = "vp_linear"
        self.t_end_default = float(t_end)

    def marginal_log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=_F64)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lamb: torch.Tensor) -> torch.Tensor:
        lamb = torch.as_tensor(lamb, dtype=_F64)
        tmp = 2.0 * (self.beta_1 - self.beta_0) * torch.logaddexp(-2.0 * lamb, torch.zeros_like(lamb))
        delta = self.beta_0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t, dtype=_F64) * self.label_scale

    def alpha_bar_at_model_time(self, u: torch.Tensor) -> torch.Tensor:
        return torch.exp(2.0 * self.marginal_log_mean_coeff(torch.as_tensor(u, dtype=_F64) / self.label_scale))


def schedule_from_config(cfg: dict) -> VPSchedule:
    """Build a schedule from a config mapping ``{type: linear|cosine|vp_linear|betas|alphas_cumprod, ...}``."""
    kind = cfg.get("type")
    if kind == "linear":
        return DiscreteVP.linear(int(cfg.get("num_steps", 1000)), float(cfg.get("beta_start", 1e-4)),
                                 float(cfg.get("beta_end", 0.02)))
    if kind == "cosine":
        return DiscreteVP.cosine(int(cfg.get("num_steps", 1000)))
    if kind == "vp_linear":
        return ContinuousVP(float(cfg.get("beta_0", 0.1)), float(cfg.get("beta_1", 20.0)),
                            float(cfg.get("label_scale", 999.0)), float(cfg.get("t_end", 1e-3)))
    if kind == "ldm_linear":
        return DiscreteVP.ldm_linear(int(cfg.get("num_steps", 1000)), float(cfg.get("linear_start", 0.00085)),
                                     float(cfg.get("linear_end", 0.012)))
    if kind == "betas":
        return DiscreteVP(betas=cfg["values"])
    if kind == "alphas_cumprod":
        return DiscreteVP(alphas_cumprod=cfg["values"])
    raise ConfigError(f"schedule.type: unknown value {kind!r}; accepted: linear, cosine, vp_linear, betas, "
                      f"alphas_cumprod, ldm_linear")
