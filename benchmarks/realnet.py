"""The "real-sized network" figure: random-weight full-size DDPM CIFAR-10 UNet (35.7M parameters,
float32), DDIM and DDIM+PFDiff-2_1 at NFE 4 against the same number of bare network forward calls.

Two views of the sampler's own cost, both from the same run: (a) sampler wall time / wall time of 4
bare calls (timed separately, interleaved with the sampler runs); (b) inside each sampler run the time
spent in the network is summed, so ``sampler time − network time`` is the sampler's own cost with no
run-to-run noise in between.
"""

from __future__ import annotations

import os

import torch

from benchmarks.common import median, now, sync, timed2
from pfdiff_bench.models.adapters import DDPMEps
from pfdiff_bench.models.zoo import build_network
from pfdiff_bench.samplers import SamplerSpec, plan, run_sampler
from pfdiff_bench.schedules import DiscreteVP


class TimedEps:
    def __init__(self, eps, device):
        self.eps, self.device, self.seconds = eps, device, 0.0

    def __call__(self, x, t, y=None):
        sync(self.device)
        t0 = now()
        out = self.eps(x, t, y)
        sync(self.device)
        self.seconds += now() - t0
        return out


def run(batch: int = 16, nfe: int = 4, repeats: int = 3, device="cpu", net_name: str = "ema_cifar10",
        log=print) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    net = build_network(net_name, device=dev).requires_grad_(False)
    eps = DDPMEps(net)
    nparams = sum(p.numel() for p in net.parameters())
    sch = DiscreteVP.linear()
    x_T = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev)
    plans = {"DDIM": plan(SamplerSpec(), sch, nfe), "DDIM+PFDiff-2_1": plan(SamplerSpec(pfdiff=(2, 1)), sch, nfe)}
    t_bare = [float(t) for t in plans["DDIM"].timesteps][:nfe]

    def bare():
        for t in t_bare:
            eps(x_T, torch.full((batch,), t, dtype=torch.float64, device=dev))

    res = {k: {"wall": [], "cpu": [], "in_net": []} for k in ("bare", *plans)}
    with torch.inference_mode():
        eps(x_T, torch.full((batch,), 500.0, device=dev))  # warm-up
        order = ["bare", *plans]
        for r in range(repeats):
            rot = r % len(order)
            for name in order[rot:] + order[:rot]:
                if name == "bare":
                    w, c = timed2(bare, dev)
                    res[name]["in_net"].append(w)
                else:
                    te = TimedEps(eps, dev)
                    w, c = timed2(lambda: run_sampler(plans[name], te, sch, x_T), dev)
                    res[name]["in_net"].append(te.seconds)
                res[name]["wall"].append(w)
                res[name]["cpu"].append(c)
            log(f"  real network: repeat {r + 1}/{repeats} done")
    bare_w, bare_c = median(res["bare"]["wall"]), median(res["bare"]["cpu"])
    rows = [{"what": f"{nfe} bare network calls", "wall_s": bare_w, "cpu_s": bare_c, "vs_network": 1.0,
             "cpu_vs_network": 1.0}]
    for name in plans:
        w, c = median(res[name]["wall"]), median(res[name]["cpu"])
        own = [a - b for a, b in zip(res[name]["wall"], res[name]["in_net"])]
        rows.append({"what": f"{name}, NFE {nfe}", "wall_s": w, "cpu_s": c, "vs_network": w / bare_w,
                     "cpu_vs_network": c / bare_c, "in_network_s": median(res[name]["in_net"]),
                     "sampler_own_s": median(own), "sampler_own_fraction": median(own) / w})
    ddim, pf = rows[1], rows[2]
    # utilisation (issue #20): FLOPs of one call counted by FlopCounterMode on the real forward
    from benchmarks.common import count_flops, cpu_peak_gflops, matmul_gflops

    with torch.inference_mode():
        flops = count_flops(eps, x_T, torch.full((batch,), 500.0, device=dev))
    threads = torch.get_num_threads()
    peak = cpu_peak_gflops(min(threads, os.cpu_count() or threads)) if dev.type == "cpu" else \
        {"peak_gflops": None, "reason": "not a CPU run"}
    ref = matmul_gflops() if dev.type == "cpu" else None
    for row in rows:
        row["gflops"] = flops * nfe / row["wall_s"] / 1e9  # network FLOPs per wall second of the whole run
        row["peak_fraction"] = row["gflops"] / peak["peak_gflops"] if peak.get("peak_gflops") else None
        row["matmul_fraction"] = row["gflops"] / ref if ref else None
        # per CPU-second (all threads): one core's rate, steady when other processes share the cores
        row["gflop_per_cpu_s"] = flops * nfe / row["cpu_s"] / 1e9
        row["core_peak_fraction"] = (row["gflop_per_cpu_s"] / (peak["peak_gflops"] / peak["threads"])
                                     if peak.get("peak_gflops") else None)
    return {"network": net_name, "parameters": nparams, "dtype": "float32", "device": str(dev), "batch": batch,
            "nfe": nfe, "repeats": repeats, "rows": rows, "raw": res,
            "gflop_per_call": flops / 1e9, "gflop_per_image_nfe": flops / batch / 1e9, "cpu_peak": peak,
            "matmul_gflops": ref,
            "pfdiff_vs_ddim_wall": pf["wall_s"] / ddim["wall_s"], "pfdiff_vs_ddim_cpu": pf["cpu_s"] / ddim["cpu_s"]}
