"""GPU check: images/s of the paper's full-size networks (random weights) with DDIM and PFDiff, plus
Inception feature throughput and the sampler-overhead/memory check on the device. No download, no
checkpoint; writes one JSON. Meant for one H100 in under 8 minutes (``scripts/gpu_check.sh``).

* ImageNet-64: ADM UNet (296M params) in fp16 (torso convolutions, ``convert_to_fp16`` as the
  official sampling script) + ADM noisy classifier (65M params) in fp32 for guidance, classifier scale
  1.0, guided convention (guided-diffusion: clipped x̂0, respaced cosine schedule), batch 64, class labels.
* CIFAR-10: DDPM UNet (35.7M params) fp32, ddim convention, linear schedule, batch 256.
* Samplers: DDIM and DDIM+PFDiff (k,h) in ``--pfdiff`` (default 1,1 and 2,1), NFE 4 and 10; warm-up run
  then ``--repeats`` timed runs (median), CUDA-synchronised; peak ``torch.cuda.max_memory_allocated``
  above the level before the run is recorded as ``peak_extra_mib``.
* Inception: torch-fidelity ``inception-v3-compat`` with random init, 32x32 uint8 input (resized to 299
  inside), batch 256: network forward alone and through ``pfdiff_bench.evaluation.features.extract`` (with the
  float64 FID/IS accumulators on the CPU).
* Overhead: :mod:`benchmarks.overhead` on the device (eps = 0.5·x, batch 256x3x32x32) with the naive
  official loop doing real device<->host moves.

Issue #20 adds the fast-path sweep: ADM UNet precision (``--precision``, default fp16,bf16), DDPM precision
(fp32,bf16), attention kernel (``--attention sdpa,einsum``), batch sizes (``--batches``, ``--ddpm-batches``),
optionally ``--channels-last`` and ``--compile``; every row gets GFLOP per image per NFE counted with
``torch.utils.flop_counter.FlopCounterMode`` on the real forward (plus the classifier's forward and backward
to its input), achieved TFLOP/s and the fraction of the device's dense peak (``benchmarks.common.PEAK_TFLOPS``);
``best`` holds, per config and NFE, the fastest DDIM setting and PFDiff's ms/NFE over DDIM's there.

The sweep also covers NCSN++ (ScoreSDE DDPM++ deep continuous VP, CIFAR-10, 107M params; DPM-Solver-1,
the ``cifar10_scoresde`` config's sampler, PFDiff on its grid; ``--ncsnpp-precision``, ``--ncsnpp-batches``) and
the Stable Diffusion UNet (diffusers ``UNet2DConditionModel`` built from SD-1.5's ``unet/config.json`` as a
dict, random weights, nothing downloaded; latent 4x64x64, text states 77x768 random, classifier-free
guidance 7.5 as one call on 2B rows as the official script; ``--sd-precision`` = autocast dtype as
``models/stable_diffusion`` runs it, ``--sd-batches``); the SD rows are skipped, with the reason recorded, if
diffusers is missing. Cases run in priority order: every network's first setting (first precision, kernel,
batch) before the remaining sweep, so the budget never starves a network of its one row.

``projection`` (per bundled table file, ``pfdiff_bench/configs/tables/*.yaml``): image-evaluations =
rows x sum over the table's NFE columns of network calls (column − the table's NFE-axis offset) x
samples; hours on this device = image-evaluations / the best measured baseline-sampler images/s x NFE of
the table's network (the fastest setting in ``rows``; PFDiff makes the same calls), and EFLOP =
image-evaluations x GFLOP per image per NFE of that row (classifier gradient or the CFG pair included);
``full_size_eflop`` uses the full-size network of the table's config counted on the meta device (so the
smoke run and the tables whose network is not timed get it too).
Sampling only: Inception features, the VAE decode and the text encoder are not in it. Tables whose network
is not in the sweep (ImageNet-256, LSUN) get ``hours: null`` and the reason.

``--smoke`` runs the same code on the CPU with the small architecture fixtures
(``pfdiff_bench/data/arch/*_small.pt`` configs; the ADM pair at 16x16 input, a 2-level SD UNet at latent
4x16x16 with 32-dim text states: labelled "smoke" in the rows), batch 2, NFE 4, one repeat, no warm-up, under a
minute; the JSON and the table have the full run's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import env_info, inception_images_per_s, median, sync, table  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu_check.json"
ARCH = Path(__file__).resolve().parent.parent / "pfdiff_bench" / "data" / "arch"


def _small_config(name: str, **changes) -> tuple[str, dict]:
    fx = torch.load(ARCH / f"{name}_small.pt", map_location="cpu", weights_only=True)
    return fx["arch"], dict(fx["config"], **changes)


#: SD-1.5's ``unet/config.json`` (runwayml/stable-diffusion-v1-5; SD-1.4's is the same network)
SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8}
#: --smoke only: the same block types at two levels, 32 channels, latent 16x16, 32-dim text states
SMOKE_SD_UNET_CONFIG = dict(SD15_UNET_CONFIG, sample_size=16, block_out_channels=[32, 64], layers_per_block=1,
                            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
SD_TEXT_LENGTH = 77


def build_sd_unet(smoke: bool, device: torch.device):
    """Random-weight ``UNet2DConditionModel`` with SD-1.5's config (no download), or (None, reason)."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as exc:
        return None, f"diffusers is not installed ({exc}); the SD UNet rows are skipped"
    with torch.device(device):  # initialise on the device: 860M parameters are slow to init on a CPU
        unet = UNet2DConditionModel(**(SMOKE_SD_UNET_CONFIG if smoke else SD15_UNET_CONFIG))
    return unet.eval().requires_grad_(False), None


class SDUNetEps:
    """eps(x, t | text states) of a bare SD UNet, as ``models/stable_diffusion.StableDiffusion.eps`` calls it:
    float32 inputs under ``torch.autocast`` in the low precision (fp16 as the official script)."""

    def __init__(self, unet, precision: str):
        from pfdiff_bench.models.fastpath import PRECISIONS

        self.unet, self.precision, self.dtype = unet, precision, PRECISIONS[precision]
        self.device = next(unet.parameters()).device

    def __call__(self, x, t, y=None):
        import contextlib

        ctx = (contextlib.nullcontext() if self.precision == "fp32"
               else torch.autocast(self.device.type, dtype=self.dtype))
        with torch.no_grad(), ctx:
            out = self.unet(x.to(self.device, torch.float32), t.to(self.device, torch.float32),
                            encoder_hidden_states=y.to(self.device)).sample
        return out.to(dtype=x.dtype)


def build_networks(smoke: bool, device: torch.device, fp16: bool = False, skip=()):
    """ADM-64 UNet, its classifier, DDPM CIFAR-10 and NCSN++ (ScoreSDE CIFAR-10), full size, random weights
    (``--smoke``: the small architecture fixtures); None for a network whose section is in ``skip``."""
    from pfdiff_bench.models.zoo import build_arch, build_network

    # smoke: the ADM pair at 16x16 input (the classifier's attention pool is sized by image_size): 1/16 of the FLOPs
    small = {"adm": ("adm_imagenet64", {"image_size": 16}), "cls": ("adm_classifier64", {"image_size": 16}),
             "ddpm": ("ddpm_cifar10", {}), "ncsnpp": ("ncsnpp_ckpt", {})}
    full = {"adm": "adm_imagenet64", "cls": "adm_classifier64", "ddpm": "ema_cifar10", "ncsnpp": "scoresde_cifar10"}
    section = {"adm": "imagenet64", "cls": "imagenet64", "ddpm": "cifar10", "ncsnpp": "scoresde"}
    nets = []
    for key in ("adm", "cls", "ddpm", "ncsnpp"):
        if section[key] in skip:
            nets.append(None)
            continue
        if smoke:
            name, changes = small[key]
            net = build_arch(*_small_config(name, **changes), device=device).eval()
        else:
            net = build_network(full[key], device=device)
        nets.append(net.requires_grad_(False))
    if fp16 and nets[0] is not None:
        nets[0].convert_to_fp16()
    return tuple(nets)


def _count(net):
    return None if net is None else sum(p.numel() for p in net.parameters())


def bench_sampler(name, spec, nfe, eps, sch, shape, batch, device, repeats, y=None, cg=None, scale=0.0,
                  uncond=None, warmup=True):
    from pfdiff_bench.samplers import plan, run_sampler

    p = plan(spec, sch, nfe)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(batch, *shape, generator=g).to(device)
    guided = cg is not None and scale > 0

    def once():
        ctx = torch.enable_grad() if guided else torch.inference_mode()
        with ctx:
            return run_sampler(p, eps, sch, x_T, y=y, classifier_grad=cg, guidance_scale=scale, uncond=uncond)

    finite = True
    if warmup:  # cuDNN autotune, allocator (--smoke: none, its timings mean nothing anyway)
        res = once()
        finite = bool(torch.isfinite(res.x).all())
        del res
    times, peaks = [], []
    for _ in range(repeats):
        sync(device)
        base = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        r = once()
        sync(device)
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        finite = finite and bool(torch.isfinite(r.x).all())
        del r
    t = median(times)
    return {"config": name, "sampler": spec.label(), "nfe": nfe, "batch": batch, "seconds": times,
            "images_per_s": batch / t, "ms_per_nfe": t / nfe * 1e3, "finite": finite,
            "peak_extra_mib": max(peaks) if peaks else None}


def _best_ratios(rows: list[dict]) -> dict:
    """Per config and NFE: the fastest DDIM setting, and PFDiff's ms/NFE over DDIM's at that setting."""
    out = {}
    for r in rows:
        if "PFDiff" in r["sampler"]:
            continue
        key = f"{r['config']} NFE {r['nfe']}"
        if key not in out or r["images_per_s"] > out[key]["ddim_images_per_s"]:
            same = ("config", "nfe", "batch", "precision", "attention", "channels_last", "compile")
            ratios = {p["sampler"]: p["ms_per_nfe"] / r["ms_per_nfe"] for p in rows
                      if "PFDiff" in p["sampler"] and all(p.get(k) == r.get(k) for k in same)}
            out[key] = {"setting": {k: r.get(k) for k in same}, "ddim_images_per_s": r["images_per_s"],
                        "pfdiff_over_ddim_ms_per_nfe": ratios}
    return out


#: the sweep's section for each bundled config a paper table samples
TABLE_SECTION = {"imagenet64": "imagenet64", "cifar10": "cifar10", "cifar10_scoresde": "scoresde", "sd14": "sd"}


def _best_throughput(rows: list[dict]) -> dict:
    """Per section: the baseline-sampler row with the most image-evaluations per second (images/s x NFE)."""
    best = {}
    for r in rows:
        if "PFDiff" in r["sampler"] or not r.get("gflop_per_image_nfe"):
            continue
        ev = r["images_per_s"] * r["nfe"]
        if r["section"] not in best or ev > best[r["section"]]["evals_per_s"]:
            best[r["section"]] = {"evals_per_s": ev, "row": r}
    return best


def full_size_gflop(cfg: dict, scale: float) -> float:
    """GFLOP per image per NFE of a config's full-size network (+ classifier forward and backward, or the CFG
    pair), counted by FlopCounterMode on the meta device: no memory, no time, no weights."""
    import torch.nn.functional as F

    from benchmarks.common import count_flops
    from pfdiff_bench.models.adapters import ADMEps, DDPMEps, NCSNppEps
    from pfdiff_bench.models.zoo import build_network, get_spec

    meta = torch.device("meta")
    m, g = cfg["model"], cfg["guidance"]
    t = torch.full((1,), 500.0, device=meta)
    if m["type"] == "stable_diffusion":
        from diffusers import UNet2DConditionModel

        with meta:
            unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
        n = SD15_UNET_CONFIG["sample_size"]
        rows = 1 if scale == 1.0 else 2  # models/cfg.py: scale 1 runs the conditional half alone
        x = torch.randn(rows, 4, n, n, device=meta)
        text = torch.randn(rows, SD_TEXT_LENGTH, SD15_UNET_CONFIG["cross_attention_dim"], device=meta)
        with torch.no_grad():
            return count_flops(lambda: SDUNetEps(unet, "fp32")(x, t.expand(rows), text)) / 1e9
    spec = get_spec(m["checkpoint"])
    net = build_network(m["checkpoint"], device=meta).requires_grad_(False)
    n = int(spec.config["image_size"])
    c = int(spec.config.get("in_channels", spec.config.get("num_channels", 3)))
    x = torch.randn(1, c, n, n, device=meta)
    eps = {"ddpm_unet": DDPMEps, "ncsnpp": NCSNppEps}.get(spec.arch, ADMEps)(net)
    y = torch.zeros(1, dtype=torch.long, device=meta) if spec.config.get("num_classes") else None
    with torch.no_grad():
        f = count_flops(eps, x, t, y)
    if g.get("classifier") and scale > 0:
        cls = build_network(g["classifier"], device=meta).requires_grad_(False)

        def grad():
            x_in = x.detach().requires_grad_(True)
            F.log_softmax(cls(x_in, t).float(), -1)[:, 0].sum().backward()
        f += count_flops(grad)
    return f / 1e9


def project_tables(rows: list[dict], smoke: bool = False, device_name: str = "cpu") -> dict:
    """Projected sampling time of each bundled paper table on this device (see the module docstring)."""
    from pfdiff_bench.config import load_config
    from pfdiff_bench.reproduction.tables import axis_offset, bundled_tables, load_table

    best = _best_throughput(rows)
    out, full = {}, {}
    for name in bundled_tables():
        t = load_table(name)
        cfg = load_config(t.config)
        m = cfg["model"]
        off = axis_offset(t)
        calls = sum(n - off for n in t.nfe)
        paper_rows = sum(not r.extra for r in t.rows)
        evals = len(t.rows) * calls * t.num_samples
        net = m["type"] + (f" {m.get('checkpoint')}" if m.get("checkpoint") else "")
        scale = float(t.overrides.get("guidance.scale", cfg["guidance"]["scale"]))
        guided = ("classifier" if cfg["guidance"].get("classifier") and scale > 0
                  else "cfg (2B rows)" if m["type"] == "stable_diffusion" and scale != 1.0 else None)
        p = {"config": t.config, "network": net, "guidance": guided, "rows": len(t.rows), "paper_rows": paper_rows,
             "nfe_columns": list(t.nfe), "nfe_axis_offset": off, "network_calls_per_sample_per_row": calls,
             "num_samples": t.num_samples, "image_evaluations": evals, "hours": None, "hours_paper_rows": None,
             "eflop": None}
        sec = TABLE_SECTION.get(t.config)
        if smoke:
            p["full_size_gflop_error"] = "not counted in --smoke (building the full-size networks takes time)"
        elif m["type"] != "analytic":
            try:
                key = (t.config, scale)
                if key not in full:
                    full[key] = full_size_gflop(cfg, scale)
                p["full_size_gflop_per_image_nfe"] = full[key]
                p["full_size_eflop"] = evals * p["full_size_gflop_per_image_nfe"] / 1e9
                p["full_size_eflop_paper_rows"] = paper_rows * calls * t.num_samples * \
                    p["full_size_gflop_per_image_nfe"] / 1e9
            except Exception as exc:  # noqa: BLE001 - e.g. diffusers missing: the count is optional
                p["full_size_gflop_error"] = f"{type(exc).__name__}: {exc}"
        if m["type"] == "analytic":
            p["reason"] = "analytic model: no network to time"
        elif sec is None:
            p["reason"] = f"its network ({net}{' + classifier' if guided == 'classifier' else ''}) is not in the sweep"
        elif sec not in best:
            p["reason"] = f"no timed {sec} row (skipped, failed or out of budget)"
        else:
            b, r = best[sec], best[sec]["row"]
            # a CFG table at scale 1 would run the conditional half alone (models/cfg.py): half the work
            factor = 0.5 if m["type"] == "stable_diffusion" and scale == 1.0 else 1.0
            p.update(hours=evals * factor / b["evals_per_s"] / 3600,
                     hours_paper_rows=paper_rows * calls * t.num_samples * factor / b["evals_per_s"] / 3600,
                     eflop=evals * factor * r["gflop_per_image_nfe"] / 1e9,
                     at={k: r.get(k) for k in ("config", "sampler", "nfe", "batch", "precision", "attention",
                                                "channels_last", "compile")},
                     image_evaluations_per_s=b["evals_per_s"], gflop_per_image_nfe=r["gflop_per_image_nfe"],
                     tflops=r.get("tflops"))
            if smoke:
                p["note"] = "smoke: small networks on the CPU, not the paper's cost"
        p["device"] = device_name
        out[name] = p
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(DEFAULT_OUT))
    ap.add_argument("--smoke", action="store_true", help="CPU, small architectures, tiny batch/NFE")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    ap.add_argument("--nfe", default=None, help="comma list (default 4,10; smoke 4)")
    ap.add_argument("--pfdiff", default=None, help="PFDiff variants, ';'-separated k,h pairs (default 1,1;2,1; smoke 2,1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3; smoke 1)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining cases after this many seconds")
    ap.add_argument("--precision", default=None,
                    help="ADM UNet precisions to sweep (default fp16,bf16; smoke fp32)")
    ap.add_argument("--ddpm-precision", default=None, help="DDPM precisions (default fp32,bf16; smoke fp32)")
    ap.add_argument("--ncsnpp-precision", default=None, help="NCSN++ precisions (default fp32,bf16; smoke fp32)")
    ap.add_argument("--sd-precision", default=None, help="SD UNet autocast precisions (default fp16,bf16; smoke fp32)")
    ap.add_argument("--attention", default="sdpa", help="attention kernels to sweep: sdpa,einsum")
    ap.add_argument("--batches", default=None, help="ADM batch sizes to sweep (default 64,128; smoke 2)")
    ap.add_argument("--ddpm-batches", default=None, help="DDPM batch sizes (default 256,512; smoke 2)")
    ap.add_argument("--ncsnpp-batches", default=None, help="NCSN++ batch sizes (default 256,512; smoke 2)")
    ap.add_argument("--sd-batches", default=None, help="SD batch sizes, before the CFG doubling (default 8,16; smoke 2)")
    ap.add_argument("--channels-last", action="store_true", help="also sweep channels_last")
    ap.add_argument("--compile", action="store_true", help="also sweep torch.compile (slow to warm up)")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: imagenet64,cifar10,scoresde,sd,inception,overhead")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    smoke = args.smoke
    device = torch.device(args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    if not smoke and device.type != "cuda":
        print("warning: no CUDA device; the full-size check on CPU will take very long (use --smoke)",
              file=sys.stderr)
    nfes = [int(v) for v in (args.nfe or ("4" if smoke else "4,10")).split(",")]
    repeats = args.repeats or (1 if smoke else 3)
    pf = args.pfdiff or ("2,1" if smoke else "1,1;2,1")
    variants = [tuple(int(v) for v in kh.split(",")) for kh in pf.split(";") if kh]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"smoke": smoke, "device": str(device), "env": env_info(), "args": vars(args),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": [], "errors": [], "skipped": []}

    def save():
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(result, indent=1, default=str))

    def over_budget(what) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            result["skipped"].append(what)
            print(f"budget of {args.budget_s:.0f} s spent: skipping {what}", file=sys.stderr, flush=True)
            return True
        return False

    from pfdiff_bench.models.adapters import ADMClassifierGrad, ADMEps, DDPMEps, NCSNppEps
    from pfdiff_bench.samplers import SamplerSpec
    from pfdiff_bench.schedules import ContinuousVP, DiscreteVP

    def _list(v, default):
        return [x for x in (v or default).split(",") if x]

    adm_precs = _list(args.precision, "fp32" if smoke else "fp16,bf16")
    ddpm_precs = _list(args.ddpm_precision, "fp32" if smoke else "fp32,bf16")
    ncsnpp_precs = _list(args.ncsnpp_precision, "fp32" if smoke else "fp32,bf16")
    sd_precs = _list(args.sd_precision, "fp32" if smoke else "fp16,bf16")
    kernels = _list(args.attention, "sdpa")
    adm_batches = [int(b) for b in _list(args.batches, "2" if smoke else "64,128")]
    ddpm_batches = [int(b) for b in _list(args.ddpm_batches, "2" if smoke else "256,512")]
    ncsnpp_batches = [int(b) for b in _list(args.ncsnpp_batches, "2" if smoke else "256,512")]
    sd_batches = [int(b) for b in _list(args.sd_batches, "2" if smoke else "8,16")]
    layouts = [(False, False)] + ([(True, False)] if args.channels_last else []) + \
        ([(False, True)] if args.compile else [])
    device_name = result["env"].get("device_name", "cpu")
    adm_res = 16 if smoke else 64  # smoke: the ADM pair at 16x16 input (1/16 of the FLOPs), labelled
    tag = " [smoke: small fixture]" if smoke else ""
    adm_tag = " [smoke: small fixture, 16x16]" if smoke else ""
    t0 = time.perf_counter()
    adm, cls, ddpm, ncsnpp = build_networks(smoke, device, skip=skip)
    sd_unet, sd_reason = (None, "skipped (--skip sd)") if "sd" in skip else build_sd_unet(smoke, device)
    if sd_reason and "sd" not in skip:
        result["skipped"].append(f"sd: {sd_reason}")
        print(f"sd: {sd_reason}", file=sys.stderr, flush=True)
    sync(device)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    sd_cfg = SMOKE_SD_UNET_CONFIG if smoke else SD15_UNET_CONFIG
    result["networks"] = {"adm_imagenet64": {"parameters": _count(adm), "precisions": adm_precs,
                                             "resolution": adm_res},
                          "adm_classifier64": {"parameters": _count(cls), "fp16": False},
                          "ddpm_cifar10": {"parameters": _count(ddpm), "precisions": ddpm_precs},
                          "ncsnpp_scoresde_cifar10": {"parameters": _count(ncsnpp), "precisions": ncsnpp_precs},
                          "sd_unet": ({"parameters": _count(sd_unet), "precisions": sd_precs,
                                       "config": "smoke (reduced)" if smoke else "SD-1.5 unet/config.json",
                                       "latent": [4, sd_cfg["sample_size"], sd_cfg["sample_size"]],
                                       "text_states": [SD_TEXT_LENGTH, sd_cfg["cross_attention_dim"]],
                                       "cfg_scale": 7.5}
                                      if sd_unet is not None else {"skipped": sd_reason})}
    save()
    import copy

    from benchmarks.common import count_flops, peak_tflops
    from pfdiff_bench.models import fastpath

    def variant(net, prec, kernel, cl, comp):
        return fastpath.prepare(copy.deepcopy(net), prec, kernel, channels_last=cl, compile=comp)

    cases = []  # (priority, section, name, spec, nfe, eps, sch, shape, batch, kw, settings)

    def sweep(section, name_of, make_eps, precs, kerns, batches, spec_of, sch, shape, kw_of):
        for i, prec in enumerate(precs):
            for j, kernel in enumerate(kerns):
                for k, (cl, comp) in enumerate(layouts):
                    eps = make_eps(prec, kernel, cl, comp)
                    for m, batch in enumerate(batches):
                        kw = kw_of(batch)
                        for kh in [None, *variants]:
                            for nfe in nfes:
                                # priority 0: each network's first setting runs before the rest of the sweep
                                cases.append((int(i + j + k + m > 0), section, name_of(prec), spec_of(kh), nfe, eps,
                                              sch, shape, batch, kw,
                                              dict(precision=prec, attention=kernel, channels_last=cl,
                                                   compile=comp)))

    if "imagenet64" not in skip:
        cg = ADMClassifierGrad(fastpath.set_attention(cls, kernels[0]))  # the classifier in fp32, as official
        gen = torch.Generator().manual_seed(1)
        sweep("imagenet64", lambda p: f"imagenet64 (ADM {p} + fp32 classifier, scale 1.0, guided){adm_tag}",
              lambda p, kn, cl, comp: ADMEps(variant(adm, p, kn, cl, comp)), adm_precs, kernels, adm_batches,
              lambda kh: SamplerSpec(convention="guided", pfdiff=kh), DiscreteVP.cosine(), (3, adm_res, adm_res),
              lambda b: dict(y=torch.randint(0, 1000, (b,), generator=gen).to(device), cg=cg, scale=1.0))
    if "cifar10" not in skip:
        sweep("cifar10", lambda p: f"cifar10 (DDPM {p}, ddim){tag}",
              lambda p, kn, cl, comp: DDPMEps(variant(ddpm, p, kn, cl, comp)), ddpm_precs, kernels, ddpm_batches,
              lambda kh: SamplerSpec(convention="ddim", pfdiff=kh), DiscreteVP.linear(), (3, 32, 32),
              lambda b: {})
    if "scoresde" not in skip:  # the cifar10_scoresde config: DPM-Solver-1 on time_quadratic, t 1 -> 1e-3
        sweep("scoresde", lambda p: f"scoresde (NCSN++ {p}, dpm_solver){tag}",
              lambda p, kn, cl, comp: NCSNppEps(variant(ncsnpp, p, kn, cl, comp), label_scale=999.0),
              ncsnpp_precs, kernels, ncsnpp_batches,
              lambda kh: SamplerSpec(solver="dpm-solver", convention="dpm_solver", grid="time_quadratic",
                                     method="singlestep_fixed", order=1, pfdiff=kh, t_start=1.0, t_end=1e-3),
              ContinuousVP(0.1, 20.0, 999.0, 1e-3), (3, 32, 32), lambda b: {})
    if sd_unet is not None:  # diffusers' own attention (SDPA); the kernel option does not apply
        gen_sd = torch.Generator().manual_seed(2)
        text = (SD_TEXT_LENGTH, sd_cfg["cross_attention_dim"])
        size = sd_cfg["sample_size"]
        sweep("sd", lambda p: f"sd (SD UNet autocast {p}, CFG 7.5 = 2B rows, ldm)"
                              + (" [smoke: reduced UNet, latent 16x16]" if smoke else ""),
              lambda p, kn, cl, comp: SDUNetEps(sd_unet, p), sd_precs, ["diffusers"], sd_batches,
              lambda kh: SamplerSpec(convention="ldm", pfdiff=kh), DiscreteVP.ldm_linear(), (4, size, size),
              lambda b: dict(y=torch.randn(b, *text, generator=gen_sd).to(device),
                             uncond=torch.randn(b, *text, generator=gen_sd).to(device), scale=7.5))
    cases.sort(key=lambda c: c[0])  # stable: the sweep's order within each priority
    flops_cache = {}

    def flops_per_call(eps, batch, shape, kw, sch):
        """FLOPs of one network evaluation of the batch: the UNet forward (+ classifier forward and backward,
        or both CFG halves)."""
        key = (id(eps), batch)
        if key not in flops_cache:
            x = torch.randn(batch, *shape, device=device)
            t = sch.model_time(torch.full((batch,), 0.5, dtype=torch.float64)) if isinstance(sch, ContinuousVP) \
                else torch.full((batch,), 500.0)
            t = t.to(device)
            if kw.get("uncond") is not None:
                from pfdiff_bench.models.cfg import ClassifierFreeEps

                with torch.no_grad():
                    f = count_flops(ClassifierFreeEps(eps, kw["uncond"], kw["scale"]), x, t, kw["y"])
            else:
                with torch.no_grad():
                    f = count_flops(eps, x, t, kw.get("y"))
            if kw.get("cg") is not None:  # forward + backward to the input (.backward: FlopCounterMode's module
                from torch.nn import functional as F  # tracker refuses autograd.grad)

                def cls_grad():
                    with torch.enable_grad():
                        x_in = x.detach().requires_grad_(True)
                        logits = kw["cg"].classifier(x_in, t)
                        F.log_softmax(logits.float(), -1)[torch.arange(batch, device=device), kw["y"]].sum().backward()
                f += count_flops(cls_grad)
            flops_cache[key] = f
        return flops_cache[key]

    for _, section, name, spec, nfe, eps, sch, shape, batch, kw, settings in cases:
        what = f"{name} {spec.label()} NFE {nfe} batch {batch} {settings}"
        if over_budget(what):
            continue
        try:
            row = bench_sampler(name, spec, nfe, eps, sch, shape, batch, device, repeats, warmup=not smoke, **kw)
            row.update(settings, section=section)
            if not settings["compile"]:  # FlopCounterMode does not see inside a compiled graph
                f = flops_per_call(eps, batch, shape, kw, sch)
                row["gflop_per_image_nfe"] = f / batch / 1e9
                row["tflops"] = f * nfe / (row["ms_per_nfe"] * nfe / 1e3) / 1e12
                peak = peak_tflops(device_name, settings["precision"])
                row["peak_fraction"] = row["tflops"] / peak if peak else None
            result["rows"].append(row)
            print(f"{what}: {row['images_per_s']:.1f} img/s ({row['ms_per_nfe']:.1f} ms/NFE, "
                  f"{row.get('tflops', float('nan')):.2f} TFLOP/s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not lose the rest
            result["errors"].append({"case": what, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-3000:]})
            print(f"{what}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        save()
    result["best"] = _best_ratios(result["rows"])
    result["projection"] = project_tables(result["rows"], smoke=smoke, device_name=device_name)
    save()
    cases.clear()  # free the device memory before Inception
    flops_cache.clear()
    adm = cls = ddpm = ncsnpp = sd_unet = None  # noqa: F841 - also referenced by the sweep closures
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if "inception" not in skip and not over_budget("inception"):
        try:
            b = 2 if smoke else 256
            nb = 1 if smoke else 4
            r = inception_images_per_s(device, b, nb, repeats)
            result["inception"] = r
            from benchmarks.common import random_inception, timed
            net = random_inception(device)
            imgs = torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, device=device)
            with torch.no_grad():
                net(imgs)
                fwd = [timed(lambda: net(imgs), device) for _ in range(repeats if smoke else max(repeats, 2))]
            result["inception_forward_only"] = {"batch": b, "seconds": fwd, "images_per_s": b / median(fwd)}
            print(f"inception: {r['images_per_s']:.1f} img/s via {r['how']}; forward only "
                  f"{b / median(fwd):.1f} img/s", flush=True)
        except Exception as exc:  # noqa: BLE001
            result["errors"].append({"case": "inception", "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-3000:]})
        save()

    if "overhead" not in skip and not over_budget("overhead"):
        try:
            from benchmarks import overhead

            r = overhead.run(nfes=(4,) if smoke else (4, 20), batch=4 if smoke else 256, repeats=repeats,
                             device=device, log=lambda m: None)
            result["overhead"] = r
        except Exception as exc:  # noqa: BLE001
            result["errors"].append({"case": "overhead", "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-3000:]})
        save()

    print()
    print(table(result["rows"], [("config", "config", ""), ("sampler", "sampler", ""), ("nfe", "NFE", "d"),
                                 ("batch", "batch", "d"), ("attention", "attn", ""),
                                 ("channels_last", "ch_last", ""), ("compile", "compile", ""),
                                 ("images_per_s", "img/s", ".2f"), ("gflop_per_image_nfe", "GFLOP/img/NFE", ".2f"),
                                 ("tflops", "TFLOP/s", ".3f"), ("peak_fraction", "of peak", ".3f"),
                                 ("ms_per_nfe", "ms/NFE", ".1f"), ("peak_extra_mib", "peak extra MiB", ".0f"),
                                 ("finite", "finite", "")]))
    if result.get("projection"):
        print()
        print("Projected sampling time of each paper table on this device (image-evaluations at the best "
              "measured images/s x NFE; sampling only)" + (" [smoke: meaningless sizes]" if smoke else ""))
        print(table([dict(v, table=k, why=v.get("reason", "")) for k, v in result["projection"].items()],
                    [("table", "table", ""), ("network", "network", ""), ("rows", "rows", "d"),
                     ("network_calls_per_sample_per_row", "calls/row", "d"), ("num_samples", "samples", "d"),
                     ("image_evaluations", "image-evals", ".3g"),
                     ("full_size_gflop_per_image_nfe", "GFLOP/eval (full size)", ".1f"),
                     ("full_size_eflop", "EFLOP (full size)", ".3g"), ("eflop", "EFLOP (timed nets)", ".3g"),
                     ("hours", "hours", ".3g"), ("hours_paper_rows", "h (paper rows)", ".3g"), ("why", "", "")]))
    if "overhead" in result:
        from benchmarks.run import print_overhead
        print()
        print(print_overhead(result["overhead"]))
    save()
    print(f"\nwrote {out} in {result['elapsed_s']:.0f} s; errors: {len(result['errors'])}, "
          f"skipped: {len(result['skipped'])}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
