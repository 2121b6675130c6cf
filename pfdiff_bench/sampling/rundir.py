"""The run-directory format (docs/ENGINE.md): manifest, checksummed shards, fingerprint, results, readers.

A run directory holds

* ``manifest.json``: resolved config, sampler plan, time grid, NFE requested/planned/counted, seed,
  fingerprint, versions, device, timings; written by rank 0 (atomically) at the start and the end;
* ``shard-00000.pt``, ``shard-00001.pt``, ...: ``shard_size`` consecutive samples each (the last may
  be shorter), written to a temporary name, fsync'd and renamed when complete. Each carries its
  global ``indices``, ``labels``, uint8 NHWC ``images`` (image-shaped samples), for the analytic
  model the float64 ``samples`` and ``x_T``, the run fingerprint and a sha256 of its tensors;
* ``results.json``: a JSON list of result entries appended by ``eval`` and other commands.

Every reader of a run (export, eval, fid, reproduce) goes through this module.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from pfdiff_bench.errors import PFDiffError
from pfdiff_bench.files import atomic_writer, write_bytes_atomic

MANIFEST = "manifest.json"
RESULTS = "results.json"
SHARD_FORMAT = "pfdiff-bench-shard/2"
_OLD_SHARD_FORMATS = ("pfdiff-bench-shard/1",)  # sha256 over the tensors only: still read
RUN_FORMAT = "pfdiff-bench-run/1"


# ----------------------------------------------------------------------------- naming, fingerprint
def shard_name(k: int) -> str:
    return f"shard-{k:05d}.pt"


def num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


def shard_range(k: int, num_samples: int, shard_size: int) -> range:
    return range(k * shard_size, min(num_samples, (k + 1) * shard_size))


def fingerprint_payload(cfg: dict, plan_desc: dict, seed: int, num_samples: int, shard_size: int,
                        device_type: str) -> dict:
    """What decides the samples of a run. Batch size and device index are left out on purpose.

    ``num_samples`` is left out too: sample i depends only on (config, plan, seed, i), so a finished run
    asked for more samples (same ``--out``, same options, larger ``--num-samples``) is *extended*: its
    shards are kept and the first samples stay identical. ``shard_size`` stays in: it fixes which sample
    is in which shard file. ``sampling.seed_offset`` (the seed range of ``reproduce --seeds``) stays in only
    when it is not 0, so that range 0 has the fingerprint runs had before the key existed (their cached runs
    are reused).
    """
    c = json.loads(json.dumps(cfg, default=str))
    if not int(c.get("sampling", {}).get("seed_offset", 0) or 0):
        c.get("sampling", {}).pop("seed_offset", None)
    c.get("sampling", {}).pop("batch_size", None)
    c.get("sampling", {}).pop("device", None)
    c.get("sampling", {}).pop("num_samples", None)
    c.get("sampling", {}).pop("shard_size", None)
    c.pop("description", None)
    return {"config": c, "plan": json.loads(json.dumps(plan_desc, default=str)), "seed": int(seed),
            "shard_size": int(shard_size), "device_type": device_type}


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
def _write_json(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _tensor_digest(payload: dict, bound: Optional[dict] = None) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors; format /2 also binds ``bound``
    (the shard's fingerprint and number), so a flipped byte there is a corrupt shard, not another run's."""
    h = hashlib.sha256()
    for key in sorted(payload):
        t = payload[key]
        if t is None:
            h.update(f"{key}:none;".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if bound is not None:
        h.update(json.dumps(bound, sort_keys=True).encode())
    return h.hexdigest()


_TENSOR_KEYS = ("indices", "labels", "images", "samples", "x_T")
_BOUND_KEYS = ("fingerprint", "shard")  # format /2: covered by the shard's sha256 with the tensors


def _bound(rec: dict) -> dict:
    return {k: rec.get(k) for k in _BOUND_KEYS}


def write_shard(path: Path, record: dict) -> None:
    """Write a shard: temporary name, fsync, rename (a reader never sees a partial shard)."""
    tensors = {k: record.get(k) for k in _TENSOR_KEYS}
    record = dict(record, format=SHARD_FORMAT, sha256=_tensor_digest(tensors, _bound(record)))
    with atomic_writer(path) as f:
        torch.save(record, f)


class CorruptShard(Exception):
    """A shard file that cannot be trusted (unreadable, wrong shape, checksum mismatch)."""


def read_shard(path: Path, expected: Optional[range] = None, fp: Optional[str] = None,
               sample_shape: Optional[Sequence[int]] = None) -> dict:
    """Load and verify a shard. Raises CorruptShard (redo it) or PFDiffError (another run's shard)."""
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbage bytes, ...
        raise CorruptShard(f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    if not isinstance(rec, dict) or rec.get("format") not in (SHARD_FORMAT, *_OLD_SHARD_FORMATS):
        raise CorruptShard("not a pfdiff-bench shard")
    tensors = {k: rec.get(k) for k in _TENSOR_KEYS}
    if any(v is not None and not isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CorruptShard("malformed payload")
    # the checksum first: it covers the fingerprint (format /2), so a damaged fingerprint is a corrupt
    # shard (redone), and only an intact shard with another fingerprint is another run's (refused)
    bound = _bound(rec) if rec.get("format") == SHARD_FORMAT else None
    if _tensor_digest(tensors, bound) != rec.get("sha256"):
        raise CorruptShard("checksum mismatch")
    if fp is not None and rec.get("fingerprint") != fp:
        raise PFDiffError(f"{path} belongs to another run (fingerprint {rec.get('fingerprint')}, this run "
                          f"{fp}); use a new --out directory")
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


def field_digests(payload: dict) -> dict:
    """Short digests of each part of a fingerprint payload, kept in the manifest so that an edit can be named."""
    parts = {f"config.{k}": v for k, v in payload["config"].items()}
    parts.update({k: v for k, v in payload.items() if k != "config"})
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:12] for k, v in parts.items()}


def manifest_payload(man: dict) -> dict:
    """The fingerprint payload rebuilt from a manifest's own fields (config, plan, seed, counts, device)."""
    return fingerprint_payload(man["config"], man["plan"], int(man["seed"]), int(man["num_samples"]),
                               int(man["shard_size"]), str(man["device"]).split(":")[0])


def verify_manifest(man: dict, where) -> None:
    """Refuse a manifest whose fields no longer give its recorded fingerprint (it was edited)."""
    if not isinstance(man, dict) or man.get("format") != RUN_FORMAT:
        raise PFDiffError(f"{where}: not a pfdiff-bench run manifest (format {RUN_FORMAT})")
    try:
        payload = manifest_payload(man)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PFDiffError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None
    if fingerprint(payload) == man.get("fingerprint"):
        n, ssz = int(man["num_samples"]), int(man["shard_size"])
        if man.get("num_shards") is not None and int(man["num_shards"]) != num_shards(n, ssz):
            raise PFDiffError(f"{where}: manifest was edited: num_shards {man['num_shards']} does not fit "
                              f"num_samples {n} and shard_size {ssz}; refusing to read this run")
        return
    recorded = man.get("field_digests") or {}
    now = field_digests(payload)
    named = [k for k in now if k in recorded and recorded[k] != now[k]] + [k for k in recorded if k not in now]
    what = f"field {', '.join(named)} differs from the one the shards were made with" if named \
        else "its fields no longer give its fingerprint"
    raise PFDiffError(f"{where}: manifest was edited ({what}; recorded fingerprint {man.get('fingerprint')}, fields "
                      f"give {fingerprint(payload)}); refusing to read this run; restore it or re-sample into a new --out")


LOCK = ".pfdiff-bench.lock"


@contextlib.contextmanager
def run_lock(out: Path):
    """Exclusive writer lock of a run directory (``fcntl.flock`` on ``.pfdiff-bench.lock``, holder's PID inside).

    Held by rank 0 for the life of a sampling command; a second writer is refused with a one-line error
    naming the holder's PID. The lock file is opened without following a symlink planted there.
    """
    import fcntl

    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        if path.is_symlink():
            raise PFDiffError(f"the run lock {path} is a symbolic link; refusing to write through it (remove "
                              f"it)") from None
        raise PFDiffError(f"cannot open the run lock {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise PFDiffError(f"{out} is being written by another command (PID {holder}); wait for it to finish "
                              f"or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_manifest(run_dir, verify: bool = True) -> dict:
    """The manifest of a run; with ``verify`` (every reader) its fingerprint is recomputed from its fields."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise PFDiffError(f"{run_dir} is not a run directory (no {MANIFEST}); create one with `pfdiff-bench sample`")
    try:
        man = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise PFDiffError(f"{path}: unreadable manifest ({' '.join(str(exc).split())[:200]})") from None
    if verify:
        verify_manifest(man, path)
    return man


def _existing_shards(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("shard-*.pt") if p.name[6:11].isdigit())


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_differences(man: dict, fields: dict) -> list[str]:
    """'name (there A, here B)' for each field of ``fields`` (and config key) that differs from ``man``."""
    diffs = []
    for key, here in fields.items():
        if key == "config":
            continue
        there = man.get(key)
        if key == "nfe" and isinstance(there, dict):
            there = there.get("planned")
        if key == "grid" and isinstance(there, dict):
            there = there.get("type")
        if key == "device":
            there = str(there).split(":")[0]
        if there != here:
            diffs.append(f"{key} (there {there}, here {here})")
    if "config" in fields:
        a, b = _flat(man.get("config")), _flat(fields["config"])
        skip = {"sampling.batch_size", "sampling.device", "sampling.num_samples", "sampling.shard_size",
                "sampling.seed", "sampling.nfe", "description"}
        for key in sorted(set(a) | set(b)):
            if key not in skip and a.get(key) != b.get(key):
                diffs.append(f"{key} (there {a.get(key)}, here {b.get(key)})")
    return diffs


def check_dir_compatible(out: Path, fp: str, desc: str, fields: Optional[dict] = None) -> Optional[dict]:
    """Refuse a directory holding another run; return the existing manifest (or None).

    ``fields`` (sampler, nfe, seed, shard_size, device, grid, num_samples, config) of the new run name
    what differs in the refusal; a same-fingerprint run with fewer samples is extended, one with more refused.
    """
    man_path = out / MANIFEST
    if man_path.is_file():
        try:
            man = json.loads(man_path.read_text())
        except (OSError, ValueError):
            man = None
        if not isinstance(man, dict) or man.get("format") != RUN_FORMAT:
            raise PFDiffError(f"{out} holds a {MANIFEST} that is not a pfdiff-bench run manifest; use a new --out")
        verify_manifest(man, man_path)  # an edited manifest is not resumed either
        if man.get("fingerprint") != fp and fields is not None:
            diffs = run_differences(man, {k: v for k, v in fields.items() if k != "num_samples"})
            if diffs:
                raise PFDiffError(f"{out} holds another run; it differs in {', '.join(diffs)}; use a new --out "
                                  f"directory or the original options")
        if fields is not None and man.get("fingerprint") == fp and int(man.get("num_samples", 0)) > fields["num_samples"]:
            raise PFDiffError(f"{out} holds {man.get('num_samples')} samples of this run and this command asks for "
                              f"{fields['num_samples']}; pass --num-samples {man.get('num_samples')} or more "
                              f"(a larger number extends the run), or use a new --out directory")
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


def iter_shards(run_dir, require_complete: bool = True, shards: Optional[Sequence[int]] = None) -> Iterator[dict]:
    """Verified shard records of a run in index order (a corrupt shard raises PFDiffError).

    ``shards``: only these shard numbers (one torchrun rank's share), still in index order."""
    run_dir = Path(run_dir)
    man = read_manifest(run_dir)
    if require_complete:
        _require_complete(run_dir, man)
    n, ssz = int(man["num_samples"]), int(man["shard_size"])
    for k in (range(num_shards(n, ssz)) if shards is None else sorted(shards)):
        path = run_dir / shard_name(k)
        if not path.is_file():
            continue
        try:
            yield read_shard(path, shard_range(k, n, ssz), man["fingerprint"], man.get("sample_shape"))
        except CorruptShard as why:
            raise PFDiffError(f"{path} is corrupt ({why}); re-run the sample command to redo it") from None


def iter_image_batches(run_dir, batch_size: int = 500, require_complete: bool = True,
                       shards: Optional[Sequence[int]] = None) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(uint8 NHWC images, int64 labels or None) in index order, ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    man = read_manifest(run_dir)
    if not man.get("images"):
        raise PFDiffError(f"run {run_dir} holds no images (sample shape {man.get('sample_shape')} is not [C,H,W] "
                          f"with C in 1, 3)")
    buf_x, buf_y, have = [], [], 0
    for rec in iter_shards(run_dir, require_complete, shards):
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
        # never through a symlink planted at the lock's name (O_NOFOLLOW); the lock file gets no bytes
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            with contextlib.suppress(ImportError, OSError):
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
            data = load_results(run_dir)
            data.append(dict(entry, recorded=entry.get("recorded", _now())))
            _write_json(run_dir / RESULTS, data)
        finally:
            os.close(fd)
    except OSError as exc:
        if lock.is_symlink():
            raise PFDiffError(f"the results lock {lock} is a symbolic link; refusing to write through it "
                              f"(remove it)") from None
        raise PFDiffError(f"cannot write {run_dir / RESULTS}: {exc.strerror or exc}") from None
    return data


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
