"""Run reference cases of the official samplers (format ``pfdiff-sampler-cases/1``) through the library.

Each case is rebuilt from its own fields: the analytic toy model, the schedule, the sampler spec and
the grid length; our grid construction, sampler and NFE counting then run exactly as for a user.
A case passes when (fixtures/samplers/README.md, "Pass/fail rule") the sample is within ``rtol``
(relative to max|x0|), the NFE is equal, and every model call time matches (exactly for integer
grids, within 1e-6 for DPM-Solver). The recorded grid is checked too. A case that cannot be run is
a failure, never a skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from pfdiff_bench.errors import PFDiffError
from pfdiff_bench.models.analytic import AnalyticClassifierGrad, AnalyticEps, GaussianMixture
from pfdiff_bench.samplers import SamplerSpec, plan_for_length, run_sampler
from pfdiff_bench.schedules import ContinuousVP, DiscreteVP, VPSchedule

FORMAT = "pfdiff-sampler-cases/1"
_DATA = Path(__file__).resolve().parents[1] / "data"
BUNDLED_CASES = _DATA / "sampler_cases.pt"
BUNDLED_LDM_CASES = _DATA / "sampler_cases_ldm.pt"  # PFDIFF_LDM.md
# every bundled case file: the PFDiff-repo samplers, the baselines (fixtures/samplers_baselines), ldm
BUNDLED_FILES = (BUNDLED_CASES, _DATA / "sampler_cases_baselines.pt", BUNDLED_LDM_CASES)
_SOLVER = {"ddim": "ddim", "dpmsolver": "dpm-solver", "dpmsolver++": "dpm-solver++", "unipc": "unipc",
           "tab_deis": "deis", "ipndm": "ipndm"}
DPM_TIME_ATOL = 1e-6


@dataclass
class CaseResult:
    id: str
    ok: bool
    detail: str = ""
    rel_err: Optional[float] = None
    codebase: str = "?"


def load_cases(path: str | Path) -> dict:
    """Load a cases file with ``weights_only=True`` and check its format tag."""
    path = Path(path)
    if not path.is_file():
        raise PFDiffError(f"sampler cases file not found: {path}")
    try:
        fx = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise PFDiffError(f"cannot read sampler cases file {path}: {exc}") from exc
    if not isinstance(fx, dict) or fx.get("format") != FORMAT:
        raise PFDiffError(f"{path} is not a '{FORMAT}' file")
    return fx


def build_schedules(fx: dict) -> dict[str, VPSchedule]:
    out: dict[str, VPSchedule] = {}
    for name, sch in fx["schedules"].items():
        if "beta_0" in sch:
            out[name] = ContinuousVP(sch["beta_0"], sch["beta_1"], sch.get("label_scale", 999.0))
        else:
            out[name] = DiscreteVP(betas=sch.get("betas"), alphas_cumprod=sch.get("alphas_cumprod"), name=name)
    return out


def spec_from_case(case: dict) -> SamplerSpec:
    grid = case["grid"]
    pf = case.get("pfdiff")
    extra = {}
    if case["solver"] == "unipc":
        extra = dict(variant=case["variant"], predict="x0" if case["predict_x0"] else "eps",
                     final_corrector=bool(case.get("final_corrector")))
    if case["codebase"] == "deis":
        extra = dict(ts_order=grid.get("ts_order"))
    method = case.get("method") or "singlestep_fixed"
    return SamplerSpec(**extra,
        solver=_SOLVER[case["solver"]], convention=case["codebase"], grid=grid["type"],
        order=int(case.get("order") or 1), method="multistep" if case["codebase"] == "deis" else method,
        pfdiff=(int(pf["k"]), int(pf["h"])) if pf else None, eta=float(case.get("eta") or 0.0),
        lower_order_final=bool(case.get("lower_order_final")) if case.get("lower_order_final") is not None else True,
        t_start=grid.get("t_start"), t_end=grid.get("t_end"),
        clip_denoised=bool((case.get("guidance") or {}).get("clip_denoised", True)),
    )


def run_case(case: dict, fx: dict, schedules: dict[str, VPSchedule], gmm: GaussianMixture) -> CaseResult:
    cid = case.get("id", "?")
    try:
        schedule = schedules[case["schedule"]]
        spec = spec_from_case(case)
        grid = case["grid"]
        length = grid["length"] if case["codebase"] in ("ddim", "guided", "ldm") else grid["steps"]
        p = plan_for_length(spec, schedule, int(length))
        guidance = case.get("guidance") or None
        alpha_fn = schedule.alpha_bar_at_model_time
        if guidance and guidance.get("type") == "cfg":
            # classifier-free (fixtures/samplers_ldm/README.md): c = the labels, uc = label −1 = the
            # mixture's unconditional ε; scale 1 passes no uc, as the official script
            model = AnalyticEps(gmm, alpha_fn, class_cond=True)
            y = fx["labels"]
            scale = float(guidance["scale"])
            uc = torch.full_like(y, -1) if scale != 1.0 else None
            res = run_sampler(p, model, schedule, fx["x_T"].clone(), y=y, guidance_scale=scale, uncond=uc)
        else:
            class_cond = bool(guidance and guidance.get("class_cond"))
            model = AnalyticEps(gmm, alpha_fn, class_cond=class_cond)
            y = fx["labels"] if guidance else None
            cg = AnalyticClassifierGrad(gmm, alpha_fn) if guidance else None
            scale = float(guidance["classifier_scale"]) if guidance else 0.0
            res = run_sampler(p, model, schedule, fx["x_T"].clone(), y=y, classifier_grad=cg, guidance_scale=scale)
    except Exception as exc:  # noqa: BLE001 - a case we cannot run is a failure with its reason
        return CaseResult(cid, False, f"could not run: {type(exc).__name__}: {exc}", codebase=str(case.get("codebase")))

    problems = []
    exp = case["expected"]
    rel = float((res.x - exp["x0"]).abs().max() / exp["x0"].abs().max())
    if not rel <= float(case["rtol"]):
        problems.append(f"sample rel. error {rel:.3g} > rtol {case['rtol']:g}")
    if res.nfe != int(exp["nfe"]):
        problems.append(f"NFE {res.nfe} != expected {exp['nfe']}")
    exp_t = [float(v) for v in exp["call_t"]]
    integer_grid = case["codebase"] in ("ddim", "guided", "ldm")
    if len(res.call_t) != len(exp_t):
        problems.append(f"{len(res.call_t)} model calls != expected {len(exp_t)}")
    elif not _times_match(res.call_t, exp_t, integer_grid):
        problems.append(f"call times {_fmt(res.call_t)} != expected {_fmt(exp_t)}")
    if exp.get("call_batch") is not None and [int(v) for v in exp["call_batch"]] != res.call_batch:
        problems.append(f"call batch sizes {res.call_batch} != expected {[int(v) for v in exp['call_batch']]}")
    rec = grid.get("timesteps")
    if rec is not None and not _times_match(p.model_timesteps(schedule), [float(v) for v in rec], integer_grid):
        problems.append(f"grid {_fmt(p.model_timesteps(schedule))} != recorded {_fmt(rec)}")
    if grid.get("orders") is not None and p.orders is not None and list(grid["orders"]) != p.orders:
        problems.append(f"orders {p.orders} != recorded {list(grid['orders'])}")
    if grid.get("corrector") is not None and list(grid["corrector"]) != p.corrector:
        problems.append(f"correctors {p.corrector} != recorded {list(grid['corrector'])}")
    return CaseResult(cid, not problems, "; ".join(problems), rel, codebase=str(case["codebase"]))


def _times_match(got, exp, integer: bool) -> bool:
    if len(got) != len(exp):
        return False
    if integer:
        return all(float(a) == float(b) for a, b in zip(got, exp))
    return all(abs(float(a) - float(b)) <= DPM_TIME_ATOL for a, b in zip(got, exp))


def _fmt(vals, n: int = 8) -> str:
    vals = [float(v) for v in vals]
    s = ", ".join(f"{v:.6g}" for v in vals[:n])
    return f"[{s}{', ...' if len(vals) > n else ''}] ({len(vals)})"


def iter_results(path: str | Path) -> Iterator[CaseResult]:
    """Run every case of the file, in file order."""
    fx = load_cases(path)
    torch.set_num_threads(1)  # tiny float64 tensors: threads only add overhead (see pipeline.build)
    toy = fx["toy"]
    gmm = GaussianMixture(toy["means"], toy["std"], toy.get("weights"))
    schedules = build_schedules(fx)
    for case in fx["cases"]:
        yield run_case(case, fx, schedules, gmm)
