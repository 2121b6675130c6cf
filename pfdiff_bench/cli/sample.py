"""`pfdiff-bench sample`: draw samples from a config with any sampler, PFDiff variant and NFE."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from pfdiff_bench.cli import cli
from pfdiff_bench.config import load_config, override


def common_sampler_options(f):
    """Options that pick the sampler; shared by commands that sample."""
    opts = [
        click.option("--config", "-c", "config", default="toy", show_default=True,
                     help="A YAML path or the name of a bundled config (toy, cifar10, imagenet64, ...)."),
        click.option("--nfe", type=int, help="Network evaluations per sample (default: the config's)."),
        click.option("--sampler", type=click.Choice(["ddim", "dpm-solver", "dpm-solver++"]),
                     help="Base solver."),
        click.option("--convention", type=click.Choice(["ddim", "guided", "dpm_solver"]),
                     help="Official codebase profile (which quantity PFDiff buffers, which grid)."),
        click.option("--order", type=int, help="DPM-Solver order (1, 2 or 3)."),
        click.option("--multistep", is_flag=True, default=None, help="Multistep DPM-Solver (e.g. DPM-Solver++(2M))."),
        click.option("--method", type=click.Choice(["singlestep_fixed", "singlestep", "multistep"]),
                     help="DPM-Solver method (singlestep = DPM-Solver-fast)."),
        click.option("--pfdiff", "pfdiff", metavar="K,H|none", help="PFDiff variant, e.g. 2,1; 'none' for the baseline."),
        click.option("--grid", "grid", help="Time grid: uniform, quad, ddim_respacing, section_respacing, "
                                            "time_uniform, logSNR, time_quadratic."),
        click.option("--eta", type=float, help="DDIM eta (ddim convention only)."),
        click.option("--seed", type=int, help="Base seed; sample i uses a generator seeded by (seed, i)."),
        click.option("--device", help="cpu, cuda, cuda:1 or auto."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def config_from_options(config, nfe=None, sampler=None, convention=None, order=None, multistep=None,
                        method=None, pfdiff=None, grid=None, eta=None, seed=None, device=None, **_):
    cfg = load_config(config)
    if sampler in ("dpm-solver", "dpm-solver++") and convention is None:
        convention = "dpm_solver"
        if cfg["sampler"]["convention"] != "dpm_solver" and grid is None:
            cfg["sampler"]["grid"] = None  # the ddim-style grid of the config does not apply
    if multistep:
        method = "multistep"
    for key, val in (("sampling.nfe", nfe), ("sampler.name", sampler), ("sampler.convention", convention),
                     ("sampler.order", order), ("sampler.method", method), ("sampler.pfdiff", pfdiff),
                     ("sampler.grid", grid), ("sampler.eta", eta), ("sampling.seed", seed),
                     ("sampling.device", device)):
        override(cfg, key, val)
    return cfg


@cli.command()
@common_sampler_options
@click.option("--num-samples", "-n", type=int, help="How many samples (default: the config's).")
@click.option("--batch-size", "-b", type=int, help="Samples per network batch (does not change the samples).")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory to write (default: runs/<config>-<sampler>-nfe<N>).")
def sample(num_samples, batch_size, out, **opts):
    """Draw samples with a sampler, PFDiff variant and NFE.

    \b
    Examples:
      pfdiff-bench sample --config toy --nfe 4 --pfdiff 2,1
      pfdiff-bench sample --config toy --sampler dpm-solver++ --multistep --order 2 --nfe 6
      pfdiff-bench sample --config imagenet64 --nfe 4 --pfdiff 1,1 --num-samples 50000
    """
    from pfdiff_bench.pipeline import build
    from pfdiff_bench.seeding import draw_inputs

    cfg = config_from_options(**opts)
    override(cfg, "sampling.num_samples", num_samples)
    override(cfg, "sampling.batch_size", batch_size)
    setup = build(cfg)
    n, bs, seed = cfg["sampling"]["num_samples"], cfg["sampling"]["batch_size"], cfg["sampling"]["seed"]
    xs, ys, nfe, t0 = [], [], None, time.time()
    for start in range(0, n, bs):
        idx = list(range(start, min(n, start + bs)))
        x_T, y, gens = draw_inputs(seed, idx, setup.sample_shape, setup.num_classes, dtype=setup.dtype)
        res = setup.sample(x_T, y, noise=gens.randn_like)
        xs.append(res.x.cpu())
        ys.append(y)
        nfe = res.nfe
    x = torch.cat(xs)
    out = Path(out or f"runs/{cfg['name']}-{setup.plan.spec.label().replace(' ', '')}-nfe{nfe}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "labels": None if ys[0] is None else torch.cat(ys), "plan": setup.plan.describe()},
               out / "samples.pt")
    dt = time.time() - t0
    click.echo(f"{setup.plan.spec.label()}: {n} samples, NFE {nfe} (requested {cfg['sampling']['nfe']}), "
               f"{dt:.1f}s, {n / max(dt, 1e-9):.1f} img/s -> {out}")
