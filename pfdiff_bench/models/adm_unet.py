"""The ADM UNet of Dhariwal & Nichol as openai/guided-diffusion's ``unet.py::UNetModel``.

Also home of the building blocks shared with the noisy classifier (`adm_classifier.py`):
``timestep_embedding``, ``GroupNorm32``, ``ResBlock``, ``AttentionBlock``, ``QKVAttention`` (new
q|k|v order, or per-head order with ``legacy=True``), ``Upsample``, ``Downsample`` and
``TimestepEmbedSequential``. Parameter names and order are the official ones, so
``64x64_diffusion.pt`` loads with ``strict=True``.

The constructor takes the fixture/manifest ``config`` schema, i.e. every keyword of the official
``UNetModel``; ``attention_resolutions`` are downsampling factors (1 = input resolution).

fp16: as in the official code, ``use_fp16`` in the config does not change the parameters (the
checkpoint is float32). Call ``convert_to_fp16()`` after loading to run the torso convolutions in
half precision (GroupNorm and softmax still in float32, time/label embeddings and the output head in
float32, output float32). Until then, and after ``convert_to_fp32()``, the network runs in float32.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pfdiff_bench.models.attention import attend
from pfdiff_bench.models.arch_configs import IMAGENET64_CONFIG, IMAGENET256_CONFIG  # torch-free data

__all__ = [
    "UNetModel", "IMAGENET64_CONFIG", "IMAGENET256_CONFIG", "timestep_embedding", "GroupNorm32", "normalization", "conv_nd",
    "TimestepBlock", "TimestepEmbedSequential", "Upsample", "Downsample", "ResBlock", "AttentionBlock",
    "QKVAttention", "convert_module_to_f16", "convert_module_to_f32", "convert_module_to",
]


# --------------------------------------------------------------------------------------- primitives
class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input dtype; returns the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)  # eps 1e-5 (PyTorch default)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims == 1:
        return nn.AvgPool1d(*args, **kwargs)
    if dims == 2:
        return nn.AvgPool2d(*args, **kwargs)
    if dims == 3:
        return nn.AvgPool3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` with frequencies ``exp(-ln(max_period) i / half)``, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
                      ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module: nn.Module) -> None:
    """Cast the weight and bias of a convolution to float16 (official ``fp16_util``)."""
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.half()
        if module.bias is not None:
            module.bias.data = module.bias.data.half()


def convert_module_to(dtype: torch.dtype):
    """``convert_module_to_f16`` for any floating dtype (bfloat16 for ``precision: bf16``)."""
    def convert(module: nn.Module) -> None:
        if isinstance(module, _CONV_TYPES):
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
    return convert


def convert_module_to_f32(module: nn.Module) -> None:
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()


# ------------------------------------------------------------------------------------------ blocks
class TimestepBlock(nn.Module):
    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to ``x`` given the timestep embeddings ``emb``."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2, optionally followed by a 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv or 2x2 average pooling (key ``op``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with timestep conditioning, optional scale-shift norm and up/down resampling."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint  # gradient checkpointing: irrelevant for inference
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1))  # zero-init officially
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.updown:  # resample between the activation and the conv
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_rest(x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)  # scale first, then shift
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "einsum") -> torch.Tensor:
    """softmax(q·k/√d)·v over ``[B*H, d, T]`` tensors (`models/attention.py`; ``einsum`` is guided-diffusion's
    arithmetic: q and k each scaled by d^-1/4, softmax in float32)."""
    return attend(q, k, v, kernel)


class QKVAttention(nn.Module):
    """Attention over a ``[B, 3*H*d, T]`` qkv tensor.

    ``legacy=False`` (``use_new_attention_order``): ``q | k | v`` blocks of H*d channels, heads inside;
    ``legacy=True`` (guided-diffusion's ``QKVAttentionLegacy``): per head, ``q_h | k_h | v_h``.
    """

    def __init__(self, n_heads: int, legacy: bool = False):
        super().__init__()
        self.n_heads, self.legacy = n_heads, legacy
        self.attention_kernel = "einsum"  # or "sdpa" (models/fastpath.set_attention)

    def forward(self, qkv):
        bs, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        ch = width // (3 * self.n_heads)
        if self.legacy:
            q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        else:
            q, k, v = (t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return _attend(q, k, v, self.attention_kernel).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions (keys ``norm``, ``qkv``, ``proj_out``)."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            assert channels % num_head_channels == 0, (
                f"q,k,v channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads, legacy=not use_new_attention_order)
        self.proj_out = conv_nd(1, channels, channels, 1)  # zero-init officially

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        h = self.proj_out(self.attention(qkv))
        return (x + h).reshape(b, c, *spatial)


# ------------------------------------------------------------------------------------------- model
def _resolve_heads_upsample(num_heads: int, num_heads_upsample: int) -> int:
    return num_heads if num_heads_upsample == -1 else num_heads_upsample


def build_encoder(module: nn.Module, *, in_channels: int, model_channels: int, num_res_blocks: int,
                  attention_resolutions: Iterable[int], dropout: float, channel_mult: Sequence[float],
                  conv_resample: bool, dims: int, use_checkpoint: bool, num_heads: int,
                  num_head_channels: int, use_scale_shift_norm: bool, resblock_updown: bool,
                  use_new_attention_order: bool) -> tuple[int, list[int], int]:
    """Add ``input_blocks`` and ``middle_block`` to ``module`` exactly as the official constructors do.

    Shared by ``UNetModel`` and ``EncoderUNetModel``. Returns ``(ch, input_block_chans, ds)``: the
    width at the bottom, the width of every ``input_blocks`` output (the skip stack) and the final
    downsampling factor.
    """
    attention_resolutions = set(attention_resolutions)
    time_embed_dim = model_channels * 4
    ch = int(channel_mult[0] * model_channels)
    module.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    input_block_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, time_embed_dim, dropout, out_channels=int(mult * model_channels),
                                                dims=dims, use_checkpoint=use_checkpoint,
                                                use_scale_shift_norm=use_scale_shift_norm)]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=num_heads,
                                             num_head_channels=num_head_channels,
                                             use_new_attention_order=use_new_attention_order))
            module.input_blocks.append(TimestepEmbedSequential(*layers))
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            out_ch = ch
            module.input_blocks.append(TimestepEmbedSequential(
                ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims, use_checkpoint=use_checkpoint,
                         use_scale_shift_norm=use_scale_shift_norm, down=True)
                if resblock_updown else Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)))
            ch = out_ch
            input_block_chans.append(ch)
            ds *= 2
    module.middle_block = TimestepEmbedSequential(
        ResBlock(ch, time_embed_dim, dropout, dims=dims, use_checkpoint=use_checkpoint,
                 use_scale_shift_norm=use_scale_shift_norm),
        AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=num_heads, num_head_channels=num_head_channels,
                       use_new_attention_order=use_new_attention_order),
        ResBlock(ch, time_embed_dim, dropout, dims=dims, use_checkpoint=use_checkpoint,
                 use_scale_shift_norm=use_scale_shift_norm),
    )
    return ch, input_block_chans, ds


class UNetModel(nn.Module):
    """guided-diffusion ``UNetModel``: ``net(x, timesteps, y=None)`` → ``[B, out_channels, H, W]``."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: Optional[int] = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.config = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), dropout=dropout, channel_mult=list(channel_mult),
            conv_resample=conv_resample, dims=dims, num_classes=num_classes, use_checkpoint=use_checkpoint,
            use_fp16=use_fp16, num_heads=num_heads, num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)
        num_heads_upsample = _resolve_heads_upsample(num_heads, num_heads_upsample)
        attention_resolutions = set(attention_resolutions)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.num_classes = num_classes
        self.use_fp16 = use_fp16  # the official flag; computation dtype follows convert_to_fp16()
        self.dtype = torch.float32

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch, input_block_chans, ds = build_encoder(
            self, in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)
        input_ch = int(channel_mult[0] * model_channels)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers: list[nn.Module] = [ResBlock(ch + ich, time_embed_dim, dropout,
                                                    out_channels=int(model_channels * mult), dims=dims,
                                                    use_checkpoint=use_checkpoint,
                                                    use_scale_shift_norm=use_scale_shift_norm)]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=num_heads_upsample,
                                                 num_head_channels=num_head_channels,
                                                 use_new_attention_order=use_new_attention_order))
                if level and i == num_res_blocks:
                    out_ch = ch
                    layers.append(
                        ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                                 use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, up=True)
                        if resblock_updown else Upsample(ch, conv_resample, dims=dims, out_channels=out_ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(),
            conv_nd(dims, input_ch, out_channels, 3, padding=1))  # zero-init officially

    def convert_to_fp16(self) -> "UNetModel":
        """Run the torso convolutions in float16, as the official sampling scripts do."""
        return self.convert_to_dtype(torch.float16)

    def convert_to_dtype(self, dtype: torch.dtype) -> "UNetModel":
        """The fp16 layout with any dtype (float16, bfloat16; float32 undoes it)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            part.apply(convert_module_to(dtype))
        self.dtype = dtype
        return self

    def convert_to_fp32(self) -> "UNetModel":
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.output_blocks.apply(convert_module_to_f32)
        self.dtype = torch.float32
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        h = h.type(x.dtype)
        return self.out(h)
