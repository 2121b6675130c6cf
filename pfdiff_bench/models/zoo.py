"""Pretrained checkpoints: registry, cache, resumable download, checksums and safe loading.

Registry (spec CHECKPOINTS.md §1 and its addendum): the pesser/pytorch_diffusion conversions of Ho et
al.'s DDPM checkpoints used by ermongroup/ddim (published MD5s); openai/guided-diffusion's ImageNet
64x64 and 256x256 class-conditional UNets and noisy classifiers; and score_sde_pytorch's DDPM++ deep
continuous-VP CIFAR-10 ``checkpoint_8.pth``. No SHA-256 of any zoo file is published (CHECKPOINTS.md
§1a: MD5s for the DDPM files only; §1b, addendum A and B: none for the OpenAI files and ``checkpoint_8.pth``).
Files without a published checksum get a SHA-256 pinned in a ``<file>.sha256`` sidecar, whose second line
records where it came from: ``download`` (fetched from the official URL, size equal to the server's, loaded
with the expected keys and shapes) or ``first-use`` (a file placed by hand, pinned when it first loaded).
Later loads must match the pin. ``models verify`` (:func:`verify_file`) calls a file OK only when it matches
a published MD5 or a download pin, never on the strength of a forward pass.

Files live in ``$PFDIFF_BENCH_HOME/checkpoints/`` (default ``~/.cache/pfdiff-bench``) under the
official file names, or anywhere the user points with ``checkpoint=PATH``. A download is written to
``<file>.part``, resumed with an HTTP Range request when interrupted, and renamed to the final name only
after its checksum (or, without one, its size and loadability) checks out, so the final name never holds a
truncated file; the transfer itself (lock, resume of own bytes only, size checks) is ``download.transfer``.
``checkpoint_8.pth`` is published only inside a Google Drive folder (no direct file URL), so it is
never fetched automatically: the error names the folder and the exact path to place the file at.

Loading reads the file once, checks the digest of those bytes and unpickles the same bytes with
``torch.load(BytesIO, map_location="cpu", weights_only=True)`` (``download.read_hashed`` and
``download.load_weights_bytes``, shared with the Inception weights; an allowlist of the numpy scalar globals a
ScoreSDE optimizer state pickles; never ``weights_only=False``). A ScoreSDE training
checkpoint ``{'model', 'ema', 'optimizer', 'step'}`` yields its EMA weights, as the official evaluation
does with ``ema.copy_to``. The keys and shapes are compared with the expected network before
``load_state_dict(strict=True)`` so a wrong file gives a precise error.

    >>> eps = eps_model("ema_cifar10", device="cuda")          # NoisePredictor (models/base.py)
    >>> grad = classifier_grad("adm_classifier64")              # ClassifierGrad
    >>> net = load_network("adm_imagenet64", checkpoint="/data/64x64_diffusion.pt", fp16=True)
    >>> eps = eps_model("scoresde_cifar10", checkpoint="checkpoint_8.pth")   # EMA weights, eps(x, 999 t)
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from pfdiff_bench.download import (discard_part, download_lock, file_digest, load_weights_bytes, part_path,
                                   part_state_path, read_hashed, transfer, write_atomic)
from pfdiff_bench.errors import CheckpointError, ConfigError
from pfdiff_bench.models.arch_configs import (
    CIFAR10_CONFIG, CIFAR10_DDPMPP_DEEP_CONFIG, CLASSIFIER64_CONFIG, CLASSIFIER256_CONFIG, IMAGENET64_CONFIG,
    IMAGENET256_CONFIG, LSUN_CONFIG,
)

if TYPE_CHECKING:  # torch and the networks are imported where used: `models list` must start without torch
    import torch
    from torch import nn

__all__ = [
    "CheckpointSpec", "CHECKPOINTS", "ARCHITECTURES", "architecture", "build_arch", "get_spec", "home_dir", "cache_path",
    "download", "verify_checksum", "load_state_dict_file", "check_state_dict", "build_network",
    "load_network", "load_checkpoint", "eps_model", "classifier_grad", "file_digest", "verify_file", "VerifyResult",
    "pin_source", "missing_checkpoints",
]

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

#: Architecture name (fixture/manifest ``arch`` field) -> ``module:class`` of the constructor taking the
#: ``config`` dict (imported by :func:`architecture` when a network is built).
ARCHITECTURES: dict[str, str] = {
    "ddpm_unet": "pfdiff_bench.models.ddpm_unet:DDPMUNet",
    "adm_unet": "pfdiff_bench.models.adm_unet:UNetModel",
    "adm_classifier": "pfdiff_bench.models.adm_classifier:EncoderUNetModel",
    "ncsnpp": "pfdiff_bench.models.ncsnpp:NCSNpp",
}

CONNECT_TIMEOUT_S = 10.0  # seconds; also the per-read socket timeout of urllib


def architecture(arch: str) -> type[nn.Module]:
    """The network class of architecture ``arch`` (a key of :data:`ARCHITECTURES`)."""
    import importlib

    try:
        module, _, cls = ARCHITECTURES[arch].partition(":")
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})") from None
    return getattr(importlib.import_module(module), cls)


def build_arch(arch: str, config: Mapping, *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Build network ``arch`` from a fixture/manifest ``config`` dict (random weights)."""
    import torch

    cls = architecture(arch)
    if device is None:
        return cls(**dict(config))
    with torch.device(device):
        return cls(**dict(config))


@dataclass(frozen=True)
class CheckpointSpec:
    """One downloadable checkpoint and the network it loads into."""

    name: str
    arch: str  # key of ARCHITECTURES
    config: dict = field(repr=False)
    manifest: str  # bundled manifest (pfdiff_bench/data/arch/manifests/<manifest>.json)
    url: str
    filename: str  # path under the cache's checkpoints/ folder (official file name)
    approx_bytes: int  # no sizes are published; ≈ 4 bytes x parameters
    md5: Optional[str]  # published MD5, or None (SHA-256 pinned on first verification)
    num_parameters: int
    used: bool  # used by PFDiff's experiments
    description: str
    direct_download: bool = True  # False: ``url`` is a folder page; the file must be fetched by hand

    @property
    def role(self) -> str:
        return "classifier" if self.arch == "adm_classifier" else "eps"

    @property
    def fetch_hint(self) -> str:
        """How to get the file by hand (used in the offline and missing-file messages)."""
        name = Path(self.filename).name
        if self.direct_download:
            return f"fetch {self.url}"
        return f"download {name} from the folder {self.url} (no direct file link is published)"


def _ddpm(name, url, filename, md5, config, manifest, nparams, used, description):
    return CheckpointSpec(name=name, arch="ddpm_unet", config=config, manifest=manifest, url=url,
                          filename=filename, approx_bytes=4 * nparams + 60_000, md5=md5,
                          num_parameters=nparams, used=used, description=description)


_HEI = "https://heibox.uni-heidelberg.de/f/{}/?dl=1"
_OAI = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{}"

CHECKPOINTS: dict[str, CheckpointSpec] = {s.name: s for s in [
    _ddpm("ema_cifar10", _HEI.format("2e4f01e2d9ee49bab1d5"), "ema_diffusion_cifar10_model/model-790000.ckpt",
          "1fa350b952534ae442b1d5235cce5cd3", CIFAR10_CONFIG, "ddpm_cifar10", 35_746_307, True,
          "DDPM CIFAR-10 32x32, EMA weights (pesser/pytorch_diffusion conversion)"),
    _ddpm("cifar10", _HEI.format("869980b53bf5416c8a28"), "diffusion_cifar10_model/model-790000.ckpt",
          "82ed3067fd1002f5cf4c339fb80c4669", CIFAR10_CONFIG, "ddpm_cifar10", 35_746_307, False,
          "DDPM CIFAR-10 32x32, non-EMA weights"),
    _ddpm("ema_lsun_bedroom", _HEI.format("b95206528f384185889b"),
          "ema_diffusion_lsun_bedroom_model/model-2388000.ckpt", "1921fa46b66a3665e450e42f36c2720f",
          LSUN_CONFIG, "ddpm_lsun", 113_673_219, True, "DDPM LSUN bedroom 256x256, EMA weights"),
    _ddpm("lsun_bedroom", _HEI.format("f179d4f21ebc4d43bbfe"), "diffusion_lsun_bedroom_model/model-2388000.ckpt",
          "f70280ac0e08b8e696f42cb8e948ff1c", LSUN_CONFIG, "ddpm_lsun", 113_673_219, False,
          "DDPM LSUN bedroom 256x256, non-EMA weights"),
    _ddpm("ema_lsun_church", _HEI.format("44ccb50ef3c6436db52e"),
          "ema_diffusion_lsun_church_model/model-4432000.ckpt", "fdc68a23938c2397caba4a260bc2445f",
          LSUN_CONFIG, "ddpm_lsun", 113_673_219, True, "DDPM LSUN church_outdoor 256x256, EMA weights"),
    _ddpm("lsun_church", _HEI.format("2711a6f712e34b06b9d8"), "diffusion_lsun_church_model/model-4432000.ckpt",
          "eb619b8a5ab95ef80f94ce8a5488dae3", LSUN_CONFIG, "ddpm_lsun", 113_673_219, False,
          "DDPM LSUN church_outdoor 256x256, non-EMA weights"),
    CheckpointSpec(name="adm_imagenet64", arch="adm_unet", config=IMAGENET64_CONFIG, manifest="adm_imagenet64",
                   url=_OAI.format("64x64_diffusion.pt"), filename="64x64_diffusion.pt",
                   approx_bytes=1_183_600_000, md5=None, num_parameters=295_904_454, used=True,
                   description="ADM ImageNet 64x64 class-conditional UNet (guided-diffusion)"),
    CheckpointSpec(name="adm_classifier64", arch="adm_classifier", config=CLASSIFIER64_CONFIG,
                   manifest="adm_classifier64", url=_OAI.format("64x64_classifier.pt"),
                   filename="64x64_classifier.pt", approx_bytes=261_800_000, md5=None,
                   num_parameters=65_438_568, used=True,
                   description="ADM ImageNet 64x64 noisy classifier (guided-diffusion)"),
    # CHECKPOINTS.md addendum §B: no published checksums; sizes are fp32 payload + pickle overhead estimates
    CheckpointSpec(name="adm_imagenet256", arch="adm_unet", config=IMAGENET256_CONFIG, manifest="adm_imagenet256",
                   url=_OAI.format("256x256_diffusion.pt"), filename="256x256_diffusion.pt",
                   approx_bytes=2_215_400_000, md5=None, num_parameters=553_838_086, used=True,
                   description="ADM ImageNet 256x256 class-conditional UNet (guided-diffusion)"),
    CheckpointSpec(name="adm_classifier256", arch="adm_classifier", config=CLASSIFIER256_CONFIG,
                   manifest="adm_classifier256", url=_OAI.format("256x256_classifier.pt"),
                   filename="256x256_classifier.pt", approx_bytes=216_400_000, md5=None,
                   num_parameters=54_096_360, used=True,
                   description="ADM ImageNet 256x256 noisy classifier (guided-diffusion)"),
    # CHECKPOINTS.md addendum §A: only a Drive folder link, no checksum, no size; the payload (raw weights,
    # EMA, two Adam moments) is 1,706,129,264 B. Placed where DPM-Solver-v3's README puts it.
    CheckpointSpec(name="scoresde_cifar10", arch="ncsnpp", config=CIFAR10_DDPMPP_DEEP_CONFIG,
                   manifest="ncsnpp_cifar10_deep",
                   url="https://drive.google.com/drive/folders/1ZMLBiu9j7-rpdTQu8M2LlHAEQq4xRYrj",
                   filename="cifar10_ddpmpp_deep_continuous/checkpoint_8.pth", approx_bytes=1_706_200_000,
                   md5=None, num_parameters=106_632_579, used=True, direct_download=False,
                   description="ScoreSDE DDPM++ deep, continuous VP, CIFAR-10 (score_sde_pytorch), EMA weights"),
]}


def get_spec(name: str) -> CheckpointSpec:
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise ConfigError(f"unknown checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}") from None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- cache paths
def home_dir() -> Path:
    """``$PFDIFF_BENCH_HOME`` or ``~/.cache/pfdiff-bench``."""
    env = os.environ.get("PFDIFF_BENCH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pfdiff-bench"


def cache_path(name: str) -> Path:
    """Where checkpoint ``name`` lives in the cache (whether or not it is there)."""
    return home_dir() / "checkpoints" / get_spec(name).filename


def _pin_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


# ---------------------------------------------------------------------------------------- checksums
def _read_pin(path: Path) -> Optional[str]:
    pin = _pin_path(path)
    if not pin.is_file():
        return None
    text = pin.read_text().split()
    return text[0].lower() if text else None


def pin_source(path: PathLike) -> Optional[str]:
    """Where the pin of ``path`` came from: ``"download"``, ``"first-use"``, or None (no pin, or an older pin
    without the ``# source:`` line, which counts as first use)."""
    try:
        lines = _pin_path(Path(path)).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines[1:]:
        if line.startswith("# source:"):
            words = line[len("# source:"):].split()
            return words[0] if words else None
    return None


def _write_pin(path: Path, sha256: str, log: Log, *, source: str = "first-use") -> None:
    """Pin ``sha256`` for ``path`` (atomically). ``source``: ``"download <url> <bytes>"`` or ``"first-use"``.

    Called only after every check passed (size, weights-only load, keys and shapes): a file that failed one
    is never pinned."""
    pin = _pin_path(path)
    try:
        write_atomic(pin, f"{sha256}  {path.name}\n# source: {source}\n")
        how = "as downloaded" if source.startswith("download") else "at its first use (placed by hand)"
        log(f"note: {path.name} has no published checksum; pinned its SHA-256 {sha256} {how} in {pin} "
            f"(later loads must match it)")
    except OSError as exc:
        log(f"note: {path.name} has no published checksum and its SHA-256 {sha256} could not be "
            f"pinned in {pin} ({exc})")


def _check_min_size(spec: CheckpointSpec, path: Path, size: Optional[int] = None) -> None:
    size = path.stat().st_size if size is None else size
    if size < 4 * spec.num_parameters:  # fp32 tensors alone take this much: anything less is truncated
        raise CheckpointError(
            f"{path} is {size:,} bytes, too small for {spec.name} ({spec.num_parameters:,} float32 parameters "
            f"need at least {4 * spec.num_parameters:,} bytes): the file is truncated")


def verify_checksum(name: str, path: PathLike, *, log: Log = _stderr) -> tuple[str, str]:
    """Check ``path`` against the published MD5 of ``name`` or its pinned SHA-256.

    Returns ``(algorithm, digest)``; ``("sha256-unpinned", digest)`` when no pin exists yet (the caller
    pins it once the file has loaded). Raises CheckpointError naming the file and both checksums.
    """
    path = Path(path)
    spec = get_spec(name)
    algorithm = "md5" if spec.md5 is not None else "sha256"
    return _check_digest(spec, path, {algorithm: file_digest(path, algorithm)}, path.stat().st_size)


def _check_digest(spec: CheckpointSpec, path: Path, digests: Mapping[str, str], size: int) -> tuple[str, str]:
    """:func:`verify_checksum` on digests already computed (of the bytes that will be loaded)."""
    if spec.md5 is not None:
        got = digests["md5"]
        if got != spec.md5:
            raise CheckpointError(
                f"checksum mismatch for {path}: MD5 is {got}, expected {spec.md5} (published for {spec.name}); "
                f"the file is truncated or altered: delete it and download again "
                f"(pfdiff-bench models download {spec.name} --force)")
        return "md5", got
    pinned = _read_pin(path)
    got = digests["sha256"]
    if pinned is None:
        _check_min_size(spec, path, size)  # no checksum to compare with: at least refuse a truncated file
        return "sha256-unpinned", got
    if got != pinned:
        raise CheckpointError(
            f"checksum mismatch for {path}: SHA-256 is {got}, expected {pinned} (pinned in {_pin_path(path)} "
            f"when the file was first verified); the file is truncated or altered: delete it and its .sha256 "
            f"and download again (pfdiff-bench models download {spec.name} --force)")
    return "sha256", got


# ----------------------------------------------------------------------------------------- download
def _offline_message(spec: CheckpointSpec, dest: Path, reason: str) -> str:
    return (f"cannot download {spec.name} from {spec.url} ({reason}). Without network access, fetch that URL "
            f"elsewhere and place the file (official name {Path(spec.filename).name}) at {dest} , "
            f"or pass --checkpoint PATH")


def _manual_message(spec: CheckpointSpec, dest: Path) -> str:
    return (f"{spec.name} cannot be downloaded automatically: {spec.fetch_hint}, place it at {dest} , "
            f"or pass --checkpoint PATH")


def download(name: str, force: bool = False, *, timeout: float = CONNECT_TIMEOUT_S, log: Log = _stderr,
             progress: Optional[bool] = None) -> Path:
    """Download checkpoint ``name`` into the cache and return its path.

    An existing verified file is reused unless ``force``. The whole sequence runs under the download lock
    (a second downloader waits, then reuses the file). A ``.part`` file left by an interrupted download is
    resumed up to its last recorded checkpoint (``download.transfer``: own bytes only, sizes checked against
    the server's). The file gets its final name only after every check passes: DDPM, the published MD5;
    OpenAI (no published checksum), the server's size, then a weights-only load with the expected keys and
    shapes, and only then is its SHA-256 pinned (``# source: download``). A failed check deletes the download.
    """
    spec = get_spec(name)
    dest = cache_path(name)
    part = part_path(dest)
    if not spec.direct_download:
        if dest.exists() and not force:
            algo, digest = verify_checksum(name, dest, log=log)
            if algo == "sha256-unpinned":
                _check_loadable(name, dest, digest)
                _write_pin(dest, digest, log, source="first-use")
            return dest
        raise CheckpointError(_manual_message(spec, dest))
    label = Path(spec.filename).name
    with download_lock(dest, label=label, log=log):
        if force:
            for p in (dest, _pin_path(dest)):
                p.unlink(missing_ok=True)
            discard_part(part)
        elif dest.exists():
            algo, digest = verify_checksum(name, dest, log=log)
            if algo == "sha256-unpinned":
                _check_loadable(name, dest, digest)
                _write_pin(dest, digest, log, source="first-use")
            return dest
        size, total, sha = transfer(spec.url, part, label=label, timeout=timeout, log=log, progress=progress,
                                    offline=lambda reason: CheckpointError(_offline_message(spec, dest, reason)),
                                    checksum_follows=spec.md5 is not None)
        try:
            if spec.md5 is not None:
                algo, digest = verify_checksum(name, part, log=log)
            else:  # nothing published to compare with: the server's size (checked) and a full load
                algo, digest = _check_digest(spec, part, {"sha256": sha}, size)
                _check_loadable(name, part, sha)
        except CheckpointError as exc:
            discard_part(part)  # a corrupt download cannot be resumed
            raise CheckpointError(f"{exc} (downloaded from {spec.url}; the bad file was deleted)") from None
        old_pin = _read_pin(dest)
        if algo == "sha256-unpinned" and old_pin is not None and old_pin != digest:
            raise CheckpointError(
                f"checksum mismatch for {part}: SHA-256 is {digest}, expected {old_pin} (pinned in {_pin_path(dest)} "
                f"by an earlier download); use --force to discard the pin and download again")
        os.replace(part, dest)
        part_state_path(part).unlink(missing_ok=True)
        if algo == "sha256-unpinned":
            _write_pin(dest, digest, log, source=f"download {spec.url} {size}")
    log(f"downloaded {spec.name} to {dest} ({size:,} bytes, {algo.replace('-unpinned', '')} {digest})")
    return dest


def _check_loadable(name: str, path: Path, sha256: str) -> None:
    """Before a file without a published checksum is pinned: its bytes (the ones hashed) load weights-only
    into a state dict with exactly the keys and shapes of network ``name``."""
    data, digests = read_hashed(path, ("sha256",), what="checkpoint file")
    if digests["sha256"] != sha256:
        raise CheckpointError(f"{path} changed while it was checked (SHA-256 {digests['sha256']}, expected {sha256})")
    _checked_state_dict(name, data, path)


def _checked_state_dict(name: str, data: bytes, path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Network ``name`` on the meta device and the state dict of ``data`` (bytes read and hashed from
    ``path``), its keys and shapes checked against that network (CheckpointError otherwise)."""
    spec = get_spec(name)
    net = build_arch(spec.arch, spec.config, device="meta")  # parameters come from the file (assign)
    state_dict = load_state_dict_bytes(data, path, buffers=[k for k, _ in net.named_buffers()])
    check_state_dict(name, state_dict, source=str(path))
    return net, state_dict


def _assign(name: str, net: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    """Load a checked state dict into the meta network: float32 parameters (a half-precision file is upcast),
    buffers in their own dtype (ScoreSDE sigmas: float64); eval mode, no gradients."""
    dtypes = {k: v.dtype for k, v in net.state_dict().items()}
    try:
        net.load_state_dict({k: v.to(dtypes[k]) for k, v in state_dict.items()}, strict=True, assign=True)
    except RuntimeError as exc:  # check_state_dict should have caught it
        raise CheckpointError(f"{path} does not load into {name}: {' '.join(str(exc).split())[:500]}") from None
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ loading
def _numpy_scalar_globals() -> list:
    """The non-tensor pickle globals of a ScoreSDE training checkpoint (fixtures README part 2, "Pickle note").

    ``losses.optimization_manager`` stores the learning rate as a ``numpy.float64``, so the optimizer
    state pickles ``numpy.core.multiarray.scalar`` (numpy 1.x, the 2021 files) or
    ``numpy._core.multiarray.scalar`` (numpy >= 2) and ``numpy.dtype``. Allowing exactly these keeps
    ``weights_only=True``.
    """
    import numpy as np

    core = getattr(np, "_core", None)
    if core is None:  # numpy 1.x: the files' own spelling
        return [np.core.multiarray.scalar, np.dtype, np.dtypes.Float64DType]
    return [(core.multiarray.scalar, "numpy.core.multiarray.scalar"), core.multiarray.scalar, np.dtype,
            np.dtypes.Float64DType]


def _strip_module(sd: Mapping) -> dict:
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):  # DataParallel training checkpoints
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _ema_state_dict(obj: Mapping, path: Path, buffers: Collection[str]) -> dict[str, torch.Tensor]:
    """EMA weights of a ScoreSDE checkpoint by name, as ``restore_checkpoint`` + ``ema.copy_to`` use them.

    ``ema['shadow_params']`` is an unnamed list in ``model.parameters()`` order, i.e. the order of the
    raw ``model`` state dict without its buffers; the buffers (``sigmas``) come from ``model``.
    """
    import torch

    model, shadow = obj.get("model"), obj["ema"].get("shadow_params")
    if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path} has ema.shadow_params but no 'model' state dict to take the parameter "
                              f"names from: not the score_sde checkpoint layout {{'model', 'ema', 'optimizer', 'step'}}")
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in shadow):
        raise CheckpointError(f"{path}: ema.shadow_params must be a list of tensors, got {type(shadow).__name__}")
    named = _strip_module(model)
    names = [k for k in named if k not in buffers]
    if len(names) != len(shadow):
        raise CheckpointError(f"{path}: ema.shadow_params holds {len(shadow)} tensors but the model state dict has "
                              f"{len(names)} parameters (buffers excluded: {', '.join(sorted(buffers)) or 'none'})")
    for i, (k, v) in enumerate(zip(names, shadow)):
        if tuple(v.shape) != tuple(named[k].shape):
            raise CheckpointError(f"{path}: ema.shadow_params[{i}] has shape {list(v.shape)} but parameter {i} "
                                  f"({k}) has {list(named[k].shape)}: the EMA list is not in parameter order")
    ema = dict(zip(names, shadow))
    return {k: ema.get(k, v) for k, v in named.items()}


def load_state_dict_file(path: PathLike, *, buffers: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a checkpoint -> name -> tensor dict; else a CheckpointError.

    A plain state dict (optionally wrapped in ``state_dict``/``model``/``ema``, optionally ``module.``
    prefixed) is returned as is. A ScoreSDE training checkpoint (``ema`` holding ``shadow_params``)
    returns its EMA weights named after the ``model`` keys minus ``buffers``, plus those buffers.
    """
    data, _ = read_hashed(path, (), what="checkpoint file")
    return load_state_dict_bytes(data, Path(path), buffers=buffers)


def load_state_dict_bytes(data: bytes, path: PathLike, *, buffers: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """:func:`load_state_dict_file` of bytes already read (and hashed) from ``path``."""
    import torch

    path = Path(path)
    obj = load_weights_bytes(data, path, safe_globals=_numpy_scalar_globals())
    if isinstance(obj, Mapping) and isinstance(obj.get("ema"), Mapping) and "shadow_params" in obj["ema"]:
        return _ema_state_dict(obj, path, frozenset(buffers))
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "ema"):  # common wrappers
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors): "
                              f"got {type(obj).__name__}")
    return _strip_module(obj)


@functools.lru_cache(maxsize=None)
def _expected_shapes_of(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    spec = get_spec(name)
    net = build_arch(spec.arch, spec.config, device="meta")  # no memory, no initialisation
    return tuple((k, tuple(v.shape)) for k, v in net.state_dict().items())


def _expected_shapes(spec: CheckpointSpec) -> dict[str, tuple[int, ...]]:
    return dict(_expected_shapes_of(spec.name))


def _summarise(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ..." if len(keys) > n else shown


def check_state_dict(name: str, state_dict: Mapping[str, torch.Tensor], *, source: str = "the state dict") -> None:
    """Compare keys and shapes with the network ``name`` needs; raise a summarising CheckpointError."""
    spec = get_spec(name)
    expected = _expected_shapes(spec)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    not_float = [k for k, v in state_dict.items() if k in expected and not v.is_floating_point()]
    if not (missing or unexpected or mismatched or not_float):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_summarise(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_summarise(unexpected)})")
    if mismatched:
        shown = "; ".join(f"{k}: file {list(state_dict[k].shape)} vs expected {list(expected[k])}"
                          for k in mismatched[:3])
        parts.append(f"{len(mismatched)} shape mismatches ({shown}{'; ...' if len(mismatched) > 3 else ''})")
    if not_float:
        parts.append(f"{len(not_float)} non-floating tensors ({_summarise(not_float)})")
    hint = ""
    for other in CHECKPOINTS.values():
        if other.manifest == spec.manifest:
            continue
        shapes = _expected_shapes(other)
        if shapes.keys() == state_dict.keys() and all(tuple(state_dict[k].shape) == s for k, s in shapes.items()):
            fits = [c.name for c in CHECKPOINTS.values() if c.manifest == other.manifest]
            hint = f"; it looks like a checkpoint for {', '.join(fits)} ({other.arch})"
            break
    raise CheckpointError(
        f"{source} does not fit {spec.name} ({spec.arch}, {len(expected)} keys): {', '.join(parts)}{hint}")


def _resolve(name: str, checkpoint: Optional[PathLike], fetch: bool, log: Log) -> Path:
    spec = get_spec(name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path} (given for {spec.name})")
        return path
    path = cache_path(name)
    if path.is_file():
        return path
    if not fetch or not spec.direct_download:
        hint = spec.fetch_hint
        how = (f"Run `pfdiff-bench models download {spec.name}` or {hint}" if spec.direct_download
               else hint[:1].upper() + hint[1:])
        raise CheckpointError(f"{spec.name} is not in the cache: expected {path}. {how} and place the file there, "
                              f"or pass --checkpoint PATH")
    return download(name, log=log)


#: Model types whose weights come from the zoo (``model.checkpoint`` names a :data:`CHECKPOINTS` entry).
ZOO_MODEL_TYPES = ("ddpm", "adm", "ncsnpp")


def missing_checkpoints(cfg: Mapping, *, fetch: bool = False, log: Log = _stderr) -> list[str]:
    """Every checkpoint file a validated run config needs (UNet and, when guided, classifier) that is not
    on disk, each as one line saying what to fetch and where to put it; empty when all are there.

    ``fetch``: download the files that have a direct link first (``sample`` does, on rank 0), so only
    those that could not be fetched are listed. Both ``sampling/setup.preflight`` and
    ``reproduction/cells.blockers`` use this one check.
    """
    m, g = cfg["model"], cfg["guidance"]
    if m["type"] not in ZOO_MODEL_TYPES or m.get("random_weights"):
        return []
    wanted = [(m["checkpoint"], m["checkpoint_path"])]
    if float(g["scale"]) > 0 and g["classifier"]:
        wanted.append((g["classifier"], g["classifier_path"]))
    missing = []
    for name, path in wanted:
        if not name:
            continue
        spec = get_spec(name)
        where = Path(path).expanduser() if path else cache_path(name)
        if where.is_file():
            continue
        if fetch and not path and spec.direct_download:
            try:
                download(name, log=log)
                continue
            except CheckpointError as exc:  # offline or a bad transfer: its message says where to put the file
                missing.append(" ".join(str(exc).split()))
                continue
        how = f"run `pfdiff-bench models download {name}` or " if spec.direct_download and not path else ""
        given = " (the path given for it)" if path else ""
        missing.append(f"checkpoint {name} is missing: {how}{spec.fetch_hint} and place it at {where}{given}")
    return missing


def build_network(name: str, *, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The network of checkpoint ``name`` with random weights (official initialisation), in eval mode."""
    spec = get_spec(name)
    return build_arch(spec.arch, spec.config, device=device).eval()


def load_checkpoint(name: str, checkpoint: Optional[PathLike] = None,
                    device: Union[str, torch.device] = "cpu", fp16: bool = False, *, download: bool = True,
                    verify: bool = True, log: Log = _stderr) -> tuple[nn.Module, Path, str, str]:
    """`load_network` that also returns ``(net, path, checksum_algorithm, digest)``.

    ``checksum_algorithm`` is ``"md5"``, ``"sha256"`` (matched the pin), ``"sha256-unpinned"`` (no pin
    existed; it has been written now), ``"sha256-own"`` (an explicit ``checkpoint`` file that is not the
    published one: the user's own weights, checked by keys and shapes only) or ``"none"`` (``verify=False``).
    """
    spec = get_spec(name)
    if fp16 and spec.arch not in ("adm_unet", "adm_classifier"):
        raise ConfigError(f"fp16 is only available for the ADM networks, not {name} (the {spec.arch} network "
                          f"runs in float32 in its official code)")
    path = _resolve(name, checkpoint, download, log)
    # read once: the digest checked below is the digest of the very bytes that are unpickled (issue 10 item 6)
    algorithms = () if not verify else ("md5",) if spec.md5 is not None else ("sha256",)
    data, digests = read_hashed(path, algorithms, what="checkpoint file")
    try:
        algo, digest = _check_digest(spec, path, digests, len(data)) if verify else ("none", "")
    except CheckpointError as mismatch:
        if checkpoint is None:  # the zoo's own cached copy must match: it is corrupt
            raise
        not_published = str(mismatch)
        # a file the user passed that is not the published one: their own weights of this architecture,
        # accepted on its keys and shapes (checked below) and recorded by its SHA-256
        algo, digest = "sha256-own", hashlib.sha256(data).hexdigest()
    try:
        net, state_dict = _checked_state_dict(name, data, path)
        del data
    except CheckpointError as exc:
        if algo != "sha256-own":
            raise
        # neither the published file nor usable own weights: say both (a truncated download lands here)
        raise CheckpointError(f"{exc} ; and it is not the published checkpoint: {not_published}") from None
    if algo == "sha256-own":
        log(f"note: {path} is not the published {name} checkpoint: using it as your own weights of the {spec.arch} "
            f"architecture (keys and shapes checked; SHA-256 {digest[:16]}…); results are not the paper's checkpoint")
    net = _assign(name, net, state_dict, path)
    if algo == "sha256-unpinned":  # loaded with the expected keys and shapes: pin it (placed by hand)
        _write_pin(path, digest, log, source="first-use")
    net = net.to(device)
    if fp16:
        net.convert_to_fp16()
    return net, path, algo, digest


@dataclass
class VerifyResult:
    """What ``models verify`` found: ``ok`` only for a checksum match with a trustworthy reference."""

    path: Path
    ok: bool
    checksum: str                 # one line: algorithm, digest, what it was compared with
    problem: Optional[str]        # why the file is not verified (None when ok)
    sha256: str
    net: Optional[nn.Module] = field(default=None, repr=False)  # loaded network, when its keys and shapes fit


def verify_file(name: str, checkpoint: Optional[PathLike] = None, *, load: bool = True,
                log: Log = _stderr) -> VerifyResult:
    """Check a checkpoint file's identity, never by running it. Writes no pin.

    OK means: the MD5 of the bytes equals the published one (DDPM), or (no checksum published) their
    SHA-256 equals a pin written when the file was downloaded from the official URL with the server's size
    and loaded with the expected keys and shapes. Not OK: any mismatch, no pin, or a first-use pin (it shows
    only that the file has not changed since it was first loaded, not that it is the published file). A
    random or all-zero network in the right format is therefore not OK. With ``load``, the same bytes are
    then loaded weights-only and their keys and shapes checked (a failure makes the result not OK).
    """
    spec = get_spec(name)
    path = _resolve(name, checkpoint, False, log)
    data, digests = read_hashed(path, ("md5", "sha256") if spec.md5 is not None else ("sha256",),
                                what="checkpoint file")
    sha = digests["sha256"]
    problem: Optional[str] = None
    redo = (f"`pfdiff-bench models download {spec.name} --force` fetches the official file and pins it"
            if spec.direct_download else f"compare its SHA-256 with that of a copy you trust ({spec.fetch_hint})")
    if spec.md5 is not None:
        line = f"md5 {digests['md5']}"
        if digests["md5"] == spec.md5:
            line += f" (the published MD5 of {spec.name})"
        else:
            problem = (f"its MD5 {digests['md5']} is not the published {spec.md5}: this is not the published "
                       f"{spec.name} checkpoint")
    else:
        pinned, source = _read_pin(path), pin_source(path)
        line = f"sha256 {sha}"
        if pinned is None:
            problem = (f"no checksum is published for {spec.name} and {_pin_path(path)} does not exist: nothing to "
                       f"compare it with (a loadable file of the right shapes proves nothing); {redo}")
        elif pinned != sha:
            problem = (f"its SHA-256 {sha} differs from {pinned} pinned in {_pin_path(path)}: the file is truncated "
                       f"or altered")
        elif source != "download":
            problem = (f"no checksum is published for {spec.name}; its SHA-256 matches only the pin written at its "
                       f"first use (a file placed by hand), which shows it is unchanged since, not that it is the "
                       f"published file; {redo}")
        else:
            line += " (no checksum is published; matches the pin written when it was downloaded from the official URL)"
    net = None
    if load:
        try:
            net, sd = _checked_state_dict(name, data, path)
            del data
            net = _assign(name, net, sd, path)
        except (CheckpointError, RuntimeError) as exc:
            net = None
            problem = problem or " ".join(str(exc).split())[:500]
    return VerifyResult(path, problem is None, line, problem, sha, net)


def load_network(name: str, checkpoint: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                 fp16: bool = False, *, download: bool = True, verify: bool = True,
                 log: Log = _stderr) -> nn.Module:
    """Load the pretrained network ``name`` (eval mode, parameters without gradients).

    ``checkpoint``: an explicit file; otherwise the cache copy, downloaded first if missing and
    ``download``. ``verify``: check the published MD5 or the pinned SHA-256 (pinned now if absent).
    ``fp16``: ADM only, run the torso convolutions in float16 as the official sampling scripts do.
    """
    return load_checkpoint(name, checkpoint, device, fp16, download=download, verify=verify, log=log)[0]


def eps_model(name: str, checkpoint: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
              fp16: bool = False, **kwargs):
    """A NoisePredictor (``eps(x, t, y=None)``) for checkpoint ``name`` (see models/base.py)."""
    from pfdiff_bench.models.adapters import ADMEps, DDPMEps, NCSNppEps

    spec = get_spec(name)
    if spec.role != "eps":
        raise ConfigError(f"{name} is a classifier, not a noise-prediction model")
    net = load_network(name, checkpoint, device=device, fp16=fp16, **kwargs)
    return {"ddpm_unet": DDPMEps, "ncsnpp": NCSNppEps}.get(spec.arch, ADMEps)(net)


def classifier_grad(name: str = "adm_classifier64", checkpoint: Optional[PathLike] = None,
                    device: Union[str, torch.device] = "cpu", **kwargs):
    """A ClassifierGrad (``grad_log_p(x, t, y)``) for classifier checkpoint ``name``."""
    from pfdiff_bench.models.adapters import ADMClassifierGrad

    spec = get_spec(name)
    if spec.role != "classifier":
        raise ConfigError(f"{name} is a noise-prediction model, not a classifier")
    return ADMClassifierGrad(load_network(name, checkpoint, device=device, **kwargs))
