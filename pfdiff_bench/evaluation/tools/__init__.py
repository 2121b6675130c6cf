"""Registry of FID tools: name -> weights file, pin, cache path, resize, and the module that builds the extractor.

The paper did not use one FID tool (issue 12, spec PAPER.md "Protocol per experiment"): ImageNet-64 was
evaluated with ADM's TensorFlow evaluator, which torch-fidelity's ``inception-v3-compat`` reproduces (TF1
resize, same graph; spec CHECKPOINTS.md §3b), CIFAR-10 DDPM and LSUN with pytorch-fid (PyTorch bilinear
resize, ``align_corners=False``). Both use the Inception 2015-12-05 weights, each in its own file.

An extractor built by a tool's ``build_extractor(state_dict)`` takes uint8 NCHW images on its device and
returns ``(pool features (N, 2048), IS logits without the fc bias (N, 1008) or None)``.

Weights are looked up as before (``--inception-weights PATH``, else the tool's usual cache
``$TORCH_HOME/hub/checkpoints/<file>``, else downloaded when reachable) and checked against the tool's
pin: the full SHA-256 where one is known, otherwise the 8-hex SHA-256 prefix in the file name (torch.hub's
``check_hash`` convention). Any other file is refused unless ``trust_weights``. Files load with
``weights_only=True`` from the very bytes that were hashed (never ``weights_only=False``).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from pfdiff_bench.errors import CheckpointError, ConfigError

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]
DOWNLOAD_TIMEOUT_S = 5.0
DEFAULT_TOOL = "torch-fidelity"
FEATURE_DIM = 2048  #: pool-3 feature dimension of both tools' Inception-v3 (mu (D,), sigma (D, D))


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class FidTool:
    name: str
    module: str                     # pfdiff_bench.evaluation.tools.<x>: build_extractor(state_dict)
    package: str                    # the Python package whose version is recorded
    extractor: str                  # what the features are, as recorded in results
    weights_filename: str
    weights_url: str
    weights_sha256: Optional[str]   # full pin, where one is known
    weights_sha256_prefix: str      # torch.hub's hash-in-name prefix
    resize: str                     # how images reach 299x299 (recorded with every result and reference)
    family: str                     # preprocessing family: references of another family make a mixed protocol
    supports_is: bool

    def cache_path(self) -> Path:
        """The tool's own cache: torch.hub's ``$TORCH_HOME/hub/checkpoints/<file>`` (both tools use it)."""
        import torch

        return Path(torch.hub.get_dir()) / "checkpoints" / self.weights_filename

    def version(self) -> str:
        try:
            return str(importlib.import_module(self.package).__version__)
        except Exception:  # pragma: no cover - dependency missing
            return "unavailable"

    def official(self, sha256: str) -> bool:
        return sha256 == self.weights_sha256 if self.weights_sha256 else sha256.startswith(self.weights_sha256_prefix)

    def pin_text(self) -> str:
        return self.weights_sha256 or f"{self.weights_sha256_prefix}… (torch.hub hash prefix; no full SHA-256 published)"


TOOLS: dict[str, FidTool] = {t.name: t for t in [
    FidTool("torch-fidelity", "pfdiff_bench.evaluation.tools.torch_fidelity", "torch_fidelity", "inception-v3-compat",
            "weights-inception-2015-12-05-6726825d.pth",
            "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
            # full value as reported by third parties, spec CHECKPOINTS.md §3b
            "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2", "6726825d",
            "TF1-compatible bilinear resize to 299 on uint8, (x-128)/128 (ADM evaluator / TTUR graph)", "tf1", True),
    FidTool("pytorch-fid", "pfdiff_bench.evaluation.tools.pytorch_fid", "pytorch_fid", "pytorch_fid.InceptionV3[2048]",
            "pt_inception-2015-12-05-6726825d.pth",
            "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
            # CHECKPOINTS.md §3b gives no full SHA-256 for this file (same suffix, "very likely the same file")
            None, "6726825d",
            "F.interpolate(bilinear, align_corners=False) to 299 on x/255, then 2x-1 (pytorch-fid)", "pytorch-fid",
            False),
]}

#: producers of reference statistics that are not tools here, and their preprocessing family
EXTERNAL_PRODUCERS: dict[str, tuple[str, str]] = {
    "adm-tf": ("tf1", "ADM evaluator (TF1 graph, its ResizeBilinear to 299)"),
    "ttur-tf": ("tf1", "TTUR fid.py (TF1 graph, its ResizeBilinear to 299)"),
    "clean-fid-legacy-tf": ("tf1", "clean-fid legacy_tensorflow mode (TF1-compatible resize)"),
    "tf-gan": ("tf-gan", "TF-GAN (ScoreSDE evaluation.py: tf.image.resize bilinear to 299, TF2 half-pixel)"),
}


def get_tool(name: Optional[str]) -> FidTool:
    if name is None:
        name = DEFAULT_TOOL
    try:
        return TOOLS[name]
    except KeyError:
        raise ConfigError(f"unknown FID tool {name!r}; accepted: {', '.join(TOOLS)}") from None


def producer_info(producer: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``(preprocessing family, resize)`` of a tool or reference producer, one registry lookup; ``(None, None)``
    when unknown."""
    if producer in TOOLS:
        t = TOOLS[producer]
        return t.family, t.resize
    return EXTERNAL_PRODUCERS.get(producer, (None, None))


def family_of(producer: Optional[str]) -> Optional[str]:
    """Preprocessing family of a tool or reference producer; None when unknown."""
    return producer_info(producer)[0]


# ---------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class InceptionWeights:
    path: Path
    sha256: str
    official: bool  # matches the tool's pin
    tool: str = DEFAULT_TOOL


def resolve_weights(tool: Union[str, FidTool, None] = None, weights: Optional[PathLike] = None, *,
                    trust_weights: bool = False, download: bool = True, timeout: float = DOWNLOAD_TIMEOUT_S,
                    log: Log = _stderr) -> InceptionWeights:
    """Find and verify a tool's Inception weights (explicit path, else torch.hub cache, else download)."""
    from pfdiff_bench.download import fetch_file, file_sha256

    t = tool if isinstance(tool, FidTool) else get_tool(tool)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise CheckpointError(f"Inception weights file not found: {path} (given with --inception-weights)")
    else:
        path = t.cache_path()
        if not path.is_file():
            if not download:
                raise CheckpointError(f"Inception weights not found: place {t.weights_url} at {path} or pass "
                                      f"--inception-weights PATH")
            fetch_file(t.weights_url, path, sha256=None if trust_weights else t.weights_sha256,
                       sha256_prefix=None if trust_weights or t.weights_sha256 else t.weights_sha256_prefix,
                       what=f"the Inception-v3 weights ({t.name})", timeout=timeout, log=log,
                       hint=f" ({t.name}'s torch.hub cache, $TORCH_HOME/hub/checkpoints), "
                            "or pass --inception-weights PATH")
    digest = file_sha256(path)
    official = t.official(digest)
    if not official:
        if not trust_weights:
            raise CheckpointError(
                f"Inception weights {path} have SHA-256 {digest}, not the pinned {t.pin_text()} of "
                f"{t.weights_filename} ({t.weights_url}); refusing to use them with --fid-tool {t.name}. Pass "
                f"--trust-weights to use this file anyway (its FID/IS are then not comparable with published numbers)")
        log(f"note: using unverified Inception weights {path} (sha256 {digest}; --trust-weights)")
    return InceptionWeights(path, digest, official, t.name)


def load_state_dict(w: InceptionWeights) -> dict:
    """Load exactly the bytes whose SHA-256 was checked: read once, hash, ``torch.load(BytesIO, weights_only=True)``.

    A file swapped after :func:`resolve_weights` hashed it is refused (its hash differs), and nothing is
    ever unpickled with ``weights_only=False`` (issue 10 item 6)."""
    import torch

    from pfdiff_bench.download import load_weights_bytes, read_hashed  # the zoo's checkpoints load the same way

    data, digests = read_hashed(w.path, ("sha256",), what="Inception weights")
    digest = digests["sha256"]
    if digest != w.sha256:
        raise CheckpointError(f"{w.path} changed after it was verified (sha256 {digest}, verified {w.sha256}); "
                              f"refusing to load it")
    sd = load_weights_bytes(data, w.path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{w.path} is not a state dict of tensors")
    return sd


_EXTRACTORS: dict = {}


def load_extractor(tool: Union[str, FidTool, None] = None, weights: Optional[PathLike] = None, *,
                   trust_weights: bool = False, device=None, download: bool = True, log: Log = _stderr):
    """``(extractor, InceptionWeights)`` of a tool; the last one built is kept for reuse."""
    import torch

    t = tool if isinstance(tool, FidTool) else get_tool(tool)
    w = resolve_weights(t, weights, trust_weights=trust_weights, download=download, log=log)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    key = (t.name, str(w.path), w.sha256, str(dev))
    if key in _EXTRACTORS:
        return _EXTRACTORS[key], w
    sd = load_state_dict(w)
    try:
        net = importlib.import_module(t.module).build_extractor(sd)
    except RuntimeError as exc:  # load_state_dict(strict) failed: wrong network
        raise CheckpointError(f"{w.path} does not fit {t.name}'s Inception-v3: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    net = net.to(dev).eval().requires_grad_(False)
    _EXTRACTORS.clear()
    _EXTRACTORS[key] = net
    return net, w
