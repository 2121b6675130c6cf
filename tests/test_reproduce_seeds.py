"""reproduce --seeds K (disjoint seed ranges, mean ± std), --metrics fid,is,prc,kid, full-key values in --status,
and the one progress bar over a whole table (issues 12 part 4, 18 part 4)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pfdiff_bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
N = 16
TOY = ("reproduce", "toy", "-n", str(N), "--nfe", "4", "--rows", "DDIM,DDIM + PFDiff-2_1", "--no-auto-kh",
       "--no-progress")


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _results(out: Path) -> dict:
    (path,) = sorted(out.glob("results*.json"))
    return json.loads(path.read_text())


def _cells(res: dict) -> dict:
    return {(row["name"], int(n)): d for row in res["rows"] for n, d in row["cells"].items()}


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """A plain run (K = 1) and, in the same folder afterwards, --seeds 3 (range 0 must be reused)."""
    base = tmp_path_factory.mktemp("seeds")
    plain, seeded = base / "plain", base / "seeded"
    outs = {}
    for out, extra in ((plain, ()), (seeded, ()), (seeded, ("--seeds", "3"))):
        try:
            main([*TOY, "--out", str(out), *extra])
        except SystemExit as exc:
            assert exc.code in (0, None)
        outs[(out, extra)] = (_results(out), {p.name: p.read_text() for p in out.glob("table*.*")})
    return plain, seeded, outs


def test_seeds_three_gives_mean_and_std_over_disjoint_ranges(toy_runs):
    from pfdiff_bench.seeding import draw_inputs

    plain, seeded, outs = toy_runs
    res1, files1 = outs[(plain, ())]
    res3, files3 = outs[(seeded, ("--seeds", "3"))]
    # K = 1 output is unchanged: same columns, no spread fields, identical to a second plain run's files
    assert files1 == outs[(seeded, ())][1]
    assert next(iter(files1[n] for n in files1 if n.endswith(".csv"))).splitlines()[0] == \
        "method,nfe,status,ours,paper,diff,winner"
    assert all("std" not in d and "ranges" not in d for d in _cells(res1).values()) and "seeds" not in res1
    assert res3["seeds"] == 3 and res3["seed_ranges"] == [[0, N - 1], [N, 2 * N - 1], [2 * N, 3 * N - 1]]
    c1, c3 = _cells(res1), _cells(res3)
    for key in (("DDIM", 4), ("DDIM + PFDiff-2_1 (default 2,1)", 4)):
        d = c3[key]
        vals = [r["value"] for r in d["ranges"]]
        assert [r["seeds"] for r in d["ranges"]] == res3["seed_ranges"]
        assert vals[0] == c1[key]["ours"]  # range 0 is exactly the plain run
        assert len(set(vals)) == 3  # three different draws
        assert d["ours"] == pytest.approx(float(np.mean(vals)), rel=1e-12)
        assert d["std"] == pytest.approx(float(np.std(vals, ddof=1)), rel=1e-12)
        # every range's own run: manifests record disjoint seed ranges, and its x_T are those seed indices' draws
        seen = set()
        for r in d["ranges"]:
            run = Path(r["run_dir"])
            man = json.loads((run / "manifest.json").read_text())
            assert man["seed_range"] == r["seeds"] and man["seed_offset"] == r["seeds"][0]
            idx = set(range(r["seeds"][0], r["seeds"][1] + 1))
            assert not (idx & seen)
            seen |= idx
            x_T = torch.cat([torch.load(p, weights_only=True)["x_T"] for p in sorted(run.glob("shard-*.pt"))])
            ref, _, _ = draw_inputs(man["seed"], range(r["seeds"][0], r["seeds"][1] + 1), man["sample_shape"], None)
            assert torch.equal(x_T, ref)
            entries = json.loads((run / "results.json").read_text())
            assert entries[-1]["rms_mean"] == pytest.approx(r["value"])
        assert len(seen) == 3 * N
    # range 0's folder is the plain run's (its fingerprint unchanged, so it was reused, not resampled)
    assert json.loads((seeded / "runs/ddim-nfe4/manifest.json").read_text())["runs"] == 1
    md = next(files3[n] for n in files3 if n.endswith(".md"))
    assert "sample standard deviation (ddof=1) over 3 disjoint seed ranges" in md
    assert f"{c3[('DDIM', 4)]['ours']:.4f} ± {c3[('DDIM', 4)]['std']:.4f}" in md
    csv = next(files3[n] for n in files3 if n.endswith(".csv")).splitlines()
    assert csv[0] == "method,nfe,status,ours,paper,diff,winner,std"
    # paired statistics over all 3 x N samples: the same x_T per range for both methods
    p = c3[("DDIM + PFDiff-2_1 (default 2,1)", 4)]["paired"]
    a, b = c3[("DDIM + PFDiff-2_1 (default 2,1)", 4)]["per_sample"], c3[("DDIM", 4)]["per_sample"]
    assert p["n"] == 3 * N and len(a) == 3 * N
    diff = np.subtract(a, b)
    assert p["diff_mean"] == pytest.approx(diff.mean()) and p["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(3 * N))


def test_seed_offset_zero_keeps_the_fingerprint():
    from pfdiff_bench.sampling.rundir import fingerprint, fingerprint_payload

    cfg = {"sampling": {"seed": 0, "nfe": 4}, "model": {"type": "analytic"}}
    old = fingerprint(fingerprint_payload(cfg, {"p": 1}, 0, 10, 5, "cpu"))
    assert fingerprint(fingerprint_payload({**cfg, "sampling": {**cfg["sampling"], "seed_offset": 0}},
                                           {"p": 1}, 0, 10, 5, "cpu")) == old
    assert fingerprint(fingerprint_payload({**cfg, "sampling": {**cfg["sampling"], "seed_offset": 10}},
                                           {"p": 1}, 0, 10, 5, "cpu")) != old


@pytest.mark.parametrize("args, words", [
    (("reproduce", "table2", "--metrics", "fid,bogus", "--dry-run"), ["bogus", "fid, is, prc, kid"]),
    (("reproduce", "table2", "--metrics", "is,kid", "--dry-run"), ["must include fid"]),
    (("reproduce", "table3", "--metrics", "fid,kid", "--dry-run"), ["pytorch-fid", "accepted with pytorch-fid: fid"]),
    (("reproduce", "table2", "--fid-tool", "pytorch-fid", "--metrics", "fid,is", "--dry-run"), ["is", "pytorch-fid"]),
    (("reproduce", "toy", "--metrics", "fid"), ["FID tables", "exact"]),
    (("reproduce", "toy", "--seeds", "0", "--dry-run"), ["--seeds must be at least 1"]),
])
def test_bad_metrics_and_seeds_are_one_line_errors(capsys, args, words):
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0]


def test_status_shows_only_values_of_the_full_key(tmp_path, capsys):
    """A result recorded for the run's fingerprint but another key (here another sample count) is never shown."""
    out = tmp_path / "t"
    args = ("reproduce", "toy", "-n", "8", "--nfe", "4", "--rows", "DDIM", "--no-auto-kh", "--no-progress",
            "--out", str(out))
    assert cli(capsys, *args)[0] == 0
    res = out / "runs/ddim-nfe4/results.json"
    entries = json.loads(res.read_text())
    true = entries[-1]["rms_mean"]
    res.write_text(json.dumps([*entries, {**entries[-1], "rms_mean": 123.0, "num_samples": 999}]))
    code, text, _ = cli(capsys, *args, "--status")
    assert code == 0
    line = next(ln for ln in text.splitlines() if "NFE   4" in ln)
    assert f"{true:.6g}" in line and "123" not in line
    res.write_text(json.dumps([{**entries[-1], "rms_mean": 123.0, "num_samples": 999}]))
    line = next(ln for ln in cli(capsys, *args, "--status")[1].splitlines() if "NFE   4" in ln)
    assert "not evaluated" in line and "123" not in line


def test_one_progress_bar_over_the_table(tmp_path, capsys):
    from pfdiff_bench.reproduction.cells import plan_cells
    from pfdiff_bench.reproduction.runner import run_table
    from pfdiff_bench.reproduction.tables import load_table

    spec = load_table("toy")
    cells = plan_cells(spec, tmp_path, num_samples=6, nfes=[4], rows=["DDIM", "DDIM + PFDiff-2_1"], seeds=2)
    logged = []
    capsys.readouterr()
    run_table(spec, cells, progress=True, log=logged.append)
    err = capsys.readouterr().err
    assert "toy (4 runs)" in err and "24/24" in err and "img/s" in err  # cells x samples, with a rate
    bars = [seg.strip() for seg in err.replace("\r", "\n").splitlines() if "img/s" in seg or "%|" in seg]
    assert bars and all(b.startswith("toy (4 runs)") for b in bars), bars  # no per-run bar of the engine
    assert sum("sampling " in m for m in logged) == 4  # the per-cell lines stay in the log
    assert cells[0].std is not None and len(cells[0].range_values) == 2


# ------------------------------------------------------------------------ FID-family metrics
def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = x * torch.rand(n, 1, 1, 1, generator=g) + torch.rand(n, 1, 1, 1, generator=g) * 0.5
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


from test_fid import _CHW  # noqa: E402  (the same uint8 NCHW dataset wrapper)


@pytest.mark.slow
def test_kid_and_precision_recall_equal_torch_fidelity(tmp_path, weights):
    """Our one-pass KID / P&R against an ADM-style reference batch (arr_0 images) = torch-fidelity's own
    calculate_metrics on the same images (P&R on the Inception pool features, not torch-fidelity's VGG default)."""
    import torch_fidelity

    from pfdiff_bench.evaluation import features, fid

    a, b = _images(14, 32, 1), _images(12, 32, 2) // 3
    mu, sigma, _, _ = features.feature_statistics([b], inception_weights=weights, trust_weights=True)
    ref = tmp_path / "VIRTUAL_test.npz"
    np.savez(ref, mu=mu, sigma=sigma, arr_0=b.numpy())
    res = fid.evaluate_batches(features.iter_array_batches(a, 5), fid_ref=str(ref), kid=True, prc=True,
                               inception_weights=weights, trust_weights=True, device="cpu", download=False,
                               allow_small=True)
    theirs = torch_fidelity.calculate_metrics(
        input1=_CHW(a), input2=_CHW(b), kid=True, prc=True, kid_subset_size=12, cuda=False, cache=False,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",  # P&R on FID's features, as ADM's
        verbose=False, feature_extractor_weights_path=str(weights), batch_size=64)
    assert res["kid"]["kid_subset_size_used"] == 12 and res["kid"]["kid_subsets"] == 100
    assert res["kid"]["value"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    assert res["kid"]["std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4, abs=1e-7)
    assert res["prc"]["precision"] == pytest.approx(theirs["precision"])
    assert res["prc"]["recall"] == pytest.approx(theirs["recall"])
    assert abs(res["kid"]["value"]) > 1e-6  # a real, non-degenerate value
    assert 0 < res["prc"]["precision"] < 1  # not a degenerate all-or-nothing case


@pytest.mark.slow  # 30-120 s on 2 shared CPU cores: Inception at 299x299 on CPU
def test_tiny_fid_table_with_seeds_and_metrics(tmp_path, weights, capsys):
    """A random-weight DDPM table: --seeds 2 --metrics fid,kid gives mean ± std of both, each value cached
    under its own key (a rerun reuses them all; FID alone reuses FID). 6-image cells: --allow-small."""
    from pfdiff_bench.evaluation import features

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    mu, sigma, _, _ = features.feature_statistics([torch.from_numpy(imgs)], inception_weights=weights,
                                                  trust_weights=True)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=mu, sigma=sigma, arr_0=imgs)  # an ADM-style reference batch: KID needs its images
    spec = {"name": "tiny", "title": "tiny random DDPM (test)", "config": str(ROOT / "tests/configs/tiny_ddpm.yaml"),
            "metric": "fid", "fid_tool": "torch-fidelity", "reference": str(ref), "num_samples": 6, "nfe": [2],
            "rows": [{"name": "DDIM", "sampler": {"pfdiff": "none"}}], "paper": {}}
    table = tmp_path / "tiny.yaml"
    table.write_text(yaml.safe_dump(spec))
    out = tmp_path / "o"
    args = ("reproduce", str(table), "--inception-weights", str(weights), "--trust-weights", "--allow-cpu",
            "--no-progress", "--out", str(out), "--seeds", "2", "--allow-small")
    code, text, err = cli(capsys, *args, "--metrics", "fid,kid")
    assert code == 0, err
    d = _cells(_results(out))[("DDIM", 2)]
    fids = [r["value"] for r in d["ranges"]]
    kids = [r["extra"]["kid"] for r in d["ranges"]]
    assert d["ours"] == pytest.approx(statistics.fmean(fids)) and d["std"] == pytest.approx(statistics.stdev(fids))
    assert d["extra"]["kid"] == pytest.approx(statistics.fmean(kids))
    assert d["extra_std"]["kid"] == pytest.approx(statistics.stdev(kids))
    assert (out / "table.csv").read_text().splitlines()[0].endswith(",std,kid,kid_std")
    assert "KID (ours, mean ± std over seed ranges)" in (out / "table.md").read_text()
    for r in d["ranges"]:
        metrics = [e["metric"] for e in json.loads((Path(r["run_dir"]) / "results.json").read_text())]
        assert metrics == ["fid", "kid"]
    code, text, err = cli(capsys, *args, "--metrics", "fid,kid")
    assert code == 0 and "evaluated 0, reused 2" in text
    code, text, err = cli(capsys, *args)
    assert code == 0 and "evaluated 0, reused 2" in text and "kid" not in (out / "table.csv").read_text()
    # --status shows the full-key values only: with the weights it verifies them, without it cannot
    code, text, err = cli(capsys, *args, "--metrics", "fid,kid", "--status")
    assert code == 0 and text.count("evaluated (FID-6 torch-fidelity vs ref, 6 samples; fid, kid)") == 2, text
    code, text, err = cli(capsys, "reproduce", str(table), "--out", str(out), "--seeds", "2", "--status",
                          "--inception-weights", str(tmp_path / "missing.pth"))
    assert code == 0 and text.count("recorded value not verifiable here") == 2, text
    # a mu/sigma-only reference has no features for KID: one line, before anything is sampled
    np.savez(ref, mu=mu, sigma=sigma)
    code, text, err = cli(capsys, *args, "--metrics", "fid,kid", "--out", str(tmp_path / "o2"))
    assert code == 2 and "holds only mu/sigma" in err and not (tmp_path / "o2" / "runs").exists()
