"""benchmarks/gpu_check.py and the FLOP count of the benchmarks (issue #20), on CPU.

The FLOP count is checked against an independent hand count (forward hooks on every convolution and linear
layer plus the two attention matmuls of each DDPM attention block), for both attention kernels; the
projection against the arithmetic of the table files; the smoke run for the rows of every network.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks import gpu_check
from benchmarks.common import count_flops, cpu_peak_gflops
from pfdiff_bench.models import fastpath
from pfdiff_bench.models.ddpm_unet import AttnBlock, DDPMUNet

TINY = dict(in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
            dropout=0.0, resamp_with_conv=True, image_size=16)


def _hand_count(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    """2 FLOP per multiply-add of every Conv2d / Linear output, + QK^T and AV of every attention block."""
    total = [0]

    def conv(m, args, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, args, out):
        total[0] += 2 * out.numel() * m.in_features

    def attn(m, args, out):
        b, c, h, w = args[0].shape
        total[0] += 2 * (2 * b * (h * w) ** 2 * c)

    hooks = []
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, AttnBlock):
            hooks.append(m.register_forward_hook(attn))
    with torch.no_grad():
        net(x, t)
    for h in hooks:
        h.remove()
    return total[0]


@pytest.mark.parametrize("kernel", ["einsum", "sdpa"])
def test_flop_count_equals_hand_count_of_a_tiny_ddpm(kernel):
    torch.manual_seed(0)
    net = fastpath.set_attention(DDPMUNet(**TINY).eval(), kernel)
    x, t = torch.randn(3, 3, 16, 16), torch.full((3,), 500.0)
    with torch.no_grad():
        counted = count_flops(net, x, t)
    assert counted == _hand_count(net, x, t) > 0
    with torch.no_grad():  # linear in the batch
        assert count_flops(net, torch.randn(6, 3, 16, 16), torch.full((6,), 500.0)) == 2 * counted


def test_cpu_sdpa_backward_is_counted():
    q = torch.randn(2, 64, 16, requires_grad=True)
    fwd = 2 * (2 * 2 * 64 * 64 * 16)
    assert count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q) == fwd
    # torch's SDPA backward formula: recompute the scores + 4 matmuls = 2.5x the forward
    got = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    assert got == fwd + 5 * fwd // 2


def test_cpu_peak_estimate_is_cores_clock_lanes():
    p = cpu_peak_gflops(2)
    if p["peak_gflops"] is None:
        assert p["reason"]
    else:
        assert p["peak_gflops"] == pytest.approx(2 * p["clock_mhz"] / 1e3 * p["fp32_lanes"] * 4)


def _row(section, sampler, nfe, img_s, gflop):
    return {"section": section, "config": section, "sampler": sampler, "nfe": nfe, "batch": 2,
            "images_per_s": img_s, "gflop_per_image_nfe": gflop}


def test_projection_arithmetic():
    rows = [_row("cifar10", "DDIM", 4, 100.0, 12.0), _row("cifar10", "DDIM", 10, 45.0, 12.0),  # 400 vs 450 evals/s
            _row("cifar10", "DDIM + PFDiff-2_1", 10, 99.0, 12.0), _row("sd", "DDIM", 4, 1.0, 1600.0)]
    p = gpu_check.project_tables(rows, smoke=True)
    t3 = p["table3"]  # 11 rows (4 extra) x NFE 4+6+8+10+15+20 = 63 calls x 50k samples
    assert t3["image_evaluations"] == 11 * 63 * 50000
    assert t3["hours"] == pytest.approx(11 * 63 * 50000 / 450.0 / 3600)
    assert t3["hours_paper_rows"] == pytest.approx(7 * 63 * 50000 / 450.0 / 3600)
    assert t3["eflop"] == pytest.approx(11 * 63 * 50000 * 12.0 / 1e9)
    assert t3["at"]["nfe"] == 10 and t3["at"]["sampler"] == "DDIM"
    sd = p["sd_cfg7.5"]  # the NFE axis offset: network calls = column - 1
    assert sd["image_evaluations"] == 12 * sum(n - 1 for n in (5, 6, 8, 10, 15, 20)) * 10000
    assert sd["hours"] == pytest.approx(sd["image_evaluations"] / 4.0 / 3600)
    assert p["table2"]["hours"] is None and "no timed imagenet64 row" in p["table2"]["reason"]
    assert p["imagenet256"]["hours"] is None and "not in the sweep" in p["imagenet256"]["reason"]
    assert p["toy"]["hours"] is None


def _smoke(tmp_path, skip):
    out = tmp_path / "g.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = gpu_check.main(["--smoke", "--out", str(out), "--skip", skip, "--budget-s", "600"])
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert rc == 0 and r["errors"] == [] and r["smoke"] is True
    return r


def _check_rows(r, sections):
    for sec in sections:
        rows = [x for x in r["rows"] if x["section"] == sec]
        assert {x["sampler"].count("PFDiff") for x in rows} == {0, 1}, sec  # baseline and PFDiff-2_1
        for x in rows:
            assert x["finite"] and x["gflop_per_image_nfe"] > 0 and x["tflops"] > 0 and "smoke" in x["config"]
        assert r["best"][f"{rows[0]['config']} NFE 4"]["pfdiff_over_ddim_ms_per_nfe"]


def test_gpu_check_smoke_new_networks_and_projection(tmp_path):
    r = _smoke(tmp_path, "imagenet64,cifar10,inception,overhead")
    _check_rows(r, ["scoresde", "sd"])
    assert r["networks"]["sd_unet"]["config"] == "smoke (reduced)"
    proj = r["projection"]
    assert set(proj) >= {"table2", "table3", "scoresde", "sd_cfg1.5", "sd_cfg7.5"}
    for name in ("scoresde", "sd_cfg1.5", "sd_cfg7.5"):
        assert proj[name]["hours"] > 0 and proj[name]["eflop"] > 0 and "smoke" in proj[name]["note"]
    assert proj["table2"]["hours"] is None  # skipped section: no timed row, said why
    assert "no timed" in proj["table2"]["reason"]


@pytest.mark.slow
def test_gpu_check_smoke_all_sections(tmp_path):
    r = _smoke(tmp_path, "")
    _check_rows(r, ["imagenet64", "cifar10", "scoresde", "sd"])
    assert r["inception"]["images_per_s"] > 0 and r["overhead"]["rows"]
    assert all(r["projection"][n]["hours"] > 0 for n in ("table2", "table3", "scoresde", "sd_cfg7.5"))
