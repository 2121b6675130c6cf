"""Classifier-free guidance as one batched network call (spec PFDIFF_LDM.md §L3, §L10).

The official latent-diffusion samplers (``p_sample_ddim`` / PFDiff's ``my_model``) and DPM-Solver's
classifier-free ``model_wrapper`` evaluate the unconditional and the conditional branch together::

    out = model(cat([x, x]), cat([t, t]), cat([uc, c]));  ε_u, ε_c = out.chunk(2)
    ε = ε_u + s·(ε_c − ε_u)

one network call (1 NFE) on 2B rows, first half unconditional. With s = 1 (or no ``uc``) the official
script passes no unconditional input and the model runs once on the B conditional rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from pfdiff_bench.models.base import NoisePredictor


class ClassifierFreeEps:
    """A :class:`NoisePredictor` ε(x, t, c) = ε_u + s(ε_c − ε_u) from a conditional ``model(x, t, cond)``.

    ``y`` of each call is the conditional input c (a tensor with one row per sample: labels, text
    embeddings, ...); ``uncond`` is the matching unconditional input uc (same row count).
    """

    def __init__(self, model: NoisePredictor, uncond: Optional[torch.Tensor], scale: float):
        self.model, self.uncond, self.scale = model, uncond, float(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.uncond is None or self.scale == 1.0:
            return self.model(x, t, y)
        if y is None:
            raise ValueError("classifier-free guidance needs the conditional input")
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond, y]))
        e_u, e_c = out.chunk(2)
        return e_u + self.scale * (e_c - e_u)
