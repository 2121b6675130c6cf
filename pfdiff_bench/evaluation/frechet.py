"""Fréchet distance between two Gaussians, in float64 (the FID formula).

d² = ‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1 Σ2)^{1/2}). The trace of the matrix square root is
computed from the eigenvalues of √Σ1·Σ2·√Σ1 (symmetric PSD, so no complex parts and no scipy),
which equals tr((Σ1Σ2)^{1/2}).
"""

from __future__ import annotations

import torch


def _clean(vals: torch.Tensor) -> torch.Tensor:
    """Eigenvalues at round-off level of the largest (rank-deficient covariances, e.g. fewer samples than
    dimensions) are zero; without this their square roots (~1e-8 each) add up to a spurious distance."""
    tol = vals.numel() * torch.finfo(vals.dtype).eps * vals.abs().max().clamp_min(1e-300)
    return torch.where(vals > tol, vals, torch.zeros_like(vals))


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * _clean(vals).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = (torch.as_tensor(v, dtype=torch.float64).reshape(-1) for v in (mu1, mu2))
    s1, s2 = (torch.as_tensor(v, dtype=torch.float64) for v in (sigma1, sigma2))
    s1, s2 = (s.reshape(1, 1) if s.dim() == 0 else s for s in (s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"statistics shapes disagree: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = _clean(torch.linalg.eigvalsh((inner + inner.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)
