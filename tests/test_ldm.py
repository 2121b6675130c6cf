"""The ldm convention (Stable Diffusion samplers, PFDIFF_LDM.md) against the official fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfdiff_bench.errors import GridError
from pfdiff_bench.models.analytic import AnalyticEps, GaussianMixture
from pfdiff_bench.samplers import SamplerSpec, plan, plan_for_length, run_sampler, valid_nfes
from pfdiff_bench.samplers.ldm import ldm_uniform
from pfdiff_bench.schedules import DiscreteVP
from pfdiff_bench.samplers.verify import BUNDLED_LDM_CASES, iter_results

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures" / "samplers_ldm" / "cases.pt"


def _ldm_schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return DiscreteVP(betas=betas, name="ldm_linear")


def test_every_bundled_ldm_case_matches():
    results = list(iter_results(BUNDLED_LDM_CASES))
    assert len(results) == 174
    bad = [f"{r.id}: {r.detail}" for r in results if not r.ok]
    assert not bad, bad
    assert all(r.codebase == "ldm" for r in results)


def test_bundled_copy_is_the_shared_fixture():
    if not SHARED.is_file():
        pytest.fail(f"shared fixture missing: {SHARED}")
    assert SHARED.read_bytes() == BUNDLED_LDM_CASES.read_bytes()


def test_tampered_ldm_cases_fail(tmp_path):
    fx = torch.load(BUNDLED_LDM_CASES, weights_only=True)
    cases = [c for c in fx["cases"] if c["guidance"]["scale"] != 1.0][:4]
    cases[0]["expected"]["x0"] = cases[0]["expected"]["x0"] * (1 + 10 * cases[0]["rtol"])
    cases[1]["expected"]["call_batch"] = [8] * len(cases[1]["expected"]["call_batch"])  # CFG as B rows
    cases[2]["expected"]["call_t"] = list(reversed(cases[2]["expected"]["call_t"]))
    fx["cases"] = cases
    path = tmp_path / "ldm.pt"
    torch.save(fx, path)
    r = subprocess.run([sys.executable, "-m", "pfdiff_bench.cli", "verify", "samplers", str(path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "sampler cases: 1/4 matched"
    assert "call batch sizes" in r.stdout and "sample rel. error" in r.stdout and "call times" in r.stdout


def test_grid_and_end_point():
    assert ldm_uniform(4) == [1, 333, 666, 999]
    assert ldm_uniform(7) == [1, 167, 333, 500, 666, 832, 999]
    assert ldm_uniform(10) == [1, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    sch = _ldm_schedule()
    p = plan(SamplerSpec(convention="ldm"), sch, 10)
    assert p.timesteps == list(reversed(ldm_uniform(10))) and p.nfe == 10
    p = plan(SamplerSpec(convention="ldm", pfdiff=(2, 1)), sch, 4)
    assert p.length == 10 and p.nfe == 4  # the run scripts' S = s·N − k


def test_stale_tail_lengths_are_refused_with_the_nfes_that_work():
    sch = _ldm_schedule()
    for k, h, lengths in ((2, 1, (3, 6, 9)), (2, 2, (3, 6)), (3, 1, (3, 7)), (3, 3, (7, 11))):
        spec = SamplerSpec(convention="ldm", pfdiff=(k, h))
        for L in lengths:
            with pytest.raises(GridError, match=r"stale or undefined springboard; NFE values that work: 1, 2, 3"):
                plan_for_length(spec, sch, L)
        plan_for_length(spec, sch, lengths[0] + 1)  # (S−1) mod s ≠ 2 runs
    assert valid_nfes(SamplerSpec(convention="ldm", pfdiff=(3, 2)), 5) == [1, 2, 3, 4, 5]
    plan_for_length(SamplerSpec(convention="ldm", pfdiff=(1, 1)), sch, 6)  # s = 2 has no such tail


def test_cfg_is_one_batched_call_and_ends_at_alpha0():
    sch = _ldm_schedule()
    gmm = GaussianMixture.random(3, [2, 4, 4], seed=1)
    model = AnalyticEps(gmm, sch.alpha_bar_at_model_time, class_cond=True)
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    p = plan_for_length(SamplerSpec(convention="ldm"), sch, 1)
    res = run_sampler(p, model, sch, x, y=y, guidance_scale=3.0, uncond=torch.full_like(y, -1))
    assert res.nfe == 1 and res.call_batch == [10] and res.call_t == [1.0]  # linspace(0, 998, 1) + 1
    # independent: one DDIM step from A[1] to A[0] (not to 1) with ε = ε_u + 3(ε_c − ε_u)
    a, b = float(torch.tensor(sch.alphas_cumprod[1].item()).float()), float(torch.tensor(sch.alphas_cumprod[0].item()).float())
    ab = torch.full((5,), float(sch.alphas_cumprod[1]), dtype=torch.float64)
    e_u, e_c = gmm.eps(x, ab), gmm.eps(x, ab, y)
    e = e_u + 3.0 * (e_c - e_u)
    ref = b ** 0.5 * (x - (1 - a) ** 0.5 * e) / a ** 0.5 + (1 - b) ** 0.5 * e
    assert torch.allclose(res.x, ref, rtol=1e-6, atol=1e-7)
    res1 = run_sampler(p, model, sch, x, y=y, guidance_scale=1.0, uncond=torch.full_like(y, -1))
    assert res1.call_batch == [5]


def test_ldm_linear_schedule_is_the_float32_buffer_of_the_fixture_table():
    from pfdiff_bench.config import validate
    from pfdiff_bench.schedules import schedule_from_config

    fx = torch.load(BUNDLED_LDM_CASES, weights_only=True)["schedules"]["ldm_linear"]
    sch = schedule_from_config(validate({"schedule": {"type": "ldm_linear"}})["schedule"])
    assert torch.equal(sch.alphas_cumprod, fx["alphas_cumprod_f32"])
    assert abs(float(sch.alphas_cumprod[0]) - 0.99915) < 1e-7
