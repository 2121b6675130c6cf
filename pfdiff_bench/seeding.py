"""Per-sample randomness: sample i of a run draws everything from a generator seeded by (seed, i).

Scheme (documented in docs/ENGINE.md, "Seeding"):

* Sample ``i`` (its *global* index in the run, 0-based) owns one CPU ``torch.Generator`` seeded with
  the first 8 bytes (little endian, top bit cleared) of ``sha256(f"pfdiff-bench:{seed}:{i}")``.
  Hashing decorrelates neighbouring (seed, i) pairs; nothing else ever touches that generator.
* The generator is consumed in a fixed order:

  1. ``x_T``: standard normal of the sample's shape, drawn in float64 (then cast to the model dtype
     and moved to the device);
  2. its class label: one uniform integer in ``[0, num_classes)``, only when the setup is
     class-conditional (``setup.num_classes`` set);
  3. sampler noise (DDIM η > 0): one float64 standard normal of the sample's shape per noise call,
     in the order the sampler asks for it.

* Draws are made per sample on the CPU and stacked, so a sample's inputs do not depend on the batch
  it is in, on the batch size, on the process (torchrun rank) that draws it, on the device, or on
  whether the run was resumed (the approach of EDM's ``StackedRandomGenerator``).
* Pilot batches (``pfdiff-bench tune``) hash ``f"pfdiff-bench-pilot:{seed}:{i}"`` instead
  (:data:`PILOT_NAMESPACE`): a string no evaluation sample of any seed or seed range
  (``reproduce --seeds K`` offsets the index by ``r * num_samples``) can produce, because an
  evaluation string has an integer where the pilot string has ``-pilot``. Choosing (k, h) on the pilot
  therefore never looks at an x_T that a table is evaluated on.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

SCHEME = "sha256(pfdiff-bench:{seed}:{index})[:8] -> x_T, label, noise (per sample, CPU, float64)"
EVAL_NAMESPACE = "pfdiff-bench"
PILOT_NAMESPACE = "pfdiff-bench-pilot"  # tune's pilot batches: disjoint from every evaluation seed range


def seed_string(seed: int, index: int, namespace: str = EVAL_NAMESPACE) -> str:
    """The hashed string of sample ``index`` under base ``seed`` (see the module docstring)."""
    return f"{namespace}:{int(seed)}:{int(index)}"


def sample_seed(seed: int, index: int, namespace: str = EVAL_NAMESPACE) -> int:
    """The 63-bit generator seed of global sample ``index`` in a run with base seed ``seed``."""
    digest = hashlib.sha256(seed_string(seed, index, namespace).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generator(seed: int, index: int, namespace: str = EVAL_NAMESPACE) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index, namespace))


class StackedGenerators:
    """One CPU generator per sample of a batch; draws are made per sample and stacked."""

    def __init__(self, seed: int, indices: Sequence[int], namespace: str = EVAL_NAMESPACE):
        self.indices = [int(i) for i in indices]
        self.gens = [sample_generator(seed, i, namespace) for i in self.indices]

    def __len__(self) -> int:
        return len(self.gens)

    def randn(self, shape: Sequence[int], dtype=torch.float64, device=None) -> torch.Tensor:
        out = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float64) for g in self.gens])
        return out.to(device=device, dtype=dtype)

    def randint(self, high: int, device=None) -> torch.Tensor:
        out = torch.stack([torch.randint(0, int(high), (), generator=g) for g in self.gens])
        return out.to(device=device, dtype=torch.int64)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler noise for a batch ``x`` whose rows are this object's samples, in order."""
        if x.shape[0] != len(self.gens):
            raise ValueError(f"noise asked for a batch of {x.shape[0]} but {len(self.gens)} samples are seeded")
        return self.randn(x.shape[1:], dtype=x.dtype, device=x.device)


def draw_inputs(seed: int, indices: Sequence[int], shape: Sequence[int], num_classes: Optional[int],
                dtype=torch.float64, device=None, namespace: str = EVAL_NAMESPACE):
    """x_T, labels (int64, or None) and the per-sample noise source for a batch of global indices."""
    gens = StackedGenerators(seed, indices, namespace)
    x_T = gens.randn(shape, dtype=dtype, device=device)
    y = gens.randint(num_classes, device=device) if num_classes else None
    return x_T, y, gens
