"""The PFDiff-k_h iteration cut at the model calls, for schedulers driven by a diffusers denoising loop.

A diffusers pipeline owns the loop: it calls the network at ``scheduler.timesteps[j]`` on the sample it
was handed and gives the output to ``scheduler.step``. PFDiff (spec PFDIFF.md §1.4, PFDIFF_LDM.md L6,
§6 for flow matching) evaluates the network once per iteration, at the springboard, so ``step`` j
receives the prediction at grid index ``eval_index(j)`` and does, over a grid of L = (k+1)·N − k points
(grid index L is the end point):

    j = 0:   Q = output at τ_0;  x_1 = φ(x_T, Q; 0 → 1)                     (plain first step)
    j ≥ 1:   n = 1 + (j−1)·s;  Q = output at the springboard τ_{n+h}
             x_{n+s} = φ(x_n, Q; n → n+s)                                   (foresight update from x_n)
    then it returns the next springboard φ(x_m, Q; m → m+h) (past score, no NFE) or, when m = L, x_L.

With L = s·N − k the last iteration lands exactly on the end point, so none of the official code's tails
(spec §1.4 "first and last steps", L6/L7) is ever taken and NFE = N. This module holds only that
index bookkeeping; the map φ (DDIM or Euler) belongs to the scheduler.
"""

from __future__ import annotations

from pfdiff_bench.errors import GridError

VARIANTS = ((1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3))  # the six PFDiff-k_h of the official code


def check_variant(k, h) -> tuple[int, int]:
    """(k, h) as ints if it is one of the six official variants, else a one-line GridError."""
    try:
        kh = (int(k), int(h))
    except (TypeError, ValueError):
        kh = None
    if kh not in VARIANTS or kh != (k, h):
        raise GridError(f"PFDiff (k, h) = ({k}, {h}) is not one of the six variants; accepted: "
                        + ", ".join(f"({a}, {b})" for a, b in VARIANTS) + " (recommended default (2, 1))")
    return kh


def grid_length(nfe, k: int) -> int:
    """L = (k+1)·N − k grid points for N network evaluations (spec §1.5, the official run scripts)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise GridError(f"num_inference_steps (the NFE) must be an integer >= 1 (got {nfe!r})")
    return (k + 1) * nfe - k


def eval_indices(length: int, k: int, h: int) -> list[int]:
    """Grid indices where the network is evaluated: 0, then the springboards 1+h, 1+s+h, ... (N of them)."""
    s = k + 1
    if length < 1 or (length - 1) % s:
        raise GridError(f"a PFDiff-{k}_{h} grid needs L = {s}·N − {k} points (got L = {length})")
    return [0] + [n + h for n in range(1, length, s)]


class PFDiffCursor:
    """Where a PFDiff run stands: the state x_n, its grid index n, the buffer Q and the next call j."""

    def __init__(self, length: int, k: int, h: int):
        self.length, self.k, self.h, self.s = length, k, h, k + 1
        self.evals = eval_indices(length, k, h)
        self.j = 0          # index of the next expected network call (entry of `timesteps`)
        self.n = 0          # grid index of the state x
        self.x = None
        self.q = None

    @property
    def nfe(self) -> int:
        return len(self.evals)

    def advance(self, q, x_start, phi):
        """Consume the prediction ``q`` of call j; return (sample for the next call or the final x, done).

        ``phi(x, q, i, j)`` is the first-order map between grid indices; ``x_start`` is x_T on call 0.
        """
        if self.j >= self.nfe:
            raise GridError(f"step() called more than num_inference_steps = {self.nfe} times; "
                            "call set_timesteps() before a new run")
        if self.j == 0:
            self.x, self.n, span = x_start, 0, 1          # plain first step; its prediction seeds Q
        else:
            span = self.s                                  # foresight update over s intervals from x_n
        self.q = q
        self.x = phi(self.x, q, self.n, self.n + span)
        self.n += span
        self.j += 1
        if self.n == self.length:                          # landed on the end point
            return self.x, True
        return phi(self.x, q, self.n, self.n + self.h), False  # springboard from the past score
