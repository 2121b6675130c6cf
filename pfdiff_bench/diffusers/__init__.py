"""PFDiff as drop-in diffusers schedulers (imports diffusers; ``import pfdiff_bench`` does not).

    from pfdiff_bench.diffusers import PFDiffScheduler
    pipe.scheduler = PFDiffScheduler.from_config(pipe.scheduler.config, k=2, h=1)
    image = pipe(prompt, num_inference_steps=10).images[0]   # 10 network evaluations
"""

from pfdiff_bench.diffusers.ddim import PFDiffScheduler
from pfdiff_bench.diffusers.flow_match import PFDiffFlowMatchEulerScheduler

__all__ = ["PFDiffScheduler", "PFDiffFlowMatchEulerScheduler"]
