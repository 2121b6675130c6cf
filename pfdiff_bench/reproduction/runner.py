"""Running a table: sample the missing cells (the engine resumes each run), evaluate them, reuse cached metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional


from pfdiff_bench.errors import PFDiffError

from pfdiff_bench.reproduction.cells import Cell, _complete
from pfdiff_bench.reproduction.tables import TableSpec


# ------------------------------------------------------------------------ running and evaluating
def _cached_result(cell: Cell, metric: str, reference: Optional[str], fid_tool: Optional[str] = None
                   ) -> Optional[dict]:
    from pfdiff_bench.sampling.rundir import load_results, read_manifest

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


def _network_key(cfg: dict, device) -> str:
    import json

    return json.dumps({k: cfg[k] for k in ("model", "guidance", "schedule")}, sort_keys=True) + f"@{device}"


def _setup_for(cell: Cell, device, nets: dict):
    """The cell's Setup; the network (checkpoint) is built once per rank and shared by the cells that use it."""
    from pfdiff_bench.sampling.setup import build

    if cell.cfg["model"]["type"] == "analytic":
        return build(cell.cfg, device=device)
    key = _network_key(cell.cfg, device)
    if key not in nets:
        from pfdiff_bench.models import networks

        nets[key] = networks.build_from_config(cell.cfg, device)
    return build(cell.cfg, device=device, net=nets[key])


def _agree(d, flag: bool, device) -> bool:
    """True on every rank when it is true on any rank (all ranks take the same branch)."""
    return bool(d.all_reduce([float(flag)], "max", device)[0])


def run_table(table: TableSpec, cells: list[Cell], *, inception_weights: Optional[str] = None,
              trust_weights: bool = False, log: Callable[[str], None] = print, dist_ctx=None,
              progress: Optional[bool] = None) -> dict:
    """Sample incomplete cells, evaluate unevaluated ones; returns counters of the work done.

    Under torchrun (``dist_ctx``, one process group for the whole table) every cell's shards are spread
    over all ranks by the engine, each rank builds each network once, FID features are extracted by all
    ranks and all-reduced in float64, and only rank 0 writes results and logs. Samples are the same as in
    one process (they depend on config, plan, seed and index only).
    """
    from pfdiff_bench.sampling.distributed import Dist, _device_for_rank
    from pfdiff_bench.sampling.rundir import append_result, iter_image_batches, num_shards, read_manifest
    from pfdiff_bench.sampling.engine import run_sampling

    d = dist_ctx or Dist()
    say = log if d.rank == 0 else (lambda m: None)
    done = {"sampled": 0, "evaluated": 0, "cached": 0}
    runnable = [c for c in cells if c.cfg is not None]
    nets: dict = {}
    for i, cell in enumerate(runnable, 1):
        device = _device_for_rank(cell.cfg, d)
        if _agree(d, not _complete(cell), device):
            say(f"[{i}/{len(runnable)}] sampling {cell.row.name} at NFE {cell.nfe} -> {cell.run_dir}")
            summary = run_sampling(cell.cfg, cell.run_dir, setup=_setup_for(cell, device, nets), dist_ctx=d,
                                   progress=progress, log=say)
            say(f"[{i}/{len(runnable)}] {summary.line()}")
            done["sampled"] += 1
        entry = _cached_result(cell, table.metric, table.reference, table.fid_tool)
        if _agree(d, entry is None, device):
            man = read_manifest(cell.run_dir)
            if table.metric == "exact":
                from pfdiff_bench.evaluation.exact import evaluate_run

                entry = evaluate_run(cell.run_dir) if d.rank == 0 else None  # cheap: one process
            else:
                from pfdiff_bench.evaluation.fid import compute_fid

                mine = range(d.rank, num_shards(int(man["num_samples"]), int(man["shard_size"])), d.world)
                entry = compute_fid(iter_image_batches(cell.run_dir, 250, shards=mine), table.reference,
                                    fid_tool=table.fid_tool, mixed_protocol=table.mixed_protocol,
                                    quantization=man.get("quantization"), inception_weights=inception_weights,
                                    trust_weights=trust_weights, device=device if d.world > 1 else None,
                                    distributed=d.active)
                entry["reference"] = Path(str(table.reference)).stem if str(table.reference).endswith(".npz") \
                    else entry.get("reference")
            if d.rank == 0:
                entry["fingerprint"] = man.get("fingerprint")
                append_result(cell.run_dir, entry)
            d.barrier()  # results.json is written before any rank looks at the next cell
            done["evaluated"] += 1
        else:
            done["cached"] += 1
        if entry is not None:
            cell.result = entry
            cell.value = entry.get("value") if table.metric == "fid" else entry.get("rms_mean")
    return done


# ------------------------------------------------------------------------ status (nothing is started)
def table_status(table: TableSpec, cells: list[Cell]) -> list[dict]:
    """Per runnable cell: samples done/total, evaluated or not (and the finished value's protocol), ETA.

    The ETA divides the cell's missing image-NFEs by the rate measured in the manifests' timings of the
    table's runs that sampled something (images/s x NFE, so cells of another NFE share one rate); None
    when nothing has been timed yet. Reads files only.
    """
    from pfdiff_bench.sampling.rundir import missing_samples, read_manifest

    rows, rates = [], []
    for cell in cells:
        if cell.cfg is None:
            continue
        total = int(cell.cfg["sampling"]["num_samples"])
        done, man = 0, None
        if (cell.run_dir / "manifest.json").is_file():
            try:
                man = read_manifest(cell.run_dir)
                done = total - missing_samples(cell.run_dir)[0]
            except PFDiffError:
                man, done = None, 0
        t = (man or {}).get("timings", {})
        if t.get("images_per_s"):
            rates.append(float(t["images_per_s"]) * cell.nfe)
        entry = _cached_result(cell, table.metric, table.reference, table.fid_tool) if done == total else None
        proto = None
        if entry is not None:
            proto = "exact" if table.metric == "exact" else (
                f"{entry.get('label')} {entry.get('fid_tool')} vs {entry.get('reference')}, "
                f"{entry.get('num_samples')} samples")
        rows.append({"row": cell.row.name, "nfe": cell.nfe, "run_dir": str(cell.run_dir), "done": done,
                     "total": total, "evaluated": entry is not None, "protocol": proto,
                     "value": None if entry is None else (entry.get("value") if table.metric == "fid"
                                                          else entry.get("rms_mean"))})
    rate = sum(rates) / len(rates) if rates else None  # image-NFEs per second
    for r in rows:
        left = (r["total"] - r["done"]) * r["nfe"]
        r["eta_s"] = 0.0 if left == 0 else (left / rate if rate else None)
    return rows


def format_status(rows: list[dict]) -> list[str]:
    def eta(s):
        return "?" if s is None else (f"{s:.0f}s" if s < 120 else f"{s / 3600:.2f}h" if s >= 3600 else f"{s / 60:.1f}min")

    out = []
    for r in rows:
        ev = f"evaluated ({r['protocol']}): {r['value']:.6g}" if r["evaluated"] else "not evaluated"
        out.append(f"  {r['row']:28s} NFE {r['nfe']:>3}: {r['done']}/{r['total']} samples, {ev}, "
                   f"ETA {eta(r['eta_s'])}")
    done = sum(r["done"] for r in rows)
    total = sum(r["total"] for r in rows)
    left = [r["eta_s"] for r in rows]
    out.append(f"{done}/{total} samples, {sum(r['evaluated'] for r in rows)}/{len(rows)} cells evaluated, "
               f"ETA {eta(None if any(e is None for e in left) else sum(left))} (sampling, at the measured rate)")
    return out
