"""Stable Diffusion end to end on a tiny random SD (diffusers-format folder built here), CPU, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pfdiff_bench.config import validate
from pfdiff_bench.errors import CheckpointError, ConfigError
from pfdiff_bench.models.captions import load_captions

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pfdiff_bench.cli"]


def build_tiny_sd(root: Path) -> Path:
    """A few-channel SD v1 layout: UNet2DConditionModel with cross-attention, AutoencoderKL, CLIPTextModel,
    a CLIP BPE tokenizer from a tiny vocab/merges."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=2, norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), latent_channels=4,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["at</w>"] = len(vocab)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\na t</w>\n")
    CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"), model_max_length=77).save_pretrained(tok)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}))
    return root


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "stable-diffusion-v1-4")


def _cfg(folder, **sampler):
    return validate({"name": "tiny_sd",
                     "model": {"type": "stable_diffusion", "checkpoint_path": str(folder), "prompt": "a cat"},
                     "schedule": {"type": "ldm_linear"},
                     "sampler": {"name": "ddim", "convention": "ldm", "grid": "uniform", **sampler},
                     "guidance": {"scale": 7.5},
                     "sampling": {"nfe": 2, "num_samples": 3, "batch_size": 2, "seed": 0, "device": "cpu"}})


def test_loader_path_and_hf_cache(tiny_sd, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from pfdiff_bench.models.stable_diffusion import find_folder

    assert find_folder(str(tiny_sd)) == tiny_sd
    snap = tmp_path / "hub" / "models--CompVis--stable-diffusion-v1-4" / "snapshots" / "0123abc"
    snap.parent.mkdir(parents=True)
    snap.symlink_to(tiny_sd, target_is_directory=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_folder() == snap
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(CheckpointError, match=r"lacks unet/config.json.*CompVis/stable-diffusion-v1-4"):
        find_folder(str(broken))


def test_cfg_pair_is_one_call_and_matches_a_hand_written_ddim(tiny_sd):
    from pfdiff_bench.sampling.setup import build
    from pfdiff_bench.seeding import draw_inputs

    setup = build(_cfg(tiny_sd), device=torch.device("cpu"))
    assert setup.plan.timesteps == [999, 1] and setup.noise_shape == (4, 8, 8) and setup.sample_shape == (3, 16, 16)
    x_T, _, _ = draw_inputs(0, [0, 1], setup.noise_shape, None)
    res = setup.sample(x_T.float(), torch.tensor([0, 1]))
    assert res.nfe == 2 and res.call_batch == [4, 4] and res.call_t == [999.0, 1.0]
    # reference: diffusers components called directly, float64 ᾱ, end at ᾱ_0 (not 1)
    sd = setup.model.sd
    tok = sd.tokenizer(["a cat", "a cat", "", ""], padding="max_length", max_length=77, truncation=True,
                       return_tensors="pt")
    emb = sd.text_encoder(input_ids=tok.input_ids).last_hidden_state
    c, uc = emb[:2], emb[2:]
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    A = np.cumprod(1 - betas)
    x = x_T.float()
    for t, a, b in ((999, A[999], A[1]), (1, A[1], A[0])):
        out = sd.unet(torch.cat([x, x]), torch.tensor([t] * 4), encoder_hidden_states=torch.cat([uc, c])).sample
        e_u, e_c = out.chunk(2)
        e = e_u + 7.5 * (e_c - e_u)
        x = np.sqrt(b) * (x - np.sqrt(1 - a) * e) / np.sqrt(a) + np.sqrt(1 - b) * e
    img = sd.vae.decode(x.float() / 0.18215).sample
    assert torch.allclose(res.x, img, atol=1e-4), (res.x - img).abs().max()


def test_sample_cli_pfdiff_ddim_export_and_inception_score(tiny_sd, tmp_path, weights, capsys):
    from pfdiff_bench.cli import main
    from pfdiff_bench.sampling.engine import run_sampling
    from pfdiff_bench.sampling.export import export_npz
    from pfdiff_bench.sampling.rundir import load_run

    run = tmp_path / "pf"
    r = subprocess.run([*CLI, "sample", "--config", "sd14", "--checkpoint", str(tiny_sd), "--nfe", "10",
                        "--pfdiff", "2,1", "--guidance-scale", "7.5", "-n", "2", "--device", "cpu", "--out", str(run),
                        "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((run / "manifest.json").read_text())
    assert man["nfe"]["counted"] == 10 and man["plan"]["grid_length"] == 28 and man["grid"]["timesteps"][0] == 999
    assert man["quantization"].startswith("truncate") and man["sample_shape"] == [3, 16, 16]

    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"annotations": [{"image_id": i, "caption": f"A Cat {i}"} for i in range(5)]}))
    cfg = _cfg(tiny_sd)
    cfg["model"]["captions"] = str(caps)
    a = run_sampling(cfg, tmp_path / "ddim", batch_size=2, progress=False)
    b = run_sampling(cfg, tmp_path / "ddim_b3", batch_size=3, progress=False)
    ia, ib = load_run(a.out)["images"], load_run(b.out)["images"]
    assert ia.shape == (3, 16, 16, 3) and ia.dtype == torch.uint8
    assert torch.equal(load_run(a.out)["labels"], torch.arange(3))  # caption i <-> sample i
    assert (ia.int() - ib.int()).abs().max() <= 1  # per-sample seeds: batch size does not matter
    shapes = export_npz(a.out, tmp_path / "ddim.npz")
    assert shapes["arr_0"] == (3, 16, 16, 3)
    with pytest.raises(SystemExit) as e:
        main(["is", str(tmp_path / "ddim.npz"), "--inception-weights", str(weights), "--trust-weights",
              "--device", "cpu", "--offline", "--batch-size", "3", "--allow-small"])
    assert e.value.code == 0, capsys.readouterr().err
    assert "IS-3" in capsys.readouterr().out


def test_captions_protocol(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"annotations": [{"caption": "B"}, {"caption": "A Dog"}, {"caption": "x"}]}))
    assert load_captions(p, limit=2) == ["b", "a dog"]
    p.write_text(json.dumps(["One", "Two"]))
    assert load_captions(p) == ["one", "two"]
    p.write_text("{}")
    with pytest.raises(ConfigError):
        load_captions(p)


def test_missing_weights_fail_at_once_with_one_line(tmp_path):
    r = subprocess.run([*CLI, "sample", "--config", "sd14", "--nfe", "10", "--pfdiff", "2,1", "--guidance-scale",
                        "7.5", "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_OFFLINE="1"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Stable Diffusion weights not found")
    assert "CompVis/stable-diffusion-v1-4" in lines[0] and "unet/diffusion_pytorch_model.safetensors" in lines[0]
    assert not (tmp_path / "run").exists()


def test_sd_tables_dry_run_lists_cells_grids_axis_and_protocol():
    def dry(*args):
        r = subprocess.run([*CLI, "reproduce", *args, "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = dry("sd_cfg7.5")
    assert "72 cells" in out and "protocol: COCO-2014 val captions" in out and "first 10,000" in out
    assert "network calls = column - 1 (--nfe-axis scripts)" in out
    assert ("DDIM                         NFE  10 (9 network calls): DDIM [ldm] on ldm uniform grid "
            "int(linspace(0,998,S))+1 then ᾱ_0, L=9: {999, 874, 749, 624, 500, 375, 250, 125, 1}") in out
    assert "DDIM + PFDiff-2_1            NFE  10 (9 network calls)" in out and "L=25" in out
    out = dry("sd_cfg7.5", "--nfe-axis", "calls", "--rows", "DDIM", "--nfe", "10")
    assert "L=10: {999, 888, 777, 666, 555, 444, 333, 222, 111, 1}" in out and "(--nfe-axis calls)" in out
    from pfdiff_bench.reproduction.tables import load_table

    t = load_table("sd_cfg1.5")
    assert t.overrides == {"guidance.scale": 1.5} and t.nfe == [4, 5, 6, 8, 10, 15, 20] and not t.paper
    assert load_table("sd_cfg7.5").paper["DDIM + PFDiff (best k,h)"][3] == 13.06


def test_dpm_solver_on_sd_batches_the_cfg_pair_through_the_wrapper(tiny_sd):
    from pfdiff_bench.sampling.setup import build
    from pfdiff_bench.seeding import draw_inputs

    for sampler, nfe in (({"name": "dpm-solver++", "convention": "dpm_solver", "method": "multistep", "order": 2,
                           "grid": "time_uniform"}, 3),
                         ({"name": "dpm-solver", "convention": "dpm_solver", "method": "singlestep_fixed",
                           "order": 1, "grid": "time_uniform", "pfdiff": "2,1"}, 3)):
        cfg = _cfg(tiny_sd, **sampler)
        cfg["sampling"]["nfe"] = nfe
        setup = build(cfg, device=torch.device("cpu"))
        x_T, _, _ = draw_inputs(0, [0, 1], setup.noise_shape, None)
        res = setup.sample(x_T.float(), torch.tensor([0, 1]))
        assert res.nfe == nfe and res.call_batch == [4] * nfe and res.call_t[0] == pytest.approx(999.0)
        assert res.x.shape == (2, 3, 16, 16) and torch.isfinite(res.x).all()
