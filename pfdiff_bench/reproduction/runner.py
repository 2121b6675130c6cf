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
    """Everything that produced a cached value of ``metric`` (the FID key is unchanged since issue 10; IS,
    KID and precision/recall add their layer and torch-fidelity options, evaluation/fid.py)."""
    from pfdiff_bench.evaluation.features import FID_LAYER, IS_LAYER, IS_SPLIT_SIZE
    from pfdiff_bench.evaluation.fid import KID_OPTIONS, PRC_OPTIONS

    key = {"fingerprint": fp, "metric": metric, "num_samples": int(cell.cfg["sampling"]["num_samples"])}
    if metric in ("fid", "kid", "prc"):
        key.update(fid_tool=fid_tool or "torch-fidelity", feature_layer=FID_LAYER, weights_sha256=weights_sha256,
                   reference_sha256=reference_sha256)
    if metric == "is":
        key.update(fid_tool=fid_tool or "torch-fidelity", feature_layer=IS_LAYER, weights_sha256=weights_sha256,
                   split_size=IS_SPLIT_SIZE)
    key.update(KID_OPTIONS if metric == "kid" else PRC_OPTIONS if metric == "prc" else {})
    return key


def _cached_result(cell: Cell, key: dict, log: Callable[[str], None] = print) -> Optional[dict]:
    """The newest result entry of the cell's run whose every key field matches ``key`` (else None, logged).

    This full-key lookup is the only one whose value is ever shown (table, ``--status``)."""
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
        log(f"{cell.row.name} NFE {cell.nfe}{_range_text(cell)}: cached {key['metric']} not reused "
            f"({', '.join(differs)} differ{'s' if len(differs) == 1 else ''}); recomputing")
    return None


def recorded_result(cell: Cell, metric: str) -> Optional[dict]:
    """The newest ``metric`` entry recorded for the run the cell asks for (its fingerprint), without hashing
    weights or references: for job planning only (which cells a job array still has to do). Never shown:
    ``run_table`` and ``table_status`` use the full key (:func:`_cached_result`)."""
    from pfdiff_bench.sampling.rundir import load_results

    try:
        results = load_results(cell.run_dir)
        fp = expected_fingerprint(cell)
    except PFDiffError:
        return None
    return next((e for e in reversed(results) if e.get("metric") == metric and e.get("fingerprint") == fp), None)


def _range_text(cell: Cell) -> str:
    """" (seeds 256-511)" for a seed-range sub-cell (``--seeds``), "" for range 0."""
    if not cell.seed_range:
        return ""
    n, off = int(cell.cfg["sampling"]["num_samples"]), int(cell.cfg["sampling"].get("seed_offset", 0))
    return f" (seeds {off}-{off + n - 1})"


def table_metrics(table: TableSpec, metrics: Optional[list] = None) -> list[str]:
    """The metrics evaluated per cell: ["exact"], or FID first plus the extra ``--metrics``."""
    if table.metric == "exact":
        return ["exact"]
    return list(metrics or [table.metric])


def eval_context(table: TableSpec, inception_weights=None, trust_weights: bool = False, download: bool = True,
                 log: Callable[[str], None] = print, allow_small: bool = True):
    """(weights, reference) that determine an FID table's values, resolved and hashed once; (None, None) for
    exact tables."""
    if table.metric != "fid":
        return None, None
    from pfdiff_bench.evaluation.refstats import load_ref
    from pfdiff_bench.evaluation.tools import resolve_weights

    w = resolve_weights(table.fid_tool, inception_weights, trust_weights=trust_weights, download=download,
                        log=lambda m: None)
    ref = load_ref(table.reference, fid_tool=table.fid_tool, inception_weights=inception_weights,
                   trust_weights=trust_weights, download=download, log=log, allow_small=allow_small)
    return w, ref


def _full_keys(table: TableSpec, cell: Cell, ms: list, fp: str, w, ref) -> dict:
    """metric -> the full cache key of the cell's value (:func:`_cache_key`, plus the small-sample label of
    FID and IS: the label is part of the result, so an unlabelled older entry is not reused)."""
    keys = {m: _cache_key(cell, m, fp, getattr(w, "sha256", None), getattr(ref, "sha256", None), table.fid_tool)
            for m in ms}
    if table.metric == "fid":
        from pfdiff_bench.evaluation.fid import small_sample

        keys["fid"]["small_sample"] = small_sample(keys["fid"]["num_samples"], ref)
        if "is" in keys:
            keys["is"]["small_sample"] = small_sample(keys["is"]["num_samples"])
    return keys


def _entry_value(metric: str, entry: dict) -> Optional[float]:
    if metric == "exact":
        return entry.get("rms_common_mean", entry.get("rms_mean"))
    return entry.get("value")


def _network_key(cfg: dict, device) -> str:
    import json

    return json.dumps({k: cfg[k] for k in ("model", "guidance", "schedule")}, sort_keys=True) + f"@{device}"


def _setup_for(cell: Cell, device, nets: dict, d=None):
    """The cell's Setup; the network (checkpoint) is built once per rank and shared by the cells that use it
    (rank 0 first under torchrun: a first-use checksum pin is written once, then the other ranks load)."""
    from pfdiff_bench.sampling.distributed import Dist, rank_zero_first
    from pfdiff_bench.sampling.setup import build

    if cell.cfg["model"]["type"] == "analytic":
        return build(cell.cfg, device=device)
    key = _network_key(cell.cfg, device)
    if key not in nets:
        from pfdiff_bench.models import networks

        nets[key] = rank_zero_first(d or Dist(), networks.build_from_config, cell.cfg, device)
    return build(cell.cfg, device=device, net=nets[key])


def _agree(d, flag: bool, device) -> bool:
    """True on every rank when it is true on any rank (all ranks take the same branch)."""
    return bool(d.all_reduce([float(flag)], "max", device)[0])


def run_table(table: TableSpec, cells: list[Cell], *, inception_weights: Optional[str] = None,
              trust_weights: bool = False, redo: bool = False, log: Callable[[str], None] = print, dist_ctx=None,
              progress: Optional[bool] = None, allow_small: bool = False, metrics: Optional[list] = None) -> dict:
    """Sample incomplete cells, evaluate unevaluated ones; returns counters of the work done.

    Under torchrun (``dist_ctx``, one process group for the whole table) every cell's shards are spread
    over all ranks by the engine, each rank builds each network once, FID features are extracted by all
    ranks and all-reduced in float64, and only rank 0 writes results and logs. Samples are the same as in
    one process (they depend on config, plan, seed and index only). ``allow_small``: FID of fewer than
    2,048 samples (or against such a reference), labelled small-sample; refused otherwise.

    ``cells`` may carry seed ranges (``--seeds K``, ``cell.ranges``): every range is its own run, evaluated
    and cached on its own, and the cell's value becomes the mean over its ranges (:func:`aggregate_ranges`).
    ``metrics``: FID tables' metrics (``evaluation.fid.parse_metrics``; default: FID only); IS, KID and
    precision/recall are evaluated in one process. ``progress``: one bar over all the table's samples
    (rank 0, stderr; None: only when stderr is a terminal, tqdm's rule), which replaces each run's own bar.
    """
    import sys

    from pfdiff_bench.reproduction.cells import all_cells
    from pfdiff_bench.sampling.distributed import Dist, _device_for_rank, own_share, rank_zero_first
    from pfdiff_bench.sampling.rundir import append_result, iter_image_batches, num_shards, read_manifest
    from pfdiff_bench.sampling.engine import run_sampling

    d = dist_ctx or Dist()
    ms = table_metrics(table, metrics)
    if d.world > 1 and set(ms) - {"fid", "exact"}:
        raise PFDiffError(f"--metrics {','.join(m for m in ms if m not in ('fid', 'exact'))} are evaluated in one "
                          f"process: sample the table under torchrun with FID only, then run the same command "
                          f"without torchrun (the samples and the FID are reused)")
    done = {"sampled": 0, "evaluated": 0, "cached": 0}
    runnable = [c for c in all_cells(cells) if c.cfg is not None]
    check_sample_floor(table, runnable, allow_small)
    bar = _table_bar(table, runnable, d, progress)
    if d.rank != 0:
        say = lambda m: None  # noqa: E731
    elif bar is not None:
        from tqdm.auto import tqdm

        def say(m):  # log lines above the bar, never through it
            with tqdm.external_write_mode(file=sys.stderr):
                log(m)
    else:
        say = log
    try:
        check_cell_runs(runnable, redo=redo and d.rank == 0, log=say)  # before anything is sampled
        d.barrier()
        # what determines the FID, resolved (and hashed) once before the cache is consulted
        # rank 0 first: a download (or a reference computation) happens once, the others then read the files
        w, ref = (rank_zero_first(d, eval_context, table, inception_weights, trust_weights, log=say,
                                  allow_small=allow_small)
                  if runnable else (None, None))
        if ref is not None and set(ms) & {"kid", "prc"}:
            from pfdiff_bench.evaluation.refstats import reference_features

            if ref.fmt not in ("adm-batch", "activations"):
                reference_features(ref)  # the one-line refusal, before anything is sampled
        nets: dict = {}
        counted = {id(c): _done_samples(c) for c in runnable}
        for i, cell in enumerate(runnable, 1):
            where = f"{cell.row.name} at NFE {cell.nfe}{_range_text(cell)}"
            device = _device_for_rank(cell.cfg, d)
            fp = expected_fingerprint(cell)
            if _agree(d, not _complete(cell), device):
                say(f"[{i}/{len(runnable)}] sampling {where} -> {cell.run_dir}")
                if bar is not None:
                    bar.set_postfix_str(where, refresh=False)
                summary = run_sampling(cell.cfg, cell.run_dir, setup=_setup_for(cell, device, nets, d), dist_ctx=d,
                                       progress=progress, log=say, bar=bar)
                say(f"[{i}/{len(runnable)}] {summary.line()}")
                done["sampled"] += 1
            if bar is not None:  # exact after each cell (under torchrun the bar advanced by an estimate)
                counted[id(cell)] = int(cell.cfg["sampling"]["num_samples"])
                bar.n = sum(counted.values())
                bar.refresh()
            man = read_manifest(cell.run_dir)
            if man.get("fingerprint") != fp:  # the engine and expected_fingerprint disagree: never show it as the cell
                raise PFDiffError(f"{cell.run_dir}: run fingerprint {man.get('fingerprint')} is not the cell's {fp}")
            keys = _full_keys(table, cell, ms, fp, w, ref)
            entries = {m: _cached_result(cell, keys[m], log=say) for m in ms}
            todo = [m for m in ms if entries[m] is None]
            if _agree(d, bool(todo), device):
                new = {}
                if table.metric == "exact":
                    from pfdiff_bench.evaluation.exact import evaluate_run

                    new = {"exact": evaluate_run(cell.run_dir)} if d.rank == 0 else {}  # cheap: one process
                else:
                    from pfdiff_bench.evaluation.fid import evaluate_batches

                    mine = range(d.rank, num_shards(int(man["num_samples"]), int(man["shard_size"])), d.world)
                    with own_share(d):  # a corrupt shard is met by the rank that reads it
                        got = evaluate_batches(iter_image_batches(cell.run_dir, 250, shards=mine), fid_ref=ref,
                                               isc="is" in todo, kid="kid" in todo, prc="prc" in todo,
                                               fid_tool=table.fid_tool, mixed_protocol=table.mixed_protocol,
                                               quantization=man.get("quantization"),
                                               inception_weights=inception_weights, trust_weights=trust_weights,
                                               device=device if d.world > 1 else None, distributed=d.active,
                                               allow_small=allow_small)
                    for m in todo:
                        entry = got[m]
                        if str(table.reference).endswith(".npz") and m != "is":
                            entry["reference"] = Path(str(table.reference)).stem
                        if entry.get("weights_sha256") != w.sha256:
                            raise PFDiffError(f"the Inception weights changed during the evaluation of {cell.run_dir}")
                        new[m] = entry
                if d.rank == 0:
                    for m in todo:
                        new[m]["fingerprint"] = fp
                        append_result(cell.run_dir, new[m])
                        entries[m] = new[m]
                d.barrier()  # results.json is written before any rank looks at the next cell
                done["evaluated"] += 1
            else:
                done["cached"] += 1
            primary = entries[ms[0]]
            if primary is not None:
                cell.result = primary
                cell.value = _entry_value(ms[0], primary)
                cell.extra = _extra_values(ms, entries)
    finally:
        if bar is not None:
            bar.close()
    aggregate_ranges(cells)
    return done


def _extra_values(ms: list, entries: dict) -> dict:
    from pfdiff_bench.evaluation.fid import metric_values

    out = {}
    for m in ms[1:]:
        if entries.get(m) is not None:
            out.update(metric_values(m, entries[m]))
    return out


def _done_samples(cell: Cell) -> int:
    """Samples of the cell's run already on disk (0 when it is not the cell's run)."""
    from pfdiff_bench.sampling.rundir import missing_samples, read_manifest

    try:
        if not (cell.run_dir / "manifest.json").is_file():
            return 0
        man = read_manifest(cell.run_dir)
        if man.get("fingerprint") != expected_fingerprint(cell):
            return 0
        return min(int(man["num_samples"]) - missing_samples(cell.run_dir)[0], int(cell.cfg["sampling"]["num_samples"]))
    except (PFDiffError, KeyError, ValueError):
        return 0


def _table_bar(table: TableSpec, runnable: list[Cell], d, progress: Optional[bool]):
    """One tqdm bar over cells x samples (images/s), rank 0 on stderr; None with ``--no-progress``.
    ``progress=None`` leaves it to tqdm (``disable=None``: off when stderr is not a terminal)."""
    import sys

    if d.rank != 0 or progress is False or not runnable:
        return None
    from tqdm.auto import tqdm

    total = sum(int(c.cfg["sampling"]["num_samples"]) for c in runnable)
    return tqdm(total=total, initial=sum(_done_samples(c) for c in runnable), unit="img",
                desc=f"{table.name} ({len(runnable)} runs)", disable=None if progress is None else False,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def aggregate_ranges(cells: list[Cell]) -> None:
    """Cells with seed ranges (``--seeds K``): value = mean of the K range values, ``std`` = their sample
    standard deviation (ddof=1), ``range_values`` = every range's value and seed indices; extra metrics
    alike. Exact tables: the per-sample errors of all ranges are concatenated in range order, so the paired
    statistics and best-of test use all K x n samples (the same x_T for every method in each range).
    A cell with a range not evaluated has no value. K = 1: nothing changes."""
    import statistics

    for cell in cells:
        if not cell.ranges or cell.cfg is None:
            continue
        parts = [cell, *cell.ranges]
        per = []
        for c in parts:
            n, off = int(c.cfg["sampling"]["num_samples"]), int(c.cfg["sampling"].get("seed_offset", 0) or 0)
            per.append({"range": c.seed_range, "seeds": [off, off + n - 1], "run_dir": str(c.run_dir),
                        "value": c.value, **({"extra": dict(c.extra)} if c.extra else {})})
        cell.range_values = per
        if any(c.value is None for c in parts):
            cell.value, cell.std, cell.extra, cell.extra_std = None, None, {}, {}
            continue
        vals = [c.value for c in parts]
        cell.value, cell.std = statistics.fmean(vals), statistics.stdev(vals)
        for f in list(cell.extra):
            xs = [c.extra.get(f) for c in parts]
            if any(x is None for x in xs):
                cell.extra.pop(f)
                continue
            cell.extra[f], cell.extra_std[f] = statistics.fmean(xs), statistics.stdev(xs)
        if all(c.result and c.result.get("rms_per_sample") for c in parts):
            cell.result = dict(cell.result, rms_per_sample=[v for c in parts for v in c.result["rms_per_sample"]])


# ------------------------------------------------------------------------ status (nothing is started)
def table_status(table: TableSpec, cells: list[Cell], *, inception_weights: Optional[str] = None,
                 trust_weights: bool = False, metrics: Optional[list] = None) -> list[dict]:
    """Per runnable cell (and seed range): samples done/total, evaluated or not (and the finished value's
    protocol), ETA.

    "Evaluated" means a result under the full cache key (:func:`_cached_result`: run fingerprint, metric and
    options, weights and reference SHA-256, sample count), as ``run_table`` would reuse it, for every metric
    asked for; a value recorded under another key is never shown. The weights and reference are hashed
    here, never downloaded or computed; when they are missing the values are "not verifiable here".
    The ETA divides the cell's missing image-NFEs by the rate measured in the manifests' timings of the
    table's runs that sampled something (images/s x NFE, so cells of another NFE share one rate); None
    when nothing has been timed yet. Reads files only.
    """
    from pfdiff_bench.reproduction.cells import all_cells
    from pfdiff_bench.sampling.rundir import missing_samples, read_manifest

    ms = table_metrics(table, metrics)
    unverifiable = None
    w = ref = None
    try:
        if table.metric == "fid":
            from pfdiff_bench.evaluation import refstats

            spec = refstats.REFERENCES.get(str(table.reference))
            if spec is not None and spec.kind == "computed" and \
                    not refstats.ref_cache_path(spec.name, table.fid_tool).is_file():
                raise PFDiffError(f"reference {spec.name} has not been computed with {table.fid_tool} yet")
        w, ref = eval_context(table, inception_weights, trust_weights, download=False, log=lambda m: None)
    except PFDiffError as exc:
        unverifiable = str(exc)
    rows, rates = [], []
    for cell in all_cells(cells):
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
        entry, note = None, None
        if done == total and unverifiable is None:
            keys = _full_keys(table, cell, ms, expected_fingerprint(cell), w, ref)
            found = [_cached_result(cell, keys[m], log=lambda m: None) for m in ms]
            entry = found[0] if all(e is not None for e in found) else None
        elif done == total and recorded_result(cell, ms[0]) is not None:
            note = f"recorded value not verifiable here ({unverifiable})"
        proto = None
        if entry is not None:
            proto = "exact" if table.metric == "exact" else (
                f"{entry.get('label')} {entry.get('fid_tool')} vs {entry.get('reference')}, "
                f"{entry.get('num_samples')} samples" + (f"; {', '.join(ms)}" if len(ms) > 1 else ""))
        rows.append({"row": cell.row.name, "nfe": cell.nfe, "run_dir": str(cell.run_dir), "done": done,
                     "total": total, "evaluated": entry is not None, "protocol": proto, "note": note,
                     "seeds": _range_text(cell).strip(" ()") or None,
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
        ev = f"evaluated ({r['protocol']}): {r['value']:.6g}" if r["evaluated"] else (r.get("note")
                                                                                   or "not evaluated")
        seeds = f" [{r['seeds']}]" if r.get("seeds") else ""
        out.append(f"  {r['row']:28s} NFE {r['nfe']:>3}{seeds}: {r['done']}/{r['total']} samples, {ev}, "
                   f"ETA {eta(r['eta_s'])}")
    done = sum(r["done"] for r in rows)
    total = sum(r["total"] for r in rows)
    left = [r["eta_s"] for r in rows]
    out.append(f"{done}/{total} samples, {sum(r['evaluated'] for r in rows)}/{len(rows)} cells evaluated, "
               f"ETA {eta(None if any(e is None for e in left) else sum(left))} (sampling, at the measured rate)")
    return out
