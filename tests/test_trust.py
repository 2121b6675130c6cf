"""Issue 10 "Trust": each test performs one attack of the audit and asserts the refusal or the recomputation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pfdiff_bench.errors import PFDiffError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pfdiff_bench.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def _toy_table(tmp_path: Path, **over) -> Path:
    spec = {"name": "toytrust", "title": "toy (test)", "config": "toy", "metric": "exact", "num_samples": 16,
            "nfe": [4], "rows": [{"name": "DDIM", "sampler": {"pfdiff": "none"}}], "paper": {}}
    spec.update(over)
    path = tmp_path / "toytrust.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(table_path, out, log=None, **kw):
    from pfdiff_bench.reproduction.cells import plan_cells
    from pfdiff_bench.reproduction.runner import run_table
    from pfdiff_bench.reproduction.tables import load_table

    spec = load_table(str(table_path))
    plan_kw = {k: kw.pop(k) for k in ("num_samples", "nfes", "rows") if k in kw}
    cells = plan_cells(spec, Path(out), **plan_kw)
    logs = []
    done = run_table(spec, cells, log=logs.append, **kw)
    return done, cells, logs


# --------------------------------------------------------------------------- (1) FID cache key
def _fid_table(tmp_path: Path, ref: Path) -> Path:
    spec = {"name": "tinyfid", "title": "tiny random DDPM (test)", "config": str(ROOT / "tests/configs/tiny_ddpm.yaml"),
            "metric": "fid", "fid_tool": "torch-fidelity", "reference": str(ref), "num_samples": 6, "nfe": [2],
            "rows": [{"name": "DDIM", "sampler": {"pfdiff": "none"}}], "paper": {}}
    path = tmp_path / "tinyfid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_cached_fid_is_recomputed_when_weights_or_reference_change(tmp_path, weights):
    from pfdiff_bench.evaluation.features import feature_statistics

    rng = np.random.default_rng(0)
    ref_imgs = torch.from_numpy(rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    mu, sigma, _, _ = feature_statistics([ref_imgs], inception_weights=weights, trust_weights=True)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=mu, sigma=sigma)
    table = _fid_table(tmp_path, ref)
    out = tmp_path / "out"
    kw = dict(trust_weights=True, allow_small=True)  # 6 samples: below the 2,048 floor
    done, cells, _ = _run(table, out, inception_weights=str(weights), **kw)
    assert done == {"sampled": 1, "evaluated": 1, "cached": 0}
    v_a = cells[0].value
    done, cells, _ = _run(table, out, inception_weights=str(weights), **kw)
    assert done["cached"] == 1 and cells[0].value == v_a  # same inputs: reused

    # weights B: same architecture, one tensor changed -> must be recomputed, and differ
    sd = torch.load(weights, weights_only=True)
    key = next(k for k, v in sd.items() if v.dtype.is_floating_point and v.dim() == 4)
    sd[key] = sd[key] * 1.5
    weights_b = tmp_path / "b.pth"
    torch.save(sd, weights_b)
    done, cells, logs = _run(table, out, inception_weights=str(weights_b), **kw)
    assert done == {"sampled": 0, "evaluated": 1, "cached": 0}
    assert cells[0].value != v_a and cells[0].result["weights_sha256"] != cells[0].result["reference_sha256"]
    assert any("weights_sha256" in m and "recomputing" in m for m in logs), logs
    v_b = cells[0].value

    # reference contents changed under the same name -> recomputed
    np.savez(ref, mu=mu + 1.0, sigma=sigma)
    done, cells, logs = _run(table, out, inception_weights=str(weights_b), **kw)
    assert done["evaluated"] == 1 and cells[0].value != v_b
    assert any("reference_sha256" in m for m in logs), logs


# --------------------------------------------------------------------------- (10) foreign run in a cell
def test_reproduce_refuses_a_foreign_run_in_a_cell_and_redo_replaces_it(tmp_path):
    table = _toy_table(tmp_path)
    out = tmp_path / "out"
    done, cells, _ = _run(table, out)
    v16 = cells[0].value
    assert done["sampled"] == 1
    # a larger sample count extends the same run (issue 13: the first 16 samples stay) and is re-evaluated,
    # never shown with the 16-sample value; asking fewer samples of the 20-sample run is refused
    done, cells20, _ = _run(table, out, num_samples=20)
    assert done["sampled"] == 1 and done["cached"] == 0 and cells20[0].value != v16
    assert cells20[0].result["num_samples"] == 20
    with pytest.raises(PFDiffError, match="holds 20 samples"):
        _run(table, out)
    # a run made with another seed placed in the cell's folder is refused as well
    from pfdiff_bench.config import load_config, override
    from pfdiff_bench.sampling.engine import run_sampling

    cfg = load_config("toy")
    override(cfg, "sampling.seed", 7)
    override(cfg, "sampling.nfe", 4)
    override(cfg, "sampling.num_samples", 16)
    override(cfg, "sampler.pfdiff", "none")
    foreign = tmp_path / "foreign"
    run_sampling(cfg, foreign, progress=False, log=lambda m: None)
    import shutil

    shutil.rmtree(cells[0].run_dir)
    shutil.copytree(foreign, cells[0].run_dir)
    with pytest.raises(PFDiffError, match="holds another run"):
        _run(table, out)
    done, cells, logs = _run(table, out, redo=True)
    assert done == {"sampled": 1, "evaluated": 1, "cached": 0} and any("--redo" in m for m in logs)
    assert cells[0].value == v16  # the cell's own run again


def test_reproduce_cli_n_change_extends_or_is_refused(tmp_path):
    table = _toy_table(tmp_path)
    out = tmp_path / "out"
    _run(table, out)
    # more samples: the same run is extended and re-evaluated (never the 16-sample value under 20)
    r = run_cli("reproduce", str(table), "--out", str(out), "-n", "20", "--no-auto-kh")
    assert r.returncode == 0 and "not reused (num_samples differs)" in r.stderr, (r.stdout, r.stderr)
    # fewer samples than the run holds: refused in one line
    r = run_cli("reproduce", str(table), "--out", str(out), "-n", "8", "--no-auto-kh")
    one_line_error(r, "holds 20 samples", "pass -n 20")


# --------------------------------------------------------------------------- (2) edited manifest
@pytest.fixture()
def toy_run(tmp_path):
    from pfdiff_bench.config import load_config, override
    from pfdiff_bench.sampling.engine import run_sampling

    cfg = load_config("toy")
    override(cfg, "sampling.nfe", 4)
    override(cfg, "sampling.num_samples", 16)
    override(cfg, "sampling.shard_size", 8)
    out = tmp_path / "run"
    run_sampling(cfg, out, progress=False, log=lambda m: None)
    return out


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(num_samples=8), "num_samples"),
    (lambda m: m["config"]["model"].update(std=0.5), "config.model"),
    (lambda m: m["config"]["model"].update(means_seed=3), "config.model"),
    (lambda m: m.update(seed=1), "seed"),
])
def test_edited_manifest_is_refused_by_every_reader(toy_run, edit, field):
    from pfdiff_bench.evaluation.exact import evaluate_run
    from pfdiff_bench.sampling.rundir import iter_shards, load_run

    evaluate_run(toy_run)  # the intact run reads
    path = toy_run / "manifest.json"
    man = json.loads(path.read_text())
    edit(man)
    path.write_text(json.dumps(man))
    for reader in (evaluate_run, load_run, lambda d: list(iter_shards(d))):
        with pytest.raises(PFDiffError, match=f"manifest was edited.*{field}"):
            reader(toy_run)


def test_edited_manifest_export_and_eval_exit_2(toy_run, tmp_path):
    path = toy_run / "manifest.json"
    man = json.loads(path.read_text())
    man["num_samples"] = 8
    path.write_text(json.dumps(man))
    one_line_error(run_cli("export", str(toy_run), str(tmp_path / "x.npz")), "manifest was edited", "num_samples")
    assert not (tmp_path / "x.npz").exists()
    one_line_error(run_cli("eval", str(toy_run)), "manifest was edited")


# --------------------------------------------------------------------------- (11) partial / bad table commands
def test_bad_table_options_refused_before_writing_and_subset_keeps_full_table(tmp_path):
    table = _toy_table(tmp_path, nfe=[4, 6])
    out = tmp_path / "out"
    r = run_cli("reproduce", str(table), "--out", str(out))
    assert r.returncode == 0, r.stderr
    full = {n: (out / n).read_bytes() for n in ("table.md", "table.csv", "table.tex", "results.json")}
    assert json.loads(full["results.json"])["nfe"] == [4, 6]
    for bad, needle in ((("--batch-size", "0"), "--batch-size must be at least 1"),
                        (("-n", "0"), "--num-samples must be at least 1")):
        one_line_error(run_cli("reproduce", str(table), "--out", str(out), *bad), needle)
    r = run_cli("reproduce", str(table), "--out", str(out), "--nfe", "4", "--rows", "DDIM")
    assert r.returncode == 0, r.stderr
    assert {n: (out / n).read_bytes() for n in full} == full  # the finished table is untouched
    sub = json.loads((out / "results-subset-nfe4-rows.json").read_text())
    assert sub["nfe"] == [4]


# --------------------------------------------------------------------------- (7) run-directory lock
def test_second_writer_is_refused_naming_the_holder_pid(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
         "from pfdiff_bench.sampling.rundir import run_lock\nwith run_lock(Path(sys.argv[2])):\n"
         " print('held', flush=True); time.sleep(60)", str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "manifest.json.tmp-999999").write_text("{}")
        r = run_cli("sample", "--config", "toy", "--nfe", "4", "-n", "8", "--out", str(out))
        one_line_error(r, f"PID {holder.pid}", "being written by another command")
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    r = run_cli("sample", "--config", "toy", "--nfe", "4", "-n", "8", "--out", str(out))  # lock released
    assert r.returncode == 0, r.stderr
    assert not list(out.glob("manifest.json.tmp-*"))  # stale temporaries are removed under the lock


# --------------------------------------------------------------------------- (12) degenerate grids
@pytest.mark.parametrize("extra,needle", [
    (["--nfe", "1"], "takes no step from the noise"),
    (["--nfe", "5000"], "repeats timesteps"),
])
def test_degenerate_grids_are_refused(tmp_path, extra, needle):
    from pfdiff_bench.samplers import SamplerSpec, plan
    from pfdiff_bench.schedules import schedule_from_config
    from pfdiff_bench.config import load_config
    from pfdiff_bench.sampling.setup import sampler_spec

    cfg = load_config("toy")
    cfg["sampler"]["pfdiff"] = None
    sched = schedule_from_config(cfg["schedule"])
    with pytest.raises(PFDiffError, match=needle):
        plan(sampler_spec(cfg), sched, int(extra[1]))
    assert len(plan(sampler_spec(cfg), sched, 1000).timesteps) == 1000  # the largest honest grid still plans
    del SamplerSpec
    r = run_cli("sample", "--config", "toy", "--pfdiff", "none", *extra, "-n", "4", "--out", str(tmp_path / "r"))
    one_line_error(r, needle)
    assert not (tmp_path / "r" / "manifest.json").exists()


def test_exact_headline_is_measured_from_the_common_start(tmp_path):
    """A quad grid starts below T: the headline RMS is against the exact solution from T, so it is larger
    than the distance from the grid's own start (which a sampler that skips the early part would win)."""
    from pfdiff_bench.config import load_config, override
    from pfdiff_bench.evaluation.exact import evaluate_run
    from pfdiff_bench.sampling.engine import run_sampling

    cfg = load_config("toy")
    for k, v in (("sampling.nfe", 4), ("sampling.num_samples", 8), ("sampler.pfdiff", "none"),
                 ("sampler.grid", "quad")):
        override(cfg, k, v)
    run_sampling(cfg, tmp_path / "q", progress=False, log=lambda m: None)
    e = evaluate_run(tmp_path / "q")
    assert e["a_common"] < e["a_start"]
    assert e["rms_common_mean"] != e["rms_mean"]
    override(cfg, "sampler.grid", "uniform")
    run_sampling(cfg, tmp_path / "u", progress=False, log=lambda m: None)
    e = evaluate_run(tmp_path / "u")
    assert e["rms_common_mean"] == e["rms_mean"]  # the uniform grid starts at T


# --------------------------------------------------------------------------- (8, part) reference validation
def test_reference_statistics_are_validated(tmp_path):
    from pfdiff_bench.evaluation.refstats import read_stats_npz

    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 40))
    good = a @ a.T / 40
    mu = rng.standard_normal(2048)
    np.savez(tmp_path / "ok.npz", mu=mu, sigma=good, num_samples=np.int64(40))
    assert read_stats_npz(tmp_path / "ok.npz", allow_small=True).sigma.shape == (2048, 2048)
    asym = good.copy()
    asym[0, 1] += 1.0
    neg = good - 2 * np.eye(2048)
    for name, kw, needle in (("asym", dict(mu=mu, sigma=asym), "not symmetric"),
                             ("neg", dict(mu=mu, sigma=neg), "not positive semi-definite"),
                             ("nan", dict(mu=mu * np.nan, sigma=good), "NaN"),
                             ("shape", dict(mu=mu[:30], sigma=good[:30, :30]), "dimension 30"),
                             ("str", dict(mu=np.array(["x"] * 2048), sigma=good), "non-numeric"),
                             ("one", dict(mu=mu, sigma=good, num_samples=np.int64(1)), "record 1 images")):
        np.savez(tmp_path / f"{name}.npz", **kw)
        with pytest.raises(PFDiffError, match=needle):
            read_stats_npz(tmp_path / f"{name}.npz")


# --------------------------------------------------------------------------- (6) hash and load the same bytes
def test_inception_weights_swapped_after_hashing_are_refused(tmp_path, weights):
    import shutil

    from pfdiff_bench.evaluation.tools import load_state_dict, resolve_weights

    path = tmp_path / "w.pth"
    shutil.copy(weights, path)
    w = resolve_weights("torch-fidelity", path, trust_weights=True, log=lambda m: None)
    assert load_state_dict(w)  # the verified bytes load
    torch.save({"x": torch.zeros(1)}, path)  # swapped between the check and the load
    with pytest.raises(PFDiffError, match="changed after it was verified"):
        load_state_dict(w)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, path)
    w = resolve_weights("torch-fidelity", path, trust_weights=True, log=lambda m: None)
    with pytest.raises(PFDiffError, match="weights-only"):
        load_state_dict(w)
    assert not (tmp_path / "pwned").exists()  # never unpickled


# --------------------------------------------------------------------------- (3) + (4, names) YAML and names
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n" \
       "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"


def test_yaml_bombs_bad_bytes_and_bad_names_are_one_line_errors(tmp_path):
    import time

    from pfdiff_bench.config import MAX_YAML_BYTES, load_config

    cases = {
        "bomb.yaml": (BOMB.encode(), "aliases/anchors are not accepted"),
        "latin1.yaml": ("name: caf\xe9\n".encode("latin-1"), "not UTF-8"),
        "big.yaml": (b"#" * (MAX_YAML_BYTES + 1), "at most"),
        "escape.yaml": (b"name: ../..\n", "'name' must be"),
        "slash.yaml": (b"name: a/b\n", "'name' must be"),
        "desc.yaml": (b"description: [1, 2]\n", "'description' must be text"),
    }
    for fname, (data, needle) in cases.items():
        (tmp_path / fname).write_bytes(data)
        with pytest.raises(PFDiffError, match=needle):
            load_config(str(tmp_path / fname))
    t0 = time.time()
    one_line_error(run_cli("sample", "--config", str(tmp_path / "bomb.yaml"), "-n", "2", "--out", str(tmp_path / "o")),
                   "aliases")
    assert time.time() - t0 < 30 and not (tmp_path / "o").exists()
    # a table name becomes results/<name>: ../.. is refused; table files are parsed the same way
    from pfdiff_bench.reproduction.tables import load_table

    with pytest.raises(PFDiffError, match="'name' must be"):
        load_table(str(_toy_table(tmp_path, name="../..")))
    (tmp_path / "tbomb.yaml").write_text(BOMB)
    with pytest.raises(PFDiffError, match="aliases"):
        load_table(str(tmp_path / "tbomb.yaml"))
