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

``--smoke`` runs the same code on the CPU with the small architecture fixtures
(``pfdiff_bench/data/arch/*_small.pt`` configs), batch 2, NFE 4, one repeat, in seconds.
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


def _small_config(name: str) -> dict:
    fx = torch.load(ARCH / f"{name}_small.pt", map_location="cpu", weights_only=True)
    return fx["arch"], dict(fx["config"])


def build_networks(smoke: bool, device: torch.device, fp16: bool = False):
    from pfdiff_bench.models.zoo import build_arch, build_network

    if smoke:
        adm = build_arch(*_small_config("adm_imagenet64"), device=device).eval()
        cls = build_arch(*_small_config("adm_classifier64"), device=device).eval()
        ddpm = build_arch(*_small_config("ddpm_cifar10"), device=device).eval()
    else:
        adm = build_network("adm_imagenet64", device=device)
        cls = build_network("adm_classifier64", device=device)
        ddpm = build_network("ema_cifar10", device=device)
    for n in (adm, cls, ddpm):
        n.requires_grad_(False)
    if fp16:
        adm.convert_to_fp16()
    return adm, cls, ddpm


def _count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def bench_sampler(name, spec, nfe, eps, sch, shape, batch, device, repeats, y=None, cg=None, scale=0.0):
    from pfdiff_bench.samplers import plan, run_sampler

    p = plan(spec, sch, nfe)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(batch, *shape, generator=g).to(device)
    guided = cg is not None and scale > 0

    def once():
        ctx = torch.enable_grad() if guided else torch.inference_mode()
        with ctx:
            return run_sampler(p, eps, sch, x_T, y=y, classifier_grad=cg, guidance_scale=scale)

    res = once()  # warm-up (cuDNN autotune, allocator)
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
    ap.add_argument("--attention", default="sdpa", help="attention kernels to sweep: sdpa,einsum")
    ap.add_argument("--batches", default=None, help="ADM batch sizes to sweep (default 64,128; smoke 2)")
    ap.add_argument("--ddpm-batches", default=None, help="DDPM batch sizes (default 256,512; smoke 2)")
    ap.add_argument("--channels-last", action="store_true", help="also sweep channels_last")
    ap.add_argument("--compile", action="store_true", help="also sweep torch.compile (slow to warm up)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: imagenet64,cifar10,inception,overhead")
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
    b_in, b_c10 = (2, 2) if smoke else (64, 256)
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

    from pfdiff_bench.models.adapters import ADMClassifierGrad, ADMEps, DDPMEps
    from pfdiff_bench.samplers import SamplerSpec
    from pfdiff_bench.schedules import DiscreteVP

    def _list(v, default):
        return [x for x in (v or default).split(",") if x]

    adm_precs = _list(args.precision, "fp32" if smoke else "fp16,bf16")
    ddpm_precs = _list(args.ddpm_precision, "fp32" if smoke else "fp32,bf16")
    kernels = _list(args.attention, "sdpa")
    adm_batches = [int(b) for b in _list(args.batches, "2" if smoke else "64,128")]
    ddpm_batches = [int(b) for b in _list(args.ddpm_batches, "2" if smoke else "256,512")]
    layouts = [(False, False)] + ([(True, False)] if args.channels_last else []) + \
        ([(False, True)] if args.compile else [])
    device_name = result["env"].get("device_name", "cpu")
    t0 = time.perf_counter()
    adm, cls, ddpm = build_networks(smoke, device)
    sync(device)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["networks"] = {"adm_imagenet64": {"parameters": _count(adm), "precisions": adm_precs},
                          "adm_classifier64": {"parameters": _count(cls), "fp16": False},
                          "ddpm_cifar10": {"parameters": _count(ddpm), "precisions": ddpm_precs}}
    save()
    import copy

    from benchmarks.common import count_flops, peak_tflops
    from pfdiff_bench.models import fastpath

    def variant(net, prec, kernel, cl, comp):
        return fastpath.prepare(copy.deepcopy(net), prec, kernel, channels_last=cl, compile=comp)

    cases = []  # (name, spec, nfe, eps, sch, shape, batch, kw, settings)
    if "imagenet64" not in skip:
        cg = ADMClassifierGrad(fastpath.set_attention(cls, kernels[0]))  # the classifier in fp32, as official
        for prec in adm_precs:
            for kernel in kernels:
                for cl, comp in layouts:
                    eps = ADMEps(variant(adm, prec, kernel, cl, comp))
                    for batch in adm_batches:
                        y = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
                        for kh in [None, *variants]:
                            for nfe in nfes:
                                cases.append((f"imagenet64 (ADM {prec} + fp32 classifier, scale 1.0, guided)",
                                              SamplerSpec(convention="guided", pfdiff=kh), nfe, eps,
                                              DiscreteVP.cosine(), (3, 64, 64), batch,
                                              dict(y=y, cg=cg, scale=1.0),
                                              dict(precision=prec, attention=kernel, channels_last=cl, compile=comp)))
    if "cifar10" not in skip:
        for prec in ddpm_precs:
            for kernel in kernels:
                for cl, comp in layouts:
                    eps = DDPMEps(variant(ddpm, prec, kernel, cl, comp))
                    for batch in ddpm_batches:
                        for kh in [None, *variants]:
                            for nfe in nfes:
                                cases.append((f"cifar10 (DDPM {prec}, ddim)", SamplerSpec(convention="ddim", pfdiff=kh),
                                              nfe, eps, DiscreteVP.linear(), (3, 32, 32), batch, {},
                                              dict(precision=prec, attention=kernel, channels_last=cl, compile=comp)))
    flops_cache = {}

    def flops_per_call(eps, batch, shape, kw):
        """FLOPs of one network evaluation of the batch: the UNet forward (+ classifier forward and backward)."""
        key = (id(eps), batch)
        if key not in flops_cache:
            x = torch.randn(batch, *shape, device=device)
            t = torch.full((batch,), 500.0, device=device)
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

    for name, spec, nfe, eps, sch, shape, batch, kw, settings in cases:
        what = f"{name} {spec.label()} NFE {nfe} batch {batch} {settings}"
        if over_budget(what):
            continue
        try:
            row = bench_sampler(name, spec, nfe, eps, sch, shape, batch, device, repeats, **kw)
            row.update(settings)
            if not settings["compile"]:  # FlopCounterMode does not see inside a compiled graph
                f = flops_per_call(eps, batch, shape, kw)
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
    del adm, cls, ddpm
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
                fwd = [timed(lambda: net(imgs), device) for _ in range(max(repeats, 2))]
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
