"""FID tools (torch-fidelity, pytorch-fid), reference formats and protocols (issue 12 parts 1, 2, 3, 5).

Random-weight, test-only Inception files are built here from pytorch-fid's own classes; the expected
values come from pytorch-fid's ``calculate_fid_given_paths`` and from numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from pfdiff_bench.evaluation import features
from pfdiff_bench.evaluation import fid
from pfdiff_bench import download
from pfdiff_bench.evaluation import refstats
from pfdiff_bench.cli import main
from pfdiff_bench.errors import CheckpointError, ConfigError, PFDiffError
from pfdiff_bench.evaluation import tools

PF_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _images(n, size, seed, scale=1.0):
    """Structured uint8 NHWC images: upsampled low-res noise with per-image brightness and contrast."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x * torch.rand(n, 1, 1, 1, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 0.5
    x = (x + 0.1 * torch.rand(n, 3, size, size, generator=g)) * scale
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def pf_weights(tmp_path_factory):
    """A random-init state dict of pytorch-fid's FID Inception (FIDInceptionA..E_2 in torchvision's
    Inception3), saved under pytorch-fid's file name in a torch.hub cache of its own."""
    import pytorch_fid.inception as pi

    torch.manual_seed(1)
    with mock.patch.object(pi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, sd, *a, **k: None):
        net = pi.fid_inception_v3()
    for m in net.modules():  # variance-preserving init so that features are not vanishingly small
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    hub = tmp_path_factory.mktemp("torch_home")
    path = hub / "hub" / "checkpoints" / PF_FILE
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("pngs")
    sets = {"a": _images(10, 32, 1), "b": _images(10, 32, 2, scale=0.4)}
    for name, imgs in sets.items():
        (root / name).mkdir()
        for i, im in enumerate(imgs.numpy()):
            Image.fromarray(im).save(root / name / f"{i:03d}.png")
    return root / "a", root / "b", sets


def _kw(weights, tool):
    return dict(fid_tool=tool, inception_weights=weights, trust_weights=True, device="cpu", download=False)


@pytest.fixture(scope="module")
def ours_pf(pf_weights, folders, tmp_path_factory):
    """pytorch-fid FID via our CLI (ref compute on folder b) and API (folder a)."""
    a, b, _ = folders
    stats = tmp_path_factory.mktemp("stats") / "b.npz"
    with pytest.raises(SystemExit) as e:
        main(["ref", "compute", str(b), "--out", str(stats), "--fid-tool", "pytorch-fid", "--inception-weights",
              str(pf_weights), "--trust-weights", "--device", "cpu", "--offline", "--allow-small"])
    assert e.value.code in (0, None)
    res = fid.compute_fid(refstats.iter_folder_batches(a, 5), str(stats), allow_small=True,
                          **_kw(pf_weights, "pytorch-fid"))
    return res, stats


# ------------------------------------------------------------------------------ pytorch-fid equality
def test_pytorch_fid_equals_calculate_fid_given_paths(pf_weights, folders, ours_pf, monkeypatch):
    from pytorch_fid.fid_score import calculate_fid_given_paths

    a, b, _ = folders
    monkeypatch.setenv("TORCH_HOME", str(pf_weights.parents[2]))  # pytorch-fid finds the same file in its cache
    expect = calculate_fid_given_paths([str(a), str(b)], batch_size=50, device="cpu", dims=2048, num_workers=0)
    res, stats = ours_pf
    assert expect > 1.0  # a real distance, far above round-off
    assert res["value"] == pytest.approx(expect, rel=1e-3)
    assert res["fid_tool"] == "pytorch-fid" and res["fid_tool_version"] == __import__("pytorch_fid").__version__
    assert "align_corners=False" in res["resize"] and res["feature_extractor"].startswith("pytorch_fid")
    assert res["weights_sha256"] == download.file_sha256(pf_weights) and res["weights_official"] is False
    assert res["label"] == "FID-10" and res["num_samples"] == 10
    assert res["reference_producer"] == "pytorch-fid" and res["mixed_protocol"] is False
    assert res["protocol"] == "pytorch-fid" and res["reference_sha256"] == download.file_sha256(stats)
    st = refstats.read_stats_npz(stats, allow_small=True)  # the reference file records its producer
    assert st.producer == "pytorch-fid" and "align_corners=False" in st.resize and st.num_samples == 10


def test_pytorch_fid_statistics_match_numpy_on_its_activations(pf_weights, folders):
    """Our float64 streaming statistics equal pytorch-fid's np.mean / np.cov of its own activations."""
    from pytorch_fid.fid_score import get_activations
    from pytorch_fid.inception import InceptionV3

    a, _, _ = folders
    net, _ = tools.load_extractor("pytorch-fid", pf_weights, trust_weights=True, device="cpu")
    files = sorted(a.glob("*.png"))[:6]
    act = get_activations(files, net.net, batch_size=4, dims=2048, device="cpu", num_workers=0)
    assert isinstance(net.net, InceptionV3)
    mu, sigma, n, w = features.feature_statistics(features.iter_array_batches(folders[2]["a"][:6], 5),
                                             **_kw(pf_weights, "pytorch-fid"))
    assert n == len(files) and w.tool == "pytorch-fid"
    np.testing.assert_allclose(mu, act.mean(0), rtol=0, atol=1e-6 * np.abs(act).max())
    np.testing.assert_allclose(sigma, np.cov(act, rowvar=False), rtol=0, atol=1e-6 * np.abs(act).max() ** 2)


# ------------------------------------------------------------------------------ the choice is real
def test_tools_differ_on_same_images_and_results_record_the_tool(pf_weights, folders, ours_pf):
    """Same PNGs, same weights file (pytorch-fid's keys fit torch-fidelity's extractor too): only the
    resize / normalisation differ, and so do the FIDs."""
    a, b, _ = folders
    res_pf, _ = ours_pf
    mu, sigma, _, _ = features.feature_statistics(refstats.iter_folder_batches(b, 64), **_kw(pf_weights, "torch-fidelity"))
    res = fid.evaluate_batches(refstats.iter_folder_batches(a, 64), fid_ref={"mu": mu, "sigma": sigma},
                               quantization="round", allow_small=True, **_kw(pf_weights, "torch-fidelity"))["fid"]
    assert res["fid_tool"] == "torch-fidelity" and res["quantization"] == "round"
    assert res["resize"] == tools.get_tool("torch-fidelity").resize and "TF1" in res["resize"]
    assert res["reference_producer"] == "unknown" and res["weights_sha256"] == res_pf["weights_sha256"]
    vals = {"torch-fidelity": res["value"], "pytorch-fid": res_pf["value"]}
    assert min(vals.values()) > 1.0
    assert abs(vals["torch-fidelity"] - vals["pytorch-fid"]) > 1e-2 * max(vals.values()), vals

    # the table records which tool was used
    from pfdiff_bench.reproduction.cells import Cell
    from pfdiff_bench.reproduction.tables import Row, TableSpec
    from pfdiff_bench.reproduction.writers import assemble, to_markdown

    spec = TableSpec(name="t", title="t", config="toy", metric="fid", nfe=[4], rows=[Row("DDIM", {})],
                     num_samples=12, reference="ref.npz", fid_tool="pytorch-fid")
    cell = Cell(Row("DDIM", {}), 4, Path("r"), cfg={"sampling": {"num_samples": 12}}, value=vals["pytorch-fid"],
                result=dict(res_pf, quantization="round"))
    out = assemble(spec, [cell])
    assert out["protocol"]["fid_tool"] == "pytorch-fid"
    assert out["protocol"]["cells"][0]["fid_tool"] == "pytorch-fid"
    md = to_markdown(out)
    assert "FID tool: pytorch-fid, reference ref.npz." in md
    assert "Protocol: pytorch-fid; pytorch-fid 0.3" in md and "quantisation: round" in md


def test_is_is_torch_fidelity_only(pf_weights, capsys):
    with pytest.raises(PFDiffError, match="no Inception Score"):
        fid.compute_is([_images(2, 8, 0)], **_kw(pf_weights, "pytorch-fid"))


# ------------------------------------------------------------------------------ weights per tool
def test_pytorch_fid_weights_pinned_and_offline_message(pf_weights, tmp_path, monkeypatch, capsys):
    t = tools.get_tool("pytorch-fid")
    assert t.official("6726825d" + "0" * 56) and not t.official("deadbeef" * 8)
    assert tools.get_tool("torch-fidelity").official(tools.TOOLS["torch-fidelity"].weights_sha256)
    with pytest.raises(CheckpointError, match="--trust-weights") as e:
        tools.resolve_weights("pytorch-fid", pf_weights)
    assert "6726825d" in str(e.value) and "pytorch-fid" in str(e.value)
    # found in the tool's usual cache
    monkeypatch.setenv("TORCH_HOME", str(pf_weights.parents[2]))
    assert tools.resolve_weights("pytorch-fid", trust_weights=True, log=lambda m: None).path == pf_weights
    # missing, offline: one line naming the URL and the path
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as e:
        main(["fid", str(samples), "--ref", "cifar10-train", "--fid-tool", "pytorch-fid", "--offline"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert t.weights_url in err and str(tmp_path / "torch" / "hub" / "checkpoints" / PF_FILE) in err
    with pytest.raises(ConfigError, match="accepted: torch-fidelity, pytorch-fid"):
        tools.get_tool("clean-fid")


# ------------------------------------------------------------------------------ reference formats
def _adm_batch(path, seed=0):
    """An ADM-style reference batch: arr_0 images, mu/sigma, sFID mu_s/sigma_s."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((64, 2048))
    np.savez(path, arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), mu=f.mean(0),
             sigma=np.cov(f, rowvar=False), mu_s=np.zeros(2023), sigma_s=np.eye(4))
    return f


def test_adm_reference_batch_loads_and_mixed_protocol_is_declared(pf_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    dest = refstats.ref_cache_path("imagenet256")
    dest.parent.mkdir(parents=True)
    f = _adm_batch(dest)
    st = refstats.load_ref("imagenet256", log=lambda m: None)
    assert st.fmt == "adm-batch" and st.producer == "adm-tf" and st.sha256 == download.file_sha256(dest)
    np.testing.assert_array_equal(st.mu, f.mean(0))
    # its arr_0 images stream as a source (e.g. to recompute the statistics with another tool)
    batches, total = refstats.source_batches(dest, 4)
    assert total == 6 and sum(len(b) for b in batches) == 6
    # torch-fidelity is the ADM evaluator's family: a plain protocol
    assert refstats.check_protocol("torch-fidelity", st)["mixed_protocol"] is False
    # pytorch-fid features against ADM's TF reference: refused unless declared, then labelled
    with pytest.raises(ConfigError, match="--mixed-protocol"):
        refstats.check_protocol("pytorch-fid", st)
    samples = tmp_path / "s.npz"
    np.savez(samples, _images(4, 16, 3).numpy())
    base = ["fid", str(samples), "--ref", "imagenet256", "--fid-tool", "pytorch-fid", "--inception-weights",
            str(pf_weights), "--trust-weights", "--device", "cpu", "--offline", "--json", "--allow-small"]
    with pytest.raises(SystemExit) as e:
        main(base)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("note: ")]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "--mixed-protocol" in err[0] and "adm-tf" in err[0]
    with pytest.raises(SystemExit) as e:
        main(base + ["--mixed-protocol"])
    assert e.value.code in (0, None)
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["mixed_protocol"] is True and res["protocol"] == "mixed: pytorch-fid features vs adm-tf reference"
    assert res["reference"] == "imagenet256" and res["reference_producer"] == "adm-tf"
    assert res["label"] == "FID-4" and np.isfinite(res["value"])


def test_scoresde_activation_file_is_reduced_once_and_cached_by_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    with pytest.raises(CheckpointError, match="drive.google.com") as e:
        refstats.load_ref("cifar10-scoresde")
    assert str(refstats.ref_cache_path("cifar10-scoresde")) in str(e.value)
    rng = np.random.default_rng(0)
    acts = (rng.standard_normal((700, 2048)) * rng.uniform(0.5, 2, 2048) + 3).astype(np.float32)
    src = refstats.ref_cache_path("cifar10-scoresde")
    src.parent.mkdir(parents=True)
    np.savez(src, pool_3=acts, logits=np.zeros((700, 10), np.float32))
    st = refstats.load_ref("cifar10-scoresde", log=lambda m: None, allow_small=True)  # 700 rows: below 2,048
    assert st.fmt == "activations" and st.producer == "tf-gan" and st.num_samples == 700
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64
    a64 = acts.astype(np.float64)
    np.testing.assert_allclose(st.mu, a64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(a64, rowvar=False), rtol=1e-10, atol=1e-10)
    digest = download.file_sha256(src)
    assert st.sha256 == digest and st.derived_path == refstats.derived_path(src, digest) and st.derived_path.is_file()
    # second load: the cache, no recomputation
    with mock.patch.object(features.FeatureStats, "update", side_effect=AssertionError("recomputed")):
        again = refstats.load_ref("cifar10-scoresde", allow_small=True)
    np.testing.assert_array_equal(again.sigma, st.sigma)
    # an edited source has another hash, hence fresh statistics
    np.savez(src, pool_3=acts[:500])
    st2 = refstats.load_ref(str(src), log=lambda m: None, allow_small=True)
    assert st2.num_samples == 500 and st2.sha256 != digest
    np.testing.assert_allclose(st2.mu, a64[:500].mean(0), rtol=1e-12, atol=1e-12)
    # TF-GAN's resize is its own family: mixing with either tool must be declared
    with pytest.raises(ConfigError, match="tf-gan"):
        refstats.check_protocol("torch-fidelity", st)
    with pytest.raises(CheckpointError, match=r"\(N >= 2, 2048\)"):
        np.savez(tmp_path / "bad.npz", pool_3=np.zeros((5, 7), np.float32))
        refstats.load_ref(str(tmp_path / "bad.npz"))


def test_mu_sigma_files_of_each_tool(tmp_path, monkeypatch):
    """pytorch-fid / clean-fid files (mu, sigma only) load with unknown producer unless registered; a
    computed reference is per tool and refused with the other."""
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(1)
    f = rng.standard_normal((40, 2048))
    plain = tmp_path / "fid_stats_cifar10_train_pytorch.npz"
    np.savez_compressed(plain, mu=f.mean(0).astype(np.float32), sigma=np.cov(f, rowvar=False))  # as pytorch-fid saves
    st = refstats.load_ref(str(plain))
    assert st.producer is None and st.mu.dtype == np.float64
    assert refstats.check_protocol("pytorch-fid", st)["protocol"].endswith("unknown producer")
    legacy = refstats.ref_cache_path("cifar10-cleanfid-legacy")
    legacy.parent.mkdir(parents=True)
    np.savez(legacy, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    st = refstats.load_ref("cifar10-cleanfid-legacy", log=lambda m: None)
    assert st.producer == "clean-fid-legacy-tf" and refstats.check_protocol("torch-fidelity", st)["protocol"] == \
        "torch-fidelity"
    # computed references: one cache file per tool, each recording its tool
    tf_path = refstats.ref_cache_path("cifar10-train", "torch-fidelity")
    pf_path = refstats.ref_cache_path("cifar10-train", "pytorch-fid")
    assert tf_path.name == "cifar10-train.npz" and pf_path.name == "cifar10-train.pytorch-fid.npz"
    refstats.save_stats(refstats.RefStats("cifar10-train", f.mean(0), np.cov(f, rowvar=False), num_samples=40,
                                          producer="pytorch-fid"), tf_path)
    with pytest.raises(CheckpointError, match="computed with pytorch-fid, not torch-fidelity"):
        refstats.load_ref("cifar10-train", fid_tool="torch-fidelity", allow_small=True)


# ------------------------------------------------------------------------------ quantisation (part 3)
def test_quantisation_is_a_model_property_recorded_in_the_manifest(tmp_path):
    from pfdiff_bench.sampling import engine
    from pfdiff_bench.sampling import rundir
    from pfdiff_bench.config import load_config, override
    from pfdiff_bench.reproduction.tables import load_table
    from pfdiff_bench.reproduction.cells import plan_cells

    cells = plan_cells(load_table("table2"), tmp_path, num_samples=8, nfes=[4])
    q = {c.row.name: c.cfg["model"]["quantize"] for c in cells if c.cfg}
    assert q["DPM-Solver++(2M)"] == "truncate" and q["DDIM"] == "truncate"  # guided-diffusion saves by truncation
    assert load_config("cifar10")["model"]["quantize"] == "round"  # ermongroup/ddim: torchvision save_image
    cfg = load_config("toy")
    override(cfg, "sampling.num_samples", 4)
    override(cfg, "model.quantize", "truncate")
    assert cfg["model"]["quantize"] == "truncate"
    engine.run_sampling(cfg, tmp_path / "run", log=lambda m: None, progress=False)
    man = rundir.read_manifest(tmp_path / "run")
    assert man["quantization"].startswith("truncate") and man["config"]["model"]["quantize"] == "truncate"
    x = torch.linspace(-1, 1, 3 * 4 * 4).reshape(1, 3, 4, 4)
    assert not torch.equal(rundir.quantize(x, "truncate"), rundir.quantize(x, "round"))
    with pytest.raises(PFDiffError, match="accepted: truncate, round"):
        rundir.quantize(x, "floor")
