"""`pfdiff-bench demo`: the toy table on exact ground truth, on CPU, in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pfdiff_bench.cli import cli


@cli.command()
@click.option("--config", "-c", default="toy", show_default=True, help="An analytic-model config (path or bundled name).")
@click.option("--nfe", "nfes", default="4,6,8,10", show_default=True, help="Comma-separated NFE columns.")
@click.option("--num-samples", "-n", default=64, show_default=True, type=click.IntRange(1),
              help="Samples (shared x_T across all cells).")
@click.option("--out", "-o", default="results/toy", show_default=True, type=click.Path(file_okay=False),
              help="Where table.md and table.csv are written.")
def demo(config, nfes, num_samples, out):
    """Sampler error against the exact ODE solution of the analytic model.

    Rows: DDIM, DPM-Solver++(2M) and DDIM + PFDiff for the six (k, h); columns: NFE. Each cell is the
    mean RMS distance between a sampler's output and the exact probability-flow ODE solution from the
    same x_T (lower is better; bold = best in the column). No download, CPU only.

    \b
    Example:
      pfdiff-bench demo
      pfdiff-bench demo --nfe 4,6,8,10,15,20 --num-samples 256
    """
    from pfdiff_bench.config import load_config
    from pfdiff_bench.errors import ConfigError
    from pfdiff_bench.exact_table import beats_baseline, exact_error_table, format_csv, format_markdown

    try:
        nfe_list = [int(v) for v in nfes.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--nfe expects comma-separated integers, got {nfes!r}") from None
    t0 = time.time()
    table = exact_error_table(load_config(config), nfes=nfe_list, num_samples=num_samples)
    md = format_markdown(table)
    click.echo(f"Mean RMS distance to the exact ODE solution ({num_samples} samples, config {config}):\n")
    click.echo(md)
    click.echo("")
    for n, rows in beats_baseline(table).items():
        names = ", ".join(r.replace("DDIM + PFDiff-", "") for r in rows) or "none"
        click.echo(f"NFE {n:>2}: PFDiff variants beating DDIM: {names}")
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "table.md").write_text(md + "\n")
    (outdir / "table.csv").write_text(format_csv(table))
    click.echo(f"\nwrote {outdir / 'table.md'} and {outdir / 'table.csv'} in {time.time() - t0:.1f}s")
