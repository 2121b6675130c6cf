"""The GPU fast path of a built network (issue #20): precision, attention kernel, channels_last, compile.

* **precision** ``fp32 | fp16 | bf16``. The ADM networks use the official fp16 layout
  (``convert_to_dtype``: torso convolutions in the low dtype, GroupNorm and the attention softmax in
  float32, time/label embeddings and the output head in float32). The DDPM and NCSN++ networks get the
  same layout from :func:`convert_layout`: every convolution (and NCSN++'s 1x1 ``NIN``) in the low dtype
  with its input cast to it, GroupNorm evaluated in float32 and returned in the low dtype, linear
  layers (time embedding) in float32, softmax in float32 (the attention kernels), output in float32. ``bf16`` is the same with bfloat16.
* **attention** ``einsum | sdpa``: :func:`set_attention` picks the kernel of `models/attention.py`.
* **channels_last**: parameters and the network input in ``torch.channels_last`` memory format.
* **compile**: ``torch.compile(net, dynamic=False)``: one graph per input shape, so the last, shorter
  batch of a run is compiled once more (never padded: padding would change nothing but the cost).

Config keys (``model.*``): ``precision`` (``auto``: fp16 for ADM on CUDA, as the paper ran, else fp32;
``model.fp16: true/false`` still means fp16/fp32), ``attention`` (default ``sdpa``), ``channels_last``
and ``compile`` (default off). :func:`resolve` gives the values a run uses (recorded in the manifest).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pfdiff_bench.errors import ConfigError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ATTENTION = ("einsum", "sdpa")
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

__all__ = ["PRECISIONS", "ATTENTION", "resolve_precision", "fp16_resolved", "resolve", "apply_precision",
           "convert_layout",
           "set_attention", "to_channels_last", "compile_network", "prepare"]


def resolve_precision(model_cfg: dict, device_type: str) -> str:
    """``model.precision`` (or the older ``model.fp16``) -> fp32 | fp16 | bf16 for this device type."""
    p = model_cfg.get("precision", "auto")
    if p != "auto":
        if p not in PRECISIONS:
            raise ConfigError(f"model.precision: unknown {p!r}; accepted: auto, {', '.join(PRECISIONS)}")
        return p
    fp16 = model_cfg.get("fp16", "auto")
    if fp16 is True:
        return "fp16"
    if fp16 is False:
        return "fp32"
    # as the paper ran: the ADM torso in half precision (official use_fp16) and the SD UNet under fp16
    # autocast (the official txt2img script), both on CUDA only; DDPM / NCSN++ in float32
    return "fp16" if device_type == "cuda" and model_cfg.get("type") in ("adm", "stable_diffusion") else "fp32"


def fp16_resolved(model_cfg: dict, device_type: str) -> bool:
    """Whether the network runs in fp16: the manifest's ``fp16_resolved`` and what the builders use
    (``models/networks.build_from_config``, ``sampling/setup._build_sd``), one rule for all."""
    return resolve_precision(model_cfg, device_type) == "fp16"


def resolve(model_cfg: dict, device_type: str) -> dict:
    """The fast-path settings a run uses: precision, attention, channels_last, compile."""
    return {"precision": resolve_precision(model_cfg, device_type),
            "attention": model_cfg.get("attention", "sdpa"),
            "channels_last": bool(model_cfg.get("channels_last", False)),
            "compile": bool(model_cfg.get("compile", False))}


def _cast_input(module: nn.Module, args):
    dtype = module._fastpath_dtype
    if args and torch.is_tensor(args[0]) and args[0].dtype != dtype:
        return (args[0].to(dtype), *args[1:])
    return None


def _norm_in(module: nn.Module, args):
    return (args[0].float(), *args[1:])


def _norm_out(module: nn.Module, args, output):
    return output.to(module._fastpath_dtype)


def _output_float32(module: nn.Module, args, output):
    return output.float()


def convert_layout(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The ADM fp16 layout for a network without ``convert_to_dtype`` (DDPM, NCSN++), with forward hooks."""
    for m in net.modules():
        low = isinstance(m, _CONV_TYPES) or type(m).__name__ == "NIN"
        if low:
            for p in m.parameters(recurse=False):
                p.data = p.data.to(dtype)
            m._fastpath_dtype = dtype
            m.register_forward_pre_hook(_cast_input)
        elif isinstance(m, nn.GroupNorm):
            m._fastpath_dtype = dtype  # computed in float32, handed on in the low dtype
            m.register_forward_pre_hook(_norm_in)
            m.register_forward_hook(_norm_out)
        elif isinstance(m, nn.Linear):
            m._fastpath_dtype = m.weight.dtype
            m.register_forward_pre_hook(_cast_input)
    net.register_forward_hook(_output_float32)  # as the ADM networks: the output in float32
    return net


def apply_precision(net: nn.Module, precision: str) -> nn.Module:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: unknown {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return net
    dtype = PRECISIONS[precision]
    if hasattr(net, "convert_to_dtype"):  # the ADM networks: the official layout
        return net.convert_to_dtype(dtype)
    return convert_layout(net, dtype)


def set_attention(net: nn.Module, kernel: str) -> nn.Module:
    """Every attention module of ``net`` uses ``kernel`` (``einsum`` or ``sdpa``)."""
    if kernel not in ATTENTION:
        raise ConfigError(f"model.attention: unknown {kernel!r}; accepted: {', '.join(ATTENTION)}")
    for m in net.modules():
        if hasattr(m, "attention_kernel"):
            m.attention_kernel = kernel
    return net


def _input_channels_last(module: nn.Module, args):
    if args and torch.is_tensor(args[0]) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def to_channels_last(net: nn.Module) -> nn.Module:
    net.to(memory_format=torch.channels_last)
    net.register_forward_pre_hook(_input_channels_last)
    return net


def compile_network(net: nn.Module) -> nn.Module:
    """``torch.compile`` for fixed shapes (``dynamic=False``; a new batch size compiles once more)."""
    return torch.compile(net, dynamic=False)


def prepare(net: nn.Module, precision: str = "fp32", attention: str = "sdpa", channels_last: bool = False,
            compile: bool = False, settings: Optional[dict] = None) -> nn.Module:
    """Apply the fast path to a built (and loaded) network; ``settings`` (from :func:`resolve`) wins."""
    if settings:
        precision, attention = settings["precision"], settings["attention"]
        channels_last, compile = settings["channels_last"], settings["compile"]
    net = apply_precision(net, precision)
    net = set_attention(net, attention)
    if channels_last:
        net = to_channels_last(net)
    if compile:
        net = compile_network(net)
    return net
