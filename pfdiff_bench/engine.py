"""Sampling engine: a run directory of resumable, checksummed shards; torchrun; exports and results.

A run directory (format described in docs/ENGINE.md) holds

* ``manifest.json``: resolved config, sampler plan, time grid, NFE requested/planned/counted, seed,
  fingerprint, versions, device, timings; written by rank 0 (atomically) at the start and the end;
* ``shard-00000.pt``, ``shard-00001.pt``, ...: ``shard_size`` consecutive samples each (the last may
  be shorter), written to a temporary name, fsync'd and renamed when complete. Each carries its
  global ``indices``, ``labels``, uint8 NHWC ``images`` (image-shaped samples), for the analytic
  model the float64 ``samples`` and ``x_T``, the run fingerprint and a sha256 of its tensors;
* ``results.json``: a JSON list of result entries appended by ``eval`` and other commands.

Sample ``i`` depends on (config, plan, seed, i) only (see :mod:`pfdiff_bench.seeding`), so a run is
the same for any batch size, process count and resume point. Re-running the same command skips
complete shards, redoes missing or corrupt ones, and refuses a directory holding another run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from pfdiff_bench import __version__
from pfdiff_bench.config import resolve_quantize
from pfdiff_bench.errors import ConfigError, PFDiffError
from pfdiff_bench.seeding import SCHEME as SEEDING_SCHEME

MANIFEST = "manifest.json"
RESULTS = "results.json"
SHARD_FORMAT = "pfdiff-bench-shard/1"
RUN_FORMAT = "pfdiff-bench-run/1"
# Tests only: seconds to sleep after each batch, so a run can be killed part-way deterministically.
_DELAY_ENV = "PFDIFF_BENCH_TEST_BATCH_DELAY"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- naming, fingerprint
def shard_name(k: int) -> str:
    return f"shard-{k:05d}.pt"


def num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


def shard_range(k: int, num_samples: int, shard_size: int) -> range:
    return range(k * shard_size, min(num_samples, (k + 1) * shard_size))


def fingerprint_payload(cfg: dict, plan_desc: dict, seed: int, num_samples: int, shard_size: int,
                        device_type: str) -> dict:
    """What decides the samples of a run. Batch size and device index are left out on purpose."""
    c = json.loads(json.dumps(cfg, default=str))
    c.get("sampling", {}).pop("batch_size", None)
    c.get("sampling", {}).pop("device", None)
    c.get("sampling", {}).pop("num_samples", None)
    c.get("sampling", {}).pop("shard_size", None)
    c.pop("description", None)
    return {"config": c, "plan": json.loads(json.dumps(plan_desc, default=str)), "seed": int(seed),
            "num_samples": int(num_samples), "shard_size": int(shard_size), "device_type": device_type}


def fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- quantisation
def is_image_shape(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and int(shape[0]) in (1, 3)


QUANTIZATION = {  # model.quantize -> the formula, as recorded in the manifest
    "truncate": "truncate: ((x+1)*127.5).clamp(0,255).to(uint8)",
    "round": "round (save_image): ((x+1)/2).clamp(0,1).mul(255).add(0.5).clamp(0,255).to(uint8)",
}


def quantize(x: torch.Tensor, mode: str) -> torch.Tensor:
    """[-1, 1] NCHW -> uint8 NHWC as the benchmark's codebase saves images (``model.quantize``, config.py)."""
    if mode == "truncate":  # guided-diffusion sample.py, score_sde, ldm: truncation
        q = ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    elif mode == "round":  # ermongroup/ddim: torchvision save_image
        q = ((x + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    else:
        raise PFDiffError(f"unknown quantisation {mode!r}; accepted: {', '.join(QUANTIZATION)}")
    return q.permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _tensor_digest(payload: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(payload):
        t = payload[key]
        if t is None:
            h.update(f"{key}:none;".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_TENSOR_KEYS = ("indices", "labels", "images", "samples", "x_T")


def write_shard(path: Path, record: dict) -> None:
    """Write a shard: temporary name, fsync, rename (a reader never sees a partial shard)."""
    tensors = {k: record.get(k) for k in _TENSOR_KEYS}
    record = dict(record, format=SHARD_FORMAT, sha256=_tensor_digest(tensors))
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class CorruptShard(Exception):
    """A shard file that cannot be trusted (unreadable, wrong shape, checksum mismatch)."""


def read_shard(path: Path, expected: Optional[range] = None, fp: Optional[str] = None,
               sample_shape: Optional[Sequence[int]] = None) -> dict:
    """Load and verify a shard. Raises CorruptShard (redo it) or PFDiffError (another run's shard)."""
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, ...
        raise CorruptShard(f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    if not isinstance(rec, dict) or rec.get("format") != SHARD_FORMAT:
        raise CorruptShard("not a pfdiff-bench shard")
    if fp is not None and rec.get("fingerprint") != fp:
        raise PFDiffError(f"{path} belongs to another run (fingerprint {rec.get('fingerprint')}, this run "
                          f"{fp}); use a new --out directory")
    tensors = {k: rec.get(k) for k in _TENSOR_KEYS}
    if any(v is not None and not isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CorruptShard("malformed payload")
    if _tensor_digest(tensors) != rec.get("sha256"):
        raise CorruptShard("checksum mismatch")
    idx = rec["indices"]
    n = idx.numel()
    if expected is not None and (n != len(expected) or idx.tolist() != list(expected)):
        raise CorruptShard(f"holds indices {idx[:1].tolist()}..+{n}, expected {expected.start}..{expected.stop - 1}")
    for key in ("labels", "images", "samples", "x_T"):
        t = rec.get(key)
        if t is not None and t.shape[0] != n:
            raise CorruptShard(f"'{key}' has {t.shape[0]} rows for {n} indices")
    if sample_shape is not None:
        shp = tuple(int(s) for s in sample_shape)
        if rec.get("images") is not None and tuple(rec["images"].shape[1:]) != (shp[1], shp[2], shp[0]):
            raise CorruptShard(f"images of shape {tuple(rec['images'].shape[1:])}, expected NHWC of {shp}")
        for key in ("samples", "x_T"):
            if rec.get(key) is not None and tuple(rec[key].shape[1:]) != shp:
                raise CorruptShard(f"'{key}' of shape {tuple(rec[key].shape[1:])}, expected {shp}")
    return rec


# ----------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False  # True when this module initialised the process group

    @property
    def active(self) -> bool:
        import torch.distributed as dist

        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, values: list[float], op: str, device: torch.device) -> list[float]:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def close(self) -> None:
        if self.initialised:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def dist_from_env(device_type: str) -> Dist:
    """Rank/world from torchrun's environment; initialise NCCL (CUDA) or gloo (CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    d = Dist(rank, world, local)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_available():
            raise PFDiffError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=60))
            d.initialised = True
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
    return d


def _device_for_rank(cfg: dict, d: Dist) -> torch.device:
    from pfdiff_bench.pipeline import resolve_device

    dev = resolve_device(cfg["sampling"]["device"])
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", d.local_rank)
    return dev


# ----------------------------------------------------------------------------- run directory
def prepare_dir(out: Path) -> None:
    """Create ``out`` and prove it is writable, or raise a one-line PFDiffError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise PFDiffError(f"cannot write the run directory {out}: {exc.strerror or exc}") from None


def read_manifest(run_dir) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise PFDiffError(f"{run_dir} is not a run directory (no {MANIFEST}); create one with `pfdiff-bench sample`")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PFDiffError(f"{path}: unreadable manifest ({exc})") from None


def _existing_shards(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("shard-*.pt") if p.name[6:11].isdigit())


def check_dir_compatible(out: Path, fp: str, desc: str) -> Optional[dict]:
    """Refuse a directory holding another run; return the existing manifest (or None)."""
    man_path = out / MANIFEST
    if man_path.is_file():
        try:
            man = json.loads(man_path.read_text())
        except (OSError, ValueError):
            man = None
        if not isinstance(man, dict) or man.get("format") != RUN_FORMAT:
            raise PFDiffError(f"{out} holds a {MANIFEST} that is not a pfdiff-bench run manifest; use a new --out")
        if man.get("fingerprint") != fp:
            raise PFDiffError(
                f"{out} holds another run ({man.get('sampler', '?')}, NFE {man.get('nfe', {}).get('planned', '?')}, "
                f"seed {man.get('seed', '?')}, {man.get('num_samples', '?')} samples, shard size "
                f"{man.get('shard_size', '?')}, on {str(man.get('device', '?')).split(':')[0]}; fingerprint "
                f"{man.get('fingerprint')}) and this command asks for "
                f"{desc} (fingerprint {fp}); use a new --out directory or the original options")
        return man
    shards = _existing_shards(out)
    if shards:  # shards without a manifest: refuse unless they are this run's
        try:
            rec = torch.load(shards[0], map_location="cpu", weights_only=True)
            other = rec.get("fingerprint") if isinstance(rec, dict) else None
        except Exception:
            other = None
        if other != fp:
            raise PFDiffError(f"{out} holds shard files of another run (or unreadable ones) and no {MANIFEST}; "
                              f"use a new --out directory")
    return None


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


def _sample_shard(setup, seed: int, idx: range, batch_size: int, bar, delay: float) -> dict:
    """Draw the samples of one shard; results stay on the device until the shard is complete."""
    from pfdiff_bench.seeding import draw_inputs

    xs, ys, x_Ts = [], [], []
    planned = setup.plan.nfe
    for start in range(idx.start, idx.stop, batch_size):
        b = list(range(start, min(idx.stop, start + batch_size)))
        x_T, y, gens = draw_inputs(seed, b, setup.sample_shape, setup.num_classes, dtype=torch.float64)
        if setup.is_analytic:
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
            bar.update(len(b))
        if delay:
            time.sleep(delay)
    x = torch.cat(xs)
    finite = torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if not bool(finite.all()):
        bad = [idx.start + int(i) for i in torch.nonzero(~finite).flatten()[:5].tolist()]
        raise PFDiffError(f"non-finite samples (indices {bad}...) from {setup.plan.spec.label()}; nothing written "
                          f"for shard {idx.start // max(len(idx), 1)}")
    rec = {"indices": torch.arange(idx.start, idx.stop, dtype=torch.int64),
           "labels": None if ys[0] is None else torch.cat(ys).to("cpu", torch.int64),
           "images": None, "samples": None, "x_T": None, "nfe_counted": planned}
    if is_image_shape(setup.sample_shape):
        rec["images"] = quantize(x, resolve_quantize(setup.cfg["model"])).cpu()
    if setup.is_analytic:
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
    # the rule of models/networks.build_from_config (ADM torso in half precision on CUDA when "auto")
    m = cfg["model"]
    return m.get("fp16") is True or (m.get("fp16") == "auto" and device.type == "cuda" and m.get("type") == "adm")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_sampling(cfg: dict, out, *, shard_size: Optional[int] = None, batch_size: Optional[int] = None,
                 num_samples: Optional[int] = None, setup=None, progress: Optional[bool] = None,
                 log: Log = _stderr, dist_ctx: Optional[Dist] = None) -> RunSummary:
    """Sample ``cfg`` into run directory ``out`` (resuming it), possibly as one rank of a torchrun job.

    ``shard_size``/``batch_size``/``num_samples`` override the config's ``sampling`` values. Returns the
    summary on every rank; only rank 0 writes the manifest. Raises PFDiffError for user errors.
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

    from pfdiff_bench.pipeline import resolve_device

    dev_type = resolve_device(s["device"]).type
    d = dist_ctx or dist_from_env(dev_type)
    try:
        return _run(cfg, out, n, ssz, bs, seed, d, setup, progress, log)
    finally:
        if dist_ctx is None:
            d.close()


def _run(cfg, out, n, ssz, bs, seed, d: Dist, setup, progress, log) -> RunSummary:
    t_wall = time.time()
    device = _device_for_rank(cfg, d)
    if setup is None:
        from pfdiff_bench.pipeline import build

        setup = build(cfg, device=device)
    plan_desc = setup.plan.describe()
    fp_payload = fingerprint_payload(cfg, plan_desc, seed, n, ssz, setup.device.type)
    fp = fingerprint(fp_payload)
    desc = (f"{setup.plan.spec.label()}, NFE {setup.plan.nfe}, seed {seed}, {n} samples, shard size {ssz}, "
            f"on {setup.device.type}")

    prepare_dir(out)
    old = check_dir_compatible(out, fp, desc)
    total_shards = num_shards(n, ssz)
    started = _now()
    manifest = {
        "format": RUN_FORMAT, "fingerprint": fp, "complete": False,
        "sampler": setup.plan.spec.label(), "config": cfg, "plan": plan_desc,
        "grid": {"type": setup.plan.spec.grid, "convention": setup.plan.spec.convention,
                 "timesteps": setup.plan.timesteps,
                 "model_timesteps": setup.plan.model_timesteps(setup.schedule)},
        "nfe": {"requested": int(cfg["sampling"]["nfe"]), "planned": int(setup.plan.nfe), "counted": None},
        "seed": seed, "seeding": SEEDING_SCHEME,
        "num_samples": n, "shard_size": ssz, "num_shards": total_shards,
        "sample_shape": list(setup.sample_shape), "num_classes": setup.num_classes,
        "analytic": setup.is_analytic, "images": is_image_shape(setup.sample_shape),
        "quantization": QUANTIZATION[resolve_quantize(cfg["model"])],
        "dtype": str(setup.dtype).replace("torch.", ""), "fp16": cfg["model"].get("fp16"), "fp16_resolved": _fp16_resolved(cfg, setup.device),
        "world_size": d.world, "batch_size": int(cfg["sampling"]["batch_size"]),
        **_env_info(setup.device),
        "timings": {"created": (old or {}).get("timings", {}).get("created", started), "started": started},
        "runs": int((old or {}).get("runs", 0)) + 1,
    }
    if d.rank == 0:
        _write_json(out / MANIFEST, manifest)
    d.barrier()

    mine = list(range(d.rank, total_shards, d.world))
    # stale temporaries of this rank's shards (a killed writer) are removed
    for k in mine:
        for tmp in out.glob(f"{shard_name(k)}.tmp-*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
    todo, skipped, redone = [], 0, []
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

    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    n_todo = sum(len(shard_range(k, n, ssz)) for k in todo)
    bar = None
    if d.rank == 0 and progress is not False and n_todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_todo, unit="img", desc=setup.plan.spec.label() + (f" [rank 0/{d.world}]" if d.world > 1 else ""),
                   disable=None if progress is None else False, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    t0 = time.time()
    try:
        for k in todo:
            rng = shard_range(k, n, ssz)
            rec = _sample_shard(setup, seed, rng, bs, bar, delay)
            rec.update(fingerprint=fp, shard=k, sample_shape=list(setup.sample_shape))
            write_shard(out / shard_name(k), rec)
    except OSError as exc:
        raise PFDiffError(f"cannot write shards into {out}: {exc.strerror or exc}") from None
    finally:
        if bar is not None:
            bar.close()
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    sampling_s = time.time() - t0

    gen, skip, nred = d.all_reduce([float(n_todo), float(skipped), float(len(redone))], "sum", setup.device)
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


# ----------------------------------------------------------------------------- reading runs
def missing_samples(run_dir) -> tuple[int, list[str]]:
    """(number of samples missing, names of missing shard files) of a run directory."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    n, ssz = int(man["num_samples"]), int(man["shard_size"])
    missing = [k for k in range(num_shards(n, ssz)) if not (run_dir / shard_name(k)).is_file()]
    return sum(len(shard_range(k, n, ssz)) for k in missing), [shard_name(k) for k in missing]


def run_complete(run_dir) -> bool:
    """True when the manifest exists and every shard file is present (contents are verified on read)."""
    try:
        return missing_samples(run_dir)[0] == 0
    except PFDiffError:
        return False


def _require_complete(run_dir: Path, man: dict) -> None:
    n_missing, names = missing_samples(run_dir)
    if n_missing:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        raise PFDiffError(f"run {run_dir} is incomplete: {n_missing} of {man['num_samples']} samples missing "
                          f"({', '.join(names[:3])}{more}); finish it by re-running the same sample command")


def iter_shards(run_dir, require_complete: bool = True) -> Iterator[dict]:
    """Verified shard records of a run in index order (a corrupt shard raises PFDiffError)."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    if require_complete:
        _require_complete(run_dir, man)
    n, ssz = int(man["num_samples"]), int(man["shard_size"])
    for k in range(num_shards(n, ssz)):
        path = run_dir / shard_name(k)
        if not path.is_file():
            continue
        try:
            yield read_shard(path, shard_range(k, n, ssz), man["fingerprint"], man.get("sample_shape"))
        except CorruptShard as why:
            raise PFDiffError(f"{path} is corrupt ({why}); re-run the sample command to redo it") from None


def iter_image_batches(run_dir, batch_size: int = 500, require_complete: bool = True
                       ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(uint8 NHWC images, int64 labels or None) in index order, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    man = read_manifest(run_dir)
    if not man.get("images"):
        raise PFDiffError(f"run {run_dir} holds no images (sample shape {man.get('sample_shape')} is not [C,H,W] "
                          f"with C in 1, 3)")
    buf_x, buf_y, have = [], [], 0
    for rec in iter_shards(run_dir, require_complete):
        buf_x.append(rec["images"])
        buf_y.append(rec["labels"])
        have += rec["images"].shape[0]
        while have >= batch_size:
            x = torch.cat(buf_x)
            y = None if buf_y[0] is None else torch.cat(buf_y)
            yield x[:batch_size], (None if y is None else y[:batch_size])
            buf_x, buf_y = [x[batch_size:]], [None if y is None else y[batch_size:]]
            have -= batch_size
    if have:
        yield torch.cat(buf_x), (None if buf_y[0] is None else torch.cat(buf_y))


def load_run(run_dir, keys: Sequence[str] = ("indices", "labels", "images", "samples", "x_T"),
             require_complete: bool = True) -> dict:
    """Concatenate ``keys`` of all shards in index order (None for a key no shard stores)."""
    parts: dict = {k: [] for k in keys}
    for rec in iter_shards(run_dir, require_complete):
        for k in keys:
            parts[k].append(rec.get(k))
    return {k: (None if not v or v[0] is None else torch.cat(v)) for k, v in parts.items()}


# ----------------------------------------------------------------------------- results
def load_results(run_dir) -> list:
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PFDiffError(f"{path}: unreadable results file ({exc})") from None
    if not isinstance(data, list):
        raise PFDiffError(f"{path}: expected a JSON list of result entries")
    return data


def append_result(run_dir, entry: dict) -> list:
    """Append one result entry (a JSON-able dict) to ``results.json``; returns the new list."""
    run_dir = Path(run_dir)
    lock = run_dir / f"{RESULTS}.lock"
    try:
        with open(lock, "a") as lf:
            with contextlib.suppress(ImportError, OSError):
                import fcntl

                fcntl.flock(lf, fcntl.LOCK_EX)
            data = load_results(run_dir)
            data.append(dict(entry, recorded=entry.get("recorded", _now())))
            _write_json(run_dir / RESULTS, data)
    except OSError as exc:
        raise PFDiffError(f"cannot write {run_dir / RESULTS}: {exc.strerror or exc}") from None
    return data


# ----------------------------------------------------------------------------- grids, export
def save_image_grid(images: torch.Tensor, path, nrow: Optional[int] = None) -> Path:
    """Write uint8 NHWC ``images`` as one grid PNG (torchvision make_grid)."""
    from torchvision.io import write_png
    from torchvision.utils import make_grid

    path = Path(path)
    x = images.permute(0, 3, 1, 2)
    grid = make_grid(x, nrow=nrow or max(1, int(math.ceil(math.sqrt(x.shape[0])))), padding=2, pad_value=0)
    if images.shape[-1] == 1:
        grid = grid[:1]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(grid.contiguous(), str(path))
    except (OSError, RuntimeError) as exc:
        raise PFDiffError(f"cannot write the grid image {path}: {exc}") from None
    return path


def first_images(run_dir, count: int = 64) -> torch.Tensor:
    out, have = [], 0
    for x, _ in iter_image_batches(run_dir, batch_size=count, require_complete=False):
        out.append(x)
        have += x.shape[0]
        if have >= count:
            break
    if not out:
        raise PFDiffError(f"run {run_dir} has no samples yet")
    return torch.cat(out)[:count]


def export_npz(run_dir, out_path, raw: bool = False, png_dir=None) -> dict:
    """Write ``arr_0`` (uint8 NHWC, index order), ``arr_1`` (labels, class-conditional runs), with
    ``raw`` the stored float arrays (``samples``, ``x_T``); with ``png_dir`` one PNG per sample."""
    import numpy as np

    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    _require_complete(run_dir, man)
    data = load_run(run_dir)
    arrays = {}
    if data["images"] is not None:
        arrays["arr_0"] = data["images"].numpy()
        if data["labels"] is not None:
            arrays["arr_1"] = data["labels"].numpy()
    elif not raw:
        raise PFDiffError(f"run {run_dir} stores no images (sample shape {man.get('sample_shape')}); "
                          f"use --raw to export the float samples")
    if raw:
        for key in ("samples", "x_T"):
            if data[key] is not None:
                arrays[key] = data[key].numpy()
        if data["labels"] is not None:
            arrays.setdefault("labels", data["labels"].numpy())
        arrays["indices"] = data["indices"].numpy()
    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, out_path)
    except OSError as exc:
        raise PFDiffError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    if png_dir is not None:
        if data["images"] is None:
            raise PFDiffError(f"run {run_dir} stores no images to write as PNG")
        from torchvision.io import write_png

        png_dir = Path(png_dir)
        width = max(6, len(str(int(man["num_samples"]) - 1)))
        try:
            png_dir.mkdir(parents=True, exist_ok=True)
            for i, img in zip(data["indices"].tolist(), data["images"]):
                write_png(img.permute(2, 0, 1).contiguous(), str(png_dir / f"{i:0{width}d}.png"))
        except (OSError, RuntimeError) as exc:
            raise PFDiffError(f"cannot write PNGs into {png_dir}: {exc}") from None
    return {k: tuple(v.shape) for k, v in arrays.items()}
