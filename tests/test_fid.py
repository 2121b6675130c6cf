"""FID / IS against torch-fidelity with a random-weight Inception (CPU, no network)."""

from __future__ import annotations

import socket
import time
from unittest import mock

import numpy as np
import pytest
import torch

from pfdiff_bench.evaluation import features
from pfdiff_bench.evaluation import fid
from pfdiff_bench import download
from pfdiff_bench.evaluation import refstats
from pfdiff_bench.cli import main
from pfdiff_bench.errors import CheckpointError, PFDiffError
from pfdiff_bench.evaluation.frechet import frechet_distance


# ------------------------------------------------------------------------------------------ fixtures
def _images(n, size, seed):
    """Structured uint8 NHWC images: upsampled low-res noise with per-image brightness and contrast."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x * torch.rand(n, 1, 1, 1, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 0.5
    x = x + 0.1 * torch.rand(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="session")
def sets():
    # Two clearly different sets (the second much darker), so the FID (~86) is far above the round-off of
    # 20-sample covariances in 2048 dimensions (~1e-3 absolute, in torch-fidelity's formula as in ours).
    return _images(20, 32, 1), _images(20, 64, 2) // 4


class _CHW(torch.utils.data.Dataset):
    def __init__(self, nhwc):
        self.x = nhwc.permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _kw(weights):
    return dict(inception_weights=weights, trust_weights=True, device="cpu", download=False)


# -------------------------------------------------------------------------------- against torch-fidelity
@pytest.fixture(scope="session")
def ours(weights, sets):
    a, b = sets
    mu_b, sigma_b, n_b, _ = features.feature_statistics(features.iter_array_batches(b, 64), **_kw(weights))
    res = fid.evaluate_batches(features.iter_array_batches(a, 64), fid_ref={"mu": mu_b, "sigma": sigma_b}, isc=True,
                               allow_small=True, **_kw(weights))  # 20 images: below the 2,048 floor
    return res, (mu_b, sigma_b, n_b)


def test_fid_and_is_match_torch_fidelity(weights, sets, ours):
    import torch_fidelity

    a, b = sets
    ref = torch_fidelity.calculate_metrics(
        input1=_CHW(a), input2=_CHW(b), fid=True, isc=True, isc_splits=1, samples_shuffle=False, cuda=False,
        feature_extractor_weights_path=str(weights), cache=False, verbose=False, save_cpu_ram=True, batch_size=64)
    res, _ = ours
    assert res["fid"]["value"] > 1e-3  # a real, non-degenerate distance
    assert res["fid"]["value"] == pytest.approx(ref["frechet_inception_distance"], rel=1e-4)
    assert res["is"]["value"] > 1.01
    assert res["is"]["value"] == pytest.approx(ref["inception_score_mean"], rel=1e-4)
    assert res["is"]["splits"] == 1 and res["is"]["std"] == 0.0
    for key in ("fid", "is"):
        e = res[key]
        assert e["num_samples"] == 20 and e["label"] == f"{key.upper()}-20"
        assert e["feature_extractor"] == "inception-v3-compat"
        assert e["weights_sha256"] == download.file_sha256(weights) and e["weights_official"] is False
        assert e["torch_fidelity_version"] == torch_fidelity.__version__


def test_batch_size_does_not_change_statistics(weights, sets, ours):
    _, b = sets
    _, (mu64, sigma64, n64) = ours
    mu7, sigma7, n7, _ = features.feature_statistics(features.iter_array_batches(b, 7), **_kw(weights))
    assert n7 == n64 == 20
    np.testing.assert_allclose(mu7, mu64, rtol=1e-5, atol=1e-7)
    # features are float32: batch composition changes kernels' summation order at round-off level
    np.testing.assert_allclose(sigma7, sigma64, rtol=1e-4, atol=1e-6 * np.abs(sigma64).max())
    assert frechet_distance(mu7, sigma7, mu64, sigma64) < 1e-6


def test_streaming_statistics_match_numpy():
    x = np.random.default_rng(0).normal(size=(103, 2048)) * 3 + 1
    st = features.FeatureStats(2048)
    for i in range(0, 103, 10):
        st.update(torch.from_numpy(x[i:i + 10]))
    np.testing.assert_allclose(st.mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_is_splits_follow_adm_evaluator():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(10_000, 1008, generator=torch.Generator().manual_seed(0)) * 2
    acc = features.InceptionScoreAccumulator()
    for i in range(0, 10_000, 777):  # batches that straddle the split boundary
        acc.update(logits[i:i + 777])
    mean, std, splits = acc.result()
    ref = isc_features_to_metric(logits, splits=2, shuffle=False)
    assert splits == 2
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8)
    # ADM: a trailing partial chunk is its own split
    acc = features.InceptionScoreAccumulator()
    acc.update(logits[:6_000])
    p = logits[:6_000].double().softmax(1)
    manual = [float(torch.exp((c * (c.log() - c.mean(0, keepdim=True).log())).sum(1).mean())) for c in (p[:5000], p[5000:])]
    assert acc.result()[2] == 2 and acc.result()[0] == pytest.approx(np.mean(manual), rel=1e-10)


def test_labels():
    assert fid.sample_label("fid", 50_000) == "FID"
    assert fid.sample_label("fid", 10_000) == "FID-10k"
    assert fid.sample_label("is", 1234) == "IS-1234"


# ---------------------------------------------------------------------------------- Fréchet distance
def test_frechet_matches_independent_eig_formula():
    rng = np.random.default_rng(3)
    for d in (1, 16, 128):
        a, b = rng.normal(size=(d, 2 * d + 3)), rng.normal(size=(d, 2 * d + 3)) * 0.7
        s1, s2 = a @ a.T / d, b @ b.T / d + 0.1 * np.eye(d)
        m1, m2 = rng.normal(size=d), rng.normal(size=d)
        ev = np.linalg.eigvals(s1 @ s2).astype(np.complex128)
        independent = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).real.sum())
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(independent, rel=1e-9, abs=1e-9)


# ------------------------------------------------------------------------------------ CLI end to end
def test_cli_ref_compute_then_self_fid_is_zero(weights, tmp_path, capsys):
    a = _images(8, 32, 7)
    samples = tmp_path / "samples.npz"
    np.savez(samples, a.numpy())
    stats = tmp_path / "stats.npz"
    w = ["--inception-weights", str(weights), "--trust-weights", "--device", "cpu", "--offline", "--allow-small"]
    with pytest.raises(SystemExit) as e:
        main(["ref", "compute", str(samples), "--out", str(stats), "--batch-size", "16", *w])
    assert e.value.code == 0, capsys.readouterr().err
    st = refstats.read_stats_npz(stats, allow_small=True)
    assert st.num_samples == 8 and st.weights_sha256 == download.file_sha256(weights)
    with pytest.raises(SystemExit) as e:
        main(["fid", str(samples), "--ref", str(stats), "--json", "--batch-size", "64", *w])
    out = capsys.readouterr().out
    assert e.value.code == 0
    import json

    entry = json.loads(out.strip().splitlines()[-1])
    assert entry["label"] == "FID-8" and entry["reference_sha256"] == st.sha256 and entry["small_sample"] is True
    # 8 samples: sigma has rank 7 of 2048; frechet.py zeroes the round-off eigenvalues of the null space
    assert abs(entry["value"]) < 1e-6


def test_self_fid_full_rank_statistics_is_zero():
    # n > dim (full-rank covariance), streamed in uneven batches; dim 256 keeps the test fast
    x = np.random.default_rng(1).gamma(2.0, 0.2, size=(300, 256))  # non-negative like pool features
    st = features.FeatureStats(256)
    for i in range(0, 300, 77):
        st.update(torch.from_numpy(x[i:i + 77]).float())
    assert abs(frechet_distance(st.mu, st.sigma, st.mu, st.sigma)) < 1e-6
    assert fid.sample_label("fid", st.n) == "FID-300"


def test_run_dir_results_are_appended(weights, tmp_path, monkeypatch, capsys):
    imgs = _images(10, 32, 5)
    appended = []
    from pfdiff_bench.sampling import rundir  # the real module, its run-dir functions replaced

    monkeypatch.setattr(rundir, "run_complete", lambda run_dir: True)
    monkeypatch.setattr(rundir, "iter_image_batches", lambda run_dir, bs, require_complete=True: (
        (imgs[i:i + bs], torch.zeros(len(imgs[i:i + bs]))) for i in range(0, 10, bs)))
    monkeypatch.setattr(rundir, "append_result", lambda run_dir, entry: appended.append((run_dir, entry)))
    monkeypatch.setattr(rundir, "read_manifest",
                        lambda run_dir: {"num_samples": 10, "config": {"name": "lsun_church"}})
    with pytest.raises(SystemExit) as e:
        main(["is", str(tmp_path), "--inception-weights", str(weights), "--trust-weights", "--device", "cpu",
              "--batch-size", "4", "--allow-small"])
    assert e.value.code == 0, capsys.readouterr().err
    assert "IS-10" in capsys.readouterr().out
    assert len(appended) == 1 and appended[0][1]["metric"] == "is" and appended[0][1]["num_samples"] == 10


# --------------------------------------------------------------------------------------- error paths
def test_no_weights_no_network_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((2, 8, 8, 3), np.uint8))
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        main(["fid", str(samples), "--ref", "imagenet64"])
    assert time.monotonic() - t0 < 10
    assert e.value.code == 2 and calls
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert features.INCEPTION_URL in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / features.INCEPTION_FILENAME) in err


def test_unpinned_weights_refused_without_trust(weights, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        main(["is", str(samples), "--inception-weights", str(weights)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--trust-weights" in err and features.INCEPTION_SHA256 in err


def test_bad_reference_npz(tmp_path, capsys):
    no_mu = tmp_path / "no_mu.npz"
    np.savez(no_mu, sigma=np.eye(2048))
    with pytest.raises(CheckpointError, match=r"no_mu\.npz lack mu"):
        refstats.read_stats_npz(no_mu)
    bad = tmp_path / "bad_shapes.npz"
    np.savez(bad, mu=np.zeros(2048), sigma=np.eye(64))
    with pytest.raises(CheckpointError, match=r"bad_shapes\.npz have mismatched shapes"):
        refstats.read_stats_npz(bad)
    with pytest.raises(CheckpointError, match="not found"):
        refstats.load_ref(tmp_path / "missing.npz")


def test_registry_offline_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path))
    monkeypatch.setattr(socket, "create_connection", mock.Mock(side_effect=OSError("unreachable")))
    spec = refstats.get_ref("imagenet64")
    with pytest.raises(CheckpointError) as e:
        refstats.load_ref("imagenet64")
    assert spec.url in str(e.value) and str(tmp_path / "refstats" / spec.filename) in str(e.value)
    with pytest.raises(CheckpointError, match="ref compute FOLDER --as lsun_church"):
        refstats.load_ref("lsun_church")
    names = [r["name"] for r in refstats.list_refs()]
    assert names == ["imagenet64", "imagenet256", "lsun_bedroom", "cifar10-train", "lsun_church", "cifar10-ttur",
                     "cifar10-cleanfid-legacy", "cifar10-scoresde", "coco2014_val"]
    with pytest.raises(CheckpointError, match="ref compute val2014/ --as coco2014_val"):
        refstats.load_ref("coco2014_val")


def test_cached_reference_pinned(tmp_path, monkeypatch):
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path))
    dest = refstats.ref_cache_path("lsun_bedroom")
    dest.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(dest, mu=rng.normal(size=2048), sigma=np.eye(2048), arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    st = refstats.load_ref("lsun_bedroom", log=lambda m: None)
    assert st.name == "lsun_bedroom" and st.mu.dtype == np.float64
    assert dest.with_name(dest.name + ".sha256").read_text().split()[0] == st.sha256
    np.savez(dest, mu=np.zeros(2048), sigma=np.eye(2048))  # altered file
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        refstats.load_ref("lsun_bedroom")


def test_default_reference_from_manifest(tmp_path, monkeypatch):
    from pfdiff_bench.cli import evaluate
    from pfdiff_bench.sampling import rundir


    monkeypatch.setattr(rundir, "read_manifest",
                        lambda run_dir: {"config": {"name": "cifar10", "model": {"checkpoint": "ema_cifar10"}}})
    assert evaluate._default_ref(tmp_path) == "cifar10-train"
    monkeypatch.setattr(rundir, "read_manifest",
                        lambda run_dir: {"config": {"name": "x", "model": {"checkpoint": "ema_lsun_church"}}})
    assert evaluate._default_ref(tmp_path) == "lsun_church"
    monkeypatch.setattr(rundir, "read_manifest", lambda run_dir: {"config": {"name": "toy"}})
    with pytest.raises(PFDiffError, match="pass --ref"):
        evaluate._default_ref(tmp_path)


def test_help_has_examples():
    from click.testing import CliRunner

    from pfdiff_bench.cli import cli

    for args in (["fid", "--help"], ["is", "--help"], ["ref", "--help"], ["ref", "compute", "--help"],
                 ["ref", "list", "--help"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 0 and "Example" in r.output and "pfdiff-bench" in r.output
