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
        elif int(man.get("num_samples", 0)) > int(cell.cfg["sampling"]["num_samples"]):
            # the same run with more samples: its metric is not the cell's (a larger -n extends a run instead)
            raise PFDiffError(f"{cell.run_dir} holds {man.get('num_samples')} samples of this run and cell "
                              f"{cell.row.name} at NFE {cell.nfe} asks for {cell.cfg['sampling']['num_samples']}; "
                              f"pass -n {man.get('num_samples')} (or more: the run is extended), or use another --out")
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


def check_sample_floor(table: TableSpec, cells: list[Cell], allow_small: bool = False) -> None:
    """Refuse an FID table of cells with fewer than 2,048 samples unless ``allow_small`` (issue 10 item 8),
    before anything is sampled; with it, the cells' results are labelled small-sample."""
    if table.metric != "fid":
        return
    from pfdiff_bench.evaluation.features import check_floor

    for c in cells:
        if c.cfg is not None:
            check_floor(int(c.cfg["sampling"]["num_samples"]), "FID", allow_small=allow_small,
                        source=f"cell {c.row.name} at NFE {c.nfe} (-n)")


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


def recorded_result(cell: Cell, metric: str) -> Optional[dict]:
    """The newest ``metric`` entry recorded for the run the cell asks for (its fingerprint), without hashing
    weights or references: for ``--status`` and job planning only; ``run_table`` re-checks the full key."""
    from pfdiff_bench.sampling.rundir import load_results

    try:
        results = load_results(cell.run_dir)
        fp = expected_fingerprint(cell)
    except PFDiffError:
        return None
    return next((e for e in reversed(results) if e.get("metric") == metric and e.get("fingerprint") == fp), None)


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
              trust_weights: bool = False, redo: bool = False, log: Callable[[str], None] = print, dist_ctx=None,
              progress: Optional[bool] = None, allow_small: bool = False) -> dict:
    """Sample incomplete cells, evaluate unevaluated ones; returns counters of the work done.

    Under torchrun (``dist_ctx``, one process group for the whole table) every cell's shards are spread
    over all ranks by the engine, each rank builds each network once, FID features are extracted by all
    ranks and all-reduced in float64, and only rank 0 writes results and logs. Samples are the same as in
    one process (they depend on config, plan, seed and index only). ``allow_small``: FID of fewer than
    2,048 samples (or against such a reference), labelled small-sample; refused otherwise.
    """
    from pfdiff_bench.sampling.distributed import Dist, _device_for_rank
    from pfdiff_bench.sampling.rundir import append_result, iter_image_batches, num_shards, read_manifest
    from pfdiff_bench.sampling.engine import run_sampling

    d = dist_ctx or Dist()
    say = log if d.rank == 0 else (lambda m: None)
    done = {"sampled": 0, "evaluated": 0, "cached": 0}
    runnable = [c for c in cells if c.cfg is not None]
    check_sample_floor(table, runnable, allow_small)
    check_cell_runs(runnable, redo=redo and d.rank == 0, log=say)  # before anything is sampled
    d.barrier()
    w = ref = None
    if table.metric == "fid" and runnable:
        # what determines the FID, resolved (and hashed) once before the cache is consulted
        from pfdiff_bench.evaluation.refstats import load_ref
        from pfdiff_bench.evaluation.tools import resolve_weights

        w = resolve_weights(table.fid_tool, inception_weights, trust_weights=trust_weights, log=lambda m: None)
        ref = load_ref(table.reference, fid_tool=table.fid_tool, inception_weights=inception_weights,
                       trust_weights=trust_weights, log=say, allow_small=allow_small)
    nets: dict = {}
    for i, cell in enumerate(runnable, 1):
        device = _device_for_rank(cell.cfg, d)
        fp = expected_fingerprint(cell)
        if _agree(d, not _complete(cell), device):
            say(f"[{i}/{len(runnable)}] sampling {cell.row.name} at NFE {cell.nfe} -> {cell.run_dir}")
            summary = run_sampling(cell.cfg, cell.run_dir, setup=_setup_for(cell, device, nets), dist_ctx=d,
                                   progress=progress, log=say)
            say(f"[{i}/{len(runnable)}] {summary.line()}")
            done["sampled"] += 1
        man = read_manifest(cell.run_dir)
        if man.get("fingerprint") != fp:  # the engine and expected_fingerprint disagree: never show it as the cell
            raise PFDiffError(f"{cell.run_dir}: run fingerprint {man.get('fingerprint')} is not the cell's {fp}")
        key = _cache_key(cell, table.metric, fp, getattr(w, "sha256", None), getattr(ref, "sha256", None),
                         table.fid_tool)
        if table.metric == "fid":  # the label is part of the result: an unlabelled older entry is not reused
            from pfdiff_bench.evaluation.fid import small_sample

            key["small_sample"] = small_sample(key["num_samples"], ref)
        entry = _cached_result(cell, key, log=say)
        if _agree(d, entry is None, device):
            if table.metric == "exact":
                from pfdiff_bench.evaluation.exact import evaluate_run

                entry = evaluate_run(cell.run_dir) if d.rank == 0 else None  # cheap: one process
            else:
                from pfdiff_bench.evaluation.fid import compute_fid

                mine = range(d.rank, num_shards(int(man["num_samples"]), int(man["shard_size"])), d.world)
                entry = compute_fid(iter_image_batches(cell.run_dir, 250, shards=mine), ref,
                                    fid_tool=table.fid_tool, mixed_protocol=table.mixed_protocol,
                                    quantization=man.get("quantization"), inception_weights=inception_weights,
                                    trust_weights=trust_weights, device=device if d.world > 1 else None,
                                    distributed=d.active, allow_small=allow_small)
                if str(table.reference).endswith(".npz"):
                    entry["reference"] = Path(str(table.reference)).stem
                if entry.get("weights_sha256") != w.sha256:
                    raise PFDiffError(f"the Inception weights changed during the evaluation of {cell.run_dir}")
            if d.rank == 0:
                entry["fingerprint"] = fp
                append_result(cell.run_dir, entry)
            d.barrier()  # results.json is written before any rank looks at the next cell
            done["evaluated"] += 1
        else:
            done["cached"] += 1
        if entry is not None:
            cell.result = entry
            cell.value = entry.get("value") if table.metric == "fid" else entry.get("rms_common_mean",
                                                                                       entry.get("rms_mean"))
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
        entry = recorded_result(cell, table.metric) if done == total else None
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
