"""The sampling loop: a config -> a resumable run directory (:mod:`.rundir`), one process or torchrun.

Sample ``i`` depends on (config, plan, seed, i) only (see :mod:`pfdiff_bench.seeding`), so a run is
the same for any batch size, process count and resume point. Re-running the same command skips
complete shards, redoes missing or corrupt ones, and refuses a directory holding another run.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pfdiff_bench import __version__
from pfdiff_bench.config import resolve_quantize
from pfdiff_bench.errors import ConfigError, OtherRankFailed, PFDiffError
from pfdiff_bench.sampling.distributed import (Dist, _device_for_rank, dist_from_env, own_share, rank_zero_first,
                                               rank_zero_only)
from pfdiff_bench.sampling.rundir import (MANIFEST, QUANTIZATION, RUN_FORMAT, CorruptShard, _now, _write_json, check_dir_compatible, field_digests,
                                          fingerprint, fingerprint_payload, is_image_shape, num_shards, prepare_dir,
                                          quantize, read_shard, run_lock, shard_name, shard_range, write_shard)
from pfdiff_bench.seeding import SCHEME as SEEDING_SCHEME

# Tests only: seconds to sleep after each batch, so a run can be killed part-way deterministically.
_DELAY_ENV = "PFDIFF_BENCH_TEST_BATCH_DELAY"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- sampling
@dataclass
class RunSummary:
    out: Path
    sampler: str
    num_samples: int
    generated: int
    skipped: int
    redone: list[str]
    nfe_requested: int
    nfe_counted: int
    wall_s: float
    sampling_s: float
    complete: bool
    manifest: dict = field(default_factory=dict)
    rank: int = 0
    world: int = 1

    @property
    def images_per_s(self) -> float:
        return self.generated / self.sampling_s if self.sampling_s > 0 else float("nan")

    def line(self) -> str:
        resumed = f" ({self.generated} new, {self.skipped} already done)" if self.skipped else ""
        rate = f"{self.images_per_s:.1f} img/s" if self.generated else "nothing left to sample"
        return (f"{self.sampler}: {self.num_samples} samples{resumed}, NFE {self.nfe_counted} "
                f"(requested {self.nfe_requested}), {self.wall_s:.1f}s, {rate} -> {self.out}")


def _grad_free(setup) -> contextlib.AbstractContextManager:
    # classifier guidance differentiates the classifier: never inference_mode there
    if setup.classifier_grad is not None and setup.guidance_scale > 0:
        return contextlib.nullcontext()
    return torch.inference_mode()


def _sample_shard(setup, seed: int, idx: range, batch_size: int, bar, delay: float, seed_offset: int = 0,
                  bar_scale: int = 1, shard: int = 0) -> dict:
    """Draw the samples of one shard; results stay on the device until the shard is complete.

    Sample ``i`` of the run draws from the generator of index ``seed_offset + i`` (its seed range,
    ``reproduce --seeds``); everything else (shard indices, SD caption i) uses the run's own index ``i``."""
    from pfdiff_bench.seeding import draw_inputs

    xs, ys, x_Ts = [], [], []
    planned = setup.plan.nfe
    for start in range(idx.start, idx.stop, batch_size):
        b = list(range(start, min(idx.stop, start + batch_size)))
        x_T, y, gens = draw_inputs(seed, [seed_offset + i for i in b], setup.noise_shape or setup.sample_shape, setup.num_classes,
                                   dtype=torch.float64)
        if setup.prompts is not None:  # SD: "label" i = caption i of sample i
            y = torch.tensor(b, dtype=torch.int64)
        if setup.is_analytic or not is_image_shape(setup.sample_shape):
            x_Ts.append(x_T)
        with _grad_free(setup):
            res = setup.sample(x_T.to(setup.device, setup.dtype), y, noise=gens.randn_like)
        if res.nfe != planned:
            raise PFDiffError(f"{setup.plan.spec.label()} made {res.nfe} network calls for samples "
                              f"{b[0]}..{b[-1]}, planned {planned}: refusing to write partial samples")
        x = res.x
        if x.shape != (len(b), *setup.sample_shape):
            raise PFDiffError(f"sampler returned shape {tuple(x.shape)} for a batch of {len(b)}")
        xs.append(x)
        ys.append(y)
        if bar is not None:
            bar.update(len(b) * bar_scale)
        if delay:
            time.sleep(delay)
    x = torch.cat(xs)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = [idx.start + int(i) for i in torch.nonzero(~finite).flatten()[:5].tolist()]
        raise PFDiffError(f"non-finite samples (indices {bad}...) from {setup.plan.spec.label()} in shard {shard} "
                          f"({shard_name(shard)}, samples {idx.start}..{idx.stop - 1}); nothing written for it")
    rec = {"indices": torch.arange(idx.start, idx.stop, dtype=torch.int64),
           "labels": None if ys[0] is None else torch.cat(ys).to("cpu", torch.int64),
           "images": None, "samples": None, "x_T": None, "nfe_counted": planned}
    if is_image_shape(setup.sample_shape):
        rec["images"] = quantize(x, resolve_quantize(setup.cfg["model"])).cpu()
    if setup.is_analytic or not is_image_shape(setup.sample_shape):  # non-image samples: keep the values
        rec["samples"] = x.to("cpu", torch.float64)
        rec["x_T"] = torch.cat(x_Ts).to(torch.float64)
    return rec


def _env_info(device: torch.device) -> dict:
    info = {"package_version": __version__, "torch_version": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "device": str(device)}
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _fp16_resolved(cfg: dict, device: torch.device) -> bool:
    # the builders' own rule (models/fastpath.resolve_precision), so the record cannot disagree with the run
    from pfdiff_bench.models.fastpath import fp16_resolved

    return fp16_resolved(cfg["model"], device.type)


def _fastpath_resolved(cfg: dict, device: torch.device) -> dict:
    # the rule of models/networks.build_from_config (models/fastpath.resolve)
    from pfdiff_bench.models.fastpath import resolve

    return resolve(cfg["model"], device.type)


def run_sampling(cfg: dict, out, *, shard_size: Optional[int] = None, batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None, setup=None, progress: Optional[bool] = None,
                 log: Log = _stderr, dist_ctx: Optional[Dist] = None, bar=None, preflight: bool = False,
                 allow_cpu: bool = False) -> RunSummary:
    """Sample ``cfg`` into run directory ``out`` (resuming it), possibly as one rank of a torchrun job.

    ``shard_size``/``batch_size``/``num_samples`` override the config's ``sampling`` values. Returns the
    summary on every rank; only rank 0 writes the manifest. Raises PFDiffError for user errors.
    ``bar``: a progress bar of the caller (``reproduce``'s table bar) that rank 0 advances instead of
    opening its own (under torchrun by its own samples times the world size, an estimate).
    ``preflight``: first run ``setup.preflight`` (CPU refusal unless ``allow_cpu``, missing checkpoints,
    downloads) on every rank, rank 0 first so that a file is fetched once and only rank 0 prints.
    """
    from pfdiff_bench.config import override

    out = Path(out)
    cfg = json.loads(json.dumps(cfg))  # private copy
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1 (got {num_samples})")
    if shard_size is not None and shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1 (got {shard_size})")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
    override(cfg, "sampling.num_samples", num_samples)
    override(cfg, "sampling.shard_size", shard_size)
    override(cfg, "sampling.batch_size", batch_size)
    s = cfg["sampling"]
    n, ssz, bs, seed = int(s["num_samples"]), int(s["shard_size"]), int(s["batch_size"]), int(s["seed"])

    from pfdiff_bench.sampling.setup import resolve_device

    dev_type = resolve_device(s["device"]).type
    d = dist_ctx or dist_from_env(dev_type)
    try:
        if preflight:
            from pfdiff_bench.sampling.setup import preflight as check

            rank_zero_first(d, check, cfg, _device_for_rank(cfg, d), allow_cpu=allow_cpu,
                            log=log if d.rank == 0 else (lambda m: None))
        return _run(cfg, out, n, ssz, bs, seed, d, setup, progress if bar is None else bar, log)
    finally:
        if dist_ctx is None:
            d.close()


def _run(cfg, out, n, ssz, bs, seed, d: Dist, setup, progress, log) -> RunSummary:
    if setup is None:  # before the run directory exists: a missing checkpoint leaves nothing behind
        from pfdiff_bench.sampling.setup import build

        # rank 0 first: a download or a first-use checksum pin happens once, then the other ranks load
        setup = rank_zero_first(d, build, cfg, device=_device_for_rank(cfg, d))
    with contextlib.ExitStack() as held:  # rank 0 holds the run directory's lock for the run's life
        return _run_locked(cfg, out, n, ssz, bs, seed, d, setup, progress, log, held)


def _run_locked(cfg, out, n, ssz, bs, seed, d: Dist, setup, progress, log, held: contextlib.ExitStack) -> RunSummary:
    t_wall = time.time()
    plan_desc = setup.plan.describe()
    fp_payload = fingerprint_payload(cfg, plan_desc, seed, n, ssz, setup.device.type)
    fp = fingerprint(fp_payload)
    offset = int(cfg["sampling"].get("seed_offset", 0) or 0)
    desc = (f"{setup.plan.spec.label()}, NFE {setup.plan.nfe}, seed {seed}, {n} samples, shard size {ssz}, "
            f"on {setup.device.type}" + (f", seed indices {offset}-{offset + n - 1}" if offset else ""))
    fields = {"sampler": setup.plan.spec.label(), "nfe": int(setup.plan.nfe), "seed": seed, "num_samples": n,
              "shard_size": ssz, "device": setup.device.type, "grid": setup.plan.spec.grid,
              "config": cfg}
    total_shards = num_shards(n, ssz)
    started = _now()
    manifest = {
        "format": RUN_FORMAT, "fingerprint": fp, "field_digests": field_digests(fp_payload), "complete": False,
        "sampler": setup.plan.spec.label(), "config": cfg, "plan": plan_desc,
        "grid": {"type": setup.plan.spec.grid, "convention": setup.plan.spec.convention,
                 "timesteps": setup.plan.timesteps,
                 "model_timesteps": setup.plan.model_timesteps(setup.schedule)},
        "nfe": {"requested": int(cfg["sampling"]["nfe"]), "planned": int(setup.plan.nfe), "counted": None},
        "seed": seed, "seeding": SEEDING_SCHEME,
        "seed_offset": offset, "seed_range": [offset, offset + n - 1],  # generator indices, first and last
        "num_samples": n, "shard_size": ssz, "num_shards": total_shards,
        "sample_shape": list(setup.sample_shape), "num_classes": setup.num_classes,
        "analytic": setup.is_analytic, "images": is_image_shape(setup.sample_shape),
        "quantization": QUANTIZATION[resolve_quantize(cfg["model"])],
        "dtype": str(setup.dtype).replace("torch.", ""), "fp16": cfg["model"].get("fp16"),
        "fp16_resolved": _fp16_resolved(cfg, setup.device),
        "fastpath": (None if setup.is_analytic or cfg["model"].get("type") == "stable_diffusion"
                     else _fastpath_resolved(cfg, setup.device)),
        "world_size": d.world, "batch_size": int(cfg["sampling"]["batch_size"]),
        "weights": getattr(setup, "weights", None),
        **_env_info(setup.device),
        "timings": {"created": started, "started": started},
        "runs": 1,
    }

    def claim() -> None:
        """Rank 0 (the others wait): the directory, its lock, the compatibility check, the manifest."""
        prepare_dir(out)
        held.enter_context(run_lock(out))
        for tmp in out.glob(f"{MANIFEST}.tmp-*"):  # a killed writer's (the lock proves it is gone)
            with contextlib.suppress(OSError):
                tmp.unlink()
        old = check_dir_compatible(out, fp, desc, fields)
        old_n = int((old or {}).get("num_samples", n))
        manifest["timings"]["created"] = (old or {}).get("timings", {}).get("created", started)
        manifest["runs"] = int((old or {}).get("runs", 0)) + 1
        if old_n < n:  # extension: same seeds per index, so the old shards stay; a partial last one is redone
            log(f"extending {out} from {old_n} to {n} samples (the first {old_n} are kept unchanged)")
            if old_n % ssz:
                with contextlib.suppress(OSError):
                    (out / shard_name(old_n // ssz)).unlink()
        _write_json(out / MANIFEST, manifest)

    rank_zero_only(d, claim)  # a refusal on rank 0 is reported once; the other ranks stop quietly

    mine = list(range(d.rank, total_shards, d.world))
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    todo, skipped, redone, n_todo, failure = [], 0, [], 0, None
    bar, own_bar = None, True
    t0 = time.time()
    try:
        with own_share(d):  # an error here is this rank's alone: it reports it, tagged with its rank
            # stale temporaries of this rank's shards (a killed writer) are removed
            own = {shard_name(k) for k in mine}
            for tmp in out.glob("shard-*.pt.tmp-*"):
                if tmp.name.split(".tmp-")[0] in own:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
            for k in mine:
                rng = shard_range(k, n, ssz)
                path = out / shard_name(k)
                if path.exists():
                    try:
                        read_shard(path, rng, fp, setup.sample_shape)
                        skipped += len(rng)
                        continue
                    except CorruptShard as why:
                        log(f"warning: {path} is corrupt ({why}); redoing it")
                        redone.append(path.name)
                todo.append(k)
            n_todo = sum(len(shard_range(k, n, ssz)) for k in todo)
            if not isinstance(progress, (bool, type(None))):  # the caller's bar (rank 0 of reproduce)
                bar, own_bar = (progress if d.rank == 0 else None), False
            elif d.rank == 0 and progress is not False and n_todo:
                from tqdm.auto import tqdm

                bar = tqdm(total=n_todo, unit="img",
                           desc=setup.plan.spec.label() + (f" [rank 0/{d.world}]" if d.world > 1 else ""),
                           disable=None if progress is None else False, file=sys.stderr, dynamic_ncols=True,
                           smoothing=0.1)
            t0 = time.time()
            try:
                for k in todo:
                    rng = shard_range(k, n, ssz)
                    rec = _sample_shard(setup, seed, rng, bs, bar, delay, offset, 1 if own_bar else d.world, shard=k)
                    rec.update(fingerprint=fp, shard=k, sample_shape=list(setup.sample_shape))
                    write_shard(out / shard_name(k), rec)
            except OSError as exc:
                raise PFDiffError(f"cannot write shards into {out}: {exc.strerror or exc}") from None
    except PFDiffError as exc:
        if d.world == 1:
            raise
        failure = exc  # raised below, after the other ranks have heard of it (no rank waits forever)
    finally:
        if bar is not None and own_bar:
            bar.close()
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    sampling_s = time.time() - t0

    gen, skip, nred, nfail = d.all_reduce([float(n_todo), float(skipped), float(len(redone)), float(failure is not None)],
                                          "sum", setup.device)
    if failure is not None:
        raise failure
    if nfail:
        raise OtherRankFailed(f"{int(nfail)} other rank(s) failed while sampling (they report the error)")
    (sampling_s,) = d.all_reduce([sampling_s], "max", setup.device)
    d.barrier()
    wall = time.time() - t_wall
    missing = [shard_name(k) for k in range(total_shards) if not (out / shard_name(k)).is_file()]
    complete = not missing
    manifest["nfe"]["counted"] = int(setup.plan.nfe)  # checked per batch against the plan
    manifest["complete"] = complete
    manifest["timings"].update(finished=_now(), wall_s=round(wall, 3), sampling_s=round(sampling_s, 3),
                               generated=int(gen), images_per_s=round(gen / sampling_s, 3) if sampling_s > 0 else None)
    if d.rank == 0:
        _write_json(out / MANIFEST, manifest)
    d.barrier()
    if not complete:
        raise PFDiffError(f"run {out} is incomplete after sampling: missing {', '.join(missing[:5])}")
    return RunSummary(out, setup.plan.spec.label(), n, int(gen), int(skip), redone, int(cfg["sampling"]["nfe"]),
                      int(setup.plan.nfe), wall, sampling_s, complete, manifest, d.rank, d.world)
