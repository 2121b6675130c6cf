"""`pfdiff-bench export` and `pfdiff-bench eval`: read a run directory written by `sample`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pfdiff_bench.cli import cli

REFERENCE_STEPS = 500  # pfdiff_bench.models.analytic.REFERENCE_STEPS (literal: --help must not import torch)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.argument("out_npz", type=click.Path(dir_okay=False))
@click.option("--raw", is_flag=True, help="Also store the float arrays the run keeps (samples, x_T), labels, indices.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False), help="Also write one PNG per sample, named by its index.")
def export(run_dir, out_npz, raw, png_dir):
    """Export a complete run as an .npz: arr_0 uint8 NHWC (index order), arr_1 labels.

    arr_1 is present for class-conditional runs only (the layout of the guided-diffusion and
    ADM evaluation scripts). An incomplete run is refused.

    \b
    Examples:
      pfdiff-bench export runs/toy-pf21 samples.npz
      pfdiff-bench export runs/toy-pf21 samples.npz --raw --png pngs/
    """
    from pfdiff_bench.sampling.export import export_npz

    shapes = export_npz(Path(run_dir), Path(out_npz), raw=raw, png_dir=png_dir)
    desc = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
    click.echo(f"{out_npz}: {desc}" + (f"; PNGs in {png_dir}" if png_dir else ""))


@cli.command(name="eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--steps", type=int, default=REFERENCE_STEPS, show_default=True, help="RK4 steps of the exact ODE reference.")
@click.option("--json", "as_json", is_flag=True, help="Print the result entry as JSON.")
def eval_cmd(run_dir, steps, as_json):
    """Exact metrics of an analytic-model run, appended to RUN_DIR/results.json.

    RMS distance of every sample to the exact probability-flow ODE solution from the same x_T, and
    the Fréchet distance between the samples' mean/covariance and the mixture's exact ones.

    \b
    Examples:
      pfdiff-bench sample --config toy --nfe 4 --pfdiff 2,1 --out runs/toy-pf21
      pfdiff-bench eval runs/toy-pf21
    """
    from pfdiff_bench.sampling.rundir import append_result
    from pfdiff_bench.errors import ConfigError
    from pfdiff_bench.evaluation.exact import evaluate_run

    if not 10 <= steps <= 100_000:
        raise ConfigError(f"--steps = {steps} is out of range; accepted: [10, 100000]")
    entry = evaluate_run(Path(run_dir), steps=steps)
    append_result(Path(run_dir), entry)
    if as_json:
        click.echo(json.dumps(entry, indent=2))
        return
    rms = "n/a" if entry["rms_mean"] is None else f"{entry['rms_mean']:.3e} (max {entry['rms_max']:.3e})"
    click.echo(f"{entry['sampler']}, NFE {entry['nfe']}, {entry['num_samples']} samples: RMS to exact solution "
               f"{rms}, Fréchet to exact mixture {entry['frechet']:.4e} -> {Path(run_dir) / 'results.json'}")
