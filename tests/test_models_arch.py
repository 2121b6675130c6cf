"""The networks against the official-code fixtures, fp16 conversion, and the adapters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfdiff_bench.errors import ConfigError
from pfdiff_bench.models.adapters import ADMClassifierGrad, ADMEps, DDPMEps
from pfdiff_bench.models.arch_verify import default_arch_dir, verify_arch
from pfdiff_bench.models.zoo import build_arch

ROOT = Path(__file__).resolve().parents[1]
ARCH = default_arch_dir()


def _fixture(name: str) -> dict:
    return torch.load(ARCH / f"{name}.pt", map_location="cpu", weights_only=True)


def _fixture_net(name: str) -> tuple[torch.nn.Module, dict]:
    fx = _fixture(name)
    net = build_arch(fx["arch"], fx["config"]).eval()
    net.load_state_dict(fx["state_dict"], strict=True)
    return net, fx


def test_verify_arch_bundled_all_match():
    n_files = len(list(ARCH.glob("*.pt"))) + len(list((ARCH / "manifests").glob("*.json")))
    assert n_files == 15  # 8 numerical fixtures (one with a .pth beside it) + 7 manifests
    matched, total, failures = verify_arch(ARCH)
    assert failures == []
    assert (matched, total) == (n_files, n_files)


def test_cli_verify_arch_output():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pfdiff_bench.cli", "verify", "arch"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "arch fixtures: 15/15 matched"


def test_verify_arch_reports_every_failure(tmp_path):
    (tmp_path / "manifests").mkdir()
    fx = _fixture("adm_classifier64_small")
    fx["expected"] = fx["expected"] + 1e-4  # 10x the tolerance
    torch.save(fx, tmp_path / "perturbed.pt")
    fx = _fixture("adm_imagenet64_small")
    fx["config"]["use_new_attention_order"] = False  # wrong q/k/v layout still loads
    torch.save(fx, tmp_path / "legacy_order.pt")
    fx = _fixture("ddpm_cifar10_small")
    fx["state_dict"].pop("conv_out.bias")
    torch.save(fx, tmp_path / "missing_key.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    m = json.loads((ARCH / "manifests" / "ddpm_lsun.json").read_text())
    m["state_dict"][3], m["state_dict"][4] = m["state_dict"][4], m["state_dict"][3]
    (tmp_path / "manifests" / "reordered.json").write_text(json.dumps(m))
    m = json.loads((ARCH / "manifests" / "adm_imagenet64.json").read_text())
    m["num_parameters"] += 1
    (tmp_path / "manifests" / "count.json").write_text(json.dumps(m))
    shutil.copy(ARCH / "ddpm_lsun_small.pt", tmp_path / "good.pt")

    matched, total, failures = verify_arch(tmp_path)
    assert (matched, total) == (1, 7)
    assert len(failures) == 6
    text = "\n".join(failures)
    for name in ["perturbed.pt", "legacy_order.pt", "missing_key.pt", "junk.pt", "manifests/reordered.json",
                 "manifests/count.json"]:
        assert f"FAIL {name}:" in text
    assert "good.pt" not in text
    assert "order differs" in text and "parameters" in text


def test_verify_arch_empty_dir_is_a_failure(tmp_path):
    matched, total, failures = verify_arch(tmp_path)
    assert (matched, total) == (0, 1) and len(failures) == 1
    with pytest.raises(ConfigError):
        verify_arch(tmp_path / "absent")


def test_verify_arch_driven_by_fixture_config(tmp_path):
    """A fixture of another size (made here from our own network) runs from its own config fields."""
    configs = {
        "ddpm_unet": dict(in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                          dropout=0.0, resamp_with_conv=True, image_size=16),
        "adm_unet": dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                         attention_resolutions=[2], dropout=0, channel_mult=[1, 2], conv_resample=True, dims=2,
                         num_classes=10, use_checkpoint=False, use_fp16=False, num_heads=4, num_head_channels=-1,
                         num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
                         use_new_attention_order=True),
        "adm_classifier": dict(image_size=16, in_channels=3, model_channels=32, out_channels=5, num_res_blocks=1,
                               attention_resolutions=[2], dropout=0, channel_mult=[1, 2], conv_resample=True,
                               dims=2, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=32,
                               num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
                               use_new_attention_order=False, pool="attention"),
    }
    g = torch.Generator().manual_seed(1)
    for arch, cfg in configs.items():
        torch.manual_seed(2)
        net = build_arch(arch, cfg).eval()
        x = torch.randn(2, 3, 16, 16, generator=g)
        t = torch.tensor([3.0, 700.0]) if arch == "ddpm_unet" else torch.tensor([3, 700])
        y = torch.tensor([1, 9]) if arch == "adm_unet" else None
        with torch.no_grad():
            out = net(x, t, y) if y is not None else net(x, t)
        torch.save({"format": "pfdiff-arch-fixture/1", "arch": arch, "config": cfg, "state_dict": net.state_dict(),
                    "inputs": {"x": x, "t": t, "y": y}, "expected": out, "rtol": 1e-5, "atol": 1e-5,
                    "num_parameters": sum(p.numel() for p in net.parameters())}, tmp_path / f"{arch}.pt")
    assert verify_arch(tmp_path) == (3, 3, [])


def test_adm_fp16_conversion_and_loose_agreement():
    net, fx = _fixture_net("adm_imagenet64_small")
    i = {k: v[:2] for k, v in fx["inputs"].items()}  # batch 2 keeps CPU half precision quick
    with torch.no_grad():
        ref = net(i["x"], i["t"], i["y"])
    net.convert_to_fp16()
    half = {k for k, v in net.state_dict().items() if v.dtype == torch.float16}
    convs = {f"{name}.{p}" for name, m in net.named_modules()
             if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and name.split(".")[0] != "out"
             for p in ("weight", "bias")}
    assert half == convs
    assert "input_blocks.0.0.weight" in half and "middle_block.1.qkv.weight" in half
    for k in ("time_embed.0.weight", "label_emb.weight", "out.0.weight", "out.2.weight",
              "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.in_layers.0.weight",
              "middle_block.1.norm.weight"):
        assert net.state_dict()[k].dtype == torch.float32, k
    with torch.no_grad():
        out = net(i["x"], i["t"], i["y"])
    assert out.dtype == torch.float32
    rel = (out - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(out).all() and rel < 2e-2, rel
    net.convert_to_fp32()
    assert all(v.dtype == torch.float32 for v in net.state_dict().values())

    cls, fx = _fixture_net("adm_classifier64_small")
    cls.convert_to_fp16()
    sd = cls.state_dict()
    assert sd["input_blocks.0.0.weight"].dtype == torch.float16
    assert sd["out.2.qkv_proj.weight"].dtype == torch.float32  # the pool head stays float32
    with torch.no_grad():
        logits = cls(fx["inputs"]["x"], fx["inputs"]["t"])
    assert logits.dtype == torch.float32
    assert (logits - fx["expected"]).abs().max() / fx["expected"].abs().max() < 2e-2


def test_adapters_match_networks():
    net, fx = _fixture_net("adm_imagenet64_small")
    i = fx["inputs"]
    eps = ADMEps(net)
    x64 = i["x"].double()
    out = eps(x64, i["t"].double(), i["y"])
    assert out.dtype == torch.float64 and out.shape == i["x"].shape
    assert torch.allclose(out.float(), fx["expected"][:, :3], atol=fx["atol"], rtol=fx["rtol"])
    with pytest.raises(ConfigError):
        eps(i["x"], i["t"])
    # fractional time is passed through, not rounded
    a = eps(i["x"][:1], torch.tensor([537.25]), i["y"][2:])
    b = eps(i["x"][:1], torch.tensor([537.0]), i["y"][2:])
    assert not torch.equal(a, b)

    ddpm, fx = _fixture_net("ddpm_cifar10_small")
    i = fx["inputs"]
    out = DDPMEps(ddpm)(i["x"], i["t"])
    assert torch.allclose(out, fx["expected"], atol=fx["atol"], rtol=fx["rtol"])
    x1 = i["x"][:1]
    assert torch.equal(DDPMEps(ddpm)(x1, torch.tensor(10.0)), DDPMEps(ddpm)(x1, torch.tensor([10.0])))

    cls, fx = _fixture_net("adm_classifier64_small")
    i = fx["inputs"]
    y = torch.tensor([3, 999, 417])
    grad = ADMClassifierGrad(cls)(i["x"], i["t"], y)
    assert grad.shape == i["x"].shape and grad.dtype == i["x"].dtype
    assert not grad.requires_grad
    x = i["x"].clone().requires_grad_(True)
    lp = torch.log_softmax(cls(x, i["t"]), dim=-1)[torch.arange(3), y].sum()
    (ref,) = torch.autograd.grad(lp, x)
    assert torch.allclose(grad, ref, atol=1e-6, rtol=1e-5)
    other = ADMClassifierGrad(cls)(i["x"], i["t"], torch.tensor([4, 998, 416]))
    assert not torch.allclose(grad, other)
