"""Classifier guidance as a noise-predictor adapter (spec PFDIFF.md §2.4, §3, §8).

ε' = ε̃ − √(1−ᾱ_t)·s·∇_x log p_φ(y | x_t), where the classifier sees the same x and time argument
as the network. With ``clip_denoised`` (guided-diffusion's default) ε̃ is re-derived from the clipped
x̂0 = clip((x − √(1−ᾱ)ε)/√ᾱ, −1, 1); without it ε̃ = ε (DPM-Solver's ``model_wrapper``, where
√(1−ᾱ_t) = σ_t).

``float32_coefficients`` emulates guided-diffusion's ``_extract_into_tensor(...).float()``: ᾱ, √(1/ᾱ)
and √(1/ᾱ − 1) are rounded to float32 (roots taken in float64 first) and √(1−ᾱ) is computed in
float32 arithmetic; everything multiplying x, ε or the gradient stays in the input's precision.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from pfdiff_bench.models.base import ClassifierGrad, NoisePredictor


def x0_coefficients(a: torch.Tensor, float32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """R = √(1/ᾱ) and Rm = √(1/ᾱ − 1), optionally rounded to float32 as guided-diffusion does."""
    a64 = a.to(torch.float64)
    r, rm = torch.sqrt(1.0 / a64), torch.sqrt(1.0 / a64 - 1.0)
    if float32:
        r, rm = r.float().double(), rm.float().double()
    return r, rm


def sqrt_one_minus(a: torch.Tensor, float32: bool) -> torch.Tensor:
    """√(1 − ᾱ), in float32 arithmetic on the float32-rounded ᾱ when emulating the official code."""
    if float32:
        return torch.sqrt(1.0 - a.float()).double()
    return torch.sqrt(1.0 - a.to(torch.float64))


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(device=x.device)


class ClassifierGuidedEps:
    """ε' from a noise predictor and a classifier gradient (a :class:`NoisePredictor` itself)."""

    def __init__(self, model: NoisePredictor, classifier_grad: Optional[ClassifierGrad], scale: float,
                 alpha_bar_fn: Callable[[torch.Tensor], torch.Tensor], clip_denoised: bool = False,
                 float32_coefficients: bool = False):
        self.model, self.classifier_grad, self.scale = model, classifier_grad, float(scale)
        self.alpha_bar_fn, self.clip_denoised, self.float32 = alpha_bar_fn, clip_denoised, float32_coefficients

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        with torch.no_grad():  # the UNet never needs a graph, even when the caller enables grad for guidance
            eps = self.model(x, t, y)
        a = self.alpha_bar_fn(t)
        if self.clip_denoised:
            r, rm = (_bcast(c, x) for c in x0_coefficients(a, self.float32))
            x0 = torch.clamp(r * x - rm * eps, -1.0, 1.0)
            eps = (r * x - x0) / rm
        if self.classifier_grad is not None and self.scale != 0.0:
            if y is None:
                raise ValueError("classifier guidance needs class labels y")
            grad = self.classifier_grad(x, t, y)
            eps = eps - _bcast(sqrt_one_minus(a, self.float32), x).to(x.dtype) * (self.scale * grad)
        return eps
