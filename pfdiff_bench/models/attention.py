"""The attention kernels shared by the ADM, DDPM and NCSN++ networks (issue #20 part 2).

All kernels take channels-first ``[N, d, T]`` tensors (N = batch x heads, d = head width, T = positions)
and return ``softmax(qᵀk/√d)·v`` as ``[N, d, T]``:

* ``"einsum"``: guided-diffusion's ``QKVAttention`` arithmetic: q and k each scaled by d^-1/4 (keeps the
  product in fp16 range), the softmax in float32, the result in the input dtype.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
  CUDA, which accumulate the softmax in float32). No gradient checkpoint is forced (the official ADM
  attention's ``checkpoint`` would recompute the forward during the classifier's backward).

The kernel of a network is the ``attention_kernel`` attribute of its attention modules; the class default
is ``"einsum"`` (the official arithmetic), `models/fastpath.set_attention` switches a built network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KERNELS = ("einsum", "sdpa")


def attend_einsum(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = 1 / math.sqrt(math.sqrt(q.shape[1]))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v)


def attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [N, T, d]; the default scale is 1/√d, as above
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "einsum") -> torch.Tensor:
    if kernel == "sdpa":
        return attend_sdpa(q, k, v)
    if kernel == "einsum":
        return attend_einsum(q, k, v)
    raise ValueError(f"unknown attention kernel {kernel!r}; accepted: {', '.join(KERNELS)}")
