"""PFDiffFlowMatchEulerScheduler: PFDiff-k_h on the Euler map for flow-matching pipelines (SD3, FLUX).

Spec PFDIFF.md §6 (the official FLUX patch): a grid of L = N·(k+1) − k sigmas (plus the terminal
σ = 0); call 0 is an Euler step with a fresh velocity, buffered; every later call evaluates the velocity
at the springboard Euler(x_n, v_buf; σ_n → σ_{n+h}) (timestep ``timesteps[n+h]`` of the L-point
schedule) and makes the foresight update Euler(x_n, v; σ_n → σ_{n+k+1}); the run ends when it lands on
σ_L. Euler(x, v; σ_a → σ_b) = x + (σ_b − σ_a)·v, computed in float32 and cast back to the model's dtype
as FlowMatchEulerDiscreteScheduler (and the official patch) do.

The L sigmas are built by FlowMatchEulerDiscreteScheduler itself with the pipeline's shifting kept
(static ``shift``, resolution-dependent ``mu``, ``shift_terminal``, karras/exponential/beta sigmas):
exactly the schedule that pipeline would use with ``num_inference_steps = L``. FLUX passes its default
``sigmas = linspace(1, 1/N, N)``; that list is recognised and rebuilt as linspace(1, 1/L, L), which is
what the official patch gets when it is called with L steps. Any other explicit ``sigmas`` list is
taken as the full L-point grid (its length must be (k+1)·N − k).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (FlowMatchEulerDiscreteScheduler,
                                                                       FlowMatchEulerDiscreteSchedulerOutput)

from pfdiff_bench.diffusers.ddim import _check_first_call
from pfdiff_bench.diffusers.loop import PFDiffCursor, check_variant, grid_length
from pfdiff_bench.errors import GridError


class PFDiffFlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """PFDiff-k_h with the Euler map as first-order solver; ``num_inference_steps`` = NFE (spec §6).

    ``pipe.scheduler = PFDiffFlowMatchEulerScheduler.from_config(pipe.scheduler.config, k=2, h=1)``.
    ``timesteps`` lists the N evaluation times; ``sigmas`` is the full L+1-point grid.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: Optional[float] = 0.5, max_shift: Optional[float] = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, invert_sigmas: bool = False,
                 shift_terminal: Optional[float] = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 time_shift_type: str = "exponential", stochastic_sampling: bool = False,
                 k: int = 2, h: int = 1):
        check_variant(k, h)
        if stochastic_sampling:
            raise GridError("PFDiffFlowMatchEulerScheduler is deterministic; stochastic_sampling must be False")
        if invert_sigmas:
            raise GridError("PFDiffFlowMatchEulerScheduler does not support invert_sigmas")
        super().__init__(num_train_timesteps=num_train_timesteps, shift=shift,
                         use_dynamic_shifting=use_dynamic_shifting, base_shift=base_shift, max_shift=max_shift,
                         base_image_seq_len=base_image_seq_len, max_image_seq_len=max_image_seq_len,
                         invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
                         use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
                         use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type,
                         stochastic_sampling=stochastic_sampling)
        self._cursor: Optional[PFDiffCursor] = None
        self.grid_timesteps = None

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, mu=None,
                      timesteps=None):
        """Build the L-point schedule with the parent's rules, then expose the N evaluation timesteps."""
        k, h = self.config.k, self.config.h
        if timesteps is not None:
            raise GridError("PFDiffFlowMatchEulerScheduler takes num_inference_steps (the NFE) or sigmas, "
                            "not custom timesteps")
        if sigmas is not None:
            sig = np.asarray(sigmas, dtype=np.float64)
            n = len(sig)
            if np.allclose(sig, np.linspace(1.0, 1.0 / n, n), rtol=0, atol=1e-7):
                # FLUX's default N-point list -> the same rule with L points (what the official patch runs)
                nfe = n if num_inference_steps is None else num_inference_steps
                length = grid_length(nfe, k)
                sigmas = np.linspace(1.0, 1.0 / length, length)
            else:                       # an explicit grid: it must be the whole L-point schedule
                if (n - 1) % (k + 1):
                    raise GridError(f"custom sigmas for PFDiff-{k}_{h} must have (k+1)·N − k = {k + 1}·N − {k} "
                                    f"entries (got {n})")
                nfe, length = (n + k) // (k + 1), n
        else:
            if num_inference_steps is None:
                raise GridError("set_timesteps needs num_inference_steps (the NFE) or sigmas")
            nfe = num_inference_steps
            length = grid_length(nfe, k)
        super().set_timesteps(num_inference_steps=length, device=device, sigmas=sigmas, mu=mu)
        self._cursor = PFDiffCursor(length, k, h)
        self.grid_timesteps = self.timesteps
        self._sig = [float(s) for s in self.sigmas.double().cpu()]  # L + 1 values, host floats: no sync in step
        self.timesteps = self.grid_timesteps[self._cursor.evals]
        self.num_inference_steps = nfe

    def set_begin_index(self, begin_index: int = 0):
        if begin_index != 0:
            raise GridError("PFDiff runs start at the first timestep from pure noise; "
                            "img2img / strength < 1 (begin_index > 0) is not supported")
        super().set_begin_index(0)

    def _euler(self, x: torch.Tensor, v: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """Euler(x, v; σ_i → σ_j) = x + (σ_j − σ_i)·v in float32, cast to the model dtype (spec §6)."""
        return (x.to(torch.float32) + (self._sig[j] - self._sig[i]) * v).to(v.dtype)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator=None,
             per_token_timesteps=None, return_dict: bool = True):
        """Take the velocity at the current springboard; return the next springboard or the final x."""
        c = self._cursor
        if c is None:
            raise GridError("step() before set_timesteps(); call set_timesteps(num_inference_steps)")
        if per_token_timesteps is not None:
            raise GridError("PFDiffFlowMatchEulerScheduler does not support per_token_timesteps")
        if c.j == 0:
            _check_first_call(timestep, float(self.timesteps[0]))
        out, _ = c.advance(model_output, sample, self._euler)
        self._step_index = c.j
        if not return_dict:
            return (out,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=out)
