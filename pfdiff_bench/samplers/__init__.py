"""Samplers: planning (:mod:`.plan`), running (:mod:`.run`) and one module per algorithm family
(first_order: DDIM in the ddim and guided conventions; pfdiff: PFDiff-k_h over a first-order solver;
dpm_solver: the DPM-Solver copies; the baselines unipc, deis, ipndm). This package face only re-exports the public API."""

from pfdiff_bench.samplers.plan import (CONVENTIONS, METHODS, SOLVERS, Plan, SamplerSpec, plan, plan_for_length,
                                        valid_nfes)
from pfdiff_bench.samplers.run import CountingModel, SampleResult, respaced_alpha_bars, run_sampler

__all__ = ["SamplerSpec", "Plan", "SampleResult", "CountingModel", "plan", "plan_for_length", "run_sampler",
           "valid_nfes", "respaced_alpha_bars", "SOLVERS", "CONVENTIONS", "METHODS"]
