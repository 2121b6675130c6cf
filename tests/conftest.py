"""Shared test fixtures."""

from __future__ import annotations

import urllib.request
from unittest import mock

import pytest
import torch


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """A random-init state dict of torch-fidelity's FeatureExtractorInceptionV3, built without downloading."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi

    torch.manual_seed(0)
    with mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    for m in net.modules():  # variance-preserving init so that features and logits are not vanishingly small
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=3 / 2048 ** 0.5)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture
def offline_home(monkeypatch, tmp_path):
    """No network (any urlopen fails the test) and a private $PFDIFF_BENCH_HOME cache."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
