"""FID and Inception Score results (the high-level API): one pass over uint8 batches -> result dicts with
the full protocol (tool, weights, reference, resize, quantisation, sample count). See :mod:`.features`."""

from __future__ import annotations

import os
from typing import Iterable, Optional, Union

import numpy as np
import torch

from pfdiff_bench.errors import CheckpointError, PFDiffError
from pfdiff_bench.evaluation.features import (FID_LAYER, IS_LAYER, MIN_IMAGES, PROTOCOL_SAMPLES,  # noqa: F401
                                              FeatureStats, InceptionScoreAccumulator, Log, PathLike, _stderr,
                                              check_floor, extract, feature_statistics, load_inception)
from pfdiff_bench.evaluation.frechet import frechet_distance
from pfdiff_bench.evaluation.tools import InceptionWeights


#: what ``reproduce --metrics`` accepts; pytorch-fid computes FID only (its InceptionV3 has no classifier, and
#: KID / precision-recall are torch-fidelity's own implementations, run here on torch-fidelity's features)
METRICS = ("fid", "is", "prc", "kid")
METRICS_BY_TOOL = {"torch-fidelity": METRICS, "pytorch-fid": ("fid",)}
#: torch-fidelity 0.4's defaults (torch_fidelity/defaults.py), passed explicitly so a cached value names them;
#: the KID subset size is min(kid_subset_size, samples, reference samples) (torch-fidelity refuses fewer)
KID_OPTIONS = {"kid_subsets": 100, "kid_subset_size": 1000, "kid_kernel": "poly", "kid_kernel_poly_degree": 3,
               "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1, "rng_seed": 2020}
PRC_OPTIONS = {"prc_neighborhood": 3, "prc_batch_size": 10000, "save_cpu_ram": False}
#: the values a metric's result gives a table (column names); prc gives two
METRIC_FIELDS = {"fid": ("fid",), "is": ("is",), "kid": ("kid",), "prc": ("precision", "recall")}


_REF_FEATURES: dict = {}  # (reference sha256, weights sha256, tool) -> the reference's pool features


def parse_metrics(text: Optional[str], fid_tool: Optional[str]) -> list[str]:
    """``"fid,is,prc,kid"`` -> the metric list (FID first), refusing names or combinations the tool lacks."""
    from pfdiff_bench.errors import ConfigError
    from pfdiff_bench.evaluation.tools import get_tool

    tool = get_tool(fid_tool).name
    names = [m.strip().lower() for m in str(text or "").split(",") if m.strip()]
    ok = METRICS_BY_TOOL.get(tool, ("fid",))
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ConfigError(f"--metrics: unknown metric(s) {', '.join(bad) or '(none)'}; accepted: {', '.join(METRICS)}")
    if "fid" not in names:
        raise ConfigError(f"--metrics must include fid (the table's metric); accepted: {', '.join(ok)}")
    other = [m for m in names if m not in ok]
    if other:
        raise ConfigError(f"--metrics {','.join(other)} not available with --fid-tool {tool}; accepted with {tool}: "
                          f"{', '.join(ok)} (the others need torch-fidelity)")
    return ["fid"] + [m for m in dict.fromkeys(names) if m != "fid"]


def metric_values(metric: str, entry: dict) -> dict:
    """The table values of one result entry: {column: value}."""
    if metric == "prc":
        return {"precision": entry.get("precision"), "recall": entry.get("recall")}
    return {metric: entry.get("value")}


def kid_result(feats: torch.Tensor, ref_feats: torch.Tensor, w: InceptionWeights, ref, device="cpu", *,
               quantization: Optional[str] = None) -> dict:
    """KID through torch-fidelity's own ``kid_features_to_metric`` (unbiased MMD², cubic polynomial kernel,
    mean and std over random subsets, its numpy RandomState seeded with ``rng_seed``)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    opts = dict(KID_OPTIONS, kid_subset_size=min(KID_OPTIONS["kid_subset_size"], len(feats), len(ref_feats)))
    if opts["kid_subset_size"] < 2:
        raise PFDiffError(f"KID needs at least 2 samples and 2 reference samples (got {len(feats)}, {len(ref_feats)})")
    m = kid_features_to_metric(feats, ref_feats, verbose=False, **opts)  # float32, as torch-fidelity passes them
    out = {"metric": "kid", "label": sample_label("kid", len(feats)), "value": m[KEY_METRIC_KID_MEAN],
           "std": m[KEY_METRIC_KID_STD], "kid_subset_size_used": opts["kid_subset_size"], **KID_OPTIONS,
           "feature_layer": FID_LAYER, **_ref_fields(ref, len(ref_feats))}
    out.update(_common(w, len(feats), device, quantization))
    return out


def prc_result(feats: torch.Tensor, ref_feats: torch.Tensor, w: InceptionWeights, ref, device="cpu", *,
               quantization: Optional[str] = None) -> dict:
    """Precision and recall (Kynkäänniemi et al. 2019) through torch-fidelity's ``prc_features_to_metric``
    (k = 3 nearest neighbours; generated = input 1, reference = input 2) on the same Inception pool features
    as FID, as ADM's evaluator computes them for ImageNet; torch-fidelity's own default for ``prc`` is
    VGG-16 ``fc2_relu`` features (``feature_extractor="inception-v3-compat", feature_layer_prc="2048"`` in
    ``calculate_metrics`` gives ours)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    m = prc_features_to_metric(feats, ref_feats, verbose=False, **PRC_OPTIONS)
    out = {"metric": "prc", "label": sample_label("prc", len(feats)), "value": m["precision"],
           "precision": m["precision"], "recall": m["recall"], "f_score": m["f_score"], **PRC_OPTIONS,
           "feature_layer": FID_LAYER, **_ref_fields(ref, len(ref_feats))}
    out.update(_common(w, len(feats), device, quantization))
    return out


def _ref_fields(ref, n: int) -> dict:
    return {"reference": getattr(ref, "name", "custom"), "reference_sha256": getattr(ref, "sha256", None),
            "reference_format": getattr(ref, "fmt", None), "reference_samples": n}


def sample_label(metric: str, n: int) -> str:
    """"FID" at the 50k protocol, otherwise e.g. "FID-10k" (or "FID-1234")."""
    base = {"fid": "FID", "is": "IS", "kid": "KID", "prc": "P/R"}[metric]
    if n == PROTOCOL_SAMPLES:
        return base
    return f"{base}-{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{base}-{n}"


def small_sample(n: int, ref=None) -> bool:
    """Whether a result of ``n`` samples (against ``ref``) is below the :data:`MIN_IMAGES` floor, on either side."""
    ref_n = getattr(ref, "num_samples", None)
    return n < MIN_IMAGES or (ref_n is not None and ref_n < MIN_IMAGES)


def _check_ref_floor(ref, allow_small: bool) -> None:
    ref_n = getattr(ref, "num_samples", None)
    if ref_n is not None:
        check_floor(ref_n, "an FID reference", allow_small=allow_small,
                    source=f"reference {getattr(ref, 'name', '?')} ({getattr(ref, 'path', None) or 'in memory'})")


def _common(w: InceptionWeights, n: int, device, quantization: Optional[str] = None) -> dict:
    from pfdiff_bench.evaluation.tools import get_tool

    t = get_tool(w.tool)
    out = {"num_samples": n, "protocol_samples": PROTOCOL_SAMPLES, "min_images": MIN_IMAGES, "fid_tool": t.name,
           "fid_tool_version": t.version(), "feature_extractor": t.extractor, "resize": t.resize,
           "weights_file": str(w.path), "weights_sha256": w.sha256, "weights_official": w.official,
           "quantization": quantization, "device": str(device)}
    if t.name == "torch-fidelity":
        out["torch_fidelity_version"] = out["fid_tool_version"]
    return out


def fid_result(stats: FeatureStats, ref, w: InceptionWeights, device="cpu", *, mixed_protocol: bool = False,
               quantization: Optional[str] = None, allow_small: bool = False) -> dict:
    """FID result dict of accumulated statistics against a reference (``RefStats`` or mapping mu/sigma).

    The result carries its protocol (issue 12 part 5): tool and version, weights SHA-256, reference name,
    SHA-256 and producer, resize, quantisation, sample count; features of one preprocessing family
    against a reference of another are refused unless ``mixed_protocol`` (then labelled "mixed"). Fewer
    than :data:`MIN_IMAGES` samples (or a reference of fewer) are refused unless ``allow_small``; the
    result then has ``small_sample: true``.
    """
    from pfdiff_bench.evaluation.refstats import check_protocol

    check_floor(stats.n, "FID", allow_small=allow_small)
    _check_ref_floor(ref, allow_small)
    ref_mu, ref_sigma = (ref.mu, ref.sigma) if hasattr(ref, "mu") else (ref["mu"], ref["sigma"])
    if np.shape(ref_mu) != (2048,) or np.shape(ref_sigma) != (2048, 2048):
        raise CheckpointError(f"reference {getattr(ref, 'name', 'statistics')} has mu {np.shape(ref_mu)} and "
                              f"sigma {np.shape(ref_sigma)}; Inception pool features need (2048,) and (2048, 2048)")
    protocol = check_protocol(w.tool, ref, mixed_protocol=mixed_protocol)
    value = frechet_distance(stats.mu, stats.sigma, ref_mu, ref_sigma)
    out = {"metric": "fid", "label": sample_label("fid", stats.n), "value": value,
           "reference": getattr(ref, "name", "custom"), "reference_sha256": getattr(ref, "sha256", None),
           "reference_path": str(getattr(ref, "path", "") or "") or None,
           "reference_num_samples": getattr(ref, "num_samples", None), "feature_layer": FID_LAYER}
    out.update(_common(w, stats.n, device, quantization))
    out.update(protocol)
    out["small_sample"] = small_sample(stats.n, ref)
    return out


def is_result(acc: InceptionScoreAccumulator, w: InceptionWeights, device="cpu", *,
              quantization: Optional[str] = None, allow_small: bool = False) -> dict:
    small = check_floor(acc.n, "IS", allow_small=allow_small)
    mean, std, splits = acc.result()
    out = {"metric": "is", "label": sample_label("is", acc.n), "value": mean, "std": std, "splits": splits,
           "split_size": acc.split_size, "shuffled": False, "feature_layer": IS_LAYER}
    out.update(_common(w, acc.n, device, quantization))
    out["small_sample"] = small
    return out


def evaluate_batches(batches: Iterable, *, fid_ref=None, isc: bool = False, fid_tool: Optional[str] = None,
                     mixed_protocol: bool = False, quantization: Optional[str] = None,
                     inception_weights: Optional[PathLike] = None, trust_weights: bool = False,
                     device: Union[str, torch.device, None] = None, download: bool = True,
                     progress: Optional[bool] = False, total: Optional[int] = None,
                     log: Log = _stderr, distributed: bool = False, allow_small: bool = False, kid: bool = False,
                     prc: bool = False) -> dict[str, dict]:
    """One pass over uint8 NHWC ``batches``: ``{"fid": {...}}`` against ``fid_ref`` and/or ``{"is": {...}}``.

    ``fid_ref``: a reference name or ``.npz`` path (see :mod:`pfdiff_bench.evaluation.refstats`), a ``RefStats``, or a
    mapping with ``mu``/``sigma``. ``fid_tool``: ``torch-fidelity`` (default) or ``pytorch-fid``
    (:mod:`pfdiff_bench.evaluation.tools`). ``quantization``: how the images were made uint8, recorded.
    The Inception weights and the reference are resolved before any batch is read, so a missing file fails
    at once. ``distributed``: every torchrun rank passes its share of the images and the FID statistics are
    all-reduced (:meth:`FeatureStats.all_reduce`); every rank gets the same result (FID only).
    ``allow_small``: compute on fewer than :data:`MIN_IMAGES` images (or against such a reference), labelled
    ``small_sample``; otherwise refused, before the pass when ``total`` (the image count) is known.
    ``kid``/``prc``: also KID and precision/recall against the reference's own features
    (:func:`pfdiff_bench.evaluation.refstats.reference_features`; torch-fidelity only, one process).
    """
    from pfdiff_bench.evaluation.tools import get_tool

    tool = get_tool(fid_tool)
    if fid_ref is None and not isc:
        raise PFDiffError("nothing to evaluate: ask for FID (a reference) and/or IS")
    if isc and not tool.supports_is:
        raise PFDiffError(f"--fid-tool {tool.name} computes no Inception Score; IS uses torch-fidelity "
                          f"(--fid-tool torch-fidelity, the ADM evaluator's logits)")
    if total is not None and not distributed:  # the cheapest refusal first: no weights or reference are loaded
        what = "/".join(m for m, on in (("FID", fid_ref is not None), ("IS", isc)) if on)
        check_floor(int(total), what, allow_small=allow_small)
    if fid_ref is not None and not isinstance(fid_ref, (str, os.PathLike)):
        _check_ref_floor(fid_ref, allow_small)
    net, w = load_inception(inception_weights, tool=tool.name, trust_weights=trust_weights, device=device,
                            download=download, log=log)
    ref = None
    if fid_ref is not None:
        if isinstance(fid_ref, (str, os.PathLike)):
            from pfdiff_bench.evaluation.refstats import load_ref

            ref = load_ref(fid_ref, fid_tool=tool.name, inception_weights=inception_weights,
                           trust_weights=trust_weights, device=device, download=download, log=log,
                           allow_small=allow_small)
        else:
            ref = fid_ref
        from pfdiff_bench.evaluation.refstats import check_protocol

        check_protocol(tool.name, ref, mixed_protocol=mixed_protocol)  # before the (long) pass over the images
    dev = next(net.parameters()).device
    if distributed and isc:
        raise PFDiffError("the Inception Score's consecutive splits are not computed across ranks; evaluate IS "
                          "in one process")
    if (kid or prc) and (distributed or ref is None or tool.name != "torch-fidelity"):
        raise PFDiffError("KID and precision/recall need a reference and torch-fidelity, in one process")
    ref_feats = None
    if kid or prc:  # before the pass over the samples: a reference without features fails at once
        from pfdiff_bench.evaluation.refstats import reference_features

        # one extraction per process for each (reference file, weights, tool): a table's cells share it
        ck = (getattr(ref, "sha256", None) or id(ref), w.sha256, tool.name)
        if ck not in _REF_FEATURES:
            _REF_FEATURES.clear()  # keep one reference's features in memory at most
            _REF_FEATURES[ck] = reference_features(ref, net)
        ref_feats = _REF_FEATURES[ck]
    keep: Optional[list] = [] if (kid or prc) else None
    stats, acc = extract(batches, net, fid=ref is not None, isc=isc, progress=progress, total=total,
                         allow_empty=distributed, keep=keep)
    if distributed:
        stats.all_reduce(dev)
        if stats.n == 0:
            raise PFDiffError("no images to evaluate")
    out = {}
    if ref is not None:
        out["fid"] = fid_result(stats, ref, w, dev, mixed_protocol=mixed_protocol, quantization=quantization,
                                allow_small=allow_small)
    if isc:
        out["is"] = is_result(acc, w, dev, quantization=quantization, allow_small=allow_small)
    if keep is not None:
        feats = torch.cat(keep)
        if kid:
            out["kid"] = kid_result(feats, ref_feats, w, ref, dev, quantization=quantization)
        if prc:
            out["prc"] = prc_result(feats, ref_feats, w, ref, dev, quantization=quantization)
    return out


def compute_fid(batches: Iterable, ref, **kwargs) -> dict:
    """FID of uint8 NHWC ``batches`` against reference ``ref`` (name, .npz path, RefStats or mu/sigma)."""
    return evaluate_batches(batches, fid_ref=ref, **kwargs)["fid"]


def compute_is(batches: Iterable, **kwargs) -> dict:
    """Inception Score of uint8 NHWC ``batches`` (unshuffled splits of 5,000)."""
    return evaluate_batches(batches, isc=True, **kwargs)["is"]
