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
def plot_table(results_dir, per_cell):
    """Metric-vs-NFE plot (PNG and PDF) and a same-seed image grid of a `reproduce` output folder.

    \b
    Example:
      pfdiff-bench reproduce toy && pfdiff-bench plot table results/toy
    """
    from pfdiff_bench.sampling.export import first_images
    from pfdiff_bench.errors import PFDiffError
    from pfdiff_bench.reproduction.plots import image_grid, metric_vs_nfe

    root = Path(results_dir)
    path = root / "results.json"
    if not path.is_file():
        raise PFDiffError(f"{path} not found: run `pfdiff-bench reproduce TABLE --out {root}` first")
    res = json.loads(path.read_text())
    written = metric_vs_nfe(res, root / "metric_vs_nfe")
    images = {}
    for row in res["rows"]:
        for n, cell in row["cells"].items():
            if cell.get("status") == "ok" and cell.get("run_dir") and not row.get("best_of"):
                try:
                    images[(row["name"], int(n))] = first_images(cell["run_dir"], per_cell)
                except PFDiffError:
                    continue  # runs without images (e.g. a 2-D model)
    if images:
        written.append(image_grid(images, root / "samples_grid", per_cell=per_cell))
    click.echo("wrote " + ", ".join(str(p) for p in written))


@plot.command("trajectories")
@click.option("--config", "-c", default="toy2d", show_default=True, help="A 2-D analytic config.")
@click.option("--nfe", default=4, show_default=True, type=click.IntRange(1))
@click.option("--pfdiff", "variants", multiple=True, default=("1,1", "2,1", "3,3"), show_default=True,
              help="PFDiff variants to draw next to DDIM (repeatable).")
@click.option("--out", "-o", default="results/toy/trajectories.png", show_default=True,
              type=click.Path(dir_okay=False))
def plot_trajectories(config, nfe, variants, out):
    """Probability-flow trajectories: exact path, DDIM states, PFDiff states with springboards marked.

    \b
    Example:
      pfdiff-bench plot trajectories --nfe 6 --pfdiff 2,1 --out traj.png
    """
    from pfdiff_bench.config import load_config, parse_pfdiff
    from pfdiff_bench.reproduction.plots import trajectories_2d

    pairs = tuple(parse_pfdiff(v) for v in variants)
    written = trajectories_2d(load_config(config), nfe=nfe, variants=pairs, out=Path(out))
    click.echo("wrote " + ", ".join(str(p) for p in written))
