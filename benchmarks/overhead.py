"""Sampler overhead with a network that costs almost nothing, and peak extra tensor memory.

The noise predictor is ``eps(x, t) = 0.5·x``: one elementwise op that allocates one fresh output,
as a real network's output would. Per (sampler, NFE): wall time of ``run_sampler`` / NFE, the same
for plain DDIM, and for a naive loop written in the structure of the official ermongroup/ddim
``generalized_steps`` (see :func:`naive_official_ddim`). All timings of one repeat are taken
back to back in a rotating order, and the median over repeats is reported.
"""

from __future__ import annotations

import torch

from benchmarks.common import median, timed2
from benchmarks.memtrack import PeakTensorMemory
from pfdiff_bench import grids
from pfdiff_bench.samplers import SamplerSpec, plan, run_sampler
from pfdiff_bench.schedules import DiscreteVP


def samplers() -> list[tuple[str, SamplerSpec]]:
    out = [("DDIM", SamplerSpec())]
    out += [(f"DDIM+PFDiff-{k}_{h}", SamplerSpec(pfdiff=(k, h))) for k, h in grids.PFDIFF_VARIANTS]
    out += [("DPM-Solver-2 (singlestep)", SamplerSpec(solver="dpm-solver", convention="dpm_solver", order=2)),
            ("DPM-Solver++(2M)", SamplerSpec(solver="dpm-solver++", convention="dpm_solver", order=2,
                                             method="multistep"))]
    return out


def cheap_eps(x, t, y=None):
    return x.mul(0.5)


def naive_official_ddim(model, betas: torch.Tensor, timesteps: list, x: torch.Tensor, eta: float = 0.0,
                        host_copy=None):
    """ermongroup/ddim ``generalized_steps`` structure (functions/denoising.py): per step it builds the
    time tensor, recomputes ᾱ by ``cumprod`` + ``index_select`` (``compute_alpha``), moves the state
    to the device (``xs[-1].to('cuda')``), moves x̂0 and the new state back to the host
    (``.to('cpu')``), draws ``randn_like`` even at η = 0 (``c1 * torch.randn_like(x)``), and keeps the
    whole trajectory in ``xs`` and ``x0_preds``. On a CPU-only machine each host<->device move is
    emulated by a copy into a separate buffer (``host_copy``, default ``Tensor.clone``); on CUDA pass
    ``lambda t: t.to('cpu')`` / ``.to('cuda')`` style moves."""
    move_in = move_out = host_copy or (lambda t: t.clone())
    b = betas.float()
    seq = list(reversed([int(v) for v in timesteps]))       # ascending, as the official `seq`
    seq_next = [-1] + seq[:-1]
    n = x.size(0)

    def compute_alpha(beta, t):
        beta = torch.cat([torch.zeros(1).to(beta.device), beta], dim=0)
        return (1 - beta).cumprod(dim=0).index_select(0, t + 1).view(-1, 1, 1, 1)

    x0_preds, xs = [], [x]
    for i, j in zip(reversed(seq), reversed(seq_next)):
        t = (torch.ones(n) * i).to(x.device)
        next_t = (torch.ones(n) * j).to(x.device)
        at = compute_alpha(b, t.long())
        at_next = compute_alpha(b, next_t.long())
        xt = move_in(xs[-1])
        et = model(xt, t)
        x0_t = (xt - et * (1 - at).sqrt()) / at.sqrt()
        x0_preds.append(move_out(x0_t))
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1 ** 2).sqrt()
        xt_next = at_next.sqrt() * x0_t + c1 * torch.randn_like(x) + c2 * et
        xs.append(move_out(xt_next))
    return xs, x0_preds


def run(nfes=(4, 10, 20), batch: int = 256, repeats: int = 5, device="cpu", log=print) -> dict:
    sch = DiscreteVP.linear()
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(batch, 3, 32, 32, generator=gen).to(dev)
    state_bytes = x_T.numel() * x_T.element_size()
    # on CUDA the official loop's real moves; on CPU a copy per move through a separate buffer
    move = (lambda t: t.to("cpu") if t.device.type == "cuda" else t.to(dev)) if dev.type == "cuda" else None
    cases = []  # (name, nfe, fn)
    for nfe in nfes:
        ddim_plan = plan(SamplerSpec(), sch, nfe)
        for name, spec in samplers():
            p = plan(spec, sch, nfe)
            cases.append((name, nfe, (lambda p=p: run_sampler(p, cheap_eps, sch, x_T))))
        cases.append(("naive official loop (DDIM)", nfe,
                      (lambda p=ddim_plan: naive_official_ddim(cheap_eps, sch.betas, p.timesteps, x_T, host_copy=move))))
    # correctness of the naive loop: same samples as DDIM (float32 ᾱ vs float64 coefficients aside)
    ref = run_sampler(plan(SamplerSpec(), sch, nfes[0]), cheap_eps, sch, x_T).x
    nv = naive_official_ddim(cheap_eps, sch.betas, plan(SamplerSpec(), sch, nfes[0]).timesteps, x_T,
                             host_copy=move)[0][-1]
    naive_max_diff = float((ref - nv.to(ref.device)).abs().max())

    with torch.no_grad():
        for _, _, fn in cases:  # warm-up
            fn()
        eps_times, eps_cpu = [], []
        times, cpu = {(c[0], c[1]): [] for c in cases}, {(c[0], c[1]): [] for c in cases}
        for r in range(repeats):
            rot = r % len(cases)
            for name, nfe, fn in cases[rot:] + cases[:rot]:
                w, c = timed2(fn, dev)
                times[(name, nfe)].append(w)
                cpu[(name, nfe)].append(c)
            w, c = timed2(lambda: [cheap_eps(x_T, None) for _ in range(10)], dev)
            eps_times.append(w / 10)
            eps_cpu.append(c / 10)
            log(f"  overhead: repeat {r + 1}/{repeats} done")
        mem = {}
        for name, nfe, fn in cases:
            with PeakTensorMemory() as m:
                res = fn()
            del res
            mem[(name, nfe)] = m.peak_bytes
    eps_ms, eps_cpu_ms = median(eps_times) * 1e3, median(eps_cpu) * 1e3
    rows = []
    for name, nfe, _ in cases:
        ms = median(times[(name, nfe)]) / nfe * 1e3
        cms = median(cpu[(name, nfe)]) / nfe * 1e3
        rows.append({"sampler": name, "nfe": nfe, "ms_per_nfe": ms, "cpu_ms_per_nfe": cms,
                     "wall_s": times[(name, nfe)], "cpu_s": cpu[(name, nfe)],
                     "overhead_ms_per_nfe": ms - eps_ms, "cpu_overhead_ms_per_nfe": cms - eps_cpu_ms,
                     "peak_extra_mb": mem[(name, nfe)] / 2**20, "peak_extra_states": mem[(name, nfe)] / state_bytes})
    by = {(r["sampler"], r["nfe"]): r for r in rows}
    for r in rows:
        r["vs_ddim"] = r["ms_per_nfe"] / by[("DDIM", r["nfe"])]["ms_per_nfe"]
        r["vs_naive"] = r["ms_per_nfe"] / by[("naive official loop (DDIM)", r["nfe"])]["ms_per_nfe"]
        r["cpu_vs_ddim"] = r["cpu_ms_per_nfe"] / by[("DDIM", r["nfe"])]["cpu_ms_per_nfe"]
        r["cpu_vs_naive"] = r["cpu_ms_per_nfe"] / by[("naive official loop (DDIM)", r["nfe"])]["cpu_ms_per_nfe"]
    return {"batch": batch, "shape": [3, 32, 32], "dtype": "float32", "device": str(dev), "repeats": repeats,
            "state_mb": state_bytes / 2**20, "eps": "x.mul(0.5)", "eps_ms_per_call": eps_ms, "eps_cpu_ms_per_call": eps_cpu_ms,
            "naive_vs_ddim_max_abs_diff": naive_max_diff,
            "naive_moves": "tensor.to(host/device)" if move else "clone() per move (CPU-only emulation)",
            "memory_method": "peak bytes of tensors created during sampling and alive at the same time, "
                             "tracked per storage by a TorchDispatchMode (benchmarks/memtrack.py); x_T excluded",
            "rows": rows}
