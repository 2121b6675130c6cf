"""Run the CPU benchmarks and write benchmarks/results/<name>.json (see benchmarks/README.md).

    .venv/bin/python -m benchmarks.run            # full (~5-10 min on 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # ~1-2 min
    .venv/bin/python -m benchmarks.run --only overhead,realnet --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_info, table  # noqa: E402

SECTIONS = ("overhead", "realnet", "pipeline", "inception", "startup")
PROFILES = {
    "quick": {"overhead": dict(nfes=(4, 10, 20), batch=256, repeats=3),
              "realnet": dict(batch=4, nfe=4, repeats=2),
              "pipeline": dict(num_samples=512, batch=256, eval_steps=20, repeats=1,
                               tr_samples=2048, tr_batch=256, tr_repeats=1),
              "inception": dict(batch=4, batches=1, repeats=1), "startup": dict(repeat=3)},
    "full": {"overhead": dict(nfes=(4, 10, 20), batch=256, repeats=7),
             "realnet": dict(batch=64, nfe=4, repeats=3),
             "pipeline": dict(num_samples=4096, batch=256, eval_steps=50, repeats=2,
                              tr_samples=8192, tr_batch=256, tr_repeats=2),
             "inception": dict(batch=16, batches=2, repeats=2), "startup": dict(repeat=7)},
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def print_overhead(r: dict) -> str:
    head = (f"Sampler overhead: eps = {r['eps']} ({r['eps_ms_per_call']:.2f} ms wall / "
            f"{r['eps_cpu_ms_per_call']:.2f} ms CPU per call), batch {r['batch']}x3x32x32 {r['dtype']} "
            f"(state {r['state_mb']:.1f} MiB), median of {r['repeats']}; naive loop = official structure, "
            f"host<->device moves emulated by clones")
    return head + "\n" + table(r["rows"], [
        ("sampler", "sampler", ""), ("nfe", "NFE", "d"), ("ms_per_nfe", "ms/NFE", ".2f"),
        ("vs_ddim", "/DDIM", ".2f"), ("vs_naive", "/naive", ".2f"), ("cpu_ms_per_nfe", "CPU ms/NFE", ".2f"),
        ("cpu_vs_ddim", "CPU /DDIM", ".2f"), ("cpu_vs_naive", "CPU /naive", ".2f"),
        ("peak_extra_mb", "peak extra MiB", ".1f"), ("peak_extra_states", "(states)", ".1f")])


def print_realnet(r: dict) -> str:
    head = (f"Real-sized network: {r['network']} UNet, {r['parameters'] / 1e6:.1f}M params, random weights, "
            f"{r['dtype']} {r['device']}, batch {r['batch']}, median of {r['repeats']}; "
            f"PFDiff/DDIM = {r['pfdiff_vs_ddim_wall']:.3f} wall, {r['pfdiff_vs_ddim_cpu']:.3f} CPU")
    if "gflop_per_image_nfe" in r:
        pk = r["cpu_peak"]
        head += (f"\nFLOPs (FlopCounterMode, matmuls and convolutions): {r['gflop_per_image_nfe']:.2f} GFLOP per image "
                 f"per NFE; CPU fp32 peak " + (f"{pk['peak_gflops']:.0f} GFLOP/s ({pk['how']}, clock from "
                                               f"{pk['clock_source']})" if pk.get("peak_gflops")
                                               else f"unknown: {pk.get('reason')}")
                 + (f"; {r['matmul_gflops']:.1f} GFLOP/s measured on a 1024^3 float32 matmul" if r.get("matmul_gflops")
                    else ""))
    return head + "\n" + table(r["rows"], [
        ("what", "run", ""), ("wall_s", "wall s", ".2f"), ("vs_network", "/network", ".3f"),
        ("cpu_s", "CPU s", ".2f"), ("cpu_vs_network", "CPU /network", ".3f"),
        ("in_network_s", "in network s", ".2f"), ("sampler_own_s", "sampler own s", ".4f"),
        ("sampler_own_fraction", "own fraction", ".4f"), ("gflops", "GFLOP/s", ".1f"),
        ("peak_fraction", "of peak", ".3f"), ("matmul_fraction", "of matmul", ".2f"),
        ("gflop_per_cpu_s", "GFLOP/CPU-s", ".1f"), ("core_peak_fraction", "of core peak", ".3f")])


def print_pipeline(r: dict) -> str:
    a, b = r["in_process"], r["torchrun"]
    s = (f"Toy pipeline (engine, in process, {a['num_samples']} samples, batch {a['batch']}, {a['sampler']} "
         f"NFE {a['nfe']}; eval RK4 {a['eval_steps']} steps): sampling {a['sample_images_per_s']:.0f} img/s, "
         f"exact metrics {a['eval_images_per_s']:.0f} img/s, end to end {a['end_to_end_images_per_s']:.0f} img/s\n")
    s += (f"torchrun --standalone on CPU, {b['num_samples']} samples, batch {b['batch']}, "
          f"OMP_NUM_THREADS={b['omp_num_threads']}, median of {b['repeats']}\n")
    return s + table(b["rows"], [
        ("processes", "procs", "d"), ("sampling_s", "sampling s", ".2f"), ("images_per_s_sampling", "img/s", ".0f"),
        ("speedup_sampling", "speedup", ".2f"), ("wall_s", "command s", ".2f"),
        ("images_per_s_wall", "img/s (cmd)", ".0f"), ("speedup_wall", "speedup (cmd)", ".2f")])


def print_inception(r: dict) -> str:
    return (f"Inception features (torch-fidelity inception-v3-compat, random init, {r['how']}): "
            f"{r['images_per_s']:.2f} img/s, batch {r['batch']}, {r['images']} 32x32 images, "
            f"median of {r['repeats']}")


def print_startup(r: dict) -> str:
    head = (f"CLI start-up (CPU s of each child process, user + system, median of {r['repeats']}; "
            f"baseline `python -c pass` {r['python_cpu_s']:.3f} s): `pfdiff-bench --help` {r['help_cpu_s']:.3f} s "
            f"(target < 1 s)")
    return head + "\n" + table(r["rows"], [("command", "command", ""), ("cpu_s", "CPU s", ".3f"),
                                            ("over_python_s", "over python s", ".3f"), ("min_cpu_s", "min s", ".3f")])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and repeats (~1-2 min)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/cpu_<quick|full>.json)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, = cores)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    prof_name = "quick" if args.quick else "full"
    prof = PROFILES[prof_name]
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; known: {SECTIONS}")
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"cpu_{prof_name}.json")
    result = {"profile": prof_name, "env": env_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "sections": {}, "seconds": {}}
    t_all = time.perf_counter()
    for sec in only:
        t0 = time.perf_counter()
        _log(f"[{sec}] ...")
        if sec == "overhead":
            from benchmarks import overhead

            r = overhead.run(log=_log, **prof["overhead"])
            text = print_overhead(r)
        elif sec == "realnet":
            from benchmarks import realnet

            r = realnet.run(log=_log, **prof["realnet"])
            text = print_realnet(r)
        elif sec == "pipeline":
            from benchmarks import pipeline

            p = prof["pipeline"]
            r = {"in_process": pipeline.in_process(p["num_samples"], p["batch"], p["eval_steps"], p["repeats"],
                                                   log=_log),
                 "torchrun": pipeline.torchrun_scaling(p["tr_samples"], p["tr_batch"], p["tr_repeats"], log=_log)}
            text = print_pipeline(r)
        elif sec == "startup":
            from benchmarks import startup

            r = startup.run(log=_log, **prof["startup"])
            text = print_startup(r)
        else:
            from benchmarks.common import inception_images_per_s

            r = inception_images_per_s("cpu", **prof["inception"])
            text = print_inception(r)
        result["sections"][sec] = r
        result["seconds"][sec] = round(time.perf_counter() - t0, 1)
        print(f"\n{text}\n[{sec}: {result['seconds'][sec]:.0f} s]", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))  # after every section
    result["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    try:
        import os

        result["env"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out} ({result['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
