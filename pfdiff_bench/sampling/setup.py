"""Config -> everything needed to draw samples: schedule, noise predictor, classifier, sampler plan.

Data flows one way: a validated config (config.py) goes in; a :class:`Setup` comes out whose
``sample(x_T, y, noise)`` runs the planned sampler. Network checkpoints are resolved through the
model zoo; the analytic model needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pfdiff_bench.config import parse_pfdiff
from pfdiff_bench.errors import ConfigError
from pfdiff_bench.models.analytic import AnalyticClassifierGrad, AnalyticEps, GaussianMixture
from pfdiff_bench.samplers import Plan, SamplerSpec, SampleResult, plan, run_sampler
from pfdiff_bench.schedules import VPSchedule, schedule_from_config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return dev


def sampler_spec(cfg: dict) -> SamplerSpec:
    s = cfg["sampler"]
    return SamplerSpec(solver=s["name"], convention=s["convention"], grid=s["grid"], order=s["order"],
                       method=s["method"], pfdiff=parse_pfdiff(s["pfdiff"]), eta=float(s["eta"]),
                       lower_order_final=s["lower_order_final"], t_start=s["t_start"], t_end=s["t_end"],
                       clip_denoised=s["clip_denoised"], float32_coefficients=s["float32_coefficients"],
                       variant=s["variant"], predict=s["predict"], final_corrector=s["final_corrector"],
                       ts_order=None if s["ts_order"] is None else float(s["ts_order"]))


@dataclass
class Setup:
    cfg: dict
    schedule: VPSchedule
    plan: Plan
    model: Callable
    classifier_grad: Optional[Callable]
    guidance_scale: float
    sample_shape: tuple[int, ...]
    num_classes: Optional[int]      # labels are drawn when set (class-conditional configs)
    device: torch.device
    dtype: torch.dtype
    gmm: Optional[GaussianMixture] = None

    @property
    def is_analytic(self) -> bool:
        return self.gmm is not None

    def sample(self, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
               noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> SampleResult:
        return run_sampler(self.plan, self.model, self.schedule, x_T.to(self.device, self.dtype),
                           y=None if y is None else y.to(self.device), classifier_grad=self.classifier_grad,
                           guidance_scale=self.guidance_scale, noise=noise)


def analytic_mixture(model_cfg: dict) -> GaussianMixture:
    return GaussianMixture.random(model_cfg["components"], model_cfg["shape"], std=model_cfg["std"],
                                  scale=model_cfg["mean_scale"], seed=model_cfg["means_seed"])


def build(cfg: dict, device: Optional[torch.device] = None, nfe: Optional[int] = None, net=None) -> Setup:
    """Resolve a validated config into a runnable :class:`Setup` (loads checkpoints for networks).

    ``net``: an already built ``networks.NetworkModel`` of the same model/guidance config on ``device``
    (a table reuses one network across its cells instead of loading the checkpoint per cell)."""
    device = device or resolve_device(cfg["sampling"]["device"])
    schedule = schedule_from_config(cfg["schedule"])
    p = plan(sampler_spec(cfg), schedule, int(nfe or cfg["sampling"]["nfe"]))
    m, g = cfg["model"], cfg["guidance"]
    scale = float(g["scale"])
    if m["type"] == "analytic":
        if device.type == "cpu":
            # the analytic model works on tiny tensors: extra intra-op threads only spin (measured 50x
            # slower with 2 threads on a busy 2-core machine)
            torch.set_num_threads(1)
        gmm = analytic_mixture(m).to(device)
        alpha_fn = schedule.alpha_bar_at_model_time
        model = AnalyticEps(gmm, alpha_fn, class_cond=m["class_cond"])
        cg = AnalyticClassifierGrad(gmm, alpha_fn) if scale > 0 else None
        labelled = m["class_cond"] or scale > 0 or g["labels"] == "uniform"
        return Setup(cfg, schedule, p, model, cg, scale, tuple(m["shape"]),
                     gmm.num_classes if labelled else None, device, torch.float64, gmm)
    from pfdiff_bench.models import networks  # imported lazily: the analytic path needs no network code

    if net is None:
        net = networks.build_from_config(cfg, device)
    return Setup(cfg, schedule, p, net.eps, net.classifier_grad if scale > 0 else None, scale, net.sample_shape,
                 net.num_classes, device, torch.float32)
