"""Core: grids, samplers against the official fixtures, NFE accounting, refusals, analytic model, config."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pfdiff_bench import grids
from pfdiff_bench.config import load_config, validate
from pfdiff_bench.errors import ConfigError, GridError
from pfdiff_bench.models.analytic import AnalyticEps, GaussianMixture
from pfdiff_bench.samplers import SamplerSpec, plan, plan_for_length, run_sampler, valid_nfes
from pfdiff_bench.schedules import ContinuousVP, DiscreteVP
from pfdiff_bench.samplers.verify import BUNDLED_CASES

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pfdiff_bench.cli"]


def run_cli(*args, **kw):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=kw.get("cwd", ROOT), timeout=300)


# ------------------------------------------------------------------ official fixtures
def test_verify_samplers_bundled_cases_all_match():
    r = run_cli("verify", "samplers")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    for want in ("sampler cases: 252/252 matched (sampler_cases.pt)",
                 "sampler cases: 405/405 matched (sampler_cases_baselines.pt)",
                 "sampler cases: 174/174 matched (sampler_cases_ldm.pt)", "ldm cases: 174/174 matched"):
        assert want in lines, (want, lines)


def test_verify_samplers_reports_a_tampered_case(tmp_path):
    fx = torch.load(BUNDLED_CASES, weights_only=True)
    fx["cases"] = fx["cases"][:3] + fx["cases"][-2:]
    fx["cases"][1]["expected"]["x0"] = fx["cases"][1]["expected"]["x0"] * (1 + 1e-6)  # > rtol 1e-9
    fx["cases"][3]["expected"]["nfe"] += 1
    path = tmp_path / "cases.pt"
    torch.save(fx, path)
    r = run_cli("verify", "samplers", str(path))
    assert r.returncode == 1
    assert r.stdout.strip().splitlines()[-1] == "sampler cases: 3/5 matched"
    assert sum(line.startswith("FAIL") for line in r.stdout.splitlines()) == 2


# ------------------------------------------------------------------ grids (values quoted in spec §1.2, §2.4)
def test_ddim_codebase_grids():
    assert grids.ddim_uniform(4) == [0, 333, 666, 999]
    assert grids.ddim_uniform(7) == [0, 166, 333, 499, 666, 832, 999]
    assert grids.ddim_quad(4) == [0, 88, 355, 800]
    assert grids.ddim_quad(13) == [0, 5, 22, 50, 88, 138, 200, 272, 355, 450, 555, 672, 800]
    assert grids.ddim_quad(39)[:3] == [0, 0, 2]


def test_guided_respacing_grids():
    assert grids.ddim_respacing(4) == [0, 250, 500, 750]
    assert grids.ddim_respacing(7) == list(range(0, 859, 143))
    assert grids.ddim_respacing(13)[-1] == 924 and grids.ddim_respacing(10)[-1] == 900
    assert len(grids.ddim_respacing(37)) == 37 and 999 not in grids.ddim_respacing(37)
    assert len(grids.ddim_respacing(57)) == 57 and {986, 969}.isdisjoint(grids.ddim_respacing(57))
    with pytest.raises(GridError, match="no 'ddim41' respacing"):
        grids.ddim_respacing(41)
    sec = grids.section_respacing(10)
    assert sec[0] == 0 and sec[-1] == 999 and len(sec) == 10


def test_dpm_grids_endpoints_and_logsnr_uniformity():
    ns = DiscreteVP.linear()
    for kind in grids.DPM_GRIDS:
        ts = grids.dpm_time_steps(ns, kind, 1.0, 1e-3, 6)
        assert len(ts) == 7 and abs(float(ts[0]) - 1.0) < 1e-9 and abs(float(ts[-1]) - 1e-3) < 1e-9
    lam = ns.marginal_lambda(grids.dpm_time_steps(ns, "logSNR", 1.0, 1e-3, 5))
    assert torch.allclose(lam.diff(), lam.diff()[0].expand(5), atol=1e-9)
    vp = ContinuousVP()
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    assert torch.allclose(vp.inverse_lambda(vp.marginal_lambda(t)), t, atol=1e-12)


# ------------------------------------------------------------------ NFE accounting and refusals
def _specs():
    out = []
    for pf in [None, *grids.PFDIFF_VARIANTS]:
        out += [SamplerSpec(convention="ddim", grid="uniform", pfdiff=pf),
                SamplerSpec(convention="ddim", grid="quad", pfdiff=pf),
                SamplerSpec(convention="guided", pfdiff=pf)]
        for solver in ("dpm-solver", "dpm-solver++"):
            for order in (1, 2, 3):
                out.append(SamplerSpec(solver=solver, convention="dpm_solver", order=order, pfdiff=pf))
    out += [SamplerSpec(solver="dpm-solver++", convention="dpm_solver", order=o, method="multistep",
                        grid="time_uniform") for o in (1, 2, 3)]
    out += [SamplerSpec(solver="dpm-solver", convention="dpm_solver", order=3, method="singlestep")]
    return out


def test_counted_nfe_equals_request_for_every_accepted_combination():
    gmm = GaussianMixture.random(3, (2, 2, 2), seed=1)
    schedules = {"linear": DiscreteVP.linear(), "cosine": DiscreteVP.cosine()}
    checked = refused = 0
    for spec in _specs():
        sch = schedules["cosine" if spec.convention == "guided" else "linear"]
        model = AnalyticEps(gmm, sch.alpha_bar_at_model_time)
        ok = set(valid_nfes(spec, 20))
        for nfe in range(1, 21):
            x = torch.randn(2, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(nfe))
            if nfe not in ok:
                with pytest.raises(GridError, match="NFE values that work"):
                    plan(spec, sch, nfe)
                refused += 1
                continue
            res = run_sampler(plan(spec, sch, nfe), model, sch, x)
            assert res.nfe == nfe == len(res.call_t), (spec, nfe)
            assert torch.isfinite(res.x).all()
            checked += 1
    assert checked > 700 and refused > 50


def test_ddim_convention_tails_finish_any_grid_length():
    sch = DiscreteVP.linear()
    for k, h in grids.PFDIFF_VARIANTS:
        for length in range(2, 30):
            p = plan_for_length(SamplerSpec(pfdiff=(k, h)), sch, length)
            assert p.nfe == 1 + math.ceil((length - 1) / (k + 1))


def test_guided_and_dpm_pfdiff_refuse_grids_that_stop_early():
    with pytest.raises(GridError, match="stop early"):
        plan_for_length(SamplerSpec(convention="guided", pfdiff=(2, 1)), DiscreteVP.cosine(), 9)
    with pytest.raises(GridError, match="stop early"):
        plan_for_length(SamplerSpec(solver="dpm-solver", convention="dpm_solver", order=2, pfdiff=(1, 1)),
                        DiscreteVP.linear(), 8)
    with pytest.raises(GridError, match="multistep"):
        SamplerSpec(solver="dpm-solver++", convention="dpm_solver", method="multistep", pfdiff=(2, 1))


@pytest.mark.parametrize("args, needle", [
    (["--sampler", "euler"], "'euler' is not one of"),
    (["--pfdiff", "4,1"], "not one of the six variants"),
    (["--nfe", "0"], "'sampling.nfe' must be at least 1"),
    (["--sampler", "dpm-solver", "--order", "2", "--pfdiff", "1,1", "--nfe", "5"], "NFE values that work: 4, 6, 8"),
    (["--config", "guided_typo.yaml"], "config file not found"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = run_cli("sample", *args, "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], r.stderr
    assert "Traceback" not in r.stderr


def test_misspelt_config_key_names_the_key(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    cfg["sampler"]["pfdif"] = "2,1"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_cli("sample", "--config", str(path))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "unknown key 'sampler.pfdif'" in line and "did you mean 'pfdiff'" in line and "\n" not in line


def test_config_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="'sampling.nfe' must be an integer"):
        validate({"sampling": {"nfe": "four"}})
    with pytest.raises(ConfigError, match="'model.type' = 'vae' is not accepted; accepted: analytic, ddpm, adm"):
        validate({"model": {"type": "vae"}})
    with pytest.raises(ConfigError, match="unknown key 'samplers'"):
        validate({"samplers": {}})
    assert load_config("toy")["sampler"]["convention"] == "ddim"


# ------------------------------------------------------------------ analytic model
def _log_density(gmm: GaussianMixture, x, a):
    """log p_t(x) from the Gaussian components directly (independent of the closed forms)."""
    xf = x.flatten(1)
    mu = gmm.means.flatten(1)
    v = a * gmm.std**2 + 1 - a
    d2 = ((xf[:, None] - math.sqrt(a) * mu[None]) ** 2).sum(-1)
    logc = torch.log(gmm.weights) - d2 / (2 * v) - 0.5 * gmm.dim * torch.log(2 * math.pi * v)
    return logc, torch.logsumexp(logc, 1)


def test_analytic_eps_and_classifier_gradient_match_autograd():
    gmm = GaussianMixture(torch.randn(3, 2, 3, dtype=torch.float64) * 0.5, std=[0.1, 0.2, 0.15],
                          weights=[0.2, 0.5, 0.3])
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    a = 0.4
    logc, logp = _log_density(gmm, x, a)
    score = torch.autograd.grad(logp.sum(), x, retain_graph=True)[0]
    at = torch.full((5,), a, dtype=torch.float64)
    assert torch.allclose(gmm.eps(x.detach(), at), -math.sqrt(1 - a) * score, atol=1e-12)
    y = torch.tensor([0, 1, 2, 1, 0])
    logpost = (logc - logp[:, None])[torch.arange(5), y]
    g = torch.autograd.grad(logpost.sum(), x)[0]
    assert torch.allclose(gmm.grad_log_p(x.detach(), at, y), g, atol=1e-12)


def test_ddim_with_1000_steps_converges_to_the_exact_ode_solution():
    cfg = load_config("toy")
    from pfdiff_bench.evaluation.exact import plan_endpoints, rms_to_exact
    from pfdiff_bench.sampling.setup import build

    errors = {}
    for nfe in (100, 1000):
        setup = build(cfg, torch.device("cpu"), nfe=nfe)
        x_T = torch.randn(8, *setup.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        res = setup.sample(x_T)
        assert res.nfe == nfe
        exact = setup.gmm.reference_solution(x_T, *plan_endpoints(setup))
        errors[nfe] = float(rms_to_exact(res.x, exact).mean())
    assert errors[1000] < 2e-3
    assert errors[1000] < errors[100] / 5  # first order: ~10x smaller for 10x the steps


def test_reference_solution_is_converged():
    gmm = GaussianMixture.random(4, (3, 4, 4), seed=3)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a0 = float(DiscreteVP.linear().alphas_cumprod[999])
    fine = gmm.reference_solution(x, a0, 1.0, steps=1000)
    coarse = gmm.reference_solution(x, a0, 1.0)  # the default number of steps
    assert float((fine - coarse).abs().max()) < 1e-6  # sampler errors are 1e-3 and up
