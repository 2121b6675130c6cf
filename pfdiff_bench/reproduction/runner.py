"""Running a table: sample the missing cells (the engine resumes each run), evaluate them, reuse cached metrics.

Trust rules (issue 10, docs/EVALUATION.md "What a cached result is keyed on"):

* a cell's run directory is used only when its manifest's fingerprint equals the fingerprint the table
  asks for (config, plan, seed, sample count, shard size, device type); another run there is refused
  (``--redo`` replaces it) before anything is sampled;
* a cached FID is reused only when the run is complete and the entry matches the run's fingerprint, the
  metric and its options (FID tool, feature layer), the SHA-256 of the Inception weights in use, the
  SHA-256 of the reference statistics in use and the sample count; otherwise it is recomputed and the
  log line says which key differed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional


from pfdiff_bench.errors import PFDiffError

from pfdiff_bench.reproduction.cells import Cell, _complete
from pfdiff_bench.reproduction.tables import TableSpec


def expected_fingerprint(cell: Cell) -> str:
    """The fingerprint the engine will give this cell's run (sampling/engine.py computes the same)."""
    from pfdiff_bench.sampling.rundir import fingerprint, fingerprint_payload
    from pfdiff_bench.sampling.setup import resolve_device

    s = cell.cfg["sampling"]
    return fingerprint(fingerprint_payload(cell.cfg, cell.setup_plan.describe(), int(s["seed"]),
                                           int(s["num_samples"]), int(s["shard_size"]),
                                           resolve_device(s["device"]).type))


def check_cell_runs(cells: list[Cell], redo: bool = False, log: Callable[[str], None] = print) -> None:
    """Refuse (or, with ``redo``, remove) a run in a cell's folder that is not the run the table asks for."""
    from pfdiff_bench.sampling.rundir import MANIFEST, read_manifest

    foreign = []
    for cell in cells:
        if cell.cfg is None or not (cell.run_dir / MANIFEST).is_file():
            continue
        want = expected_fingerprint(cell)
        try:
            man = read_manifest(cell.run_dir, verify=False)
            have = man.get("fingerprint")
        except PFDiffError:
            man, have = {}, None
        if have != want:
            foreign.append((cell, man, have, want))
    if not foreign:
        return
    if not redo:
        cell, man, have, want = foreign[0]
        more = f" (and {len(foreign) - 1} more cells)" if len(foreign) > 1 else ""
        raise PFDiffError(
            f"{cell.run_dir} holds another run (fingerprint {have}: {man.get('sampler', '?')}, seed "
            f"{man.get('seed', '?')}, {man.get('num_samples', '?')} samples) than cell {cell.row.name} at NFE "
            f"{cell.nfe} asks for (fingerprint {want}, {cell.cfg['sampling']['num_samples']} samples){more}; "
            f"pass --redo to replace it, or use another --out")
    for cell, _, have, want in foreign:
        log(f"--redo: removing {cell.run_dir} (fingerprint {have}, the cell asks for {want})")
        shutil.rmtree(cell.run_dir)


# ------------------------------------------------------------------------ running and evaluating
def _cache_key(cell: Cell, metric: str, fp: str, weights_sha256: Optional[str], reference_sha256: Optional[str],
               fid_tool: Optional[str]) -> dict:
    from pfdiff_bench.evaluation.features import FID_LAYER

    key = {"fingerprint": fp, "metric": metric, "num_samples": int(cell.cfg["sampling"]["num_samples"])}
    if metric == "fid":
        key.update(fid_tool=fid_tool or "torch-fidelity", feature_layer=FID_LAYER, weights_sha256=weights_sha256,
                   reference_sha256=reference_sha256)
    return key


def _cached_result(cell: Cell, key: dict, log: Callable[[str], None] = print) -> Optional[dict]:
    """The newest result entry of the cell's run whose every key field matches ``key`` (else None, logged)."""
    from pfdiff_bench.sampling.rundir import load_results, read_manifest, run_complete

    try:
        man = read_manifest(cell.run_dir)
        results = load_results(cell.run_dir)
    except PFDiffError:
        return None
    if man.get("fingerprint") != key["fingerprint"] or not man.get("complete") or not run_complete(cell.run_dir):
        return None
    if int(man.get("num_samples", -1)) != key["num_samples"]:
        return None
    differs = None
    for entry in reversed(results):
        if entry.get("metric") != key["metric"]:
            continue
        bad = [k for k, v in key.items() if entry.get(k, "<missing>") != v]
        if not bad:
            return entry
        differs = differs or bad
    if differs:
        log(f"{cell.row.name} NFE {cell.nfe}: cached {key['metric']} not reused ({', '.join(differs)} differ"
            f"{'s' if len(differs) == 1 else ''}); recomputing")
    return None


def run_table(table: TableSpec, cells: list[Cell], *, inception_weights: Optional[str] = None,
              trust_weights: bool = False, redo: bool = False, log: Callable[[str], None] = print) -> dict:
    """Sample incomplete cells, evaluate unevaluated ones; returns counters of the work done."""
    from pfdiff_bench.sampling.rundir import append_result, iter_image_batches, read_manifest
    from pfdiff_bench.sampling.engine import run_sampling

    done = {"sampled": 0, "evaluated": 0, "cached": 0}
    runnable = [c for c in cells if c.cfg is not None]
    check_cell_runs(runnable, redo=redo, log=log)  # before anything is sampled
    w = ref = None
    if table.metric == "fid" and runnable:
        # what determines the FID, resolved (and hashed) once before the cache is consulted
        from pfdiff_bench.evaluation.refstats import load_ref
        from pfdiff_bench.evaluation.tools import resolve_weights

        w = resolve_weights(table.fid_tool, inception_weights, trust_weights=trust_weights, log=lambda m: None)
        ref = load_ref(table.reference, fid_tool=table.fid_tool, inception_weights=inception_weights,
                       trust_weights=trust_weights, log=log)
    for i, cell in enumerate(runnable, 1):
        fp = expected_fingerprint(cell)
        if not _complete(cell):
            log(f"[{i}/{len(runnable)}] sampling {cell.row.name} at NFE {cell.nfe} -> {cell.run_dir}")
            run_sampling(cell.cfg, cell.run_dir)
            done["sampled"] += 1
        man = read_manifest(cell.run_dir)
        if man.get("fingerprint") != fp:  # the engine and expected_fingerprint disagree: never show it as the cell
            raise PFDiffError(f"{cell.run_dir}: run fingerprint {man.get('fingerprint')} is not the cell's {fp}")
        key = _cache_key(cell, table.metric, fp, getattr(w, "sha256", None), getattr(ref, "sha256", None),
                         table.fid_tool)
        entry = _cached_result(cell, key, log=log)
        if entry is None:
            if table.metric == "exact":
                from pfdiff_bench.evaluation.exact import evaluate_run

                entry = evaluate_run(cell.run_dir)
            else:
                from pfdiff_bench.evaluation.fid import compute_fid

                entry = compute_fid(iter_image_batches(cell.run_dir, 250), ref, fid_tool=table.fid_tool,
                                    mixed_protocol=table.mixed_protocol, quantization=man.get("quantization"),
                                    inception_weights=inception_weights, trust_weights=trust_weights)
                if str(table.reference).endswith(".npz"):
                    entry["reference"] = Path(str(table.reference)).stem
                if entry.get("weights_sha256") != w.sha256:
                    raise PFDiffError(f"the Inception weights changed during the evaluation of {cell.run_dir}")
            entry["fingerprint"] = fp
            append_result(cell.run_dir, entry)
            done["evaluated"] += 1
        else:
            done["cached"] += 1
        cell.result = entry
        cell.value = entry.get("value") if table.metric == "fid" else entry.get("rms_common_mean",
                                                                                   entry.get("rms_mean"))
    return done
