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


def run_table(table: TableSpec, cells: list[Cell], *, inception_weights: Optional[str] = None,
              trust_weights: bool = False, log: Callable[[str], None] = print) -> dict:
    """Sample incomplete cells, evaluate unevaluated ones; returns counters of the work done."""
    from pfdiff_bench.sampling.rundir import append_result, iter_image_batches, read_manifest
    from pfdiff_bench.sampling.engine import run_sampling

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
                from pfdiff_bench.evaluation.exact import evaluate_run

                entry = evaluate_run(cell.run_dir)
            else:
                from pfdiff_bench.evaluation.fid import compute_fid

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
