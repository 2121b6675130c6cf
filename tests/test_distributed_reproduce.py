"""Whole tables under torchrun (issue 18): same samples and metrics as one process, resume after a kill, status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pfdiff_bench.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
BASE = ("reproduce", "toy", "-n", "40", "--no-auto-kh")  # the auto (k,h) row's pilot is not under test here
TOY = (*BASE, "--nfe", "4,6", "--rows", "DDIM,DDIM + PFDiff-2_1", "--shard-size", "10")
_PORT = [29640 + os.getpid() % 200]


def _env(extra=None):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra or {})}


def run_cli(*args, torchrun=False, env=None):
    pre = CLI
    if torchrun:
        _PORT[0] += 1
        pre = [*TORCHRUN, "--master_port", str(_PORT[0]), "-m", "pfdiff_bench.cli"]
    return subprocess.run([*pre, *args], capture_output=True, text=True, cwd=ROOT, env=_env(env), timeout=600)


def _table_file(out: Path, stem: str, ext: str) -> Path:
    """The table's file; a --rows/--nfe subset writes its own (``table-subset-...``), never the full table's."""
    (path,) = sorted(out.glob(f"{stem}*.{ext}"))
    return path


def _values(out: Path) -> dict:
    res = json.loads(_table_file(out, "results", "json").read_text())
    return {(row["name"], nfe): cell["ours"] for row in res["rows"] for nfe, cell in row["cells"].items()}


def _assert_same_values(a: Path, b: Path):
    va, vb = _values(a), _values(b)
    assert va.keys() == vb.keys() and va
    for key in va:
        assert va[key] is not None and np.isfinite(va[key]), key
        assert abs(va[key] - vb[key]) <= 1e-9 * abs(va[key]), (key, va[key], vb[key])


def _assert_same_shards(a: Path, b: Path, keys):
    sa = sorted(p.relative_to(a) for p in a.glob("runs/*/shard-*.pt"))
    sb = sorted(p.relative_to(b) for p in b.glob("runs/*/shard-*.pt"))
    assert sa == sb and sa
    for rel in sa:
        ra = torch.load(a / rel, weights_only=True)
        rb = torch.load(b / rel, weights_only=True)
        for k in keys:
            assert torch.equal(ra[k], rb[k]), (rel, k)  # bit for bit


def test_torchrun_reproduce_toy_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(*TOY, "--out", str(one))
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli(*TOY, "--out", str(two), torchrun=True)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("sampled 4 cells, evaluated 4") == 1  # rank 0 alone reports
    man = json.loads((two / "runs/ddim-nfe4/manifest.json").read_text())
    assert man["world_size"] == 2 and man["num_shards"] == 4
    _assert_same_shards(one, two, ("samples", "x_T", "indices"))
    _assert_same_values(one, two)
    assert _table_file(one, "table", "csv").read_text() == _table_file(two, "table", "csv").read_text()


def _tiny_fid_table(tmp_path: Path, weights: Path) -> Path:
    from pfdiff_bench.evaluation.features import feature_statistics

    rng = np.random.default_rng(0)
    ref_imgs = torch.from_numpy(rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    mu, sigma, _, _ = feature_statistics([ref_imgs], inception_weights=weights, trust_weights=True)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=mu, sigma=sigma)
    spec = {"name": "tiny", "title": "tiny random DDPM (test)", "config": str(ROOT / "tests/configs/tiny_ddpm.yaml"),
            "metric": "fid", "fid_tool": "torch-fidelity", "reference": str(ref), "num_samples": 6, "nfe": [2, 3],
            "rows": [{"name": "DDIM", "sampler": {"pfdiff": "none"}},
                     {"name": "DDIM + PFDiff-1_1", "sampler": {"pfdiff": "1,1"}, "group": "pfdiff",
                      "default": True}],
            "best_of": {"name": "DDIM + PFDiff (best k,h)", "group": "pfdiff"}, "paper": {}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_torchrun_reproduce_network_fid_table_matches_one_process(tmp_path, weights):
    table = _tiny_fid_table(tmp_path, weights)
    # 3 shards of 2 over 2 ranks: rank 0 holds 2 shards, rank 1 one; the FID statistics are all-reduced
    args = ("reproduce", str(table), "--shard-size", "2", "--batch-size", "2", "--inception-weights", str(weights),
            "--trust-weights", "--allow-cpu", "--allow-small")
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(*args, "--out", str(one))
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli(*args, "--out", str(two), torchrun=True)
    assert r2.returncode == 0, r2.stderr
    _assert_same_shards(one, two, ("images", "indices"))
    _assert_same_values(one, two)
    fid = [e for e in json.loads((two / "runs/ddim-nfe2/results.json").read_text()) if e["metric"] == "fid"]
    assert len(fid) == 1 and fid[0]["num_samples"] == 6  # every rank's features were counted once


@pytest.mark.slow
def test_feature_stats_all_reduce_equals_one_pass():
    """The float64 sums merge of two ranks (gloo, in-process threads are not used: two spawned processes)."""
    import torch.multiprocessing as mp

    feats = torch.randn(37, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3 + 1
    out = mp.get_context("spawn").Manager().dict()
    _PORT[0] += 1
    mp.spawn(_reduce_worker, args=(feats, _PORT[0], out), nprocs=2, join=True)
    from pfdiff_bench.evaluation.features import FeatureStats

    ref = FeatureStats(5)
    ref.update(feats)
    for rank in (0, 1):
        n, mu, sigma = out[rank]
        assert n == 37
        np.testing.assert_allclose(mu, ref.mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, ref.sigma, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(feats.numpy().T), rtol=1e-12, atol=1e-12)


def _reduce_worker(rank, feats, port, out):
    import torch.distributed as dist

    from pfdiff_bench.evaluation.features import FeatureStats

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    s = FeatureStats(5)
    part = feats[:30] if rank == 0 else feats[30:]
    for i in range(0, len(part), 4):  # uneven batches on uneven shares
        s.update(part[i:i + 4])
    s.all_reduce()
    out[rank] = (s.n, s.mu, s.sigma)
    dist.destroy_process_group()


@pytest.mark.slow
def test_killed_torchrun_table_resumes_to_identical_results(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli(*TOY, "--out", str(one))
    assert r1.returncode == 0, r1.stderr
    _PORT[0] += 1
    cmd = [*TORCHRUN, "--master_port", str(_PORT[0]), "-m", "pfdiff_bench.cli", *TOY, "--out", str(two)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env({"PFDIFF_BENCH_TEST_BATCH_DELAY": "0.3"}),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(two.glob("runs/*/shard-*.pt"))) < 3:
            time.sleep(0.1)
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the whole job, every rank
        p.wait()
    done = len(list(two.glob("runs/*/shard-*.pt")))
    assert 3 <= done < 16, done  # killed part-way through the table
    r2 = run_cli(*TOY, "--out", str(two), torchrun=True)
    assert r2.returncode == 0, r2.stderr
    _assert_same_shards(one, two, ("samples", "x_T", "indices"))
    _assert_same_values(one, two)


def test_status_of_a_half_finished_table(tmp_path):
    out = tmp_path / "t"
    r = run_cli(*BASE, "--nfe", "4,6", "--rows", "DDIM", "--shard-size", "10", "--out", str(out))
    assert r.returncode == 0, r.stderr
    for k in (1, 3):  # the NFE-6 cell is half done: two of its four shards are left
        (out / f"runs/ddim-nfe6/shard-0000{k}.pt").unlink()
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    s = run_cli(*TOY, "--out", str(out), "--status")
    assert s.returncode == 0, s.stderr
    lines = {ln.split(":")[0].strip(): ln for ln in s.stdout.splitlines() if "NFE" in ln}
    assert "40/40 samples, evaluated (exact)" in lines["DDIM                         NFE   4"]
    assert "ETA 0s" in lines["DDIM                         NFE   4"]
    assert "20/40 samples, not evaluated" in lines["DDIM                         NFE   6"]
    for nfe in (4, 6):
        line = lines[f"DDIM + PFDiff-2_1{' ' * 11} NFE   {nfe}"]
        assert "0/40 samples, not evaluated" in line and "ETA ?" not in line  # ETA from the timed runs
    assert s.stdout.strip().splitlines()[-1].startswith("60/160 samples, 1/4 cells evaluated")
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before  # nothing started or written


@pytest.mark.slow  # ~45 s: two CLI runs plus submitit's job startup
def test_local_launcher_job_array_gives_the_same_table(tmp_path):
    one, jobs = tmp_path / "one", tmp_path / "jobs"
    args = (*BASE, "--nfe", "4,6", "--rows", "DDIM", "--shard-size", "10")
    r1 = run_cli(*args, "--out", str(one))
    assert r1.returncode == 0, r1.stderr
    # one job of both cells, two processes in one gloo group: the torchrun code path
    r2 = run_cli(*args, "--out", str(jobs), "--launcher", "local", "--gpus-per-job", "2", "--cells-per-job", "2",
                 "--wait")
    assert r2.returncode == 0, r2.stderr
    assert "submitted 1 local job " in r2.stdout and "sampled 0 cells, evaluated 0, reused 2" in r2.stdout
    assert json.loads((jobs / "runs/ddim-nfe6/manifest.json").read_text())["world_size"] == 2
    _assert_same_shards(one, jobs, ("samples", "x_T", "indices"))
    _assert_same_values(one, jobs)
    assert _table_file(one, "table", "csv").read_text() == _table_file(jobs, "table", "csv").read_text()
