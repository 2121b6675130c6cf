"""The one interface every sampler sees.

A *noise predictor* is a callable ``eps(x, t, y=None) -> Tensor`` with ``x`` of shape ``[B, C, H, W]``,
``t`` a float tensor ``[B]`` in the model's own time units (integer timestep index 0..999 for the
DDPM/ADM networks, fractional for DPM-Solver's discrete wrapper, ``t*999`` for the continuous VP
schedule), and ``y`` an int64 tensor ``[B]`` of class labels or None. It returns the noise prediction
ε with the shape and dtype of ``x``. Checkpoint quirks (6 output channels, int timesteps, fp16) are the
adapter's business, not the sampler's.

A *classifier gradient* is a callable ``grad_log_p(x, t, y) -> Tensor``: ∇_x log p(y | x_t) at the
same time units (spec PFDIFF.md §3, ``cond_fn`` without the scale).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch


class NoisePredictor(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor: ...


class ClassifierGrad(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...
