"""PFDiff-k_h on a first-order solver (spec PFDIFF.md §1.4, §2.4, §7).

One iteration spans s = k+1 grid intervals and costs one evaluation:

    x̂ = φ(x_n, Q; τ_n → τ_{n+h})          past score -> springboard      (no NFE)
    Q = predict(x̂, τ_{n+h})                future score at the springboard (1 NFE)
    x_{n+s} = φ(x_n, Q; τ_n → τ_{n+s})     foresight update from x_n

The first step is a plain DDIM step whose prediction seeds Q. The buffer Q is ε in the ddim
codebase and the clipped, guided x̂0' in guided-diffusion; the ``space`` decides (see first_order.py).
"""

from __future__ import annotations

import torch

from pfdiff_bench.errors import GridError
from pfdiff_bench.samplers.first_order import Callback, _GridSpace


def sample_pfdiff(space: _GridSpace, x: torch.Tensor, k: int, h: int, tails: bool = True,
                  callback: Callback = None) -> torch.Tensor:
    """PFDiff-k_h over the L points of ``space``, ending at ᾱ = 1.

    ``tails=True`` is the ddim codebase's handling when fewer than s intervals remain (spec §1.4):
    one interval left -> a plain DDIM step; two or three left (s ≥ 3) -> a springboard at +1 and a
    jump to the end. ``tails=False`` (guided-diffusion, which has none) requires (L−1) % s == 0.
    ``callback(kind, j, x)`` (optional) sees each springboard ("springboard") and new state ("state").
    """
    cb = callback or (lambda kind, j, v: None)
    L, s = len(space), k + 1
    if not 1 <= h <= k:
        raise GridError(f"PFDiff needs 1 <= h <= k (got k={k}, h={h})")
    if not tails and (L - 1) % s != 0:
        raise GridError(f"PFDiff-{k}_{h} without tails needs (L-1) divisible by {s} (got L={L})")
    q = space.predict(x, 0)
    x = space.step(x, q, 0, 1)
    cb("state", 1, x)
    n = 1
    while n <= L - 1:
        if n + 1 == L:                         # one interval left: plain DDIM step
            x = space.step(x, space.predict(x, n), n, L)
            cb("state", L, x)
            break
        if n + s > L:                          # 2 or 3 intervals left: springboard forced to +1
            x_hat = space.step(x, q, n, n + 1)
            cb("springboard", n + 1, x_hat)
            q = space.predict(x_hat, n + 1)
            x = space.step(x, q, n, L)
            cb("state", L, x)
            break
        x_hat = space.step(x, q, n, n + h)     # past score -> springboard
        cb("springboard", n + h, x_hat)
        q = space.predict(x_hat, n + h)        # future score at the springboard
        x = space.step(x, q, n, n + s)         # foresight update from x_n
        cb("state", n + s, x)
        n += s
    return x
