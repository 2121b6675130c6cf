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
    noise_shape: Optional[tuple[int, ...]] = None  # x_T shape when it differs from the output (SD latents)
    prompts: Optional[object] = None              # SD: prompt of sample i (labels = global sample indices)
    weights: Optional[dict] = None  # which weights (file, checksum, own or the paper's): recorded in the manifest

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


def is_full_size(cfg: dict) -> bool:
    """A network at its published size (no reduced ``model.arch``): far too slow to sample on a CPU."""
    return cfg["model"]["type"] in ("ddpm", "adm", "ncsnpp") and cfg["model"]["arch"] is None


def preflight(cfg: dict, device: torch.device, *, allow_cpu: bool = False, log: Callable[[str], None] = print) -> None:
    """Refuse before any work: full-size networks on a CPU (unless ``allow_cpu``), and every checkpoint
    (UNet and classifier) that is missing and cannot be fetched, all named in one message.

    Fetchable files are downloaded here (rank 0's job under torchrun), so that a second missing file
    is not discovered only after the first one has arrived.
    """
    from pfdiff_bench.errors import MissingItems

    if is_full_size(cfg) and device.type == "cpu":
        if not allow_cpu:
            raise ConfigError(f"{cfg.get('name', 'this config')} uses a full-size {cfg['model']['type']} network and "
                              f"no CUDA GPU is here (device cpu): that is minutes per sample; run on a GPU, or "
                              f"pass --allow-cpu to sample on the CPU anyway")
        log("warning: sampling a full-size network on the CPU (--allow-cpu): expect minutes per sample")
    from pfdiff_bench.models import zoo

    missing = zoo.missing_checkpoints(cfg, fetch=True, log=log)
    if missing:
        many = len(missing) > 1
        raise MissingItems(f"{len(missing)} checkpoint file{'s are' if many else ' is'} missing", missing)


def python_model(m: dict) -> Callable:
    """``model: {type: python, target: "package.module:factory", kwargs: {...}, shape: [C, H, W]}``.

    ``factory(**kwargs)`` returns any noise predictor ``eps(x, t, y=None)`` (t in the schedule's model
    time, as ``models/base.py`` documents); it then runs through the whole engine (runs, export, FID).
    """
    import importlib

    mod_name, _, attr = m["target"].partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model.target {m['target']!r} cannot be imported: {exc}") from None
    model = factory(**(m["kwargs"] or {}))
    if not callable(model):
        raise ConfigError(f"model.target {m['target']!r} returned {type(model).__name__}, not a callable eps(x, t, y)")
    return model


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
    if m["type"] == "stable_diffusion":
        return _build_sd(cfg, device, schedule, p, scale)
    if m["type"] == "python":
        model = python_model(m)
        return Setup(cfg, schedule, p, model, None, 0.0, tuple(m["shape"]), m["num_classes"], device, torch.float32,
                     weights={"python": m["target"], "paper_checkpoint": False})
    from pfdiff_bench.models import networks  # imported lazily: the analytic path needs no network code

    if net is None:
        net = networks.build_from_config(cfg, device)
    return Setup(cfg, schedule, p, net.eps, net.classifier_grad if scale > 0 else None, scale, net.sample_shape,
                 net.num_classes, device, torch.float32, weights=dict(net.info))


class SDSetup(Setup):
    """Stable Diffusion: ``y`` holds global sample indices; sample i is prompted with caption i, the
    unconditional input is the empty prompt, and the final latents are decoded to [-1, 1] images."""

    def sample(self, x_T: torch.Tensor, y: Optional[torch.Tensor] = None,
               noise: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> SampleResult:
        sd = self.model.sd
        idx = list(range(x_T.shape[0])) if y is None else [int(i) for i in y.tolist()]
        cond = sd.encode([self.prompts[i] for i in idx])        # once per batch
        uncond = sd.empty_prompt(len(idx)) if self.guidance_scale != 1.0 else None
        res = run_sampler(self.plan, self.model, self.schedule, x_T.to(self.device, self.dtype), y=cond,
                          guidance_scale=self.guidance_scale, noise=noise, uncond=uncond)
        res.x = sd.decode(res.x)
        return res


def _build_sd(cfg: dict, device: torch.device, schedule: VPSchedule, p: Plan, scale: float) -> Setup:
    from pfdiff_bench.models import fastpath
    from pfdiff_bench.models.captions import Prompts, load_captions
    from pfdiff_bench.models.stable_diffusion import REPO_ID, SDEps, StableDiffusion, find_folder

    m = cfg["model"]
    precision = fastpath.resolve_precision(m, device.type)  # the manifest's fp16_resolved uses the same rule
    if precision == "bf16":
        raise ConfigError("model.precision: the Stable Diffusion UNet runs fp32 or fp16 (autocast, as the "
                          "official script); accepted: auto, fp32, fp16")
    if p.spec.convention not in ("ldm", "dpm_solver"):
        raise ConfigError(f"Stable Diffusion runs the ldm or dpm_solver convention (got {p.spec.convention})")
    folder = find_folder(m["checkpoint_path"], m["checkpoint"] or REPO_ID)  # offline: fails at once
    prompts = Prompts(load_captions(m["captions"]) if m["captions"] else None, m["prompt"])
    n = int(cfg["sampling"]["num_samples"])
    if n > len(prompts):
        raise ConfigError(f"{n} samples need {n} captions; {m['captions']} gives {len(prompts)} "
                          f"(the protocol uses the first 10,000)")
    sd = StableDiffusion(folder, device, fp16=precision == "fp16")
    return SDSetup(cfg, schedule, p, SDEps(sd), None, scale, sd.image_shape, None, device, torch.float32,
                   noise_shape=sd.latent_shape, prompts=prompts)
