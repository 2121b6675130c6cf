"""`pfdiff-bench reproduce TABLE`: run a paper table end to end."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pfdiff_bench.cli import cli


def _ints(text):
    if not text:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@cli.command()
@click.argument("table")
@click.option("--num-samples", "-n", type=int, help="Samples per cell (default: the table's protocol).")
@click.option("--nfe", "nfes", help="Comma-separated subset of the NFE columns, e.g. 4,6.")
@click.option("--rows", help="Comma-separated subset of row names (as printed by --dry-run).")
@click.option("--batch-size", "-b", type=int, help="Network batch size (does not change the samples).")
@click.option("--device", help="cpu, cuda, cuda:1 or auto (default: the config's).")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Output folder (default: results/<table>).")
@click.option("--dry-run", is_flag=True, help="Print the plan of every cell and stop.")
@click.option("--allow-cpu", is_flag=True, help="Run network tables without a GPU (slow; for checks).")
@click.option("--inception-weights", type=click.Path(dir_okay=False), help="Inception-v3 weights file for FID.")
@click.option("--trust-weights", is_flag=True, help="Accept Inception weights whose SHA-256 is not the pinned one.")
@click.option("--fid-tool", type=click.Choice(["torch-fidelity", "pytorch-fid"]), default=None,
              help="FID tool (default: the one the paper used for this table, named in its file).")
@click.option("--mixed-protocol", is_flag=True,
              help="Allow --fid-tool features against a reference of another tool's family (labelled mixed).")
@click.option("--allow-small", is_flag=True,
              help="FID tables: allow fewer than 2,048 samples per cell (the Inception feature dimension); the "
                   "cells are labelled small-sample.")
@click.option("--redo", is_flag=True, help="Replace a run in a cell's folder that is not the run the cell asks for.")
@click.option("--auto-kh/--no-auto-kh", default=None,
              help="Add the 'DDIM + PFDiff (auto k,h)' row from `pfdiff-bench tune` (default: on for exact tables; "
                   "for FID tables it runs a network pilot, so off unless asked).")
@click.option("--tune-pilot", type=int, default=256, show_default=True, help="Pilot batch size of the auto row.")
@click.option("--tune-reference", help="Reference solution of the auto row's pilot (see `pfdiff-bench tune`).")
@click.option("--nfe-axis", type=click.Choice(["scripts", "calls"]), default=None,
              help="Tables with an NFE offset (sd_*): 'scripts' (default) runs the official scripts' step lists, "
                   "network calls = column - 1; 'calls' runs network calls = column.")
@click.option("--captions", type=click.Path(dir_okay=False),
              help="Stable Diffusion tables: the COCO captions JSON (caption i prompts sample i).")
@click.option("--shard-size", type=int, help="Samples per shard file (default: the config's); the unit torchrun "
              "ranks share.")
@click.option("--status", is_flag=True, help="Per cell: samples done/total, evaluated or not, ETA; starts nothing.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@click.option("--launcher", type=click.Choice(["local", "slurm"]), default=None,
              help="Submit one job per group of cells through submitit (slurm: a job array; local: subprocesses).")
@click.option("--slurm-partition", help="SLURM partition of the jobs (--launcher slurm).")
@click.option("--gpus-per-job", type=int, default=1, show_default=True,
              help="GPUs (= processes) per job; each job spreads its cells' shards over them.")
@click.option("--slurm-time", default="04:00", show_default=True, help="Time limit of each job, HH:MM.")
@click.option("--cells-per-job", type=int, default=1, show_default=True, help="Cells run one after another per job.")
@click.option("--wait", is_flag=True, help="With --launcher: wait for the jobs, then write the table.")
@click.option("--seeds", type=int, default=1, show_default=True,
              help="K disjoint seed ranges per cell (range r: seed indices r*n .. (r+1)*n-1, as EDM); the table "
                   "shows mean ± sample std (ddof=1) over the K values.")
@click.option("--metrics", "metrics_text", help="FID tables: comma-separated metrics including fid, from "
              "fid,is,prc,kid (torch-fidelity; pytorch-fid: fid only). Default: the table's (fid).")
def reproduce(table, num_samples, nfes, rows, batch_size, device, out, dry_run, allow_cpu, inception_weights,
              trust_weights, fid_tool, mixed_protocol, auto_kh, tune_pilot, tune_reference, nfe_axis, captions,
              shard_size, status, progress, launcher, slurm_partition, gpus_per_job, slurm_time, cells_per_job, wait,
              redo, allow_small, seeds, metrics_text):
    """Plan, sample, evaluate and tabulate a paper table (ours beside the paper's numbers).

    TABLE is a bundled table (table2, table3, lsun_bedroom, lsun_church, scoresde, imagenet256, toy)
    or a YAML path. Each cell (method x NFE) is a resumable run directory under OUT/runs; a rerun
    samples only what is missing and evaluates only what is not evaluated yet. Writes OUT/table.md,
    table.csv, table.tex and results.json.

    \b
    Examples:
      pfdiff-bench reproduce toy
      pfdiff-bench reproduce table2 --dry-run
      pfdiff-bench reproduce table2 --nfe 4,6 --num-samples 10000
      pfdiff-bench reproduce table2 --status
      pfdiff-bench reproduce table2 --seeds 3 --metrics fid,is,prc,kid
      torchrun --nproc_per_node 8 -m pfdiff_bench.cli reproduce table2   # every cell over 8 GPUs
    """
    from pfdiff_bench.errors import PFDiffError
    from pfdiff_bench.reproduction.writers import assemble, protocol_summary, to_markdown, write_outputs
    from pfdiff_bench.reproduction.cells import blockers, describe_cell, gpu_estimate, plan_cells
    from pfdiff_bench.reproduction.tables import load_table
    from pfdiff_bench.reproduction.runner import check_sample_floor, run_table

    spec = load_table(table)
    if fid_tool is not None or mixed_protocol:
        if spec.metric != "fid":
            raise PFDiffError(f"--fid-tool/--mixed-protocol apply to FID tables; {spec.name} has metric {spec.metric}")
        spec.fid_tool = fid_tool or spec.fid_tool
        spec.mixed_protocol = spec.mixed_protocol or mixed_protocol
    metrics = None
    if metrics_text is not None:
        if spec.metric != "fid":
            raise PFDiffError(f"--metrics applies to FID tables; {spec.name} has metric {spec.metric} "
                              f"(its exact metrics are always computed)")
        from pfdiff_bench.evaluation.fid import parse_metrics

        metrics = parse_metrics(metrics_text, spec.fid_tool)
    outdir = Path(out or f"results/{spec.name}")
    plan_kw = dict(num_samples=num_samples, nfes=_ints(nfes),
                   rows=[r.strip() for r in rows.split(",")] if rows else None, batch_size=batch_size, device=device,
                   nfe_axis=nfe_axis, captions=captions, **({"seeds": seeds} if seeds != 1 else {}))
    cells = plan_cells(spec, outdir, **plan_kw)
    if shard_size is not None:
        if shard_size < 1:
            raise PFDiffError(f"--shard-size must be at least 1 (got {shard_size})")
        from pfdiff_bench.reproduction.cells import all_cells

        for cell in all_cells(cells):
            if cell.cfg is not None:
                cell.cfg["sampling"]["shard_size"] = shard_size
    if status:
        from pfdiff_bench.reproduction.runner import format_status, table_status

        click.echo(f"{spec.title}: {len(cells)} cells -> {outdir}")
        for line in format_status(table_status(spec, cells, inception_weights=inception_weights,
                                               trust_weights=trust_weights, metrics=metrics)):
            click.echo(line)
        return
    from pfdiff_bench.cli import _rank_world

    rank0 = _rank_world()[0] == 0
    echo = click.echo if rank0 else (lambda *a, **k: None)
    fid_txt = f"; FID: {protocol_summary(spec)}" if spec.metric == "fid" else ""
    echo(f"{spec.title}: {len(cells)} cells -> {outdir}{fid_txt}")
    if spec.nfe_axis:
        from pfdiff_bench.reproduction.tables import axis_offset

        off = axis_offset(spec, nfe_axis)
        echo(f"NFE axis: {spec.nfe_axis.get('label', '')} -- this run: network calls = column"
                   + (f" - {off}" if off else "") + (" (--nfe-axis scripts)" if off else " (--nfe-axis calls)"))
    if spec.protocol:
        echo(f"protocol: {spec.protocol}")
    for note in spec.notes:
        echo(f"note: {note}")
    for cell in cells:
        echo("  " + describe_cell(cell))
    if dry_run:
        return
    check_sample_floor(spec, cells, allow_small)  # before anything is submitted, sampled or written
    problems = blockers(spec, cells, allow_cpu=allow_cpu, inception_weights=inception_weights)
    if problems:
        from pfdiff_bench.errors import MissingItems

        many = len(problems) > 1
        raise MissingItems(f"cannot run {spec.name} here: {len(problems)} item{'s are' if many else ' is'} missing",
                           problems, note=gpu_estimate(spec, cells))
    if launcher:
        from pfdiff_bench.reproduction import launch

        jobs = launch.submit(spec, outdir.resolve(), cells, plan_kw, launcher=launcher, gpus_per_job=gpus_per_job,
                             cells_per_job=cells_per_job, slurm_partition=slurm_partition, slurm_time=slurm_time,
                             shard_size=shard_size, eval_kwargs={"inception_weights": inception_weights,
                                                                 "trust_weights": trust_weights,
                                                                 "allow_small": allow_small,
                                                                 **({"metrics": metrics} if metrics else {})})
        if jobs:
            click.echo(f"submitted {len(jobs)} {launcher} job{'s' if len(jobs) > 1 else ''} ({', '.join(str(j.job_id) for j in jobs)}), "
                       f"{gpus_per_job} GPU(s) each; logs in {outdir / 'jobs'}")
        if not wait:
            if jobs:
                click.echo(f"when they have finished, `pfdiff-bench reproduce {table} ...` (same options, without "
                           f"--launcher) collects the cells and writes the table; --status shows progress")
                return
        else:
            launch.wait(jobs)
    from pfdiff_bench.sampling.distributed import dist_from_env
    from pfdiff_bench.sampling.setup import resolve_device

    first = next((c for c in cells if c.cfg is not None), None)
    d = dist_from_env(resolve_device(first.cfg["sampling"]["device"]).type if first else "cpu")
    t0 = time.time()
    try:
        done = run_table(spec, cells, inception_weights=inception_weights, trust_weights=trust_weights, redo=redo,
                         allow_small=allow_small, log=lambda m: click.echo(m, err=True), dist_ctx=d, progress=progress,
                         metrics=metrics)
    finally:
        d.close()
    if d.rank != 0:
        return
    auto = None
    if auto_kh or (auto_kh is None and spec.metric == "exact"):
        from pfdiff_bench.reproduction.tune import auto_picks

        auto = auto_picks(spec, cells, outdir, pilot=tune_pilot, reference=tune_reference,
                          log=lambda m: click.echo(m, err=True))
    res = assemble(spec, cells, auto=auto, metrics=metrics)
    # a subset run writes its own files and never replaces the full table's
    stem = ("-subset" + (f"-nfe{'_'.join(str(v) for v in _ints(nfes))}" if nfes else "")
            + ("-rows" if rows else "")) if (nfes or rows) else ""
    paths = write_outputs(res, outdir, stem)
    if any(c.value is not None for c in cells):
        from pfdiff_bench.reproduction.plots import metric_vs_nfe

        paths += metric_vs_nfe(res, outdir / f"metric_vs_nfe{stem}")  # image grid: `pfdiff-bench plot table OUT`
    click.echo("")
    click.echo(to_markdown(res))
    click.echo(f"sampled {done['sampled']} cells, evaluated {done['evaluated']}, reused {done['cached']} "
               f"in {time.time() - t0:.1f}s; wrote {', '.join(str(p) for p in paths)}")
