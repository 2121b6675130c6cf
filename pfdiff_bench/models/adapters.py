"""Adapters from the official networks to the interface of `models/base.py`.

* ``DDPMEps(net)``: ermongroup/ddim ``Model``; ``t`` goes in as a float32 tensor (fractional values
  are kept, never rounded). ``y`` is accepted and ignored (unconditional model).
* ``ADMEps(net)``: guided-diffusion ``UNetModel``; passes the class labels, returns the first 3 of the
  6 output channels (eps; the variance channels are only used by ancestral sampling).
* ``ADMClassifierGrad(classifier)``: ∇_x Σ_b log_softmax(classifier(x, t))[b, y_b], no scale. The least
  work (issue #20): the classifier's parameters are frozen (``requires_grad_(False)``), so its backward
  runs to the input only, in the classifier's own dtype (float32 unless ``guidance.precision`` says
  otherwise; the log-softmax in float32).
* ``NCSNppEps(net)``: score_sde ``NCSNpp`` (DDPM++ deep continuous VP). The samplers pass the model time
  ``999·t`` (``ContinuousVP.model_time``); the adapter forms the labels as score_sde's ``get_noise_fn``
  does, ``t * 999`` in float32 from a float32 ``t``. ``x`` goes in unscaled ([-1, 1], ``centered``);
  the output is eps. ``y`` is accepted and ignored.

Each adapter moves inputs to the network's device and input dtype (float32 for these networks, also in
fp16 mode where the torso casts internally) and returns a tensor of ``x``'s dtype and device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pfdiff_bench.errors import ConfigError

__all__ = ["DDPMEps", "ADMEps", "ADMClassifierGrad", "NCSNppEps"]


def _device_dtype(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(net.parameters())  # the time-embedding weight: float32 even when the torso runs in fp16
    return p.device, p.dtype


def _time(t, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device).to(torch.float32)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape [{batch}], got {list(t.shape)}")
    return t


def _labels(y, batch: int, device: torch.device) -> torch.Tensor:
    y = torch.as_tensor(y, device=device).to(torch.long)
    if y.dim() == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"y must be a scalar or have shape [{batch}], got {list(y.shape)}")
    return y


class DDPMEps:
    """NoisePredictor for the DDPM UNet (ermongroup/ddim ``Model``)."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        device, dtype = _device_dtype(self.net)
        out = self.net(x.to(device=device, dtype=dtype), _time(t, x.shape[0], device))
        return out.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"DDPMEps({type(self.net).__name__})"


class NCSNppEps:
    """NoisePredictor for score_sde's NCSN++: eps = net(x, labels), labels = float32(t) * 999 in float32."""

    def __init__(self, net: nn.Module, label_scale: float = 999.0):
        self.net = net
        self.label_scale = float(label_scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        device, dtype = _device_dtype(self.net)
        u = torch.as_tensor(t, device=device)
        # the official samplers hold t in float32 and multiply there: round t first, then scale in float32
        t32 = (u.to(torch.float64) / self.label_scale).to(torch.float32)
        labels = _time(t32 * self.label_scale, x.shape[0], device)
        out = self.net(x.to(device=device, dtype=dtype), labels)
        return out.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"NCSNppEps({type(self.net).__name__})"


class ADMEps:
    """NoisePredictor for the guided-diffusion UNet: eps = first ``C`` of the ``2C`` output channels."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.num_classes = getattr(net, "num_classes", None)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        device, dtype = _device_dtype(self.net)
        if self.num_classes is not None:
            if y is None:
                raise ConfigError("this ADM model is class-conditional: class labels y are required")
            y = _labels(y, x.shape[0], device)
        else:
            y = None
        out = self.net(x.to(device=device, dtype=dtype), _time(t, x.shape[0], device), y)
        c = x.shape[1]
        if out.shape[1] == 2 * c:  # learn_sigma: eps then the variance interpolation value
            out = out[:, :c]
        return out.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"ADMEps({type(self.net).__name__})"


class ADMClassifierGrad:
    """ClassifierGrad: ∇_x log p(y | x_t) of the guided-diffusion noisy classifier (no scale)."""

    def __init__(self, classifier: nn.Module):
        self.classifier = classifier.requires_grad_(False)  # no weight gradients: backward to x only

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device, dtype = _device_dtype(self.classifier)
        with torch.enable_grad():
            x_in = x.detach().to(device=device, dtype=dtype).requires_grad_(True)
            logits = self.classifier(x_in, _time(t, x.shape[0], device))
            log_probs = F.log_softmax(logits.float(), dim=-1)
            selected = log_probs[torch.arange(len(logits), device=device), _labels(y, x.shape[0], device)]
            (grad,) = torch.autograd.grad(selected.sum(), x_in)
        return grad.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"ADMClassifierGrad({type(self.classifier).__name__})"
