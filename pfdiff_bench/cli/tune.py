"""`pfdiff-bench tune`: choose PFDiff's (k, h) per NFE on a pilot batch, without the test metric."""

from __future__ import annotations

from pathlib import Path

import click

from pfdiff_bench.cli import cli


@cli.command()
@click.option("--config", "-c", "config", required=True, help="Bundled config name or YAML path.")
@click.option("--nfe", "nfes", default="4,6,8,10", show_default=True, help="Comma-separated NFEs.")
@click.option("--pilot", type=int, default=256, show_default=True, help="Pilot batch size (samples per sampler).")
@click.option("--reference", help="High-accuracy solution: 'exact' (analytic model; its default) or "
                                  "dpm-solver-ORDER:STEPS (networks; default dpm-solver-3:100).")
@click.option("--device", help="cpu, cuda, cuda:1 or auto (default: the config's).")
@click.option("--batch-size", "-b", type=int, help="Network batch size (default: the config's).")
@click.option("--out", "-o", default="results/tune", show_default=True, type=click.Path(file_okay=False),
              help="Folder for tune_choice.json.")
def tune(config, nfes, pilot, reference, device, batch_size, out):
    """Pick PFDiff's (k, h) per NFE by distance to a high-accuracy ODE solution on a pilot batch.

    The baseline and the six variants run from the same pilot x_T (a seed namespace disjoint from every
    evaluation seed range); each final sample is compared with the exact solution (analytic model) or a
    DPM-Solver reference at large NFE from the same x_T, whose self-convergence (step halved) is
    printed. The pick is the smallest mean distance; see docs/TUNE.md.

    \b
    Examples:
      pfdiff-bench tune --config toy --nfe 4,6,8,10
      pfdiff-bench tune --config cifar10 --nfe 4,6 --pilot 128 --reference dpm-solver-3:100 --device cuda
    """
    from pfdiff_bench.cli.reproduce import _ints
    from pfdiff_bench.config import load_config
    from pfdiff_bench.reproduction.tune import tune as run_tune, write_choice

    cfg = load_config(config)
    res = run_tune(cfg, _ints(nfes), pilot=pilot, reference=reference, device=device, batch_size=batch_size,
                   log=click.echo)
    sc = res["reference_self_convergence_max"]
    click.echo(f"reference: {res['reference']}" + (f"; self-convergence (largest over intervals): {sc:.3g}"
                                                   if sc is not None else " (exact solution)"))
    click.echo("picks: " + ", ".join(f"NFE {n}: {p}" for n, p in res["picks"].items()))
    click.echo(f"pilot: {res['pilot']} samples from seed namespace {res['seed_namespace']!r}, cost "
               f"{res['cost_nfe']:,} network evaluations")
    click.echo(f"wrote {write_choice(res, Path(out))}")
