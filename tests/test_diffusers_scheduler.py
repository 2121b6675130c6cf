"""PFDiff as diffusers schedulers: equality with pfdiff-bench's own sampler, the ldm convention, a tiny
Stable Diffusion pipeline, and the flow-matching (FLUX) variant against a direct spec §6 loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from pfdiff_bench.diffusers import PFDiffFlowMatchEulerScheduler, PFDiffScheduler  # noqa: E402
from pfdiff_bench.errors import PFDiffError  # noqa: E402
from pfdiff_bench.models.analytic import AnalyticEps, GaussianMixture  # noqa: E402
from pfdiff_bench.samplers import SamplerSpec, plan, run_sampler  # noqa: E402
from pfdiff_bench.schedules import DiscreteVP  # noqa: E402

VARIANTS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)]
NFES = range(4, 21)
# Stable Diffusion v1's scheduler_config.json as stored on the hub (PNDM; no timestep_spacing key)
SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Out:
    def __init__(self, sample):
        self.sample = sample


class AnalyticDiffusersModel(torch.nn.Module):
    """The analytic mixture as a diffusers-style model: model(sample, t).sample, ᾱ from the scheduler table."""

    def __init__(self, gmm: GaussianMixture, alphas_cumprod: torch.Tensor, prediction: str = "epsilon"):
        super().__init__()
        self.gmm, self.table, self.prediction = gmm, alphas_cumprod.double(), prediction

    def forward(self, sample, timestep):
        a = self.table[torch.as_tensor(timestep).long().reshape(-1)].expand(sample.shape[0])
        eps = self.gmm.eps(sample, a)
        if self.prediction == "epsilon":
            return _Out(eps)
        ab = a.reshape(-1, *([1] * (sample.dim() - 1))).to(sample.dtype)
        x0 = (sample - (1 - ab).sqrt() * eps) / ab.sqrt()
        return _Out(ab.sqrt() * eps - (1 - ab).sqrt() * x0)  # v-prediction


def diffusers_loop(scheduler, model, x_T, nfe):
    """The standard denoising loop of a diffusers pipeline, unchanged."""
    scheduler.set_timesteps(nfe)
    x = x_T * scheduler.init_noise_sigma
    calls = 0
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t).sample
        calls += 1
        x = scheduler.step(out, t, x).prev_sample
    return x, calls


def bench_pfdiff(scheduler, eps_model, x_T, nfe, k, h):
    """pfdiff-bench's own sampler (ddim convention, uniform grid) on the scheduler's ᾱ table."""
    schedule = DiscreteVP(alphas_cumprod=scheduler.alphas_cumprod.double())
    p = plan(SamplerSpec(convention="ddim", grid="uniform", pfdiff=(k, h)), schedule, nfe)
    return p, run_sampler(p, eps_model, schedule, x_T)


def ldm_reference(eps_fn, A32: torch.Tensor, x_T: torch.Tensor, S: int, k: int, h: int) -> torch.Tensor:
    """PFDIFF_LDM.md L2/L4/L6 written directly: grid int(linspace(0, 998, S)) + 1, positions n = 0..S−1
    with the official skip rule, Φ with ᾱ = A32[τ] and the end at A32[0] (S = s·N − k: no tail)."""
    s = k + 1
    tau = [int(v) + 1 for v in np.linspace(0, 998, S)][::-1] + [None]          # τ_S = end

    def abar(n):
        return float(A32[0]) if tau[n] is None else float(A32[tau[n]])

    def phi(x, e, i, j):
        a, b = abar(i), abar(j)
        return math.sqrt(b) * (x - math.sqrt(1 - a) * e) / math.sqrt(a) + math.sqrt(1 - b) * e

    x, Q = x_T, None
    for n in range(S):
        if n != 0 and (n - 1) % s != 0:
            continue
        if n == 0:
            Q = eps_fn(x, tau[0])
            x = phi(x, Q, 0, 1)
            continue
        x_hat = phi(x, Q, n, n + h)
        Q = eps_fn(x_hat, tau[n + h])
        x = phi(x, Q, n, n + s)
        if n + s == S:
            break
    return x


# ----------------------------------------------------------------------------- ddim convention
@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture.random(4, (2, 4, 4), std=0.1, seed=3)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_convention_equals_bench_sampler_analytic(gmm, prediction):
    """All six (k, h) x NFE 4..20: same grid and same x_0 as pfdiff-bench's sampler (float64 state)."""
    x_T = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ran = 0
    for k, h in VARIANTS:
        sched = PFDiffScheduler.from_config(diffusers.DDIMScheduler().config, k=k, h=h,
                                            prediction_type=prediction)
        model = AnalyticDiffusersModel(gmm, sched.alphas_cumprod, prediction)
        eps_model = AnalyticEps(gmm, lambda t, tab=sched.alphas_cumprod.double(): tab[t.long()])
        for nfe in NFES:
            x, calls = diffusers_loop(sched, model, x_T, nfe)
            p, ref = bench_pfdiff(sched, eps_model, x_T, nfe, k, h)
            assert sched.grid == p.timesteps
            assert calls == nfe == ref.nfe
            assert sched.timesteps.tolist() == [int(t) for t in ref.call_t]
            torch.testing.assert_close(x, ref.x, rtol=1e-10, atol=1e-10)
            ran += 1
    assert ran == 6 * 17


def _tiny_unet2d():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def test_ddim_convention_equals_bench_sampler_unet2d():
    """The same check with a tiny random UNet2DModel in float32 (all six (k, h) x NFE 4..20, ~13 s)."""
    unet = _tiny_unet2d()
    x_T = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    eps_model = lambda x, t, y=None: unet(x, t.long()).sample  # noqa: E731
    ran = 0
    with torch.no_grad():
        for k, h in VARIANTS:
            sched = PFDiffScheduler.from_config(diffusers.DDPMScheduler().config, k=k, h=h)
            for nfe in NFES:
                x, calls = diffusers_loop(sched, unet, x_T, nfe)
                _, ref = bench_pfdiff(sched, eps_model, x_T, nfe, k, h)
                assert calls == nfe == ref.nfe
                torch.testing.assert_close(x, ref.x, rtol=1e-5, atol=1e-5)  # float32 round-off
                ran += 1
    assert ran == 6 * 17


# ----------------------------------------------------------------------------- ldm convention
def test_sd_config_gives_ldm_grid_and_end():
    sched = PFDiffScheduler.from_config(diffusers.PNDMScheduler.from_config(SD_CONFIG).config, k=2, h=1)
    assert sched.config.timestep_spacing == "pfdiff" and sched.config.steps_offset == 1
    sched.set_timesteps(4)
    assert sched.grid == [999, 888, 777, 666, 555, 444, 333, 222, 111, 1]
    assert sched.timesteps.tolist() == [999, 777, 444, 111]               # PFDIFF_LDM.md L6, PFDiff_2_1
    assert sched._alpha[-1] == float(sched.alphas_cumprod[0])              # ends at ᾱ_0, not 1
    for (k, h), evals in {(1, 1): [999, 666, 333, 1], (3, 1): [999, 832, 500, 167],
                          (3, 2): [999, 749, 416, 84], (3, 3): [999, 666, 333, 1]}.items():
        s = PFDiffScheduler.from_config(SD_CONFIG, k=k, h=h)
        s.set_timesteps(4)
        assert s.timesteps.tolist() == evals


def test_ldm_convention_equals_direct_reference_analytic(gmm):
    x_T = torch.randn((2, 2, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ran = 0
    for k, h in VARIANTS:
        sched = PFDiffScheduler.from_config(SD_CONFIG, k=k, h=h)
        model = AnalyticDiffusersModel(gmm, sched.alphas_cumprod)
        A32 = sched.alphas_cumprod
        eps_fn = lambda x, t: gmm.eps(x, torch.full((x.shape[0],), float(A32[t]), dtype=torch.float64))  # noqa: E731
        for nfe in NFES:
            x, calls = diffusers_loop(sched, model, x_T, nfe)
            ref = ldm_reference(eps_fn, A32, x_T, (k + 1) * nfe - k, k, h)
            assert calls == nfe
            torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
            ran += 1
    assert ran == 6 * 17


# ----------------------------------------------------------------------------- tiny Stable Diffusion
def _tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters] + ["ca", "cat</w>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)


def _tiny_sd_pipeline(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=16,
                                        intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=64, max_position_embeddings=16))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=_tokenizer(tmp_path), unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SD_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stable_diffusion_pipeline_nfe_and_ldm_equality(tmp_path):
    pipe = _tiny_sd_pipeline(tmp_path)
    calls = []
    pipe.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    scale = 7.5
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True)
        emb = torch.cat([uncond, cond])

        def eps_fn(x, t):  # PFDIFF_LDM.md L3: one batched call, first half unconditional
            out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
            e_u, e_c = out.chunk(2)
            return e_u + scale * (e_c - e_u)

        for k, h in VARIANTS:
            pipe.scheduler = PFDiffScheduler.from_config(pipe.scheduler.config, k=k, h=h)
            for nfe in (4, 9):
                calls.clear()
                lat = pipe("a cat", num_inference_steps=nfe, guidance_scale=scale, height=16, width=16,
                           latents=x_T.clone(), output_type="latent").images
                assert calls == [2] * nfe  # one batched CFG pair per NFE
                ref = ldm_reference(eps_fn, pipe.scheduler.alphas_cumprod, x_T, (k + 1) * nfe - k, k, h)
                torch.testing.assert_close(lat, ref, rtol=1e-4, atol=1e-5)
        pipe.scheduler = PFDiffScheduler.from_config(pipe.scheduler.config, k=2, h=1)
        calls.clear()
        img = pipe("a cat", num_inference_steps=5, guidance_scale=1.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(1), output_type="np").images
    assert calls == [1] * 5 and img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


# ----------------------------------------------------------------------------- flow matching (spec §6)
def _velocity(x, t):
    """A toy velocity field, nonlinear in x and t (t in the scheduler's 0..1000 units)."""
    return torch.tanh(1.5 * x) * (0.5 + t / 1000.0) - 0.3 * x


def _flux_reference(base, x, L, k, h, **set_kw):
    """Spec §6 written directly over FlowMatchEulerDiscreteScheduler's own L-point schedule."""
    base.set_timesteps(**set_kw)
    sig, ts = base.sigmas.tolist(), base.timesteps
    assert len(ts) == L
    s, buf = k + 1, None
    for i in range(L):
        if i != 0 and (i - 1) % s != 0:
            continue
        if i == 0:
            buf = _velocity(x, ts[0])
            x = (x.float() + (sig[1] - sig[0]) * buf).to(buf.dtype)
            continue
        springboard = (x.float() + (sig[i + h] - sig[i]) * buf).to(buf.dtype)
        buf = _velocity(springboard, ts[i + h])
        x = (x.float() + (sig[i + s] - sig[i]) * buf).to(buf.dtype)
        if i + s == L:
            break
    return x


@pytest.mark.parametrize("setting", ["sd3_static_shift", "flux_dynamic_shift"])
def test_flow_match_equals_spec6(setting):
    x_T = torch.randn((2, 16, 4), generator=torch.Generator().manual_seed(5))
    cfg = (dict(shift=3.0) if setting == "sd3_static_shift"
           else dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096))
    base = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    ran = 0
    for k, h in VARIANTS:
        sched = PFDiffFlowMatchEulerScheduler.from_config(base.config, k=k, h=h)
        for nfe in (4, 7, 10, 20):
            L = (k + 1) * nfe - k
            if setting == "sd3_static_shift":   # SD3: set_timesteps(N)
                sched.set_timesteps(nfe)
                ref = _flux_reference(base, x_T, L, k, h, num_inference_steps=L)
            else:                               # FLUX: its default sigmas = linspace(1, 1/N, N) and mu
                sched.set_timesteps(sigmas=np.linspace(1.0, 1 / nfe, nfe), mu=0.8)
                ref = _flux_reference(base, x_T, L, k, h, sigmas=np.linspace(1.0, 1 / L, L), mu=0.8)
            assert len(sched.timesteps) == nfe
            x = x_T
            sched.set_begin_index(0)
            for t in sched.timesteps:
                x = sched.step(_velocity(x, t), t, x).prev_sample
            torch.testing.assert_close(x, ref, rtol=0, atol=0)
            ran += 1
    assert ran == 24


# ----------------------------------------------------------------------------- refusals and config
@pytest.mark.parametrize("kw, nfe, msg", [
    (dict(k=2, h=3), 4, "is not one of the six variants"),
    (dict(k=4, h=1), 4, "is not one of the six variants"),
    (dict(k=2, h=1), 0, "must be an integer >= 1"),
    (dict(k=3, h=1), 252, "more than the 1000 training timesteps"),
    (dict(k=1, h=1, timestep_spacing="karras"), 4, "unknown timestep_spacing"),
])
def test_refusals_are_one_line(kw, nfe, msg):
    with pytest.raises(PFDiffError) as e:
        PFDiffScheduler(**kw).set_timesteps(nfe)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_eta_refused_and_config_round_trip(tmp_path):
    sched = PFDiffScheduler.from_config(SD_CONFIG, k=3, h=2)
    sched.save_config(tmp_path)
    again = PFDiffScheduler.from_pretrained(tmp_path)
    sched.set_timesteps(6)
    again.set_timesteps(6)
    assert again.config.k == 3 and again.config.h == 2 and again.grid == sched.grid
    with pytest.raises(PFDiffError, match="eta = 0"):
        sched.step(torch.zeros(1, 4), sched.timesteps[0], torch.zeros(1, 4), eta=1.0)


def test_import_pfdiff_bench_stays_light():
    code = "import sys, pfdiff_bench; print('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_mid_grid_start_and_bad_flow_grids_refused():
    sched = PFDiffScheduler.from_config(SD_CONFIG, k=2, h=1)
    sched.set_timesteps(5)
    with pytest.raises(PFDiffError, match="img2img"):          # a run that does not start at τ_0
        sched.step(torch.zeros(1, 4), sched.timesteps[1], torch.zeros(1, 4))
    flow = PFDiffFlowMatchEulerScheduler(shift=3.0, k=2, h=1)
    with pytest.raises(PFDiffError, match="img2img"):
        flow.set_begin_index(3)
    with pytest.raises(PFDiffError, match=r"\(k\+1\)·N − k"):   # explicit sigmas must be a whole grid
        flow.set_timesteps(sigmas=[1.0, 0.9, 0.5, 0.3, 0.2])
    flow.set_timesteps(sigmas=[1.0, 0.9, 0.7, 0.5, 0.4, 0.3, 0.1])   # L = 7 = 3·3 − 2: N = 3
    assert len(flow.timesteps) == 3 == flow.num_inference_steps and len(flow.sigmas) == 8
    with pytest.raises(PFDiffError, match="not one of the six"):
        PFDiffFlowMatchEulerScheduler(k=1, h=2)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_diffusers_spacings_match_ddim_scheduler_with_L_steps(spacing):
    """With a diffusers spacing, the L-point grid is what DDIMScheduler itself gives for L steps."""
    for k, h in VARIANTS:
        for nfe in NFES:
            L = (k + 1) * nfe - k
            ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
            ddim.set_timesteps(L)
            sched = PFDiffScheduler.from_config(ddim.config, k=k, h=h)
            sched.set_timesteps(nfe)
            ts = ddim.timesteps.tolist()
            if spacing == "trailing" and len(ts) == L + 1:  # diffusers' float arange adds a -1 for some L
                assert ts[-1] == -1
                ts = ts[:-1]
            assert sched.grid == ts
            assert sched.timesteps.tolist() == [sched.grid[i] for i in [0] + list(range(1 + h, L, k + 1))]
