"""Figures: metric against NFE, image grids across methods and NFEs, 2-D ODE trajectories.

Everything writes PNG (and PDF for line plots) with matplotlib's Agg backend, so it runs headless.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pfdiff_bench.errors import PFDiffError  # noqa: E402


def metric_vs_nfe(res: dict, out: Path, title: Optional[str] = None) -> list[Path]:
    """One line per method from a table result (``reproduce.assemble`` / ``results.json``)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    nfes = res["nfe"]
    plotted = 0
    for row in res["rows"]:
        pts = [(n, row["cells"][str(n)] if str(n) in row["cells"] else row["cells"].get(n)) for n in nfes]
        xs = [n for n, d in pts if d and d.get("status") == "ok"]
        ys = [d["ours"] for n, d in pts if d and d.get("status") == "ok"]
        if not xs:
            continue
        style = "-" if "PFDiff" in row["name"] and not row.get("best_of") else "--"
        width = 2.6 if row.get("best_of") else 1.4
        ax.plot(xs, ys, style, marker="o", lw=width, ms=4, label=row["name"])
        plotted += 1
        paper = [(n, d.get("paper")) for n, d in pts if d and d.get("paper") is not None]
        if paper:
            ax.plot([p[0] for p in paper], [p[1] for p in paper], ":", marker="x", color=ax.lines[-1].get_color(),
                    lw=1, label=f"{row['name']} (paper)")
    if not plotted:
        raise PFDiffError("nothing to plot: no cell of the table has a value yet")
    ax.set_xlabel("NFE")
    ax.set_ylabel(res.get("metric_label", "metric"))
    ax.set_yscale("log")
    ax.set_xticks(nfes)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or res.get("title", "").split(" (")[0], fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, out, pdf=True)


def image_grid(images: dict, out: Path, per_cell: int = 4) -> Path:
    """``images[(row, nfe)]`` = uint8 NHWC (same seeds everywhere) -> one PNG, rows x NFE columns."""
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
    return _save(fig, out, pdf=False)[0]


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float [B,C,H,W] -> uint8 [B,H,W,C] (torchvision save_image rounding)."""
    return ((x.float() + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def trajectories_2d(cfg: dict, nfe: int = 4, variants=((1, 1), (2, 1), (3, 3)), num_paths: int = 6,
                    out: Path = Path("results/toy/trajectories.png")) -> list[Path]:
    """Probability-flow trajectories of a 2-D analytic model: exact path, DDIM, PFDiff (springboards marked)."""
    import copy

    from pfdiff_bench.config import override
    from pfdiff_bench.sampling.setup import build
    from pfdiff_bench.samplers import run_sampler
    from pfdiff_bench.seeding import draw_inputs

    if cfg["model"]["type"] != "analytic" or len(cfg["model"]["shape"]) != 1 or cfg["model"]["shape"][0] != 2:
        raise PFDiffError("trajectory plots need a 2-D analytic config (model.shape: [2]), e.g. toy2d")
    panels = [("DDIM", None), *[(f"PFDiff-{k}_{h}", (k, h)) for k, h in variants]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.5), squeeze=False)
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
        means = setup.gmm.means.reshape(-1, 2)
        ax.scatter(means[:, 0], means[:, 1], s=260, c="#dddddd", zorder=0)
        for b in range(num_paths):
            ax.plot(ex[:, b, 0], ex[:, b, 1], "-", color="0.55", lw=1.0, zorder=1)
            pts = torch.stack([s[1][b] for s in states])
            ax.plot(pts[:, 0], pts[:, 1], "-o", color="C0" if pf is None else "C3", ms=3.5, lw=1.2, zorder=2)
            for j, xb in boards:
                ax.plot(xb[b, 0], xb[b, 1], marker="^", color="C2", ms=6, zorder=3, ls="none")
        ax.plot([], [], "-", color="0.55", label="exact ODE")
        ax.plot([], [], "-o", color="C0" if pf is None else "C3", ms=3.5, label=f"{title} states")
        if boards:
            ax.plot([], [], "^", color="C2", ls="none", label="springboards")
        ax.set_title(f"{title}, NFE {res.nfe}", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(f"Probability-flow trajectories ({cfg.get('name', 'toy2d')}, {cfg['sampler']['grid']} grid)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out, pdf=True)


def _save(fig, out: Path, pdf: bool) -> list[Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    fig.savefig(png, dpi=130)
    paths = [png]
    if pdf:
        fig.savefig(out.with_suffix(".pdf"))
        paths.append(out.with_suffix(".pdf"))
    plt.close(fig)
    return paths
