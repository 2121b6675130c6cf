"""`pfdiff-bench models ...` (checkpoint registry, download, verification) and `verify arch`."""

from __future__ import annotations

from pathlib import Path

import click

from pfdiff_bench.cli import cli
from pfdiff_bench.cli.verify import verify


def _zoo():
    from pfdiff_bench.models import zoo  # torch import deferred until a command runs

    return zoo


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


@cli.group()
def models() -> None:
    """Pretrained checkpoints: list, download, verify.

    \b
    Files live in $PFDIFF_BENCH_HOME/checkpoints (default ~/.cache/pfdiff-bench/checkpoints).
    Examples:
      pfdiff-bench models list
      pfdiff-bench models download ema_cifar10
      pfdiff-bench models verify adm_imagenet64 --checkpoint /data/64x64_diffusion.pt
    """


@models.command("list")
def list_models() -> None:
    """List the known checkpoints, where each is cached and whether it is present.

    \b
    Example:
      pfdiff-bench models list
    """
    zoo = _zoo()
    click.echo(f"cache: {zoo.home_dir() / 'checkpoints'}")
    header = f"{'name':<18} {'used':<4} {'arch':<15} {'size':>10}  {'checksum':<26} {'status':<8} file"
    click.echo(header)
    for spec in zoo.CHECKPOINTS.values():
        path = zoo.cache_path(spec.name)
        if spec.md5:
            checksum = f"md5 {spec.md5[:12]}…"
        else:
            pin = path.with_name(path.name + ".sha256")
            source = zoo.pin_source(path)
            checksum = (f"sha256 pinned ({source or 'first-use'})" if pin.is_file()
                        else "none (pinned on download)")
        if path.is_file():
            status = "cached"
        elif path.with_name(path.name + ".part").is_file():
            status = "partial"
        else:
            status = "missing"
        click.echo(f"{spec.name:<18} {'yes' if spec.used else 'no':<4} {spec.arch:<15} "
                   f"{'~' + _human(spec.approx_bytes):>10}  {checksum:<26} {status:<8} {path}")


@models.command("download")
@click.argument("name", metavar="NAME")
@click.option("--force", is_flag=True, help="Delete any cached copy (and partial download) and fetch again.")
def download_model(name: str, force: bool) -> None:
    """Download checkpoint NAME into the cache, verifying its checksum.

    NAME is one of those `pfdiff-bench models list` shows (ema_cifar10, ema_lsun_bedroom,
    ema_lsun_church, adm_imagenet64, adm_classifier64, adm_imagenet256, adm_classifier256, and the
    non-EMA cifar10, lsun_bedroom, lsun_church). scoresde_cifar10 (checkpoint_8.pth) has no direct
    link: the error names its Google Drive folder and the path to place it at.

    An interrupted download resumes from its .part file (only the bytes this tool recorded fetching;
    anything else restarts from 0), a second download of the same file waits for the first, and the
    size must equal the server's. Files without a published checksum must also load with the expected
    keys and shapes before their SHA-256 is pinned. Without network access the error names the URL and
    the exact path to place the file at.

    \b
    Examples:
      pfdiff-bench models download ema_cifar10
      pfdiff-bench models download adm_imagenet64 --force
    """
    zoo = _zoo()
    path = zoo.download(name, force=force, log=lambda m: click.echo(m, err=True))
    click.echo(f"{name}: {path}")


@models.command("verify")
@click.argument("name", metavar="NAME")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Use this file instead of the cached copy.")
@click.option("--forward/--no-forward", default=True, show_default=True,
              help="Also run one batch-1 forward pass on CPU (a smoke test; it verifies nothing).")
def verify_model(name: str, checkpoint: Path | None, forward: bool) -> None:
    """Check that NAME's file is the published checkpoint: checksum, safe loading, keys and shapes.

    OK needs a checksum match: the published MD5 (DDPM files), or, for files with no published checksum
    (OpenAI, checkpoint_8.pth), the SHA-256 pinned when `models download` fetched the file from the
    official URL (size equal to the server's, keys and shapes checked). A file without such a pin, a
    first-use pin (placed by hand) or a mismatch is reported NOT VERIFIED, exit 1; a network in the
    right format is never OK on that alone. Writes no pin.

    \b
    Examples:
      pfdiff-bench models verify ema_cifar10
      pfdiff-bench models verify adm_classifier64 --checkpoint ./64x64_classifier.pt
    """
    import torch

    zoo = _zoo()
    spec = zoo.get_spec(name)
    res = zoo.verify_file(name, checkpoint, log=lambda m: click.echo(m, err=True))
    click.echo(f"{name}: {res.path}")
    click.echo(f"  checksum: {res.checksum}")
    net = res.net
    if net is not None:
        n_params = sum(p.numel() for p in net.parameters())
        click.echo(f"  network: {spec.arch}, {n_params:,} parameters, {len(net.state_dict())} keys: all match")
    if forward and net is not None:
        size = spec.config["image_size"]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, size, size, generator=g)
        t = torch.tensor([500.0])
        with torch.no_grad():
            out = net(x, t, torch.tensor([0])) if spec.arch == "adm_unet" else net(x, t)
        finite = bool(torch.isfinite(out).all())
        click.echo(f"  forward: batch 1 at t=500 -> {list(out.shape)}, std {out.float().std().item():.4f}, "
                   f"{'finite' if finite else 'NON-FINITE'} (a smoke test, not a verification)")
        if not finite and res.ok:
            click.echo(f"{name}: NOT VERIFIED: the forward pass is not finite")
            raise click.exceptions.Exit(1)
    if not res.ok:
        click.echo(f"{name}: NOT VERIFIED: {res.problem}")
        raise click.exceptions.Exit(1)
    click.echo(f"{name}: OK")


@verify.command("arch")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--attention", type=click.Choice(["einsum", "sdpa"]), default="einsum", show_default=True,
              help="Attention kernel of the networks under test (einsum: the official arithmetic).")
def verify_arch_cmd(directory: Path | None, attention: str) -> None:
    """Check the networks against official-code fixtures in DIRECTORY (default: the bundled ones).

    Runs every numerical fixture (*.pt) through our networks with strict loading and compares the
    outputs within each fixture's tolerance, and compares every full-size layout manifest
    (manifests/*.json) with our constructors. Prints one line per failure; exit 1 unless all match.

    \b
    Examples:
      pfdiff-bench verify arch
      pfdiff-bench verify arch ../shared/fixtures/architectures
      pfdiff-bench verify arch --attention sdpa
    """
    from pfdiff_bench.models.arch_verify import verify_arch

    matched, total, failures = verify_arch(directory, attention=attention)
    for line in failures:
        click.echo(line)
    click.echo(f"arch fixtures: {matched}/{total} matched")
    if matched != total:
        raise click.exceptions.Exit(1)
