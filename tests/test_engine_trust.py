"""Sampling-engine trust (issue 10 items 4 and 9, issue 13 point 6, issue 18 "kill one rank").

Each test performs the attack or the failure and asserts the refusal, the redo or the identical result.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pfdiff_bench.cli import main
from pfdiff_bench.sampling import export, rundir

ROOT = Path(__file__).resolve().parents[1]
N, SHARD = 16, 4
BASE = ["sample", "--config", "toy", "--nfe", "4", "-n", str(N), "--shard-size", str(SHARD), "--no-progress"]
_PORT = [30240 + os.getpid() % 300]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    env.update(extra)
    return env


def cli(args, capsys) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        rc = 0
    except SystemExit as exc:
        rc = exc.code or 0
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles) -> str:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _arrays(npz: Path) -> dict:
    with np.load(npz) as z:
        return {k: z[k] for k in z.files}


from test_engine import _one_thread  # noqa: E402,F401  (autouse: torch on one thread in this module too)


@pytest.fixture(scope="module")
def run16(tmp_path_factory):
    """A complete 16-sample toy run (4 shards) and its exported arrays."""
    d = tmp_path_factory.mktemp("run16")
    try:
        main([*BASE, "-o", str(d / "run")])
    except SystemExit as exc:
        assert not exc.code
    export.export_npz(d / "run", d / "ref.npz", raw=True)
    return d / "run", _arrays(d / "ref.npz")


# --------------------------------------------------------------------------- (9) huge -n / NFE
@pytest.mark.parametrize("args,needle", [
    (["-n", str(10**12)], "'sampling.num_samples' = 1000000000000 is out of range; accepted: [1, 10000000]"),
    (["--nfe", str(10**9)], "'sampling.nfe' = 1000000000 is out of range; accepted: [1, 10000]"),
    (["-b", str(10**12)], "'sampling.batch_size' = 1000000000000 is out of range; accepted: [1, 1000000]"),
])
def test_huge_counts_are_refused_at_the_edge(tmp_path, capsys, args, needle):
    t0 = time.time()
    rc, _, err = cli(["sample", "--config", "toy", *args, "-o", tmp_path / "r", "--no-progress"], capsys)
    one_line_error(rc, err, needle)
    assert time.time() - t0 < 5 and not (tmp_path / "r").exists()  # nothing allocated, nothing written


def test_huge_reproduce_n_is_refused(tmp_path, capsys):
    rc, _, err = cli(["reproduce", "toy", "-n", str(10**12), "--out", tmp_path / "t"], capsys)
    one_line_error(rc, err, "out of range; accepted: [1, 10000000]")
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------- (4) symlinks planted in targets
def test_exports_and_grid_replace_a_planted_symlink_never_write_through_it(run16, tmp_path, capsys):
    run_src, ref = run16
    run = tmp_path / "run"
    shutil.copytree(run_src, run)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out.npz"
    out.symlink_to(victim)  # the final name
    tmp = tmp_path / f"out.npz.tmp-{os.getpid()}"
    tmp.symlink_to(tmp_path / "victim2.txt")  # the (predictable) temporary name, pointing at a new file
    rc, _, err = cli(["export", run, out, "--raw"], capsys)
    assert rc == 0, err
    assert victim.read_text() == "precious" and not (tmp_path / "victim2.txt").exists()
    assert not out.is_symlink() and not tmp.exists()
    got = _arrays(out)
    assert got["arr_0"].tobytes() == ref["arr_0"].tobytes() and got["samples"].tobytes() == ref["samples"].tobytes()

    # --png: a PNG folder that is a symlink is refused; a symlink at a PNG's name is replaced
    (tmp_path / "elsewhere").mkdir()
    link_dir = tmp_path / "pngs-link"
    link_dir.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    rc, _, err = cli(["export", run, tmp_path / "b.npz", "--png", link_dir], capsys)
    one_line_error(rc, err, "is a symbolic link")
    assert not list((tmp_path / "elsewhere").iterdir())
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "000000.png").symlink_to(victim)
    rc, _, err = cli(["export", run, tmp_path / "c.npz", "--png", pngs], capsys)
    assert rc == 0, err
    assert victim.read_text() == "precious" and not (pngs / "000000.png").is_symlink()
    from torchvision.io import decode_png, read_file

    img = decode_png(read_file(str(pngs / "000003.png"))).permute(1, 2, 0).numpy()
    assert np.array_equal(img, ref["arr_0"][3])
    assert sorted(p.name for p in pngs.iterdir()) == [f"{i:06d}.png" for i in range(N)]  # no temporaries left

    # --image-grid (sample resumes the finished run: nothing is sampled, the grid is written)
    grid = tmp_path / "grid.png"
    grid.symlink_to(victim)
    rc, out_txt, err = cli([*BASE, "-o", run, "--image-grid", grid, "--grid-count", "4"], capsys)
    assert rc == 0, err
    assert victim.read_text() == "precious" and not grid.is_symlink()
    assert decode_png(read_file(str(grid))).shape[0] == 3


def test_locks_and_results_are_not_written_through_symlinks(run16, tmp_path, capsys):
    run_src, _ = run16
    run = tmp_path / "run"
    shutil.copytree(run_src, run)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # the run lock
    (run / rundir.LOCK).unlink(missing_ok=True)
    (run / rundir.LOCK).symlink_to(victim)
    rc, _, err = cli([*BASE, "-o", run], capsys)
    one_line_error(rc, err, "is a symbolic link")
    assert victim.read_text() == "precious"
    (run / rundir.LOCK).unlink()
    # the results lock: refused, and a symlink to a missing file does not create it
    lock = run / "results.json.lock"
    lock.symlink_to(tmp_path / "created-by-lock")
    rc, _, err = cli(["eval", run, "--steps", "20"], capsys)
    one_line_error(rc, err, "results lock", "symbolic link")
    assert not (tmp_path / "created-by-lock").exists() and not (run / "results.json").exists()
    lock.unlink()
    # results.json itself and its temporary: replaced, never followed
    (run / "results.json").symlink_to(victim)
    (run / f"results.json.tmp-{os.getpid()}").symlink_to(victim)
    with pytest.raises(Exception):  # a symlink to a non-JSON file is not a results list
        rundir.load_results(run)
    (run / "results.json").unlink()
    rundir.append_result(run, {"metric": "test"})
    assert victim.read_text() == "precious"
    assert json.loads((run / "results.json").read_text())[0]["metric"] == "test"
    assert not (run / f"results.json.tmp-{os.getpid()}").exists()


# --------------------------------------------------------------------------- (9) the NaN error names its shard
def nan_model(nan_from_call: int = 0):
    """A python-type noise predictor (model.target) that turns non-finite from its ``nan_from_call``-th call."""
    calls = [0]

    def eps(x, t, y=None):
        calls[0] += 1
        return torch.full_like(x, float("nan")) if calls[0] > nan_from_call else 0.1 * x

    return eps


def test_nan_error_names_the_shard_that_produced_it(tmp_path, capsys):
    # 42 samples in shards of 8: shards 0-4 full, shard 5 holds 2 (its old message said "shard 20")
    cfg = {"name": "nanmodel", "model": {"type": "python", "target": "test_engine_trust:nan_model",
                                         "kwargs": {"nan_from_call": 5 * 4}, "shape": [2]},
           "schedule": {"type": "linear"}, "sampler": {"name": "ddim", "pfdiff": "none"},
           "sampling": {"nfe": 4, "num_samples": 42, "batch_size": 8, "shard_size": 8, "device": "cpu"}}
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sys.path.insert(0, str(Path(__file__).parent))  # model.target imports this module by name
    try:
        rc, _, err = cli(["sample", "--config", path, "-o", tmp_path / "r", "--no-progress"], capsys)
    finally:
        sys.path.remove(str(Path(__file__).parent))
    one_line_error(rc, err, "non-finite samples (indices [40, 41]", "in shard 5 (shard-00005.pt, samples 40..41)")
    assert sorted(p.name for p in (tmp_path / "r").glob("shard-*")) == [f"shard-{k:05d}.pt" for k in range(5)]


# --------------------------------------------------------------------------- (9) damaged fingerprint vs another run
def test_flipped_fingerprint_is_redone_but_a_foreign_shard_is_refused(run16, tmp_path, capsys):
    run_src, ref = run16
    run = tmp_path / "run"
    shutil.copytree(run_src, run)
    p1 = run / "shard-00001.pt"
    rec = torch.load(p1, weights_only=True)
    fp = rec["fingerprint"]
    flipped = fp[:3] + ("0" if fp[3] != "0" else "1") + fp[4:]  # one character of the stored fingerprint
    torch.save(dict(rec, fingerprint=flipped), p1)
    with pytest.raises(rundir.CorruptShard, match="checksum mismatch"):
        rundir.read_shard(p1, fp=fp)
    rc, _, err = cli(["export", run, tmp_path / "x.npz"], capsys)
    one_line_error(rc, err, "shard-00001.pt is corrupt (checksum mismatch)", "re-run the sample command")
    rc, out, err = cli([*BASE, "-o", run], capsys)
    assert rc == 0, err
    assert "shard-00001.pt is corrupt (checksum mismatch); redoing it" in err and "4 new, 12 already done" in out
    export.export_npz(run, tmp_path / "fixed.npz", raw=True)
    got = _arrays(tmp_path / "fixed.npz")
    assert all(got[k].tobytes() == ref[k].tobytes() for k in ("arr_0", "samples", "x_T", "indices"))

    # an intact shard of another run (seed 1) at the same name is still refused, and left in place
    other = tmp_path / "other"
    rc, _, err = cli([*BASE, "--seed", "1", "-o", other], capsys)
    assert rc == 0, err
    shutil.copy(other / "shard-00002.pt", run / "shard-00002.pt")
    before = (run / "shard-00002.pt").read_bytes()
    rc, _, err = cli([*BASE, "-o", run], capsys)
    one_line_error(rc, err, "shard-00002.pt belongs to another run")
    assert (run / "shard-00002.pt").read_bytes() == before


# --------------------------------------------------------------------------- torchrun: one error line, rank 0 first
def test_torchrun_bad_config_prints_one_error_line(tmp_path):
    _PORT[0] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_PORT[0]), "-m", "pfdiff_bench.cli", "sample", "--config", "toy", "--nfe", "0",
           "-n", "4", "-o", str(tmp_path / "r"), "--no-progress"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    text = p.stdout + p.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert errors == ["error: option: 'sampling.nfe' must be at least 1 (got 0); accepted: [1, 10000]"], text
    # no traceback of ours on any rank; torchrun's own summary names each worker's exit status 2
    assert "pfdiff_bench/" not in text.replace("pfdiff_bench.cli FAILED", ""), text
    assert p.returncode != 0 and text.count("exitcode  : 2") + text.count("exitcode: 2") >= 1, text
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_aware_error_lines(tmp_path, capsys, monkeypatch, rank):
    """In-process: an error every rank meets is printed by rank 0 at once; another rank waits for torchrun to
    stop it (here: no wait) and prints it, tagged, only if still alive; a rank's own error by that rank."""
    from pfdiff_bench import cli as cli_mod
    from pfdiff_bench.errors import OtherRankFailed, PFDiffError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    waits = []
    monkeypatch.setattr(cli_mod, "_peer_wait", lambda: waits.append(1))
    rc, _, err = cli(["sample", "--config", "toy", "--nfe", "0", "-o", tmp_path / "r"], capsys)
    tag = "" if rank == 0 else "rank 1 of 2: "
    assert rc == 2 and err.strip().splitlines() == [f"error: {tag}option: 'sampling.nfe' must be at least 1 (got 0); "
                                                    f"accepted: [1, 10000]"], err
    assert waits == ([] if rank == 0 else [1])
    own = PFDiffError("non-finite samples in shard 3")
    own.only_rank = (rank, 2)
    for exc, lines in ((own, [f"error: rank {rank} of 2: non-finite samples in shard 3"]), (OtherRankFailed("x"), [])):
        def boom(*a, _exc=exc, **k):
            raise _exc
        monkeypatch.setattr(cli_mod.cli, "main", boom)
        waits.clear()
        rc, _, err = cli(["sample"], capsys)
        assert rc == 2 and err.strip().splitlines() == lines
        assert waits == ([1] if isinstance(exc, OtherRankFailed) else [])  # the failing rank prints meanwhile


def _download_worker(rank, port, home, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), PFDIFF_BENCH_HOME=home, OMP_NUM_THREADS="1")
    from pfdiff_bench.config import load_config
    from pfdiff_bench.models import zoo
    from pfdiff_bench.sampling.engine import run_sampling

    def fake_download(name, force=False, **kw):  # what a download leaves: a file in the cache (not a checkpoint)
        with open(Path(home) / "downloads.log", "a") as f:
            f.write(f"{rank} {name}\n")
        dest = zoo.cache_path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"not a checkpoint")
        return dest

    zoo.download = fake_download
    logged = []
    cfg = load_config("cifar10")
    cfg["sampling"]["device"] = "cpu"
    try:
        run_sampling(cfg, Path(home) / "run", preflight=True, allow_cpu=True, log=logged.append, progress=False)
        out[rank] = ("ok", "", logged)
    except Exception as exc:
        out[rank] = (type(exc).__name__, str(exc), logged)


@pytest.mark.slow  # ~13 s: two spawned processes importing torch on 2 cores
def test_torchrun_download_on_rank_0_only_and_its_failure_reported_once(tmp_path):
    """The real preflight/build path on a 2-process gloo group: rank 0 downloads (once) and meets the bad
    file's checksum error; rank 1 waits, never downloads, prints nothing and stops with OtherRankFailed."""
    import torch.multiprocessing as mp

    out = mp.get_context("spawn").Manager().dict()
    _PORT[0] += 1
    mp.spawn(_download_worker, args=(_PORT[0], str(tmp_path), out), nprocs=2, join=True)
    assert (tmp_path / "downloads.log").read_text() == "0 ema_cifar10\n"
    kind0, msg0, log0 = out[0]
    kind1, _, log1 = out[1]
    assert kind0 == "CheckpointError" and "checksum" in msg0.lower(), out[0]
    assert kind1 == "OtherRankFailed" and log1 == []
    assert any("full-size network on the CPU" in m for m in log0)  # the preflight warning, rank 0 only
    assert not (tmp_path / "run").exists()  # the model is built before the run directory is made


# --------------------------------------------------------------------------- issue 18: kill one rank, rerun
def _children(pid: int) -> list[int]:
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _rank_of(pid: int):
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    vals = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(vals[0]) if vals else None


@pytest.mark.slow  # ~40 s: two torchrun jobs on 2 cores
def test_kill_one_torchrun_rank_then_same_command_gives_identical_export(run16, tmp_path, capsys):
    n, shard = 40, 4
    args = ["sample", "--config", "toy", "--nfe", "4", "-n", str(n), "--shard-size", str(shard), "-b", "2",
            "--no-progress", "-o", str(tmp_path / "run")]
    rc, _, err = cli([*args[:-1], tmp_path / "one"], capsys)  # the single-process reference
    assert rc == 0, err
    export.export_npz(tmp_path / "one", tmp_path / "one.npz", raw=True)

    def torchrun(**env):
        _PORT[0] += 1
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(_PORT[0]), "-m", "pfdiff_bench.cli", *args]
        return subprocess.Popen(cmd, cwd=tmp_path, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    run = tmp_path / "run"
    p = torchrun(PFDIFF_BENCH_TEST_BATCH_DELAY="0.3")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(list(run.glob("shard-*.pt"))) < 3:
            time.sleep(0.05)
        victims = [c for c in _children(p.pid) if _rank_of(c) == 1]
        assert len(victims) == 1, _children(p.pid)
        os.kill(victims[0], signal.SIGKILL)  # one rank only; torchrun stops the other
        _, err1 = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode != 0
    done = len(list(run.glob("shard-*.pt")))
    assert 3 <= done < n // shard, done  # killed part-way
    assert "Traceback (most recent call last):\n  File \"" + str(ROOT) not in err1  # no traceback of ours
    p2 = torchrun()
    out2, err2 = p2.communicate(timeout=300)
    assert p2.returncode == 0, err2[-3000:]
    assert "already done" in out2 and len([ln for ln in out2.splitlines() if ln.startswith("DDIM")]) == 1
    export.export_npz(run, tmp_path / "two.npz", raw=True)
    a, b = _arrays(tmp_path / "one.npz"), _arrays(tmp_path / "two.npz")
    assert a.keys() == b.keys()
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)  # byte-identical arrays


def rank1_nan_model():
    """Non-finite output on torchrun rank 1 only: an error that only that rank meets."""
    bad = os.environ.get("RANK") == "1"
    return lambda x, t, y=None: torch.full_like(x, float("nan")) if bad else 0.1 * x


@pytest.mark.slow  # ~15 s: one torchrun job
def test_torchrun_error_of_one_rank_is_reported_by_that_rank_once(tmp_path):
    cfg = {"name": "ranknan", "model": {"type": "python", "target": "test_engine_trust:rank1_nan_model",
                                        "shape": [2]},
           "schedule": {"type": "linear"}, "sampler": {"name": "ddim", "pfdiff": "none"},
           "sampling": {"nfe": 4, "num_samples": 8, "batch_size": 2, "shard_size": 2, "device": "cpu"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    _PORT[0] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_PORT[0]), "-m", "pfdiff_bench.cli", "sample", "--config", str(tmp_path / "c.yaml"),
           "-o", str(tmp_path / "r"), "--no-progress"]
    env = _env(PYTHONPATH=f"{ROOT}{os.pathsep}{Path(__file__).parent}")
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    text = p.stdout + p.stderr
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 of 2: non-finite samples"), text
    assert "in shard 1 (shard-00001.pt" in errors[0], errors[0]
    assert "pfdiff_bench/" not in text.replace("pfdiff_bench.cli FAILED", ""), text
    # rank 0's own shards were written; rank 1 wrote none; the run is resumable (not complete)
    assert sorted(q.name for q in (tmp_path / "r").glob("shard-*.pt")) == ["shard-00000.pt", "shard-00002.pt"]
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["complete"] is False
