"""Per-sample randomness: sample i of a run draws everything from a generator seeded by (seed, i).

The generator of sample i is seeded with the first 8 bytes of sha256(f"pfdiff-bench:{seed}:{i}"), so
streams of different (seed, i) pairs never coincide by construction of the seed arithmetic. Each
sample's generator is consumed in a fixed order: x_T (standard normal, the sample's shape), then its
class label (uniform integer, when the config is class-conditional), then any sampler noise (η > 0),
one draw of the sample's shape per noise call. The sample set is therefore the same for any batch
size, process count or resume point (the approach of EDM's StackedRandomGenerator).
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch


def sample_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"pfdiff-bench:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StackedGenerators:
    """One CPU generator per sample of a batch; draws are made per sample and stacked."""

    def __init__(self, seed: int, indices: Sequence[int]):
        self.indices = list(indices)
        self.gens = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    def randn(self, shape: Sequence[int], dtype=torch.float64, device=None) -> torch.Tensor:
        out = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64) for g in self.gens])
        return out.to(device=device, dtype=dtype)

    def randint(self, high: int, device=None) -> torch.Tensor:
        out = torch.stack([torch.randint(0, high, (), generator=g) for g in self.gens])
        return out.to(device=device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], dtype=x.dtype, device=x.device)


def draw_inputs(seed: int, indices: Sequence[int], shape: Sequence[int], num_classes: Optional[int],
                dtype=torch.float64, device=None):
    """x_T, labels (or None) and the per-sample noise source for a batch of global indices."""
    gens = StackedGenerators(seed, indices)
    x_T = gens.randn(shape, dtype=dtype, device=device)
    y = gens.randint(num_classes, device=device) if num_classes else None
    return x_T, y, gens
