"""torch-fidelity's ``inception-v3-compat`` extractor (the ADM / TTUR TensorFlow pipeline, spec CHECKPOINTS.md §3b).

uint8 NCHW -> torch-fidelity's ``FeatureExtractorInceptionV3``: TF1-compatible bilinear resize to 299,
``(x-128)/128``, Inception 2015-12-05 -> ``"2048"`` pool features (FID) and ``"logits_unbiased"``
1008-way logits without the fc bias (IS), as OpenAI's ``evaluations/evaluator.py`` reads them.
"""

from __future__ import annotations

EXTRACTOR_NAME = "inception-v3-compat"
FID_LAYER = "2048"
IS_LAYER = "logits_unbiased"


def build_extractor(state_dict: dict):
    """The extractor with ``state_dict`` (already loaded, weights_only) handed to torch-fidelity's constructor
    in place of its own download, so no network access and no unpickling of unverified files happens.
    Its forward returns ``(features (N, 2048), logits_unbiased (N, 1008))``."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    original = fi.load_state_dict_from_url
    fi.load_state_dict_from_url = lambda *a, **k: state_dict
    try:
        return fi.FeatureExtractorInceptionV3(EXTRACTOR_NAME, [FID_LAYER, IS_LAYER])
    finally:
        fi.load_state_dict_from_url = original
