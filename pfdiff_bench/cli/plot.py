"""`pfdiff-bench plot`: figures from a reproduced table, and 2-D trajectory plots."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pfdiff_bench.cli import cli


@cli.group()
def plot():
    """Figures: metric against NFE, image grids across methods, 2-D ODE trajectories.

    \b
    Examples:
      pfdiff-bench plot table results/table2
      pfdiff-bench plot trajectories --config toy2d --nfe 4 --pfdiff 1,1 --pfdiff 2,1
    """


@plot.command("table")
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--per-cell", default=4, show_default=True, help="Images per cell in the image grid.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="File of the metric-vs-NFE figure; its suffix (.png, .pdf, .svg) is the format, and the image "
                   "grid goes beside it as STEM_samples.SUFFIX. Default: RESULTS_DIR/metric_vs_nfe.png and .pdf, "
                   "RESULTS_DIR/samples_grid.png.")
def plot_table(results_dir, per_cell, out):
    """Metric-vs-NFE plot and a same-seed image grid of a `reproduce` output folder (for an analytic-model
    table: its samples projected on the exact distribution's two principal directions, as in `demo`).

    \b
    Example:
      pfdiff-bench reproduce toy && pfdiff-bench plot table results/toy
      pfdiff-bench plot table results/table2 --out fig/table2.svg
    """
    from pfdiff_bench.sampling.export import first_images
    from pfdiff_bench.errors import PFDiffError
    from pfdiff_bench.evaluation.exact import run_exact_pairs
    from pfdiff_bench.reproduction.plots import (PROJECTED, PROJECTED_ROWS, check_out_suffix, image_grid,
                                                 metric_vs_nfe, projection_grid)

    root = Path(results_dir)
    if out is not None:
        check_out_suffix(out)  # before any work
    path = root / "results.json"
    if not path.is_file():
        raise PFDiffError(f"{path} not found: run `pfdiff-bench reproduce TABLE --out {root}` first")
    res = json.loads(path.read_text())
    metric_out = Path(out) if out is not None else root / "metric_vs_nfe"
    grid_out = (metric_out.with_name(metric_out.stem + "_samples" + metric_out.suffix) if out is not None
                else root / "samples_grid.png")
    written = metric_vs_nfe(res, metric_out)
    images, samples, exact, gmm = {}, {}, {}, None
    for row in res["rows"]:
        for n, cell in row["cells"].items():
            if cell.get("status") == "ok" and cell.get("run_dir") and not row.get("best_of") \
                    and not row.get("auto"):
                key = (row["name"], int(n))
                pairs = run_exact_pairs(cell["run_dir"], PROJECTED)
                if pairs is not None:  # an analytic run: projected against the exact distribution
                    samples[key], exact[key], gmm = pairs
                    continue
                try:
                    images[key] = first_images(cell["run_dir"], per_cell)
                except PFDiffError:
                    continue  # runs without images
    if samples:
        shown = [r for r in PROJECTED_ROWS if any(k[0].split(" (default")[0] == r for k in samples)]
        names = {k[0].split(" (default")[0]: k[0] for k in samples}
        written.append(projection_grid(samples, exact, gmm, grid_out, rows=[names[r] for r in shown] or None))
    elif images:
        written.append(image_grid(images, grid_out, per_cell=per_cell))
    click.echo("wrote " + ", ".join(str(p) for p in written))


@plot.command("trajectories")
@click.option("--config", "-c", default="toy2d", show_default=True, help="A 2-D analytic config.")
@click.option("--nfe", default=4, show_default=True, type=click.IntRange(1))
@click.option("--pfdiff", "variants", multiple=True, default=("1,1", "2,1", "3,3"), show_default=True,
              help="PFDiff variants to draw next to DDIM (repeatable).")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Output file; its suffix (.png, .pdf, .svg) is the format. Default: "
                   "results/toy/trajectories.png and .pdf.")
def plot_trajectories(config, nfe, variants, out):
    """Probability-flow trajectories: exact path, DDIM states, PFDiff states with springboards marked.

    \b
    Example:
      pfdiff-bench plot trajectories --nfe 6 --pfdiff 2,1 --out traj.svg
    """
    from pfdiff_bench.config import load_config, parse_pfdiff
    from pfdiff_bench.reproduction.plots import check_out_suffix, trajectories_2d

    if out is None:
        out = "results/toy/trajectories"  # no suffix: PNG and PDF
    check_out_suffix(out)  # before any work
    pairs = tuple(parse_pfdiff(v) for v in variants)
    written = trajectories_2d(load_config(config), nfe=nfe, variants=pairs, out=Path(out))
    click.echo("wrote " + ", ".join(str(p) for p in written))
