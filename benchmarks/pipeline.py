"""End-to-end toy pipeline throughput (engine sampling + exact metrics), and torchrun scaling on CPU.

In-process: ``engine.run_sampling`` of the bundled ``toy`` config (analytic 4-component Gaussian mixture
in 3x8x8, DDIM NFE 10) into a fresh run directory, then ``metrics.evaluate_run`` (RMS to the exact ODE
solution by RK4 with ``eval_steps`` steps, Fréchet distance to the exact mixture).

Scaling: the CLI, ``python -m torch.distributed.run --standalone --nproc_per_node P -m pfdiff_bench.cli
sample --config toy ...`` for P = 1 and 2 (same samples, same batch size), timed as whole commands
(process start included) and by the manifest's ``sampling_s`` (the sampling loop only, max over ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import median, now


def in_process(num_samples: int, batch: int, eval_steps: int, repeats: int, log=print) -> dict:
    from pfdiff_bench.config import load_config
    from pfdiff_bench.sampling.engine import run_sampling
    from pfdiff_bench.evaluation.exact import evaluate_run

    cfg = load_config("toy")
    samp, ev = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            out = Path(tmp) / f"run{r}"
            t0 = now()
            run_sampling(cfg, out, num_samples=num_samples, batch_size=batch, shard_size=max(batch, 1000),
                         progress=False, log=lambda m: None)
            t1 = now()
            evaluate_run(out, steps=eval_steps)
            t2 = now()
            samp.append(t1 - t0)
            ev.append(t2 - t1)
            log(f"  toy pipeline: repeat {r + 1}/{repeats} done")
    s, e = median(samp), median(ev)
    return {"config": "toy", "sampler": "DDIM", "nfe": int(cfg["sampling"]["nfe"]), "num_samples": num_samples,
            "batch": batch, "eval_steps": eval_steps, "repeats": repeats, "sample_s": samp, "eval_s": ev,
            "sample_images_per_s": num_samples / s, "eval_images_per_s": num_samples / e,
            "end_to_end_images_per_s": num_samples / (s + e)}


def torchrun_scaling(num_samples: int, batch: int, repeats: int, procs=(1, 2), log=print) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default for P > 1; same for P = 1 (fair)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        res = {p: {"wall": [], "sampling": []} for p in procs}
        for r in range(repeats):
            for p in (procs if r % 2 == 0 else tuple(reversed(procs))):
                out = Path(tmp) / f"p{p}-r{r}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(p),
                       "-m", "pfdiff_bench.cli", "sample", "--config", "toy", "-n", str(num_samples), "-b",
                       str(batch), "--shard-size", str(max(batch, num_samples // (4 * p) or 1)), "--out",
                       str(out), "--no-progress"]
                t0 = now()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                wall = now() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"torchrun failed ({proc.returncode}): {proc.stderr[-2000:]}")
                man = json.loads((out / "manifest.json").read_text())
                res[p]["wall"].append(wall)
                res[p]["sampling"].append(float(man["timings"]["sampling_s"]))
            log(f"  torchrun scaling: repeat {r + 1}/{repeats} done")
    for p in procs:
        w, s = median(res[p]["wall"]), median(res[p]["sampling"])
        rows.append({"processes": p, "wall_s": w, "sampling_s": s, "images_per_s_sampling": num_samples / s,
                     "images_per_s_wall": num_samples / w, "wall_runs": res[p]["wall"],
                     "sampling_runs": res[p]["sampling"]})
    base = rows[0]
    for r in rows:
        r["speedup_sampling"] = r["images_per_s_sampling"] / base["images_per_s_sampling"]
        r["speedup_wall"] = r["images_per_s_wall"] / base["images_per_s_wall"]
    return {"num_samples": num_samples, "batch": batch, "repeats": repeats,
            "omp_num_threads": env["OMP_NUM_THREADS"], "rows": rows}
