"""The demo's figures and `plot --out` (issue 13 points 9 and 10): the figure objects, not pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

MAGIC = {".svg": (b"<?xml", b"<svg"), ".pdf": (b"%PDF",), ".png": (b"\x89PNG",)}


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The console entry point in this process (exit status, stdout, stderr)."""
    from pfdiff_bench.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture(scope="module")
def toy_result(tmp_path_factory):
    """A small toy table (both DPM-Solver++(2M) rows, DDIM, two PFDiff variants and their best-of row)
    with the first samples and their exact solutions kept, as `demo` computes it."""
    from pfdiff_bench.reproduction.cells import plan_cells
    from pfdiff_bench.reproduction.exact_table import fill_exact_cells
    from pfdiff_bench.reproduction.tables import load_table
    from pfdiff_bench.reproduction.writers import assemble

    spec = load_table("toy")
    rows = ["DDIM", "DPM-Solver++(2M) (logSNR grid)", "DPM-Solver++(2M) (time_uniform grid)",
            "DDIM + PFDiff-2_1", "DDIM + PFDiff-3_1"]
    cells = plan_cells(spec, tmp_path_factory.mktemp("toy"), num_samples=24, nfes=[4, 6], rows=rows)
    exact = {}
    kept = fill_exact_cells(cells, keep=12, exact_out=exact)
    return spec, cells, assemble(spec, cells), kept, exact


# ------------------------------------------------------------------ point 10: the toy table is fair
def test_toy_table_runs_dpm_solver_pp_2m_on_both_grids_each_labelled(toy_result):
    spec, cells, res, _, _ = toy_result
    dpm2m = [r for r in spec.rows if r.sampler.get("name") == "dpm-solver++" and r.sampler.get("order") == 2]
    assert {r.sampler["grid"]: r.name for r in dpm2m} == {"logSNR": "DPM-Solver++(2M) (logSNR grid)",
                                                         "time_uniform": "DPM-Solver++(2M) (time_uniform grid)"}
    for c in cells:  # the grid in the label is the grid the cell is planned on
        if c.row in dpm2m:
            assert c.setup_plan.spec.grid == c.row.sampler["grid"] and c.setup_plan.nfe == c.nfe
    vals = {r["name"]: r["cells"][4]["ours"] for r in res["rows"]}
    assert vals["DPM-Solver++(2M) (logSNR grid)"] != vals["DPM-Solver++(2M) (time_uniform grid)"]


def test_toy_table_md_has_no_paper_column_but_paper_tables_keep_it(toy_result):
    from pfdiff_bench.reproduction.writers import to_latex, to_markdown

    _, _, res, _, _ = toy_result
    md = to_markdown(res)
    header = next(line for line in md.splitlines() if line.startswith("Cells:"))
    assert "paper" not in header and header.startswith("Cells: our value")
    assert "ours (paper)" not in to_latex(res)
    with_paper = json.loads(json.dumps(res, default=str))
    with_paper["nfe"] = [int(n) for n in with_paper["nfe"]]
    for row in with_paper["rows"]:
        row["cells"] = {int(n): d for n, d in row["cells"].items()}
    d = with_paper["rows"][0]["cells"][4]
    d["paper"], d["diff"] = 0.5, d["ours"] - 0.5
    assert "Cells: ours / paper (difference)" in to_markdown(with_paper)


# ------------------------------------------------------------------ point 9: error_vs_nfe
def test_error_vs_nfe_has_standard_error_bars_legend_outside_and_best_of_behind(toy_result):
    from matplotlib.container import ErrorbarContainer

    from pfdiff_bench.reproduction.plots import metric_vs_nfe_figure

    _, _, res, _, _ = toy_result
    fig = metric_vs_nfe_figure(res)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    singles = [r for r in res["rows"] if not r.get("best_of") and not r.get("auto")]
    assert len(bars) == len(singles)
    ddim = next(c for c in bars if c.get_label() == "DDIM")
    per = np.array(res["rows"][0]["cells"][4]["per_sample"])
    se = per.std(ddof=1) / np.sqrt(per.size)
    segs = ddim.lines[2][0].get_segments()  # the vertical bar at NFE 4: mean -/+ one standard error
    (x0, y0), (_, y1) = segs[0]
    assert x0 == 4 and y0 == pytest.approx(per.mean() - se) and y1 == pytest.approx(per.mean() + se)

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, frame = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= frame.x1  # right of the axes: covers no data
    assert [t.get_text() for t in ax.get_legend().get_texts()][0] == "DDIM"  # table order

    best = next(line for line in ax.lines if line.get_label() == "DDIM + PFDiff (best k,h)")
    data_lines = [c.lines[0] for c in bars]
    assert best.get_zorder() < min(line.get_zorder() for line in data_lines)  # drawn behind
    assert best.get_linewidth() > 3 * max(line.get_linewidth() for line in data_lines) and best.get_alpha() < 0.5
    assert list(ax.get_xticks()) == [4, 6]
    lo, hi = ax.get_ylim()
    shown = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert any(abs(np.log10(t) - round(np.log10(t))) > 0.1 for t in shown)  # 2 and 5 x 10^k are labelled too
    assert all(t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi)


# ------------------------------------------------------------------ point 9: samples_grid
def test_samples_grid_projects_samples_against_the_exact_distribution(toy_result):
    import torch

    from pfdiff_bench.reproduction.plots import EXACT_ROW, projection_grid_figure
    from pfdiff_bench.sampling.setup import analytic_mixture

    spec, cells, _, kept, exact = toy_result
    gmm = analytic_mixture(cells[0].cfg["model"])
    rows = ["DDIM", "DDIM + PFDiff-2_1"]
    fig = projection_grid_figure(kept, exact, gmm, rows=rows)
    axes = np.array(fig.axes).reshape(3, 2)
    assert EXACT_ROW in axes[0][0].get_ylabel() and "PFDiff-2_1" in axes[2][0].get_ylabel()
    # the segment of each sample to its exact solution has the length of (sample - exact) projected on the
    # two leading eigenvectors of the exact covariance (computed here with numpy from the means and std)
    mu = gmm.means.reshape(gmm.num_classes, -1).numpy()
    w = gmm.weights.numpy()
    m = w @ mu
    cov = ((mu - m).T * w) @ (mu - m) + np.eye(mu.shape[1]) * float(w @ gmm.std.numpy() ** 2)
    vecs = np.linalg.eigh(cov)[1][:, -2:]
    s, e = kept[("DDIM", 6)].reshape(12, -1).double().numpy(), exact[("DDIM", 6)].reshape(12, -1).numpy()
    want = np.linalg.norm((s - e) @ vecs, axis=1)
    segs = [line.get_xydata() for line in axes[1][1].lines]
    got = np.array([np.linalg.norm(p[1] - p[0]) for p in segs])
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    rms = float(torch.from_numpy(s - e).pow(2).mean(1).sqrt().mean())
    assert f"{rms:.4f}" in axes[1][1].get_title()
    # grey background: samples of the exact data distribution, in every panel
    assert all(len(ax.collections[0].get_offsets()) == 1500 for ax in fig.axes)


# ------------------------------------------------------------------ point 9: trajectories
def test_trajectories_mark_start_and_end_label_axes_explain_discs_and_share_ranges():
    from pfdiff_bench.config import load_config
    from pfdiff_bench.reproduction.plots import trajectories_2d_figure

    fig = trajectories_2d_figure(load_config("toy2d"), nfe=4, variants=((2, 1),), num_paths=3)
    axes = fig.axes
    assert len(axes) == 2
    assert {ax.get_ylim() for ax in axes} == {axes[0].get_ylim()}
    assert {ax.get_xlim() for ax in axes} == {axes[0].get_xlim()}
    assert all(ax.get_xlabel() for ax in axes) and axes[0].get_ylabel()
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("mixture component" in t for t in texts)
    assert any(t.startswith("start x_T") for t in texts) and "exact end point" in texts
    markers = {line.get_marker() for line in axes[0].lines}
    assert {"s", "*"} <= markers  # start and exact end drawn


# ------------------------------------------------------------------ point 9: plot --out
def test_plot_out_suffix_is_the_format_and_a_bad_suffix_is_one_line(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "plot", "trajectories", "--pfdiff", "2,1", "--out", tmp_path / "t.svg")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.svg"]
    assert (tmp_path / "t.svg").read_bytes().lstrip().startswith(MAGIC[".svg"])

    # plot table: the metric figure at --out and nothing else (no images here); a bad suffix stops early
    res = {"table": "t", "title": "t", "metric": "fid", "nfe": [4, 6], "metric_label": "FID-10",
           "num_samples": 10, "rows": [{"name": "DDIM", "cells": {
               "4": {"status": "ok", "ours": 30.0, "paper": 31.0}, "6": {"status": "ok", "ours": 20.0, "paper": 21.0}}}]}
    (tmp_path / "tab").mkdir()
    (tmp_path / "tab" / "results.json").write_text(json.dumps(res))
    rc, _, err = run_cli(capsys, "plot", "table", tmp_path / "tab", "--out", tmp_path / "fig" / "m.pdf")
    assert rc == 0, err
    assert [p.name for p in (tmp_path / "fig").iterdir()] == ["m.pdf"]
    assert (tmp_path / "fig" / "m.pdf").read_bytes()[:4] == b"%PDF"

    for cmd in (("table", tmp_path / "tab"), ("trajectories",)):
        rc, out, err = run_cli(capsys, "plot", *cmd, "--out", tmp_path / "m.jpg")
        assert rc == 2 and not out
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and ".jpg" in lines[0]
        assert all(s in lines[0] for s in (".png", ".pdf", ".svg"))
    assert not (tmp_path / "m.jpg").exists()


def test_save_figure_writes_exactly_the_requested_files(tmp_path):
    import matplotlib.pyplot as plt

    from pfdiff_bench.errors import ConfigError
    from pfdiff_bench.reproduction.plots import save_figure

    for suffix, magic in MAGIC.items():
        fig = plt.figure()
        assert save_figure(fig, tmp_path / f"a{suffix}") == [tmp_path / f"a{suffix}"]
        assert (tmp_path / f"a{suffix}").read_bytes().lstrip().startswith(magic)
    assert save_figure(plt.figure(), tmp_path / "b", default=(".png", ".pdf")) == [tmp_path / "b.png",
                                                                                     tmp_path / "b.pdf"]
    with pytest.raises(ConfigError, match=r"\.tiff.*\.png, \.pdf, \.svg"):
        save_figure(plt.figure(), tmp_path / "c.tiff")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "a.png", "a.svg", "b.pdf", "b.png"]
