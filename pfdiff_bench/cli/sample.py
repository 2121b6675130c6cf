"""`pfdiff-bench sample`: draw samples from a config with any sampler, PFDiff variant and NFE."""

from __future__ import annotations

from pathlib import Path

import click

from pfdiff_bench.cli import cli
from pfdiff_bench.config import load_config, override


def common_sampler_options(f):
    """Options that pick the sampler; shared by commands that sample."""
    opts = [
        click.option("--config", "-c", "config", default="toy", show_default=True,
                     help="A YAML path or the name of a bundled config (toy, cifar10, imagenet64, ...)."),
        click.option("--nfe", type=int, help="Network evaluations per sample (default: the config's)."),
        click.option("--sampler", type=click.Choice(["ddim", "dpm-solver", "dpm-solver++", "unipc", "deis", "ipndm"]),
                     help="Base solver (unipc, deis = tAB-DEIS, ipndm: baselines not in the PFDiff paper)."),
        click.option("--convention", type=click.Choice(["ddim", "guided", "dpm_solver", "deis", "ldm"]),
                     help="Official codebase profile (which quantity PFDiff buffers, which grid)."),
        click.option("--order", type=int, help="Solver order: DPM-Solver/UniPC/tAB-DEIS 1-3, iPNDM 1-4 "
                                                "(default with --sampler unipc/deis: 3, ipndm: 4)."),
        click.option("--unipc-variant", "variant", type=click.Choice(["bh1", "bh2"]),
                     help="UniPC B(h): bh1 = h, bh2 = e^h - 1."),
        click.option("--predict", type=click.Choice(["x0", "eps"]),
                     help="UniPC model value: data (x0) or noise (eps) prediction."),
        click.option("--final-corrector", is_flag=True, default=None,
                     help="UniPC: also correct the last step (costs one extra evaluation)."),
        click.option("--ts-order", type=float, help="DEIS grid exponent k (--grid t: 2, --grid rho: 7 by default)."),
        click.option("--multistep", is_flag=True, default=None, help="Multistep DPM-Solver (e.g. DPM-Solver++(2M))."),
        click.option("--method", type=click.Choice(["singlestep_fixed", "singlestep", "multistep"]),
                     help="DPM-Solver method (singlestep = DPM-Solver-fast)."),
        click.option("--pfdiff", "pfdiff", metavar="K,H|none", help="PFDiff variant, e.g. 2,1; 'none' for the baseline."),
        click.option("--grid", "grid", help="Time grid: uniform, quad, ddim_respacing, section_respacing, "
                                            "time_uniform, logSNR, time_quadratic; DEIS: t, log, rho."),
        click.option("--eta", type=float, help="DDIM eta (ddim convention only)."),
        click.option("--seed", type=int, help="Base seed; sample i uses a generator seeded by (seed, i)."),
        click.option("--device", help="cpu, cuda, cuda:1 or auto."),
        click.option("--checkpoint", "checkpoint", type=click.Path(),
                     help="Use this checkpoint file instead of the zoo's cached copy: the published file (checksummed) or "
                          "your own weights of the config's architecture (keys and shapes checked, SHA-256 recorded); "
                          "Stable Diffusion: the diffusers-format model folder."),
        click.option("--guidance-scale", "guidance_scale", type=float,
                     help="Guidance scale (classifier scale; classifier-free scale for Stable Diffusion)."),
        click.option("--captions", "captions", type=click.Path(dir_okay=False),
                     help="Stable Diffusion: COCO captions JSON; caption i prompts sample i."),
        click.option("--classifier-checkpoint", "classifier_checkpoint", type=click.Path(dir_okay=False),
                     help="Classifier file for guidance instead of the zoo's cached copy."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
                     help="Network precision (fp16/bf16: convolutions low, GroupNorm and softmax float32; "
                          "auto: fp16 for ADM on CUDA as the paper ran, else fp32)."),
        click.option("--attention", type=click.Choice(["sdpa", "einsum"]),
                     help="Attention kernel (sdpa: torch scaled_dot_product_attention, the default)."),
        click.option("--compile/--no-compile", "compile_net", default=None,
                     help="torch.compile the network (fixed shapes; a shorter last batch compiles once more)."),
        click.option("--channels-last/--no-channels-last", "channels_last", default=None,
                     help="Run the network in channels_last memory format."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


_BASELINE_CONVENTION = {"dpm-solver": "dpm_solver", "dpm-solver++": "dpm_solver", "unipc": "dpm_solver",
                        "deis": "deis", "ipndm": "deis"}
_BASELINE_ORDER = {"unipc": 3, "deis": 3, "ipndm": 4}


def config_from_options(config, nfe=None, sampler=None, convention=None, order=None, multistep=None,
                        method=None, pfdiff=None, grid=None, eta=None, seed=None, device=None, checkpoint=None,
                        classifier_checkpoint=None, variant=None, predict=None, final_corrector=None,
                        ts_order=None, guidance_scale=None, captions=None, precision=None, attention=None,
                        compile_net=None, channels_last=None, **_):
    cfg = load_config(config)
    if sampler in _BASELINE_CONVENTION and convention is None:
        convention = _BASELINE_CONVENTION[sampler]
        if cfg["sampler"]["convention"] != convention and grid is None:
            cfg["sampler"]["grid"] = None  # the config's grid belongs to another convention
    if sampler in _BASELINE_ORDER:
        order = order or _BASELINE_ORDER[sampler]
        if sampler == "unipc":
            method = method or "multistep"
        if pfdiff is None:
            pfdiff = "none"  # a baseline: the config's PFDiff variant does not apply
    if multistep:
        method = "multistep"
    for key, val in (("sampling.nfe", nfe), ("sampler.name", sampler), ("sampler.convention", convention),
                     ("sampler.order", order), ("sampler.method", method), ("sampler.pfdiff", pfdiff),
                     ("sampler.grid", grid), ("sampler.eta", eta), ("sampling.seed", seed),
                     ("sampler.variant", variant), ("sampler.predict", predict),
                     ("sampler.final_corrector", final_corrector), ("sampler.ts_order", ts_order),
                     ("sampling.device", device), ("model.checkpoint_path", checkpoint),
                     ("guidance.classifier_path", classifier_checkpoint), ("guidance.scale", guidance_scale),
                     ("model.captions", captions), ("model.precision", precision),
                     ("model.attention", attention), ("model.compile", compile_net),
                     ("model.channels_last", channels_last)):
        override(cfg, key, val)
    return cfg


@cli.command()
@common_sampler_options
@click.option("--num-samples", "-n", type=int, help="How many samples (default: the config's).")
@click.option("--batch-size", "-b", type=int, help="Samples per network batch (does not change the samples).")
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Run directory to write (default: runs/<config>-<sampler>-<grid>-nfe<N>-seed<S>-n<count>). "
                   "The same --out with a larger --num-samples extends a finished run.")
@click.option("--shard-size", type=int, help="Samples per shard file (default: the config's sampling.shard_size, 1000).")
@click.option("--image-grid", "image_grid", type=click.Path(dir_okay=False),
              help="Also write a PNG grid of the first samples here (--grid names the time grid).")
@click.option("--grid-count", type=int, default=64, show_default=True, help="Samples in the --image-grid PNG.")
@click.option("--progress/--no-progress", default=None,
              help="Force the progress bar on or off (default: on when stderr is a terminal).")
@click.option("--allow-cpu", is_flag=True, help="Sample a full-size network on the CPU anyway (minutes per sample).")
def sample(num_samples, batch_size, out, shard_size, image_grid, grid_count, progress, allow_cpu, **opts):
    """Draw samples into a resumable run directory (shards + manifest.json).

    Sample i depends only on the config, sampler plan, seed and i: any batch size, any number of
    torchrun processes and any resume point give the same samples. Re-running the same command
    finishes an interrupted run; another config in the same --out is refused.

    \b
    Examples:
      pfdiff-bench sample --config toy --nfe 4 --pfdiff 2,1 --out runs/toy-pf21
      pfdiff-bench sample --config toy --sampler dpm-solver++ --multistep --order 2 --nfe 6
      pfdiff-bench sample --config toy --sampler dpm-solver++ --multistep --order 3 --nfe 5 --grid logSNR
      pfdiff-bench sample --config toy --sampler unipc --order 3 --unipc-variant bh2 --predict x0 --nfe 5
      pfdiff-bench sample --config toy --sampler unipc --order 2 --final-corrector --nfe 6
      pfdiff-bench sample --config toy --sampler ipndm --nfe 5
      pfdiff-bench sample --config toy --sampler deis --order 3 --grid t --ts-order 2 --nfe 5
      pfdiff-bench sample --config toy -n 1000 --shard-size 100 --image-grid grid.png
      torchrun --nproc_per_node 8 -m pfdiff_bench.cli sample --config imagenet64 --nfe 4 \\
          --pfdiff 1,1 --num-samples 50000 --out runs/in64-pf11
    """
    from pfdiff_bench.sampling.export import first_images, save_image_grid
    from pfdiff_bench.sampling.engine import run_sampling
    from pfdiff_bench.errors import ConfigError
    from pfdiff_bench.sampling.setup import sampler_spec

    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1 (got {num_samples})")
    cfg = config_from_options(**opts)
    override(cfg, "sampling.num_samples", num_samples)
    override(cfg, "sampling.batch_size", batch_size)
    override(cfg, "sampling.shard_size", shard_size)
    if out is None:
        label = sampler_spec(cfg).label().replace(" ", "").replace("(", "").replace(")", "").replace("=", "")
        s = cfg["sampling"]  # every field that changes the samples or their number, so runs do not collide
        out = f"runs/{cfg['name']}-{label}-{sampler_spec(cfg).grid}-nfe{s['nfe']}-seed{s['seed']}-n{s['num_samples']}"
    # preflight (CPU refusal, missing checkpoints, downloads) inside: under torchrun rank 0 first, and it prints
    summary = run_sampling(cfg, Path(out), progress=progress, preflight=True, allow_cpu=allow_cpu,
                           log=lambda msg: click.echo(msg, err=True))
    if summary.rank != 0:
        return
    if image_grid:
        if summary.manifest.get("images"):
            save_image_grid(first_images(summary.out, max(1, grid_count)), image_grid)
        else:
            click.echo(f"note: samples of shape {summary.manifest.get('sample_shape')} are not images; "
                       f"no grid written", err=True)
    if summary.redone:
        click.echo(f"redone corrupt shards: {', '.join(summary.redone)}", err=True)
    click.echo(summary.line())
