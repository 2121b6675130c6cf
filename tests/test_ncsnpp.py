"""ScoreSDE NCSN++ (DDPM++ deep continuous) and ImageNet-256 ADM: fixtures, the official checkpoint
layout through the zoo's loader, the adapter's time labels, the tables' plans and offline messages.

No test sends network traffic: `urllib.request.urlopen` is replaced in every in-process test, and the
subprocess runs only take paths that never open a connection (dry runs, refusals before any work).
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfdiff_bench.errors import CheckpointError, ConfigError
from pfdiff_bench.models import zoo
from pfdiff_bench.models.adapters import NCSNppEps
from pfdiff_bench.models.arch_verify import default_arch_dir, verify_arch
from pfdiff_bench.models.ncsnpp import NCSNpp

ROOT = Path(__file__).resolve().parents[1]
ARCH = default_arch_dir()
CLI = [sys.executable, "-m", "pfdiff_bench.cli"]
NEW_FIXTURES = ["ncsnpp_cifar10_deep_small", "ncsnpp_ckpt_small", "adm_imagenet256_small", "adm_classifier256_small"]
TINY = dict(image_size=16, num_channels=3, centered=True, nf=16, ch_mult=[1, 2], num_res_blocks=1,
            attn_resolutions=[8], dropout=0.0, init_scale=1.0)


@pytest.fixture(autouse=True)
def no_network(offline_home):
    """Every test here runs offline with a private cache (conftest.offline_home)."""


def run_cli(*args, env=None):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=300)


def _fixture(name: str) -> dict:
    return torch.load(ARCH / f"{name}.pt", map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------ fixtures
def test_new_fixtures_bundled_and_each_matches(tmp_path):
    """Each new fixture on its own (with its manifest) matches; the .pth travels with its fixture."""
    for name in NEW_FIXTURES:
        d = tmp_path / name
        (d / "manifests").mkdir(parents=True)
        shutil.copy(ARCH / f"{name}.pt", d)
        fx = _fixture(name)
        if fx.get("checkpoint_file"):
            shutil.copy(ARCH / fx["checkpoint_file"], d)
        assert verify_arch(d) == (1, 1, []), name
    for manifest in ("ncsnpp_cifar10_deep", "adm_imagenet256", "adm_classifier256"):
        m = json.loads((ARCH / "manifests" / f"{manifest}.json").read_text())
        net = zoo.build_arch(m["arch"], m["config"], device="meta")
        assert sum(p.numel() for p in net.parameters()) == m["num_parameters"]
        assert [[k, list(v.shape), str(v.dtype)[6:]] for k, v in net.state_dict().items()] == m["state_dict"]


def test_zoo_configs_are_the_manifests():
    """The zoo builds exactly the layout of each entry's bundled full-size manifest (so strict loading works)."""
    for spec in zoo.CHECKPOINTS.values():
        m = json.loads((ARCH / "manifests" / f"{spec.manifest}.json").read_text())
        assert spec.config == m["config"] and spec.arch == m["arch"], spec.name
        assert spec.num_parameters == m["num_parameters"], spec.name
    assert zoo.CHECKPOINTS["adm_imagenet256"].config["use_new_attention_order"] is False  # legacy heads-first
    assert zoo.CHECKPOINTS["adm_imagenet64"].config["use_new_attention_order"] is True


def test_verify_arch_catches_wrong_checkpoint_loading_and_layout(tmp_path):
    (tmp_path / "manifests").mkdir()
    fx = _fixture("ncsnpp_ckpt_small")
    # a .pth whose EMA list is the raw weights: loads, but the loader no longer returns the fixture's weights
    with torch.serialization.safe_globals(zoo._numpy_scalar_globals()):
        ck = torch.load(ARCH / fx["checkpoint_file"], map_location="cpu", weights_only=True)
    ck["ema"]["shadow_params"] = [v for k, v in ck["model"].items() if k != "module.sigmas"]
    torch.save(ck, tmp_path / "raw.pth")
    torch.save({**fx, "checkpoint_file": "raw.pth", "checkpoint_sha256": None}, tmp_path / "raw_ema.pt")
    # the fixture's .pth missing
    torch.save({**fx, "checkpoint_file": "absent.pth"}, tmp_path / "absent.pt")
    fx2 = _fixture("ncsnpp_cifar10_deep_small")
    fx2["config"]["centered"] = False  # in-network 2x-1 rescale: loads fine, wrong function
    torch.save(fx2, tmp_path / "uncentered.pt")
    m = json.loads((ARCH / "manifests" / "ncsnpp_cifar10_deep.json").read_text())
    m["ema_shadow_params_keys"] = sorted(m["ema_shadow_params_keys"])
    (tmp_path / "manifests" / "sorted_ema.json").write_text(json.dumps(m))
    matched, total, failures = verify_arch(tmp_path)
    assert (matched, total) == (0, 4), failures
    text = "\n".join(failures)
    assert "FAIL raw_ema.pt: checkpoint loader returned other values" in text
    assert "FAIL absent.pt: checkpoint file absent.pth" in text
    assert "FAIL uncentered.pt: output differs" in text
    assert "FAIL manifests/sorted_ema.json: our parameter order differs from ema_shadow_params_keys" in text


# ---------------------------------------------------------------------- official checkpoint layout
def _official_checkpoint(path: Path, cfg: dict, seed: int = 0) -> tuple[dict, list, NCSNpp]:
    """What score_sde's utils.save_checkpoint writes after training: DataParallel keys, raw weights in
    'model', unrelated EMA weights in ema.shadow_params, Adam state with a numpy learning rate."""
    torch.manual_seed(seed)
    net = NCSNpp(**cfg)
    model = torch.nn.DataParallel(net)  # keys carry 'module.' as in create_model
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    x = torch.randn(2, 3, cfg["image_size"], cfg["image_size"])
    model(x, torch.tensor([999.0, 500.0])).square().mean().backward()
    for g in opt.param_groups:  # losses.optimization_manager: lr * np.minimum(step / warmup, 1.0)
        g["lr"] = 2e-4 * np.minimum(1 / 5000, 1.0)
    opt.step()
    assert isinstance(opt.param_groups[0]["lr"], np.floating)
    shadow = [p.detach() + 0.1 * p.detach().std() * torch.randn_like(p) if p.numel() > 1 else p.detach() + 0.1
              for p in model.parameters()]
    torch.save({"optimizer": opt.state_dict(), "model": model.state_dict(),
                "ema": {"decay": 0.9999, "num_updates": 1, "shadow_params": shadow}, "step": 1}, path)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, shadow, net


@pytest.fixture
def tiny_scoresde(monkeypatch):
    """The zoo entry scoresde_cifar10 pointed at the tiny config (the real one is 106M parameters)."""
    n = sum(p.numel() for p in NCSNpp(**TINY).parameters())
    spec = dataclasses.replace(zoo.CHECKPOINTS["scoresde_cifar10"], config=dict(TINY), num_parameters=n)
    monkeypatch.setitem(zoo.CHECKPOINTS, "scoresde_cifar10", spec)
    zoo._expected_shapes_of.cache_clear()
    yield spec
    zoo._expected_shapes_of.cache_clear()


def test_official_layout_loads_ema_weights_through_the_zoo(tmp_path, tiny_scoresde):
    path = tmp_path / "checkpoint_8.pth"
    raw_sd, shadow, _ = _official_checkpoint(path, TINY)
    with pytest.raises(Exception, match="numpy"):  # the numpy scalar needs the allowlist
        torch.load(path, map_location="cpu", weights_only=True)

    logs = []
    net, used, algo, digest = zoo.load_checkpoint("scoresde_cifar10", checkpoint=path, log=logs.append)
    assert used == path and algo == "sha256-unpinned" and len(digest) == 64
    assert path.with_name("checkpoint_8.pth.sha256").read_text().split()[0] == digest
    assert net.sigmas.dtype == torch.float64 and list(net.state_dict())[0] == "sigmas"
    assert not any(p.requires_grad for p in net.parameters()) and not net.training

    # reference: the official restore (raw weights, strict=False) then ema.copy_to, written without names
    ref_ema, ref_raw = NCSNpp(**TINY).eval(), NCSNpp(**TINY).eval()
    ref_raw.load_state_dict(raw_sd)
    ref_ema.load_state_dict(raw_sd)
    with torch.no_grad():
        for s, p in zip(shadow, ref_ema.parameters()):
            p.copy_(s)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([1.0, 0.5371, 0.001])
    labels = t * 999  # float32, as get_noise_fn
    with torch.no_grad():
        ours, want, raw = net(x, labels), ref_ema(x, labels), ref_raw(x, labels)
    assert torch.equal(ours, want)
    assert (ours - raw).abs().max() > 100 * (ours - want).abs().max() + 1e-3  # not the raw weights

    # the noise predictor the samplers get: model time 999 t in float64, same eps
    eps = zoo.eps_model("scoresde_cifar10", checkpoint=path, log=logs.append)
    assert isinstance(eps, NCSNppEps)
    out = eps(x.double(), (t.double() * 999))
    assert out.dtype == torch.float64 and torch.equal(out.float(), want)


def test_official_layout_errors_are_one_line(tmp_path, tiny_scoresde):
    path = tmp_path / "checkpoint_8.pth"
    _official_checkpoint(path, TINY)
    with torch.serialization.safe_globals(zoo._numpy_scalar_globals()):
        ck = torch.load(path, map_location="cpu", weights_only=True)
    short = {**ck, "ema": {**ck["ema"], "shadow_params": ck["ema"]["shadow_params"][:-1]}}
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"shadow_params holds \d+ tensors but the model state dict has"):
        zoo.load_checkpoint("scoresde_cifar10", checkpoint=tmp_path / "short.pth", verify=False)
    swapped = list(ck["ema"]["shadow_params"])
    swapped[0], swapped[2] = swapped[2], swapped[0]  # [64, 16] vs conv_in [16, 3, 3, 3]
    torch.save({**ck, "ema": {**ck["ema"], "shadow_params": swapped}}, tmp_path / "swapped.pth")
    with pytest.raises(CheckpointError, match=r"shadow_params\[0\] has shape .* not in parameter order"):
        zoo.load_checkpoint("scoresde_cifar10", checkpoint=tmp_path / "swapped.pth", verify=False)
    # another network's official-layout file: the key summary names what is missing
    other = dict(TINY, nf=32)
    _official_checkpoint(tmp_path / "other.pth", other)
    with pytest.raises(CheckpointError, match="does not fit scoresde_cifar10.*shape mismatches"):
        zoo.load_checkpoint("scoresde_cifar10", checkpoint=tmp_path / "other.pth", verify=False)
    # a pickle of anything but tensors and the allowed numpy scalar is still refused
    torch.save({"model": {}, "ema": {"shadow_params": []}, "extra": fractions.Fraction(1, 3)},
               tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle arbitrary objects"):
        zoo.load_state_dict_file(tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="fp16 is only available for the ADM networks"):
        zoo.load_checkpoint("scoresde_cifar10", checkpoint=path, fp16=True)


def test_bundled_numpy1_checkpoint_file_loads_exactly():
    """The fixture .pth (official writer, numpy-1 pickle spelling): loader output == the fixture's EMA dict."""
    fx = _fixture("ncsnpp_ckpt_small")
    pth = ARCH / fx["checkpoint_file"]
    assert zoo.file_digest(pth, "sha256") == fx["checkpoint_sha256"]
    with pytest.raises(Exception, match="numpy.core.multiarray.scalar"):
        torch.load(pth, map_location="cpu", weights_only=True)
    sd = zoo.load_state_dict_file(pth, buffers=["sigmas"])
    assert list(sd) == list(fx["state_dict"])
    assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in fx["state_dict"].items())
    net = NCSNpp(**fx["config"]).eval()
    net.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = net(fx["inputs"]["x"], fx["inputs"]["t"])
    assert torch.allclose(out, fx["expected"], atol=fx["atol"], rtol=fx["rtol"])
    assert torch.equal(fx["inputs"]["t"], fx["inputs"]["t_continuous"] * 999)


def test_adapter_labels_are_float32_t_times_999():
    torch.manual_seed(0)
    net = NCSNpp(**TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.123456789, 0.001], dtype=torch.float64)
    with torch.no_grad():
        want = net(x, t.float() * 999)  # get_noise_fn: labels = t * 999 on a float32 t
        got = NCSNppEps(net)(x, t * 999)
    assert torch.equal(got, want)
    with torch.no_grad():  # fractional labels are kept: a nearby label gives another output
        assert not torch.equal(got, net(x, torch.round(t.float() * 999)))


def test_tiny_random_ncsnpp_samples_end_to_end():
    from pfdiff_bench.config import load_config
    from pfdiff_bench.sampling.setup import build

    cfg = load_config(str(ROOT / "tests/configs/tiny_ncsnpp.yaml"))
    setup = build(cfg, torch.device("cpu"))
    assert setup.sample_shape == (3, 16, 16)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = setup.sample(x_T)
    assert res.nfe == 3 and torch.isfinite(res.x).all() and not torch.allclose(res.x, x_T)
    # PFDiff-2_1 inside DPM-Solver-1 calls the network at 999 t of the first point and the springboards
    grid = np.linspace(1.0, 1e-3 ** 0.5, 8) ** 2  # time_quadratic, K = 7 intervals for NFE 3
    assert np.allclose(res.call_t, 999 * grid[[0, 3, 6]], rtol=1e-6)
    # model.fp16 now gives every network the ADM fp16 layout (models/fastpath.py, issue #20)
    cfg["model"]["fp16"] = True
    half = build(cfg, torch.device("cpu")).sample(x_T)
    assert torch.isfinite(half.x).all()  # per-call agreement: tests/test_fastpath.py (fixtures)


# ------------------------------------------------------------------------------------ tables, CLI
def _fmt(v: float) -> str:
    return f"{v:.4g}" if not float(v).is_integer() else str(int(v))


def test_scoresde_dry_run_lists_every_cell_with_its_grid():
    r = run_cli("reproduce", "scoresde", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    cells = lines[1:]
    rows = 7 * 5 + 1 + 4  # DPM-Solver-1/2/3 and DPM-Solver++-2/3, each plain + six PFDiff, DPM-Solver++(2M),
    #                       and the 4 extra baselines (issue 16)
    assert f"{rows * 5} cells" in lines[0] and len(cells) == rows * 5
    assert all("50000 samples" in c for c in cells[-4 * 5:])  # baselines: every NFE runs
    cells = cells[:-4 * 5]
    assert all("50000 samples" in c or "not runnable" in c for c in cells)
    for c in cells:
        order = int(re.match(r"\s*DPM-Solver(?:\+\+)?-(\d)", c).group(1)) if "(2M)" not in c else 1
        nfe = int(re.search(r"NFE\s+(\d+):", c).group(1))
        if nfe % order:  # singlestep_fixed spends `order` evaluations per interval
            assert "not runnable" in c and "NFE values that work" in c, c
        else:
            assert re.search(r"on (time_quadratic|logSNR) t = 1, .*0\.001", c), c
    # the script's grid: sample.sh steps = STEP*(k+1) - k for order 1; time_quadratic from 1 to 1e-3
    q = np.linspace(1.0, 1e-3 ** 0.5, 6) ** 2
    dpm1 = next(c for c in cells if c.strip().startswith("DPM-Solver-1 ") and "NFE   5" in c)
    assert "t = " + ", ".join(_fmt(v) for v in q) + ", orders [1, 1, 1, 1, 1];" in dpm1
    pf = next(c for c in cells if "DPM-Solver-1 + PFDiff-2_1 " in c and "NFE   5" in c)
    assert "orders [" + ", ".join(["1"] * 13) + "]" in pf and "0.01126, 0.001" in pf


def test_imagenet256_dry_run_lists_every_cell_with_its_grid():
    r = run_cli("reproduce", "imagenet256", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    cells = lines[1:]
    assert "42 cells" in lines[0] and len(cells) == 42
    assert all("10000 samples" in c and "[guided] on ddim" in c for c in cells)
    assert "ddim4 respacing, stride 250, L=4: {750, 500, 250, 0}" in cells[0]
    pf = next(c for c in cells if "PFDiff-3_3 " in c and "NFE   4" in c)
    assert "ddim13 respacing, stride 77, L=13: {924, 847, 770, 693" in pf


def test_tables_without_files_name_each_file_and_where_it_goes(tmp_path):
    home, torch_home = tmp_path / "home", tmp_path / "torch"
    env = {"PFDIFF_BENCH_HOME": str(home), "TORCH_HOME": str(torch_home)}
    expect = {
        "scoresde": [f"checkpoint_8.pth from the folder {zoo.CHECKPOINTS['scoresde_cifar10'].url}",
                     f"place it at {home}/checkpoints/cifar10_ddpmpp_deep_continuous/checkpoint_8.pth",
                     "reference statistics cifar10-scoresde are missing: https://drive.google.com/file/d/14UB27",
                     f"-> {home}/refstats/cifar10_stats.npz", "Inception weights"],
        "imagenet256": ["256x256_diffusion.pt and place it at " + f"{home}/checkpoints/256x256_diffusion.pt",
                        "256x256_classifier.pt and place it at " + f"{home}/checkpoints/256x256_classifier.pt",
                        f"VIRTUAL_imagenet256_labeled.npz -> {home}/refstats/VIRTUAL_imagenet256_labeled.npz",
                        "Inception weights"],
    }
    for table, needles in expect.items():
        out = tmp_path / table
        r = run_cli("reproduce", table, "--out", str(out), env=env)
        assert r.returncode == 2, r.stderr
        err = r.stderr.strip().splitlines()
        assert err[0].startswith(f"error: cannot run {table} here: ") and err[0].endswith("items are missing"), r.stderr
        items = [line for line in err[1:] if line.startswith("  - ")]
        assert f" {len(items)} items" in err[0] and len(items) >= 3, r.stderr
        for needle in needles:
            assert sum(needle in line for line in items) == 1, (needle, items)  # each on its own line
        assert "Traceback" not in r.stderr and not (out / "runs").exists()
    r = run_cli("models", "download", "scoresde_cifar10", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot be downloaded automatically" in err[0]
    assert f"{home}/checkpoints/cifar10_ddpmpp_deep_continuous/checkpoint_8.pth" in err[0]


def test_manual_download_never_touches_the_network(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be downloaded automatically: download checkpoint_8.pth"):
        zoo.download("scoresde_cifar10")
    with pytest.raises(CheckpointError, match=r"not in the cache: expected .*checkpoint_8.pth\. Download"):
        zoo.load_network("scoresde_cifar10")
    from pfdiff_bench.evaluation import refstats

    with pytest.raises(CheckpointError, match="reference cifar10-scoresde is not cached: download cifar10_stats.npz"):
        refstats.load_ref("cifar10-scoresde")


def test_unsupported_switches_are_refused_in_one_line(tmp_path):
    for key, value in (("fir", True), ("progressive", "output_skip"), ("embedding_type", "fourier"),
                       ("resblock_type", "ddpm"), ("conditional", False), ("nonlinearity", "gelu")):
        with pytest.raises(ConfigError, match=f"ncsnpp config: {key} = .* is not supported; accepted: "):
            NCSNpp(**{**TINY, key: value})
    cfg = (ROOT / "tests/configs/tiny_ncsnpp.yaml").read_text().replace("init_scale: 1.0", "init_scale: 1.0, fir: true")
    (tmp_path / "fir.yaml").write_text(cfg)
    r = run_cli("sample", "--config", str(tmp_path / "fir.yaml"), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: ncsnpp config: fir = True is not supported; accepted: False "
                                             "(the DDPM++ deep continuous checkpoint needs no other)"]


def test_adm256_fp16_path_agrees_loosely_with_float32():
    """The official sampling path (UNet torso convs in fp16) on the 256 layout: legacy-order attention too."""
    fx = _fixture("adm_imagenet256_small")
    net = zoo.build_arch(fx["arch"], fx["config"]).eval()
    net.load_state_dict(fx["state_dict"], strict=True)
    i = {k: v[:1] for k, v in fx["inputs"].items()}  # batch 1 keeps CPU half precision quick
    net.convert_to_fp16()
    assert net.state_dict()["middle_block.1.qkv.weight"].dtype == torch.float16
    with torch.no_grad():
        out = net(i["x"], i["t"], i["y"])
    ref = fx["expected"][:1]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().max() / ref.abs().max() < 2e-2
