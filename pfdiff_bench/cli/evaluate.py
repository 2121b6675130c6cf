"""`pfdiff-bench fid`, `pfdiff-bench is`, `pfdiff-bench ref compute|list` (FID/IS evaluation, docs/EVALUATION.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from pfdiff_bench.cli import cli
from pfdiff_bench.errors import PFDiffError


_TOOL_NAMES = ["torch-fidelity", "pytorch-fid"]  # pfdiff_bench.evaluation.tools.TOOLS (kept literal: light import)


def _tool_option(f):
    return click.option("--fid-tool", type=click.Choice(_TOOL_NAMES), default="torch-fidelity", show_default=True,
                        help="FID tool: torch-fidelity (ADM TF evaluator pipeline, TF1 resize) or pytorch-fid "
                             "(PyTorch bilinear resize); --inception-weights takes that tool's file.")(f)


def _small_option(f):
    # 2,048 = pfdiff_bench.evaluation.features.MIN_IMAGES (not imported here: `--help` stays light)
    return click.option("--allow-small", is_flag=True,
                        help="Compute on fewer than 2,048 images (the Inception feature dimension), refused "
                             "otherwise; the result is labelled small-sample.")(f)


def _small_note(entry: dict) -> str:
    return (f"  [SMALL SAMPLE: below {entry['min_images']:,} images (--allow-small); not comparable with "
            f"published numbers]") if entry.get("small_sample") else ""


def _weights_options(f):
    f = click.option("--trust-weights", is_flag=True,
                     help="Use an Inception weights file whose SHA-256 is not the pinned official one "
                          "(e.g. random test weights); results are then not comparable.")(f)
    f = click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="The FID tool's Inception weights (torch-fidelity: weights-inception-2015-12-05-6726825d.pth, "
                          "pytorch-fid: pt_inception-2015-12-05-6726825d.pth); default: "
                          "$TORCH_HOME/hub/checkpoints/, downloaded there if reachable.")(f)
    f = click.option("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available).")(f)
    f = click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Images per Inception forward pass.")(f)
    f = click.option("--offline", is_flag=True, help="Never try to download anything.")(f)
    return f


def _source(run_dir: Path, batch_size: int, allow_incomplete: bool):
    """(batches, total, run_dir or None) for a sampling run directory or an ADM-format .npz."""
    from pfdiff_bench.evaluation import features

    if run_dir.is_file():
        if run_dir.suffix != ".npz":
            raise PFDiffError(f"{run_dir} is a file but not an .npz (arr_0 uint8 NHWC); give a run directory or .npz")
        return features.iter_npz_batches(run_dir, batch_size), features.npz_num_images(run_dir), None
    if not run_dir.is_dir():
        raise PFDiffError(f"no such run directory or .npz: {run_dir}")
    from pfdiff_bench.sampling import rundir

    if not rundir.run_complete(run_dir) and not allow_incomplete:
        raise PFDiffError(f"run {run_dir} is not complete; finish it first or pass --allow-incomplete "
                          f"(the metric label then shows the smaller sample count)")
    total = None
    try:
        total = int(rundir.read_manifest(run_dir)["num_samples"]) if rundir.run_complete(run_dir) else None
    except (AttributeError, KeyError, TypeError, ValueError, PFDiffError):
        pass
    return rundir.iter_image_batches(run_dir, batch_size, require_complete=not allow_incomplete), total, run_dir


def _report(results: dict, run_dir: Optional[Path], as_json: bool) -> None:
    if run_dir is not None:
        from pfdiff_bench.sampling import rundir

        for entry in results.values():
            rundir.append_result(run_dir, entry)
    for entry in results.values():
        if as_json:
            click.echo(json.dumps(entry, sort_keys=True))
        elif entry["metric"] == "fid":
            click.echo(f"{entry['label']}: {entry['value']:.4f}  (n={entry['num_samples']}, ref={entry['reference']}, "
                       f"{entry['fid_tool']} {entry['fid_tool_version']}, weights sha256 {entry['weights_sha256'][:12]}, "
                       f"protocol: {entry['protocol']}){_small_note(entry)}")
        else:
            click.echo(f"{entry['label']}: {entry['value']:.4f} ± {entry['std']:.4f}  (n={entry['num_samples']}, "
                       f"{entry['splits']} unshuffled splits of {entry['split_size']}, "
                       f"weights sha256 {entry['weights_sha256'][:12]}){_small_note(entry)}")


def _quantization(run_dir: Optional[Path]) -> Optional[str]:
    if run_dir is None:
        return None
    from pfdiff_bench.sampling import rundir

    try:
        return rundir.read_manifest(run_dir).get("quantization")
    except (PFDiffError, AttributeError):
        return None


def _check_input(run_dir) -> None:
    if not Path(run_dir).exists():  # the cheapest mistake first: no reference or weights are looked for
        raise PFDiffError(f"{run_dir} does not exist: pass a run directory of `pfdiff-bench sample` or an .npz "
                          f"with arr_0 (uint8 NHWC)")


def _run(run_dir, ref, isc, batch_size, device, inception_weights, trust_weights, offline, allow_incomplete,
         as_json, fid_tool="torch-fidelity", mixed_protocol=False, allow_small=False):
    from pfdiff_bench.evaluation import features
    from pfdiff_bench.evaluation import fid

    if isc and fid_tool != "torch-fidelity":
        raise PFDiffError(f"--fid-tool {fid_tool} computes no Inception Score; drop --is or use torch-fidelity")
    _check_input(run_dir)
    # Weights next: a missing file must fail before any sample is read.
    features.resolve_inception_weights(inception_weights, tool=fid_tool, trust_weights=trust_weights,
                                  download=not offline)
    batches, total, rd = _source(Path(run_dir), batch_size, allow_incomplete)
    results = fid.evaluate_batches(batches, fid_ref=ref, isc=isc, fid_tool=fid_tool, mixed_protocol=mixed_protocol,
                                   quantization=_quantization(rd), inception_weights=inception_weights,
                                   trust_weights=trust_weights, device=device, download=not offline,
                                   progress=None, total=total, allow_small=allow_small)
    _report(results, rd, as_json)


@cli.command("fid")
@click.argument("run_dir", type=click.Path(exists=False, path_type=Path))
@click.option("--ref", default=None,
              help="Reference: a name of `pfdiff-bench ref list` (imagenet64, lsun_bedroom, cifar10-train, ...), "
                   "or STATS.npz with mu/sigma or pool_3 activations (default: the run's benchmark).")
@click.option("--is", "also_is", is_flag=True, help="Also compute the Inception Score in the same pass "
                                                    "(torch-fidelity only).")
@click.option("--mixed-protocol", is_flag=True,
              help="Allow a reference made by another preprocessing family than --fid-tool (e.g. pytorch-fid "
                   "features vs ADM's TF reference); the result is labelled mixed.")
@click.option("--allow-incomplete", is_flag=True, help="Evaluate a run that has not finished sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print the result entries as JSON lines.")
@_small_option
@_tool_option
@_weights_options
def fid_cmd(run_dir, ref, also_is, mixed_protocol, allow_incomplete, as_json, allow_small, fid_tool, batch_size,
            device, inception_weights, trust_weights, offline):
    """FID of a sampling run (or an .npz with arr_0 uint8 NHWC) against reference statistics.

    The result is appended to the run's results.json. Fewer than 50,000 samples give a label like FID-10k;
    fewer than 2,048 (or a reference of fewer) are refused unless --allow-small (then labelled small-sample).

    \b
    Examples:
      pfdiff-bench fid runs/imagenet64_pfdiff_nfe4 --ref imagenet64
      pfdiff-bench fid samples_50000x64x64x3.npz --ref imagenet64 --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
      pfdiff-bench fid runs/church_nfe10 --ref lsun_church --fid-tool pytorch-fid --device cuda
      pfdiff-bench fid runs/in256 --ref imagenet256 --fid-tool pytorch-fid --mixed-protocol
    """
    _check_input(run_dir)
    if ref is None:
        ref = _default_ref(Path(run_dir))
    _run(run_dir, ref, also_is, batch_size, device, inception_weights, trust_weights, offline, allow_incomplete,
         as_json, fid_tool, mixed_protocol, allow_small)


@cli.command("is")
@click.argument("run_dir", type=click.Path(exists=False, path_type=Path))
@click.option("--allow-incomplete", is_flag=True, help="Evaluate a run that has not finished sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print the result entry as JSON.")
@_small_option
@_weights_options
def is_cmd(run_dir, allow_incomplete, as_json, allow_small, batch_size, device, inception_weights, trust_weights,
           offline):
    """Inception Score of a sampling run (or .npz), unshuffled splits of 5,000 as OpenAI's evaluator.

    \b
    Examples:
      pfdiff-bench is runs/imagenet64_pfdiff_nfe4
      pfdiff-bench is samples_50000x64x64x3.npz --inception-weights ~/weights-inception-2015-12-05-6726825d.pth
    """
    _run(run_dir, None, True, batch_size, device, inception_weights, trust_weights, offline, allow_incomplete,
         as_json, allow_small=allow_small)


_CONFIG_REFS = {"imagenet64": "imagenet64", "cifar10": "cifar10-train", "lsun_bedroom": "lsun_bedroom",
                "lsun_church": "lsun_church"}


def _default_ref(run_dir: Path) -> str:
    """The reference of the run's benchmark, from the config name (or checkpoint) in its manifest."""
    from pfdiff_bench.evaluation.refstats import REFERENCES

    if run_dir.is_dir():
        try:
            from pfdiff_bench.sampling import rundir

            cfg = rundir.read_manifest(run_dir).get("config") or {}
        except (ModuleNotFoundError, PFDiffError, AttributeError):
            cfg = {}
        if cfg.get("name") in _CONFIG_REFS:
            return _CONFIG_REFS[cfg["name"]]
        ckpt = str((cfg.get("model") or {}).get("checkpoint", ""))
        for key, ref in (("imagenet64", "imagenet64"), ("bedroom", "lsun_bedroom"), ("church", "lsun_church"),
                         ("cifar10", "cifar10-train")):
            if key in ckpt:
                return ref
    raise PFDiffError(f"cannot tell which reference statistics fit {run_dir}; pass --ref NAME|STATS.npz "
                      f"(names: {', '.join(REFERENCES)})")


@cli.group("ref")
def ref_group() -> None:
    """Reference statistics for FID: list them, compute your own.

    \b
    Files live in $PFDIFF_BENCH_HOME/refstats (default ~/.cache/pfdiff-bench/refstats).
    Examples:
      pfdiff-bench ref list
      pfdiff-bench ref compute /data/lsun/church_outdoor_train --as lsun_church
      pfdiff-bench ref compute my_images/ --out my_stats.npz
    """


@ref_group.command("list")
@_tool_option
def ref_list(fid_tool) -> None:
    """List the registered references, who produced each, where it is cached, and how to obtain it.

    \b
    Example:
      pfdiff-bench ref list --fid-tool pytorch-fid
    """
    from pfdiff_bench.evaluation import refstats

    click.echo(f"cache: {refstats.refs_dir()}")
    for row in refstats.list_refs(fid_tool):
        status = "cached" if row["cached"] else "missing"
        click.echo(f"{row['name']:<24} {row['kind']:<9} {status:<8} {row['description']}")
        click.echo(f"{'':<24} made by: {row['producer']} ({row['format']})")
        click.echo(f"{'':<24} file: {row['path']}")
        click.echo(f"{'':<24} from: {row['source']}")


@ref_group.command("compute")
@click.argument("source")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write STATS.npz (default with --as: that reference's cache file).")
@click.option("--as", "as_name", type=click.Choice(["cifar10-train", "lsun_church"]), default=None,
              help="Compute a registered reference: its preprocessing (lsun_church: Resize 256 + CenterCrop 256) "
                   "and cache location.")
@click.option("--resize", type=click.IntRange(min=1), default=None,
              help="Resize the shorter side to N and center-crop N x N (folders only).")
@_small_option
@_tool_option
@_weights_options
def ref_compute(source, out, as_name, resize, allow_small, fid_tool, batch_size, device, inception_weights,
                trust_weights, offline):
    """Compute Inception mu/sigma of SOURCE: a folder of images, an .npz (arr_0 uint8 NHWC), or cifar10-train.

    \b
    Examples:
      pfdiff-bench ref compute cifar10-train
      pfdiff-bench ref compute /data/church_outdoor_train_imgs --as lsun_church --device cuda
      pfdiff-bench ref compute samples.npz --out samples_stats.npz
      pfdiff-bench ref compute cifar10-train --fid-tool pytorch-fid
    """
    from pfdiff_bench.evaluation import features
    from pfdiff_bench.evaluation import refstats

    features.resolve_inception_weights(inception_weights, tool=fid_tool, trust_weights=trust_weights,
                                  download=not offline)
    st = refstats.compute_ref(source, out=out, as_name=as_name, resize=resize, batch_size=batch_size,
                              fid_tool=fid_tool, inception_weights=inception_weights, trust_weights=trust_weights,
                              device=device, download=not offline, progress=None, allow_small=allow_small)
    small = (f"; SMALL SAMPLE: below {features.MIN_IMAGES:,} images (--allow-small), loading it needs "
             f"--allow-small too" if st.num_samples < features.MIN_IMAGES else "")
    click.echo(f"wrote {st.path} ({st.num_samples} images, {fid_tool}, sha256 {st.sha256}{small})")
