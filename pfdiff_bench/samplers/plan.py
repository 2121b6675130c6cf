"""Sampler planning: :class:`SamplerSpec` (which algorithm), :func:`plan` (requested NFE -> the grid the
official scripts would use), :func:`valid_nfes` and the refusals of combinations the official code would
not finish cleanly (spec PFDIFF.md §1, §2.3, §2.4: "quirks ... are facts about that code, not behaviour
to copy")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from pfdiff_bench import grids
from pfdiff_bench.errors import GridError
from pfdiff_bench.samplers.deis import DEFAULT_TS_ORDER, DEIS_GRIDS, DeisSDE, deis_time_steps, tab_orders
from pfdiff_bench.samplers.dpm_solver import multistep_orders
from pfdiff_bench.samplers.ipndm import ipndm_orders
from pfdiff_bench.samplers.ldm import ldm_nfe, ldm_uniform, stale_tail
from pfdiff_bench.samplers.unipc import VARIANTS, unipc_correctors, unipc_orders
from pfdiff_bench.schedules import DiscreteVP, VPSchedule

SOLVERS = ("ddim", "dpm-solver", "dpm-solver++", "unipc", "deis", "ipndm")
CONVENTIONS = ("ddim", "guided", "dpm_solver", "deis", "ldm")
METHODS = ("singlestep_fixed", "singlestep", "multistep")
_DEFAULT_GRID = {"ddim": "uniform", "guided": "ddim_respacing", "dpm_solver": "logSNR", "deis": "t", "ldm": "uniform"}
_GRIDS = {"ddim": grids.DDIM_GRIDS, "guided": grids.GUIDED_GRIDS, "dpm_solver": grids.DPM_GRIDS, "deis": DEIS_GRIDS,
          "ldm": ("uniform",)}  # ldm: Stable Diffusion's make_ddim_timesteps (PFDIFF_LDM.md §L2)
# the codebase each solver lives in (spec BASELINES.md: UniPC in the DPM-Solver API, DEIS/iPNDM in DEIS time)
SOLVER_CONVENTION = {"unipc": "dpm_solver", "deis": "deis", "ipndm": "deis"}
PREDICTIONS = ("x0", "eps")


@dataclass(frozen=True)
class SamplerSpec:
    """What algorithm to run. ``convention`` picks the official codebase profile (spec §1, §2.4, §2.3;
    ``deis`` = DEIS's own time for the tAB-DEIS / iPNDM baselines, BASELINES.md §4)."""

    solver: str = "ddim"
    convention: str = "ddim"
    grid: Optional[str] = None
    order: int = 1
    method: str = "singlestep_fixed"
    pfdiff: Optional[tuple[int, int]] = None
    eta: float = 0.0
    lower_order_final: bool = True
    t_start: Optional[float] = None
    t_end: Optional[float] = None
    clip_denoised: bool = True
    float32_coefficients: bool = True
    variant: str = "bh1"              # UniPC B(h): bh1 = h, bh2 = e^h − 1
    predict: str = "x0"               # UniPC model value: data (x0) or noise (eps) prediction
    final_corrector: bool = False     # UniPC: also correct the last update (+1 NFE, BASELINES.md §2.3)
    ts_order: Optional[float] = None  # DEIS grid exponent k ("t": time^(1/k) uniform, "rho": EDM ρ)

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise GridError(f"unknown sampler {self.solver!r}; accepted: {', '.join(SOLVERS)}")
        if self.convention not in CONVENTIONS:
            raise GridError(f"unknown convention {self.convention!r}; accepted: {', '.join(CONVENTIONS)}")
        if self.grid is None:
            object.__setattr__(self, "grid", _DEFAULT_GRID[self.convention])
        if self.grid not in _GRIDS[self.convention]:
            raise GridError(f"grid {self.grid!r} does not exist in the {self.convention} convention; "
                            f"accepted: {', '.join(_GRIDS[self.convention])}")
        if self.pfdiff is not None:
            pf = tuple(int(v) for v in self.pfdiff)
            if pf not in grids.PFDIFF_VARIANTS:
                raise GridError(f"PFDiff (k, h) = {pf} is not one of the six variants; accepted: "
                                + ", ".join(f"{k},{h}" for k, h in grids.PFDIFF_VARIANTS) + ", none")
            object.__setattr__(self, "pfdiff", pf)
        if self.solver in SOLVER_CONVENTION and self.convention != SOLVER_CONVENTION[self.solver]:
            raise GridError(f"sampler {self.solver!r} needs the {SOLVER_CONVENTION[self.solver]} convention "
                            f"(got {self.convention})")
        if self.solver in SOLVER_CONVENTION and self.pfdiff is not None:
            raise GridError(f"PFDiff is not defined on the {self.solver} baseline; use --pfdiff none")
        if self.variant not in VARIANTS:
            raise GridError(f"unknown UniPC variant {self.variant!r}; accepted: {', '.join(VARIANTS)}")
        if self.predict not in PREDICTIONS:
            raise GridError(f"unknown prediction {self.predict!r}; accepted: {', '.join(PREDICTIONS)}")
        if self.convention == "deis":
            if self.solver not in ("deis", "ipndm"):
                raise GridError(f"the deis convention runs 'deis' (tAB-DEIS) or 'ipndm' (got {self.solver!r})")
            if self.solver == "deis" and self.order not in (1, 2, 3):
                raise GridError(f"tAB-DEIS order must be 1, 2 or 3 (got {self.order})")
            if self.solver == "ipndm":
                if self.order not in (1, 2, 3, 4):
                    raise GridError(f"iPNDM order must be 1, 2, 3 or 4 (got {self.order})")
                if self.grid != "t" or self.ts_order not in (None, 1, 1.0):
                    raise GridError("iPNDM's official sampler always uses the time-uniform grid; accepted: "
                                    "--grid t with --ts-order 1")
                object.__setattr__(self, "ts_order", 1.0)
            if self.ts_order is None:
                object.__setattr__(self, "ts_order", DEFAULT_TS_ORDER[self.grid])
            elif self.grid == "log":
                raise GridError("the DEIS 'log' grid has no exponent; drop --ts-order or use --grid t or rho")
            elif not self.ts_order > 0:
                raise GridError(f"DEIS ts_order must be > 0 (got {self.ts_order})")
            object.__setattr__(self, "method", "multistep")  # linear multistep methods; `method` is unused
        elif self.convention == "dpm_solver":
            if self.solver == "unipc":
                if self.method == "singlestep_fixed":  # the config default: UniPC runs multistep only
                    object.__setattr__(self, "method", "multistep")
                if self.method != "multistep":
                    raise GridError(f"UniPC runs multistep only (got method {self.method!r}); accepted: multistep")
            if self.solver == "ddim":
                raise GridError("the dpm_solver convention runs 'dpm-solver' or 'dpm-solver++' "
                                "(DDIM there is dpm-solver with --order 1)")
            if self.order not in (1, 2, 3):
                raise GridError(f"DPM-Solver order must be 1, 2 or 3 (got {self.order})")
            if self.method not in METHODS:
                raise GridError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
            if self.method == "multistep" and self.pfdiff is not None:
                raise GridError("PFDiff is defined on singlestep DPM-Solver only (the official multistep "
                                "PFDiff branch returns x_T); use --method singlestep_fixed or --pfdiff none")
        else:
            if self.solver != "ddim":
                raise GridError(f"sampler {self.solver!r} needs the dpm_solver convention "
                                f"(the {self.convention} convention is DDIM-based)")
            if self.order != 1:
                raise GridError(f"the {self.convention} convention is first order (got order {self.order})")
        if self.eta < 0:
            raise GridError(f"eta must be >= 0 (got {self.eta})")
        if self.eta > 0 and self.convention != "ddim":
            raise GridError("eta > 0 is supported in the ddim convention only")

    @property
    def algorithm(self) -> str:
        if self.solver == "unipc":  # UniPC's data/noise prediction = DPM-Solver++'s / DPM-Solver's model_fn
            return "dpmsolver++" if self.predict == "x0" else "dpmsolver"
        return {"dpm-solver": "dpmsolver", "dpm-solver++": "dpmsolver++"}.get(self.solver, "ddim")

    def label(self) -> str:
        """Short human-readable name, e.g. 'DDIM + PFDiff-2_1' or 'DPM-Solver++(2M)'."""
        if self.solver == "unipc":
            return (f"UniPC-{self.order} ({self.variant}, {self.predict})"
                    + (" + final corrector" if self.final_corrector else ""))
        if self.solver == "deis":
            return f"tAB{self.order}-DEIS ({self.grid}{'' if self.grid == 'log' else f'{self.ts_order:g}'} grid)"
        if self.solver == "ipndm":
            return "iPNDM" + ("" if self.order == 4 else f"-{self.order}")
        if self.convention == "dpm_solver":
            name = "DPM-Solver++" if self.solver == "dpm-solver++" else "DPM-Solver"
            if self.method == "multistep":
                name += f"({self.order}M)"
            else:
                name += f"-{self.order}" + (" fast" if self.method == "singlestep" else "")
        else:
            name = "DDIM" + (f" (eta={self.eta:g})" if self.eta else "")
        if self.pfdiff:
            name += " + PFDiff-{}_{}".format(*self.pfdiff)
        return name


@dataclass
class Plan:
    """A spec on a concrete grid. ``timesteps``: model-time grid points in sampling order (ints for the
    ddim/guided conventions, whose end point ᾱ = 1 is implicit; continuous times for dpm_solver)."""

    spec: SamplerSpec
    timesteps: list
    nfe: int
    length: int                      # L / M / K (grid points or outer intervals)
    steps: Optional[int] = None      # DPM-Solver `steps` argument
    orders: Optional[list[int]] = None
    t_start: Optional[float] = None
    t_end: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    corrector: Optional[list[bool]] = None   # UniPC: whether UniC ran in each update

    def model_timesteps(self, schedule: VPSchedule) -> list[float]:
        """Grid points in the network's time units (what the model is called with)."""
        if self.spec.convention == "deis":
            return DeisSDE(schedule).model_time(torch.tensor(self.timesteps, dtype=torch.float64)).tolist()
        if self.spec.convention != "dpm_solver":
            return [float(t) for t in self.timesteps]
        return schedule.model_time(torch.tensor(self.timesteps, dtype=torch.float64)).tolist()

    def describe(self) -> dict:
        d = {"sampler": self.spec.label(), "spec": asdict(self.spec), "nfe": self.nfe, "grid_length": self.length,
             "timesteps": self.timesteps}
        if self.orders is not None:
            d.update(steps=self.steps, orders=self.orders, t_start=self.t_start, t_end=self.t_end)
        return d


# ----------------------------------------------------------------------------- planning
def plan_for_length(spec: SamplerSpec, schedule: VPSchedule, length: int) -> Plan:
    """Plan on a grid of ``length`` points (ddim, guided) or DPM-Solver ``steps`` (dpm_solver)."""
    c = spec.convention
    if c == "ldm":
        if not isinstance(schedule, DiscreteVP):
            raise GridError("the ldm convention needs a discrete schedule")
        if stale_tail(length, spec.pfdiff):
            # PFDIFF_LDM.md §L7: the official tail evaluates a stale (h = 1) or undefined (h > 1) springboard
            raise GridError(_refusal(spec, f"grid length {length}", why="the official code's two-intervals-left "
                                     "tail would evaluate a stale or undefined springboard"))
        asc = ldm_uniform(length, schedule.total_N)
        return Plan(spec, list(reversed(asc)), ldm_nfe(length, spec.pfdiff), len(asc))
    if c in ("ddim", "guided"):
        if not isinstance(schedule, DiscreteVP):
            raise GridError(f"the {c} convention needs a discrete schedule")
        n_train = schedule.total_N
        if c == "ddim":
            asc = (grids.ddim_uniform if spec.grid == "uniform" else grids.ddim_quad)(length, n_train)
            nfe = grids.ddim_convention_nfe(length, spec.pfdiff)
        else:
            asc = (grids.ddim_respacing(length, n_train) if spec.grid == "ddim_respacing"
                   else grids.section_respacing(length, n_train))
            nfe = length
            if spec.pfdiff is not None:
                s = spec.pfdiff[0] + 1
                if length < s or (length - 1) % s != 0:
                    raise GridError(_refusal(spec, f"grid length {length}", s))
                nfe = 1 + (length - 1) // s
        _refuse_degenerate(spec, asc, n_train)
        return Plan(spec, list(reversed(asc)), nfe, len(asc))
    steps = length
    if c == "deis":  # BASELINES.md §4: NFE = num_step, calls at τ_0..τ_{N−1}
        sde = DeisSDE(schedule)
        if steps < 1:
            raise GridError(f"{spec.label()} needs at least 1 step (got {steps})")
        ts = deis_time_steps(sde, spec.grid, steps, spec.ts_order, spec.t_start, spec.t_end)
        orders = tab_orders(steps, spec.order) if spec.solver == "deis" else ipndm_orders(steps, spec.order)
        return Plan(spec, ts, steps, steps, steps=steps, orders=orders, t_start=ts[0], t_end=ts[-1])
    # dpm_solver
    t_T = spec.t_start if spec.t_start is not None else schedule.T
    t_0 = spec.t_end if spec.t_end is not None else schedule.t_end_default
    if spec.method == "multistep":
        if steps < spec.order:
            raise GridError(f"{spec.label()} needs at least {spec.order} steps (got {steps})")
        ts = grids.dpm_time_steps(schedule, spec.grid, t_T, t_0, steps)
        if spec.solver == "unipc":  # BASELINES.md §2.3: NFE = steps, + 1 with the final corrector
            return Plan(spec, ts.tolist(), steps + int(spec.final_corrector), steps, steps=steps,
                        orders=unipc_orders(steps, spec.order, spec.lower_order_final), t_start=t_T, t_end=t_0,
                        corrector=unipc_correctors(steps, spec.final_corrector))
        orders = multistep_orders(steps, spec.order, spec.lower_order_final)
        return Plan(spec, ts.tolist(), steps, steps, steps=steps, orders=orders, t_start=t_T, t_end=t_0)
    orders = grids.singlestep_orders(steps, spec.order, spec.method)
    if not orders:
        raise GridError(f"{steps} steps give no {spec.method} interval of order {spec.order}")
    ts = grids.singlestep_outer_grid(schedule, spec.grid, t_T, t_0, steps, orders, spec.method)
    processed = grids.dpm_processed_steps(orders, spec.pfdiff)
    if spec.pfdiff is not None:
        s = spec.pfdiff[0] + 1
        if len(orders) < s or (len(orders) - 1) % s != 0:
            raise GridError(_refusal(spec, f"{steps} steps ({len(orders)} intervals)", s))
    nfe = sum(orders[i] for i in processed)
    return Plan(spec, ts.tolist(), nfe, len(orders), steps=steps, orders=orders, t_start=t_T, t_end=t_0)


def _refuse_degenerate(spec: SamplerSpec, asc: list, n_train: int) -> None:
    """Refuse grids that pass as results but are not sampling runs (issue 10 item 12).

    A one-point grid (ddim ``--nfe 1``: ``[0]``) takes no step from the noise: the sampler returns its
    input. A grid longer than the model's ``n_train`` timesteps must repeat timesteps that the official
    grid of that length does not make distinct (NFE 5000 on a 1000-step model: 1000 distinct points).
    Repeats the official grid itself makes (``quad`` repeats 0 from L ~ 30) are kept.
    """
    if len(asc) < 2:
        raise GridError(f"{spec.label()} ({spec.convention} convention, {spec.grid} grid) on a grid of "
                        f"{len(asc)} point ({asc}) takes no step from the noise and returns it unchanged; use a grid "
                        f"of at least 2 points; NFE values that work: {', '.join(map(str, valid_nfes(spec))) or 'none'}")
    if len(asc) > n_train:
        raise GridError(f"{spec.label()}: a grid of {len(asc)} points on a model of {n_train} timesteps repeats "
                        f"timesteps ({len(set(asc))} distinct); the largest grid is {n_train} points")


def plan(spec: SamplerSpec, schedule: VPSchedule, nfe: int) -> Plan:
    """The grid the official scripts would use for ``nfe`` evaluations, or a GridError saying which work."""
    if nfe < 1:
        raise GridError(f"NFE must be at least 1 (got {nfe})")
    length = _length_for_nfe(spec, nfe)
    if length is None:
        raise GridError(_refusal(spec, f"NFE {nfe}"))
    p = plan_for_length(spec, schedule, length)
    if p.nfe != nfe:  # a planning bug, never a user error
        raise AssertionError(f"planned NFE {p.nfe} != requested {nfe}")
    return p


def _length_for_nfe(spec: SamplerSpec, nfe: int) -> Optional[int]:
    k = spec.pfdiff[0] if spec.pfdiff else 0
    s = k + 1
    if spec.convention in ("ddim", "guided", "ldm"):
        length = grids.pfdiff_grid_length(nfe, k)  # ldm: the run scripts' S = s·N − k (no tail)
        if spec.convention == "guided" and spec.grid == "ddim_respacing" and not grids._has_respacing(length):
            return None
        return length
    if spec.convention == "deis":
        return nfe
    if spec.solver == "unipc":
        steps = nfe - int(spec.final_corrector)
        return steps if steps >= spec.order else None
    if spec.method == "multistep":
        return nfe if nfe >= spec.order else None
    if spec.method == "singlestep_fixed":
        if nfe % spec.order or (spec.pfdiff and nfe // spec.order < 2):
            return None  # PFDiff there needs the first step plus at least one iteration (spec §2.3 item 4)
        return (1 + (nfe // spec.order - 1) * s) * spec.order
    # DPM-Solver-fast: the smallest `steps` whose processed orders sum to nfe and finish the grid
    for steps in range(1, 4 * s * nfe + 4):
        orders = grids.singlestep_orders(steps, spec.order, "singlestep")
        if not orders or (spec.pfdiff and (len(orders) < s or (len(orders) - 1) % s)):
            continue
        if sum(orders[i] for i in grids.dpm_processed_steps(orders, spec.pfdiff)) == nfe:
            return steps
    return None


def valid_nfes(spec: SamplerSpec, upto: int = 20) -> list[int]:
    """The NFE values in 1..upto that this spec can run to the end of its grid."""
    return [n for n in range(1, upto + 1) if (length := _length_for_nfe(spec, n)) is not None
            and not (spec.convention in ("ddim", "guided") and length < 2)]  # see _refuse_degenerate


def _refusal(spec: SamplerSpec, what: str, s: Optional[int] = None, why: Optional[str] = None) -> str:
    why = why or ("the official code would stop early and return a noisy sample"
                  if s is not None else "no grid of this convention gives exactly that many evaluations")
    ok = valid_nfes(spec)
    return (f"{spec.label()} ({spec.convention} convention, {spec.grid} grid) cannot run {what}: {why}; "
            f"NFE values that work: {', '.join(map(str, ok)) or 'none up to 20'}")
