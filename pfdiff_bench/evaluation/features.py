"""Inception features and their statistics (spec CHECKPOINTS.md §3): weights per FID tool, streaming float64
mean/covariance, IS accumulators, batch readers for arrays and npz files.


Two tools (:mod:`pfdiff_bench.evaluation.tools`, issue 12): ``torch-fidelity`` (default; below) and
``pytorch-fid`` (:mod:`pfdiff_bench.evaluation.tools.pytorch_fid`: PyTorch bilinear resize, FID only).
Every result records the tool, its version, weights SHA-256, resize, reference and quantisation.

torch-fidelity pipeline (the TF-compatible one of torch-fidelity 0.4 and of OpenAI's ADM evaluator, spec CHECKPOINTS.md §3):
uint8 NHWC batches -> NCHW uint8 on the device -> torch-fidelity's ``FeatureExtractorInceptionV3`` (TF1
bilinear resize to 299, ``(x-128)/128``, Inception 2015-12-05) -> ``"2048"`` pool features (FID) and
``"logits_unbiased"`` 1008-way logits without the fc bias (IS). No PNG round trip.

* FID: mean and covariance of the 2048-d features are accumulated in float64 with a pairwise
  (Chan et al.) merge of per-batch means and centred scatter matrices, so any number of batches of any
  size gives the same statistics; the covariance uses the ``n-1`` denominator (``np.cov``). The distance
  to the reference ``mu``/``sigma`` is :func:`pfdiff_bench.evaluation.frechet.frechet_distance` (float64).
* IS: ``exp(E_x KL(p(y|x) || p(y)))`` per split, splits being **consecutive, unshuffled** chunks of 5,000
  samples in index order, as ``evaluations/evaluator.py`` of openai/guided-diffusion does (10 splits at
  50k). A final chunk shorter than 5,000 is its own split, as in ADM; fewer than 5,000 samples give one
  split. The reported value is the mean over splits, ``std`` is ``np.std`` over splits (0 for one split).
  torch-fidelity's ``calculate_metrics(isc_splits=N//5000, samples_shuffle=False)`` gives the same
  numbers when N is a multiple of 5,000.
* Inception weights (per tool; torch-fidelity's shown): ``weights-inception-2015-12-05-6726825d.pth``, taken from
  ``--inception-weights PATH`` or from ``$TORCH_HOME/hub/checkpoints/`` (torch.hub's cache, which
  torch-fidelity itself uses), downloaded there only when the host is reachable. Its SHA-256 must equal
  :data:`INCEPTION_SHA256`; any other file (e.g. random weights in tests) is refused unless
  ``trust_weights=True`` (CLI ``--trust-weights``). Files are loaded with ``weights_only=True``; only the
  pinned official file may fall back to full unpickling (its hash is known).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from pfdiff_bench.download import fetch_file, file_sha256  # noqa: F401 - re-exported
from pfdiff_bench.evaluation.tools import DOWNLOAD_TIMEOUT_S, FEATURE_DIM, InceptionWeights
from pfdiff_bench.errors import PFDiffError

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]

EXTRACTOR_NAME = "inception-v3-compat"
FID_LAYER = "2048"
IS_LAYER = "logits_unbiased"
PROTOCOL_SAMPLES = 50_000  #: the papers' protocol (FID-50k); fewer samples get a label such as "FID-10k"
IS_SPLIT_SIZE = 5_000  #: ADM evaluator's split size
#: Floor of FID / IS / KID / precision-recall (issue 10 item 8): the Inception pool feature dimension. Below it
#: the sample covariance is singular and the value mostly measures the sample size; computing one anyway needs
#: ``allow_small`` (CLI ``--allow-small``) and the result is labelled ``small_sample``.
MIN_IMAGES = FEATURE_DIM
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch_fidelity.feature_extractor_inceptionv3
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
#: SHA-256 of the official file (prefix 6726825d is torch.hub's hash-in-name; the full value is as reported
#: by third parties, spec CHECKPOINTS.md §3b). A mismatch is refused unless trust_weights=True.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def torch_fidelity_version() -> str:
    try:
        import torch_fidelity

        return str(torch_fidelity.__version__)
    except Exception:  # pragma: no cover - dependency missing
        return "unavailable"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_floor(n: int, what: str = "FID/IS", *, allow_small: bool = False, source: str = "") -> bool:
    """Refuse ``what`` on fewer than :data:`MIN_IMAGES` images unless ``allow_small``; True when ``n`` is below
    the floor (and allowed), i.e. when the result must carry the ``small_sample`` label."""
    if n >= MIN_IMAGES:
        return False
    if not allow_small:
        of = f" of {source}" if source else ""
        raise PFDiffError(f"{what} on {n} images{of} refused: it needs at least {MIN_IMAGES:,} images (the Inception "
                          f"feature dimension; the protocol is {PROTOCOL_SAMPLES:,}); pass --allow-small "
                          f"(allow_small=True) to compute it anyway, labelled small-sample")
    return True


# ---------------------------------------------------------------------------------- Inception weights
# The per-tool weights, pins and extractors live in pfdiff_bench.evaluation.tools; these wrappers keep the
# torch-fidelity defaults of the functions other modules call.
def inception_cache_path(tool: Optional[str] = None) -> Path:
    """Where the tool (torch.hub) looks for its weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    from pfdiff_bench.evaluation.tools import get_tool

    return get_tool(tool).cache_path()


def resolve_inception_weights(weights: Optional[PathLike] = None, *, tool: Optional[str] = None,
                              trust_weights: bool = False, download: bool = True,
                              timeout: float = DOWNLOAD_TIMEOUT_S, log: Log = _stderr) -> InceptionWeights:
    """Find and verify the tool's Inception weights file (explicit path, else torch.hub cache, else download)."""
    from pfdiff_bench.evaluation.tools import resolve_weights

    return resolve_weights(tool, weights, trust_weights=trust_weights, download=download, timeout=timeout, log=log)


def load_inception(weights: Optional[PathLike] = None, *, tool: Optional[str] = None, trust_weights: bool = False,
                   device: Union[str, torch.device, None] = None, download: bool = True,
                   log: Log = _stderr) -> tuple[torch.nn.Module, InceptionWeights]:
    """The tool's extractor: uint8 NCHW -> ``(pool features, IS logits or None)``; default torch-fidelity's
    ``FeatureExtractorInceptionV3`` with features ("2048", "logits_unbiased")."""
    from pfdiff_bench.evaluation.tools import load_extractor

    return load_extractor(tool, weights, trust_weights=trust_weights, device=device, download=download, log=log)


# ----------------------------------------------------------------------------------- accumulators
class FeatureStats:
    """Streaming float64 mean and covariance (``n-1`` denominator) of feature vectors."""

    def __init__(self, dim: int = 2048):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        x = feats.detach().to("cpu", torch.float64).reshape(feats.shape[0], -1)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        n = self.n + nb
        delta = mb - self.mean
        self.m2 += m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def all_reduce(self, device: Union[str, torch.device, None] = None) -> None:
        """Merge the statistics of every torchrun rank in place (no-op without a process group).

        As EDM's ``fid.py``: the sums of x and x xᵀ and the count are all-reduced in float64 (``device``:
        where the collective runs, the rank's CUDA device under NCCL), then the mean and the centred
        scatter are recovered; the result equals a one-process pass over all features to round-off.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        d = self.mean.numel()
        s1 = self.mean * self.n
        s2 = self.m2 + torch.outer(self.mean, self.mean) * self.n
        buf = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), s1, s2.reshape(-1)])
        buf = buf.to(device or "cpu")
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        buf = buf.cpu()
        n = int(round(float(buf[0])))
        if n == 0:
            return
        mean = buf[1:1 + d] / n
        self.m2 = buf[1 + d:].reshape(d, d) - torch.outer(mean, mean) * n
        self.mean, self.n = mean, n

    @property
    def mu(self) -> np.ndarray:
        return self.mean.numpy().copy()

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise PFDiffError(f"a covariance needs at least 2 samples, got {self.n}")
        return (self.m2 / (self.n - 1)).numpy()


class InceptionScoreAccumulator:
    """Streaming IS over consecutive, unshuffled splits of ``split_size`` samples (ADM evaluator)."""

    def __init__(self, split_size: int = IS_SPLIT_SIZE):
        self.split_size = split_size
        self.scores: list[float] = []
        self.n = 0
        self._reset()

    def _reset(self) -> None:
        self._k = 0
        self._sum_p: Optional[torch.Tensor] = None
        self._sum_plogp = 0.0

    def _close(self) -> None:
        q = self._sum_p / self._k
        kl = self._sum_plogp / self._k - float((q * q.log()).sum())
        self.scores.append(math.exp(kl))
        self._reset()

    def update(self, logits: torch.Tensor) -> None:
        logits = logits.detach().to("cpu", torch.float64)
        while logits.shape[0]:
            take = min(self.split_size - self._k, logits.shape[0])
            chunk, logits = logits[:take], logits[take:]
            p, logp = chunk.softmax(1), chunk.log_softmax(1)
            self._sum_p = p.sum(0) if self._sum_p is None else self._sum_p + p.sum(0)
            self._sum_plogp += float((p * logp).sum())
            self._k += take
            self.n += take
            if self._k == self.split_size:
                self._close()

    def result(self) -> tuple[float, float, int]:
        """``(mean, std, number of splits)``; a trailing partial split is closed here."""
        scores = list(self.scores)
        if self._k:
            q = self._sum_p / self._k
            scores.append(math.exp(self._sum_plogp / self._k - float((q * q.log()).sum())))
        if not scores:
            raise PFDiffError("no samples to compute the Inception Score of")
        return float(np.mean(scores)), float(np.std(scores)), len(scores)


# ---------------------------------------------------------------------------------- extraction
def _as_nhwc_uint8(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):  # (images, labels)
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch.get("images", batch.get("x"))
    x = torch.as_tensor(batch)
    if x.dtype != torch.uint8:
        raise PFDiffError(f"image batches must be uint8 NHWC, got dtype {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4 or x.shape[-1] not in (1, 3):
        raise PFDiffError(f"image batches must be uint8 NHWC with 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    return x


@torch.no_grad()
def extract(batches: Iterable, extractor: torch.nn.Module, *, fid: bool = True, isc: bool = True,
            progress: Optional[bool] = False, total: Optional[int] = None, allow_empty: bool = False,
            keep: Optional[list] = None) -> tuple[Optional[FeatureStats], Optional[InceptionScoreAccumulator]]:
    """Run the extractor over uint8 NHWC batches (tensors, arrays, or ``(images, labels)`` tuples).

    ``allow_empty``: no batches is not an error (a torchrun rank whose share of a run is empty).
    ``keep``: a list that receives every batch's pool features (float32, CPU), for KID and precision/recall."""
    from tqdm import tqdm

    stats = FeatureStats(2048) if fid else None
    isc_acc = InceptionScoreAccumulator() if isc else None
    dev = next(extractor.parameters()).device
    with tqdm(total=total, unit="img", desc="inception", disable=(not progress) if progress is not None else None,
              file=sys.stderr, leave=False) as bar:
        for batch in batches:
            x = _as_nhwc_uint8(batch)
            if x.shape[0] == 0:
                continue
            x = x.permute(0, 3, 1, 2).contiguous().to(dev, non_blocking=True)
            feats, logits = extractor(x)
            if keep is not None:
                keep.append(feats.detach().to("cpu", torch.float32))
            if stats is not None:
                stats.update(feats)
            if isc_acc is not None:
                if logits is None:
                    raise PFDiffError("this FID tool's extractor gives no IS logits")
                isc_acc.update(logits)
            bar.update(x.shape[0])
    n = stats.n if stats is not None else (isc_acc.n if isc_acc is not None else sum(len(f) for f in keep or []))
    if n == 0 and not allow_empty:
        raise PFDiffError("no images to evaluate")
    return stats, isc_acc


def iter_array_batches(images: Union[np.ndarray, torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of an in-memory uint8 NHWC array."""
    for i in range(0, len(images), batch_size):
        yield torch.as_tensor(np.asarray(images[i:i + batch_size]))


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    major, _ = fmt.read_magic(f)
    read = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
    return read(f)


_NPZ_FORMAT = "an .npz (zip) whose arr_0 holds uint8 NHWC images (the ADM sample format, as `pfdiff-bench export` writes)"


def _npz_images(zf, path: Path, key: str):
    """``(member, shape)`` of the image array ``key`` of an open npz; one-line errors otherwise."""
    member = f"{key}.npy"
    if member not in zf.namelist():
        arrays = ", ".join(n[:-4] for n in zf.namelist() if n.endswith(".npy")) or "none"
        raise PFDiffError(f"{path} has no array {key!r} (arrays in it: {arrays}); expected {_NPZ_FORMAT}")
    with zf.open(member) as f:
        try:
            shape, fortran, dtype = _npy_header(f)
        except ValueError as exc:
            raise PFDiffError(f"{path}:{key} is not a readable .npy array ({' '.join(str(exc).split())[:120]}); "
                              f"expected {_NPZ_FORMAT}") from None
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[-1] not in (1, 3):
        raise PFDiffError(f"{path}:{key} must be a C-ordered uint8 NHWC array with 1 or 3 channels, got {dtype} "
                          f"{shape}{' (Fortran order)' if fortran else ''}")
    return member, shape


def _open_npz(path: Path):
    import zipfile

    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PFDiffError(f"cannot read {path}: not an .npz file ({exc}); expected {_NPZ_FORMAT}") from None


def iter_npz_batches(path: PathLike, batch_size: int, key: str = "arr_0") -> Iterator[torch.Tensor]:
    """Stream ``arr_0`` (uint8 NHWC, the ADM sample format) of an ``.npz`` without loading it whole."""
    path = Path(path)
    with _open_npz(path) as zf:
        member, shape = _npz_images(zf, path, key)
        with zf.open(member) as f:
            _npy_header(f)
            per = int(np.prod(shape[1:]))
            for i in range(0, shape[0], batch_size):
                k = min(batch_size, shape[0] - i)
                buf = f.read(k * per)
                if len(buf) != k * per:
                    raise PFDiffError(f"{path}:{key} is truncated")
                yield torch.from_numpy(np.frombuffer(buf, np.uint8).reshape(k, *shape[1:]).copy())


def npz_num_images(path: PathLike, key: str = "arr_0") -> int:
    """Number of images in ``arr_0`` of an ``.npz`` (header only); one-line errors for anything else."""
    path = Path(path)
    with _open_npz(path) as zf:
        return int(_npz_images(zf, path, key)[1][0])


def feature_statistics(batches: Iterable, *, fid_tool: Optional[str] = None,
                       inception_weights: Optional[PathLike] = None,
                       trust_weights: bool = False, device=None, download: bool = True,
                       progress: Optional[bool] = False, total: Optional[int] = None,
                       log: Log = _stderr) -> tuple[np.ndarray, np.ndarray, int, InceptionWeights]:
    """``(mu, sigma, n, weights)`` of the 2048-d Inception features of uint8 NHWC ``batches`` (float64)."""
    net, w = load_inception(inception_weights, tool=fid_tool, trust_weights=trust_weights, device=device,
                            download=download, log=log)
    stats, _ = extract(batches, net, fid=True, isc=False, progress=progress, total=total)
    return stats.mu, stats.sigma, stats.n, w
