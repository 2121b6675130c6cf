"""Exact-error tables on the analytic model: RMS distance of each sampler's output to the exact
probability-flow ODE solution from the same x_T (ground truth, no FID needed).

Rows are sampler overrides of a base config (see ``TOY_ROWS``); columns are NFEs. The exact solution
depends only on x_T and the time interval a sampler integrates over, so it is computed once per
distinct (start ᾱ, end ᾱ) and shared by the rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from pfdiff_bench.config import override
from pfdiff_bench.errors import PFDiffError
from pfdiff_bench.pipeline import Setup, build
from pfdiff_bench.seeding import draw_inputs

# (row label, overrides of the base config's sampler section)
TOY_ROWS: list[tuple[str, dict]] = [
    ("DDIM", {"sampler.pfdiff": "none"}),
    ("DPM-Solver++(2M)", {"sampler.name": "dpm-solver++", "sampler.convention": "dpm_solver",
                          "sampler.method": "multistep", "sampler.order": 2, "sampler.grid": "time_uniform"}),
] + [(f"DDIM + PFDiff-{k}_{h}", {"sampler.pfdiff": f"{k},{h}"})
     for k, h in ((1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3))]


def plan_endpoints(setup: Setup) -> tuple[float, float]:
    """ᾱ where the plan starts and where it ends (ᾱ = 1 for the ddim/guided conventions)."""
    ts = setup.plan.model_timesteps(setup.schedule)
    a = setup.schedule.alpha_bar_at_model_time(torch.tensor([ts[0], ts[-1]], dtype=torch.float64))
    end = 1.0 if setup.plan.spec.convention in ("ddim", "guided") else float(a[1])
    return float(a[0]), end


def rms_to_exact(samples: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance over all coordinates."""
    return (samples - exact).flatten(1).pow(2).mean(1).sqrt()


@dataclass
class ExactTable:
    rows: list[str]
    nfes: list[int]
    cells: dict = field(default_factory=dict)     # (row, nfe) -> mean RMS or an error string
    num_samples: int = 0

    def best_row(self, nfe: int) -> Optional[str]:
        vals = {r: v for (r, n), v in self.cells.items() if n == nfe and isinstance(v, float)}
        return min(vals, key=vals.get) if vals else None


def exact_error_table(base_cfg: dict, rows=TOY_ROWS, nfes=(4, 6, 8, 10), num_samples: int = 64,
                      progress: Optional[Callable[[str], None]] = None) -> ExactTable:
    if base_cfg["model"]["type"] != "analytic":
        raise PFDiffError("exact error tables need the analytic model (model.type: analytic)")
    table = ExactTable([r for r, _ in rows], list(nfes), num_samples=num_samples)
    seed = base_cfg["sampling"]["seed"]
    exact_cache: dict = {}
    x_T = y = None
    for label, overrides in rows:
        for nfe in nfes:
            cfg = copy.deepcopy(base_cfg)
            try:
                for key, val in overrides.items():
                    override(cfg, key, val)
                setup = build(cfg, torch.device("cpu"), nfe=nfe)
            except PFDiffError as exc:  # e.g. an NFE the variant cannot finish: marked, never blank
                table.cells[(label, nfe)] = f"n/a ({exc})"
                continue
            if x_T is None:
                x_T, y, _ = draw_inputs(seed, range(num_samples), setup.sample_shape, setup.num_classes)
            res = setup.sample(x_T, y)
            if res.nfe != nfe:
                raise AssertionError(f"{label}: counted NFE {res.nfe} != {nfe}")
            a0, a1 = plan_endpoints(setup)
            key = (round(a0, 15), round(a1, 15))
            if key not in exact_cache:
                cond = y if setup.gmm is not None and cfg["model"]["class_cond"] else None
                exact_cache[key] = setup.gmm.reference_solution(x_T, a0, a1, y=cond)
            err = rms_to_exact(res.x, exact_cache[key])
            table.cells[(label, nfe)] = float(err.mean())
            if progress:
                progress(f"{label:24s} NFE {nfe:3d}: RMS {float(err.mean()):.5f}")
    return table


def format_markdown(table: ExactTable, digits: int = 4) -> str:
    head = "| Sampler \\ NFE | " + " | ".join(str(n) for n in table.nfes) + " |"
    sep = "|---|" + "---|" * len(table.nfes)
    lines = [head, sep]
    for r in table.rows:
        cells = []
        for n in table.nfes:
            v = table.cells.get((r, n), "not run")
            if isinstance(v, float):
                s = f"{v:.{digits}f}"
                cells.append(f"**{s}**" if table.best_row(n) == r else s)
            else:
                cells.append("n/a" if str(v).startswith("n/a") else str(v))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(table: ExactTable) -> str:
    out = ["sampler," + ",".join(f"nfe{n}" for n in table.nfes)]
    for r in table.rows:
        vals = [table.cells.get((r, n), "not run") for n in table.nfes]
        out.append(r + "," + ",".join(f"{v:.8g}" if isinstance(v, float) else "n/a" for v in vals))
    return "\n".join(out) + "\n"


def beats_baseline(table: ExactTable, baseline: str = "DDIM") -> dict[int, list[str]]:
    """Per NFE, the PFDiff rows whose error is below the baseline's."""
    out = {}
    for n in table.nfes:
        b = table.cells.get((baseline, n))
        out[n] = [r for r in table.rows if "PFDiff" in r and isinstance(table.cells.get((r, n)), float)
                  and isinstance(b, float) and table.cells[(r, n)] < b]
    return out


__all__ = ["TOY_ROWS", "ExactTable", "exact_error_table", "format_markdown", "format_csv", "beats_baseline",
           "plan_endpoints", "rms_to_exact"]
