"""In-memory exact-error cells for the analytic model (the fast path behind ``pfdiff-bench demo``).

Every cell of a table (``reproduce.plan_cells``) is sampled from the same x_T and scored by the mean
RMS distance to the exact probability-flow ODE solution from that x_T (``metrics.plan_endpoints``
gives the interval). The exact solution depends only on x_T and the interval, so it is computed once
per distinct interval and shared by the rows. Nothing is written to run directories: use
``pfdiff-bench reproduce toy`` for the persisted, resumable version of the same table.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from pfdiff_bench.errors import PFDiffError
from pfdiff_bench.evaluation.exact import plan_endpoints, rms_to_exact
from pfdiff_bench.sampling.setup import build
from pfdiff_bench.seeding import draw_inputs


def fill_exact_cells(cells: list, keep: int = 0, progress: Optional[Callable[[str], None]] = None,
                     exact_out: Optional[dict] = None) -> dict:
    """Set ``cell.value`` (mean RMS to the exact solution) of every runnable cell; returns the first
    ``keep`` samples of each cell, keyed by (row name, NFE), for the sample figures. With ``exact_out``
    (a dict), also puts there the first ``keep`` exact solutions each cell was scored against."""
    kept, exact_cache, x_T, y = {}, {}, None, None
    for cell in cells:
        if cell.cfg is None:
            continue
        if cell.cfg["model"]["type"] != "analytic":
            raise PFDiffError("exact error tables need the analytic model (model.type: analytic)")
        setup = build(cell.cfg, torch.device("cpu"), nfe=cell.nfe)
        if x_T is None:  # one x_T for every cell: same seeds across methods and NFEs
            n, seed = cell.cfg["sampling"]["num_samples"], cell.cfg["sampling"]["seed"]
            x_T, y, _ = draw_inputs(seed, range(n), setup.sample_shape, setup.num_classes)
        res = setup.sample(x_T, y)
        if res.nfe != cell.nfe:
            raise AssertionError(f"{cell.row.name}: counted NFE {res.nfe} != {cell.nfe}")
        key = tuple(round(a, 15) for a in plan_endpoints(setup))
        if key not in exact_cache:
            cond = y if cell.cfg["model"]["class_cond"] else None
            exact_cache[key] = setup.gmm.reference_solution(x_T, *key, y=cond)
        err = rms_to_exact(res.x, exact_cache[key])
        cell.value = float(err.mean())
        cell.result = {"metric": "exact", "rms_mean": cell.value, "rms_max": float(err.max()),
                       "num_samples": int(err.numel()), "nfe_counted": res.nfe,
                       "rms_per_sample": err.tolist()}
        if keep:
            kept[(cell.row.name, cell.nfe)] = res.x[:keep]
            if exact_out is not None:
                exact_out[(cell.row.name, cell.nfe)] = exact_cache[key][:keep]
        if progress:
            progress(f"{cell.row.name:28s} NFE {cell.nfe:3d}: RMS {cell.value:.5f}")
    return kept


def beats_baseline(res: dict) -> dict:
    """Per NFE, the PFDiff variants (single (k, h) rows) whose paired per-sample difference to the
    baseline row is below minus two standard errors (``reproduction.paired``); ties are not listed."""
    out = {}
    for n in res["nfe"]:
        out[n] = [r["name"] for r in res["rows"] if "PFDiff-" in r["name"] and not r.get("best_of")
                  and not r.get("auto") and (r["cells"][n].get("paired") or {}).get("verdict") == "better"]
    return out
