"""Cell planning: each (row, NFE) of a table becomes one run directory ``<out>/runs/<row>-nfe<N>`` with its
resolved config and actual grid; what a machine lacks to run them (blockers) and a GPU-time estimate.

``reproduce --seeds K`` (issue 12 part 4, seed ranges as EDM's): the cell of range 0 is the cell above,
unchanged (same config, fingerprint and folder, so its cached run is reused); range r = 1..K-1 is a
sub-cell in ``cell.ranges`` whose run uses per-sample seed indices r*n .. (r+1)*n-1
(``sampling.seed_offset = r*n``) in ``<out>/runs/<row>-nfe<N>-seeds<r*n>``."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional


from pfdiff_bench.config import load_config, override
from pfdiff_bench.errors import ConfigError, PFDiffError

from pfdiff_bench.reproduction.tables import Row, TableSpec, _slug, axis_offset


@dataclass
class Cell:
    row: Row
    nfe: int
    run_dir: Path
    cfg: Optional[dict] = None
    setup_plan: Optional[object] = None     # samplers.Plan
    error: Optional[str] = None             # why the cell cannot run (e.g. NFE the variant cannot finish)
    calls: Optional[int] = None             # network calls run for this column (nfe − offset on an offset axis)
    value: Optional[float] = None
    result: Optional[dict] = None
    seed_range: int = 0                     # r of reproduce --seeds: seed indices r*n .. (r+1)*n-1
    ranges: list = field(default_factory=list)  # the cell's ranges 1..K-1 (sub-cells), on the range-0 cell
    extra: dict = field(default_factory=dict)   # extra metrics (--metrics): field -> value (mean over ranges)
    std: Optional[float] = None             # sample std (ddof=1) of the K range values (K > 1)
    extra_std: dict = field(default_factory=dict)
    range_values: Optional[list] = None     # K > 1: per range {range, seeds, run_dir, value, extra}


def all_cells(cells: list[Cell]) -> list[Cell]:
    """Every run of a plan: each cell followed by its seed-range sub-cells (``--seeds``)."""
    return [x for c in cells for x in (c, *c.ranges)]


def _complete(cell: Cell) -> bool:
    """The cell's run holds all the samples the cell asks for (a smaller run of it is extended)."""
    from pfdiff_bench.sampling.rundir import read_manifest, run_complete

    try:
        if not (cell.run_dir / "manifest.json").is_file() or not run_complete(cell.run_dir):
            return False
        return int(read_manifest(cell.run_dir, verify=False).get("num_samples", -1)) \
            == int(cell.cfg["sampling"]["num_samples"])
    except PFDiffError:
        return False


def plan_cells(table: TableSpec, out: Path, num_samples: Optional[int] = None, nfes: Optional[list[int]] = None,
               rows: Optional[list[str]] = None, batch_size: Optional[int] = None,
               device: Optional[str] = None, nfe_axis: Optional[str] = None,
               captions: Optional[str] = None, seeds: int = 1) -> list[Cell]:
    """Resolve every (row, NFE) cell to a config and a grid; impossible cells carry their reason.

    ``seeds``: K disjoint seed ranges per cell (ranges 1..K-1 in ``cell.ranges``, see the module docstring)."""
    from pfdiff_bench.sampling.setup import sampler_spec
    from pfdiff_bench.samplers import plan
    from pfdiff_bench.schedules import schedule_from_config

    base = load_config(table.config)
    for key, val in table.overrides.items():
        override(base, key, val)
    use_rows = table.rows
    if rows:
        names = {r.name for r in table.rows}
        unknown = [r for r in rows if r not in names]
        if unknown:
            raise ConfigError(f"unknown row(s) {', '.join(unknown)}; rows of {table.name}: {', '.join(sorted(names))}")
        use_rows = [r for r in table.rows if r.name in rows]
    use_nfes = table.nfe if nfes is None else nfes
    n = table.num_samples if num_samples is None else num_samples
    # bad options are refused here, before any run directory or table file is written
    if n < 1:
        raise ConfigError(f"--num-samples must be at least 1 (got {n})")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
    if int(seeds) < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    if not use_nfes or any(int(v) < 1 for v in use_nfes):
        raise ConfigError(f"--nfe must list NFEs of at least 1 (got {use_nfes})")
    # the config edge's ranges (e.g. at most 10,000,000 samples): a table-wide option out of range is a
    # refusal of the command, not a table of "not runnable" cells
    for key, val in (("sampling.num_samples", n), ("sampling.batch_size", batch_size)):
        override(copy.deepcopy(base), key, val)
    schedule = schedule_from_config(base["schedule"])
    offset = axis_offset(table, nfe_axis)
    cells = []
    for row in use_rows:
        for nfe in use_nfes:
            calls = nfe - offset
            # an offset table names run dirs by network calls: both axes share the runs they have in common
            name = f"{_slug(row.name)}-calls{calls}" if table.nfe_axis else f"{_slug(row.name)}-nfe{nfe}"
            cell = Cell(row, nfe, out / "runs" / name, calls=calls)
            cfg = copy.deepcopy(base)
            try:
                if captions:
                    override(cfg, "model.captions", str(captions))
                for key, val in row.sampler.items():
                    override(cfg, f"sampler.{key}", val)
                for key, val in (("sampling.nfe", calls), ("sampling.num_samples", n),
                                 ("sampling.batch_size", batch_size), ("sampling.device", device)):
                    override(cfg, key, val)
                cell.setup_plan = plan(sampler_spec(cfg), schedule, calls)
                cell.cfg = cfg
            except PFDiffError as exc:
                cell.error = str(exc)
            if cell.cfg is not None:
                for r in range(1, int(seeds)):
                    sub = copy.deepcopy(cell.cfg)
                    sub["sampling"]["seed_offset"] = r * n
                    cell.ranges.append(Cell(row, nfe, out / "runs" / f"{name}-seeds{r * n}", cfg=sub,
                                            setup_plan=cell.setup_plan, calls=calls, seed_range=r))
            cells.append(cell)
    return cells


def describe_cell(cell: Cell) -> str:
    if cell.error:
        return f"{cell.row.name:28s} NFE {cell.nfe:>3}: not runnable: {cell.error}"
    p = cell.setup_plan
    spec = p.spec
    ts = p.timesteps
    if spec.convention in ("dpm_solver", "deis"):
        grid = f"{spec.grid} t = {_fmt_times(ts)}"
        if p.orders is not None:
            grid += f", orders {p.orders}"
    else:
        kind = {"ddim": f"{spec.grid} grid", "guided": f"ddim{len(ts)} respacing" if spec.grid == "ddim_respacing"
                else f"section respacing {len(ts)}",
                "ldm": "ldm uniform grid int(linspace(0,998,S))+1 then ᾱ_0"}[spec.convention]
        stride = (f", stride {ts[0] - ts[1]}" if spec.grid == "ddim_respacing" and len(ts) > 1 else "")
        grid = f"{kind}{stride}, L={len(ts)}: {{{_fmt_times(ts)}}}"
    s = cell.cfg["sampling"]
    calls = f" ({cell.calls} network calls)" if cell.calls is not None and cell.calls != cell.nfe else ""
    k, n = 1 + len(cell.ranges), int(s["num_samples"])
    rng = f" x {k} seed ranges (seed indices 0-{n - 1}, {n}-{2 * n - 1}, ...)" if k > 1 else ""
    return (f"{cell.row.name:28s} NFE {cell.nfe:>3}{calls}: {spec.label()} [{spec.convention}] on {grid}; "
            f"seed {s['seed']}, {s['num_samples']} samples{rng}")


def _fmt_times(ts, limit: int = 14) -> str:
    vals = [f"{t:.4g}" if isinstance(t, float) and not float(t).is_integer() else str(int(t)) for t in ts]
    return ", ".join(vals if len(vals) <= limit else vals[:limit - 3] + ["...", *vals[-2:]])


# ------------------------------------------------------------------------ can this machine run it?
def _cuda() -> bool:
    import torch  # here, not at the top: `reproduce --dry-run` must not import torch

    return torch.cuda.is_available()


def blockers(table: TableSpec, cells: list[Cell], allow_cpu: bool = False,
             inception_weights: Optional[str] = None) -> list[str]:
    """What is missing before the table can run here (checkpoints, GPU, FID inputs); empty when ready."""
    todo = [c for c in all_cells(cells) if c.cfg is not None and not _complete(c)]
    if not todo:
        return []
    cfg = todo[0].cfg
    problems = []
    m = cfg["model"]
    if m["type"] == "stable_diffusion":
        from pfdiff_bench.models.stable_diffusion import REPO_ID, find_folder

        try:
            find_folder(m["checkpoint_path"], m["checkpoint"] or REPO_ID)
        except PFDiffError as exc:
            problems.append(str(exc))
        if not m["captions"]:
            problems.append("the COCO captions file is missing: pass --captions captions_val2014.json "
                            "(or captions_val2014_30K_samples.json)")
        if not _cuda() and not allow_cpu:
            problems.append("no CUDA GPU here: Stable Diffusion needs one (pass --allow-cpu to try anyway)")
    elif m["type"] != "analytic" and not m["random_weights"]:
        from pfdiff_bench.models import zoo

        problems += zoo.missing_checkpoints(cfg)
        if not _cuda() and not allow_cpu:
            problems.append("no CUDA GPU here: the full-size networks need one (pass --allow-cpu to try anyway)")
    if table.metric == "fid":
        from pfdiff_bench.evaluation.tools import get_tool

        tool = get_tool(table.fid_tool)
        if inception_weights is None and not tool.cache_path().is_file():
            problems.append(f"Inception weights of {tool.name} are missing: fetch {tool.weights_url} and place it at "
                            f"{tool.cache_path()} (or pass --inception-weights PATH)")
        ref = Path(str(table.reference))
        if not (ref.suffix == ".npz" and ref.is_file()):
            from pfdiff_bench.evaluation import refstats

            spec = refstats.get_ref(str(table.reference))
            try:
                refstats.check_protocol(tool.name, SimpleNamespace(name=spec.name, producer=spec.producer),
                                        mixed_protocol=table.mixed_protocol)
            except ConfigError as exc:
                problems.append(str(exc))
            path = refstats.ref_cache_path(spec.name, table.fid_tool)
            if not path.is_file():
                how = getattr(spec, "url", None) or getattr(spec, "source_hint", "")
                problems.append(f"reference statistics {spec.name} are missing: {how} -> {path}")
    return problems


def gpu_estimate(table: TableSpec, cells: list[Cell]) -> Optional[str]:
    if not table.gpu_seconds_per_image_nfe:
        return None
    work = sum(c.nfe * c.cfg["sampling"]["num_samples"] for c in all_cells(cells) if c.cfg is not None
               and not _complete(c))
    hours = work * table.gpu_seconds_per_image_nfe / 3600
    return (f"estimated sampling time on one modern GPU at the default batch size: about {hours:.1f} h "
            f"({work:,} image-evaluations x {table.gpu_seconds_per_image_nfe:g} s, a rough estimate)")
