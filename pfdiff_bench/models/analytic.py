"""The analytic Gaussian-mixture model: exact ε, class-conditional ε and classifier gradient.

Data p(x0) = Σ_k π_k N(x0; μ_k, s_k² I) in R^D. Forward x_t = √a·x0 + √(1−a)·e with a = ᾱ.
With v_k = a·s_k² + 1 − a (fixtures/samplers/README.md, "toy"):

* posterior weights w_k(x) = softmax_k(log π_k − ‖x − √a μ_k‖²/(2 v_k) − (D/2)·log v_k);
* ε*(x, a) = E[e | x_t] = Σ_k w_k √(1−a)/v_k · (x − √a μ_k);
* ε*(x, a | y) = √(1−a)/v_y · (x − √a μ_y);
* ∇_x log p(y | x_t) = ∇ log w_y = −(x − √a μ_y)/v_y + Σ_k w_k (x − √a μ_k)/v_k.

With equal weights and one std these are exactly the fixture formulas. The exact probability-flow ODE
solution (``reference_solution``) integrates dx̄/dσ̄ = ε*(x, a) in x̄ = x/√a, σ̄ = √((1−a)/a) with
classical RK4 on a log σ̄ grid: the ground truth for the exact error metrics.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

_F64 = torch.float64
REFERENCE_STEPS = 500  # RK4 steps of the exact solution; 1000 steps changes it by < 1e-6


class GaussianMixture:
    """An isotropic Gaussian mixture over tensors of shape ``shape`` (float64)."""

    def __init__(self, means: torch.Tensor, std: float | Sequence[float] = 0.1,
                 weights: Optional[Sequence[float] | torch.Tensor] = None):
        self.means = torch.as_tensor(means, dtype=_F64)
        k = self.means.shape[0]
        self.shape = tuple(self.means.shape[1:])
        self.dim = int(math.prod(self.shape))
        std_t = torch.as_tensor(std, dtype=_F64).reshape(-1)
        self.std = std_t.expand(k).clone() if std_t.numel() == 1 else std_t
        w = torch.full((k,), 1.0 / k, dtype=_F64) if weights is None else torch.as_tensor(weights, dtype=_F64)
        if self.std.numel() != k or w.numel() != k:
            raise ValueError("means, std and weights disagree on the number of components")
        self.weights = w / w.sum()
        self.num_classes = k

    @classmethod
    def random(cls, num_components: int, shape: Sequence[int], std: float = 0.1, scale: float = 0.6,
               seed: int = 0) -> "GaussianMixture":
        """Means drawn uniformly in [−scale, scale] from a fixed seed (the embedded toy default)."""
        g = torch.Generator().manual_seed(seed)
        means = (torch.rand((num_components, *shape), generator=g, dtype=_F64) * 2 - 1) * scale
        return cls(means, std)

    def to(self, device) -> "GaussianMixture":
        out = GaussianMixture.__new__(GaussianMixture)
        out.__dict__.update(self.__dict__)
        out.means, out.std, out.weights = self.means.to(device), self.std.to(device), self.weights.to(device)
        return out

    # ------------------------------------------------------------------ exact quantities
    def _terms(self, x: torch.Tensor, a: torch.Tensor):
        """Per-component residuals r_k = x − √a μ_k, variances v_k and posterior weights w_k."""
        xf = x.reshape(x.shape[0], 1, -1).to(_F64)
        a = a.reshape(-1, 1, 1).to(_F64)
        mu = self.means.reshape(1, self.num_classes, -1).to(x.device)
        s2 = (self.std.to(x.device) ** 2).reshape(1, -1, 1)
        v = a * s2 + 1 - a                                        # [B,K,1]
        r = xf - a.sqrt() * mu                                    # [B,K,D]
        logits = (torch.log(self.weights.to(x.device)).reshape(1, -1)
                  - r.pow(2).sum(-1) / (2 * v[..., 0]) - 0.5 * self.dim * torch.log(v[..., 0]))
        return r, v, torch.softmax(logits, dim=1), a

    def eps(self, x: torch.Tensor, a: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Exact ε* = E[e | x_t] (or the class-conditional ε given component label y; a row with
        label −1 gets the unconditional ε*: the empty prompt of classifier-free guidance)."""
        r, v, w, a = self._terms(x, a)
        per = (1 - a).sqrt() / v * r                              # [B,K,D]
        if y is None:
            out = torch.einsum("bk,bkd->bd", w, per)
        else:
            y = y.to(x.device).long()
            out = per[torch.arange(x.shape[0], device=x.device), y.clamp(min=0)]
            if bool((y < 0).any()):
                out = torch.where((y < 0).reshape(-1, 1), torch.einsum("bk,bkd->bd", w, per), out)
        return out.reshape(x.shape).to(x.dtype)

    def grad_log_p(self, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact ∇_x log p(y | x_t) of the noisy Bayes classifier."""
        r, v, w, _ = self._terms(x, a)
        g = r / v                                                 # ∇ of −logit_k is r_k / v_k
        idx = torch.arange(x.shape[0], device=x.device)
        out = -g[idx, y.to(x.device)] + torch.einsum("bk,bkd->bd", w, g)
        return out.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n exact data samples and their component labels."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.shape), generator=generator, dtype=_F64)
        return self.means[comp] + self.std[comp].reshape(-1, *([1] * len(self.shape))) * noise, comp

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean and covariance of the data distribution (flattened, D and D×D)."""
        mu = self.means.reshape(self.num_classes, -1)
        m = self.weights @ mu
        centred = mu - m
        cov = (centred.T * self.weights) @ centred + torch.eye(self.dim, dtype=_F64) * float(self.weights @ self.std**2)
        return m, cov

    # ------------------------------------------------------------------ exact ODE solution
    def reference_solution(self, x_start: torch.Tensor, a_start: float, a_end: float = 1.0,
                           y: Optional[torch.Tensor] = None, steps: int = REFERENCE_STEPS,
                           sigma_floor: float = 1e-7) -> torch.Tensor:
        """Probability-flow ODE from x at ᾱ = a_start to ᾱ = a_end, to better than 1e-6 (RK4 in log σ̄).

        dx̄/dσ̄ = ε*(√a x̄, a) with a = 1/(1+σ̄²); in ρ = log σ̄: dx̄/dρ = σ̄·ε*. Below ``sigma_floor``
        one exact-to-O(σ̄²) DDIM step finishes the path when a_end = 1.
        """
        x = x_start.to(_F64)
        sig0 = math.sqrt((1 - a_start) / a_start)
        sig1 = math.sqrt(max(1 - a_end, 0.0) / a_end)
        target = max(sig1, sigma_floor)
        xbar = x / math.sqrt(a_start)

        def f(rho: float, xb: torch.Tensor) -> torch.Tensor:
            sig = math.exp(rho)
            a = 1.0 / (1.0 + sig * sig)
            at = torch.full((xb.shape[0],), a, dtype=_F64, device=xb.device)
            return sig * self.eps(xb * math.sqrt(a), at, y)

        if sig0 > target:
            rhos = torch.linspace(math.log(sig0), math.log(target), steps + 1, dtype=_F64).tolist()
            for r0, r1 in zip(rhos[:-1], rhos[1:]):
                hh = r1 - r0
                k1 = f(r0, xbar)
                k2 = f(r0 + hh / 2, xbar + hh / 2 * k1)
                k3 = f(r0 + hh / 2, xbar + hh / 2 * k2)
                k4 = f(r1, xbar + hh * k3)
                xbar = xbar + hh / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if sig1 < target:  # final step to σ̄ = 0 (ᾱ = 1): x̄0 = x̄ − σ̄ ε
            a = 1.0 / (1.0 + target * target)
            at = torch.full((xbar.shape[0],), a, dtype=_F64, device=xbar.device)
            xbar = xbar - (target - sig1) * self.eps(xbar * math.sqrt(a), at, y)
        return xbar * math.sqrt(a_end)


class AnalyticEps:
    """Noise-predictor adapter: model time u -> ᾱ through ``alpha_bar_fn``, then the exact ε."""

    def __init__(self, gmm: GaussianMixture, alpha_bar_fn: Callable[[torch.Tensor], torch.Tensor],
                 class_cond: bool = False):
        self.gmm, self.alpha_bar_fn, self.class_cond = gmm, alpha_bar_fn, class_cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.gmm.eps(x, self.alpha_bar_fn(t), y if self.class_cond else None)


class AnalyticClassifierGrad:
    """Classifier-gradient adapter: the exact ∇_x log p(y | x_t) of the mixture's Bayes classifier."""

    def __init__(self, gmm: GaussianMixture, alpha_bar_fn: Callable[[torch.Tensor], torch.Tensor]):
        self.gmm, self.alpha_bar_fn = gmm, alpha_bar_fn

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gmm.grad_log_p(x, self.alpha_bar_fn(t), y)
