"""Reference statistics (Inception pool-3 ``mu``/``sigma``) for FID, per benchmark (spec CHECKPOINTS.md §3a).

Every reference records which tool (or external evaluator) and which resize produced it, and FID of one
tool's features against a reference of another preprocessing family is refused unless declared a mixed
protocol (:func:`check_protocol`; issue 12 part 2). Registry:

* ``imagenet64``, ``imagenet256``, ``lsun_bedroom``: ADM reference batches ``VIRTUAL_*.npz`` (OpenAI;
  ``mu``/``sigma`` over the whole dataset from the ADM TensorFlow evaluator, plus ``arr_0`` images and
  sFID ``mu_s``/``sigma_s``). Producer ``adm-tf`` (TF1 resize, the family of torch-fidelity).
* ``cifar10-train``: computed with the FID tool in use from the 50,000 CIFAR-10 training images, read by
  torchvision (``cifar-10-batches-py/`` under ``$TORCH_HOME/fidelity_datasets``, torch-fidelity's
  ``datasets_root``) or from a user-given folder / ``.npz``; one cache file per tool.
* ``lsun_church``: computed (per tool) from a user-given folder of LSUN church_outdoor images,
  ``Resize(256)`` + ``CenterCrop(256)`` as ermongroup/ddim does. No official file exists.
* ``cifar10-ttur``, ``cifar10-cleanfid-legacy``: published ``mu``/``sigma`` files (TTUR's TF1 graph;
  clean-fid ``legacy_tensorflow``).
* ``cifar10-scoresde``: ScoreSDE's ``cifar10_stats.npz``, which stores 50k x 2048 TF-GAN ``pool_3``
  activations, not ``mu``/``sigma``. Producer ``tf-gan``. On first use ``mu``/``sigma`` are computed in
  float64 (``n-1`` covariance, as TF-GAN's ``frechet_classifier_distance_from_activations``) and cached
  under ``refstats/derived/`` with the source's SHA-256 in the name.
* any ``.npz`` path holding ``mu`` and ``sigma`` (pytorch-fid / clean-fid format; ADM batches too) or
  ``pool_3`` activations.

Downloaded files live in ``$PFDIFF_BENCH_HOME/refstats/`` under their official names; their publishers give
no checksums, so a SHA-256 is pinned in a ``<file>.sha256`` sidecar at first use (as the model zoo does)
and later loads must match it. Computed statistics are written to ``$PFDIFF_BENCH_HOME/refstats/`` with the
tool, its resize and the Inception weights' SHA-256 they were computed with; loading them with another
tool or other weights is refused.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch

from pfdiff_bench.errors import CheckpointError, ConfigError, PFDiffError
from pfdiff_bench.files import atomic_writer

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_OAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/{}"
ACTIVATION_KEYS = ("pool_3",)  # ScoreSDE / TF-GAN activation files


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RefSpec:
    name: str
    kind: str  # "download", "manual" (a link to fetch by hand) or "computed"
    description: str
    url: Optional[str] = None
    filename: Optional[str] = None  # official file name (downloads) or cache file name (computed)
    resize: Optional[int] = None  # computed: Resize(resize) + CenterCrop(resize) before the extractor
    source_hint: str = ""
    producer: Optional[str] = None  # tool / evaluator that made the file; None: computed with the tool in use
    fmt: str = "mu-sigma"  # "adm-batch" (mu, sigma, arr_0), "mu-sigma", "activations" (pool_3 rows)


REFERENCES: dict[str, RefSpec] = {s.name: s for s in [
    RefSpec("imagenet64", "download", "ImageNet 64x64, ADM reference batch (OpenAI guided-diffusion)",
            url=_OAI.format("imagenet/64/VIRTUAL_imagenet64_labeled.npz"), filename="VIRTUAL_imagenet64_labeled.npz",
            producer="adm-tf", fmt="adm-batch"),
    RefSpec("imagenet256", "download", "ImageNet 256x256, ADM reference batch (OpenAI guided-diffusion)",
            url=_OAI.format("imagenet/256/VIRTUAL_imagenet256_labeled.npz"),
            filename="VIRTUAL_imagenet256_labeled.npz", producer="adm-tf", fmt="adm-batch"),
    RefSpec("lsun_bedroom", "download", "LSUN bedroom 256x256, ADM reference batch",
            url=_OAI.format("lsun/bedroom/VIRTUAL_lsun_bedroom256.npz"), filename="VIRTUAL_lsun_bedroom256.npz",
            producer="adm-tf", fmt="adm-batch"),
    RefSpec("cifar10-train", "computed", "CIFAR-10 training set (50k), computed with the FID tool in use",
            filename="cifar10-train.npz",
            source_hint="pfdiff-bench ref compute cifar10-train (needs cifar-10-batches-py/ under "
                        "$TORCH_HOME/fidelity_datasets) or pfdiff-bench ref compute FOLDER --as cifar10-train"),
    RefSpec("lsun_church", "computed", "LSUN church_outdoor 256x256, computed from your image folder "
            "(Resize 256 + CenterCrop 256, as ddim)", filename="lsun_church.npz", resize=256,
            source_hint="pfdiff-bench ref compute FOLDER --as lsun_church"),
    RefSpec("cifar10-ttur", "download", "CIFAR-10 train, TTUR mu/sigma (TF1 Inception graph)",
            url="http://bioinf.jku.at/research/ttur/ttur_stats/fid_stats_cifar10_train.npz",
            filename="fid_stats_cifar10_train.npz", producer="ttur-tf"),
    RefSpec("cifar10-cleanfid-legacy", "download", "CIFAR-10 train 32x32, clean-fid legacy_tensorflow mu/sigma",
            url="https://www.cs.cmu.edu/~clean-fid/stats/cifar10_legacy_tensorflow_train_32.npz",
            filename="cifar10_legacy_tensorflow_train_32.npz", producer="clean-fid-legacy-tf"),
    RefSpec("cifar10-scoresde", "manual", "CIFAR-10 train, ScoreSDE cifar10_stats.npz (TF-GAN pool_3 activations)",
            url="https://drive.google.com/file/d/14UB27-Spi8VjZYKST3ZcT8YVhAluiFWI/view?usp=sharing",
            filename="cifar10_stats.npz", producer="tf-gan", fmt="activations"),
    RefSpec("coco2014_val", "computed", "MS-COCO 2014 val images for the Stable Diffusion tables, computed from "
            "your image folder (Resize 512 + CenterCrop 512; the paper's preprocessing is not published)",
            filename="coco2014_val.npz", resize=512,
            source_hint="pfdiff-bench ref compute val2014/ --as coco2014_val"),
]}


@dataclass
class RefStats:
    name: str
    mu: np.ndarray
    sigma: np.ndarray
    path: Optional[Path] = None
    sha256: Optional[str] = None  # of the file as published / given (for activations: the activation file)
    num_samples: Optional[int] = None
    weights_sha256: Optional[str] = None  # computed statistics: the Inception weights used
    producer: Optional[str] = None  # FID tool or external evaluator; None: unknown
    resize: Optional[str] = None  # how that producer resized images
    fmt: str = "mu-sigma"
    derived_path: Optional[Path] = None  # activations: the cached mu/sigma


def refs_dir() -> Path:
    from pfdiff_bench.models.zoo import home_dir  # $PFDIFF_BENCH_HOME, shared with the checkpoint cache

    return home_dir() / "refstats"


def ref_cache_path(name: str, fid_tool: Optional[str] = None) -> Path:
    """Cache file of a reference; a computed one has one file per FID tool (torch-fidelity's keeps the plain
    name, e.g. ``cifar10-train.npz``; pytorch-fid's is ``cifar10-train.pytorch-fid.npz``)."""
    from pfdiff_bench.evaluation.tools import DEFAULT_TOOL, get_tool

    spec = get_ref(name)
    tool = get_tool(fid_tool).name
    if spec.kind == "computed" and tool != DEFAULT_TOOL:
        return refs_dir() / f"{Path(spec.filename).stem}.{tool}.npz"
    return refs_dir() / spec.filename


def get_ref(name: str) -> RefSpec:
    try:
        return REFERENCES[name]
    except KeyError:
        raise ConfigError(f"unknown reference {name!r}; known: {', '.join(REFERENCES)}, or a path to an .npz "
                          f"with mu and sigma (or pool_3 activations)") from None


# ----------------------------------------------------------------------------------------- protocol
def check_protocol(fid_tool: str, ref, *, mixed_protocol: bool = False) -> dict:
    """The protocol fields of an FID of ``fid_tool`` features against ``ref``; refuses an undeclared mix.

    Features and reference of one preprocessing family (torch-fidelity with the ADM / TTUR / clean-fid
    legacy TF1 files; pytorch-fid with pytorch-fid statistics) form a plain protocol. Another family
    (e.g. pytorch-fid features vs ADM's TF reference, the paper's ImageNet-256 row) needs
    ``mixed_protocol=True`` and is labelled "mixed". A reference of unknown producer is recorded as such.
    """
    from pfdiff_bench.evaluation.tools import TOOLS, get_tool, producer_info

    tool = get_tool(fid_tool)
    producer = getattr(ref, "producer", None)
    fam, producer_resize = producer_info(producer)
    resize = getattr(ref, "resize", None) or producer_resize
    mixed = fam is not None and fam != tool.family
    if mixed and not mixed_protocol:
        raise ConfigError(
            f"reference {getattr(ref, 'name', '?')} was produced by {producer} ({resize}), but --fid-tool "
            f"{tool.name} resizes differently ({tool.resize}); pass --mixed-protocol (table: mixed_protocol: true) "
            f"to combine them as a declared mixed protocol, or use "
            f"--fid-tool {next((t.name for t in TOOLS.values() if t.family == fam), 'torch-fidelity')}")
    if producer is None:
        label = f"{tool.name} features vs reference of unknown producer"
    elif mixed:
        label = f"mixed: {tool.name} features vs {producer} reference"
    else:
        label = tool.name
    return {"reference_producer": producer or "unknown", "reference_resize": resize, "mixed_protocol": mixed,
            "protocol": label}


# ------------------------------------------------------------------------------------------ loading
_REF_FORMAT = ("an .npz (zip, numeric arrays, no pickles) with mu (2048,) and sigma (2048, 2048) (pytorch-fid / "
               "clean-fid / ADM layout) or pool_3 activations (N, 2048) (ScoreSDE)")


def _str_field(data, key: str) -> Optional[str]:
    return (str(data[key]) or None) if key in data.files else None


def _open_stats(path: Path):
    """``np.load`` of a statistics file, never unpickling; anything but an npz is a one-line error."""
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - not a zip, a pickle, truncated ...
        raise CheckpointError(f"cannot read reference statistics {path}: not an .npz ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:120]}); expected {_REF_FORMAT}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
        raise CheckpointError(f"reference statistics {path} hold a single .npy array, not an .npz; expected "
                              f"{_REF_FORMAT}")
    return data


def _raw_numeric(data, key: str, path) -> np.ndarray:
    """``data[key]`` if it is an int/float array; object, string, bool or complex arrays are refused (a string
    array would otherwise convert to float silently)."""
    try:
        arr = data[key]
    except (ValueError, OSError, KeyError, EOFError) as exc:  # object arrays: refused by allow_pickle=False
        raise CheckpointError(f"reference statistics {path}: {key} is non-numeric "
                              f"({' '.join(str(exc).split())[:120]}); expected {_REF_FORMAT}") from None
    if arr.dtype.kind not in "iuf":
        raise CheckpointError(f"reference statistics {path}: {key} is non-numeric (dtype {arr.dtype}); expected "
                              f"{_REF_FORMAT}")
    return arr


def _numeric(data, key: str, path) -> np.ndarray:
    return np.asarray(_raw_numeric(data, key, path), dtype=np.float64)


def _check_count(path, n: Optional[int], allow_small: bool) -> None:
    from pfdiff_bench.evaluation.features import check_floor

    if n is None:
        return
    if n < 2:
        raise CheckpointError(f"reference statistics {path} record {n} images; a covariance needs at least 2")
    check_floor(n, "an FID reference", allow_small=allow_small, source=str(path))


def read_stats_npz(path: PathLike, name: Optional[str] = None, *, producer: Optional[str] = None,
                   log: Log = _stderr, allow_small: bool = False) -> RefStats:
    """Load a reference ``.npz``: ``mu``/``sigma`` (pytorch-fid, clean-fid, TTUR, our own files, ADM reference
    batches with ``arr_0``) or ``pool_3`` activations (ScoreSDE; reduced once and cached, see
    :func:`activation_stats`); float64, validated (:func:`_check_stats`; a recorded image count below
    :data:`~pfdiff_bench.evaluation.features.MIN_IMAGES` needs ``allow_small``), one-line errors otherwise."""
    from pfdiff_bench.download import file_sha256

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"reference statistics file not found: {path}")
    data = _open_stats(path)
    with data:
        keys = list(data.files)
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing and any(k in keys for k in ACTIVATION_KEYS):
            data.close()
            return activation_stats(path, name, producer=producer, log=log, allow_small=allow_small)
        if missing:
            raise CheckpointError(f"reference statistics {path} lack {' and '.join(missing)} (arrays in the file: "
                                  f"{', '.join(keys) or 'none'}); expected {_REF_FORMAT}")
        mu, sigma = _numeric(data, "mu", path), _numeric(data, "sigma", path)
        n = None
        if "num_samples" in keys:
            count = _numeric(data, "num_samples", path)
            if count.shape != () or count != int(count):
                raise CheckpointError(f"reference statistics {path}: num_samples must be one integer, got "
                                      f"{count.shape} {count.ravel()[:3]}")
            n = int(count)
        _check_count(path, n, allow_small)
        wsha = _str_field(data, "weights_sha256")
        producer = producer or _str_field(data, "fid_tool")
        if producer is None and _str_field(data, "feature_extractor") == "inception-v3-compat":
            producer = "torch-fidelity"  # files written before the tool was recorded
        resize = _str_field(data, "resize")
        fmt = "adm-batch" if "arr_0" in keys else "mu-sigma"
    _check_stats(path, mu, sigma)
    return RefStats(name or path.name, mu, sigma, path, file_sha256(path), n, wsha, producer, resize, fmt)


#: round-off tolerances of :func:`_check_stats` (relative to the largest entry / the largest eigenvalue)
SYMMETRY_TOL, PSD_TOL = 1e-8, 1e-6


def _check_stats(path, mu, sigma) -> None:
    """A usable FID reference: mu (2048,), sigma (2048, 2048), finite, symmetric and positive semi-definite
    to round-off (smallest eigenvalue >= -PSD_TOL x the largest)."""
    from pfdiff_bench.evaluation.tools import FEATURE_DIM

    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise CheckpointError(f"reference statistics {path} have mismatched shapes: mu {mu.shape}, sigma "
                              f"{sigma.shape} (need mu ({FEATURE_DIM},) and sigma ({FEATURE_DIM}, {FEATURE_DIM}))")
    if mu.shape[0] != FEATURE_DIM:
        raise CheckpointError(f"reference statistics {path} have dimension {mu.shape[0]}, not {FEATURE_DIM} "
                              f"(Inception pool-3 features)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise CheckpointError(f"reference statistics {path} contain NaN or infinite values")
    scale = float(np.abs(sigma).max()) or 1.0
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > SYMMETRY_TOL * scale:
        raise CheckpointError(f"reference statistics {path}: sigma is not symmetric (max |sigma - sigma^T| = "
                              f"{asym:.3g}); not a covariance")
    ev = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if ev[0] < -PSD_TOL * max(float(ev[-1]), 0.0):
        raise CheckpointError(f"reference statistics {path}: sigma is not positive semi-definite (smallest "
                              f"eigenvalue {ev[0]:.3g}, largest {ev[-1]:.3g}); not a covariance")


def derived_path(source: Path, sha256: str) -> Path:
    return refs_dir() / "derived" / f"{source.stem}.{sha256[:16]}.mu_sigma.npz"


def _atomic_write(dest: Path, write: Callable) -> None:
    """Write ``dest`` atomically and never through a planted symlink (:func:`pfdiff_bench.files.atomic_writer`);
    ``write(f)`` gets the open binary file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(dest) as f:
        write(f)


def _read_derived(cache: Path, path: Path, digest: str, log: Log) -> Optional[tuple]:
    """``(mu, sigma, n)`` of a cached reduction of ``path`` (SHA-256 ``digest``), None when absent or unusable
    (then recomputed, with a warning for an unreadable file)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as c:
            if str(c["source_sha256"]) != digest:
                return None
            return (_numeric(c, "mu", cache), _numeric(c, "sigma", cache), int(_numeric(c, "num_samples", cache)))
    except (PFDiffError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log(f"warning: ignoring unreadable cached statistics {cache} ({' '.join(str(exc).split())[:120]}); "
            f"recomputing")
        return None


def activation_stats(path: PathLike, name: Optional[str] = None, *, producer: Optional[str] = None,
                     chunk: int = 5000, log: Log = _stderr, allow_small: bool = False) -> RefStats:
    """``mu``/``sigma`` of an activation file (``pool_3``: N x 2048 rows, as ScoreSDE's ``cifar10_stats.npz``).

    float64 mean and ``n-1`` covariance, accumulated in chunks (TF-GAN casts the activations to float64 and
    uses ``n-1``). Computed once and cached under ``refstats/derived/`` keyed by the source's SHA-256, so an
    edited source is never matched with stale statistics. A cache that cannot be written is reported (the
    statistics are then recomputed next time), never silently skipped.
    """
    from pfdiff_bench.evaluation.features import FeatureStats
    from pfdiff_bench.evaluation.tools import FEATURE_DIM
    from pfdiff_bench.download import file_sha256

    path = Path(path).expanduser()
    digest = file_sha256(path)
    cache = derived_path(path, digest)
    hit = _read_derived(cache, path, digest, log)
    if hit is not None:
        mu, sigma, n = hit
        _check_count(path, n, allow_small)
        _check_stats(path, mu, sigma)
        return RefStats(name or path.name, mu, sigma, path, digest, n, None, producer, None, "activations", cache)
    with _open_stats(path) as data:
        key = next(k for k in ACTIVATION_KEYS if k in data.files)
        acts = _raw_numeric(data, key, path)  # float64 per chunk below, not the whole (N, 2048) at once
    if acts.ndim != 2 or acts.shape[1] != FEATURE_DIM or acts.shape[0] < 2:
        raise CheckpointError(f"activations {path}:{key} have shape {acts.shape}; need (N >= 2, {FEATURE_DIM}) "
                              f"pool_3 rows")
    _check_count(path, int(acts.shape[0]), allow_small)
    if not np.isfinite(acts).all():
        raise CheckpointError(f"activations {path}:{key} contain NaN or infinite values")
    st = FeatureStats(FEATURE_DIM)
    for i in range(0, acts.shape[0], chunk):
        st.update(torch.from_numpy(np.asarray(acts[i:i + chunk])))
    mu, sigma = st.mu, st.sigma
    try:
        _atomic_write(cache, lambda f: np.savez(f, mu=mu, sigma=sigma, num_samples=np.int64(st.n),
                                                source_sha256=np.str_(digest), source=np.str_(str(path)),
                                                source_key=np.str_(key)))
        log(f"computed mu/sigma of {st.n} {key} activations in {path}; cached in {cache}")
    except OSError as exc:
        log(f"warning: computed mu/sigma of {st.n} {key} activations in {path}, but could not cache them in "
            f"{cache} ({exc.strerror or exc}); they will be recomputed on the next use")
        cache = None
    return RefStats(name or path.name, mu, sigma, path, digest, st.n, None, producer, None, "activations", cache)


def reference_features(ref: RefStats, extractor: Optional[torch.nn.Module] = None,
                       batch_size: int = 250) -> torch.Tensor:
    """The reference's own pool features (N, 2048), float32, for KID and precision/recall (torch-fidelity's
    ``kid``/``prc`` compare two feature sets, not mu/sigma): the ``arr_0`` images of an ADM reference batch
    through ``extractor`` (the evaluation's tool), or the rows of a ``pool_3`` activation file as stored.
    A mu/sigma-only reference has no features: refused, naming what is accepted."""
    if ref.fmt == "activations" and ref.path is not None:
        with np.load(ref.path, allow_pickle=False) as data:
            key = next(k for k in ACTIVATION_KEYS if k in data.files)
            return torch.from_numpy(np.asarray(data[key], dtype=np.float32))
    if ref.fmt == "adm-batch" and ref.path is not None:
        from pfdiff_bench.evaluation.features import extract, iter_npz_batches

        if extractor is None:
            raise ValueError("an ADM reference batch's features need the evaluation's extractor")
        feats: list = []
        extract(iter_npz_batches(ref.path, batch_size), extractor, fid=False, isc=False, keep=feats)
        return torch.cat(feats)
    raise ConfigError(f"KID and precision/recall need the reference's features, and reference {ref.name} holds "
                      f"only mu/sigma; use a reference with images (arr_0, as ADM's VIRTUAL_*.npz) or pool_3 "
                      f"activations, or --metrics fid,is")


def _pin(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _fetch_ref(spec: RefSpec, download: bool, log: Log) -> Path:
    from pfdiff_bench.download import fetch_file, file_sha256

    dest = ref_cache_path(spec.name)
    if not dest.is_file():
        hint = f" (or pass --ref /path/to/{spec.filename})"
        if spec.kind == "manual":  # e.g. a Google Drive page: no direct download link exists
            raise CheckpointError(f"reference {spec.name} is not cached: download {spec.filename} from {spec.url} "
                                  f"(in a browser) and place it at {dest}{hint}")
        if not download:
            raise CheckpointError(f"reference {spec.name} is not cached: fetch {spec.url} and place it at {dest}{hint}")
        fetch_file(spec.url, dest, what=f"reference statistics {spec.name}", hint=hint, log=log)
    digest = file_sha256(dest)
    pin = _pin(dest)
    if pin.is_file():
        pinned = (pin.read_text().split() or [""])[0].lower()
        if digest != pinned:
            raise CheckpointError(f"checksum mismatch for {dest}: SHA-256 {digest}, expected {pinned} (pinned in "
                                  f"{pin} at first use); delete both files and download {spec.url} again")
    else:
        try:
            _atomic_write(pin, lambda f: f.write(f"{digest}  {dest.name}\n".encode()))
            log(f"note: {dest.name} has no published checksum; pinned its SHA-256 {digest} in {pin}")
        except OSError as exc:  # e.g. a read-only shared cache: usable, but say that nothing was pinned
            log(f"warning: could not write the SHA-256 pin {pin} ({exc.strerror or exc}); {dest.name} "
                f"(sha256 {digest}) is used unpinned, so a later change to it would go unnoticed")
    return dest


def load_ref(ref: PathLike, *, fid_tool: Optional[str] = None, inception_weights: Optional[PathLike] = None,
             trust_weights: bool = False, device=None, download: bool = True, log: Log = _stderr,
             allow_small: bool = False) -> RefStats:
    """Reference statistics by registry name or ``.npz`` path, validated by :func:`read_stats_npz` (a reference of
    fewer than 2,048 recorded images is refused unless ``allow_small``).

    ``cifar10-train`` that is not cached yet for ``fid_tool`` is computed (from torchvision's CIFAR-10 under
    ``$TORCH_HOME/fidelity_datasets``) and cached; ``lsun_church`` must have been computed with
    ``pfdiff-bench ref compute FOLDER --as lsun_church [--fid-tool ...]``.
    """
    from pfdiff_bench.evaluation.tools import get_tool

    tool = get_tool(fid_tool).name
    s = str(ref)
    if s not in REFERENCES:
        if s.endswith(".npz") or Path(s).expanduser().exists():
            return read_stats_npz(s, log=log, allow_small=allow_small)
        get_ref(s)  # raises "unknown reference"
    spec = REFERENCES[s]
    if spec.kind != "computed":
        return read_stats_npz(_fetch_ref(spec, download, log), spec.name, producer=spec.producer, log=log,
                              allow_small=allow_small)
    path = ref_cache_path(spec.name, tool)
    if not path.is_file():
        if spec.name == "cifar10-train":
            compute_ref("cifar10-train", out=path, fid_tool=tool, inception_weights=inception_weights,
                        trust_weights=trust_weights, device=device, download=download, log=log)
        else:
            raise CheckpointError(f"reference {spec.name} has not been computed with {tool}: expected {path}. Run "
                                  f"`{spec.source_hint} --fid-tool {tool}`")
    st = read_stats_npz(path, spec.name, log=log, allow_small=allow_small)
    if st.producer is not None and st.producer != tool:
        raise CheckpointError(f"reference {spec.name} ({path}) was computed with {st.producer}, not {tool}; "
                              f"recompute it (`{spec.source_hint} --fid-tool {tool}`)")
    st.producer = tool
    if st.weights_sha256 is not None:
        from pfdiff_bench.evaluation.features import resolve_inception_weights

        w = resolve_inception_weights(inception_weights, tool=tool, trust_weights=trust_weights, download=download,
                                      log=log)
        if w.sha256 != st.weights_sha256:
            raise CheckpointError(f"reference {spec.name} ({path}) was computed with Inception weights sha256 "
                                  f"{st.weights_sha256}, but the weights in use have {w.sha256}; recompute it "
                                  f"(`{spec.source_hint} --fid-tool {tool}`)")
    return st


# ------------------------------------------------------------------------------- image sources
def list_images(folder: PathLike) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise PFDiffError(f"no images ({', '.join(IMAGE_EXTS)}) found under {folder}")
    return files


def _load_image(path: Path, resize: Optional[int]) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if resize is not None:
            from torchvision.transforms import CenterCrop, InterpolationMode, Resize

            im = CenterCrop(resize)(Resize(resize, interpolation=InterpolationMode.BILINEAR)(im))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())


def iter_folder_batches(folder: PathLike, batch_size: int, resize: Optional[int] = None) -> Iterator[torch.Tensor]:
    """uint8 NHWC batches of the images under ``folder`` (sorted, recursive); a batch is cut early where the
    image size changes, so mixed sizes work without ``resize``."""
    batch: list[torch.Tensor] = []
    for p in list_images(folder):
        img = _load_image(p, resize)
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


def cifar10_root() -> Path:
    """torch-fidelity's default ``datasets_root``: ``$TORCH_HOME/fidelity_datasets``."""
    return Path(torch.hub._get_torch_home()) / "fidelity_datasets"  # noqa: SLF001 - what torch-fidelity uses


def _cifar10_train_batches(batch_size: int, download: bool) -> tuple[Iterator[torch.Tensor], int]:
    from torch_fidelity.datasets import Cifar10_RGB, TransformPILtoRGBTensor

    root = cifar10_root()
    try:
        ds = Cifar10_RGB(str(root), train=True, transform=TransformPILtoRGBTensor(), download=False)
    except RuntimeError:
        if not download:
            raise CheckpointError(f"CIFAR-10 training set not found: put cifar-10-batches-py/ under {root} or "
                                  f"compute from a folder (pfdiff-bench ref compute FOLDER --as cifar10-train)") from None
        from pfdiff_bench.download import reachable

        url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        reason = reachable(url, 5.0)
        if reason is not None:
            raise CheckpointError(f"cannot download the CIFAR-10 training set from {url} ({reason}); without "
                                  f"network access, extract that archive so that {root / 'cifar-10-batches-py'} "
                                  f"exists, or compute from a folder (pfdiff-bench ref compute FOLDER --as "
                                  f"cifar10-train)") from None
        ds = Cifar10_RGB(str(root), train=True, transform=TransformPILtoRGBTensor(), download=True)

    def gen():
        for i in range(0, len(ds), batch_size):
            yield torch.stack([ds[j] for j in range(i, min(i + batch_size, len(ds)))]).permute(0, 2, 3, 1)

    return gen(), len(ds)


def source_batches(source: PathLike, batch_size: int = 64, resize: Optional[int] = None,
                   download: bool = True) -> tuple[Iterator[torch.Tensor], Optional[int]]:
    """Batches (and count when known) of a folder of images, an ``.npz`` (``arr_0`` uint8 NHWC), or
    ``cifar10-train``."""
    from pfdiff_bench.evaluation.features import iter_npz_batches, npz_num_images

    s = str(source)
    if s == "cifar10-train":
        return _cifar10_train_batches(batch_size, download)
    p = Path(s).expanduser()
    if p.is_dir():
        return iter_folder_batches(p, batch_size, resize), len(list_images(p))
    if p.is_file() and p.suffix == ".npz":
        if resize is not None:
            raise PFDiffError("resizing is only available for image folders, not .npz inputs")
        return iter_npz_batches(p, batch_size), npz_num_images(p)
    raise PFDiffError(f"{s} is neither a folder of images, an .npz with arr_0, nor cifar10-train")


# ----------------------------------------------------------------------------------- computation
def compute_stats(source: PathLike, *, batch_size: int = 64, resize: Optional[int] = None,
                  fid_tool: Optional[str] = None, inception_weights: Optional[PathLike] = None,
                  trust_weights: bool = False, device=None, download: bool = True, progress: Optional[bool] = None,
                  log: Log = _stderr, allow_small: bool = False) -> RefStats:
    """Inception ``mu``/``sigma`` (with ``fid_tool``) of a folder of images, an ``.npz`` of uint8 NHWC images
    (e.g. an ADM reference batch's ``arr_0``) or ``cifar10-train``; fewer than 2,048 images are refused unless
    ``allow_small`` (before the pass when the count is known)."""
    from pfdiff_bench.evaluation.tools import get_tool
    from pfdiff_bench.evaluation.features import check_floor, feature_statistics, resolve_inception_weights

    tool = get_tool(fid_tool)
    resolve_inception_weights(inception_weights, tool=tool.name, trust_weights=trust_weights, download=download,
                              log=log)
    batches, total = source_batches(source, batch_size, resize, download)
    if total is not None:
        check_floor(total, "an FID reference", allow_small=allow_small, source=str(source))
    mu, sigma, n, w = feature_statistics(batches, fid_tool=tool.name, inception_weights=inception_weights,
                                         trust_weights=trust_weights, device=device, download=download,
                                         progress=progress, total=total, log=log)
    check_floor(n, "an FID reference", allow_small=allow_small, source=str(source))
    return RefStats(Path(str(source)).name, mu, sigma, None, None, n, w.sha256, tool.name, tool.resize)


def save_stats(stats: RefStats, out: PathLike, *, source: str = "") -> Path:
    """Write ``mu``/``sigma`` (pytorch-fid's npz layout) plus what produced them: tool, version, resize,
    weights SHA-256, sample count (and ``small_sample`` below 2,048), source; atomically (:func:`_atomic_write`)."""
    from pfdiff_bench.evaluation.tools import get_tool
    from pfdiff_bench.download import file_sha256

    from pfdiff_bench.evaluation.features import MIN_IMAGES

    tool = get_tool(stats.producer)
    out = Path(out).expanduser()
    n = int(stats.num_samples or 0)
    fields = dict(mu=stats.mu, sigma=stats.sigma, num_samples=np.int64(n),
                  small_sample=np.bool_(n < MIN_IMAGES),  # computed with --allow-small; readers check num_samples
                  weights_sha256=np.str_(stats.weights_sha256 or ""), fid_tool=np.str_(tool.name),
                  fid_tool_version=np.str_(tool.version()), feature_extractor=np.str_(tool.extractor),
                  resize=np.str_(tool.resize), source=np.str_(source))
    _atomic_write(out, lambda f: np.savez(f, **fields))
    stats.path, stats.sha256 = out, file_sha256(out)
    return out


def compute_ref(source: PathLike, *, out: Optional[PathLike] = None, as_name: Optional[str] = None,
                resize: Optional[int] = None, batch_size: int = 64, fid_tool: Optional[str] = None,
                **kwargs) -> RefStats:
    """Compute statistics of ``source`` with ``fid_tool`` and save them to ``out`` (default: the cache file of
    ``as_name`` for that tool).

    ``as_name`` (``cifar10-train`` or ``lsun_church``) selects that reference's preprocessing
    (``lsun_church``: Resize 256 + CenterCrop 256) and its cache location.
    """
    if as_name is None and str(source) in REFERENCES:
        as_name = str(source)
    spec = get_ref(as_name) if as_name is not None else None
    if spec is not None and spec.kind != "computed":
        raise ConfigError(f"{as_name} is a published reference; only {', '.join(k for k, v in REFERENCES.items() if v.kind == 'computed')} are computed")
    if resize is None and spec is not None:
        resize = spec.resize
    if out is None:
        if spec is None:
            raise ConfigError("give --out STATS.npz (or --as NAME to write a registered reference's cache file)")
        out = ref_cache_path(spec.name, fid_tool)
    st = compute_stats(source, batch_size=batch_size, resize=resize, fid_tool=fid_tool, **kwargs)
    if spec is not None:
        st.name = spec.name
    save_stats(st, out, source=str(source))
    return st


def list_refs(fid_tool: Optional[str] = None) -> list[dict]:
    """One row per registered reference: name, kind, producer, cached path or None, description, how to get it."""
    from pfdiff_bench.evaluation.tools import get_tool

    tool = get_tool(fid_tool).name
    rows = []
    for spec in REFERENCES.values():
        path = ref_cache_path(spec.name, tool)
        rows.append({"name": spec.name, "kind": spec.kind, "path": str(path), "cached": path.is_file(),
                     "producer": spec.producer or f"{tool} (computed)", "format": spec.fmt,
                     "description": spec.description, "source": spec.url or spec.source_hint})
    return rows
