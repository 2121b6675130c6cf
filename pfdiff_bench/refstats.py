"""Reference statistics (Inception pool-3 ``mu``/``sigma``) for FID, per benchmark (spec CHECKPOINTS.md §3a).

Registry:

* ``imagenet64``: ADM's ``VIRTUAL_imagenet64_labeled.npz`` (OpenAI, whole-dataset ``mu``/``sigma``).
* ``lsun_bedroom``: ADM's ``VIRTUAL_lsun_bedroom256.npz``.
* ``cifar10-train``: computed with the same extractor from the 50,000 CIFAR-10 training images, read by
  torchvision (``cifar-10-batches-py/`` under ``$TORCH_HOME/fidelity_datasets``, torch-fidelity's
  ``datasets_root``) or from a user-given folder / ``.npz``.
* ``lsun_church``: computed from a user-given folder of LSUN church_outdoor images, ``Resize(256)`` +
  ``CenterCrop(256)`` as ermongroup/ddim does. No official file exists; numbers are comparable only up
  to this choice.
* any ``.npz`` path holding ``mu`` and ``sigma``.

Downloaded files live in ``$PFDIFF_BENCH_HOME/refstats/`` under their official names; OpenAI publishes no
checksums, so a SHA-256 is pinned in a ``<file>.sha256`` sidecar at first use (as the model zoo does) and
later loads must match it. Computed statistics are written to ``$PFDIFF_BENCH_HOME/refstats/<name>.npz``
together with the Inception weights' SHA-256 they were computed with; loading them with other weights is
refused.
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

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_OAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/{}"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RefSpec:
    name: str
    kind: str  # "download" or "computed"
    description: str
    url: Optional[str] = None
    filename: Optional[str] = None  # official file name (downloads) or cache file name (computed)
    resize: Optional[int] = None  # computed: Resize(resize) + CenterCrop(resize) before the extractor
    source_hint: str = ""


REFERENCES: dict[str, RefSpec] = {s.name: s for s in [
    RefSpec("imagenet64", "download", "ImageNet 64x64, ADM reference batch (OpenAI guided-diffusion)",
            url=_OAI.format("imagenet/64/VIRTUAL_imagenet64_labeled.npz"), filename="VIRTUAL_imagenet64_labeled.npz"),
    RefSpec("lsun_bedroom", "download", "LSUN bedroom 256x256, ADM reference batch",
            url=_OAI.format("lsun/bedroom/VIRTUAL_lsun_bedroom256.npz"), filename="VIRTUAL_lsun_bedroom256.npz"),
    RefSpec("cifar10-train", "computed", "CIFAR-10 training set (50k), computed with the same extractor",
            filename="cifar10-train.npz",
            source_hint="pfdiff-bench ref compute cifar10-train (needs cifar-10-batches-py/ under "
                        "$TORCH_HOME/fidelity_datasets) or pfdiff-bench ref compute FOLDER --as cifar10-train"),
    RefSpec("lsun_church", "computed", "LSUN church_outdoor 256x256, computed from your image folder "
            "(Resize 256 + CenterCrop 256, as ddim)", filename="lsun_church.npz", resize=256,
            source_hint="pfdiff-bench ref compute FOLDER --as lsun_church"),
]}


@dataclass
class RefStats:
    name: str
    mu: np.ndarray
    sigma: np.ndarray
    path: Optional[Path] = None
    sha256: Optional[str] = None
    num_samples: Optional[int] = None
    weights_sha256: Optional[str] = None  # computed statistics: the Inception weights used


def refs_dir() -> Path:
    from pfdiff_bench.models.zoo import home_dir  # $PFDIFF_BENCH_HOME, shared with the checkpoint cache

    return home_dir() / "refstats"


def ref_cache_path(name: str) -> Path:
    return refs_dir() / get_ref(name).filename


def get_ref(name: str) -> RefSpec:
    try:
        return REFERENCES[name]
    except KeyError:
        raise ConfigError(f"unknown reference {name!r}; known: {', '.join(REFERENCES)}, or a path to an .npz "
                          f"with mu and sigma") from None


# ------------------------------------------------------------------------------------------ loading
def read_stats_npz(path: PathLike, name: Optional[str] = None) -> RefStats:
    """Load ``mu``/``sigma`` (float64) from an .npz, with clear errors for missing keys or bad shapes."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"reference statistics file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read reference statistics {path} as an .npz ({type(exc).__name__}: {exc})") from None
    with data:
        keys = list(data.files)
        missing = [k for k in ("mu", "sigma") if k not in keys]
        if missing:
            raise CheckpointError(f"reference statistics {path} lack {' and '.join(missing)} (arrays in the file: "
                                  f"{', '.join(keys) or 'none'}); an FID reference needs mu (D,) and sigma (D, D)")
        mu = np.asarray(data["mu"], dtype=np.float64)
        sigma = np.asarray(data["sigma"], dtype=np.float64)
        n = int(data["num_samples"]) if "num_samples" in keys else None
        wsha = str(data["weights_sha256"]) if "weights_sha256" in keys else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise CheckpointError(f"reference statistics {path} have mismatched shapes: mu {mu.shape}, sigma "
                              f"{sigma.shape} (need mu (D,) and sigma (D, D))")
    if mu.shape[0] != 2048:
        raise CheckpointError(f"reference statistics {path} have dimension {mu.shape[0]}, not 2048 "
                              f"(Inception pool-3 features)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise CheckpointError(f"reference statistics {path} contain NaN or infinite values")
    from pfdiff_bench.fid import file_sha256

    return RefStats(name or path.name, mu, sigma, path, file_sha256(path), n, wsha)


def _pin(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _fetch_ref(spec: RefSpec, download: bool, log: Log) -> Path:
    from pfdiff_bench.fid import fetch_file, file_sha256

    dest = ref_cache_path(spec.name)
    if not dest.is_file():
        hint = f" (or pass --ref /path/to/{spec.filename})"
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
            pin.write_text(f"{digest}  {dest.name}\n")
            log(f"note: {dest.name} has no published checksum; pinned its SHA-256 {digest} in {pin}")
        except OSError:
            pass
    return dest


def load_ref(ref: PathLike, *, inception_weights: Optional[PathLike] = None, trust_weights: bool = False,
             device=None, download: bool = True, log: Log = _stderr) -> RefStats:
    """Reference statistics by registry name or ``.npz`` path.

    ``cifar10-train`` that is not cached yet is computed (from torchvision's CIFAR-10 under
    ``$TORCH_HOME/fidelity_datasets``) and cached; ``lsun_church`` must have been computed with
    ``pfdiff-bench ref compute FOLDER --as lsun_church``.
    """
    s = str(ref)
    if s not in REFERENCES:
        if s.endswith(".npz") or Path(s).expanduser().exists():
            return read_stats_npz(s)
        get_ref(s)  # raises "unknown reference"
    spec = REFERENCES[s]
    if spec.kind == "download":
        return read_stats_npz(_fetch_ref(spec, download, log), spec.name)
    path = ref_cache_path(spec.name)
    if not path.is_file():
        if spec.name == "cifar10-train":
            compute_ref("cifar10-train", out=path, inception_weights=inception_weights,
                        trust_weights=trust_weights, device=device, download=download, log=log)
        else:
            raise CheckpointError(f"reference {spec.name} has not been computed: expected {path}. Run "
                                  f"`{spec.source_hint}`")
    st = read_stats_npz(path, spec.name)
    if st.weights_sha256 is not None:
        from pfdiff_bench.fid import resolve_inception_weights

        w = resolve_inception_weights(inception_weights, trust_weights=trust_weights, download=download, log=log)
        if w.sha256 != st.weights_sha256:
            raise CheckpointError(f"reference {spec.name} ({path}) was computed with Inception weights sha256 "
                                  f"{st.weights_sha256}, but the weights in use have {w.sha256}; recompute it "
                                  f"(`{spec.source_hint}`)")
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
    from pfdiff_bench.fid import iter_npz_batches, npz_num_images

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
                  inception_weights: Optional[PathLike] = None, trust_weights: bool = False, device=None,
                  download: bool = True, progress: Optional[bool] = None, log: Log = _stderr) -> RefStats:
    """Inception ``mu``/``sigma`` of a folder of images, an ``.npz`` of uint8 NHWC images or ``cifar10-train``."""
    from pfdiff_bench.fid import feature_statistics, resolve_inception_weights

    resolve_inception_weights(inception_weights, trust_weights=trust_weights, download=download, log=log)
    batches, total = source_batches(source, batch_size, resize, download)
    mu, sigma, n, w = feature_statistics(batches, inception_weights=inception_weights, trust_weights=trust_weights,
                                         device=device, download=download, progress=progress, total=total, log=log)
    return RefStats(Path(str(source)).name, mu, sigma, None, None, n, w.sha256)


def save_stats(stats: RefStats, out: PathLike, *, source: str = "") -> Path:
    from pfdiff_bench.fid import EXTRACTOR_NAME, file_sha256, torch_fidelity_version

    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_samples=np.int64(stats.num_samples or 0),
             weights_sha256=np.str_(stats.weights_sha256 or ""), feature_extractor=np.str_(EXTRACTOR_NAME),
             torch_fidelity_version=np.str_(torch_fidelity_version()), source=np.str_(source))
    os.replace(tmp, out)
    stats.path, stats.sha256 = out, file_sha256(out)
    return out


def compute_ref(source: PathLike, *, out: Optional[PathLike] = None, as_name: Optional[str] = None,
                resize: Optional[int] = None, batch_size: int = 64, **kwargs) -> RefStats:
    """Compute statistics of ``source`` and save them to ``out`` (default: the cache file of ``as_name``).

    ``as_name`` (``cifar10-train`` or ``lsun_church``) selects that reference's preprocessing
    (``lsun_church``: Resize 256 + CenterCrop 256) and its cache location.
    """
    if as_name is None and str(source) in REFERENCES:
        as_name = str(source)
    spec = get_ref(as_name) if as_name is not None else None
    if spec is not None and spec.kind != "computed":
        raise ConfigError(f"{as_name} is a downloaded reference; only {', '.join(k for k, v in REFERENCES.items() if v.kind == 'computed')} are computed")
    if resize is None and spec is not None:
        resize = spec.resize
    if out is None:
        if spec is None:
            raise ConfigError("give --out STATS.npz (or --as NAME to write a registered reference's cache file)")
        out = ref_cache_path(spec.name)
    st = compute_stats(source, batch_size=batch_size, resize=resize, **kwargs)
    if spec is not None:
        st.name = spec.name
    save_stats(st, out, source=str(source))
    return st


def list_refs() -> list[dict]:
    """One row per registered reference: name, kind, cached path or None, description, how to get it."""
    rows = []
    for spec in REFERENCES.values():
        path = ref_cache_path(spec.name)
        rows.append({"name": spec.name, "kind": spec.kind, "path": str(path), "cached": path.is_file(),
                     "description": spec.description, "source": spec.url or spec.source_hint})
    return rows
