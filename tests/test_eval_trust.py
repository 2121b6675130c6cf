"""Issue 10 items 8 and 9 (evaluation): the 2,048-image floor and its label, validated reference statistics,
one-line errors for bad npz files, atomic and never-silent writes of the evaluation room's files.

Random-weight Inception (the session fixture ``weights``), CPU, no network: one Inception pass over 30
images (FID and IS together) and one over 4; everything else is refused before any pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pfdiff_bench.cli import main
from pfdiff_bench.errors import PFDiffError
from pfdiff_bench.evaluation import refstats
from pfdiff_bench.evaluation.features import MIN_IMAGES


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _cli(capsys, *args):
    """Exit code, stdout and the stderr lines that are not notes (random weights print one note per load)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code or 0, out, [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note: ")]


def _refused(capsys, *args):
    code, _, err = _cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def _w(weights):
    return ["--inception-weights", weights, "--trust-weights", "--device", "cpu", "--offline"]


def _psd(rng, n=64):
    a = rng.standard_normal((2048, n))
    return a @ a.T / n


# ------------------------------------------------------------------------------------------- the floor
def test_floor_refuses_then_allow_small_computes_and_labels(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    samples, ref_src, ref = tmp_path / "s.npz", tmp_path / "r.npz", tmp_path / "ref_stats.npz"
    np.savez(samples, _images(30, seed=1))
    np.savez(ref_src, _images(2, seed=2))
    assert MIN_IMAGES == 2048

    # refused before any Inception pass or reference load (the reference does not even exist yet)
    for cmd in (["fid", samples, "--ref", ref], ["is", samples], ["fid", samples, "--ref", ref, "--is"]):
        err = _refused(capsys, *cmd, *_w(weights))
        assert "30 images" in err and "2,048" in err and "--allow-small" in err, err
    err = _refused(capsys, "ref", "compute", ref_src, "--out", ref, *_w(weights))
    assert "2 images" in err and "--allow-small" in err and not ref.exists()

    # ref compute --allow-small: written, with its image count, and said so
    code, out, err = _cli(capsys, "ref", "compute", ref_src, "--out", ref, "--allow-small", *_w(weights))
    assert code == 0, err
    assert "2 images" in out and "SMALL SAMPLE" in out
    with np.load(ref) as z:
        assert int(z["num_samples"]) == 2 and bool(z["small_sample"]) is True
    # ... and loading it is refused without --allow-small (API and CLI)
    with pytest.raises(PFDiffError, match=r"2 images.*--allow-small"):
        refstats.load_ref(str(ref))
    assert refstats.load_ref(str(ref), allow_small=True).num_samples == 2

    # FID and IS of 30 images with --allow-small: computed, and every result says small-sample
    code, out, err = _cli(capsys, "fid", samples, "--ref", ref, "--is", "--allow-small", "--json", *_w(weights))
    assert code == 0, err
    entries = {e["metric"]: e for e in map(json.loads, out.strip().splitlines())}
    assert set(entries) == {"fid", "is"}
    for e in entries.values():
        assert e["small_sample"] is True and e["min_images"] == 2048 and e["num_samples"] == 30
        assert np.isfinite(e["value"])
    assert entries["fid"]["label"] == "FID-30" and entries["fid"]["reference_num_samples"] == 2
    from pfdiff_bench.cli.evaluate import _report

    _report(entries, None, as_json=False)  # the plain CLI lines carry the label too
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("SMALL SAMPLE" in ln and "--allow-small" in ln for ln in lines), lines


def test_small_reference_of_30_images_is_refused_on_load(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((30, 2048))
    st = refstats.RefStats("r", f.mean(0), np.cov(f, rowvar=False), num_samples=30, producer="torch-fidelity")
    path = refstats.save_stats(st, tmp_path / "cifar10-train.npz")  # as `ref compute --allow-small` saves it
    for load in (lambda: refstats.read_stats_npz(path), lambda: refstats.load_ref(str(path))):
        with pytest.raises(PFDiffError) as e:
            load()
        msg = str(e.value)
        assert "30 images" in msg and "2,048" in msg and "--allow-small" in msg and "\n" not in msg
    # an in-memory reference is checked too, before any weights are looked for or images read
    from pfdiff_bench.evaluation import fid

    def no_images():
        raise AssertionError("images were read")
        yield

    with pytest.raises(PFDiffError, match="an FID reference on 30 images"):
        fid.evaluate_batches(no_images(), fid_ref=st, inception_weights=tmp_path / "missing.pth", download=False)
    assert fid.small_sample(50_000, st) is True and fid.small_sample(50_000, None) is False
    assert fid.small_sample(2047) is True and fid.small_sample(2048) is False


def test_reproduce_refuses_a_small_fid_table_before_sampling(tmp_path, capsys):
    import yaml

    root = Path(__file__).resolve().parents[1]
    table = tmp_path / "tiny.yaml"
    table.write_text(yaml.safe_dump({
        "name": "tiny", "title": "tiny (test)", "config": str(root / "tests/configs/tiny_ddpm.yaml"),
        "metric": "fid", "fid_tool": "torch-fidelity", "reference": str(tmp_path / "ref.npz"), "num_samples": 6,
        "nfe": [2], "rows": [{"name": "DDIM", "sampler": {"pfdiff": "none"}}], "paper": {}}))
    out = tmp_path / "out"
    err = _refused(capsys, "reproduce", table, "--out", out, "--allow-cpu")
    assert "6 images" in err and "cell DDIM at NFE 2" in err and "--allow-small" in err
    assert not out.exists()  # nothing sampled or written
    # the library entry point refuses the same way
    from pfdiff_bench.reproduction.cells import plan_cells
    from pfdiff_bench.reproduction.runner import run_table
    from pfdiff_bench.reproduction.tables import load_table

    spec = load_table(str(table))
    with pytest.raises(PFDiffError, match="--allow-small"):
        run_table(spec, plan_cells(spec, out), log=lambda m: None)
    assert not (out / "runs").exists()


def test_small_sample_cells_are_marked_in_the_table():
    from pfdiff_bench.reproduction.cells import Cell
    from pfdiff_bench.reproduction.tables import Row, TableSpec
    from pfdiff_bench.reproduction.writers import assemble, to_markdown

    spec = TableSpec(name="t", title="t", config="toy", metric="fid", nfe=[4, 6], rows=[Row("DDIM", {})],
                     num_samples=30, reference="ref.npz", fid_tool="torch-fidelity")
    base = {"protocol": "torch-fidelity", "fid_tool": "torch-fidelity", "fid_tool_version": "0.4",
            "weights_sha256": "ab" * 32, "weights_official": False, "resize": "TF1", "reference": "ref",
            "reference_sha256": "cd" * 32, "reference_producer": "torch-fidelity", "quantization": "truncate"}
    small = Cell(Row("DDIM", {}), 4, Path("a"), cfg={"sampling": {"num_samples": 30}}, value=12.5,
                 result=dict(base, num_samples=30, label="FID-30", small_sample=True))
    full = Cell(Row("DDIM", {}), 6, Path("b"), cfg={"sampling": {"num_samples": 30}}, value=3.25,
                result=dict(base, num_samples=50000, label="FID", small_sample=False))
    res = assemble(spec, [small, full])
    cells = res["rows"][0]["cells"]
    assert cells[4]["small_sample"] is True and "small_sample" not in cells[6]
    assert [p["small_sample"] for p in res["protocol"]["cells"]] == [True, False]
    md = to_markdown(res)
    assert "| DDIM | 12.50 (small n) | 3.25 |" in md
    assert md.count("SMALL SAMPLE") == 1


# ------------------------------------------------------------------------------- reference validation
def test_invalid_reference_statistics_give_one_line_errors(weights, tmp_path, capsys):
    rng = np.random.default_rng(0)
    good, mu = _psd(rng), rng.standard_normal(2048)
    asym = good.copy()
    asym[3, 5] += 1e-3 * np.abs(good).max()
    neg = good - 1e-3 * np.linalg.eigvalsh(good)[-1] * np.eye(2048)  # smallest eigenvalue -1e-3 x the largest
    inf = good.copy()
    inf[0, 0] = np.inf
    cases = {
        "asym": (dict(mu=mu, sigma=asym), "not symmetric"),
        "neg": (dict(mu=mu, sigma=neg), "not positive semi-definite"),
        "nan": (dict(mu=mu * np.nan, sigma=good), "NaN"),
        "inf": (dict(mu=mu, sigma=inf), "NaN or infinite"),
        "shape": (dict(mu=mu[:64], sigma=good[:64, :64]), "dimension 64, not 2048"),
        "mismatch": (dict(mu=mu, sigma=good[:64, :64]), "mismatched shapes"),
        "object": (dict(mu=np.array([1.0] * 2048, dtype=object), sigma=good), "non-numeric"),
        "strings": (dict(mu=np.array(["1.5"] * 2048), sigma=good), "non-numeric"),  # would convert silently
        "complex": (dict(mu=mu.astype(complex), sigma=good), "non-numeric"),
        "count": (dict(mu=mu, sigma=good, num_samples=np.array("5000")), "non-numeric"),
    }
    samples = tmp_path / "s.npz"
    np.savez(samples, _images(2))
    for name, (arrays, needle) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)  # object arrays are pickled by savez; we load with allow_pickle=False
        err = _refused(capsys, "fid", samples, "--ref", path, "--allow-small", *_w(weights))
        assert needle in err and str(path) in err, (name, err)
        assert "Traceback" not in err
    # within round-off: a rank-deficient covariance (eigenvalues ~ -1e-14 x the largest) with float32 mu
    # and an asymmetry of 1e-12 is a valid reference
    a = rng.standard_normal((2048, 40))
    low = a @ a.T / 40
    low[1, 2] += 1e-12 * np.abs(low).max()
    np.savez(tmp_path / "ok.npz", mu=mu.astype(np.float32), sigma=low, num_samples=np.int64(50_000))
    st = refstats.read_stats_npz(tmp_path / "ok.npz")
    assert np.linalg.eigvalsh(st.sigma)[0] < 0 and st.num_samples == 50_000 and st.mu.dtype == np.float64


def test_bad_npz_files_give_one_line_errors(weights, tmp_path, capsys):
    notzip = tmp_path / "notzip.npz"
    notzip.write_bytes(b"this is not a zip file\n" * 10)
    no_arr0 = tmp_path / "no_arr0.npz"
    np.savez(no_arr0, images=_images(2))
    npy = tmp_path / "bare.npz"  # a single .npy array under an .npz name
    with open(npy, "wb") as f:
        np.save(f, np.zeros(2048))
    floats = tmp_path / "floats.npz"
    np.savez(floats, np.zeros((2, 8, 8, 3), np.float32))
    for cmd in (["fid", "--ref", "imagenet64"], ["ref", "compute"]):
        for path, needles in ((notzip, ["not an .npz", "arr_0"]), (no_arr0, ["no array 'arr_0'", "images", "uint8 NHWC"]),
                              (npy, ["not an .npz", "arr_0"]), (floats, ["uint8 NHWC", "float32"])):
            args = [cmd[0], path, *cmd[1:]] if cmd[0] == "fid" else [*cmd, path, "--out", tmp_path / "o.npz"]
            err = _refused(capsys, *args, "--allow-small", *_w(weights))
            assert str(path) in err and all(n in err for n in needles), (cmd, path, err)
    # as reference statistics
    samples = tmp_path / "s.npz"
    np.savez(samples, _images(2))
    for path, needles in ((notzip, ["not an .npz", "mu (2048,)", "pool_3"]), (npy, ["single .npy array", "mu"]),
                          (no_arr0, ["lack mu and sigma", "images", "pool_3"])):
        err = _refused(capsys, "fid", samples, "--ref", path, "--allow-small", *_w(weights))
        assert str(path) in err and all(n in err for n in needles), (path, err)
    assert not (tmp_path / "o.npz").exists()


# ------------------------------------------------------------------------------------- writes
def _stats(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    return refstats.RefStats("r", rng.standard_normal(2048), np.eye(2048), num_samples=n, producer="torch-fidelity")


def test_reference_stats_are_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "stats.npz"
    refstats.save_stats(_stats(0), out)
    before = out.read_bytes()

    def dies_mid_write(f, **arrays):  # a crash (or full disk) half-way through the file
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", dies_mid_write)
    with pytest.raises(OSError, match="No space"):
        refstats.save_stats(_stats(1), out)
    monkeypatch.undo()
    assert out.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]  # and no temporary file is left
    # a symlink planted at the destination is replaced, never written through
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "linked.npz"
    link.symlink_to(victim)
    refstats.save_stats(_stats(2), link)
    assert victim.read_text() == "keep me" and not link.is_symlink()
    with np.load(link) as z:
        assert int(z["num_samples"]) == 3000 and bool(z["small_sample"]) is False


def test_pin_and_cache_write_failures_are_reported_not_silent(tmp_path, monkeypatch):
    monkeypatch.setenv("PFDIFF_BENCH_HOME", str(tmp_path / "home"))
    from pfdiff_bench.download import file_sha256

    # the SHA-256 pin of a downloaded reference (no published checksum): a failed write is a warning
    dest = refstats.ref_cache_path("lsun_bedroom")
    dest.parent.mkdir(parents=True)
    np.savez(dest, mu=np.zeros(2048), sigma=np.eye(2048))
    pin = dest.with_name(dest.name + ".sha256")
    logs = []
    real_write = refstats._atomic_write

    def fail(path, write):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(refstats, "_atomic_write", fail)
    assert refstats._fetch_ref(refstats.get_ref("lsun_bedroom"), False, logs.append) == dest
    assert any(m.startswith("warning: could not write the SHA-256 pin") and "Permission denied" in m
               for m in logs), logs
    assert not pin.exists()
    monkeypatch.setattr(refstats, "_atomic_write", real_write)
    logs.clear()
    refstats._fetch_ref(refstats.get_ref("lsun_bedroom"), False, logs.append)
    assert pin.read_text().split()[0] == file_sha256(dest) and any("pinned its SHA-256" in m for m in logs)
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name, pin.name]  # no temporary file left

    # the derived mu/sigma cache of an activation file
    acts = tmp_path / "acts.npz"
    np.savez(acts, pool_3=np.random.default_rng(0).standard_normal((40, 2048)).astype(np.float32))
    monkeypatch.setattr(refstats, "_atomic_write", fail)
    logs.clear()
    st = refstats.activation_stats(acts, log=logs.append, allow_small=True)
    assert st.derived_path is None and st.num_samples == 40
    assert any(m.startswith("warning:") and "could not cache" in m for m in logs), logs
    with pytest.raises(PFDiffError, match="40 images.*--allow-small"):
        refstats.activation_stats(acts, log=logs.append)
