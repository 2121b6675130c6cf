"""The ADM noisy classifier as openai/guided-diffusion's ``unet.py::EncoderUNetModel``.

The torso (``time_embed``, ``input_blocks``, ``middle_block``) is built by the same code as the
UNet's encoder half (`adm_unet.build_encoder`); the ImageNet-64 classifier uses the *legacy*
per-head q/k/v layout there (``use_new_attention_order=False``) while its attention pool uses the
*new* q|k|v order. Called as ``classifier(x_t, t)`` with ``t`` the original 1000-step index; returns
logits.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from pfdiff_bench.models.adm_unet import (
    QKVAttention, build_encoder, conv_nd, convert_module_to, convert_module_to_f32, normalization,
    timestep_embedding,
)
from pfdiff_bench.models.arch_configs import CLASSIFIER64_CONFIG, CLASSIFIER256_CONFIG  # torch-free data

__all__ = ["EncoderUNetModel", "AttentionPool2d", "CLASSIFIER64_CONFIG", "CLASSIFIER256_CONFIG"]


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the spatial mean is prepended as token 0, which is returned."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_spatial = x.shape
        x = x.reshape(b, c, -1)  # NC(HW)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # NC(HW+1)
        x = x + self.positional_embedding[None, :, :].to(x.dtype)
        x = self.qkv_proj(x)
        x = self.attention(x)
        x = self.c_proj(x)
        return x[:, :, 0]


class EncoderUNetModel(nn.Module):
    """guided-diffusion ``EncoderUNetModel`` (half UNet with timestep embedding and a pooling head)."""

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions: Iterable[int], dropout: float = 0,
                 channel_mult: Sequence[float] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 use_checkpoint: bool = False, use_fp16: bool = False, num_heads: int = 1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_new_attention_order: bool = False, pool: str = "adaptive"):
        super().__init__()
        channel_mult = tuple(channel_mult)
        self.config = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), dropout=dropout, channel_mult=list(channel_mult),
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, use_fp16=use_fp16,
            num_heads=num_heads, num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order, pool=pool)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.use_fp16 = use_fp16  # the official flag; computation dtype follows convert_to_fp16()
        self.dtype = torch.float32
        self.pool = pool

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        ch, input_block_chans, ds = build_encoder(
            self, in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)
        feature_size = sum(input_block_chans) + ch  # the official _feature_size (spatial pools)

        if pool == "adaptive":
            self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)),
                                     conv_nd(dims, ch, out_channels, 1), nn.Flatten())
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels != -1")
            self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                     AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        elif pool == "spatial_v2":
            self.out = nn.Sequential(nn.Linear(feature_size, 2048), normalization(2048), nn.SiLU(),
                                     nn.Linear(2048, out_channels))
        else:
            raise NotImplementedError(f"unexpected pool {pool!r}")

    def convert_to_fp16(self) -> "EncoderUNetModel":
        return self.convert_to_dtype(torch.float16)

    def convert_to_dtype(self, dtype: torch.dtype) -> "EncoderUNetModel":
        """The official fp16 layout (torso convolutions only) with any dtype."""
        self.input_blocks.apply(convert_module_to(dtype))
        self.middle_block.apply(convert_module_to(dtype))
        self.dtype = dtype
        return self

    def convert_to_fp32(self) -> "EncoderUNetModel":
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.dtype = torch.float32
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        results = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            if self.pool.startswith("spatial"):
                results.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            results.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(results, dim=-1))
        return self.out(h.type(x.dtype))
