"""Config -> pretrained (or random-weight) network behind the noise-prediction interface.

``model.checkpoint`` names a zoo entry (its URL, checksum and architecture live in zoo.py);
``model.checkpoint_path`` points at a file the user already has. ``model.random_weights: true`` builds
the architecture (``model.arch`` overrides the zoo config, e.g. a tiny test network) with seeded random
weights: for tests, benchmarks and smoke runs, never for numbers one would report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pfdiff_bench.errors import ConfigError
from pfdiff_bench.models import fastpath, zoo
from pfdiff_bench.models.adapters import ADMClassifierGrad, ADMEps, DDPMEps, NCSNppEps

_ARCH_OF_TYPE = {"ddpm": "ddpm_unet", "adm": "adm_unet", "ncsnpp": "ncsnpp"}


@dataclass
class NetworkModel:
    eps: Callable
    classifier_grad: Optional[Callable]
    sample_shape: tuple[int, int, int]
    num_classes: Optional[int]
    info: dict


def _random(arch: str, config: dict, seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.build_arch(arch, config, device=device).eval().requires_grad_(False)


def _net(kind_arch: str, name: Optional[str], path: Optional[str], arch_cfg: Optional[dict], random: bool,
         seed: int, device: torch.device, fast: dict, what: str):
    if random:
        if not (arch_cfg or name):
            raise ConfigError(f"{what}: random weights need a checkpoint name or an arch config")
        config = dict(arch_cfg or zoo.get_spec(name).config)
        net = _random(kind_arch, config, seed, device)
        info = {"weights": f"random (seed {seed})"}
    else:
        if not name:
            raise ConfigError(f"{what}: name a checkpoint (see `pfdiff-bench models list`)")
        spec = zoo.get_spec(name)
        if spec.arch != kind_arch:
            raise ConfigError(f"{what}: checkpoint {name!r} is a {spec.arch}, expected a {kind_arch}")
        net, file, algo, digest = zoo.load_checkpoint(name, path, device=device)
        config, info = spec.config, {"weights": str(file), "checksum": f"{algo}:{digest}"}
        if algo == "sha256-own":
            info.update(sha256=digest, paper_checkpoint=False,
                        note=f"your own weights of the {spec.arch} architecture, not the paper's {name} checkpoint")
    # inference only: no parameter ever needs a gradient (classifier guidance differentiates x alone)
    net = fastpath.prepare(net.requires_grad_(False), settings=fast)
    return net, config, info


def build_from_config(cfg: dict, device: torch.device) -> NetworkModel:
    m, g = cfg["model"], cfg["guidance"]
    arch = _ARCH_OF_TYPE[m["type"]]
    fast = fastpath.resolve(m, device.type)
    net, config, info = _net(arch, m["checkpoint"], m["checkpoint_path"], m["arch"], m["random_weights"],
                             m["random_seed"], device, fast, "model")
    size = int(config["image_size"])
    if arch == "ncsnpp":
        eps = NCSNppEps(net, label_scale=float(cfg["schedule"]["label_scale"]))
    else:
        eps = DDPMEps(net) if arch == "ddpm_unet" else ADMEps(net)
    num_classes = config.get("num_classes") if arch == "adm_unet" else None
    cg = None
    if g["scale"] > 0:
        cnet, ccfg, cinfo = _net("adm_classifier", g["classifier"], g["classifier_path"], g["classifier_arch"],
                                 m["random_weights"], m["random_seed"] + 1, device,
                                 dict(fast, precision=g.get("precision", "fp32")), "guidance")
        cg = ADMClassifierGrad(cnet)
        num_classes = num_classes or int(ccfg["out_channels"])
        info["classifier"] = dict(cinfo, precision=g.get("precision", "fp32"))
    if g["labels"] == "uniform" and num_classes is None:
        raise ConfigError("guidance.labels: uniform needs a class-conditional model or a classifier")
    info.update(fp16=fast["precision"] == "fp16", arch=arch, fastpath=fast)
    channels = int(config.get("in_channels", config.get("num_channels", 3)))
    return NetworkModel(eps, cg, (channels, size, size), num_classes, info)
