"""Tables: planning (dry run), refusal without checkpoints, end-to-end on a random tiny network, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pfdiff_bench.cli"]


def run_cli(*args, env=None, cwd=ROOT):
    import os

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=600)


def test_table2_dry_run_lists_every_cell_with_its_grid():
    r = run_cli("reproduce", "table2", "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "72 cells" in lines[0]  # 8 paper rows + 4 extra baselines (issue 16), 6 NFE each
    cells = lines[1:]
    assert len(cells) == 72 and all("50000 samples" in c for c in cells)
    ddim4 = next(c for c in cells if c.strip().startswith("DDIM ") and "NFE   4" in c)
    assert "ddim4 respacing, stride 250, L=4: {750, 500, 250, 0}" in ddim4
    pf11 = next(c for c in cells if "PFDiff-1_1 " in c.split(":")[0] and "NFE   4" in c)
    assert "ddim7 respacing, stride 143, L=7: {858, 715, 572, 429, 286, 143, 0}" in pf11
    dpm = next(c for c in cells if c.strip().startswith("DPM-Solver++(2M)") and "NFE   4" in c)
    assert "time_uniform t = 1, 0.7502, 0.5005, 0.2507, 0.001" in dpm


def test_table2_without_checkpoints_refuses_before_any_work(tmp_path):
    out = tmp_path / "t2"
    env = {"PFDIFF_BENCH_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch")}
    r = run_cli("reproduce", "table2", "--out", str(out), env=env)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    # one line saying how many, one indented line per missing item (#13 part 11), then the time estimate
    assert err[0] == "error: cannot run table2 here: 5 items are missing", r.stderr
    items, note = err[1:-1], err[-1]
    assert len(items) == 5 and all(line.startswith("  - ") for line in items), r.stderr
    for line, needles in zip(items, (("checkpoint adm_imagenet64 is missing", "64x64_diffusion.pt and place it at"),
                                     ("checkpoint adm_classifier64 is missing", "64x64_classifier.pt and place it at"),
                                     ("no CUDA GPU here",), ("Inception weights", "place it at"),
                                     ("VIRTUAL_imagenet64_labeled.npz ->",))):
        assert all(n in line for n in needles), (needles, line)
    assert note.startswith("  note: estimated sampling time"), note
    assert "Traceback" not in r.stderr
    assert not (out / "runs").exists()  # nothing was started
    assert "{750, 500, 250, 0}" in r.stdout  # the plan is printed first


def _tiny_table(tmp_path: Path, ref: Path) -> Path:
    spec = {
        "name": "tiny", "title": "tiny random DDPM (test)", "config": str(ROOT / "tests/configs/tiny_ddpm.yaml"),
        "metric": "fid", "fid_tool": "torch-fidelity", "reference": str(ref), "num_samples": 6, "nfe": [2, 3],
        "rows": [{"name": "DDIM", "sampler": {"pfdiff": "none"}},
                 {"name": "DDIM + PFDiff-1_1", "sampler": {"pfdiff": "1,1"}, "group": "pfdiff"},
                 {"name": "DDIM + PFDiff-2_1", "sampler": {"pfdiff": "2,1"}, "group": "pfdiff", "default": True}],
        "best_of": {"name": "DDIM + PFDiff (best k,h)", "group": "pfdiff"},
        "paper": {"DDIM": [50.0, 40.0]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_reproduce_tiny_network_table_end_to_end_and_resume(tmp_path, weights):
    from pfdiff_bench.evaluation.features import feature_statistics

    rng = np.random.default_rng(0)
    ref_imgs = torch.from_numpy(rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    mu, sigma, n, _ = feature_statistics([ref_imgs], inception_weights=weights, trust_weights=True)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=mu, sigma=sigma)
    table = _tiny_table(tmp_path, ref)
    out = tmp_path / "out"
    args = ("reproduce", str(table), "--out", str(out), "--inception-weights", str(weights), "--trust-weights",
            "--allow-small")  # 6 samples per cell: below the 2,048 floor
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "sampled 6 cells, evaluated 6" in r.stdout
    res = json.loads((out / "results.json").read_text())
    for name in ("table.md", "table.csv", "table.tex"):
        assert (out / name).stat().st_size > 0
    rows = {row["name"]: row for row in res["rows"]}
    ddim = rows["DDIM"]["cells"]["2"]
    assert ddim["status"] == "ok" and np.isfinite(ddim["ours"]) and ddim["ours"] > 0
    assert abs(ddim["diff"] - (ddim["ours"] - 50.0)) < 1e-9
    best = rows["DDIM + PFDiff (best k,h)"]["cells"]["3"]
    members = [rows["DDIM + PFDiff-1_1"]["cells"]["3"]["ours"], rows["DDIM + PFDiff-2_1 (default 2,1)"]["cells"]["3"]["ours"]]
    assert best["ours"] == min(members) and best["winner"] in ("1_1", "2_1")
    assert res["metric_label"] == "FID-6"
    shard_times = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/shard-*.pt")}
    assert len(shard_times) == 6

    r2 = run_cli(*args)
    assert r2.returncode == 0, r2.stderr
    assert "sampled 0 cells, evaluated 0, reused 6" in r2.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/shard-*.pt")} == shard_times

    r3 = run_cli("plot", "table", str(out))
    assert r3.returncode == 0, r3.stderr
    for name in ("metric_vs_nfe.png", "metric_vs_nfe.pdf", "samples_grid.png"):
        assert (out / name).stat().st_size > 0


def test_demo_writes_table_and_plots_and_agrees_with_the_engine_path(tmp_path):
    out = tmp_path / "toy"
    r = run_cli("demo", "--out", str(out), "--num-samples", "24", "--nfe", "4,6")
    assert r.returncode == 0, r.stderr
    for name in ("table.md", "table.csv", "error_vs_nfe.png", "error_vs_nfe.pdf", "samples_grid.png",
                 "trajectories.png"):
        assert (out / name).stat().st_size > 0, name
    assert "NFE  6: PFDiff variants beating DDIM on exact ground truth:" in r.stdout
    demo = json.loads((out / "results.json").read_text())
    # the persisted path (engine run directories + metrics.evaluate_run) must give the same numbers
    r2 = run_cli("reproduce", "toy", "--out", str(tmp_path / "rep"), "--num-samples", "24", "--nfe", "4",
                 "--rows", "DDIM,DDIM + PFDiff-2_1")
    assert r2.returncode == 0, r2.stderr
    rep = json.loads((tmp_path / "rep" / "results-subset-nfe4-rows.json").read_text())  # a subset run: own files
    for name in ("DDIM", "DDIM + PFDiff-2_1 (default 2,1)"):
        a = next(r for r in demo["rows"] if r["name"] == name)["cells"]["4"]["ours"]
        b = next(r for r in rep["rows"] if r["name"] == name)["cells"]["4"]["ours"]
        assert abs(a - b) < 1e-6 * max(a, b), (name, a, b)
