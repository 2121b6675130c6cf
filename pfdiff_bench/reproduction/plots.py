"""Figures: metric against NFE, samples across methods and NFEs, 2-D ODE trajectories.

Every figure is built by a ``*_figure`` function that returns the matplotlib Figure (tests inspect it)
and saved by ``save_figure``: an output path with a suffix in ``FORMATS`` writes that one file, a path
without a suffix writes the figure's default formats (PNG, plus PDF for line plots). matplotlib's Agg
backend is used, so it runs headless.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pfdiff_bench.errors import ConfigError, PFDiffError  # noqa: E402

FORMATS = (".png", ".pdf", ".svg")  # what `--out` may end in
EXACT_ROW = "exact ODE solution"     # the reference row of the toy's sample projections
PROJECTED = 96                       # samples per cell in the toy's sample projections
PROJECTED_ROWS = ("DDIM", "DPM-Solver++(2M) (logSNR grid)", "DPM-Solver++(2M) (time_uniform grid)",
                  "DDIM + PFDiff-2_1", "DDIM + PFDiff-3_1")  # their rows (those the table has)


def check_out_suffix(out) -> None:
    """Refuse an output file whose suffix is not a figure format we write (before any work is done)."""
    suffix = Path(out).suffix.lower()
    if suffix and suffix not in FORMATS:
        raise ConfigError(f"unknown figure format {Path(out).suffix!r} in {out}: use one of "
                          f"{', '.join(FORMATS)} (or no suffix for the default PNG + PDF)")


def save_figure(fig, out, default: Sequence[str] = (".png",)) -> list[Path]:
    """Write ``fig`` to ``out`` (only that file when it has a suffix, else ``out`` + each default suffix)."""
    out = Path(out)
    check_out_suffix(out)
    targets = [out] if out.suffix else [out.with_name(out.name + s) for s in default]
    out.parent.mkdir(parents=True, exist_ok=True)
    for t in targets:
        # bbox "tight" keeps legends and captions placed outside the axes inside the file
        fig.savefig(t, dpi=130, bbox_inches="tight", format=t.suffix[1:].lower())
    plt.close(fig)
    return targets


# ------------------------------------------------------------------------ metric against NFE
_PF_STYLE = {"1_1": ("C1", "v"), "2_1": ("C3", "o"), "2_2": ("C5", "D"), "3_1": ("C4", "s"), "3_2": ("C6", "P"),
             "3_3": ("C8", "X")}
_EXTRA_COLOURS = ("#2ca02c", "#8fd18a", "#17becf", "#7f7f7f", "#00582a", "#bcbd22")


def _row_style(name: str, index: int, extra_index: int) -> dict:
    """Colour / line / marker per kind of row, so the families read apart: DDIM black, PFDiff warm colours
    solid with one marker per (k, h), DPM-Solver rows blue dashed (one dash pattern per grid), the extra
    baselines (not in the paper) thin, dotted, green-grey."""
    if name == "DDIM":
        return {"color": "black", "ls": "-", "marker": "o", "lw": 1.8}
    if "PFDiff-" in name:
        colour, marker = _PF_STYLE.get(name.split("PFDiff-")[-1][:3], (f"C{index % 10}", "o"))
        return {"color": colour, "ls": "-", "marker": marker, "lw": 1.5}
    if "(extra" in name:
        return {"color": _EXTRA_COLOURS[extra_index % len(_EXTRA_COLOURS)], "ls": ":", "marker": ".", "lw": 1.2}
    return {"color": "C0" if "time_uniform" not in name else "#6baed6", "ls": "--" if "time_uniform" not in name
            else "-.", "marker": "^", "lw": 1.6}


def _mean_se(d: dict) -> Optional[float]:
    """Standard error of a cell's mean: from its per-sample values (exact tables) or a stored ``se``."""
    per = d.get("per_sample")
    if per and len(per) > 1:
        n = len(per)
        m = sum(per) / n
        return math.sqrt(sum((v - m) ** 2 for v in per) / (n - 1) / n)
    return d.get("se")


def metric_vs_nfe_figure(res: dict, title: Optional[str] = None):
    """One line per method of a table result (``writers.assemble`` / ``results.json``), with error bars.

    The best-of-group and auto (k, h) rows are drawn first, as wide translucent bands behind the single
    variants (so they never hide them), with the winning variant written at each point. Error bars: one
    standard error of the cell's mean over its samples. A hollow marker: the paired per-sample difference
    to the baseline row is within two standard errors (a tie, ``reproduction.paired``)."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    nfes = res["nfe"]
    plotted, values, any_se, any_tie, handles = 0, [], False, False, []
    extras = [r["name"] for r in res["rows"] if "(extra" in r["name"]]
    ordered = sorted(enumerate(res["rows"]), key=lambda ir: not (ir[1].get("best_of") or ir[1].get("auto")))
    for index, row in ordered:
        pts = [(n, row["cells"].get(str(n), row["cells"].get(n))) for n in nfes]
        ok = [(n, d) for n, d in pts if d and d.get("status") == "ok"]
        if not ok:
            continue
        xs, ys = [n for n, _ in ok], [d["ours"] for _, d in ok]
        values += ys
        plotted += 1
        if row.get("best_of") or row.get("auto"):
            colour = "0.45" if row.get("best_of") else "#d4a017"
            line, = ax.plot(xs, ys, "-", color=colour, lw=10 if row.get("best_of") else 5, alpha=0.3,
                            solid_capstyle="round", zorder=1, label=row["name"])
            handles.append((index, line))
            if row.get("best_of"):  # the winner per NFE, on a top axis where it covers no data
                tags = {x: d.get("winner") or ("tie " + ",".join(d["tie"]) if d.get("tie") else "")
                        for x, (_, d) in zip(xs, ok)}
                top = ax.secondary_xaxis("top")
                top.set_xticks(xs, labels=[tags[x] for x in xs], fontsize=7)
                top.set_xlabel("best (k, h) per NFE (grey band)", fontsize=7)
            continue
        st = _row_style(row["name"].split(" (default")[0], index,
                        extras.index(row["name"]) if row["name"] in extras else 0)
        se = [_mean_se(d) for _, d in ok]
        any_se |= any(s is not None for s in se)
        yerr = [s or 0.0 for s in se] if any(s is not None for s in se) else None
        cont = ax.errorbar(xs, ys, yerr=yerr, color=st["color"], ls=st["ls"], lw=st["lw"], marker=st["marker"],
                           ms=5, capsize=2.5, elinewidth=1.0, zorder=3, label=row["name"])
        handles.append((index, cont))
        ties = [(x, y) for x, y, (_, d) in zip(xs, ys, ok) if (d.get("paired") or {}).get("verdict") == "tie"]
        if ties:  # hollow marker on top of the filled one: not distinguishable from the baseline
            any_tie = True
            ax.plot([t[0] for t in ties], [t[1] for t in ties], ls="none", marker=st["marker"], ms=5,
                    mfc="white", mec=st["color"], zorder=4)
        paper = [(n, d.get("paper")) for n, d in pts if d and d.get("paper") is not None]
        if paper:
            line, = ax.plot([p[0] for p in paper], [p[1] for p in paper], ":", marker="x", color=st["color"], lw=1,
                            zorder=2, label=f"{row['name']} (paper)")
            handles.append((index + 0.5, line))
            values += [p[1] for p in paper]
    if not plotted:
        raise PFDiffError("nothing to plot: no cell of the table has a value yet")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(res.get("metric_label", "metric") + (" (lower is better)" if res.get("metric") == "exact" else ""))
    ax.set_yscale("log")
    # labelled ticks at 1, 2, 5 x 10^k (not only decades), and at every NFE of the table
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(FixedLocator(nfes))
    ax.set_xlim(min(nfes) - 0.5, max(nfes) + 0.5)
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.12, which="minor")
    ax.set_title(title or res.get("title", "").split(" (")[0], fontsize=10)
    handles = [h for _, h in sorted(handles, key=lambda ih: ih[0])]  # the table's row order
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    notes = []
    if any_se:
        n = res.get("num_samples")
        notes.append(f"error bars: ±1 standard error of the mean over the {n} samples of each cell" if n else
                     "error bars: ±1 standard error of the mean")
    if any_tie:
        base = next((r["name"] for r in res["rows"]), "the baseline")
        notes.append(f"hollow marker: paired difference to {base} (same x_T) within 2 standard errors (tie)")
    if any(r.get("best_of") for r in res["rows"]):
        notes.append("grey band: best (k, h) per NFE, chosen on these same samples (top axis: the winner, or "
                     "the variants tied with it within 2 paired standard errors)")
    if any(r.get("auto") for r in res["rows"]):
        notes.append("gold band: the (k, h) `pfdiff-bench tune` picked on a disjoint pilot batch")
    if notes:
        fig.text(0.01, -0.01, "\n".join(notes), fontsize=7, va="top", ha="left", color="0.25")
    fig.tight_layout()
    return fig


def metric_vs_nfe(res: dict, out: Path, title: Optional[str] = None) -> list[Path]:
    """``metric_vs_nfe_figure`` saved to ``out`` (no suffix: PNG and PDF)."""
    return save_figure(metric_vs_nfe_figure(res, title), out, default=(".png", ".pdf"))


# ------------------------------------------------------------------------ samples
def image_grid(images: dict, out: Path, per_cell: int = 4) -> Path:
    """``images[(row, nfe)]`` = uint8 NHWC (same seeds everywhere) -> one figure, rows x NFE columns."""
    if not images:
        raise PFDiffError("no images to put in a grid")
    rows = list(dict.fromkeys(r for r, _ in images))
    nfes = sorted({n for _, n in images})
    fig, axes = plt.subplots(len(rows), len(nfes), figsize=(1.2 * per_cell * len(nfes) + 1.5, 1.25 * len(rows) + 0.4),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j, n in enumerate(nfes):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            imgs = images.get((r, n))
            if imgs is not None:
                strip = torch.cat(list(imgs[:per_cell]), dim=1)  # H x (k*W) x C
                ax.imshow(strip.numpy(), interpolation="nearest")
            if i == 0:
                ax.set_title(f"NFE {n}", fontsize=8)
            if j == 0:
                ax.set_ylabel(r.replace("DDIM + ", ""), rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)[0]


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B,C,H,W] -> uint8 [B,H,W,C] (torchvision save_image rounding)."""
    return ((x.float() + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def projection_grid_figure(samples: dict, exact: dict, gmm, rows: Optional[Sequence[str]] = None,
                           nfes: Optional[Sequence[int]] = None, num_data: int = 1500):
    """Samples of an analytic model projected on the first two principal directions of the exact data
    distribution, one panel per (row, NFE), each against the distribution's own samples.

    ``samples[(row, nfe)]``: a sampler's outputs; ``exact[(row, nfe)]``: the exact probability-flow ODE
    solutions from the same x_T over the same interval. The first row shows the exact solutions (the
    reference); in the others a thin line joins each output to its exact solution, so the line length is
    the sample's error (in projection) and the panel title gives the mean RMS error of the whole vector."""
    if not samples:
        raise PFDiffError("no samples to project")
    rows = list(rows or dict.fromkeys(r for r, _ in samples))
    nfes = sorted(nfes or {n for _, n in samples})
    _, cov = gmm.mean_cov()
    mean = gmm.weights @ gmm.means.reshape(gmm.num_classes, -1)
    evals, evecs = torch.linalg.eigh(cov)
    basis = evecs[:, -2:].flip(1)  # the two largest principal directions
    frac = float(evals[-2:].sum() / evals.sum())

    def proj(x):
        return ((x.reshape(x.shape[0], -1).to(torch.float64) - mean) @ basis).numpy()

    data = proj(gmm.sample(num_data, generator=torch.Generator().manual_seed(12345))[0])
    ref_row = next(iter(rows))
    panels = [(EXACT_ROW, None), *[(r, r) for r in rows]]
    fig, axes = plt.subplots(len(panels), len(nfes), figsize=(2.3 * len(nfes) + 1.6, 2.2 * len(panels) + 0.6),
                             squeeze=False, sharex=True, sharey=True)
    for i, (label, r) in enumerate(panels):
        for j, n in enumerate(nfes):
            ax = axes[i][j]
            ax.scatter(data[:, 0], data[:, 1], s=3, c="0.8", lw=0, zorder=0, rasterized=True)
            key = (r if r is not None else ref_row, n)
            if key not in exact:
                ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", fontsize=7, color="0.4")
                continue
            e = proj(exact[key])
            if r is None:
                ax.scatter(e[:, 0], e[:, 1], s=9, c="black", marker="x", lw=0.8, zorder=2)
                ax.set_title(f"NFE {n}\nexact ODE solution (reference)" if i == 0 else "", fontsize=7.5)
            else:
                s = proj(samples[key])
                ax.plot([e[:, 0], s[:, 0]], [e[:, 1], s[:, 1]], "-", color="C3", lw=0.6, alpha=0.6, zorder=1)
                ax.scatter(s[:, 0], s[:, 1], s=7, c="C3", lw=0, zorder=2)
                full = (samples[key].reshape(len(s), -1).double() - exact[key].reshape(len(s), -1).double())
                rms = float(full.pow(2).mean(1).sqrt().mean())
                ax.set_title(f"mean RMS error {rms:.4f} ({len(s)} samples)", fontsize=7)
            if j == 0:
                ax.set_ylabel(label.replace("DDIM + ", "").replace(" (extra, not in paper)", "*") + "\n\nPC 2",
                              fontsize=7.5)
            if i == len(panels) - 1:
                ax.set_xlabel("PC 1", fontsize=7.5)
            ax.tick_params(labelsize=6)
    fig.suptitle("Samples projected on the 2 principal directions of the exact data distribution "
                 f"({frac:.0%} of its variance)", fontsize=9)
    fig.text(0.01, 0.0, "grey: samples of the exact data distribution; black x: exact ODE solutions from the "
             "same x_T; red dots: the sampler's outputs, each joined by a line to its exact solution\n(line "
             "length = that sample's error in this projection; the title's RMS error is over all dimensions)",
             fontsize=7, va="top", color="0.25")
    fig.tight_layout()
    return fig


def projection_grid(samples: dict, exact: dict, gmm, out: Path, rows=None, nfes=None) -> Path:
    return save_figure(projection_grid_figure(samples, exact, gmm, rows, nfes), out)[0]


# ------------------------------------------------------------------------ trajectories
def trajectories_2d_figure(cfg: dict, nfe: int = 4, variants=((1, 1), (2, 1), (3, 3)), num_paths: int = 6):
    """Probability-flow trajectories of a 2-D analytic model: exact path, DDIM, PFDiff (springboards marked)."""
    import copy

    from matplotlib.lines import Line2D
    from matplotlib.patches import Circle

    from pfdiff_bench.config import override
    from pfdiff_bench.sampling.setup import build
    from pfdiff_bench.samplers import run_sampler
    from pfdiff_bench.seeding import draw_inputs

    if cfg["model"]["type"] != "analytic" or len(cfg["model"]["shape"]) != 1 or cfg["model"]["shape"][0] != 2:
        raise PFDiffError("trajectory plots need a 2-D analytic config (model.shape: [2]), e.g. toy2d")
    panels = [("DDIM", None), *[(f"PFDiff-{k}_{h}", (k, h)) for k, h in variants]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.9), squeeze=False)
    lo, hi = [math.inf, math.inf], [-math.inf, -math.inf]
    for ax, (title, pf) in zip(axes[0], panels):
        c = copy.deepcopy(cfg)
        override(c, "sampler.pfdiff", "none" if pf is None else f"{pf[0]},{pf[1]}")
        setup = build(c, torch.device("cpu"), nfe=nfe)
        x_T, y, _ = draw_inputs(c["sampling"]["seed"], range(num_paths), setup.sample_shape, setup.num_classes)
        alphas = [setup.schedule.alpha_bar_at_index(int(t)) for t in setup.plan.timesteps] + [1.0]
        # exact path through a dense set of noise levels
        a_dense = torch.logspace(math.log10(alphas[0]), 0, 60, dtype=torch.float64).tolist()
        exact = [x_T]
        for a0, a1 in zip(a_dense[:-1], a_dense[1:]):
            exact.append(setup.gmm.reference_solution(exact[-1], a0, a1, steps=20))
        ex = torch.stack(exact)  # [T, B, 2]
        states, boards = [(0, x_T)], []

        def cb(kind, j, x):
            (boards if kind == "springboard" else states).append((j, x.clone()))

        res = run_sampler(setup.plan, setup.model, setup.schedule, x_T, callback=cb)
        colour = "C0" if pf is None else "C3"
        means = setup.gmm.means.reshape(-1, 2)
        for mu, s in zip(means.tolist(), setup.gmm.std.tolist()):
            ax.add_patch(Circle(mu, 2 * s, color="0.86", zorder=0, lw=0))
        for b in range(num_paths):
            ax.plot(ex[:, b, 0], ex[:, b, 1], "-", color="0.55", lw=1.0, zorder=1)
            pts = torch.stack([s[1][b] for s in states])
            ax.plot(pts[:, 0], pts[:, 1], "-o", color=colour, ms=3, lw=1.2, zorder=2)
            for j, xb in boards:
                ax.plot(xb[b, 0], xb[b, 1], marker="^", color="C2", ms=5, zorder=3, ls="none")
            allp = torch.cat([ex[:, b], pts, *[xb[b:b + 1] for _, xb in boards]])
            lo = [min(lo[d], float(allp[:, d].min())) for d in range(2)]
            hi = [max(hi[d], float(allp[:, d].max())) for d in range(2)]
        ax.plot(x_T[:, 0], x_T[:, 1], "s", ms=6, mfc="white", mec="black", zorder=4, ls="none")
        ax.plot(ex[-1, :, 0], ex[-1, :, 1], "*", ms=9, color="black", zorder=4, ls="none")
        ax.plot(res.x[:, 0], res.x[:, 1], "o", ms=6, color=colour, mec="black", mew=0.6, zorder=5, ls="none")
        err = float((res.x.double() - ex[-1]).pow(2).sum(1).sqrt().mean())
        ax.set_title(f"{title}, NFE {res.nfe}\nmean end-point error {err:.3f}", fontsize=8.5)
        ax.set_xlabel("$x_1$")
        if ax is axes[0][0]:
            ax.set_ylabel("$x_2$")
    pad = 0.08 * max(hi[0] - lo[0], hi[1] - lo[1])
    for ax in axes[0]:  # one x and y range for every panel, so the panels compare directly
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
        ax.set_aspect("equal", adjustable="box")
    handles = [Circle((0, 0), 1, color="0.86", label="data: mixture component, mean ± 2 std"),
               Line2D([], [], color="0.55", label="exact probability-flow ODE path"),
               Line2D([], [], ls="none", marker="s", mfc="white", mec="black", label="start x_T (same in every panel)"),
               Line2D([], [], ls="none", marker="*", ms=9, color="black", label="exact end point"),
               Line2D([], [], marker="o", ms=3, color="C0", label="DDIM states"),
               Line2D([], [], marker="o", ms=3, color="C3", label="PFDiff states"),
               Line2D([], [], ls="none", marker="o", ms=6, color="0.6", mec="black", label="sampler end point"),
               Line2D([], [], ls="none", marker="^", ms=5, color="C2", label="PFDiff springboards (future-score points)")]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7.5, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(f"Probability-flow trajectories ({cfg.get('name', 'toy2d')}, {cfg['sampler']['grid']} grid): "
                 "noise x_T (square) to data", fontsize=10)
    fig.tight_layout(rect=(0, 0.15, 1, 0.93))
    return fig


def trajectories_2d(cfg: dict, nfe: int = 4, variants=((1, 1), (2, 1), (3, 3)), num_paths: int = 6,
                    out: Path = Path("results/toy/trajectories")) -> list[Path]:
    """``trajectories_2d_figure`` saved to ``out`` (no suffix: PNG and PDF)."""
    return save_figure(trajectories_2d_figure(cfg, nfe, variants, num_paths), out, default=(".png", ".pdf"))
