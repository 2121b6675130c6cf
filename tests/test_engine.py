"""Sampling engine: determinism across batch sizes / processes / resume, shards, refusals, export, metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pfdiff_bench.sampling import engine
from pfdiff_bench.sampling import export
from pfdiff_bench.sampling import rundir
from pfdiff_bench.cli import main
from pfdiff_bench.config import load_config

ROOT = Path(__file__).resolve().parents[1]
N, SHARD = 40, 8
BASE = ["sample", "--config", "toy", "-n", str(N), "--shard-size", str(SHARD), "--no-progress"]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"  # tiny tensors: threads only contend on a shared 2-core box
    env.update(extra)
    return env


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def cli(args, capsys=None) -> tuple[int, str, str]:
    """Run the CLI in-process; (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        rc = 0
    except SystemExit as exc:
        rc = exc.code or 0
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


def sample_and_export(run: Path, npz: Path, *extra, capsys=None) -> dict:
    rc, out, err = cli([*BASE, "-o", run, *extra], capsys)
    assert rc == 0, err
    rc, _, err = cli(["export", run, npz, "--raw"], capsys)
    assert rc == 0, err
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


def assert_same(a: dict, b: dict) -> None:
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (N, 8, 8, 3)
    assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
    assert a["samples"].tobytes() == b["samples"].tobytes()
    assert a["x_T"].tobytes() == b["x_T"].tobytes()
    assert (a["indices"] == np.arange(N)).all() and (b["indices"] == np.arange(N)).all()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """A 40-sample toy run at batch size 3: (run dir, exported arrays)."""
    d = tmp_path_factory.mktemp("ref")
    arrays = sample_and_export(d / "run", d / "ref.npz", "--batch-size", "3")
    return d / "run", arrays


def test_batch_size_16_identical_and_manifest(ref, tmp_path, capsys):
    run, arrays = ref
    other = sample_and_export(tmp_path / "run", tmp_path / "b16.npz", "--batch-size", "16", capsys=capsys)
    assert_same(arrays, other)
    man = json.loads((run / "manifest.json").read_text())
    assert man["complete"] and man["num_samples"] == N and man["shard_size"] == SHARD and man["num_shards"] == 5
    assert man["nfe"] == {"requested": 10, "planned": 10, "counted": 10}
    assert man["plan"]["sampler"] == "DDIM" and man["grid"]["type"] == "uniform"
    assert man["torch_version"] == torch.__version__ and man["package_version"] and man["device"] == "cpu"
    assert man["timings"]["wall_s"] >= 0
    assert sorted(p.name for p in run.glob("shard-*")) == [f"shard-{k:05d}.pt" for k in range(5)]
    # the same command with another batch size resumes (batch size is not part of the fingerprint)
    rc, out, err = cli([*BASE, "-o", run, "--batch-size", "7"], capsys)
    assert rc == 0, err
    assert "0 new, 40 already done" in out
    assert len(out.strip().splitlines()) == 1


def test_quantisation_matches_save_image(ref):
    _, a = ref
    x = torch.from_numpy(a["samples"])
    expect = ((x + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert np.array_equal(expect.numpy(), a["arr_0"])
    guided = rundir.quantize(x, "truncate")
    assert torch.equal(guided, ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))


def test_torchrun_two_processes(ref, tmp_path):
    _, arrays = ref
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "pfdiff_bench.cli", *BASE, "--batch-size", "5", "-o", str(run)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("DDIM:")]
    assert len(summary) == 1 and "40 samples" in summary[0]  # only rank 0 prints
    man = json.loads((run / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["complete"]
    export.export_npz(run, tmp_path / "tr.npz", raw=True)
    with np.load(tmp_path / "tr.npz") as z:
        assert_same(arrays, {k: z[k] for k in z.files})


def test_kill_mid_run_then_resume(ref, tmp_path, capsys):
    _, arrays = ref
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pfdiff_bench.cli", *BASE, "--batch-size", "4", "-o", str(run)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(PFDIFF_BENCH_TEST_BATCH_DELAY="0.3"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list(run.glob("shard-*.pt"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.35)  # into the first batch of the next shard
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in run.glob("shard-*.pt"))
    assert 2 <= len(done) < 5, done
    assert not rundir.run_complete(run)
    man = json.loads((run / "manifest.json").read_text())
    assert man["complete"] is False
    # a writer killed during the rename leaves a temporary behind: it must not count
    (run / f"shard-00004.pt.tmp-{proc.pid}").write_bytes(b"partial")
    rc, _, err = cli(["export", run, tmp_path / "x.npz"], capsys)
    assert rc == 2 and "incomplete" in err and f"{(5 - len(done)) * SHARD} of 40 samples missing" in err
    rc, out, err = cli([*BASE, "--batch-size", "4", "-o", run], capsys)
    assert rc == 0, err
    assert f"{len(done) * SHARD} already done" in out
    assert sorted(p.name for p in run.iterdir() if p.name != rundir.LOCK) == ["manifest.json"] + [f"shard-{k:05d}.pt" for k in range(5)]
    seen = []
    for k in range(5):
        rec = rundir.read_shard(run / f"shard-{k:05d}.pt", rundir.shard_range(k, N, SHARD))
        seen += rec["indices"].tolist()
    assert seen == list(range(N))  # nothing lost, nothing duplicated
    assert rundir.run_complete(run)
    export.export_npz(run, tmp_path / "resumed.npz", raw=True)
    with np.load(tmp_path / "resumed.npz") as z:
        assert_same(arrays, {k: z[k] for k in z.files})


def test_corrupt_shards_detected_redone_reported(ref, tmp_path, capsys):
    src, arrays = ref
    run = tmp_path / "run"
    shutil.copytree(src, run)
    # shard 1: truncated file; shard 3: valid zip whose tensors no longer match the checksum
    p1 = run / "shard-00001.pt"
    p1.write_bytes(p1.read_bytes()[:1000])
    p3 = run / "shard-00003.pt"
    rec = torch.load(p3, weights_only=True)
    rec["images"][0, 0, 0, 0] ^= 1
    torch.save(rec, p3)
    with pytest.raises(rundir.CorruptShard, match="checksum"):
        rundir.read_shard(p3)
    rc, _, err = cli(["export", run, tmp_path / "bad.npz"], capsys)
    assert rc == 2 and "shard-00001.pt is corrupt" in err
    rc, out, err = cli([*BASE, "-o", run], capsys)
    assert rc == 0, err
    assert "shard-00001.pt is corrupt (unreadable" in err
    assert "shard-00003.pt is corrupt (checksum mismatch)" in err
    assert "16 new, 24 already done" in out
    export.export_npz(run, tmp_path / "fixed.npz", raw=True)
    with np.load(tmp_path / "fixed.npz") as z:
        assert_same(arrays, {k: z[k] for k in z.files})


def test_other_config_refused(ref, tmp_path, capsys):
    src, _ = ref
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    for extra in (["--nfe", "5"], ["--seed", "1"], ["--pfdiff", "1,1", "--nfe", "6"], ["--shard-size", "10"]):
        rc, out, err = cli([*BASE, "-o", run, *extra], capsys)
        assert rc == 2, (extra, out)
        assert err.startswith("error: ") and "holds another run" in err and len(err.strip().splitlines()) == 1
    # shards of another run without a manifest are refused too
    (run / "manifest.json").unlink()
    rc, _, err = cli([*BASE, "-o", run, "--nfe", "5"], capsys)
    assert rc == 2 and "another run" in err
    assert all(p.stat().st_mtime_ns == before[p.name] for p in run.iterdir() if p.name != rundir.LOCK)


def test_unwritable_out_and_zero_samples(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    rc, _, err = cli([*BASE, "-o", blocker / "run"], capsys)
    assert rc == 2 and "cannot write the run directory" in err and "Traceback" not in err
    rc, _, err = cli(["sample", "--config", "toy", "--num-samples", "0", "-o", tmp_path / "z"], capsys)
    assert rc == 2 and "at least 1" in err
    assert not (tmp_path / "z").exists()
    with pytest.raises(Exception, match="at least 1"):
        engine.run_sampling(load_config("toy"), tmp_path / "z2", num_samples=0)


def test_eta_noise_identical_across_batch_sizes(tmp_path):
    cfg = load_config("toy")
    cfg["sampler"]["eta"] = 1.0
    outs = []
    for bs in (3, 16):
        run = tmp_path / f"eta{bs}"
        engine.run_sampling(cfg, run, num_samples=20, shard_size=8, batch_size=bs, progress=False)
        outs.append(rundir.load_run(run))
    assert torch.equal(outs[0]["samples"], outs[1]["samples"])
    # and the noise matters: eta = 1 differs from the deterministic sampler
    engine.run_sampling(load_config("toy"), tmp_path / "eta0", num_samples=20, shard_size=8, progress=False)
    assert not torch.equal(outs[0]["samples"], rundir.load_run(tmp_path / "eta0")["samples"])


def test_labels_when_class_conditional(tmp_path, capsys):
    cfg = tmp_path / "cc.yaml"
    cfg.write_text((ROOT / "pfdiff_bench/configs/toy.yaml").read_text()
                   .replace("  means_seed: 0\n", "  means_seed: 0\n  class_cond: true\n"))
    got = []
    for bs in (3, 8):
        run = tmp_path / f"cc{bs}"
        rc, _, err = cli(["sample", "--config", cfg, "-n", 24, "--shard-size", 8, "-b", bs, "--no-progress",
                          "-o", run], capsys)
        assert rc == 0, err
        rc, _, err = cli(["export", run, tmp_path / f"cc{bs}.npz"], capsys)
        assert rc == 0, err
        with np.load(tmp_path / f"cc{bs}.npz") as z:
            assert sorted(z.files) == ["arr_0", "arr_1"]
            got.append((z["arr_0"], z["arr_1"]))
    assert got[0][1].dtype == np.int64 and set(got[0][1].tolist()) <= {0, 1, 2, 3} and len(set(got[0][1])) > 1
    assert np.array_equal(got[0][0], got[1][0]) and np.array_equal(got[0][1], got[1][1])
    batches = list(rundir.iter_image_batches(tmp_path / "cc3", batch_size=5))
    assert [b[0].shape[0] for b in batches] == [5, 5, 5, 5, 4]
    assert np.array_equal(torch.cat([b[0] for b in batches]).numpy(), got[0][0])
    assert np.array_equal(torch.cat([b[1] for b in batches]).numpy(), got[0][1])


def test_export_png_and_grid(ref, tmp_path, capsys):
    run, arrays = ref
    rc, _, err = cli(["export", run, tmp_path / "o.npz", "--png", tmp_path / "png"], capsys)
    assert rc == 0, err
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == N and pngs[0].name == "000000.png" and pngs[-1].name == "000039.png"
    from torchvision.io import read_image

    assert np.array_equal(read_image(str(pngs[7])).permute(1, 2, 0).numpy(), arrays["arr_0"][7])
    with np.load(tmp_path / "o.npz") as z:
        assert z.files == ["arr_0"]  # unconditional: no labels
    rc, _, err = cli([*BASE, "-o", run, "--image-grid", tmp_path / "grid.png", "--grid-count", 16], capsys)
    assert rc == 0, err
    grid = read_image(str(tmp_path / "grid.png"))
    assert grid.shape == (3, 4 * 10 + 2, 4 * 10 + 2)  # make_grid: 4x4 tiles of 8 px, 2 px padding


def test_exact_metrics_small_for_200_nfe_large_for_4(tmp_path, capsys):
    rms = {}
    for nfe in (200, 4):
        run = tmp_path / f"nfe{nfe}"
        rc, _, err = cli(["sample", "--config", "toy", "--nfe", nfe, "-n", 16, "--no-progress", "-o", run], capsys)
        assert rc == 0, err
        rc, out, err = cli(["eval", run, "--steps", 300], capsys)
        assert rc == 0, err
        assert "RMS to exact solution" in out
        res = rundir.load_results(run)
        assert len(res) == 1 and res[0]["metric"] == "exact" and res[0]["nfe"] == nfe
        assert res[0]["a_end"] == 1.0 and 0 < res[0]["a_start"] < 1e-3
        rms[nfe] = res[0]["rms_mean"]
        assert res[0]["frechet"] > 0
    assert rms[200] < 1e-2, rms
    assert rms[4] > 10 * rms[200], rms
    rundir.append_result(tmp_path / "nfe4", {"metric": "custom", "value": 1})
    assert [r["metric"] for r in rundir.load_results(tmp_path / "nfe4")] == ["exact", "custom"]


def test_plan_endpoints_dpm_solver():
    from pfdiff_bench.config import override
    from pfdiff_bench.evaluation.exact import plan_endpoints
    from pfdiff_bench.sampling.setup import build

    cfg = load_config("toy")
    for key, val in (("sampler.convention", "dpm_solver"), ("sampler.name", "dpm-solver++"),
                     ("sampler.grid", "logSNR"), ("sampler.method", "multistep"), ("sampler.order", 2),
                     ("sampling.nfe", 6)):
        override(cfg, key, val)
    setup = build(cfg)
    a0, a1 = plan_endpoints(setup)
    assert a0 == pytest.approx(float(setup.schedule.alphas_cumprod[-1]), rel=1e-9)
    assert a1 == pytest.approx(float(setup.schedule.alphas_cumprod[0]), rel=1e-9) and a1 < 1.0


def test_help_has_examples(capsys):
    for cmd in ("sample", "export", "eval"):
        rc, out, _ = cli([cmd, "--help"], capsys)
        assert rc == 0 and "Examples:" in out and f"pfdiff-bench {cmd} runs/" in out.replace("\n", " ") or (
            cmd == "sample" and "pfdiff-bench sample --config toy" in out)
