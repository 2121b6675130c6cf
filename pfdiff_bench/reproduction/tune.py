"""Choosing PFDiff's (k, h) without the test metric (issue 19; our criterion, documented in docs/TUNE.md).

For each NFE, the baseline (the config's sampler without PFDiff) and the six PFDiff variants run on a
*pilot* batch whose x_T come from the pilot seed namespace (``seeding.PILOT_NAMESPACE``), disjoint from
every evaluation seed range. Each final sample is compared with a high-accuracy solution of the same
probability-flow ODE from the same x_T over the same interval:

* analytic model: the exact solution (``GaussianMixture.reference_solution``);
* network: DPM-Solver (noise prediction, singlestep, fixed order, logSNR grid) at a large NFE
  (``--reference dpm-solver-ORDER:STEPS``, default ``dpm-solver-3:100``, i.e. 300 evaluations),
  started at the plan's first time point; for the ddim/guided conventions, whose last step lands on
  ᾱ = 1, one final denoising step x0 = (x - σ ε)/α at the last grid time is added so both end at the
  same point. Its own convergence is checked by halving its step: the mean RMS distance between the
  STEPS and STEPS/2 solutions is reported as the reference's self-convergence figure.

The pick is the variant with the smallest mean per-sample RMS distance; every variant's distance, the
pick and the pilot's cost in network evaluations are reported.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable, Optional

from pfdiff_bench.errors import ConfigError, PFDiffError

DEFAULT_NETWORK_REFERENCE = "dpm-solver-3:100"
CACHE_NAME = "tune.json"


def parse_reference(text: Optional[str], analytic: bool) -> dict:
    """'exact' (analytic model only) or 'dpm-solver-ORDER:STEPS' (ORDER 1-3, STEPS >= 2)."""
    if text is None:
        text = "exact" if analytic else DEFAULT_NETWORK_REFERENCE
    if text == "exact":
        if not analytic:
            raise ConfigError("--reference exact needs the analytic model; for a network use dpm-solver-ORDER:STEPS "
                              f"(e.g. {DEFAULT_NETWORK_REFERENCE})")
        return {"kind": "exact", "spec": text}
    m = re.fullmatch(r"dpm-solver-([123]):(\d+)", text.strip())
    if not m or int(m.group(2)) < 2:
        raise ConfigError(f"unknown --reference {text!r}; accepted: exact (analytic model) or dpm-solver-ORDER:STEPS "
                          f"with ORDER 1, 2 or 3 and STEPS >= 2 (e.g. {DEFAULT_NETWORK_REFERENCE})")
    return {"kind": "dpm-solver", "spec": text, "order": int(m.group(1)), "steps": int(m.group(2))}


def _variants():
    from pfdiff_bench.grids import PFDIFF_VARIANTS

    return [(None, "baseline")] + [(kh, f"{kh[0]}_{kh[1]}") for kh in PFDIFF_VARIANTS]


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _continuous_time(schedule, u: float) -> float:
    """DPM-Solver time t whose network time argument is ``u`` (``model_time`` is affine in t)."""
    import torch

    a, b = (float(schedule.model_time(torch.tensor(v, dtype=torch.float64))) for v in (0.0, 1.0))
    return (u - a) / (b - a)


def _reference_solve(setup, p, x_T, y, order: int, steps: int) -> tuple:
    """DPM-Solver-``order`` with ``steps`` fixed-order steps over plan ``p``'s interval; (x, nfe)."""
    import torch

    from pfdiff_bench.samplers import SamplerSpec, plan, run_sampler

    ts = p.model_timesteps(setup.schedule)
    ends_at_one = p.spec.convention != "dpm_solver"
    t_start = _continuous_time(setup.schedule, ts[0]) if ends_at_one else p.t_start
    t_end = _continuous_time(setup.schedule, ts[-1]) if ends_at_one else p.t_end
    spec = SamplerSpec(solver="dpm-solver", convention="dpm_solver", grid="logSNR", order=order,
                       method="singlestep_fixed", t_start=t_start, t_end=t_end, clip_denoised=False,
                       float32_coefficients=p.spec.float32_coefficients)
    rp = plan(spec, setup.schedule, order * steps)
    x = run_sampler(rp, setup.model, setup.schedule, x_T.to(setup.device, setup.dtype),
                    y=None if y is None else y.to(setup.device)).x
    nfe = rp.nfe
    if ends_at_one:  # the ddim/guided last step goes to ᾱ = 1: the same x0 prediction at the last grid time
        u = torch.full((x.shape[0],), float(ts[-1]), dtype=torch.float64, device=x.device)
        a = setup.schedule.alpha_bar_at_model_time(u).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        eps = setup.model(x, u, None if y is None else y.to(setup.device))
        x = (x - (1 - a).sqrt() * eps) / a.sqrt()
        nfe += 1
    return x.detach(), nfe


def tune(cfg: dict, nfes: list[int], pilot: int = 256, reference: Optional[str] = None,
         device: Optional[str] = None, batch_size: Optional[int] = None,
         log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the pilot for every NFE and return the per-NFE distances, picks, costs (JSON-ready)."""
    import torch

    from pfdiff_bench.config import override
    from pfdiff_bench.evaluation.exact import plan_endpoints, rms_to_exact
    from pfdiff_bench.samplers import plan
    from pfdiff_bench.sampling.setup import build, resolve_device, sampler_spec
    from pfdiff_bench.seeding import PILOT_NAMESPACE, draw_inputs

    if pilot < 2:
        raise ConfigError(f"--pilot must be at least 2 samples (got {pilot})")
    if not nfes:
        raise ConfigError("--nfe needs at least one NFE, e.g. 4,6,8,10")
    base = copy.deepcopy(cfg)
    if float(base["sampler"]["eta"]) != 0 or float(base["guidance"]["scale"]) > 0:
        raise ConfigError("tune compares deterministic probability-flow ODE samplers: it needs sampler.eta 0 and no "
                          "classifier guidance (guidance.scale 0)")
    analytic = base["model"]["type"] == "analytic"
    ref = parse_reference(reference, analytic)
    override(base, "sampler.pfdiff", "none")
    dev = resolve_device(device or base["sampling"]["device"])
    setup0 = build(base, dev, nfe=int(nfes[0]))
    bs = int(batch_size or base["sampling"]["batch_size"])
    seed = int(base["sampling"]["seed"])
    x_T, y, _ = draw_inputs(seed, range(pilot), setup0.sample_shape, setup0.num_classes, namespace=PILOT_NAMESPACE)
    cond = y if (analytic and base["model"]["class_cond"]) or not analytic else None
    refs, cost, out = {}, 0, {}
    for n in nfes:
        entry = {"distances": {}, "nfe_counted": {}, "n/a": {}}
        for kh, label in _variants():
            c = copy.deepcopy(base)
            override(c, "sampler.pfdiff", "none" if kh is None else f"{kh[0]},{kh[1]}")
            try:
                p = plan(sampler_spec(c), setup0.schedule, int(n))
            except PFDiffError as exc:
                entry["n/a"][label] = str(exc)
                continue
            setup = dataclasses.replace(setup0, cfg=c, plan=p)
            key = tuple(round(a, 12) for a in plan_endpoints(setup))
            if key not in refs:
                refs[key] = _reference(setup, x_T, cond, ref, bs, log)
                cost += refs[key]["cost"]
            xs = []
            for sl in _batches(pilot, bs):
                res = setup.sample(x_T[sl], None if y is None else y[sl])
                if res.nfe != p.nfe:
                    raise AssertionError(f"{label}: counted NFE {res.nfe} != planned {p.nfe}")
                xs.append(res.x.to(torch.float64).cpu())
                cost += res.nfe * (sl.stop - sl.start)
            d = rms_to_exact(torch.cat(xs), refs[key]["x"])
            entry["distances"][label] = float(d.mean())
            entry["nfe_counted"][label] = p.nfe
            entry.setdefault("se", {})[label] = float(d.std() / math.sqrt(d.numel()))
            entry.setdefault("self_convergence", {})[label] = refs[key]["self_convergence"]
        cands = {k: v for k, v in entry["distances"].items() if k != "baseline"}
        entry["pick"] = min(cands, key=cands.get) if cands else None
        out[int(n)] = entry
        if log:
            log(_fmt_nfe(int(n), entry))
    sc = [r["self_convergence"] for r in refs.values() if r["self_convergence"] is not None]
    return {"config": base.get("name"), "model": base["model"]["type"], "sampler": base["sampler"]["name"],
            "convention": base["sampler"]["convention"], "grid": base["sampler"]["grid"], "pilot": pilot,
            "seed": seed, "seed_namespace": PILOT_NAMESPACE, "reference": ref["spec"],
            "reference_self_convergence_max": max(sc) if sc else None, "criterion":
            "smallest mean per-sample RMS distance to the reference solution from the same x_T",
            "cost_nfe": cost, "nfe": out,
            "picks": {n: e["pick"] for n, e in out.items()}}


def _reference(setup, x_T, y, ref: dict, bs: int, log) -> dict:
    """The high-accuracy solution over ``setup``'s interval; with its cost and self-convergence figure."""
    import torch

    from pfdiff_bench.evaluation.exact import plan_endpoints, rms_to_exact

    if ref["kind"] == "exact":
        a_start, a_end = plan_endpoints(setup)
        x = setup.gmm.to("cpu").reference_solution(x_T.to(torch.float64), a_start, a_end, y=y)
        return {"x": x, "cost": 0, "self_convergence": None}
    full, half, cost = [], [], 0
    for sl in _batches(x_T.shape[0], bs):
        yb = None if y is None else y[sl]
        xf, nf = _reference_solve(setup, setup.plan, x_T[sl], yb, ref["order"], ref["steps"])
        xh, nh = _reference_solve(setup, setup.plan, x_T[sl], yb, ref["order"], max(1, ref["steps"] // 2))
        full.append(xf.to(torch.float64).cpu())
        half.append(xh.to(torch.float64).cpu())
        cost += (nf + nh) * (sl.stop - sl.start)
    x = torch.cat(full)
    sc = float(rms_to_exact(torch.cat(half), x).mean())
    if log:
        a0, a1 = plan_endpoints(setup)
        log(f"reference {ref['spec']} on alpha_bar [{a0:.5g}, {a1:.5g}]: self-convergence (mean RMS between "
            f"{ref['steps']} and {max(1, ref['steps'] // 2)} steps) {sc:.3g}")
    return {"x": x, "cost": cost, "self_convergence": sc}


def _fmt_nfe(n: int, e: dict) -> str:
    parts = [f"{k} {v:.5f}" + (" *" if k == e["pick"] else "") for k, v in e["distances"].items()]
    na = f"; n/a: {', '.join(e['n/a'])}" if e["n/a"] else ""
    return f"NFE {n:>3}: " + ", ".join(parts) + f"{na} -> pick {e['pick']}"


def write_choice(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tune_choice.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------ the table's auto row
def auto_picks(table, cells: list, out: Path, pilot: int = 256, reference: Optional[str] = None,
               log: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """Per NFE of the table, the row of its PFDiff group that ``tune`` picks on the pilot batch.

    Computed once per table and cached in ``out/tune.json`` together with its inputs (base config, NFEs,
    pilot size, reference, variant rows); a change of any input recomputes it. None when the table has
    no PFDiff group."""
    from pfdiff_bench.config import load_config, parse_pfdiff

    if not table.best_of:
        return None
    grp = table.best_of["group"]
    members = {}
    for r in table.rows:
        if r.group == grp and "pfdiff" in r.sampler and set(r.sampler) == {"pfdiff"}:
            kh = parse_pfdiff(r.sampler["pfdiff"])
            members[f"{kh[0]}_{kh[1]}"] = r.name
    if not members:
        return None
    nfes = sorted({c.nfe for c in cells})
    cfg = load_config(table.config)
    inputs = {"config": cfg, "nfe": nfes, "pilot": pilot, "reference": reference, "rows": members, "version": 1}
    cache = out / CACHE_NAME
    result = None
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("inputs") == json.loads(json.dumps(inputs)):
                result = saved["result"]
        except (ValueError, KeyError):
            result = None
    if result is None:
        result = tune(cfg, nfes, pilot=pilot, reference=reference, log=log)
        out.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"inputs": inputs, "result": result}, indent=1) + "\n")
    picks = {int(n): members.get(p) for n, p in result["picks"].items()}
    return {"picks": picks, "summary": {"pilot": result["pilot"], "reference": result["reference"],
                                        "cost_nfe": result["cost_nfe"], "seed_namespace": result["seed_namespace"],
                                        "cache": str(cache)}}
