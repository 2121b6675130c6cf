"""NCSN++ / DDPM++ of Song et al. as yang-song/score_sde_pytorch's ``models/ncsnpp.py::NCSNpp``.

Built in the configuration of ``configs/vp/cifar10_ddpmpp_deep_continuous.py`` (the network of
``checkpoint_8.pth``, spec CHECKPOINTS.md addendum §A; fixtures README part 2, "NCSN++ / DDPM++"):
BigGAN residual blocks (``layerspp.ResnetBlockBigGANpp``) that also resample, ``skip_rescale``,
positional time embedding, single-head NIN attention (``layerspp.AttnBlockpp``), no FIR and no
progressive growing. Every module is an entry of one flat ``nn.ModuleList`` ``all_modules`` in the
official construction order, and the persistent float64 buffer ``sigmas`` comes first, so the official
state dict (with its ``module.`` prefix stripped) loads with ``strict=True``.

The constructor takes the fixture/manifest ``ncsnpp`` config schema: the flat dict of exactly the config
fields ``NCSNpp`` reads (``data.image_size, num_channels, centered``; ``model.nf, ch_mult, ...``;
``training.continuous``). ``attn_resolutions`` are pixel widths of the feature map. Switches no
PFDiff checkpoint uses (FIR resampling, progressive growing, Fourier embedding, DDPM-type blocks,
``conditional=False``) are refused with a ConfigError.

Forward: ``net(x, labels)`` with ``x`` in the [-1, 1] data space (``centered=True``: no rescaling inside)
and ``labels = 999 * t`` for the continuous VP time ``t`` (float32, fractional values kept); returns the
noise prediction eps (``scale_by_sigma=False``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pfdiff_bench.errors import ConfigError
from pfdiff_bench.models.attention import attend_sdpa
from pfdiff_bench.models.ddpm_unet import get_timestep_embedding
from pfdiff_bench.models.arch_configs import CIFAR10_DDPMPP_DEEP_CONFIG  # torch-free data

__all__ = ["NCSNpp", "ResnetBlockBigGANpp", "AttnBlockpp", "NIN", "CIFAR10_DDPMPP_DEEP_CONFIG"]

_ACTIVATIONS = {"swish": nn.SiLU, "elu": nn.ELU, "relu": nn.ReLU, "lrelu": lambda: nn.LeakyReLU(negative_slope=0.2)}


# ------------------------------------------------------------------------ initialisation (layers.py)
def _default_init(shape: Sequence[int], scale: float = 1.0) -> torch.Tensor:
    """``layers.default_init``: variance scaling, fan_avg, uniform; scale 0 means 1e-10 (near-zero layers).

    Fans follow ``variance_scaling`` with in_axis=1, out_axis=0 (also for NIN's ``[in, out]`` weights).
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = float(np.prod(shape)) / shape[1] / shape[0]
    fan_avg = (shape[0] + shape[1]) * receptive / 2
    bound = math.sqrt(3 * scale / fan_avg)
    return (torch.rand(*shape) * 2.0 - 1.0) * bound


def _conv(in_ch: int, out_ch: int, kernel: int, init_scale: float = 1.0) -> nn.Conv2d:
    """``ddpm_conv3x3`` / ``ddpm_conv1x1``: stride 1, 'same' padding, bias, default_init weights, zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel, stride=1, padding=kernel // 2, bias=True)
    with torch.no_grad():
        conv.weight.copy_(_default_init(conv.weight.shape, init_scale))
        conv.bias.zero_()
    return conv


def _linear(in_dim: int, out_dim: int) -> nn.Linear:
    lin = nn.Linear(in_dim, out_dim)
    with torch.no_grad():
        lin.weight.copy_(_default_init(lin.weight.shape))
        lin.bias.zero_()
    return lin


def _group_norm(channels: int) -> nn.GroupNorm:
    # min(C // 4, 32) groups: 32 at full width, fewer on narrow networks (fixtures README part 2)
    return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


# ------------------------------------------------------------------------------ layers (layerspp.py)
class NIN(nn.Module):
    """``layers.NIN``: a 1x1 linear map with weight ``W [in, out]`` (transposed w.r.t. nn.Linear)."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(_default_init((in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bhwc,cd->bhwd", x.permute(0, 2, 3, 1), self.W) + self.b
        return y.permute(0, 3, 1, 2)


class AttnBlockpp(nn.Module):
    """``layerspp.AttnBlockpp``: one head over all C channels, softmax over key positions."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    attention_kernel = "einsum"  # the official einsum arithmetic; "sdpa": models/attention.py

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        if self.attention_kernel == "sdpa":
            h = self.NIN_3(attend_sdpa(*(t.reshape(B, C, H * W) for t in (q, k, v))).reshape(B, C, H, W))
            return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (int(C) ** (-0.5))
        w = F.softmax(w.reshape(B, H, W, H * W).float(), dim=-1).type(w.dtype).reshape(B, H, W, H, W)
        h = self.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


def _naive_upsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``up_or_down_sampling.naive_upsample_2d``: nearest neighbour (each pixel repeated factor x factor)."""
    _, C, H, W = x.shape
    x = x.reshape(-1, C, H, 1, W, 1).repeat(1, 1, 1, factor, 1, factor)
    return x.reshape(-1, C, H * factor, W * factor)


def _naive_downsample_2d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """``up_or_down_sampling.naive_downsample_2d``: mean over factor x factor blocks."""
    _, C, H, W = x.shape
    return x.reshape(-1, C, H // factor, factor, W // factor, factor).mean(dim=(3, 5))


class ResnetBlockBigGANpp(nn.Module):
    """``layerspp.ResnetBlockBigGANpp`` without FIR: resampling sits between the first activation and Conv_0."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: Optional[int] = None, temb_dim: Optional[int] = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, skip_rescale: bool = True,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch if out_ch else in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.up, self.down = up, down
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        if temb_dim is not None:
            self.Dense_0 = _linear(temb_dim, out_ch)
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale)
        # unlike guided-diffusion, every resampling block has a 1x1 skip conv, even at constant width
        if in_ch != out_ch or up or down:
            self.Conv_2 = _conv(in_ch, out_ch, 1)
        self.skip_rescale = skip_rescale
        self.act = act
        self.in_ch, self.out_ch = in_ch, out_ch

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            h, x = _naive_upsample_2d(h), _naive_upsample_2d(x)
        elif self.down:
            h, x = _naive_downsample_2d(h), _naive_downsample_2d(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


# ------------------------------------------------------------------------------------ the network
def _refuse(name: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"ncsnpp config: {name} = {value!r} is not supported; accepted: "
                          f"{', '.join(map(repr, accepted))} (the DDPM++ deep continuous checkpoint needs no other)")


class NCSNpp(nn.Module):
    """NCSN++ in the BigGAN-block, no-FIR, no-progressive configuration (DDPM++ of score_sde)."""

    def __init__(self, image_size: int = 32, num_channels: int = 3, centered: bool = True, nf: int = 128,
                 ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 8,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, resamp_with_conv: bool = True,
                 conditional: bool = True, fir: bool = False, fir_kernel: Sequence[int] = (1, 3, 3, 1),
                 skip_rescale: bool = True, resblock_type: str = "biggan", progressive: str = "none",
                 progressive_input: str = "none", progressive_combine: str = "sum",
                 embedding_type: str = "positional", fourier_scale: float = 16, init_scale: float = 0.0,
                 nonlinearity: str = "swish", scale_by_sigma: bool = False, sigma_min: float = 0.01,
                 sigma_max: float = 50, num_scales: int = 1000, continuous: bool = True):
        super().__init__()
        # resamp_with_conv, fir_kernel, progressive_combine, fourier_scale and continuous are read by the
        # official class only on the paths refused here (DDPM-type blocks, FIR, progressive, Fourier)
        _refuse("resblock_type", str(resblock_type).lower(), ("biggan",))
        _refuse("fir", bool(fir), (False,))
        _refuse("progressive", str(progressive).lower(), ("none",))
        _refuse("progressive_input", str(progressive_input).lower(), ("none",))
        _refuse("embedding_type", str(embedding_type).lower(), ("positional",))
        _refuse("conditional", bool(conditional), (True,))
        _refuse("nonlinearity", str(nonlinearity).lower(), tuple(_ACTIVATIONS))
        self.act = act = _ACTIVATIONS[str(nonlinearity).lower()]()
        # VE noise levels exp(linspace(log σ_max, log σ_min, N)) in float64 (utils.get_sigmas); only used
        # with scale_by_sigma, but part of every state dict
        sigmas = np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), int(num_scales)))
        self.register_buffer("sigmas", torch.tensor(sigmas, dtype=torch.float64))
        self.nf = nf = int(nf)
        self.num_res_blocks = num_res_blocks = int(num_res_blocks)
        self.attn_resolutions = attn_resolutions = [int(r) for r in attn_resolutions]
        self.num_resolutions = num_resolutions = len(ch_mult)
        self.image_size, self.num_channels = int(image_size), int(num_channels)
        self.centered, self.scale_by_sigma = bool(centered), bool(scale_by_sigma)
        all_resolutions = [self.image_size // (2 ** i) for i in range(num_resolutions)]

        def block(**kw):
            return ResnetBlockBigGANpp(act=act, dropout=dropout, init_scale=init_scale, skip_rescale=skip_rescale,
                                       temb_dim=4 * nf, **kw)

        def attn(channels):
            return AttnBlockpp(channels=channels, init_scale=init_scale, skip_rescale=skip_rescale)

        modules: list[nn.Module] = [_linear(nf, 4 * nf), _linear(4 * nf, 4 * nf), _conv(self.num_channels, nf, 3)]
        hs_c = [nf]
        in_ch = nf
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                modules.append(block(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if all_resolutions[i_level] in attn_resolutions:  # after every down block of the level
                    modules.append(attn(in_ch))
                hs_c.append(in_ch)
            if i_level != num_resolutions - 1:
                modules.append(block(down=True, in_ch=in_ch))
                hs_c.append(in_ch)
        in_ch = hs_c[-1]
        modules += [block(in_ch=in_ch), attn(in_ch), block(in_ch=in_ch)]
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                modules.append(block(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if all_resolutions[i_level] in attn_resolutions:  # once, after the level's last up block
                modules.append(attn(in_ch))
            if i_level != 0:
                modules.append(block(in_ch=in_ch, up=True))
        assert not hs_c
        modules += [_group_norm(in_ch), _conv(in_ch, self.num_channels, 3, init_scale)]
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, time_cond: torch.Tensor) -> torch.Tensor:
        modules = self.all_modules
        m = 0
        temb = get_timestep_embedding(time_cond, self.nf)  # positional: the labels themselves, float32
        temb = modules[m](temb)
        temb = modules[m + 1](self.act(temb))
        m += 2
        if not self.centered:  # [0, 1] data -> [-1, 1]; the deep continuous config is centered
            x = 2 * x - 1.0
        hs = [modules[m](x)]
        m += 1
        for i_level in range(self.num_resolutions):
            for _ in range(self.num_res_blocks):
                h = modules[m](hs[-1], temb)
                m += 1
                if h.shape[-1] in self.attn_resolutions:
                    h = modules[m](h)
                    m += 1
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(modules[m](hs[-1], temb))
                m += 1
        h = modules[m](hs[-1], temb)
        h = modules[m + 1](h)
        h = modules[m + 2](h, temb)
        m += 3
        for i_level in reversed(range(self.num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = modules[m](torch.cat([h, hs.pop()], dim=1), temb)  # current features first
                m += 1
            if h.shape[-1] in self.attn_resolutions:
                h = modules[m](h)
                m += 1
            if i_level != 0:
                h = modules[m](h, temb)
                m += 1
        assert not hs
        h = modules[m + 1](self.act(modules[m](h)))
        m += 2
        assert m == len(modules)
        if self.scale_by_sigma:  # VE models only; the official code indexes sigmas by the integer label
            used_sigmas = self.sigmas[time_cond.long()].reshape((x.shape[0], *([1] * len(x.shape[1:]))))
            h = h / used_sigmas
        return h
