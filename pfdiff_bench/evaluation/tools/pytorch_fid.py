"""pytorch-fid's Inception (``pytorch_fid.inception.InceptionV3``, the FID port of 2015-12-05; issue 12 part 1).

What ``pytorch_fid.fid_score.calculate_fid_given_paths`` does to an image, kept exactly:
``TF.ToTensor()`` (uint8 HWC -> float32 CHW / 255) -> ``InceptionV3([3])`` with ``resize_input=True``
(``F.interpolate(bilinear, align_corners=False)`` to 299x299) and ``normalize_input=True`` (``2x - 1``)
-> the 2048-d final average pool. pytorch-fid keeps the activations as float64 (``np.empty`` rows) and
takes ``np.mean`` / ``np.cov(rowvar=False)``; the streaming float64 accumulator of
:class:`pfdiff_bench.evaluation.features.FeatureStats` gives those statistics for any batch split. Weights: the file
``pt_inception-2015-12-05-6726825d.pth`` (``pytorch_fid.inception.FID_WEIGHTS_URL``), which pytorch-fid
fetches with ``load_state_dict_from_url`` into torch.hub's checkpoint cache.

pytorch-fid computes no Inception Score (its ``InceptionV3`` drops the classifier), so this tool is FID only.
"""

from __future__ import annotations

import torch

FID_BLOCK_DIM = 2048


class PytorchFidExtractor(torch.nn.Module):
    """uint8 NCHW -> ``(pool features (N, 2048), None)`` through pytorch-fid's own ``InceptionV3``."""

    def __init__(self, state_dict: dict):
        super().__init__()
        import pytorch_fid.inception as pi

        # fid_inception_v3() fetches the weights with load_state_dict_from_url(FID_WEIGHTS_URL) and loads them
        # strictly; hand it the state dict we verified and loaded with weights_only instead.
        original = pi.load_state_dict_from_url
        pi.load_state_dict_from_url = lambda *a, **k: state_dict
        try:
            self.net = pi.InceptionV3([pi.InceptionV3.BLOCK_INDEX_BY_DIM[FID_BLOCK_DIM]], resize_input=True,
                                      normalize_input=True, use_fid_inception=True)
        finally:
            pi.load_state_dict_from_url = original

    def forward(self, x: torch.Tensor):
        x = x.to(torch.float32).div(255)  # torchvision ToTensor on uint8 images
        pool = self.net(x)[0]
        return pool.reshape(pool.shape[0], -1), None


def build_extractor(state_dict: dict) -> torch.nn.Module:
    return PytorchFidExtractor(state_dict)
