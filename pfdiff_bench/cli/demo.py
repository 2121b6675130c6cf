"""`pfdiff-bench demo`: the toy table on exact ground truth, plus its plots, on CPU in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pfdiff_bench.cli import cli


@cli.command()
@click.option("--table", default="toy", show_default=True, help="An analytic-model table (bundled name or YAML path).")
@click.option("--nfe", "nfes", help="Comma-separated NFE columns (default: the table's, 4,6,8,10).")
@click.option("--num-samples", "-n", type=click.IntRange(1), help="Samples per cell (default: the table's).")
@click.option("--out", "-o", default="results/toy", show_default=True, type=click.Path(file_okay=False),
              help="Where table.md/.csv/.tex, results.json and the plots are written.")
@click.option("--plots/--no-plots", default=True, show_default=True, help="Also draw the figures.")
def demo(table, nfes, num_samples, out, plots):
    """Sampler error against the exact ODE solution of the analytic model, with figures.

    Rows: DDIM, DPM-Solver++(2M) (on its logSNR grid and on time_uniform) and DDIM + PFDiff for the six (k, h), plus the best (k, h) per NFE
    (chosen on these samples) and the auto (k, h) of `pfdiff-bench tune` (chosen on a disjoint pilot),
    and the extra baselines (UniPC, DPM-Solver++(3M), iPNDM, tAB-DEIS; not in the paper);
    columns: NFE. Each cell is the mean RMS distance between a sampler's output and the exact
    probability-flow ODE solution from the same x_T (lower is better). No download, CPU only; the
    samples stay in memory (`pfdiff-bench reproduce toy` is the persisted, resumable version).

    \b
    Example:
      pfdiff-bench demo
      pfdiff-bench demo --nfe 4,6,8,10,15,20 --num-samples 1024 --out results/toy-big
    """
    from pfdiff_bench.cli.reproduce import _ints
    from pfdiff_bench.reproduction.exact_table import beats_baseline, fill_exact_cells
    from pfdiff_bench.reproduction.writers import assemble, to_markdown, write_outputs
    from pfdiff_bench.reproduction.tables import load_table
    from pfdiff_bench.reproduction.cells import plan_cells

    t0 = time.time()
    outdir = Path(out)
    spec = load_table(table)
    cells = plan_cells(spec, outdir, num_samples=num_samples, nfes=_ints(nfes))
    exact = {}
    keep = 0
    if plots:
        from pfdiff_bench.reproduction.plots import PROJECTED, PROJECTED_ROWS

        keep = PROJECTED
    kept = fill_exact_cells(cells, keep=keep, exact_out=exact)
    from pfdiff_bench.reproduction.tune import auto_picks

    auto = auto_picks(spec, cells, outdir)  # tune's pick per NFE on a disjoint pilot batch (cached in OUT/tune.json)
    res = assemble(spec, cells, auto=auto)
    paths = write_outputs(res, outdir)
    click.echo(to_markdown(res))
    for n, rows in beats_baseline(res).items():
        names = ", ".join(r.replace("DDIM + PFDiff-", "").split(" (default")[0] for r in rows) or "none"
        click.echo(f"NFE {n:>2}: PFDiff variants beating DDIM on exact ground truth: {names}")
    click.echo("(beating = paired per-sample difference from the same x_T below minus two standard errors; "
               "the others are ties or worse)")
    if plots:
        from pfdiff_bench.config import load_config
        from pfdiff_bench.reproduction.plots import metric_vs_nfe, projection_grid, trajectories_2d
        from pfdiff_bench.sampling.setup import analytic_mixture

        paths += metric_vs_nfe(res, outdir / "error_vs_nfe")
        if kept:  # the toy's samples as 2-D projections against the exact distribution, exact-ODE row first
            gmm = analytic_mixture(next(c.cfg for c in cells if c.cfg)["model"])
            shown = [r.name for r in spec.rows if r.name in PROJECTED_ROWS and any(k[0] == r.name for k in kept)]
            paths.append(projection_grid(kept, exact, gmm, outdir / "samples_grid.png", rows=shown or None))
        paths += trajectories_2d(load_config("toy2d"), nfe=4, out=outdir / "trajectories")
    click.echo(f"\nwrote {', '.join(str(p) for p in paths)} in {time.time() - t0:.1f}s")
