"""Reproduce a paper table: plan every cell, sample the missing ones, evaluate, write the table.

A table is a data file (``configs/tables/*.yaml``): a base run config, rows (sampler overrides),
NFE columns, the metric (``fid`` against a reference, or ``exact`` for the analytic model), the
sample count and the paper's numbers. Each cell is one run directory
``<out>/runs/<row>-nfe<N>``; the engine resumes it, so a rerun continues where it stopped, and a
cell whose run is complete and already evaluated costs nothing.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import yaml

from pfdiff_bench.config import CONFIG_DIR, load_config, override
from pfdiff_bench.errors import ConfigError, PFDiffError

TABLE_DIR = CONFIG_DIR / "tables"
_TABLE_KEYS = {"name", "title", "config", "metric", "reference", "fid_tool", "mixed_protocol", "num_samples", "nfe", "rows", "best_of", "paper",
               "paper_only", "gpu_seconds_per_image_nfe", "description"}
_ROW_KEYS = {"name", "sampler", "group", "default"}


@dataclass
class Row:
    name: str
    sampler: dict
    group: Optional[str] = None
    default: bool = False


@dataclass
class TableSpec:
    name: str
    title: str
    config: str
    metric: str
    nfe: list[int]
    rows: list[Row]
    num_samples: int
    reference: Optional[str] = None
    fid_tool: Optional[str] = None  # the FID tool the paper used for this table (evaluation.tools)
    mixed_protocol: bool = False    # the paper combined one tool's features with another's reference
    best_of: Optional[dict] = None
    paper: dict = field(default_factory=dict)
    paper_only: dict = field(default_factory=dict)
    gpu_seconds_per_image_nfe: Optional[float] = None
    path: Optional[Path] = None


@dataclass
class Cell:
    row: Row
    nfe: int
    run_dir: Path
    cfg: Optional[dict] = None
    setup_plan: Optional[object] = None     # samplers.Plan
    error: Optional[str] = None             # why the cell cannot run (e.g. NFE the variant cannot finish)
    value: Optional[float] = None
    result: Optional[dict] = None


def bundled_tables() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def load_table(name_or_path: str) -> TableSpec:
    p = Path(name_or_path)
    if not p.is_file():
        p = TABLE_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise ConfigError(f"unknown table {name_or_path!r}; bundled: {', '.join(bundled_tables())}")
    raw = yaml.safe_load(p.read_text()) or {}
    bad = set(raw) - _TABLE_KEYS
    if bad:
        raise ConfigError(f"{p}: unknown key(s) {', '.join(sorted(bad))}; accepted: {', '.join(sorted(_TABLE_KEYS))}")
    for key in ("config", "metric", "nfe", "rows", "num_samples"):
        if key not in raw:
            raise ConfigError(f"{p}: missing key '{key}'")
    if raw["metric"] not in ("fid", "exact"):
        raise ConfigError(f"{p}: metric must be 'fid' or 'exact'")
    if raw["metric"] == "fid" and not raw.get("reference"):
        raise ConfigError(f"{p}: metric fid needs a 'reference'")
    if raw["metric"] == "fid":
        from pfdiff_bench.evaluation.tools import TOOLS

        if raw.get("fid_tool") not in TOOLS:
            raise ConfigError(f"{p}: metric fid needs 'fid_tool', the FID tool the paper used: {' or '.join(TOOLS)} "
                              f"(got {raw.get('fid_tool')!r})")
    rows = []
    for r in raw["rows"]:
        if set(r) - _ROW_KEYS or "name" not in r:
            raise ConfigError(f"{p}: each row needs 'name' (and optional {', '.join(sorted(_ROW_KEYS - {'name'}))})")
        rows.append(Row(r["name"], dict(r.get("sampler") or {}), r.get("group"), bool(r.get("default", False))))
    ref = str(raw["config"])  # a bundled config name, or a YAML path relative to the table file
    base = p.parent / ref if Path(ref).suffix and (p.parent / ref).is_file() else ref
    paper = {k: list(v) for k, v in (raw.get("paper") or {}).items()}
    for label, vals in {**paper, **(raw.get("paper_only") or {})}.items():
        if len(vals) != len(raw["nfe"]):
            raise ConfigError(f"{p}: paper row {label!r} has {len(vals)} values for {len(raw['nfe'])} NFE columns")
    return TableSpec(name=raw.get("name", p.stem), title=raw.get("title", p.stem), config=str(base),
                     metric=raw["metric"], nfe=[int(n) for n in raw["nfe"]], rows=rows,
                     num_samples=int(raw["num_samples"]), reference=raw.get("reference"),
                     fid_tool=raw.get("fid_tool"), mixed_protocol=bool(raw.get("mixed_protocol", False)),
                     best_of=raw.get("best_of"), paper=paper, paper_only=dict(raw.get("paper_only") or {}),
                     gpu_seconds_per_image_nfe=raw.get("gpu_seconds_per_image_nfe"), path=p)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def plan_cells(table: TableSpec, out: Path, num_samples: Optional[int] = None, nfes: Optional[list[int]] = None,
               rows: Optional[list[str]] = None, batch_size: Optional[int] = None,
               device: Optional[str] = None) -> list[Cell]:
    """Resolve every (row, NFE) cell to a config and a grid; impossible cells carry their reason."""
    from pfdiff_bench.pipeline import sampler_spec
    from pfdiff_bench.samplers import plan
    from pfdiff_bench.schedules import schedule_from_config

    base = load_config(table.config)
    use_rows = table.rows
    if rows:
        names = {r.name for r in table.rows}
        unknown = [r for r in rows if r not in names]
        if unknown:
            raise ConfigError(f"unknown row(s) {', '.join(unknown)}; rows of {table.name}: {', '.join(sorted(names))}")
        use_rows = [r for r in table.rows if r.name in rows]
    use_nfes = nfes or table.nfe
    n = num_samples or table.num_samples
    if n < 1:
        raise ConfigError(f"--num-samples must be at least 1 (got {n})")
    schedule = schedule_from_config(base["schedule"])
    cells = []
    for row in use_rows:
        for nfe in use_nfes:
            cell = Cell(row, nfe, out / "runs" / f"{_slug(row.name)}-nfe{nfe}")
            cfg = copy.deepcopy(base)
            try:
                for key, val in row.sampler.items():
                    override(cfg, f"sampler.{key}", val)
                for key, val in (("sampling.nfe", nfe), ("sampling.num_samples", n),
                                 ("sampling.batch_size", batch_size), ("sampling.device", device)):
                    override(cfg, key, val)
                cell.setup_plan = plan(sampler_spec(cfg), schedule, nfe)
                cell.cfg = cfg
            except PFDiffError as exc:
                cell.error = str(exc)
            cells.append(cell)
    return cells


def describe_cell(cell: Cell) -> str:
    if cell.error:
        return f"{cell.row.name:28s} NFE {cell.nfe:>3}: not runnable: {cell.error}"
    p = cell.setup_plan
    spec = p.spec
    ts = p.timesteps
    if spec.convention == "dpm_solver":
        grid = f"{spec.grid} t = {_fmt_times(ts)}"
        if p.orders is not None:
            grid += f", orders {p.orders}"
    else:
        kind = {"ddim": f"{spec.grid} grid", "guided": f"ddim{len(ts)} respacing" if spec.grid == "ddim_respacing"
                else f"section respacing {len(ts)}"}[spec.convention]
        stride = (f", stride {ts[0] - ts[1]}" if spec.grid == "ddim_respacing" and len(ts) > 1 else "")
        grid = f"{kind}{stride}, L={len(ts)}: {{{_fmt_times(ts)}}}"
    s = cell.cfg["sampling"]
    return (f"{cell.row.name:28s} NFE {cell.nfe:>3}: {spec.label()} [{spec.convention}] on {grid}; "
            f"seed {s['seed']}, {s['num_samples']} samples")


def _fmt_times(ts, limit: int = 14) -> str:
    vals = [f"{t:.4g}" if isinstance(t, float) and not float(t).is_integer() else str(int(t)) for t in ts]
    return ", ".join(vals if len(vals) <= limit else vals[:limit - 3] + ["...", *vals[-2:]])


# ------------------------------------------------------------------------ can this machine run it?
def blockers(table: TableSpec, cells: list[Cell], allow_cpu: bool = False,
             inception_weights: Optional[str] = None) -> list[str]:
    """What is missing before the table can run here (checkpoints, GPU, FID inputs); empty when ready."""
    todo = [c for c in cells if c.cfg is not None and not _complete(c)]
    if not todo:
        return []
    cfg = todo[0].cfg
    problems = []
    m, g = cfg["model"], cfg["guidance"]
    if m["type"] != "analytic" and not m["random_weights"]:
        from pfdiff_bench.models import zoo

        for name, path in ((m["checkpoint"], m["checkpoint_path"]),
                           (g["classifier"] if g["scale"] > 0 else None, g["classifier_path"])):
            if not name:
                continue
            spec = zoo.get_spec(name)
            where = Path(path) if path else zoo.cache_path(name)
            if not where.is_file():
                how = f"run `pfdiff-bench models download {name}` or " if spec.direct_download else ""
                problems.append(f"checkpoint {name} is missing: {how}{spec.fetch_hint} and place it at {where}")
        if not torch.cuda.is_available() and not allow_cpu:
            problems.append("no CUDA GPU here: the full-size networks need one (pass --allow-cpu to try anyway)")
    if table.metric == "fid":
        from pfdiff_bench.evaluation.tools import get_tool

        tool = get_tool(table.fid_tool)
        if inception_weights is None and not tool.cache_path().is_file():
            problems.append(f"Inception weights of {tool.name} are missing: fetch {tool.weights_url} and place it at "
                            f"{tool.cache_path()} (or pass --inception-weights PATH)")
        ref = Path(str(table.reference))
        if not (ref.suffix == ".npz" and ref.is_file()):
            from pfdiff_bench import refstats

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
    work = sum(c.nfe * c.cfg["sampling"]["num_samples"] for c in cells if c.cfg is not None and not _complete(c))
    hours = work * table.gpu_seconds_per_image_nfe / 3600
    return (f"estimated sampling time on one modern GPU at the default batch size: about {hours:.1f} h "
            f"({work:,} image-evaluations x {table.gpu_seconds_per_image_nfe:g} s, a rough estimate)")


# ------------------------------------------------------------------------ running and evaluating
def _complete(cell: Cell) -> bool:
    from pfdiff_bench.engine import run_complete

    try:
        return (cell.run_dir / "manifest.json").is_file() and run_complete(cell.run_dir)
    except PFDiffError:
        return False


def _cached_result(cell: Cell, metric: str, reference: Optional[str], fid_tool: Optional[str] = None
                   ) -> Optional[dict]:
    from pfdiff_bench.engine import load_results, read_manifest

    try:
        fp = read_manifest(cell.run_dir).get("fingerprint")
        results = load_results(cell.run_dir)
    except PFDiffError:
        return None
    for entry in reversed(results):
        if entry.get("fingerprint", fp) != fp:
            continue
        if metric == "exact" and entry.get("metric") == "exact":
            return entry
        if metric == "fid" and entry.get("metric") == "fid" and entry.get("reference") == Path(str(reference)).stem \
                and entry.get("fid_tool", "torch-fidelity") == (fid_tool or "torch-fidelity") \
                and entry.get("num_samples") == cell.cfg["sampling"]["num_samples"]:
            return entry
    return None


def run_table(table: TableSpec, cells: list[Cell], *, inception_weights: Optional[str] = None,
              trust_weights: bool = False, log: Callable[[str], None] = print) -> dict:
    """Sample incomplete cells, evaluate unevaluated ones; returns counters of the work done."""
    from pfdiff_bench.engine import append_result, iter_image_batches, read_manifest, run_sampling

    done = {"sampled": 0, "evaluated": 0, "cached": 0}
    runnable = [c for c in cells if c.cfg is not None]
    for i, cell in enumerate(runnable, 1):
        if not _complete(cell):
            log(f"[{i}/{len(runnable)}] sampling {cell.row.name} at NFE {cell.nfe} -> {cell.run_dir}")
            run_sampling(cell.cfg, cell.run_dir)
            done["sampled"] += 1
        entry = _cached_result(cell, table.metric, table.reference, table.fid_tool)
        if entry is None:
            if table.metric == "exact":
                from pfdiff_bench.metrics import evaluate_run

                entry = evaluate_run(cell.run_dir)
            else:
                from pfdiff_bench.fid import compute_fid

                entry = compute_fid(iter_image_batches(cell.run_dir, 250), table.reference, fid_tool=table.fid_tool,
                                    mixed_protocol=table.mixed_protocol,
                                    quantization=read_manifest(cell.run_dir).get("quantization"),
                                    inception_weights=inception_weights, trust_weights=trust_weights)
                entry["reference"] = Path(str(table.reference)).stem if str(table.reference).endswith(".npz") \
                    else entry.get("reference")
            entry["fingerprint"] = read_manifest(cell.run_dir).get("fingerprint")
            append_result(cell.run_dir, entry)
            done["evaluated"] += 1
        else:
            done["cached"] += 1
        cell.result = entry
        cell.value = entry.get("value") if table.metric == "fid" else entry.get("rms_mean")
    return done


# ------------------------------------------------------------------------ the table itself
def assemble(table: TableSpec, cells: list[Cell]) -> dict:
    """Rows of (ours, paper, difference) per NFE, with best-of-group and paper-only rows."""
    nfes = sorted({c.nfe for c in cells}, key=table.nfe.index if all(n in table.nfe for n in {c.nfe for c in cells})
                  else int)
    by = {(c.row.name, c.nfe): c for c in cells}
    row_names = list(dict.fromkeys(c.row.name for c in cells))
    out_rows = []

    def paper_value(label, nfe):
        vals = table.paper.get(label) or table.paper_only.get(label)
        if vals is None or nfe not in table.nfe:
            return None
        return vals[table.nfe.index(nfe)]

    for name in row_names:
        row = next(r for r in table.rows if r.name == name)
        cells_out = {}
        for n in nfes:
            c = by.get((name, n))
            cells_out[n] = _cell_dict(c, paper_value(name, n))
        out_rows.append({"name": name + (" (default 2,1)" if row.default else ""), "cells": cells_out})
    if table.best_of:
        grp = table.best_of["group"]
        label = table.best_of["name"]
        members = [r.name for r in table.rows if r.group == grp and r.name in row_names]
        if members:
            cells_out = {}
            for n in nfes:
                vals = [(by[(m, n)].value, m) for m in members if by.get((m, n)) and by[(m, n)].value is not None]
                if vals and len(vals) == len(members):
                    v, winner = min(vals)
                    d = _cell_dict(by[(winner, n)], paper_value(label, n))
                    d["winner"] = winner.split("PFDiff-")[-1]
                elif vals:
                    d = {"status": "incomplete", "paper": paper_value(label, n)}
                else:
                    d = {"status": "not run", "paper": paper_value(label, n)}
                cells_out[n] = d
            out_rows.append({"name": label, "cells": cells_out, "best_of": True})
    for label in table.paper_only:
        out_rows.append({"name": label, "cells": {n: {"status": "paper only", "paper": paper_value(label, n)}
                                                   for n in nfes}})
    return {"table": table.name, "title": table.title, "metric": table.metric, "nfe": nfes, "rows": out_rows,
            "num_samples": next((c.cfg["sampling"]["num_samples"] for c in cells if c.cfg), table.num_samples),
            "metric_label": _metric_label(table, cells), "protocol": _protocol(table, cells)}


_PROTOCOL_KEYS = ("protocol", "fid_tool", "fid_tool_version", "weights_sha256", "weights_official", "resize",
                  "reference", "reference_sha256", "reference_producer", "reference_resize", "mixed_protocol",
                  "quantization", "num_samples", "label")


def _protocol(table: TableSpec, cells: list[Cell]) -> Optional[dict]:
    """The FID protocol of the table's cells (issue 12 part 5): one dict per distinct protocol, so a table whose
    cells were evaluated differently shows it."""
    if table.metric != "fid":
        return None
    seen = []
    for c in cells:
        if c.result:
            p = {k: c.result.get(k) for k in _PROTOCOL_KEYS}
            if p not in seen:
                seen.append(p)
    return {"fid_tool": table.fid_tool, "mixed_protocol": table.mixed_protocol, "reference": table.reference,
            "summary": protocol_summary(table), "cells": seen}


def protocol_summary(table: TableSpec) -> str:
    """"pytorch-fid, reference cifar10-train" or "pytorch-fid features vs lsun_bedroom reference (adm-tf;
    declared mixed protocol)"; a declared mix that the tool in use does not make is not called mixed."""
    from pfdiff_bench import refstats
    from pfdiff_bench.evaluation.tools import family_of, get_tool

    spec = refstats.REFERENCES.get(str(table.reference))
    producer = spec.producer if spec is not None else None
    fam = family_of(producer)
    mixed = table.mixed_protocol and (fam is None or fam != get_tool(table.fid_tool).family)
    if mixed:
        return f"{table.fid_tool} features vs {table.reference} reference ({producer or 'unknown producer'}; " \
               f"declared mixed protocol)"
    return f"{table.fid_tool}, reference {table.reference}"


def _metric_label(table: TableSpec, cells: list[Cell]) -> str:
    if table.metric == "exact":
        return "mean RMS distance to the exact ODE solution"
    labels = {c.result.get("label") for c in cells if c.result}
    return "/".join(sorted(labels)) or "FID"


def _cell_dict(c: Optional[Cell], paper: Optional[float]) -> dict:
    if c is None:
        return {"status": "not run", "paper": paper}
    if c.error:
        return {"status": "n/a", "reason": c.error, "paper": paper}
    if c.value is None:
        return {"status": "not run", "paper": paper}
    d = {"status": "ok", "ours": c.value, "paper": paper, "run_dir": str(c.run_dir)}
    if paper is not None:
        d["diff"] = c.value - paper
    return d


def _fmt_cell(d: dict, digits: int) -> str:
    paper = d.get("paper")
    ptxt = f"{paper:.2f}" if isinstance(paper, (int, float)) else "–"
    if d["status"] == "ok":
        ours = f"{d['ours']:.{digits}f}"
        win = f" [{d['winner']}]" if d.get("winner") else ""
        if paper is None:
            return ours + win
        return f"{ours}{win} / {ptxt} ({d['diff']:+.{digits}f})"
    return f"{d['status']} / {ptxt}" if paper is not None else d["status"]


def to_markdown(res: dict) -> str:
    digits = 4 if res["metric"] == "exact" else 2
    lines = [f"### {res['title']}", "",
             f"Cells: ours / paper (difference); metric: {res['metric_label']}, {res['num_samples']} samples per cell. "
             "'[k_h]' names the winning PFDiff variant; 'n/a' = the variant cannot run that NFE; "
             "'not run' = not sampled yet.", *_protocol_lines(res), "",
             "| Method \\ NFE | " + " | ".join(str(n) for n in res["nfe"]) + " |",
             "|---|" + "---|" * len(res["nfe"])]
    for row in res["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(_fmt_cell(row["cells"][n], digits) for n in res["nfe"]) + " |")
    return "\n".join(lines) + "\n"


def _protocol_lines(res: dict) -> list[str]:
    prot = res.get("protocol") or {}
    lines = [f"FID tool: {prot['summary']}."] if prot.get("summary") else []
    for p in prot.get("cells", []):
        lines.append(f"Protocol: {p['protocol']}; {p['fid_tool']} {p['fid_tool_version']}, weights sha256 "
                     f"{str(p['weights_sha256'])[:12]}{'' if p['weights_official'] else ' (unofficial)'}, resize: "
                     f"{p['resize']}; reference {p['reference']} (sha256 {str(p['reference_sha256'])[:12]}, by "
                     f"{p['reference_producer']}); quantisation: {p['quantization']}; {p['label']}, "
                     f"n={p['num_samples']}.")
    return ["", *lines] if lines else []


def to_csv(res: dict) -> str:
    out = ["method,nfe,status,ours,paper,diff,winner"]
    for row in res["rows"]:
        for n in res["nfe"]:
            d = row["cells"][n]
            vals = [d.get("ours"), d.get("paper"), d.get("diff")]
            out.append(",".join([f'"{row["name"]}"', str(n), d["status"],
                                 *["" if v is None else f"{v:.6g}" for v in vals], d.get("winner", "")]))
    return "\n".join(out) + "\n"


def to_latex(res: dict) -> str:
    digits = 4 if res["metric"] == "exact" else 2
    cols = "l" + "c" * len(res["nfe"])
    lines = [r"\begin{tabular}{" + cols + "}", r"\toprule",
             "Method & " + " & ".join(f"NFE {n}" for n in res["nfe"]) + r" \\", r"\midrule"]
    for row in res["rows"]:
        cells = []
        for n in res["nfe"]:
            d = row["cells"][n]
            p = d.get("paper")
            ptxt = f"{p:.2f}" if isinstance(p, (int, float)) else "--"
            ours = f"{d['ours']:.{digits}f}" if d["status"] == "ok" else d["status"]
            cells.append(f"{ours} ({ptxt})" if p is not None else ours)
        name = row["name"].replace("_", r"\_").replace("&", r"\&")
        lines.append(name + " & " + " & ".join(c.replace("_", r"\_") for c in cells) + r" \\")
    summary = (res.get("protocol") or {}).get("summary")
    lines += [r"\bottomrule", r"\end{tabular}",
              f"% ours (paper); {res['metric_label']}" + (f"; FID tool: {summary}" if summary else "")]
    return "\n".join(lines) + "\n"


def write_outputs(res: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"table.md": to_markdown(res), "table.csv": to_csv(res), "table.tex": to_latex(res),
             "results.json": json.dumps(res, indent=1, default=str) + "\n"}
    paths = []
    for name, text in files.items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths

