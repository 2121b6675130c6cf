"""`pfdiff-bench tune` (issue 19): pilot seeds disjoint from evaluation seeds, the network reference path checked
against the analytic model's exact solution, the auto row of the toy table, end to end on a random network."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pfdiff_bench.config import load_config
from pfdiff_bench.seeding import EVAL_NAMESPACE, PILOT_NAMESPACE, draw_inputs, sample_seed, seed_string

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def test_pilot_seeds_never_overlap_an_evaluation_seed_range():
    # structurally: an evaluation string is "pfdiff-bench:<int>:<int>"; no pilot string has that form
    eval_form = re.compile(r"pfdiff-bench:-?\d+:-?\d+")
    for seed in (0, 1, 7):
        for i in (0, 1, 49999, 50000, 10 ** 9):
            assert eval_form.fullmatch(seed_string(seed, i, EVAL_NAMESPACE))
            assert not eval_form.fullmatch(seed_string(seed, i, PILOT_NAMESPACE))
    # and on the generator seeds themselves: the pilot of seed 0 vs evaluation seeds 0-2 over three
    # `reproduce --seeds` ranges of 10k samples (offset r * num_samples)
    pilot = {sample_seed(0, i, PILOT_NAMESPACE) for i in range(1024)}
    evals = {sample_seed(s, i) for s in range(3) for i in range(30000)}
    assert len(pilot) == 1024 and not pilot & evals
    # the pilot x_T tune draws are not the evaluation x_T
    xp, _, _ = draw_inputs(0, range(4), (3, 8, 8), None, namespace=PILOT_NAMESPACE)
    xe, _, _ = draw_inputs(0, range(4), (3, 8, 8), None)
    assert not torch.allclose(xp, xe)


def test_network_reference_path_matches_the_exact_solution_on_the_analytic_model():
    # The DPM-Solver reference (what networks use) run on the analytic model must give the same distances as
    # the exact solution: this checks its interval, time mapping and final denoising step independently.
    from pfdiff_bench.reproduction.tune import tune

    cfg = load_config("toy")
    exact = tune(cfg, [4, 10], pilot=12)
    dpm = tune(cfg, [4, 10], pilot=12, reference="dpm-solver-3:40")
    assert dpm["reference_self_convergence_max"] < 1e-3
    assert exact["cost_nfe"] == 12 * sum(sum(e["nfe_counted"].values()) for e in exact["nfe"].values())
    for n in (4, 10):
        a, b = exact["nfe"][n]["distances"], dpm["nfe"][n]["distances"]
        assert a.keys() == b.keys() and len(a) == 7
        for k in a:  # distances of 0.02-0.9; the two references differ by the last step's O(sigma_0^2) only
            assert abs(a[k] - b[k]) < 2e-3, (n, k, a[k], b[k])
        assert exact["picks"][n] == dpm["picks"][n]


def test_auto_pick_within_10_percent_of_best_on_the_toy_at_nfe_4_to_20(tmp_path, monkeypatch):
    from pfdiff_bench.reproduction import tune as tune_mod
    from pfdiff_bench.reproduction.cells import plan_cells
    from pfdiff_bench.reproduction.exact_table import fill_exact_cells
    from pfdiff_bench.reproduction.tables import load_table
    from pfdiff_bench.reproduction.writers import AUTO_ROW, assemble, to_markdown

    spec = load_table("toy")
    nfes = [4, 6, 8, 10, 12, 15, 20]
    cells = plan_cells(spec, tmp_path, num_samples=128, nfes=nfes)
    fill_exact_cells(cells)
    auto = tune_mod.auto_picks(spec, cells, tmp_path, pilot=128)
    res = assemble(spec, cells, auto=auto)
    rows = {r["name"]: r for r in res["rows"]}
    auto_row, best = rows[AUTO_ROW], rows["DDIM + PFDiff (best k,h)"]
    for n in nfes:
        a, b = auto_row["cells"][n], best["cells"][n]
        group = [r["cells"][n]["ours"] for r in res["rows"] if "PFDiff-" in r["name"] and r["cells"][n]["status"] == "ok"]
        assert b["ours"] == min(group)
        assert a["vs_best"] == pytest.approx(a["ours"] / b["ours"] - 1)
        assert a["ours"] <= 1.10 * b["ours"], (n, a, b)
    md = to_markdown(res)
    assert "within 10% of the best variant at every NFE" in md and "disjoint pilot batch" in md
    # cached with its inputs: the same inputs reuse the file, another pilot size recomputes
    monkeypatch.setattr(tune_mod, "tune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert tune_mod.auto_picks(spec, cells, tmp_path, pilot=128)["picks"] == auto["picks"]
    with pytest.raises(AssertionError, match="recomputed"):
        tune_mod.auto_picks(spec, cells, tmp_path, pilot=64)


def test_tune_cli_random_network_end_to_end_prints_self_convergence(tmp_path):
    cfg = ROOT / "tests/configs/tiny_ddpm.yaml"
    r = subprocess.run([PY, "-m", "pfdiff_bench.cli", "tune", "--config", str(cfg), "--nfe", "4,6", "--pilot", "3",
                        "--reference", "dpm-solver-3:6", "--out", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert re.search(r"self-convergence \(mean RMS between 6 and 3 steps\) \d", r.stdout)
    assert "self-convergence (largest over intervals)" in r.stdout
    choice = json.loads((tmp_path / "tune_choice.json").read_text())
    assert set(choice["picks"]) == {"4", "6"} and choice["seed_namespace"] == PILOT_NAMESPACE
    for e in choice["nfe"].values():
        assert e["pick"] == min((k for k in e["distances"] if k != "baseline"), key=e["distances"].get)
    # pilot cost: samplers' NFE plus both reference solves (3*6+1 and 3*3+1 evaluations) per distinct interval
    sampler_cost = 3 * sum(sum(e["nfe_counted"].values()) for e in choice["nfe"].values())
    assert (choice["cost_nfe"] - sampler_cost) % (3 * (19 + 10)) == 0 and choice["cost_nfe"] > sampler_cost


def test_tune_bad_reference_is_one_line_error():
    r = subprocess.run([PY, "-m", "pfdiff_bench.cli", "tune", "--config", "toy", "--reference", "rk45"],
                       capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.startswith("error: unknown --reference 'rk45'") and "Traceback" not in r.stderr
