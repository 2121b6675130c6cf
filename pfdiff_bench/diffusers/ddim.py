"""PFDiffScheduler: PFDiff-k_h on the DDIM map as a drop-in diffusers scheduler (ε-, v- or x0-prediction).

Algorithm: spec PFDIFF.md §1.4 (ddim codebase) / PFDIFF_LDM.md L6 (Stable Diffusion), cut at the model
calls as described in :mod:`pfdiff_bench.diffusers.loop`. The buffer Q holds ε (both official ε-space
codebases); v- and x0-predictions are turned into ε at the point the network saw. First-order map
(spec §1, L4, η = 0): Φ(x, ε; a → b) = √b·(x − √(1−a)·ε)/√a + √(1−b)·ε with a, b the ᾱ of the two
grid points; the end point has ᾱ = 1 (``set_alpha_to_one``) or ᾱ_0 (LDM / SD).

Grid: L = (k+1)·N − k points for N = ``num_inference_steps`` network evaluations, spaced by the config's
``timestep_spacing``: the diffusers rules ``leading`` / ``trailing`` / ``linspace`` exactly as
``DDIMScheduler`` spaces L steps, or ``pfdiff`` (the default, the official PFDiff code):
``int(linspace(0, T−1−steps_offset, L)) + steps_offset``. With DDIMScheduler's defaults that is the
ddim codebase grid int(linspace(0, 999, L)) ending at ᾱ = 1 (spec §1.2); with Stable Diffusion's
config (steps_offset 1, set_alpha_to_one False, no timestep_spacing) it is the ldm grid
int(linspace(0, 998, L)) + 1 ending at ᾱ_0 (PFDIFF_LDM.md L2). The ᾱ table is the one diffusers builds
from the config (float32 cumprod, as every diffusers scheduler of that pipeline uses).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput, betas_for_alpha_bar, rescale_zero_terminal_snr
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin

from pfdiff_bench.diffusers.loop import PFDiffCursor, check_variant, grid_length
from pfdiff_bench.errors import ConfigError, GridError

SPACINGS = ("pfdiff", "leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def spaced_timesteps(length: int, num_train_timesteps: int, spacing: str, steps_offset: int) -> list[int]:
    """``length`` integer timesteps in sampling order (descending) for one of :data:`SPACINGS`."""
    T = num_train_timesteps
    if spacing == "pfdiff":      # official PFDiff (ddim-main §1.2 with offset 0, ldm L2 with offset 1)
        ts = [int(v) + steps_offset for v in np.linspace(0, T - 1 - steps_offset, length)][::-1]
    elif spacing == "linspace":  # DDIMScheduler.set_timesteps, same formulas with L steps
        ts = np.linspace(0, T - 1, length).round()[::-1].astype(np.int64).tolist()
    elif spacing == "leading":
        ts = ((np.arange(0, length) * (T // length)).round()[::-1].astype(np.int64) + steps_offset).tolist()
    elif spacing == "trailing":
        # DDIMScheduler's rule; its float arange yields one extra, spurious −1 for some L (e.g. 61): dropped
        ts = (np.round(np.arange(T, 0, -T / length)).astype(np.int64) - 1).tolist()[:length]
    else:
        raise ConfigError(f"unknown timestep_spacing {spacing!r}; accepted: {', '.join(SPACINGS)}")
    return [int(t) for t in ts]


def _check_first_call(timestep, expected) -> None:
    """A run must start at x_T and τ_0 (one host read per run): img2img (strength < 1) would start
    mid-grid, where the PFDiff buffer has no past score."""
    got = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
    if got != float(expected):
        raise GridError(f"PFDiff runs start at the first timestep {expected:g} from pure noise (got {got:g}); "
                        "img2img / strength < 1 is not supported")


class PFDiffScheduler(SchedulerMixin, ConfigMixin):
    """PFDiff-k_h (DDIM map) for any ε-/v-prediction diffusers pipeline; ``num_inference_steps`` = NFE.

    ``pipe.scheduler = PFDiffScheduler.from_config(pipe.scheduler.config, k=2, h=1)``. The pipeline's
    loop is used unchanged: ``timesteps`` lists the N evaluation times, the sample handed to the network
    is the springboard, and ``step`` returns the next springboard (the final sample after call N).
    ``clip_sample`` / ``thresholding`` of a source config are not used: the official ε-space PFDiff
    does not clip. Only η = 0 (deterministic) is implemented.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, set_alpha_to_one: bool = True,
                 steps_offset: int = 0, prediction_type: str = "epsilon", timestep_spacing: str = "pfdiff",
                 rescale_betas_zero_snr: bool = False, k: int = 2, h: int = 1):
        check_variant(k, h)
        if prediction_type not in PREDICTIONS:
            raise ConfigError(f"prediction_type {prediction_type!r} is not supported; "
                              f"accepted: {', '.join(PREDICTIONS)}")
        if timestep_spacing not in SPACINGS:
            raise ConfigError(f"unknown timestep_spacing {timestep_spacing!r}; accepted: {', '.join(SPACINGS)}")
        # ᾱ exactly as DDIMScheduler builds it from the same config
        if trained_betas is not None:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(num_train_timesteps)
        else:
            raise ConfigError(f"unknown beta_schedule {beta_schedule!r}; accepted: linear, scaled_linear, "
                              "squaredcos_cap_v2 (or trained_betas)")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.grid: list[int] = []
        self._cursor: Optional[PFDiffCursor] = None

    # ------------------------------------------------------------------ grid
    def set_timesteps(self, num_inference_steps: int, device=None):
        """Grid of L = (k+1)·N − k points; ``timesteps`` = the N evaluation times (τ_0, τ_{1+h}, ...)."""
        cfg = self.config
        k, h = cfg.k, cfg.h
        length = grid_length(num_inference_steps, k)
        T = cfg.num_train_timesteps
        if length > T:
            raise GridError(f"PFDiff-{k}_{h} with NFE {num_inference_steps} needs a grid of {length} points, more "
                            f"than the {T} training timesteps; NFE values that work: 1..{(T + k) // (k + 1)}")
        grid = spaced_timesteps(length, T, cfg.timestep_spacing, cfg.steps_offset)
        if len(grid) != length or any(b >= a for a, b in zip(grid, grid[1:])) or not 0 <= grid[-1] <= grid[0] < T:
            raise GridError(f"timestep_spacing {cfg.timestep_spacing!r} gives no {length}-point grid of distinct "
                            f"timesteps in [0, {T - 1}] for PFDiff-{k}_{h} at NFE {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self.grid = grid
        # ᾱ per grid index as Python floats (no device sync in step); index L = the end point
        table = self.alphas_cumprod.double()
        self._alpha = [float(table[t]) for t in grid] + [float(self.final_alpha_cumprod)]
        self._cursor = PFDiffCursor(length, k, h)
        self.timesteps = torch.tensor([grid[i] for i in self._cursor.evals], dtype=torch.int64, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # ------------------------------------------------------------------ maps
    def _phi(self, x: torch.Tensor, eps: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """DDIM map Φ(x, ε; ᾱ_i → ᾱ_j), written as the linear combination x·√b/√a + c·ε (spec §1, L4)."""
        a, b = self._alpha[i], self._alpha[j]
        ce = math.sqrt(1 - b) - math.sqrt(b) * math.sqrt(1 - a) / math.sqrt(a)
        return torch.add(x * (math.sqrt(b) / math.sqrt(a)), eps, alpha=ce)

    def _to_eps(self, model_output: torch.Tensor, sample: torch.Tensor, i: int) -> torch.Tensor:
        """ε at the point the network saw (``sample`` at grid index i), whatever the parameterisation."""
        p = self.config.prediction_type
        if p == "epsilon":
            return model_output
        a = self._alpha[i]
        if p == "v_prediction":   # v = √a·ε − √(1−a)·x0  ⇒  ε = √a·v + √(1−a)·x
            return math.sqrt(a) * model_output + math.sqrt(1 - a) * sample
        return (sample - math.sqrt(a) * model_output) / math.sqrt(1 - a)   # x0-prediction

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise=None,
             return_dict: bool = True):
        """Take the prediction at the current springboard; return the next springboard or the final x."""
        c = self._cursor
        if c is None:
            raise GridError("PFDiffScheduler.step() before set_timesteps(); call set_timesteps(num_inference_steps)")
        if eta:
            raise GridError(f"PFDiffScheduler is deterministic (eta = 0); got eta = {eta}")
        if c.j == 0:
            _check_first_call(timestep, int(self.timesteps[0]))
        work = torch.promote_types(sample.dtype, torch.float32)   # the state is kept in at least float32
        i = c.evals[min(c.j, c.nfe - 1)]
        eps = self._to_eps(model_output.to(work), sample.to(work), i)
        out, _ = c.advance(eps, sample.to(work), self._phi)
        out = out.to(sample.dtype)
        if not return_dict:
            return (out,)
        return DDIMSchedulerOutput(prev_sample=out)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
